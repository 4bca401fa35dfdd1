"""Exports of a trained segmenter: a TF Serving SavedModel, fixed-size LiteRT and ONNX files.

    common.py          what every export shares: the model it runs (logits, BatchNorm folded or
                       not), the variables it saves, its assets, the `Runner` interface,
                       the optional packages each format needs
    saved_model.py     the SavedModel for TF Serving: signatures, decoding and checks, assets, warm-up
    fixed_size.py      the fixed-size module, its variants, each file checked in its runtime; evaluate
    litert.py onnx.py  the LiteRT and ONNX writers and runners (their packages are optional)
    from_checkpoint.py   a checkpoint to its exports in one call (`scripts/export.py`)

`saved_model.export(config, model, "BASE/NAME")` and
`fixed_size.export(config, model, DIR, variants=...)` write one format each;
`export_checkpoint` restores a checkpoint and writes every format asked for.
"""

from fcn_tf.export import common, fixed_size, from_checkpoint, litert, onnx, saved_model
from fcn_tf.export.common import (
    ExportError,
    Runner,
    class_info,
    inference_model,
    logits_model,
    missing_requirements,
    read_class_info,
    read_config,
)
from fcn_tf.export.fixed_size import (
    VARIANTS,
    ExportCheckError,
    FixedSizeModel,
    TensorFlowRunner,
    default_size,
    load_runner,
    logits_at_image_size,
)
from fcn_tf.export.from_checkpoint import export_checkpoint, restored_model
from fcn_tf.export.saved_model import (
    DEFAULT_MAX_PIXELS,
    LABEL_PAD,
    PREDICT_IMAGES,
    SERVING_DEFAULT,
    SIGNATURES,
    SegmentationServer,
    decode,
    resolve_version_dir,
)

__all__ = [
    "common",
    "fixed_size",
    "from_checkpoint",
    "litert",
    "onnx",
    "saved_model",
    "DEFAULT_MAX_PIXELS",
    "LABEL_PAD",
    "PREDICT_IMAGES",
    "SERVING_DEFAULT",
    "SIGNATURES",
    "VARIANTS",
    "ExportCheckError",
    "ExportError",
    "FixedSizeModel",
    "Runner",
    "SegmentationServer",
    "TensorFlowRunner",
    "class_info",
    "decode",
    "default_size",
    "export_checkpoint",
    "inference_model",
    "load_runner",
    "logits_at_image_size",
    "logits_model",
    "missing_requirements",
    "read_class_info",
    "read_config",
    "resolve_version_dir",
    "restored_model",
]
