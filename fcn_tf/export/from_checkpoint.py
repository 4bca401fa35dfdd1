"""A trained checkpoint to its exports in one call: what `scripts/export.py` runs.

Everything that can be checked before the model is built is checked first:
the packages each format needs, the variant names, and that no target
exists (the SavedModel's version directory, each fixed-size file). A mistake
then costs no model build and leaves nothing behind; each anticipated
failure is an `ExportError`, `FileExistsError` or `FileNotFoundError` whose
message is one line.
"""

from __future__ import annotations

import keras

from fcn_tf.checkpoints import restore_model
from fcn_tf.export import fixed_size, saved_model
from fcn_tf.export.common import ExportError, missing_requirements
from fcn_tf.models import build_fcn


def restored_model(config, checkpoint: str) -> tuple[keras.Model, str]:
    """The segmenter of `config` with the weights of `checkpoint`, for inference.

    Args:
      config: the experiment.
      checkpoint: workdir, checkpoint prefix or `.weights.h5` (see
        `fcn_tf.checkpoints.resolve`).

    Returns:
      (model, the checkpoint path actually restored).

    Raises:
      FileNotFoundError: nothing restorable at `checkpoint`.
    """
    model = build_fcn(config.model, sync_bn=False)
    return model, restore_model(model, checkpoint)


def export_checkpoint(
    config,
    checkpoint: str,
    export_dir: str,
    formats=("saved_model",),
    litert_variants=("float32",),
    *,
    version: int | None = None,
    max_pixels: int = saved_model.DEFAULT_MAX_PIXELS,
    fold_bn: bool = False,
    size=None,
    batch_size: int = 1,
    input_dtype: str = "uint8",
    min_label_agreement: float | None = None,
    log=print,
) -> list[str]:
    """Restores `checkpoint` into the model of `config` and writes it in each format asked for.

    Args:
      config: the experiment the checkpoint was trained with.
      checkpoint: workdir, checkpoint prefix or `.weights.h5`.
      export_dir: the SavedModel's `BASE/NAME` (its version directory is
        created below it) and the directory of the fixed-size files.
      formats: "saved_model", "litert", "onnx" (`common.REQUIREMENTS`).
      litert_variants: LiteRT weight variants ("float32", "float16", "int8").
      version: the SavedModel's version (default: the next free integer).
      max_pixels: the SavedModel's largest height * width accepted.
      fold_bn: fold BatchNorm into the convolutions, for every format.
      size: the fixed-size files' (height, width) (default
        `fixed_size.default_size(config)`).
      batch_size: the fixed-size files' images per call.
      input_dtype: the fixed-size files' input, "uint8" or "float32".
      min_label_agreement: the quantized variants' accepted label agreement
        (default: per variant, `fixed_size.VARIANTS`).
      log: called with one line per export written.

    Returns:
      The paths written: the SavedModel's version directory, then the files.

    Raises:
      ExportError: a missing package, an unknown format or variant, a bad
        setting, or a file that fails its check in its runtime.
      FileExistsError: a target exists already (nothing is written).
      FileNotFoundError: no checkpoint at `checkpoint`.
    """
    formats = list(dict.fromkeys(formats))
    missing = missing_requirements(formats)
    if missing:
        raise ExportError(missing)
    variants = fixed_size.variant_keys(formats, litert_variants)
    fixed_size.target_paths(export_dir, variants)
    if "saved_model" in formats:
        saved_model.version_dir(export_dir, version)
    model, restored = restored_model(config, checkpoint)
    written = []
    if "saved_model" in formats:
        path = saved_model.export(
            config, model, export_dir, version=version, max_pixels=max_pixels, fold_bn=fold_bn
        )
        log(f"exported {config.name} ({restored}) to {path}")
        written.append(path)
    if variants:
        results = fixed_size.export(
            config,
            model,
            export_dir,
            variants=variants,
            size=size,
            batch_size=batch_size,
            input_dtype=input_dtype,
            min_label_agreement=min_label_agreement,
            fold_bn=fold_bn,
            log=log,
        )
        for path, _ in results.values():
            log(f"exported {config.name} ({restored}) to {path}")
            written.append(path)
    return written
