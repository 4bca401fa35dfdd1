"""Import PyTorch checkpoints of the reference: sssegmentation FCN models and
OpenMMLab ImageNet ResNet-v1c backbones.

The mapping is derived from our deterministic layer names, so there is no
hand-written table to drift:

    stem_conv1 / stem_bn1 ...        <- stem.0 / stem.1, stem.3 / stem.4, stem.6 / stem.7
    (standard 7x7 stem)              <- conv1 / bn1
    layer3_block2_conv1 / _bn1       <- layer3.2.conv1 / layer3.2.bn1
    layer3_block0_downsample_conv/bn <- layer3.0.downsample.0 / .1
    head_conv{i} / head_bn{i}        <- decoder.{3(i-1)} / decoder.{3(i-1)+1}
    head_classifier                  <- decoder.{3 * num_convs + 1}
    aux_conv1 / aux_bn1 / aux_classifier <- auxiliary_decoder.0 / .1 / .4

Backbone keys carry the prefix `backbone_net.` in FCN checkpoints and none in
ImageNet checkpoints. Conversion is strict: every source tensor is consumed
(only `num_batches_tracked` and, for ImageNet checkpoints, the `fc.*`
classifier are skipped, and said so), every Keras weight is assigned, and on
any missing, unexpected or mis-shaped key nothing is written.
"""

from __future__ import annotations

import io
import os
import re
import tempfile

import keras
import numpy as np
import tensorflow as tf

from fcn_tf import storage

FCN_BACKBONE_PREFIX = "backbone_net."
# Tensors that carry no weights we need.
_SKIPPED_SUFFIXES = ("num_batches_tracked",)
_IMAGENET_CLASSIFIER = ("fc.weight", "fc.bias")


class ConversionError(ValueError):
    """The checkpoint does not match the model; the message lists every mismatch."""


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a checkpoint file into `{key: float32/int64 numpy array}`.

    Accepts PyTorch `.pth`/`.pt` (needs the `torch` extra), `.npz` and
    `.safetensors`; a `{"model": ...}` or `{"state_dict": ...}` wrapper is
    unwrapped, and a `module.` prefix (DataParallel) is removed.

    Raises:
      FileNotFoundError: the file does not exist.
      ConversionError: unknown format or not a state dict.
    """
    if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    # Read through TensorFlow's filesystem layer (the path may be a URL), parsed from memory.
    with tf.io.gfile.GFile(path, "rb") as f:
        raw = f.read()
    if ext in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError as e:
            raise ConversionError(f"reading {path} needs PyTorch: pip install '.[torch]'") from e
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        obj = _unwrap(obj, path)
        return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}
    if ext == ".npz":
        with np.load(io.BytesIO(raw), allow_pickle=False) as data:
            return _unwrap({k: data[k] for k in data.files}, path)
    if ext == ".safetensors":
        try:
            from safetensors.numpy import load
        except ImportError as e:
            raise ConversionError(f"reading {path} needs safetensors: pip install '.[safetensors]'") from e
        return _unwrap(load(raw), path)
    raise ConversionError(f"unknown checkpoint format {ext!r} for {path}; use .pth, .npz or .safetensors")


def _unwrap(obj, path):
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{path} does not hold a state dict")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def _backbone_prefix(layer_name: str, stem: str) -> str:
    """Maps a backbone layer name to the reference module path."""
    m = re.fullmatch(r"stem_(conv|bn)(\d)", layer_name)
    if m:
        kind, i = m.group(1), int(m.group(2))
        if stem == "standard":
            return f"{kind}1"
        return f"stem.{3 * (i - 1) + (0 if kind == 'conv' else 1)}"
    m = re.fullmatch(r"layer(\d)_block(\d+)_downsample_(conv|bn)", layer_name)
    if m:
        return f"layer{m.group(1)}.{m.group(2)}.downsample.{0 if m.group(3) == 'conv' else 1}"
    m = re.fullmatch(r"layer(\d)_block(\d+)_(conv|bn)(\d)", layer_name)
    if m:
        return f"layer{m.group(1)}.{m.group(2)}.{m.group(3)}{m.group(4)}"
    raise ConversionError(f"no reference name for backbone layer {layer_name!r}")


def _head_prefix(layer_name: str, head_num_convs: int) -> str:
    m = re.fullmatch(r"(head|aux)_(conv|bn|classifier)(\d*)", layer_name)
    if not m:
        raise ConversionError(f"no reference name for head layer {layer_name!r}")
    which, kind = m.group(1), m.group(2)
    module = "decoder" if which == "head" else "auxiliary_decoder"
    num_convs = head_num_convs if which == "head" else 1
    if kind == "classifier":
        # Sequential: [conv, bn, relu] x num_convs, dropout, classifier.
        return f"{module}.{3 * num_convs + 1}"
    i = int(m.group(3))
    return f"{module}.{3 * (i - 1) + (0 if kind == 'conv' else 1)}"


def _layer_targets(layer, prefix):
    """(source key, Keras variable, transform) for each weight of `layer`."""
    if isinstance(layer, keras.layers.Conv2D):
        targets = [(f"{prefix}.weight", layer.kernel, lambda a: np.transpose(a, (2, 3, 1, 0)))]
        if layer.use_bias:
            targets.append((f"{prefix}.bias", layer.bias, None))
        return targets
    if isinstance(layer, keras.layers.BatchNormalization):
        return [
            (f"{prefix}.weight", layer.gamma, None),
            (f"{prefix}.bias", layer.beta, None),
            (f"{prefix}.running_mean", layer.moving_mean, None),
            (f"{prefix}.running_var", layer.moving_variance, None),
        ]
    if layer.weights:
        raise ConversionError(
            f"layer {layer.name!r} ({type(layer).__name__}) has weights the converter does not know"
        )
    return []


def backbone_targets(backbone: keras.Model, stem: str, key_prefix: str = ""):
    targets = []
    for layer in backbone.layers:
        if layer.weights:
            targets += _layer_targets(layer, key_prefix + _backbone_prefix(layer.name, stem))
    return targets


def fcn_targets(model: keras.Model, stem: str, head_num_convs: int):
    """All (source key, variable, transform) triples of an FCN model."""
    targets = backbone_targets(model.get_layer("backbone"), stem, FCN_BACKBONE_PREFIX)
    for layer in model.layers:
        if layer.name != "backbone" and layer.weights:
            targets += _layer_targets(layer, _head_prefix(layer.name, head_num_convs))
    return targets


def assign(targets, state_dict: dict[str, np.ndarray], skip: tuple[str, ...] = ()) -> list[str]:
    """Strictly assigns `state_dict` to the targets.

    Returns:
      The source keys that were skipped on purpose.

    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped key;
        no variable is changed in that case.
    """
    skipped = sorted(k for k in state_dict if k.endswith(_SKIPPED_SUFFIXES) or k in skip)
    wanted = {key for key, _, _ in targets}
    missing = sorted(wanted - set(state_dict))
    unexpected = sorted(set(state_dict) - wanted - set(skipped))
    values, mismatched = [], []
    for key, variable, transform in targets:
        if key not in state_dict:
            continue
        value = np.asarray(state_dict[key])
        value = transform(value) if transform is not None else value
        if tuple(value.shape) != tuple(variable.shape):
            mismatched.append(
                f"{key}: checkpoint {tuple(state_dict[key].shape)} -> {tuple(value.shape)}, "
                f"model {variable.path} expects {tuple(variable.shape)}"
            )
        values.append((variable, value))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}):\n    " + "\n    ".join(mismatched))
    if problems:
        raise ConversionError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    for variable, value in values:
        variable.assign(value.astype(variable.dtype))
    return skipped


def is_fcn_checkpoint(state_dict) -> bool:
    return any(k.startswith(FCN_BACKBONE_PREFIX) for k in state_dict)


def convert_fcn(model: keras.Model, state_dict, model_config) -> list[str]:
    """Loads an sssegmentation FCN state dict into a `build_fcn` model."""
    return assign(fcn_targets(model, model_config.stem, model_config.head_num_convs), state_dict)


def convert_backbone(backbone: keras.Model, state_dict, model_config) -> list[str]:
    """Loads an ImageNet ResNet-v1c state dict into a `build_resnet` model (fc.* skipped)."""
    return assign(backbone_targets(backbone, model_config.stem), state_dict, skip=_IMAGENET_CLASSIFIER)


def save_weights_atomically(model: keras.Model, output: str) -> None:
    """Writes `output` (a `.weights.h5`, local or URL) so that a failure leaves nothing half-written.

    The file is written in a local scratch folder, copied beside `output` and
    renamed over it (through `tf.io.gfile`).
    """
    if not output.endswith(".weights.h5"):
        raise ValueError(f"output must end with .weights.h5: {output}")
    directory = os.path.dirname(output)
    if directory:
        tf.io.gfile.makedirs(directory)
    staged = f"{output}.tmp"
    with tempfile.TemporaryDirectory() as scratch:  # a local folder of our own, not a user path
        local = os.path.join(scratch, "model.weights.h5")
        model.save_weights(local, overwrite=True)
        try:
            tf.io.gfile.copy(local, staged, overwrite=True)
            tf.io.gfile.rename(staged, output, overwrite=True)
        finally:
            if tf.io.gfile.exists(staged):
                tf.io.gfile.remove(staged)


def convert_checkpoint(model_config, input_path: str, output_path: str, kind: str = "auto") -> dict:
    """Converts a reference checkpoint file to a Keras `.weights.h5`.

    Args:
      model_config: the experiment's ModelConfig (classes, depth, stride, stem).
      input_path: `.pth`, `.npz` or `.safetensors` checkpoint.
      output_path: where to write the `.weights.h5`: for an FCN checkpoint the
        weights of `build_fcn(model_config)`, for a backbone checkpoint those of
        the backbone (what `load_pretrained_backbone` reads).
      kind: "fcn", "backbone" or "auto" (FCN when keys start with `backbone_net.`).

    Returns:
      A summary dict: kind, number of tensors converted, skipped keys.
    """
    from fcn_tf.models.layers import LayerSettings
    from fcn_tf.models.resnet import build_resnet
    from fcn_tf.models.segmenter import build_fcn

    state_dict = load_state_dict(input_path)
    if kind == "auto":
        kind = "fcn" if is_fcn_checkpoint(state_dict) else "backbone"
    if kind == "fcn":
        model = build_fcn(model_config, sync_bn=False)
        skipped = convert_fcn(model, state_dict, model_config)
    elif kind == "backbone":
        settings = LayerSettings(model_config.bn_momentum, model_config.bn_epsilon)
        model = build_resnet(
            model_config.backbone_depth, model_config.output_stride, model_config.stem, settings
        )
        skipped = convert_backbone(model, state_dict, model_config)
    else:
        raise ValueError(f"kind must be 'fcn', 'backbone' or 'auto', not {kind!r}")
    save_weights_atomically(model, output_path)
    return {"kind": kind, "converted": len(state_dict) - len(skipped), "skipped": skipped}


def load_pretrained_backbone(model: keras.Model, path: str, source: str = "") -> None:
    """Loads a converted ImageNet backbone (`.weights.h5`) into an FCN model's backbone.

    Args:
      model: a `build_fcn` model.
      path: the file written by `scripts/convert_checkpoint.py` from a
        ResNet-v1c checkpoint.
      source: where the original checkpoint is published (for the error).

    Raises:
      FileNotFoundError: naming the expected file, where to get the original
        and how to train from scratch instead.
    """
    path = storage.normalize(path)
    if not tf.io.gfile.exists(path):
        hint = f" Download the original from {source} and convert it:" if source else " Convert it:"
        raise FileNotFoundError(
            f"pretrained backbone not found: {path}.{hint} python scripts/convert_checkpoint.py "
            f"--experiment=NAME --input=resnet_v1c.pth --output={path} . To train from scratch on purpose, "
            "pass --from_scratch (or --override=model.pretrained_backbone=)."
        )
    model.get_layer("backbone").load_weights(path)
