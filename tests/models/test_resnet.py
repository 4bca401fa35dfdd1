"""Backbone and segmenter shapes, options and naming."""

import numpy as np
import pytest

from fcn_tf.config import ModelConfig
from fcn_tf.models import build_fcn, build_resnet
from fcn_tf.models.resnet import STAGE_STRIDES_DILATIONS


def _ceil_div(n, k):
    return -(-n // k)


@pytest.mark.parametrize("output_stride", [8, 16, 32])
@pytest.mark.parametrize("size", [(33, 47), (64, 64), (17, 21)])
def test_backbone_output_stride_on_odd_sizes(output_stride, size):
    backbone = build_resnet(depth=18, output_stride=output_stride)
    feats = backbone(np.zeros((1, *size, 3), np.float32), training=False)
    # Every stride-2 op (conv, pool) maps n -> ceil(n / 2), as PyTorch with padding 1.
    h, w = size
    for _ in range(2):
        h, w = _ceil_div(h, 2), _ceil_div(w, 2)
    expected = {}
    strides, _ = STAGE_STRIDES_DILATIONS[output_stride]
    for stage, stride in enumerate(strides, start=1):
        if stride == 2:
            h, w = _ceil_div(h, 2), _ceil_div(w, 2)
        expected[f"layer{stage}"] = (h, w)
    for name, hw in expected.items():
        assert tuple(feats[name].shape[1:3]) == hw, name


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_fcn_logits_at_input_size_for_odd_inputs(output_stride):
    config = ModelConfig(
        num_classes=7, backbone_depth=18, output_stride=output_stride, head_channels=16, aux_channels=8
    )
    model = build_fcn(config)
    out = model(np.random.default_rng(0).normal(size=(2, 45, 61, 3)).astype(np.float32), training=False)
    assert set(out) == {"logits", "aux_logits"}
    assert out["logits"].shape == (2, 45, 61, 7)
    assert out["aux_logits"].shape == (2, 45, 61, 7)
    assert out["logits"].dtype == "float32"


def test_options_standard_stem_one_conv_no_aux():
    config = ModelConfig(
        num_classes=3, backbone_depth=34, stem="standard", head_num_convs=1, head_channels=8, aux_head=False
    )
    model = build_fcn(config)
    names = {layer.name for layer in model.layers}
    assert "head_conv1" in names and "head_conv2" not in names and "aux_classifier" not in names
    backbone_names = {layer.name for layer in model.get_layer("backbone").layers}
    assert "stem_conv1" in backbone_names and "stem_conv2" not in backbone_names
    assert model.get_layer("backbone").get_layer("stem_conv1").kernel.shape == (7, 7, 3, 64)
    out = model(np.zeros((1, 40, 40, 3), np.float32), training=False)
    assert set(out) == {"logits"}


def test_deep_stem_and_dilations_follow_the_table():
    backbone = build_resnet(depth=50, output_stride=8)
    conv = backbone.get_layer
    assert conv("stem_conv1").kernel.shape == (3, 3, 3, 32)
    assert conv("stem_conv3").kernel.shape == (3, 3, 32, 64)
    # Contract dilation: first block of a dilated stage at half the dilation.
    assert conv("layer3_block0_conv2").dilation_rate == (1, 1)
    assert conv("layer3_block1_conv2").dilation_rate == (2, 2)
    assert conv("layer4_block0_conv2").dilation_rate == (2, 2)
    assert conv("layer4_block2_conv2").dilation_rate == (4, 4)
    assert conv("layer2_block0_conv2").strides == (2, 2)
    assert conv("layer3_block0_downsample_conv").strides == (1, 1)


def test_batchnorm_settings_and_dropout_in_training_only():
    config = ModelConfig(num_classes=4, backbone_depth=18, head_channels=8, aux_channels=8, dropout=0.5)
    model = build_fcn(config)
    bn = model.get_layer("head_bn1")
    assert bn.momentum == pytest.approx(0.9) and bn.epsilon == pytest.approx(1e-5)
    assert not bn.synchronized  # one replica: no all-reduce needed
    x = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype(np.float32)
    a = model(x, training=False)["logits"]
    b = model(x, training=False)["logits"]
    np.testing.assert_array_equal(a, b)


def test_unknown_depth_or_stride_is_an_error():
    with pytest.raises(ValueError, match="depth 42"):
        build_resnet(depth=42)
    with pytest.raises(ValueError, match="output_stride 4"):
        build_resnet(output_stride=4)
