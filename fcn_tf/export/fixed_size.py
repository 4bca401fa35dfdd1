"""Fixed-size exports (LiteRT, ONNX), each checked in its own runtime right after it is written.

The exported function takes `images`: (N, H, W, 3) with N, H and W fixed at
export, uint8 or float32 on the 0..255 scale. Inside: normalization with
`config.data.mean/std`, the model in inference mode at that size. Outputs:
`logits` float32 (N, H, W, num_classes) and `labels` int32 (N, H, W).
The size defaults to the one evaluation runs the network at (`default_size`).

An export directory holds the model files and, as a SavedModel does, its
class names, palette and config in `assets/` (`common.write_assets`):

    DIR/model.tflite, DIR/model_float16.tflite, DIR/model_int8.tflite, DIR/model.onnx
    DIR/assets/labels.txt, palette.txt, experiment.json

Each file is written under a temporary name, run in its runtime (LiteRT's
interpreter, ONNX Runtime) on a fixed batch of synthetic-scene images and
compared with the same function run by TensorFlow. Float32 exports must give
logits within `FLOAT32_LOGITS_RTOL` (relative to the largest logit) and the
same label on at least `FLOAT32_LABEL_AGREEMENT` of the pixels; a quantized
variant is checked on label agreement only (its own threshold in
`VARIANTS`), its logits error being reported. A file that fails is removed
and `ExportCheckError` gives the figures; one that passes is renamed into
place. An existing file is never overwritten.

`load_runner` runs a written file in its runtime; `evaluate` scores a runner
on a prepared split with the reference metrics.
"""

from __future__ import annotations

import dataclasses
import os
import types
import uuid

import keras
import numpy as np
import tensorflow as tf

from fcn_tf import metrics, storage
from fcn_tf.data import augment, sources, synthetic
from fcn_tf.export import litert, onnx
from fcn_tf.export.common import (
    ExportError,
    Runner,
    class_info,
    inference_model,
    saved_variables,
    write_assets,
)

FLOAT32_LOGITS_RTOL = 1e-4
FLOAT32_LABEL_AGREEMENT = 0.9999
INPUT_DTYPES = ("uint8", "float32")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One exported file: its format, weight type, file name and acceptance thresholds.

    Attributes:
      format: "litert" or "onnx".
      name: weight variant ("float32", "float16", "int8").
      filename: file name in the export directory.
      logits_rtol: largest accepted logits error relative to the largest
        logit, or None for a quantized variant (reported, not checked).
      label_agreement: smallest accepted fraction of pixels with the same label.
    """

    format: str
    name: str
    filename: str
    logits_rtol: float | None
    label_agreement: float


# float16 weights are dequantized to float32 when the interpreter loads them;
# dynamic-range int8 quantizes weights per channel and activations on the fly
# (measured label agreement and mIoU cost: see BENCHMARKS.md).
VARIANTS = {
    ("litert", "float32"): Variant(
        "litert", "float32", "model.tflite", FLOAT32_LOGITS_RTOL, FLOAT32_LABEL_AGREEMENT
    ),
    ("litert", "float16"): Variant("litert", "float16", "model_float16.tflite", None, 0.999),
    ("litert", "int8"): Variant("litert", "int8", "model_int8.tflite", None, 0.98),
    ("onnx", "float32"): Variant(
        "onnx", "float32", "model.onnx", FLOAT32_LOGITS_RTOL, FLOAT32_LABEL_AGREEMENT
    ),
}


class ExportCheckError(ExportError):
    """An export's outputs in its runtime differ from the model's beyond the thresholds."""


def default_size(config) -> tuple[int, int]:
    """(height, width) evaluation runs the network at: the sliding window, or a landscape image.

    In sliding-window mode that is `eval.crop_size`; in whole-image mode an
    image resized keep-ratio to `data.eval_target` (long, short) is at most
    (short, long), which a landscape image at the target's ratio fills.

    Args:
      config: the experiment.
    """
    if config.eval.mode == "slide":
        return tuple(config.eval.crop_size)
    long_side, short_side = config.data.eval_target
    return (int(short_side), int(long_side))


class FixedSizeModel(tf.Module):
    """The exported function: fixed-size images in, logits and labels at that size out.

    Args:
      config: the experiment (normalization from `config.data`).
      model: the segmenter (weights loaded); only its main logits are exported.
      size: (height, width) of the images.
      batch_size: images per call.
      input_dtype: "uint8" or "float32" (0..255 scale either way).
      fold_bn: fold BatchNorm into the convolutions (`common.inference_model`).
    """

    def __init__(
        self,
        config,
        model: keras.Model,
        size,
        batch_size: int = 1,
        input_dtype: str = "uint8",
        fold_bn: bool = False,
    ):
        super().__init__(name="fixed_size_segmenter")
        if input_dtype not in INPUT_DTYPES:
            raise ExportError(f"input_dtype={input_dtype!r} not in {INPUT_DTYPES}")
        height, width = (int(s) for s in size)
        if height < 1 or width < 1 or batch_size < 1:
            raise ExportError(f"size={size} and batch_size={batch_size} must be positive")
        self._data_config = config.data
        # Untracked model, tracked tf.Variables: see common.saved_variables.
        self._keras = types.SimpleNamespace(model=inference_model(model, fold_bn))
        self.weights = saved_variables(self._keras.model)
        self.input_spec = tf.TensorSpec(
            [batch_size, height, width, 3], tf.dtypes.as_dtype(input_dtype), "images"
        )
        self.serve = tf.function(self._serve, input_signature=[self.input_spec])

    @property
    def model(self) -> keras.Model:
        """The Keras model the function runs (logits only)."""
        return self._keras.model

    def _serve(self, images):
        x = augment.normalize(images, self._data_config.mean, self._data_config.std)
        logits = tf.cast(self._keras.model(x, training=False), tf.float32)
        return {"logits": logits, "labels": tf.argmax(logits, axis=-1, output_type=tf.int32)}


def check_images(spec: tf.TensorSpec) -> np.ndarray:
    """The fixed check batch: synthetic scenes (shapes on a textured background), seeds 0..N-1.

    Args:
      spec: the fixed input (N, H, W, 3) and its dtype.
    """
    n, height, width, _ = spec.shape
    images = [synthetic.generate_example(np.random.default_rng(i), height, width)[0] for i in range(n)]
    return np.stack(images).astype(spec.dtype.as_numpy_dtype)


@dataclasses.dataclass(frozen=True)
class Check:
    """How closely an export reproduced the model on the check batch.

    Attributes:
      logits_rel_error: max |runtime - TensorFlow| over the largest |logit|.
      label_agreement: fraction of pixels with the same label.
    """

    logits_rel_error: float
    label_agreement: float

    def describe(self) -> str:
        return (
            f"logits error {self.logits_rel_error:.2e} relative, labels agree on {self.label_agreement:.4%}"
        )


def compare(outputs: dict, expected: dict) -> Check:
    """Figures of `outputs` (a runtime's logits, labels) against `expected` (TensorFlow's).

    Args:
      outputs: {"logits", "labels"} from the runtime.
      expected: the same from TensorFlow.

    Raises:
      ExportCheckError: the logits' shapes differ.
    """
    logits, reference = np.asarray(outputs["logits"], np.float64), np.asarray(expected["logits"], np.float64)
    if logits.shape != reference.shape:
        raise ExportCheckError(f"logits shape {logits.shape} != the model's {reference.shape}")
    rel = float(np.max(np.abs(logits - reference)) / max(np.max(np.abs(reference)), 1e-30))
    if not np.isfinite(rel):
        rel = float("inf")
    agreement = float(np.mean(np.asarray(outputs["labels"]) == np.asarray(expected["labels"])))
    return Check(rel, agreement)


def verify(path: str, variant: Variant, images: np.ndarray, expected: dict) -> Check:
    """Runs the export at `path` in its runtime on `images` and compares with `expected`.

    Args:
      path: the model file.
      variant: its thresholds.
      images: the check batch.
      expected: {"logits", "labels"} from TensorFlow on `images`.

    Returns:
      The figures.

    Raises:
      ExportCheckError: beyond the variant's thresholds, or the file cannot be
        loaded or run (the message names the file and gives the figures).
    """
    try:
        runner = load_runner(path, runtime=variant.format)
        check = compare(runner(images), expected)
    except ExportCheckError as e:
        raise ExportCheckError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any runtime failure means the file is unusable
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportCheckError(f"{path}: {variant.format} cannot run it: {first_line}") from None
    failed = []
    if variant.logits_rtol is not None and not check.logits_rel_error <= variant.logits_rtol:
        failed.append(f"logits error {check.logits_rel_error:.2e} relative > {variant.logits_rtol:.0e}")
    if not check.label_agreement >= variant.label_agreement:
        failed.append(
            f"labels agree on {check.label_agreement:.4%} < {variant.label_agreement:.2%} of pixels"
        )
    if failed:
        raise ExportCheckError(
            f"{path}: {variant.format} {variant.name} output differs from the model's: {'; '.join(failed)}"
        )
    return check


def load_runner(path: str, runtime: str | None = None, num_threads: int | None = None) -> Runner:
    """The `Runner` of a .tflite or .onnx file in its runtime (LiteRT's interpreter, ONNX Runtime).

    Args:
      path: the model file.
      runtime: "litert" or "onnx"; default from the file's extension.
      num_threads: the runtime's threads (default: every core).

    Raises:
      ExportError: neither runtime given nor a .tflite / .onnx extension.
    """
    if runtime is None:
        runtime = {".tflite": "litert", ".onnx": "onnx"}.get(os.path.splitext(path)[1].lower())
    if runtime == "litert":
        return litert.Runner(path, num_threads)
    if runtime == "onnx":
        return onnx.Runner(path, num_threads)
    raise ExportError(f"{path}: not a .tflite or .onnx file")


class TensorFlowRunner(Runner):
    """A `FixedSizeModel` run by TensorFlow, as a `Runner` (the reference the files are checked against).

    Args:
      module: the fixed-size module.
    """

    def __init__(self, module: FixedSizeModel):
        self._module = module
        self.path = f"{module.name} (TensorFlow)"
        self.input_shape = tuple(module.input_spec.shape)
        self.input_dtype = np.dtype(module.input_spec.dtype.as_numpy_dtype)

    def _run(self, images: np.ndarray) -> dict:
        return {k: v.numpy() for k, v in self._module.serve(tf.constant(images)).items()}


def logits_at_image_size(runner: Runner, image) -> tf.Tensor:
    """Segments one image of any size with a fixed-size runner; logits at the image's size.

    As whole-image evaluation does, but to the runner's fixed size: the image
    is resized to it (bilinear, half-pixel centres; the aspect ratio changes
    unless it matches), put first in an otherwise black batch, and the logits
    are resized back to the image's size.

    Args:
      runner: from `load_runner` (or a `TensorFlowRunner`).
      image: uint8 (h, w, 3).

    Returns:
      float32 (h, w, num_classes).
    """
    height, width = int(image.shape[0]), int(image.shape[1])
    size = runner.input_shape[1:3]
    x = np.asarray(image) if (height, width) == size else augment.resize_image(image, size).numpy()
    if runner.input_dtype == np.uint8:
        x = np.clip(np.round(x), 0, 255)
    batch = np.zeros(runner.input_shape, runner.input_dtype)
    batch[0] = x.astype(runner.input_dtype)
    logits = tf.convert_to_tensor(runner(batch)["logits"][:1], tf.float32)
    if (height, width) != size:
        logits = tf.image.resize(logits, (height, width), method="bilinear")
    return logits[0]


def evaluate(runner: Runner, config, split: str | None = None, limit: int | None = None) -> dict:
    """The reference metrics (`fcn_tf.metrics`) of a runner on a prepared split.

    Args:
      runner: from `load_runner` (or a `TensorFlowRunner`).
      config: names the dataset, its data_dir and the ignore label.
      split: default `config.data.eval_split`.
      limit: evaluate only the first `limit` examples.

    Returns:
      `fcn_tf.metrics.ConfusionMatrix.result()` ("miou", "aacc", ...).
    """
    matrix = metrics.ConfusionMatrix(config.model.num_classes, config.data.ignore_label)
    dataset = sources.load_split(config.data, split or config.data.eval_split)
    if limit is not None:
        dataset = dataset.take(limit)
    for example in dataset:
        logits = logits_at_image_size(runner, example["image"])
        matrix.update(example["label"].numpy(), tf.argmax(logits, -1).numpy())
    return matrix.result()


def _convert(module: FixedSizeModel, variant: Variant) -> bytes:
    if variant.format == "litert":
        return litert.convert(module, variant.name)
    return onnx.convert(module)


def variant_keys(formats, litert_variants=("float32",)) -> list[tuple[str, str]]:
    """The `VARIANTS` keys of the fixed-size formats among `formats` ("saved_model" is skipped).

    Args:
      formats: export formats, e.g. ["saved_model", "litert", "onnx"].
      litert_variants: the LiteRT weight variants to write (ONNX has float32 only).
    """
    return [
        (f, v)
        for f in formats
        if f != "saved_model"
        for v in (litert_variants if f == "litert" else ["float32"])
    ]


def target_paths(export_dir: str, variants) -> dict:
    """{variant key: the file it will be written to}, each checked to be free.

    Args:
      export_dir: the export directory.
      variants: keys of `VARIANTS`.

    Raises:
      ExportError: an unknown variant.
      FileExistsError: a file to write exists already.
    """
    keys = [tuple(key) for key in variants]
    for key in keys:
        if key not in VARIANTS:
            raise ExportError(f"unknown export variant {key}; choose from {sorted(VARIANTS)}")
    export_dir = storage.normalize(export_dir)
    targets = {key: os.path.join(export_dir, VARIANTS[key].filename) for key in keys}
    for path in targets.values():
        if tf.io.gfile.exists(path):
            raise FileExistsError(f"export file already exists, not overwriting: {path}")
    return targets


def export(
    config,
    model: keras.Model,
    export_dir: str,
    variants=(("litert", "float32"),),
    size=None,
    batch_size: int = 1,
    input_dtype: str = "uint8",
    class_names=None,
    palette=None,
    min_label_agreement: float | None = None,
    fold_bn: bool = False,
    log=print,
) -> dict:
    """Writes, checks and renames into place one file per variant in `export_dir`.

    Args:
      config: the experiment the model was trained with.
      model: the segmenter, weights loaded.
      export_dir: the directory (created; its assets are rewritten).
      variants: (format, weight variant) keys of `VARIANTS`.
      size: (height, width); default `default_size(config)`.
      batch_size: images per call.
      input_dtype: "uint8" or "float32".
      class_names: override of the class names (default: the dataset's).
      palette: override of the palette (default: the dataset's).
      min_label_agreement: for the quantized variants, instead of their
        `VARIANTS` threshold (which was set on a trained model; an untrained
        one has near-ties everywhere).
      fold_bn: fold BatchNorm into the convolutions (`common.inference_model`).
      log: called with one line per file written.

    Returns:
      {variant key: (path, Check)}.

    Raises:
      FileExistsError: a file to write exists already (nothing is written).
      ExportError: an unknown variant, a bad size, batch size or input dtype.
      ExportCheckError: a file failed its check (it is removed; the files
        checked before it stay).
    """
    targets = target_paths(export_dir, variants)
    export_dir = storage.normalize(export_dir)
    names, colours = class_info(config, class_names, palette)
    module = FixedSizeModel(config, model, size or default_size(config), batch_size, input_dtype, fold_bn)
    images = check_images(module.input_spec)
    expected = TensorFlowRunner(module)(images)
    write_assets(os.path.join(export_dir, "assets"), config, names, colours)
    results = {}
    for key in targets:
        variant, target = VARIANTS[key], targets[key]
        if min_label_agreement is not None and variant.logits_rtol is None:
            variant = dataclasses.replace(variant, label_agreement=min_label_agreement)
        staging = os.path.join(export_dir, f".tmp-{uuid.uuid4().hex[:8]}-{variant.filename}")
        with tf.io.gfile.GFile(staging, "wb") as f:
            f.write(_convert(module, variant))
        try:
            check = verify(staging, variant, images, expected)
        except ExportCheckError as e:
            tf.io.gfile.remove(staging)
            raise ExportCheckError(str(e).replace(staging, target)) from None
        tf.io.gfile.rename(staging, target)
        results[key] = (target, check)
        log(f"wrote {target} ({tf.io.gfile.stat(target).length / 1e6:.1f} MB): {check.describe()}")
    return results
