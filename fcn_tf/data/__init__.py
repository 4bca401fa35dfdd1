"""Datasets and input pipelines: `build_dataset(data_config, training, ...)` (pipeline.py).

`build_dataset` is imported on first use (PEP 562) so that the light
modules of this package (`classes`: dataset metadata) can be read without
starting TensorFlow, e.g. by the experiment registry.
"""

__all__ = ["build_dataset"]


def __getattr__(name):
    if name == "build_dataset":
        from fcn_tf.data.pipeline import build_dataset

        return build_dataset
    raise AttributeError(f"module 'fcn_tf.data' has no attribute {name!r}")
