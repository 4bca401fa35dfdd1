"""fcn_tf from Python: the scripts' configs, a trained model on numpy images or files, evaluation, training.

    import experiments
    import fcn_tf

    segmenter = fcn_tf.Segmenter.load("runs/demo")          # a workdir, a checkpoint or an export
    result = segmenter.segment(image)                       # uint8 (H, W, 3), a file path or encoded bytes
    result.labels, result.confidence, result.overlay        # (H, W) int32, (H, W) float32, (H, W, 3) uint8

    config = experiments.resolve("synthetic_r18_os8", workdir="runs/demo")   # the scripts' config
    metrics = fcn_tf.evaluate(config, "runs/demo")          # mIoU, per-class IoU with the class names
    fcn_tf.train(config, "runs/other")                      # as scripts/train.py (resumes a workdir)

Configs come from the experiment registry (`experiments.resolve`, as every
script gets its config; the library does not import the registry). The
scripts are thin users of these functions: `Segmenter` is predict.py's
model, `evaluate` and `train` are evaluate.py's and train.py's library call.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from fcn_tf import checkpoints, distribute, export, predict_lib, storage, visualize
from fcn_tf.config import ConfigError, ExperimentConfig, read_workdir_config, validate

# Training from Python is the training library's own entry point, as scripts/train.py calls it:
# train(config, workdir, strategy=None, *, from_scratch=False, init_checkpoint="") -> dict.
from fcn_tf.training import train

__all__ = ["CheckpointError", "Segmentation", "Segmenter", "evaluate", "restore", "train"]


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """One segmented image.

    Attributes:
      labels: int32 (H, W), the class of each pixel.
      confidence: float32 (H, W), its softmax probability.
      overlay: uint8 (H, W, 3), the class colours blended over the image.
      class_names: the model's classes (index = label).
    """

    labels: np.ndarray
    confidence: np.ndarray
    overlay: np.ndarray
    class_names: list[str]

    def present(self) -> list[str]:
        """The names of the classes found in the image."""
        return [self.class_names[i] for i in np.unique(self.labels)]


def _is_export(path: str) -> bool:
    if os.path.splitext(path)[1].lower() in predict_lib.FIXED_SIZE_EXTENSIONS:
        return True
    if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        return True
    try:
        export.resolve_version_dir(path)
    except (FileNotFoundError, ValueError, tf.errors.OpError):
        return False
    return True


class Segmenter:
    """A trained model that segments images, loaded as predict.py loads it."""

    def __init__(self, predictor: predict_lib.Predictor):
        self.predictor = predictor

    @classmethod
    def load(
        cls, path: str, config: ExperimentConfig | None = None, max_pixels: int = export.DEFAULT_MAX_PIXELS
    ) -> Segmenter:
        """Loads a model from a training workdir, a checkpoint or an export.

        Args:
          path: a workdir (its latest checkpoint and config.json), a checkpoint
            prefix or `.weights.h5` (with `config`), a SavedModel (`BASE/NAME`
            or a version directory) or a .tflite / .onnx file.
          config: the experiment of a checkpoint, as the scripts resolve it
            (`experiments.resolve(NAME, workdir, overrides)`); default: the
            workdir's config.json.
          max_pixels: largest height * width accepted.

        Raises:
          FileNotFoundError: nothing loadable at `path`.
          ConfigError: a checkpoint outside a workdir without its config.
        """
        if _is_export(path):
            return cls(predict_lib.Predictor.load(path, max_pixels))
        if config is None:
            workdir = path if tf.io.gfile.isdir(storage.normalize(path)) else None
            config = read_workdir_config(workdir)
            if config is None:
                raise ConfigError(
                    f"{path} is neither an export nor a workdir with config.json: pass its config "
                    "(experiments.resolve(NAME))"
                )
        return cls(predict_lib.Predictor.from_checkpoint(validate(config), path, max_pixels))

    @property
    def class_names(self) -> list[str]:
        return list(self.predictor.class_names)

    @property
    def palette(self) -> np.ndarray:
        """uint8 (num_classes, 3), the class colours."""
        return self.predictor.palette

    def segment(self, image, alpha: float = 0.5) -> Segmentation:
        """Segments one image.

        Args:
          image: uint8 (H, W, 3) RGB array, an image file's path, or its bytes.
          alpha: weight of the class colours in the overlay.

        Raises:
          tf.errors.InvalidArgumentError: not an acceptable image (the
            message says why).
        """
        if isinstance(image, np.ndarray):
            pixels = np.asarray(image, np.uint8)
            if pixels.ndim != 3 or pixels.shape[-1] != 3:
                raise ValueError(f"image must be uint8 (H, W, 3) RGB, got shape {pixels.shape}")
            contents = tf.io.encode_png(pixels).numpy()  # lossless: the model sees these pixels
        else:
            contents = image if isinstance(image, bytes) else tf.io.read_file(os.fspath(image)).numpy()
            pixels = tf.io.decode_image(contents, channels=3, expand_animations=False).numpy()
        labels, confidence = self.predictor.segment(contents)
        overlay = visualize.overlay(pixels, labels, self.palette, alpha=alpha)
        return Segmentation(labels, confidence, overlay, self.class_names)

    def segment_files(self, paths: Sequence[str], output_dir: str, alpha: float = 0.5, log=print):
        """Writes NAME_labels.png and NAME_overlay.png per file (`predict_lib.predict_files`)."""
        return predict_lib.predict_files(self.predictor, paths, output_dir, alpha=alpha, log=log)


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored into the experiment's model; one line naming it."""


def headline(error: Exception, limit: int = 400) -> str:
    """The start of a long error message on one line.

    Keras and tf.train follow their first line with every unmatched variable and
    its values; Keras' first line ends in ":" and the next one says what failed.

    Args:
      error: the exception.
      limit: the most characters kept.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= limit else text[:limit] + " ..."


def restore(model, path: str, name: str) -> str:
    """Loads the weights at `path` into `model`; returns the checkpoint restored.

    Args:
      model: the experiment's FCN, built.
      path: a workdir, checkpoint prefix or `.weights.h5` file.
      name: the experiment's name, for the message.

    Raises:
      FileNotFoundError: nothing restorable at `path`.
      CheckpointError: a damaged checkpoint, or one of another model (one line).
    """
    try:
        resolved = checkpoints.resolve(path)
        if not resolved.endswith(".weights.h5"):
            # A truncated or damaged file fails the restore with a bare IndexError or
            # DataLossError; verify names the file and what is wrong with it.
            checkpoints.verify(resolved)
        return checkpoints.restore_model(model, resolved)
    except checkpoints.UnreadableCheckpointError as e:
        raise CheckpointError(str(e)) from None
    except (ValueError, AssertionError) as e:
        raise CheckpointError(
            f"{path} does not hold the weights of {name}'s model (as configured here): {headline(e)}"
        ) from None
    except tf.errors.OpError as e:
        raise CheckpointError(f"cannot read the checkpoint {path}: {headline(e)}") from None


def evaluate(
    config: ExperimentConfig,
    checkpoint: str,
    strategy: tf.distribute.Strategy | None = None,
    max_examples: int = 0,
    save_predictions_dir: str | None = None,
) -> dict:
    """Evaluates the checkpoint on the config's evaluation split (`fcn_tf.eval_lib.evaluate`).

    Args:
      config: the experiment (e.g. `experiments.resolve(NAME, workdir)`).
      checkpoint: a workdir, checkpoint prefix or `.weights.h5`.
      strategy: default: `distribute.make_strategy("auto")`.
      max_examples: evaluate the first N examples only (0: all).
      save_predictions_dir: also write prediction PNGs here.

    Returns:
      eval_lib's result: miou, aacc, macc, per-class iou and class_names,
      num_examples, ... and "checkpoint": the checkpoint restored.

    Raises:
      FileNotFoundError: no checkpoint at `checkpoint`, or the dataset is
        not prepared (the message gives the command).
      CheckpointError: the checkpoint cannot be restored (one line).
    """
    from fcn_tf import eval_lib
    from fcn_tf.models import build_fcn

    strategy = strategy or distribute.make_strategy("auto")
    with strategy.scope():
        model = build_fcn(config.model)
    restored = restore(model, checkpoint, config.name)
    logging.info(
        "Evaluating %s from %s on %s/%s: mode=%s scales=%s flip=%s, %d replica(s)",
        config.name, restored, config.data.name or config.data.dataset, config.data.eval_split,
        config.eval.mode, config.eval.scales, config.eval.flip, strategy.num_replicas_in_sync,
    )  # fmt: skip
    result = eval_lib.evaluate(
        model,
        None,
        config,
        strategy=strategy,
        max_examples=max_examples,
        save_predictions_dir=save_predictions_dir,
    )
    return {**result, "checkpoint": restored}
