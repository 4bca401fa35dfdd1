"""Models: the dilated ResNet backbone, the FCN head and the segmenter."""

from fcn_tf.models.resnet import build_resnet
from fcn_tf.models.segmenter import build_fcn, feature_model

__all__ = ["build_fcn", "build_resnet", "feature_model"]
