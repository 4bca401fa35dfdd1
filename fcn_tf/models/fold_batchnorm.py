"""BatchNorm folded into the convolution before it: an inference-only model transform.

In inference BatchNorm is `gamma * (y - mean) / sqrt(var + eps) + beta`, an
affine map per channel, so with `s = gamma / sqrt(var + eps)` the conv
`y = W x + b` followed by it equals the conv `W' = W * s`,
`b' = (b - mean) * s + beta`.

The conv -> BatchNorm pairs are read from the functional graph as
`Model.get_config()` describes it (each layer's `inbound_nodes`), the copy is
made with `keras.models.clone_model`, and the weights are set with
`get_weights` / `set_weights`: public Keras APIs only.
"""

from __future__ import annotations

from collections.abc import Iterator

import keras
import numpy as np


def all_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer of `model`, nested models' layers included (depth first).

    Args:
      model: a Keras model.
    """
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def _histories(node) -> Iterator[str]:
    """Names of the layers whose outputs a serialized call (inbound node) consumes."""
    if isinstance(node, dict):
        history = (
            node.get("config", {}).get("keras_history")
            if node.get("class_name") == "__keras_tensor__"
            else None
        )
        if history is not None:
            yield history[0]
            return
        for value in node.values():
            yield from _histories(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _histories(value)


def _model_pairs(model: keras.Model) -> dict:
    """{conv name: BatchNormalization layer} within one functional model (not its nested ones)."""
    config = model.get_config()
    if "layers" not in config:  # not a functional model: nothing to read the graph from
        return {}
    layers = {layer.name: layer for layer in model.layers}
    calls, inputs, uses = {}, {}, {}
    for entry in config["layers"]:
        name = entry["name"]
        calls[name] = len(entry["inbound_nodes"])
        inputs[name] = list(_histories(entry["inbound_nodes"]))
        for producer in inputs[name]:
            uses[producer] = uses.get(producer, 0) + 1
    # A conv whose output is also a model output must keep its own output.
    for producer in _histories(config.get("output_layers", [])):
        uses[producer] = uses.get(producer, 0) + 1
    pairs = {}
    for name, layer in layers.items():
        if (
            not isinstance(layer, keras.layers.BatchNormalization)
            or calls[name] != 1
            or len(inputs[name]) != 1
        ):
            continue
        producer = inputs[name][0]
        conv = layers.get(producer)
        if isinstance(conv, keras.layers.Conv2D) and calls[producer] == 1 and uses[producer] == 1:
            pairs[producer] = layer
    return pairs


def conv_bn_pairs(model: keras.Model) -> dict:
    """{conv layer name: BatchNormalization layer} for each BatchNorm applied only to a Conv2D's output.

    Args:
      model: a functional model; nested functional models are searched too.
    """
    pairs = _model_pairs(model)
    for layer in all_layers(model):
        if isinstance(layer, keras.Model):
            pairs.update(_model_pairs(layer))
    return pairs


class _Folded(keras.layers.Layer):
    """Stands where a folded BatchNorm was; takes the BatchNorm's call arguments."""

    def call(self, inputs, training=None, mask=None):
        return inputs


def fold_batchnorm(model: keras.Model) -> keras.Model:
    """A copy of `model` with each BatchNorm folded into the convolution before it.

    The copy replaces those BatchNorm layers by identities; it is for
    inference only (do not train it). Logits change only by float rounding.

    Args:
      model: a functional model (nested functional models are folded too).

    Returns:
      The folded model; `model` is left unchanged.
    """
    pairs = conv_bn_pairs(model)
    folded_bns = {bn.name for bn in pairs.values()}

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization) and layer.name in folded_bns:
            return _Folded(name=layer.name)
        if isinstance(layer, keras.layers.Conv2D) and layer.name in pairs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    folded = keras.models.clone_model(model, clone_function=clone, recursive=True)
    originals = {layer.name: layer for layer in all_layers(model)}
    for layer in all_layers(folded):
        if isinstance(layer, keras.Model) or not layer.weights:
            continue
        source = originals[layer.name]
        if layer.name not in pairs:
            layer.set_weights(source.get_weights())
            continue
        bn = pairs[layer.name]
        # float64 so that folding adds no rounding of its own.
        kernel = np.asarray(source.kernel, np.float64)
        bias = np.asarray(source.bias, np.float64) if source.use_bias else 0.0
        gamma = np.asarray(bn.gamma, np.float64) if bn.scale else 1.0
        beta = np.asarray(bn.beta, np.float64) if bn.center else 0.0
        mean = np.asarray(bn.moving_mean, np.float64)
        scale = gamma / np.sqrt(np.asarray(bn.moving_variance, np.float64) + bn.epsilon)
        layer.set_weights(
            [(kernel * scale).astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)]
        )
    return folded
