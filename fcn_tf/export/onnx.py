"""ONNX conversion of a `FixedSizeModel` (tf2onnx) and a runner on ONNX Runtime.

tf2onnx freezes the module's function (its variables become constants) and
translates it to ONNX operators at `OPSET`; ONNX Runtime runs it on the CPU.
Output names are kept ("logits", "labels").
"""

from __future__ import annotations

import os

import numpy as np

from fcn_tf.export import common

# Supported by tf2onnx 1.17 and onnxruntime 1.32.
OPSET = 17


def convert(module) -> bytes:
    """The .onnx bytes of `module.serve` (a `fcn_tf.export.fixed_size.FixedSizeModel`).

    Args:
      module: the fixed-size module.
    """
    # An optional package: imported only when an ONNX file is written.
    import tf2onnx

    proto, _ = tf2onnx.convert.from_function(
        module.serve, input_signature=[module.input_spec], opset=OPSET, output_path=None
    )
    return proto.SerializeToString()


class Runner(common.Runner):
    """Runs a .onnx file in ONNX Runtime (CPU): `runner(images) -> {"logits", "labels"}`.

    Args:
      path: the .onnx file.
      num_threads: intra-op threads (default: every core).
    """

    def __init__(self, path: str, num_threads: int | None = None):
        # An optional package: imported only when an ONNX file is run.
        import onnxruntime

        self.path = path
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_threads or os.cpu_count()
        options.log_severity_level = 3  # warnings about unused initializers are noise here
        self._session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        (detail,) = self._session.get_inputs()
        self._input_name = detail.name
        self.input_shape = tuple(detail.shape)
        self.input_dtype = np.dtype({"tensor(uint8)": np.uint8, "tensor(float)": np.float32}[detail.type])
        self._outputs = [o.name for o in self._session.get_outputs()]
        if sorted(name.split(":")[0] for name in self._outputs) != ["labels", "logits"]:
            raise ValueError(f"{path}: outputs {self._outputs}, expected labels and logits")

    def _run(self, images: np.ndarray) -> dict:
        values = self._session.run(self._outputs, {self._input_name: images})
        return {name.split(":")[0]: value for name, value in zip(self._outputs, values)}
