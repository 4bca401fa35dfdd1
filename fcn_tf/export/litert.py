"""LiteRT (.tflite) conversion of a `FixedSizeModel` and a runner on LiteRT's interpreter.

TensorFlow's converter writes the file; `ai-edge-litert`'s interpreter (the
runtime a phone or a Python client uses) runs it. The converter reads the
module through a SavedModel, so the module must track the `tf.Variable`s its
function captures (see `fcn_tf.export.common.saved_variables`): otherwise the
weights are left out as uninitialized runtime variables and the model
returns NaN.

Weight variants: "float32"; "float16" (weights stored as float16,
dequantized at load); "int8" (dynamic-range quantization: int8 weights per
output channel, activations quantized on the fly).
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from fcn_tf.export import common

WEIGHT_VARIANTS = ("float32", "float16", "int8")


def convert(module, variant: str = "float32") -> bytes:
    """The .tflite bytes of `module.serve` (a `fcn_tf.export.fixed_size.FixedSizeModel`).

    Args:
      module: the fixed-size module.
      variant: one of `WEIGHT_VARIANTS`.
    """
    if variant not in WEIGHT_VARIANTS:
        raise ValueError(f"LiteRT variant {variant!r} not in {WEIGHT_VARIANTS}")
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module
    )
    if variant != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


class Runner(common.Runner):
    """Runs a .tflite file's signature in LiteRT's interpreter: `runner(images) -> {"logits", "labels"}`.

    Args:
      path: the .tflite file.
      num_threads: interpreter threads (default: every core).
    """

    def __init__(self, path: str, num_threads: int | None = None):
        # An optional package: imported only when a .tflite file is run.
        from ai_edge_litert.interpreter import Interpreter

        self.path = path
        self._interpreter = Interpreter(model_path=path, num_threads=num_threads or os.cpu_count())
        signatures = self._interpreter.get_signature_list()
        if len(signatures) != 1:
            raise ValueError(f"{path}: expected one signature, found {sorted(signatures)}")
        (key,) = signatures
        self._signature = self._interpreter.get_signature_runner(key)
        (detail,) = self._signature.get_input_details().values()
        (self._input_name,) = self._signature.get_input_details()
        self.input_shape = tuple(int(d) for d in detail["shape"])
        self.input_dtype = np.dtype(detail["dtype"])
        outputs = set(self._signature.get_output_details())
        if outputs != {"logits", "labels"}:
            raise ValueError(f"{path}: outputs {sorted(outputs)}, expected labels and logits")

    def _run(self, images: np.ndarray) -> dict:
        return self._signature(**{self._input_name: images})
