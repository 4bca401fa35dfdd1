"""What every export shares: the model it runs, the variables it saves, the assets it carries, the runners.

- `inference_model`: the segmenter restricted to its main logits, with
  BatchNorm folded into the convolutions when asked. The SavedModel and the
  fixed-size files both build their graph from it, so the decision to fold
  is taken in this one place.
- `saved_variables`: the `tf.Variable`s a `tf.Module` must track so that its
  saved graph holds the weights.
- `class_info`, `write_assets`, `read_class_info`, `read_config`: the class
  names, palette and experiment config an export carries in `assets/`
  (`labels.txt`, `palette.txt`, `experiment.json`).
- `Runner` and `checked_input`: the interface of a fixed-size model run in
  some runtime (LiteRT's interpreter, ONNX Runtime, TensorFlow).
- `missing_requirements`: the optional packages a format needs and cannot
  import, found before any work starts.
- `ExportError`: an anticipated failure, said in one line.
"""

from __future__ import annotations

import abc
import importlib.util
import json
import os

import keras
import numpy as np
import tensorflow as tf

from fcn_tf import config as config_lib
from fcn_tf.data import classes
from fcn_tf.models.fold_batchnorm import fold_batchnorm

LABELS_ASSET = "labels.txt"
PALETTE_ASSET = "palette.txt"
CONFIG_ASSET = "experiment.json"

# Python modules each export format needs: {format: [(module, pip requirement)]}.
# The SavedModel needs only core dependencies (tensorflow-serving-api is one).
REQUIREMENTS = {
    "saved_model": [],
    "litert": [("ai_edge_litert.interpreter", "ai-edge-litert (pip install -e '.[litert]')")],
    "onnx": [
        ("tf2onnx", "tf2onnx (pip install -e '.[onnx]')"),
        ("onnxruntime", "onnxruntime (pip install -e '.[onnx]')"),
    ],
}


class ExportError(ValueError):
    """An anticipated export failure whose message is the whole story (scripts print it in one line)."""


def missing_requirements(formats) -> str | None:
    """One line naming the packages the given export formats need but cannot import, or None.

    Checked before any work starts, so that a missing optional package is
    reported in one line instead of a traceback after the model is built.

    Args:
      formats: names from `REQUIREMENTS`.

    Raises:
      ExportError: an unknown format.
    """
    missing = []
    for name in formats:
        if name not in REQUIREMENTS:
            raise ExportError(f"unknown export format {name!r}; choose from {', '.join(REQUIREMENTS)}")
        for module, requirement in REQUIREMENTS[name]:
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:  # its parent package is missing
                found = False
            if not found and requirement not in missing:
                missing.append(requirement)
    if not missing:
        return None
    return f"the {'/'.join(formats)} export needs {', '.join(missing)}, which is not installed"


# ------------------------------------------------------------------ the model ---


def logits_model(model: keras.Model) -> keras.Model:
    """The segmenter restricted to its main logits (the aux head is training-only).

    Args:
      model: the segmenter (dict outputs) or a model with one output.
    """
    output = model.output
    if isinstance(output, dict):
        output = output["logits"]
    return keras.Model(model.input, output, name=f"{model.name}_logits")


def inference_model(model: keras.Model, fold_bn: bool = False) -> keras.Model:
    """The model an export runs: the main logits, BatchNorm folded into the convolutions if asked.

    Args:
      model: the segmenter (weights loaded).
      fold_bn: fold BatchNorm into the preceding convolutions
        (`fcn_tf.models.fold_batchnorm`); logits change only by float
        rounding (~1e-6 relative).
    """
    main = logits_model(model)
    return fold_batchnorm(main) if fold_bn else main


def saved_variables(model: keras.Model) -> list[tf.Variable]:
    """The `tf.Variable`s behind a Keras model's variables, for a `tf.Module` to save.

    A SavedModel must track the `tf.Variable`s its functions capture, not the
    Keras model. Keras 3 wraps each `tf.Variable` in a `keras.Variable`, and
    saving the wrapper writes a second, separate `tf.Variable` copy that the
    SavedModel's restore op fills, while the traced functions read the
    original, which nothing in the saved graph restores. `tf.saved_model.load`
    still works (it binds captures by object, not by graph), but every
    loader of the saved graph fails: TF Serving and `saved_model_cli run`
    stop with "Could not find variable stem_bn1/beta", and the TFLite
    converter keeps those variables as uninitialized runtime resources (its
    model holds no weights and returns NaN).

    Args:
      model: a Keras model on the TensorFlow backend.
    """
    variables = [v.value for v in model.variables]
    for keras_variable, variable in zip(model.variables, variables):
        if not isinstance(variable, tf.Variable):
            raise TypeError(
                f"{keras_variable.path} is not backed by a tf.Variable ({type(variable).__name__})"
            )
    return variables


# ----------------------------------------------------------------- the assets ---


def class_info(config, class_names=None, palette=None):
    """Class names and palette for `config`, from `fcn_tf.data.classes` unless given.

    Args:
      config: the experiment.
      class_names: optional list of names, one per class.
      palette: optional uint8-compatible (num_classes, 3) colours.

    Returns:
      (list of num_classes names, uint8 (num_classes, 3) palette).

    Raises:
      ExportError: a given list does not have num_classes entries.
    """
    n = config.model.num_classes
    if class_names is None:
        class_names = classes.class_names_for(config.data.dataset, n, config.data.class_names)
    if palette is None:
        palette = classes.palette_for(config.data.dataset, n, config.data.palette)
    class_names = [str(name) for name in class_names]
    palette = np.asarray(palette)
    if len(class_names) != n:
        raise ExportError(f"{len(class_names)} class names given for num_classes={n}")
    if palette.shape != (n, 3) or palette.min() < 0 or palette.max() > 255:
        raise ExportError(f"palette must be (num_classes={n}, 3) in 0..255, got shape {palette.shape}")
    return class_names, palette.astype(np.uint8)


def write_assets(directory: str, config, class_names, palette) -> dict:
    """Writes the class names, palette and config files an export carries.

    Args:
      directory: where to write (created if missing).
      config: the experiment.
      class_names: one name per class (see `class_info`).
      palette: uint8 (num_classes, 3).

    Returns:
      {asset name: path written}.
    """
    tf.io.gfile.makedirs(directory)
    contents = {
        LABELS_ASSET: "".join(f"{name}\n" for name in class_names),
        PALETTE_ASSET: "".join(f"{r} {g} {b}\n" for r, g, b in np.asarray(palette).tolist()),
        CONFIG_ASSET: config_lib.to_json(config),
    }
    paths = {}
    for name, text in contents.items():
        paths[name] = os.path.join(directory, name)
        with tf.io.gfile.GFile(paths[name], "w") as f:
            f.write(text)
    return paths


def read_class_info(export_dir: str):
    """(class names, uint8 (C, 3) palette) from an export's assets.

    Args:
      export_dir: a SavedModel directory, or the directory of fixed-size files.
    """
    assets = os.path.join(export_dir, "assets")
    with tf.io.gfile.GFile(os.path.join(assets, LABELS_ASSET)) as f:
        names = [line.rstrip("\n") for line in f]
    with tf.io.gfile.GFile(os.path.join(assets, PALETTE_ASSET)) as f:
        palette = np.array([[int(v) for v in line.split()] for line in f if line.strip()], np.uint8)
    return names, palette


def read_config(export_dir: str):
    """The experiment config stored with an export.

    Args:
      export_dir: a SavedModel directory, or the directory of fixed-size files.
    """
    with tf.io.gfile.GFile(os.path.join(export_dir, "assets", CONFIG_ASSET)) as f:
        return config_lib.from_dict(json.load(f))


# ---------------------------------------------------------------- the runners ---


class Runner(abc.ABC):
    """A fixed-size model run in some runtime: `runner(images) -> {"logits", "labels"}` as numpy.

    Subclasses set the attributes and implement `_run`; a call checks the
    images against the fixed input first (`checked_input`).

    Attributes:
      path: what runs (the file), named in messages.
      input_shape: the fixed (N, H, W, 3).
      input_dtype: the numpy dtype of the images (uint8 or float32, 0..255 scale).
    """

    path: str
    input_shape: tuple[int, ...]
    input_dtype: np.dtype

    def __call__(self, images) -> dict:
        return self._run(checked_input(self, images))

    @abc.abstractmethod
    def _run(self, images: np.ndarray) -> dict:
        """The runtime's {"logits", "labels"} for images of the fixed shape and dtype."""


def checked_input(runner: Runner, images) -> np.ndarray:
    """`images` as an array, if it has the runner's fixed shape and dtype.

    Args:
      runner: the runner about to take the images.
      images: array-like (N, H, W, 3).

    Raises:
      ValueError: another shape or dtype (the message names the runner's file).
    """
    images = np.asarray(images)
    if images.shape != runner.input_shape or images.dtype != runner.input_dtype:
        raise ValueError(
            f"{runner.path} takes {runner.input_dtype} {runner.input_shape} images, got {images.dtype} {images.shape}"
        )
    return images
