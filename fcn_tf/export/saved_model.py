"""SavedModel export for TF Serving: preprocessing, model and postprocessing in one graph.

`export(config, model, "BASE/NAME")` writes `BASE/NAME/VERSION/` (TF Serving's
layout; VERSION is the next integer unless given, an existing version is
never overwritten) with three signatures:

- `serving_default`: `images` string (N,) of encoded JPEG / PNG / GIF / BMP /
  WebP bytes. Images may differ in size, so each is decoded and segmented
  on its own and the results are padded to the batch's largest size:
    - `labels` int32 (N, H_max, W_max): class ids at each image's original
      size, `LABEL_PAD` (-1) outside it;
    - `confidence` float32 (N, H_max, W_max): softmax probability of the
      chosen class, 0 outside the image;
    - `heights`, `widths` int32 (N,): each image's original size, so image i
      is `labels[i, :heights[i], :widths[i]]`.
- `predict_images`: `images` uint8 (N, H, W, 3), any H and W (one size per
  batch) -> `labels` int32 (N, H, W), `confidence` float32 (N, H, W).
- `predict_images_with_logits`: the same plus `logits` float32
  (N, H, W, num_classes) at the input size. Logits are a separate signature
  because they are num_classes times larger than the labels: a client asks
  for them by choosing this signature.

Inside the graph, as evaluation does (`fcn_tf.data.augment.eval_transform`,
`fcn_tf.inference.predict_whole`): keep-ratio resize to
`config.data.eval_target` (bilinear, half-pixel centres), normalization with
`config.data.mean/std`, the model in inference mode on the whole image,
bilinear resize of the logits back to the original size, argmax. The export
is always single-scale whole-image inference (the reference's evaluation);
`config.eval`'s sliding-window / multi-scale options are not exported.
Encoded images are decoded to RGB (grayscale is replicated, alpha dropped,
the first frame of an animation kept).

Bad input fails the request with `InvalidArgumentError` and a message naming
the image's index: empty bytes, bytes that are not an image, an image with
no pixels, or one with more than `max_pixels` pixels. JPEG and PNG sizes are
read from the file header before decoding, so an oversized image is
rejected without allocating it. `max_pixels` also bounds memory: the logits
are resized to the original size, H * W * num_classes floats per image
(images of a batch are processed one after the other).

Assets (`fcn_tf.export.common.write_assets`): `assets/labels.txt` (one
class name per line, line i = class i), `assets/palette.txt` ("R G B" per
line, same order) and `assets/experiment.json` (the resolved experiment
config).
`assets.extra/tf_serving_warmup_requests` holds one `PredictionLog` per
signature on a small generated JPEG, which TF Serving replays at load time.
"""

from __future__ import annotations

import os
import tempfile
import types
import uuid

import keras
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from fcn_tf import inference, storage
from fcn_tf.data import augment
from fcn_tf.export.common import ExportError, class_info, inference_model, saved_variables, write_assets

DEFAULT_MAX_PIXELS = 4096 * 4096
LABEL_PAD = -1

SERVING_DEFAULT = "serving_default"
PREDICT_IMAGES = "predict_images"
PREDICT_IMAGES_WITH_LOGITS = "predict_images_with_logits"
SIGNATURES = (SERVING_DEFAULT, PREDICT_IMAGES, PREDICT_IMAGES_WITH_LOGITS)

WARMUP_FILE = "tf_serving_warmup_requests"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------ graph pieces ---


def _format_checks(contents):
    """Which image format the bytes start with: (is_jpeg, is_png, is_known)."""
    # Padded so that the slices below exist even for very short inputs.
    head = tf.strings.substr(tf.strings.join([contents, tf.constant(b"\0" * 12)]), 0, 12)

    def starts(pos, magic):
        return tf.equal(tf.strings.substr(head, pos, len(magic)), magic)

    is_jpeg = starts(0, b"\xff\xd8\xff")
    is_png = starts(0, _PNG_SIGNATURE)
    is_gif = starts(0, b"GIF8")
    is_bmp = starts(0, b"BM")
    is_webp = tf.logical_and(starts(0, b"RIFF"), starts(8, b"WEBP"))
    known = tf.reduce_any(tf.stack([is_jpeg, is_png, is_gif, is_bmp, is_webp]))
    return is_jpeg, is_png, known


def _header_size(contents, is_jpeg, is_png):
    """(height, width) int64 from a JPEG or PNG header, without decoding; (1, 1) otherwise.

    The PNG IHDR stores width and height as big-endian uint32 at bytes 16..24.
    The bytes are padded first so that a truncated file still yields 8 bytes
    here; the decoder then rejects it with its own message.
    """

    def jpeg():
        shape = tf.io.extract_jpeg_shape(contents)
        return tf.cast(shape[:2], tf.int64)

    def png():
        padded = tf.strings.join([contents, tf.constant(b"\0" * 24)])
        wh = tf.io.decode_raw(tf.strings.substr(padded, 16, 8), tf.uint8)
        wh = tf.reshape(tf.cast(wh, tf.int64), [2, 4])
        wh = tf.reduce_sum(wh * tf.constant([1 << 24, 1 << 16, 1 << 8, 1], tf.int64), axis=1)
        return tf.stack([wh[1], wh[0]])

    def other():
        return tf.constant([1, 1], tf.int64)

    return tf.case([(is_jpeg, jpeg), (is_png, png)], default=other, exclusive=True)


def _check_size(height, width, max_pixels: int, name: str, index=None):
    """Assert op: the image has pixels and at most `max_pixels` of them.

    Args:
      height: image height (scalar tensor).
      width: image width (scalar tensor).
      max_pixels: the limit on height * width.
      name: the input's name in the message ("images").
      index: optional position in the batch, shown as `name[index]`.
    """
    h = tf.cast(height, tf.int64)
    w = tf.cast(width, tf.int64)
    # int64: a JPEG may claim up to 65535 x 65535 pixels, beyond int32.
    ok = tf.logical_and(h * w > 0, h * w <= max_pixels)
    what, args = (f"{name}[{{}}]", (index,)) if index is not None else (name, ())
    message = tf.strings.format(
        what + " has size {}x{} (height x width): an image needs 1 to max_pixels={} pixels",
        (*args, h, w, tf.constant(max_pixels, tf.int64)),
    )
    return tf.debugging.Assert(ok, [message])


def decode(contents, index, max_pixels: int):
    """Decodes one encoded image to uint8 (H, W, 3), checking it first.

    Args:
      contents: scalar string tensor, the file's bytes.
      index: its position in the request batch (for messages).
      max_pixels: largest height * width accepted.

    Raises (when run):
      InvalidArgumentError: empty bytes, not an image, no pixels, too many.
    """
    not_empty = tf.debugging.Assert(
        tf.strings.length(contents) > 0, [tf.strings.format("images[{}] is empty (0 bytes)", index)]
    )
    with tf.control_dependencies([not_empty]):
        is_jpeg, is_png, known = _format_checks(contents)
        is_image = tf.debugging.Assert(
            known,
            [
                tf.strings.format(
                    "images[{}] is not an image: its bytes start with none of the JPEG, PNG, GIF, "
                    "BMP, WebP signatures",
                    index,
                )
            ],
        )
    with tf.control_dependencies([is_image]):
        size = _header_size(contents, is_jpeg, is_png)
        header_ok = _check_size(size[0], size[1], max_pixels, "images", index)
    with tf.control_dependencies([header_ok]):
        image = tf.io.decode_image(contents, channels=3, dtype=tf.uint8, expand_animations=False)
    image = tf.ensure_shape(image, [None, None, 3])
    shape = tf.shape(image)
    # GIF and BMP sizes are only known after decoding.
    with tf.control_dependencies([_check_size(shape[0], shape[1], max_pixels, "images", index)]):
        return tf.identity(image)


def logits_at_input_size(logits_model, images, data_config):
    """Runs the model as evaluation does and returns logits at the input size.

    Args:
      logits_model: Keras model mapping normalized float32 NHWC to logits.
      images: uint8 or float32 (N, H, W, 3) on the 0..255 scale, one size.
      data_config: supplies `eval_target`, `mean` and `std`.

    Returns:
      float32 (N, H, W, num_classes).
    """
    shape = tf.shape(images)
    size = augment.keep_ratio_size(shape[1], shape[2], data_config.eval_target)
    x = augment.normalize(augment.resize_image(images, size), data_config.mean, data_config.std)
    # Whole-image inference, logits resized back to the original size as
    # evaluation scores them (half-pixel bilinear).
    return inference.predict_whole(inference.model_logits_fn(logits_model), x, shape[1:3])


def _labels_and_confidence(logits):
    labels = tf.argmax(logits, axis=-1, output_type=tf.int32)
    confidence = tf.reduce_max(tf.nn.softmax(logits, axis=-1), axis=-1)
    return labels, confidence


# ----------------------------------------------------------------- module ---


class SegmentationServer(tf.Module):
    """The exported object: the model plus the serving functions.

    Also used in-process (e.g. by `fcn_tf.predict_lib`) so that a checkpoint
    is served by exactly the graph that gets exported.

    Args:
      config: the experiment; `data` gives the eval size and normalization.
      model: the segmenter from `build_fcn` (weights loaded).
      max_pixels: largest height * width accepted per image.
      asset_paths: optional {name: file path} to attach as SavedModel assets.
      fold_bn: fold BatchNorm into the convolutions (`common.inference_model`).
    """

    def __init__(
        self, config, model, max_pixels: int = DEFAULT_MAX_PIXELS, asset_paths=None, fold_bn: bool = False
    ):
        super().__init__(name="segmentation_server")
        if max_pixels < 1:
            raise ExportError(f"max_pixels={max_pixels} must be >= 1")
        self._data_config = config.data
        self._max_pixels = int(max_pixels)
        # Untracked model, tracked tf.Variables: see common.saved_variables.
        self._keras = types.SimpleNamespace(model=inference_model(model, fold_bn))
        self.weights = saved_variables(self._keras.model)
        # Assets are kept as attributes: tf.saved_model.save copies the files
        # into assets/ and a loaded object exposes `.asset_path`.
        self.assets = {name: tf.saved_model.Asset(path) for name, path in (asset_paths or {}).items()}
        self.serve = tf.function(
            self._serve, input_signature=[tf.TensorSpec([None], tf.string, name="images")]
        )
        image_spec = tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")
        self.predict_images = tf.function(self._predict_images, input_signature=[image_spec])
        self.predict_images_with_logits = tf.function(
            self._predict_images_with_logits, input_signature=[image_spec]
        )

    @property
    def model(self) -> keras.Model:
        """The Keras model the functions run (logits only)."""
        return self._keras.model

    def signatures(self) -> dict:
        """{signature name: function}, for `tf.saved_model.save`."""
        return {
            SERVING_DEFAULT: self.serve,
            PREDICT_IMAGES: self.predict_images,
            PREDICT_IMAGES_WITH_LOGITS: self.predict_images_with_logits,
        }

    def _serve(self, images):
        def one(args):
            contents, index = args
            image = decode(contents, index, self._max_pixels)
            logits = logits_at_input_size(self._keras.model, image[tf.newaxis], self._data_config)
            labels, confidence = _labels_and_confidence(logits[0])
            shape = tf.shape(labels)
            return (
                tf.RaggedTensor.from_tensor(labels),
                tf.RaggedTensor.from_tensor(confidence),
                shape[0],
                shape[1],
            )

        # Sizes differ within a batch: one image per iteration, results
        # gathered as ragged tensors and padded at the end. One iteration at
        # a time bounds memory (full-size logits are H*W*C floats per image);
        # the convolutions still use every core.
        labels, confidence, heights, widths = tf.map_fn(
            one,
            (images, tf.range(tf.shape(images)[0])),
            parallel_iterations=1,
            fn_output_signature=(
                tf.RaggedTensorSpec([None, None], tf.int32, ragged_rank=1),
                tf.RaggedTensorSpec([None, None], tf.float32, ragged_rank=1),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([], tf.int32),
            ),
        )
        return {
            "labels": labels.to_tensor(default_value=LABEL_PAD),
            "confidence": confidence.to_tensor(default_value=0.0),
            "heights": heights,
            "widths": widths,
        }

    def _checked_logits(self, images):
        shape = tf.shape(images)
        with tf.control_dependencies([_check_size(shape[1], shape[2], self._max_pixels, "images")]):
            return logits_at_input_size(self._keras.model, images, self._data_config)

    def _predict_images(self, images):
        labels, confidence = _labels_and_confidence(self._checked_logits(images))
        return {"labels": labels, "confidence": confidence}

    def _predict_images_with_logits(self, images):
        logits = self._checked_logits(images)
        labels, confidence = _labels_and_confidence(logits)
        return {"labels": labels, "confidence": confidence, "logits": logits}


# ----------------------------------------------------------------- export ---


def next_version(export_dir_base: str) -> int:
    """1 + the largest integer version directory in `export_dir_base` (1 if none).

    Args:
      export_dir_base: `BASE/NAME`.
    """
    if not tf.io.gfile.isdir(export_dir_base):
        return 1
    versions = [int(n.rstrip("/")) for n in tf.io.gfile.listdir(export_dir_base) if n.rstrip("/").isdigit()]
    return max(versions, default=0) + 1


def version_dir(export_dir_base: str, version: int | None = None) -> str:
    """The version directory an export will write: `export_dir_base/VERSION`, checked to be free.

    Args:
      export_dir_base: `BASE/NAME`.
      version: integer version; default: one more than the largest present.

    Raises:
      FileExistsError: the version directory already exists.
      ExportError: a bad version.
    """
    export_dir_base = storage.normalize(export_dir_base).rstrip("/")
    if version is None:
        version = next_version(export_dir_base)
    if not isinstance(version, int) or version < 0:
        raise ExportError(f"version={version!r} must be a non-negative integer")
    target = os.path.join(export_dir_base, str(version))
    if tf.io.gfile.exists(target):
        raise FileExistsError(f"export version already exists, not overwriting: {target}")
    return target


def sample_jpeg(height: int = 24, width: int = 32) -> bytes:
    """A small deterministic colour gradient as JPEG bytes (warm-up and tests).

    Args:
      height: image height.
      width: image width.
    """
    y = np.linspace(0, 255, height)[:, None]
    x = np.linspace(0, 255, width)[None, :]
    image = np.stack(
        [np.broadcast_to(y, (height, width)), np.broadcast_to(x, (height, width)), (y + x) / 2], -1
    )
    return tf.io.encode_jpeg(image.astype(np.uint8), quality=95).numpy()


def write_warmup(path: str, model_name: str) -> int:
    """Writes TF Serving warm-up records: one PredictRequest per signature.

    Args:
      path: the `assets.extra/tf_serving_warmup_requests` file to write.
      model_name: the served model name (`BASE/NAME`'s NAME).

    Returns:
      The number of records written.
    """
    jpeg = sample_jpeg()
    pixels = tf.io.decode_jpeg(jpeg, channels=3).numpy()[np.newaxis]
    inputs = {
        SERVING_DEFAULT: np.array([jpeg], dtype=object),
        PREDICT_IMAGES: pixels,
        PREDICT_IMAGES_WITH_LOGITS: pixels,
    }
    with tf.io.TFRecordWriter(path) as writer:
        for signature, value in inputs.items():
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
            )
            request.inputs["images"].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return len(inputs)


def export(
    config,
    model: keras.Model,
    export_dir_base: str,
    version: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    class_names=None,
    palette=None,
    warmup: bool = True,
    fold_bn: bool = False,
) -> str:
    """Writes the model as a TF Serving SavedModel in `export_dir_base/VERSION`.

    The SavedModel is written to a hidden temporary directory beside the
    target and renamed into place at the end, so a TF Serving instance
    watching `export_dir_base` never sees a half-written version.

    Args:
      config: the experiment the model was trained with.
      model: the segmenter from `build_fcn(config.model)`, weights loaded.
      export_dir_base: `BASE/NAME`; NAME is the model name in the warm-up
        requests.
      version: integer version; default: one more than the largest present.
      max_pixels: largest height * width an input image may have.
      class_names: override of the class names (default: the dataset's).
      palette: override of the palette (default: the dataset's).
      warmup: write `assets.extra/tf_serving_warmup_requests`.
      fold_bn: fold BatchNorm into the convolutions (`common.inference_model`);
        logits change only by float rounding (~1e-6 relative).

    Returns:
      The version directory written.

    Raises:
      FileExistsError: the version directory already exists.
      ExportError: a bad version or max_pixels.
    """
    target = version_dir(export_dir_base, version)
    export_dir_base = os.path.dirname(target)
    names, colours = class_info(config, class_names, palette)
    tf.io.gfile.makedirs(export_dir_base)
    staging = os.path.join(export_dir_base, f".tmp-{os.path.basename(target)}-{uuid.uuid4().hex[:8]}")
    with tempfile.TemporaryDirectory() as asset_dir:
        asset_paths = write_assets(asset_dir, config, names, colours)
        server = SegmentationServer(
            config, model, max_pixels=max_pixels, asset_paths=asset_paths, fold_bn=fold_bn
        )
        tf.saved_model.save(server, staging, signatures=server.signatures())
    if warmup:
        extra = os.path.join(staging, "assets.extra")
        tf.io.gfile.makedirs(extra)
        write_warmup(os.path.join(extra, WARMUP_FILE), os.path.basename(export_dir_base))
    if tf.io.gfile.exists(target):  # another export took this version meanwhile
        tf.io.gfile.rmtree(staging)
        raise FileExistsError(f"export version already exists, not overwriting: {target}")
    storage.rename_folder(staging, target)
    return target


# ---------------------------------------------------------- reading back ---


def resolve_version_dir(export_dir: str) -> str:
    """A SavedModel directory from a version directory or a `BASE/NAME` (latest version).

    Args:
      export_dir: the version directory, or `BASE/NAME`.

    Raises:
      FileNotFoundError: no SavedModel there.
    """
    export_dir = storage.normalize(export_dir).rstrip("/")
    if tf.io.gfile.exists(os.path.join(export_dir, "saved_model.pb")):
        return export_dir
    latest = next_version(export_dir) - 1
    candidate = os.path.join(export_dir, str(latest))
    if latest >= 0 and tf.io.gfile.exists(os.path.join(candidate, "saved_model.pb")):
        return candidate
    raise FileNotFoundError(f"no SavedModel in {export_dir} (nor in an integer version directory below it)")
