"""The FCN head (on layer4) and the auxiliary head (on layer3).

Reference (sssegmentation `FCN`): `num_convs` x [conv3x3 no bias, BN, ReLU],
spatial dropout, conv1x1 with bias to the classes. The auxiliary head is the
same with one conv.
"""

from __future__ import annotations

from keras import layers

from fcn_tf.models.layers import BatchNorm, Conv2D, resolve_kernels


def fcn_head(
    x,
    num_classes: int,
    channels: int = 512,
    num_convs: int = 2,
    dropout: float = 0.1,
    bn_momentum: float = 0.9,
    bn_epsilon: float = 1e-5,
    sync_bn: bool = False,
    kernels: str = "auto",
    packed_sync: bool = True,
    name: str = "head",
):
    """Applies an FCN head to a feature map; returns logits at its resolution.

    Args:
      x: NHWC feature map.
      num_classes: output channels of the classifier.
      channels: channels of each conv3x3 block.
      num_convs: conv3x3-BN-ReLU blocks before the classifier (0: none).
      dropout: spatial dropout rate before the classifier (PyTorch Dropout2d).
      bn_momentum: BatchNorm momentum in Keras terms.
      bn_epsilon: BatchNorm epsilon.
      sync_bn: synchronize BatchNorm statistics across replicas.
      kernels: "auto", "tensorflow" or "cpu_fast" (see
        `fcn_tf.models.layers.resolve_kernels`).
      packed_sync: False: synchronized BatchNorms run Keras' own
        implementation (`fcn_tf.models.layers.BatchNorm`).
      name: prefix of the layer names (`{name}_conv{i}`, `{name}_bn{i}`,
        `{name}_classifier`).
    """
    kernels = resolve_kernels(kernels)
    for i in range(1, num_convs + 1):
        x = Conv2D(
            channels,
            3,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            kernels=kernels,
            name=f"{name}_conv{i}",
        )(x)
        x = BatchNorm(
            momentum=bn_momentum,
            epsilon=bn_epsilon,
            synchronized=sync_bn,
            kernels=kernels,
            packed_sync=packed_sync,
            name=f"{name}_bn{i}",
        )(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    if dropout > 0:
        x = layers.SpatialDropout2D(dropout, name=f"{name}_dropout")(x)
    # Classifier init as the reference: normal(0, 0.01), zero bias.
    return Conv2D(
        num_classes,
        1,
        use_bias=True,
        name=f"{name}_classifier",
        kernel_initializer="random_normal",
        bias_initializer="zeros",
        kernels=kernels,
    )(x)
