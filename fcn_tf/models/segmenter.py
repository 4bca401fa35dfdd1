"""FCN = dilated ResNet backbone -> FCN head (+ auxiliary head) -> bilinear upsampling.

`build_fcn(model_config)` is the one entry point. The model takes a
normalized float32 NHWC image batch of any size and returns a dict:
`"logits"` (N, H, W, num_classes) at input resolution, and `"aux_logits"`
(the same shape, used only by the training loss) when the aux head is on.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from fcn_tf.config import ModelConfig
from fcn_tf.models.fcn_head import fcn_head
from fcn_tf.models.layers import LayerSettings
from fcn_tf.models.resnet import build_resnet


@keras.saving.register_keras_serializable(package="fcn_tf")
class ResizeLike(layers.Layer):
    """Bilinearly resizes `x` to the spatial size of `reference`.

    `tf.image.resize` with "bilinear" uses half-pixel centres, which is
    PyTorch's `interpolate(..., align_corners=False)`. The output is cast to
    float32 so the loss and argmax run in full precision under mixed precision.
    """

    def call(self, x, reference):
        size = tf.shape(reference)[1:3]
        return tf.cast(tf.image.resize(x, size, method="bilinear"), tf.float32)

    def compute_output_shape(self, x_shape, reference_shape):
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[3])


def _sync_bn(config: ModelConfig) -> bool:
    # Synchronized BatchNorm only costs an all-reduce when there is more than one replica.
    return config.sync_bn and tf.distribute.get_strategy().num_replicas_in_sync > 1


def build_fcn(
    config: ModelConfig, sync_bn: bool | None = None, packed_sync: bool = True, name: str = "fcn"
) -> keras.Model:
    """Builds the FCN segmenter described by `config`.

    Args:
      config: the model section of an experiment.
      sync_bn: force BatchNorm synchronization on or off; by default it is
        on when `config.sync_bn` and the current strategy has several replicas
        (so build inside `strategy.scope()`). Synchronized layers exchange one
        packed tensor per pass (`fcn_tf.models.sync_batch_norm`).
      packed_sync: False: synchronized layers run Keras' own synchronized
        BatchNorm instead (for side-by-side comparisons; same variables).
      name: model name.

    Returns:
      A functional keras.Model with a nested "backbone" model and dict outputs.
    """
    sync = _sync_bn(config) if sync_bn is None else sync_bn
    # Decided once for the whole model: every layer gets the same kernels and BatchNorm settings.
    settings = LayerSettings(config.bn_momentum, config.bn_epsilon, sync, config.kernels, packed_sync)
    backbone = build_resnet(config.backbone_depth, config.output_stride, config.stem, settings)
    image = keras.Input(shape=(None, None, 3), name="image")
    features = backbone(image)
    outputs = {}
    logits = fcn_head(
        features["layer4"],
        config.num_classes,
        config.head_channels,
        config.head_num_convs,
        config.dropout,
        settings,
    )
    outputs["logits"] = ResizeLike(name="upsample")(logits, image)
    if config.aux_head:
        aux = fcn_head(
            features["layer3"],
            config.num_classes,
            config.aux_channels,
            1,
            config.dropout,
            settings,
            name="aux",
        )
        outputs["aux_logits"] = ResizeLike(name="aux_upsample")(aux, image)
    return keras.Model(image, outputs, name=name)


def feature_model(model: keras.Model) -> keras.Model:
    """A model on the same weights returning features and head logits before upsampling.

    Keys: "layer3", "layer4", "logits_lowres", and "aux_logits_lowres" when
    the aux head exists. Used by the parity tests and for debugging; the
    heads' layers are re-applied (in inference mode) on the backbone's graph.
    """
    backbone = model.get_layer("backbone")
    names = {layer.name for layer in model.layers}

    def apply_head(x, prefix):
        i = 1
        while f"{prefix}_conv{i}" in names:
            for part in ("conv", "bn", "relu"):
                x = model.get_layer(f"{prefix}_{part}{i}")(x)
            i += 1
        return model.get_layer(f"{prefix}_classifier")(x)

    features = backbone.output
    outputs = {"layer3": features["layer3"], "layer4": features["layer4"]}
    outputs["logits_lowres"] = apply_head(features["layer4"], "head")
    if "aux_classifier" in names:
        outputs["aux_logits_lowres"] = apply_head(features["layer3"], "aux")
    return keras.Model(backbone.input, outputs, name=f"{model.name}_features")
