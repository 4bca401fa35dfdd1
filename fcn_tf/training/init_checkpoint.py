"""Fine-tuning: a new run starts from another model's weights (`train.py --init_checkpoint=PATH`).

PATH is a converted reference model (`scripts/convert_checkpoint.py`, a
`.weights.h5`) or another fcn_tf run (its workdir, a checkpoint prefix or a
`.weights.h5`). The source model is rebuilt and restored as it was trained
(the architecture of the run's config.json, else this experiment's with the
class count read from the file's classifiers), then every weight of the new
model whose name and shape match is copied; the others keep their fresh
initialization: typically the two classifiers, when the class count
differs. `initialize` returns what was loaded, what was re-initialized and
why, and the training log prints it. Only a run that starts is initialized:
a resumed run restores its own checkpoint (`fcn_tf.training.loop`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import h5py
import keras
import numpy as np
import tensorflow as tf

from fcn_tf import checkpoints
from fcn_tf.config import ModelConfig, read_workdir_config
from fcn_tf.models import build_fcn


class InitCheckpointError(ValueError):
    """The initial checkpoint cannot be read as an FCN; the message names the file."""


@dataclasses.dataclass(frozen=True)
class InitReport:
    """What `initialize` did.

    Attributes:
      source: the checkpoint restored.
      num_classes: the source model's classes.
      loaded: weight names copied from the source.
      reinitialized: (weight name, reason) of the weights left at their initialization.
      unused: source weight names that no weight of the new model took.
    """

    source: str
    num_classes: int
    loaded: tuple[str, ...]
    reinitialized: tuple[tuple[str, str], ...]
    unused: tuple[str, ...]

    def lines(self) -> list[str]:
        """The report as log lines: loaded layers, re-initialized weights with the reason, unused ones."""
        layers = list(dict.fromkeys(name.rsplit("/", 1)[0] for name in self.loaded))
        lines = [
            f"Initialized from {self.source} ({self.num_classes} classes): loaded {len(self.loaded)} weights "
            f"of {len(layers)} layers: {', '.join(layers)}"
        ]
        if self.reinitialized:
            lines.append(
                f"Re-initialized {len(self.reinitialized)} weights: "
                + "; ".join(f"{name} ({why})" for name, why in self.reinitialized)
            )
        if self.unused:
            lines.append(f"Not used from the checkpoint ({len(self.unused)}): {', '.join(self.unused)}")
        return lines


def _classifier_classes_h5(path: str) -> set[int]:
    # Keras' .weights.h5 names layers by class, not by our names: the
    # classifiers are the only convolutions with a bias (vars/1) in an FCN.
    found = set()
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Group) and "0" in obj and "1" in obj and name.endswith("vars"):
                kernel, bias = obj["0"], obj["1"]
                if len(kernel.shape) == 4 and kernel.shape[:2] == (1, 1) and bias.shape == kernel.shape[-1:]:
                    found.add(int(bias.shape[0]))

        f.visititems(visit)
    return found


def _classifier_classes_ckpt(prefix: str) -> set[int]:
    shapes = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    return {
        shape[0]
        for key, shape in shapes.items()
        if key.startswith("model/") and key.endswith("/bias/.ATTRIBUTES/VARIABLE_VALUE") and len(shape) == 1
    }


def source_model_config(resolved: str, target: ModelConfig) -> ModelConfig:
    """The architecture of the model saved at `resolved` (a checkpoint prefix or `.weights.h5`).

    An fcn_tf checkpoint in a workdir (WORKDIR/checkpoints/ckpt-N) has the
    run's config.json; otherwise `target`'s architecture with the class
    count of the file's classifiers.

    Raises:
      InitCheckpointError: no single class count can be read from the file.
    """
    workdir = os.path.dirname(os.path.dirname(resolved))
    saved = None if resolved.endswith(".weights.h5") else read_workdir_config(workdir)
    if saved is not None:
        return dataclasses.replace(saved.model, pretrained_backbone="", pretrained_backbone_source="")
    try:
        counts = (_classifier_classes_h5 if resolved.endswith(".weights.h5") else _classifier_classes_ckpt)(
            resolved
        )
    except (OSError, tf.errors.OpError) as e:
        raise InitCheckpointError(f"{resolved}: not a readable weights file or checkpoint ({e})") from None
    if len(counts) != 1:
        raise InitCheckpointError(
            f"{resolved}: cannot tell the model's class count from its classifiers (found {sorted(counts)}); "
            "is it an FCN of fcn_tf or one converted by scripts/convert_checkpoint.py?"
        )
    return dataclasses.replace(target, num_classes=counts.pop(), pretrained_backbone="")


def _restored_source(path: str, target: ModelConfig) -> tuple[keras.Model, str, ModelConfig]:
    resolved = checkpoints.resolve(path)
    if not resolved.endswith(".weights.h5"):
        checkpoints.verify(resolved)
    source_config = source_model_config(resolved, target)
    # Called outside the strategy's scope: a plain model to read from.
    source = build_fcn(source_config, sync_bn=False, name="init_source")
    try:
        with warnings.catch_warnings():
            # Keras warns once per layer group a file of another architecture lacks; the error below says it once.
            warnings.filterwarnings("ignore", "Skipping nested container", UserWarning)
            checkpoints.restore_model(source, resolved)
    except (ValueError, AssertionError, OSError, tf.errors.OpError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InitCheckpointError(
            f"{resolved} does not hold an FCN of backbone depth {source_config.backbone_depth}, stem "
            f"{source_config.stem!r}, head {source_config.head_channels} channels and "
            f"{source_config.num_classes} classes: {first}"
        ) from None
    return source, resolved, source_config


def initialize(model: keras.Model, path: str, model_config: ModelConfig) -> InitReport:
    """Copies every weight of the model at `path` whose name and shape match into `model`.

    Args:
      model: the new run's model (built, e.g. inside the strategy's scope).
      path: a workdir, checkpoint prefix or `.weights.h5` (`checkpoints.resolve`).
      model_config: the new run's model config (the architecture assumed
        for a file without a config).

    Returns:
      An InitReport.

    Raises:
      FileNotFoundError: nothing restorable at `path`.
      checkpoints.UnreadableCheckpointError: a damaged checkpoint.
      InitCheckpointError: the file is not an FCN of the assumed architecture.
    """
    source, resolved, source_config = _restored_source(path, model_config)
    values = {v.path: v for v in source.weights}
    loaded, reinitialized = [], []
    for variable in model.weights:
        name = variable.path
        if name not in values:
            reinitialized.append((name, "not in the checkpoint"))
        elif tuple(values[name].shape) != tuple(variable.shape):
            reinitialized.append(
                (name, f"shape {tuple(values[name].shape)} in the checkpoint, {tuple(variable.shape)} here")
            )
        else:
            variable.assign(np.asarray(values[name].numpy()))
            loaded.append(name)
    taken = set(loaded)
    unused = tuple(name for name in values if name not in taken and name not in dict(reinitialized))
    return InitReport(resolved, source_config.num_classes, tuple(loaded), tuple(reinitialized), unused)
