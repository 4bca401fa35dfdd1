"""The FCN head (on layer4) and the auxiliary head (on layer3).

Reference (sssegmentation `FCN`): `num_convs` x [conv3x3 no bias, BN, ReLU],
spatial dropout, conv1x1 with bias to the classes. The auxiliary head is the
same with one conv.
"""

from __future__ import annotations

from keras import layers

from fcn_tf.models.layers import LayerSettings


def fcn_head(
    x,
    num_classes: int,
    channels: int = 512,
    num_convs: int = 2,
    dropout: float = 0.1,
    settings: LayerSettings | None = None,
    name: str = "head",
):
    """Applies an FCN head to a feature map; returns logits at its resolution.

    Args:
      x: NHWC feature map.
      num_classes: output channels of the classifier.
      channels: channels of each conv3x3 block.
      num_convs: conv3x3-BN-ReLU blocks before the classifier (0: none).
      dropout: spatial dropout rate before the classifier (PyTorch Dropout2d).
      settings: BatchNorm and kernel settings shared by the model's layers
        (default: `LayerSettings()`).
      name: prefix of the layer names (`{name}_conv{i}`, `{name}_bn{i}`,
        `{name}_classifier`).
    """
    settings = settings or LayerSettings()
    for i in range(1, num_convs + 1):
        x = settings.conv(channels, 3, f"{name}_conv{i}", padding="same")(x)
        x = settings.bn(f"{name}_bn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    if dropout > 0:
        x = layers.SpatialDropout2D(dropout, name=f"{name}_dropout")(x)
    # Classifier init as the reference: normal(0, 0.01), zero bias.
    return settings.conv(
        num_classes,
        1,
        f"{name}_classifier",
        use_bias=True,
        kernel_initializer="random_normal",
        bias_initializer="zeros",
    )(x)
