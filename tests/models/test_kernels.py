"""model.kernels: the FCN's training step on TensorFlow's kernels where a GPU or TPU is visible.

The accelerator branch is forced by patching the device query
(`fcn_tf.devices.accelerators_visible`): the decision is made once, when the
model is built, and every layer carries it in its config. So does the choice
of synchronized BatchNorm (packed or Keras' own).
"""

import dataclasses
from collections import Counter

import keras
import pytest
import tensorflow as tf

from fcn_tf import devices, gpu_check
from fcn_tf.config import ConfigError, ExperimentConfig, ModelConfig, validate
from fcn_tf.models import build_fcn
from fcn_tf.models.layers import BatchNorm, Conv2D, resolve_kernels
from harness.graphs import traced_graph

# Graphs whose ops follow the kernel choice: .ci/run also runs them with oneDNN on and off.
pytestmark = pytest.mark.kernels

# A small R18-D8 with both heads: strided and dilated convs, 1x1 and 3x3, wide and narrow.
SMALL = ModelConfig(backbone_depth=18, head_channels=16, aux_channels=16, num_classes=3)


def _layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer)


def _train_step_graph(model):
    def step(images):
        with tf.GradientTape() as tape:
            outputs = model(images, training=True)
            loss = tf.reduce_mean(outputs["logits"] ** 2) + tf.reduce_mean(outputs["aux_logits"] ** 2)
        return tape.gradient(loss, model.trainable_variables)

    return traced_graph(step, tf.zeros([2, 32, 32, 3]))


def _op_types(graph):
    return Counter(op_type for _, op_type in gpu_check.traced_ops(graph))


@pytest.fixture
def accelerator_visible(monkeypatch):
    monkeypatch.setattr(devices, "accelerators_visible", lambda: True)


def test_fcn_built_with_an_accelerator_visible_trains_on_tensorflows_gradients(accelerator_visible):
    model = build_fcn(SMALL, sync_bn=False)
    convs = [layer for layer in _layers(model) if isinstance(layer, Conv2D)]
    bns = [layer for layer in _layers(model) if isinstance(layer, BatchNorm)]
    assert {layer.kernels for layer in convs + bns} == {"tensorflow"}
    assert not any(layer._fast_backward() for layer in convs)
    graph = _train_step_graph(model)
    types = _op_types(graph)
    # Every kernel's gradient is TensorFlow's filter gradient, every input
    # gradient its backprop-input kernel (the image's is traced, then pruned).
    assert types["Conv2DBackpropFilter"] == len(convs)
    assert types["Conv2DBackpropInput"] == len(convs)
    assert types["FusedBatchNormGradV3"] == len(bns)
    assert gpu_check.cpu_kernel_ops(graph) == []
    assert types["ReverseV2"] == 0  # the hand-written input gradient's flipped kernel


def test_fcn_built_on_the_cpu_trains_on_the_cpu_kernels():
    model = build_fcn(SMALL, sync_bn=False)
    convs = [layer for layer in _layers(model) if isinstance(layer, Conv2D)]
    assert {layer.kernels for layer in _layers(model) if hasattr(layer, "kernels")} == {"cpu_fast"}
    fast = [layer for layer in convs if layer._fast_backward()]
    strided = [layer for layer in convs if not layer._fast_backward()]
    assert fast and strided
    graph = _train_step_graph(model)
    types = _op_types(graph)
    # Only the strided convs keep TensorFlow's input gradient.
    assert types["Conv2DBackpropInput"] == len(strided)
    assert types["ReverseV2"] == len(fast)
    assert len(gpu_check.cpu_kernel_ops(graph)) > len(fast)


def test_explicit_kernels_win_over_the_device_query(accelerator_visible):
    forced = build_fcn(dataclasses.replace(SMALL, kernels="cpu_fast"), sync_bn=False)
    assert {layer.kernels for layer in _layers(forced) if hasattr(layer, "kernels")} == {"cpu_fast"}
    assert resolve_kernels("tensorflow") == "tensorflow"
    assert Conv2D(4, 3, padding="same", kernels="tensorflow")._fast_backward() is False


def test_the_decision_is_kept_in_the_layer_config(accelerator_visible):
    layer = BatchNorm(kernels="auto")
    assert layer.get_config()["kernels"] == "tensorflow"
    # Restored where no accelerator is visible, the layer keeps what it was built with.
    restored = BatchNorm.from_config({**layer.get_config()})
    assert restored.kernels == "tensorflow"
    conv = Conv2D(4, 3, padding="same")
    assert (
        keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(conv)).kernels
        == "tensorflow"
    )


def test_the_synchronized_batch_norm_implementation_is_chosen_per_model():
    # Keras' own synchronized BatchNorm, for side-by-side comparisons, in one
    # model only: another model built in the same process keeps the packed one.
    keras_sync = build_fcn(SMALL, sync_bn=True, packed_sync=False)
    packed = build_fcn(SMALL, sync_bn=True)
    for model, want in ((keras_sync, False), (packed, True)):
        bns = [layer for layer in _layers(model) if isinstance(layer, BatchNorm)]
        assert bns and {layer.packed_sync for layer in bns} == {want}
        assert {layer.get_config()["packed_sync"] for layer in bns} == {want}
    bn = next(layer for layer in _layers(keras_sync) if isinstance(layer, BatchNorm))
    restored = BatchNorm.from_config(bn.get_config())
    assert restored.synchronized and not restored.packed_sync


def test_unknown_kernels_are_refused():
    with pytest.raises(ValueError, match="kernels='gpu'"):
        resolve_kernels("gpu")
    bad = ExperimentConfig(name="x", model=ModelConfig(kernels="gpu"))
    with pytest.raises(ConfigError, match="model.kernels='gpu'"):
        validate(bad)
