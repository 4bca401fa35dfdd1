"""eval_lib.evaluate on a tiny Keras model and in-memory eval datasets (pipeline contract)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import experiments
from fcn_tf import eval_lib, inference
from fcn_tf.config import override
from fcn_tf.data import classes
from fcn_tf.metrics import ConfusionMatrix
from harness.cluster import Cluster, Sim

SIZES = [((6, 9), (11, 17)), ((8, 8), (8, 8)), ((7, 5), (13, 10)), ((9, 12), (9, 12)), ((5, 10), (10, 19))]


def tiny_model(num_classes, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(num_classes, 1)(x)
    return keras.Model(inputs, {"logits": x})


def examples(num_classes, sizes=SIZES, seed=0):
    """Eval examples per the pipeline contract: resized image, original-size label with ignore pixels."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (image_size, label_size) in enumerate(sizes):
        label = rng.integers(0, num_classes, (1, *label_size)).astype(np.int32)
        label[rng.random(label.shape) < 0.2] = 255
        out.append(
            {
                "image": rng.normal(size=(1, *image_size, 3)).astype(np.float32),
                "label": label,
                "image_id": np.array([f"img_{i}"]),
            }
        )
    return out


def as_dataset(items):
    spec = {
        "image": tf.TensorSpec((None, None, None, 3), tf.float32),
        "label": tf.TensorSpec((None, None, None), tf.int32),
        "image_id": tf.TensorSpec((None,), tf.string),
    }
    return tf.data.Dataset.from_generator(lambda: iter(items), output_signature=spec)


def expected_matrix(model, items, config):
    """The eager reference: predict each example, argmax, count."""
    cm = ConfusionMatrix(config.model.num_classes)
    for item in items:
        scores = inference.predict(
            inference.model_logits_fn(model),
            item["image"],
            item["label"].shape[1:3],
            config.eval,
            config.model.num_classes,
        )
        cm.update(item["label"], tf.argmax(scores, -1))
    return cm.matrix


def config_for(*overrides):
    return override(experiments.get("synthetic_r18_os8"), *overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("eval.mode=slide", "eval.crop_size=6,6", "eval.stride=4,4", "eval.window_batch=3"),
        ("eval.scales=0.75,1.0,1.5", "eval.flip=true"),
    ],
    ids=["whole", "slide", "multiscale_flip"],
)
def test_evaluate_matches_eager_reference(overrides):
    config = config_for(*overrides)
    model = tiny_model(5)
    items = examples(5)
    result = eval_lib.evaluate(model, as_dataset(items), config)
    np.testing.assert_array_equal(result["confusion_matrix"], expected_matrix(model, items, config))
    assert result["num_examples"] == 5
    assert result["num_pixels"] == sum((it["label"] != 255).sum() for it in items)
    assert result["class_names"] == ["background", "disc", "square", "triangle", "ring"]
    assert 0 <= result["miou"] <= 1 and len(result["iou"]) == 5


def test_max_examples_and_dataset_callable():
    config = config_for()
    model = tiny_model(5)
    items = examples(5)
    result = eval_lib.evaluate(model, lambda: as_dataset(items), config, max_examples=2)
    assert result["num_examples"] == 2
    np.testing.assert_array_equal(result["confusion_matrix"], expected_matrix(model, items[:2], config))
    # A dataset with a static batch dimension of 1 (as `batch(1, drop_remainder=True)` gives) works too.
    static = as_dataset(items).unbatch().batch(1, drop_remainder=True)
    assert static.element_spec["image"].shape[0] == 1
    np.testing.assert_array_equal(
        eval_lib.evaluate(model, static, config)["confusion_matrix"], expected_matrix(model, items, config)
    )
    with pytest.raises(ValueError, match="no examples"):
        eval_lib.evaluate(model, as_dataset(items).take(0), config)


def test_save_predictions_colour_and_cityscapes_label_ids(tmp_path):
    config = config_for("data.dataset=cityscapes", "model.num_classes=19")
    model = tiny_model(19)
    items = examples(19, SIZES[:2])
    result = eval_lib.evaluate(model, as_dataset(items), config, save_predictions_dir=str(tmp_path))
    assert result["class_names"][0] == "road" and result["num_examples"] == 2
    palette = classes.palette_for("cityscapes", 19)
    label_ids = classes.cityscapes_label_ids()
    assert label_ids.tolist() == [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    for i, item in enumerate(items):
        scores = inference.predict_whole(
            inference.model_logits_fn(model), item["image"], item["label"].shape[1:3]
        )
        prediction = tf.argmax(scores, -1)[0].numpy()
        colour = tf.io.decode_png(tf.io.read_file(str(tmp_path / "color" / f"img_{i}.png"))).numpy()
        np.testing.assert_array_equal(colour, palette[prediction])
        ids = tf.io.decode_png(tf.io.read_file(str(tmp_path / "labelIds" / f"img_{i}.png"))).numpy()[..., 0]
        np.testing.assert_array_equal(ids, label_ids[prediction])
        assert ids.shape == item["label"].shape[1:]


def test_save_prediction_names_and_no_label_ids_outside_cityscapes(tmp_path):
    palette = np.array([[0, 0, 0], [255, 0, 0]], np.uint8)
    paths = eval_lib.save_prediction(np.array([[0, 1]]), "a/b/2007_000032.jpg", str(tmp_path), palette)
    assert paths == [str(tmp_path / "color" / "2007_000032.png")]
    paths = eval_lib.save_prediction(np.array([[1]]), "", str(tmp_path), palette, index=7)
    assert paths == [str(tmp_path / "color" / "000007.png")]
    assert not (tmp_path / "labelIds").exists()


def test_to_jsonable_turns_nan_into_null():
    result = ConfusionMatrix(3).update(np.array([0, 1]), np.array([0, 0])).result()
    text = json.dumps(eval_lib.to_jsonable(result), allow_nan=False)
    assert json.loads(text)["iou"] == [0.5, 0.0, None]


_TWO_REPLICAS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, {tests!r})
    from test_eval_lib import as_dataset, config_for, examples, expected_matrix, tiny_model
    from fcn_tf import eval_lib

    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert two.num_replicas_in_sync == 2
    items = examples(5)  # odd: the last step leaves one replica without data
    for overrides in [(), ("eval.mode=slide", "eval.crop_size=6,6", "eval.stride=4,4", "eval.flip=true")]:
        config = config_for(*overrides)
        one_model = tiny_model(5)
        # One device: the eager reference, which test_evaluate_matches_eager_reference
        # shows equal to evaluate() under the default strategy.
        one = expected_matrix(one_model, items, config)
        with two.scope():
            model = tiny_model(5)
        model.set_weights(one_model.get_weights())
        out = {out!r}
        both = eval_lib.evaluate(model, as_dataset(items), config, strategy=two, save_predictions_dir=out)
        np.testing.assert_array_equal(both["confusion_matrix"], one)
        assert both["num_examples"] == 5, both["num_examples"]
        assert sorted(__import__("os").listdir(out + "/color")) == [f"img_{{i}}.png" for i in range(5)]
    print("OK", both["miou"])
    """
)


def test_two_logical_cpus_equal_one(tmp_path):
    # Logical devices must be configured before TensorFlow initializes: fresh process.
    code = _TWO_REPLICAS.format(tests=os.path.dirname(__file__), out=str(tmp_path))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


_WORKER = textwrap.dedent(
    """
    import json, os, sys
    index, ports = int(sys.argv[1]), sys.argv[2:]
    os.environ["TF_CONFIG"] = json.dumps(
        {{"cluster": {{"worker": [f"127.0.0.1:{{p}}" for p in ports]}}, "task": {{"type": "worker", "index": index}}}}
    )
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, {tests!r})
    from test_eval_lib import as_dataset, config_for, examples, expected_matrix, tiny_model
    from fcn_tf import eval_lib

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    print("REPLICAS", strategy.num_replicas_in_sync, flush=True)
    items = examples(5)  # sharded 3 + 2: the workers run out of data at different steps
    for overrides in [(), ("eval.mode=slide", "eval.crop_size=6,6", "eval.stride=4,4", "eval.flip=true")]:
        config = config_for(*overrides)
        reference = tiny_model(5)
        with strategy.scope():
            model = tiny_model(5)
        model.set_weights(reference.get_weights())
        result = eval_lib.evaluate(model, as_dataset(items), config, strategy=strategy)
        np.testing.assert_array_equal(result["confusion_matrix"], expected_matrix(reference, items, config))
        assert result["num_examples"] == 5, result["num_examples"]
    print("WORKER", index, "OK")
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_workers_on_loopback_equal_one_device(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=os.path.dirname(__file__)))
    ports = [str(_free_port()), str(_free_port())]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    workers = [
        subprocess.Popen([sys.executable, str(script), str(i), *ports], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for i in range(2)
    ]  # fmt: skip
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=600))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for i, (worker, (stdout, stderr)) in enumerate(zip(workers, outputs, strict=True)):
        assert worker.returncode == 0, stderr[-3000:]
        assert f"WORKER {i} OK" in stdout


@pytest.mark.slow
def test_two_workers_of_two_logical_devices_each_equal_one_device(tmp_path):
    # 4 replicas over 2 workers: 5 examples leave replicas without data at different steps.
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=os.path.dirname(__file__)))
    with Cluster(tmp_path / "cluster", workers=2, sim=Sim(logical_cpus=2)) as cluster:
        cluster.start(lambda k: [sys.executable, str(script), str(k), *map(str, cluster.ports)])
        results = cluster.wait(timeout=600)
    for r in results:
        assert r.returncode == 0, r.output[-3000:]
        assert "REPLICAS 4" in r.output and f"WORKER {r.index} OK" in r.output
