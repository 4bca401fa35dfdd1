"""Dilated ResNet (v1c deep stem or the standard 7x7 stem) as a functional Keras model.

`output_stride` is the only knob for dilation; it selects one row of
`STAGE_STRIDES_DILATIONS`. As in the reference (sssegmentation / mmseg
`ResNetV1c` with `contract_dilation=True`), the first block of a dilated
stage uses half the stage's dilation. Layer names are deterministic and map
one-to-one onto the reference's state_dict keys (see convert.py).

PyTorch parity details: a stride-2 3x3 conv is padded
symmetrically by an explicit ZeroPadding2D (TF's "same" would pad
bottom/right only on even inputs); the 3x3/2 max-pool follows a ReLU, so
zero padding equals PyTorch's -inf padding.
"""

from __future__ import annotations

import keras
from keras import layers

from fcn_tf.models.layers import LayerSettings

# output_stride -> (strides of layer1..4, dilations of layer1..4).
STAGE_STRIDES_DILATIONS = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}

# depth -> (block kind, blocks per stage).
DEPTH_BLOCKS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}

STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}


def stage_channels(depth: int) -> tuple[int, ...]:
    """Output channels of layer1..layer4 for a ResNet `depth`."""
    kind, _ = DEPTH_BLOCKS[depth]
    return tuple(w * EXPANSION[kind] for w in STAGE_WIDTHS)


class _Builder:
    """Creates the named conv / BN / ReLU layers of a ResNet."""

    def __init__(self, settings: LayerSettings):
        self.settings = settings

    def conv(self, x, filters, kernel, name, stride=1, dilation=1):
        if kernel > 1 and stride > 1:
            # Symmetric padding as PyTorch's `padding=dilation*(k//2)`.
            x = layers.ZeroPadding2D(padding=dilation * (kernel // 2), name=f"{name}_pad")(x)
            padding = "valid"
        else:
            # For stride 1 and an odd kernel, "same" pads symmetrically.
            padding = "same"
        return self.settings.conv(
            filters, kernel, name, strides=stride, dilation_rate=dilation, padding=padding
        )(x)

    def bn(self, x, name):
        return self.settings.bn(name)(x)

    def conv_bn(self, x, filters, kernel, name, stride=1, dilation=1, relu=True, bn_name=None):
        x = self.conv(x, filters, kernel, name, stride=stride, dilation=dilation)
        x = self.bn(x, bn_name or name.replace("conv", "bn"))
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _block(b: _Builder, x, kind, width, stride, dilation, name, project):
    """One residual block; `project` adds the conv1x1(stride)+BN shortcut."""
    out_channels = width * EXPANSION[kind]
    shortcut = x
    if project:
        shortcut = b.conv_bn(
            x,
            out_channels,
            1,
            f"{name}_downsample_conv",
            stride=stride,
            relu=False,
            bn_name=f"{name}_downsample_bn",
        )
    if kind == "bottleneck":
        # The stride sits on the 3x3 conv (v1b/v1c, "pytorch style").
        y = b.conv_bn(x, width, 1, f"{name}_conv1")
        y = b.conv_bn(y, width, 3, f"{name}_conv2", stride=stride, dilation=dilation)
        y = b.conv_bn(y, out_channels, 1, f"{name}_conv3", relu=False)
    else:
        # As mmseg's BasicBlock: only the first conv is strided and dilated.
        y = b.conv_bn(x, width, 3, f"{name}_conv1", stride=stride, dilation=dilation)
        y = b.conv_bn(y, width, 3, f"{name}_conv2", relu=False)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_out")(y)


def build_resnet(
    depth: int = 50,
    output_stride: int = 8,
    stem: str = "deep",
    settings: LayerSettings | None = None,
    name: str = "backbone",
) -> keras.Model:
    """Builds a dilated ResNet returning `{"layer1", ..., "layer4"}` features.

    Args:
      depth: 18, 34 (basic blocks), 50, 101 or 152 (bottlenecks).
      output_stride: 8, 16 or 32: the total downsampling of layer4.
      stem: "deep" (ResNet-v1c: 3x3 convs of 32, 32, 64 channels) or
        "standard" (one 7x7 conv of 64 channels).
      settings: BatchNorm and kernel settings shared by every layer
        (default: `LayerSettings()`).
      name: model name.

    Returns:
      A functional keras.Model on float32 NHWC inputs of any size.
    """
    if depth not in DEPTH_BLOCKS:
        raise ValueError(f"unsupported ResNet depth {depth}; choose from {sorted(DEPTH_BLOCKS)}")
    if output_stride not in STAGE_STRIDES_DILATIONS:
        raise ValueError(
            f"unsupported output_stride {output_stride}; choose from {sorted(STAGE_STRIDES_DILATIONS)}"
        )
    b = _Builder(settings or LayerSettings())
    kind, blocks = DEPTH_BLOCKS[depth]
    strides, dilations = STAGE_STRIDES_DILATIONS[output_stride]

    inputs = keras.Input(shape=(None, None, 3), name="image")
    if stem == "deep":
        x = b.conv_bn(inputs, 32, 3, "stem_conv1", stride=2)
        x = b.conv_bn(x, 32, 3, "stem_conv2")
        x = b.conv_bn(x, 64, 3, "stem_conv3")
    elif stem == "standard":
        x = b.conv_bn(inputs, 64, 7, "stem_conv1", stride=2)
    else:
        raise ValueError(f"unknown stem {stem!r}; choose 'deep' or 'standard'")
    x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)

    features = {}
    in_channels = 64
    for stage, (width, num_blocks, stride, dilation) in enumerate(
        zip(STAGE_WIDTHS, blocks, strides, dilations), start=1
    ):
        for index in range(num_blocks):
            first = index == 0
            # Contract dilation: the first block of a dilated stage uses half of it.
            block_dilation = max(dilation // 2, 1) if first else dilation
            project = first and (stride != 1 or in_channels != width * EXPANSION[kind])
            x = _block(
                b,
                x,
                kind,
                width,
                stride if first else 1,
                block_dilation,
                f"layer{stage}_block{index}",
                project,
            )
            in_channels = width * EXPANSION[kind]
        features[f"layer{stage}"] = x
    return keras.Model(inputs, features, name=name)
