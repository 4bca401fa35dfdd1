"""Datasets and input pipelines: `build_dataset(data_config, training, ...)`."""

from fcn_tf.data.pipeline import build_dataset

__all__ = ["build_dataset"]
