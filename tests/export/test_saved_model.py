"""The SavedModel export: layout, signatures, fresh-process parity, warm-up, bad input."""

import os
import re
import struct
import subprocess
import sys
import textwrap
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import experiments
from fcn_tf.config import override
from fcn_tf.export import common, saved_model
from fcn_tf.models import build_fcn
from harness import runs

MAX_PIXELS = 64 * 64
NAME = "fcn"


def tiny_config():
    # eval_target smaller than the test images, so the in-graph resize and the
    # resize back both do something.
    return override(
        experiments.get("synthetic_r18_os8"),
        "model.head_channels=16",
        "model.aux_channels=8",
        "data.eval_target=32,24",
    )


def random_image(seed, height, width, channels=3):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def png(image):
    return tf.io.encode_png(image).numpy()


def png_header_only(width, height):
    """A PNG whose IHDR claims `width` x `height` (the decoder would reject 0)."""

    def chunk(kind, payload):
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def bmp(image):
    """A 24-bit BMP (TensorFlow cannot encode one): sizes only known after decoding."""
    height, width, _ = image.shape
    row = width * 3 + (-width * 3) % 4
    pixels = b"".join(
        image[y, :, ::-1].tobytes() + b"\0" * (row - width * 3) for y in reversed(range(height))
    )
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + info + pixels


def reference_logits(model, config, image):
    """The in-process model with the eval recipe written out independently of fcn_tf.export."""
    h, w = image.shape[:2]
    target = config.data.eval_target
    scale = min(max(target) / max(h, w), min(target) / min(h, w))
    size = (int(h * scale + 0.5), int(w * scale + 0.5))
    x = tf.image.resize(image[np.newaxis].astype(np.float32), size, method="bilinear")
    x = (x - np.array(config.data.mean, np.float32)) / np.array(config.data.std, np.float32)
    logits = model(x, training=False)["logits"]
    return tf.image.resize(logits, (h, w), method="bilinear")[0].numpy()


def assert_logits_close(actual, expected):
    rel = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
    assert rel <= 1e-5, rel


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    config = tiny_config()
    keras.utils.set_random_seed(0)
    model = build_fcn(config.model, sync_bn=False)
    base = str(tmp_path_factory.mktemp("export") / NAME)
    path = saved_model.export(config, model, base, max_pixels=MAX_PIXELS)
    return config, model, base, path


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(exported[3])


def test_layout_assets_and_versions(exported):
    config, model, base, path = exported
    assert path == os.path.join(base, "1")
    assert sorted(os.listdir(base)) == ["1"]  # the staging directory is gone
    for name in ("saved_model.pb", "variables", "assets", "assets.extra/tf_serving_warmup_requests"):
        assert os.path.exists(os.path.join(path, name)), name
    names, palette = common.read_class_info(path)
    assert names == ["background", "disc", "square", "triangle", "ring"]
    assert palette.shape == (5, 3) and palette.dtype == np.uint8
    assert common.read_config(path) == config
    assert saved_model.resolve_version_dir(base) == path
    assert saved_model.next_version(base) == 2
    with pytest.raises(FileExistsError, match="already exists"):
        saved_model.export(config, model, base, version=1)


def test_next_version_ignores_non_integer_entries(tmp_path):
    for name in ("3", "10", ".tmp-11-abc", "notes"):
        (tmp_path / name).mkdir()
    assert saved_model.next_version(str(tmp_path)) == 11
    assert saved_model.next_version(str(tmp_path / "missing")) == 1


def test_saved_model_cli_lists_signatures(exported):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorflow.python.tools.saved_model_cli",
            "show",
            "--all",
            "--dir",
            exported[3],
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    ).stdout
    # {signature: {(section, name): (dtype, shape)}} from the CLI's text.
    signatures = {}
    for name, body in re.findall(r"signature_def\['(\w+)'\]:(.*?)Method name", out, re.S):
        entries = re.findall(
            r"(inputs|outputs)\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+shape: ([^\n]+)", body
        )
        signatures[name] = {(section, key): (dtype, shape) for section, key, dtype, shape in entries}
    assert set(saved_model.SIGNATURES) <= set(signatures), out

    def tensors(name, section):
        return {key: v for (sec, key), v in signatures[name].items() if sec == section}

    assert tensors("serving_default", "inputs") == {"images": ("DT_STRING", "(-1)")}
    assert tensors("serving_default", "outputs") == {
        "confidence": ("DT_FLOAT", "(-1, -1, -1)"),
        "heights": ("DT_INT32", "(-1)"),
        "labels": ("DT_INT32", "(-1, -1, -1)"),
        "widths": ("DT_INT32", "(-1)"),
    }
    for name in ("predict_images", "predict_images_with_logits"):
        assert tensors(name, "inputs") == {"images": ("DT_UINT8", "(-1, -1, -1, 3)")}
    assert tensors("predict_images", "outputs") == {
        "confidence": ("DT_FLOAT", "(-1, -1, -1)"),
        "labels": ("DT_INT32", "(-1, -1, -1)"),
    }
    assert tensors("predict_images_with_logits", "outputs") == {
        "confidence": ("DT_FLOAT", "(-1, -1, -1)"),
        "labels": ("DT_INT32", "(-1, -1, -1)"),
        "logits": ("DT_FLOAT", "(-1, -1, -1, 5)"),
    }


# Runs in a fresh interpreter: TensorFlow and the serving protos only.
FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path, inputs, outputs = sys.argv[1:4]
    data = np.load(inputs)
    model = tf.saved_model.load(path)
    result = {}
    encoded = [open(name, "rb").read() for name in ("photo.jpg", "small.png")]
    out = model.signatures["serving_default"](images=tf.constant(encoded))
    for key, value in out.items():
        result["serve_" + key] = value.numpy()
    for name in ("predict_images", "predict_images_with_logits"):
        out = model.signatures[name](images=tf.constant(data["pixels"]))
        for key, value in out.items():
            result[name + "_" + key] = value.numpy()
    warmup = path + "/assets.extra/tf_serving_warmup_requests"
    replayed = []
    for record in tf.data.TFRecordDataset(warmup):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        feeds = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        out = model.signatures[request.model_spec.signature_name](**feeds)
        replayed.append(request.model_spec.name + "/" + request.model_spec.signature_name)
        result["warmup_" + request.model_spec.signature_name] = out["labels"].numpy()
    result["replayed"] = np.array(replayed)
    result["fcn_tf_imported"] = np.array(any(m.split(".")[0] == "fcn_tf" for m in sys.modules))
    np.savez(outputs, **result)
    """
)


def test_fresh_process_matches_in_process_model(exported, tmp_path):
    config, model, base, path = exported
    photo = random_image(1, 40, 56)
    jpeg = tf.io.encode_jpeg(photo, quality=90).numpy()
    small = random_image(2, 30, 20)
    pixels = np.stack([random_image(3, 36, 44), random_image(4, 36, 44)])
    (tmp_path / "photo.jpg").write_bytes(jpeg)
    (tmp_path / "small.png").write_bytes(png(small))
    np.savez(tmp_path / "in.npz", pixels=pixels)
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_PROCESS)
    subprocess.run(
        [sys.executable, str(script), path, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        check=True,
        cwd=tmp_path,  # not the repository, so fcn_tf cannot sneak in from the cwd
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    out = np.load(tmp_path / "out.npz", allow_pickle=True)
    assert not out["fcn_tf_imported"]

    # serving_default: two sizes in one batch, padded with -1 / 0.
    decoded = tf.io.decode_jpeg(jpeg, channels=3).numpy()
    np.testing.assert_array_equal(out["serve_heights"], [40, 30])
    np.testing.assert_array_equal(out["serve_widths"], [56, 20])
    assert out["serve_labels"].shape == (2, 40, 56)
    for i, image in enumerate([decoded, small]):
        h, w = image.shape[:2]
        logits = reference_logits(model, config, image)
        np.testing.assert_array_equal(out["serve_labels"][i, :h, :w], logits.argmax(-1))
        probs = tf.nn.softmax(logits).numpy().max(-1)
        np.testing.assert_allclose(out["serve_confidence"][i, :h, :w], probs, rtol=1e-5)
    assert (out["serve_labels"][1, 30:] == -1).all() and (out["serve_labels"][1, :, 20:] == -1).all()
    assert (out["serve_confidence"][1, 30:] == 0).all()

    # predict_images(_with_logits): same size batch, logits at the input size.
    expected = np.stack([reference_logits(model, config, image) for image in pixels])
    assert out["predict_images_with_logits_logits"].shape == (2, 36, 44, 5)
    assert_logits_close(out["predict_images_with_logits_logits"], expected)
    np.testing.assert_array_equal(out["predict_images_labels"], expected.argmax(-1))
    np.testing.assert_array_equal(out["predict_images_with_logits_labels"], expected.argmax(-1))
    assert out["predict_images_labels"].dtype == np.int32

    # Warm-up: one record per signature, replayed through the loaded model.
    assert sorted(out["replayed"]) == sorted(f"{NAME}/{s}" for s in saved_model.SIGNATURES)
    assert out["warmup_serving_default"].shape == (1, 24, 32)
    np.testing.assert_array_equal(out["warmup_predict_images"], out["warmup_predict_images_with_logits"])


def test_grayscale_and_rgba_are_converted_to_rgb(loaded):
    serve = loaded.signatures["serving_default"]
    rgb = random_image(5, 20, 28)
    gray = rgb[..., :1]
    rgba = np.concatenate([rgb, random_image(6, 20, 28, 1)], -1)
    out = serve(images=tf.constant([png(gray), png(rgba), png(np.repeat(gray, 3, -1)), png(rgb)]))
    labels = out["labels"].numpy()
    np.testing.assert_array_equal(labels[0], labels[2])  # gray -> replicated channels
    np.testing.assert_array_equal(labels[1], labels[3])  # RGBA -> alpha dropped


def bad_inputs():
    return {
        "empty bytes": (b"", r"images\[1\] is empty \(0 bytes\)"),
        "not an image": (b"this is a text file, not a picture", r"images\[1\] is not an image"),
        "zero-size png": (png_header_only(0, 10), r"images\[1\] has size 10x0 .*1 to max_pixels=4096"),
        "too many pixels (png header)": (png(random_image(7, 80, 60)), r"images\[1\] has size 80x60"),
        "too many pixels (jpeg header)": (
            tf.io.encode_jpeg(random_image(8, 70, 70)).numpy(),
            r"images\[1\] has size 70x70",
        ),
        "too many pixels (bmp, after decoding)": (
            bmp(random_image(9, 65, 65)),
            r"images\[1\] has size 65x65",
        ),
        "truncated jpeg": (tf.io.encode_jpeg(random_image(10, 20, 20)).numpy()[:60], r"JPEG"),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_encoded_input_is_invalid_argument(loaded, case):
    contents, message = bad_inputs()[case]
    serve = loaded.signatures["serving_default"]
    good = png(random_image(11, 16, 16))
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        serve(images=tf.constant([good, contents]))
    # The model keeps serving after the error.
    assert serve(images=tf.constant([good]))["labels"].shape == (1, 16, 16)


def test_bmp_is_decoded(loaded):
    image = random_image(12, 12, 10)
    out = loaded.signatures["serving_default"](images=tf.constant([bmp(image), png(image)]))
    np.testing.assert_array_equal(out["labels"][0], out["labels"][1])


@pytest.mark.parametrize("shape", [(1, 0, 5, 3), (1, 5, 0, 3), (1, 65, 64, 3)])
def test_bad_pixel_input_is_invalid_argument(loaded, shape):
    predict = loaded.signatures["predict_images"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images has size .*max_pixels=4096"):
        predict(images=tf.zeros(shape, tf.uint8))
    assert predict(images=tf.zeros([1, 8, 8, 3], tf.uint8))["labels"].shape == (1, 8, 8)


def test_empty_batch(loaded):
    out = loaded.signatures["serving_default"](images=tf.constant([], tf.string))
    assert out["labels"].shape[0] == 0 and out["heights"].shape == (0,)


def script_error_lines(stderr: str) -> list[str]:
    """A script's stderr without TensorFlow's start-up log lines."""
    lines = [line for line in stderr.splitlines() if line.strip() and "absl::InitializeLog" not in line]
    return [line for line in lines if not line.startswith(("I0000", "W0000", "E0000", "To enable"))]


def test_export_script_refuses_an_existing_version_in_one_line(tmp_path):
    (tmp_path / NAME / "3").mkdir(parents=True)
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(runs.REPO, "scripts", "export.py"),
            "--experiment=synthetic_r18_os8",
            f"--checkpoint={tmp_path / 'no-such-checkpoint'}",  # never read: the version is checked first
            f"--export_dir={tmp_path / NAME}",
            "--version=3",
        ],
        capture_output=True,
        text=True,
        env=runs.subprocess_env(),
        timeout=300,
    )
    assert run.returncode == 1
    assert script_error_lines(run.stderr) == [
        f"export.py: export version already exists, not overwriting: {tmp_path / NAME / '3'}"
    ], run.stderr
    assert os.listdir(tmp_path / NAME) == ["3"]


@pytest.mark.slow  # a fresh interpreter builds, restores and exports: ~45 s on 2 shared cores
def test_export_script_from_workdir(exported, tmp_path):
    from fcn_tf.checkpoints import checkpoint_dir
    from fcn_tf.config import to_json

    config, model, base, path = exported
    workdir = tmp_path / "workdir"
    tf.train.Checkpoint(model=model).save(os.path.join(checkpoint_dir(str(workdir)), "ckpt"))
    (workdir / "config.json").write_text(to_json(config))
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(runs.REPO, "scripts", "export.py"),
            "--experiment=synthetic_r18_os8",
            f"--workdir={workdir}",
            f"--export_dir={tmp_path / NAME}",
            f"--max_pixels={MAX_PIXELS}",
        ],
        capture_output=True,
        text=True,
        cwd=runs.REPO,
        env=runs.subprocess_env(TF_CPP_MIN_LOG_LEVEL="3"),  # this checkout's fcn_tf, not an installed one
    )
    assert run.returncode == 0, run.stderr
    version_1 = str(tmp_path / NAME / "1")
    assert run.stdout.strip().endswith(f"to {version_1}")
    assert common.read_config(version_1) == config  # from WORKDIR/config.json
    image = tf.constant(random_image(13, 20, 28)[np.newaxis])
    ours = tf.saved_model.load(version_1).signatures["predict_images_with_logits"](images=image)
    theirs = tf.saved_model.load(path).signatures["predict_images_with_logits"](images=image)
    np.testing.assert_array_equal(ours["logits"], theirs["logits"])


def test_graph_loader_reads_the_weights(exported):
    """TF Serving loads the saved graph into a session, not through `tf.saved_model.load`.

    Each variable the functions capture must be restored by the SavedModel's
    restore op; a Keras 3 model tracked as such would leave them unrestored
    ("Could not find variable ...").
    """
    config, model, base, path = exported
    image = random_image(16, 36, 44)
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
        signature = meta_graph.signature_def["predict_images_with_logits"]
        logits = session.run(signature.outputs["logits"].name, {signature.inputs["images"].name: image[None]})
    assert_logits_close(logits[0], reference_logits(model, config, image))


def test_grpc_client_example_against_a_local_prediction_service(loaded):
    """The gRPC client of docs/export.md, against a stand-in PredictionService serving the loaded export.

    No TF Serving binary can run here; the stand-in checks that the example's
    request (model spec, `images` input, output_filter) and its reading of
    the response fit the exported signature.
    """
    from concurrent import futures

    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    class Service(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            assert request.model_spec.name == NAME
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            outputs = loaded.signatures[request.model_spec.signature_name](**inputs)
            keep = set(request.output_filter) or set(outputs)
            response = predict_pb2.PredictResponse()
            for key in keep:
                response.outputs[key].CopyFrom(tf.make_tensor_proto(outputs[key].numpy()))
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    try:
        jpeg = tf.io.encode_jpeg(random_image(15, 30, 42)).numpy()
        # --- the docs/export.md example, verbatim apart from the port and the bytes ---
        channel = grpc.insecure_channel(f"localhost:{port}")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "fcn"
        request.model_spec.signature_name = "serving_default"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto([jpeg]))
        request.output_filter.extend(["labels", "heights", "widths"])
        response = stub.Predict(request, timeout=60.0)
        h = tf.make_ndarray(response.outputs["heights"])[0]
        w = tf.make_ndarray(response.outputs["widths"])[0]
        labels = tf.make_ndarray(response.outputs["labels"])[0, :h, :w]
        # ---
        assert set(response.outputs) == {"labels", "heights", "widths"}
        expected = loaded.signatures["serving_default"](images=tf.constant([jpeg]))["labels"][0]
        np.testing.assert_array_equal(labels, expected)
        channel.close()
    finally:
        server.stop(None)
