"""FCN semantic segmentation in TensorFlow: the Python API is `fcn_tf.api`, re-exported here.

    import fcn_tf
    segmenter = fcn_tf.Segmenter.load("runs/demo")

The names are imported on first use (PEP 562), so that `import fcn_tf` and
the light modules (`fcn_tf.config`, the experiment registry) do not start
TensorFlow.
"""

__all__ = ["Segmentation", "Segmenter", "evaluate", "train"]


def __getattr__(name):
    if name in __all__:
        from fcn_tf import api

        return getattr(api, name)
    raise AttributeError(f"module 'fcn_tf' has no attribute {name!r}")
