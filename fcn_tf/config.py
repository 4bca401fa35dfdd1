"""Experiment schema: frozen dataclasses, validation and dotted overrides.

An experiment is an `ExperimentConfig`; the named ones live in
`experiments/__init__.py`. Configs are immutable: variants are made with
`dataclasses.replace` or `override(config, "trainer.train_steps=20")`, which
rejects unknown keys and values of the wrong type instead of ignoring them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any

# Normalization of the reference (ImageNet statistics, RGB, 0..255 inputs).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

DATASETS = ("voc_aug", "ade20k", "cityscapes", "synthetic", "folder")
DEPTHS = (18, 34, 50, 101, 152)
OUTPUT_STRIDES = (8, 16, 32)
STEMS = ("deep", "standard")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
COLLECTIVES = ("auto", "nccl", "ring")
LR_SCALINGS = ("none", "linear")
EVAL_MODES = ("whole", "slide")
KERNELS = ("auto", "tensorflow", "cpu_fast")


class ConfigError(ValueError):
    """A config value or an override that is not valid."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network: dilated ResNet backbone, FCN head, optional aux head.

    Attributes:
      num_classes: output classes (the ignore label is not a class).
      backbone_depth: ResNet depth; 18/34 use basic blocks, 50+ bottlenecks.
      output_stride: 8, 16 or 32; the only knob for dilation.
      stem: "deep" (ResNet-v1c: three 3x3 convs, the reference) or
        "standard" (one 7x7 conv, as torchvision and keras.applications).
      head_channels: channels of the FCN head convs.
      head_num_convs: number of conv3x3-BN-ReLU blocks in the FCN head.
      aux_head: whether to build the auxiliary head on layer3.
      aux_channels: channels of the auxiliary head conv.
      dropout: spatial dropout rate before each classifier.
      bn_momentum: BatchNorm momentum in Keras terms (PyTorch 0.1 == 0.9).
      bn_epsilon: BatchNorm epsilon.
      sync_bn: synchronize BatchNorm statistics across replicas.
      kernels: the training step's kernels: "cpu_fast" (the hand-written
        convolution gradients and the oneDNN BatchNorm choices of
        `fcn_tf.models.cpu_kernels`, tuned for CPUs), "tensorflow" (TensorFlow's
        own gradients and fused BatchNorm everywhere: cuDNN on GPUs, XLA's
        on TPUs) or "auto" ("cpu_fast" when no GPU or TPU is visible, else
        "tensorflow"; decided once, when the model is built).
      pretrained_backbone: a converted ImageNet backbone (`.weights.h5`) to
        start from; "" trains from scratch.
      pretrained_backbone_source: where the reference publishes the
        original checkpoint (shown when the file is missing).
    """

    num_classes: int = 21
    backbone_depth: int = 50
    output_stride: int = 8
    stem: str = "deep"
    head_channels: int = 512
    head_num_convs: int = 2
    aux_head: bool = True
    aux_channels: int = 512
    dropout: float = 0.1
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    sync_bn: bool = True
    kernels: str = "auto"
    pretrained_backbone: str = ""
    pretrained_backbone_source: str = ""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Dataset, splits and the reference augmentation.

    Sizes are (height, width) unless named a "target": a target
    (long, short) is matched keeping the aspect ratio, as the reference's
    `scale = min(max(target) / max(h, w), min(target) / min(h, w))`.

    Attributes:
      dataset: one of `DATASETS`; "folder" is a user's own dataset, prepared
        with `scripts/prepare_data.py --dataset=folder --name=NAME`.
      name: the prepared folder dataset's NAME (dataset "folder" only).
      class_names: the folder dataset's class names, read from the prepared
        dataset by `experiments.resolve` (empty: the built-in dataset's).
      palette: its display colours, flat R, G, B per class (empty: the
        built-in dataset's).
      data_dir: where `scripts/prepare_data.py` wrote the TFDS datasets.
      train_split: TFDS split used for training.
      eval_split: TFDS split used for evaluation.
      ignore_label: label value excluded from loss and metric.
      crop_size: (h, w) of training crops.
      scale_target: (long, short) target of the random keep-ratio resize,
        multiplied by a ratio drawn from `ratio_range`.
      ratio_range: range of the random resize ratio.
      cat_max_ratio: crop retry rule: re-draw while one class covers more
        than this share of the crop's labelled pixels.
      crop_tries: how many crops are drawn at most.
      flip_prob: horizontal flip probability.
      photometric: apply the reference photometric distortion.
      mean: per-channel normalization mean (RGB, 0..255 scale).
      std: per-channel normalization std.
      eval_target: (long, short) keep-ratio resize target at evaluation.
      global_batch_size: training images per step over all replicas.
      seed: seed of the training order (a fresh permutation of the split
        every epoch, `fcn_tf.data.order`) and of the augmentation.
      reads_in_flight: training records each input pipeline reads at once
        (a deterministic parallel map of one-record reads: the order
        and the iterator's checkpoint are those of one read at a time). On
        NFS, Lustre or GCS a record takes milliseconds to arrive: 8 GPUs need
        several reads in flight (BENCHMARKS.md "Input: reads in flight").
    """

    dataset: str = "voc_aug"
    name: str = ""
    class_names: tuple[str, ...] = ()
    palette: tuple[int, ...] = ()
    data_dir: str = "~/tensorflow_datasets"
    train_split: str = "train"
    eval_split: str = "validation"
    ignore_label: int = 255
    crop_size: tuple[int, int] = (512, 512)
    scale_target: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    crop_tries: int = 10
    flip_prob: float = 0.5
    photometric: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    eval_target: tuple[int, int] = (2048, 512)
    global_batch_size: int = 16
    seed: int = 0
    reads_in_flight: int = 16


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """SGD with PyTorch-style weight decay and the poly schedule.

    `lr = (base_lr - min_lr) * (1 - step / train_steps) ** power + min_lr`,
    after an optional linear warmup over `warmup_steps`.

    Attributes:
      lr_scaling: how the learning rates follow a global batch other than
        `lr_reference_batch_size`: "none" (the reference's rates, whatever
        the batch) or "linear" (base_lr and min_lr x global batch /
        `lr_reference_batch_size`, applied when training starts and logged;
        `fcn_tf.training.recipe`).
      lr_reference_batch_size: the global batch `base_lr` and `min_lr` were
        chosen for (the reference's: 16 for VOC and ADE20k, 8 for Cityscapes).
    """

    base_lr: float = 0.01
    min_lr: float = 1e-4
    power: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    warmup_start_factor: float = 0.1
    lr_scaling: str = "none"
    lr_reference_batch_size: int = 16


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """The training loop.

    Attributes:
      train_steps: optimizer steps (iterations) in the whole run; 0: derived
        from `epochs` when training starts, as the reference counts them:
        `floor(epochs x (train examples // data.global_batch_size))`
        (len(dataloader) with drop_last, times the epochs; rounded down for
        a fractional number of epochs), the split size read from the
        prepared dataset (`fcn_tf.data.sources.num_examples`). An explicit
        value wins over `epochs`.
      epochs: passes over the training split when `train_steps` is 0.
      aux_weight: weight of the auxiliary loss.
      precision: "float32", "mixed_bfloat16" or "mixed_float16".
      grad_accum_steps: micro-batches accumulated per optimizer step; the
        per-step global batch stays `data.global_batch_size`.
      log_every: steps between console lines and scalar summaries.
      image_summary_every: steps between image summaries (0: never).
      checkpoint_every: steps between checkpoints.
      keep_checkpoints: checkpoints kept.
      eval_every: steps between periodic evaluations (0: only at the end).
      eval_max_examples: cap on examples of the periodic evaluation (0: all).
      seed: seed of weight initialization.
      deterministic: enable TensorFlow op determinism (exact resume).
      jit_compile: compile the train step with XLA.
      tf32: let GPUs of the Ampere generation and newer run float32 matmuls
        and convolutions in TensorFloat-32 (10-bit mantissa). On by default,
        as TensorFlow and PyTorch's cuDNN convolutions have it (2-3x faster
        convolutions there); false gives exact float32. Applied when training
        starts.
      inter_op_threads: TensorFlow's inter-op pool (ops run side by side) in
        `scripts/train.py`: -1 (auto) = 1 on a machine without GPU/TPU, where
        each convolution already uses every core and running two ops at once
        mostly keeps more tensors alive (the cost of one thread in speed and its
        saving in memory are measured in BENCHMARKS.md), else TensorFlow's default;
        0 = TensorFlow's default; N > 0 = N threads.
      collective: all-reduce implementation of MultiWorkerMirroredStrategy:
        "auto" (NCCL when the replicas are GPUs, ring otherwise), "nccl" or
        "ring" (gRPC through the hosts).
      preemption_exit_code: the exit code of `scripts/train.py` after SIGTERM
        and its checkpoint: 143 (128 + SIGTERM), which Kubernetes'
        `restartPolicy: ExitCode` (Kubeflow) retries; rerunning resumes.
    """

    train_steps: int = 1000
    epochs: float = 0.0
    aux_weight: float = 0.4
    precision: str = "float32"
    grad_accum_steps: int = 1
    log_every: int = 50
    image_summary_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    eval_every: int = 0
    eval_max_examples: int = 0
    seed: int = 0
    deterministic: bool = False
    jit_compile: bool = False
    tf32: bool = True
    inter_op_threads: int = -1
    collective: str = "auto"
    preemption_exit_code: int = 143


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Inference used for evaluation.

    Attributes:
      mode: "whole" (the whole resized image) or "slide" (sliding window).
      crop_size: (h, w) of sliding windows.
      stride: (h, w) step between sliding windows.
      scales: test-time scales relative to the eval size (1.0 alone: none).
      flip: also average horizontally flipped predictions.
      window_batch: windows run at once in sliding mode (bounds memory).
    """

    mode: str = "whole"
    crop_size: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    window_batch: int = 4


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment; `name` is its key in the registry."""

    name: str
    description: str = ""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()


def _check_model(check, m: ModelConfig) -> None:
    """model.* checks (`validate`)."""
    check(m.backbone_depth in DEPTHS, f"model.backbone_depth={m.backbone_depth} not in {DEPTHS}")
    check(m.output_stride in OUTPUT_STRIDES, f"model.output_stride={m.output_stride} not in {OUTPUT_STRIDES}")
    check(m.stem in STEMS, f"model.stem={m.stem!r} not in {STEMS}")
    check(m.kernels in KERNELS, f"model.kernels={m.kernels!r} not in {KERNELS}")
    check(m.num_classes >= 2, f"model.num_classes={m.num_classes} must be >= 2")
    check(m.head_num_convs >= 0, f"model.head_num_convs={m.head_num_convs} must be >= 0")
    check(m.head_channels > 0 and m.aux_channels > 0, "model head/aux channels must be positive")
    check(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")


def _check_data(check, d: DataConfig, m: ModelConfig) -> None:
    """data.* checks (`validate`)."""
    check(d.dataset in DATASETS, f"data.dataset={d.dataset!r} not in {DATASETS}")
    check(
        not d.class_names or len(d.class_names) == m.num_classes,
        f"data.class_names has {len(d.class_names)} names for model.num_classes={m.num_classes}",
    )
    check(
        not d.palette or len(d.palette) == 3 * len(d.class_names),
        f"data.palette has {len(d.palette)} values, not R, G, B for each of the {len(d.class_names)} class names",
    )
    check(
        0 <= d.ignore_label <= 255 and d.ignore_label >= m.num_classes,
        f"data.ignore_label={d.ignore_label} must be in [model.num_classes={m.num_classes}, 255]",
    )
    for field in ("crop_size", "scale_target", "eval_target"):
        v = getattr(d, field)
        check(len(v) == 2 and all(x > 0 for x in v), f"data.{field}={v} must be two positive sizes")
    check(0 < d.ratio_range[0] <= d.ratio_range[1], f"data.ratio_range={d.ratio_range} must be 0 < lo <= hi")
    check(0.0 < d.cat_max_ratio <= 1.0, f"data.cat_max_ratio={d.cat_max_ratio} must be in (0, 1]")
    check(d.crop_tries >= 1, f"data.crop_tries={d.crop_tries} must be >= 1")
    check(0.0 <= d.flip_prob <= 1.0, f"data.flip_prob={d.flip_prob} must be in [0, 1]")
    check(
        len(d.mean) == 3 and len(d.std) == 3 and all(s > 0 for s in d.std),
        "data.mean/std need 3 values, std > 0",
    )
    check(d.reads_in_flight >= 1, f"data.reads_in_flight={d.reads_in_flight} must be >= 1")
    check(d.global_batch_size >= 1, f"data.global_batch_size={d.global_batch_size} must be >= 1")


def _check_training(check, o: OptimizerConfig, t: TrainerConfig, d: DataConfig) -> None:
    """optimizer.* and trainer.* checks (`validate`)."""
    check(
        o.base_lr > 0 and 0 <= o.min_lr <= o.base_lr,
        "optimizer lr: need 0 <= min_lr <= base_lr, base_lr > 0",
    )
    check(0 <= o.momentum < 1 and o.weight_decay >= 0, "optimizer momentum in [0,1), weight_decay >= 0")
    check(o.lr_scaling in LR_SCALINGS, f"optimizer.lr_scaling={o.lr_scaling!r} not in {LR_SCALINGS}")
    check(
        o.lr_reference_batch_size >= 1,
        f"optimizer.lr_reference_batch_size={o.lr_reference_batch_size} must be >= 1",
    )
    # train_steps 0 is derived from the epochs when training starts (warmup checked then).
    check(
        0 <= o.warmup_steps < max(t.train_steps, 1) or t.train_steps == 0,
        f"optimizer.warmup_steps={o.warmup_steps} must be < train_steps",
    )
    check(
        t.train_steps >= 1 or (t.train_steps == 0 and t.epochs > 0),
        f"trainer.train_steps={t.train_steps} must be >= 1, or 0 with trainer.epochs > 0 "
        f"(got trainer.epochs={t.epochs})",
    )
    check(t.epochs >= 0, f"trainer.epochs={t.epochs} must be >= 0")
    check(t.precision in PRECISIONS, f"trainer.precision={t.precision!r} not in {PRECISIONS}")
    check(t.grad_accum_steps >= 1, f"trainer.grad_accum_steps={t.grad_accum_steps} must be >= 1")
    check(
        d.global_batch_size % t.grad_accum_steps == 0,
        f"data.global_batch_size={d.global_batch_size} not divisible by trainer.grad_accum_steps={t.grad_accum_steps}",
    )
    check(
        t.log_every >= 1 and t.checkpoint_every >= 1 and t.keep_checkpoints >= 1,
        "trainer log_every, checkpoint_every, keep_checkpoints must be >= 1",
    )
    check(t.aux_weight >= 0, f"trainer.aux_weight={t.aux_weight} must be >= 0")
    check(
        1 <= t.preemption_exit_code <= 255,
        f"trainer.preemption_exit_code={t.preemption_exit_code} must be in 1..255",
    )
    check(t.collective in COLLECTIVES, f"trainer.collective={t.collective!r} not in {COLLECTIVES}")
    check(isinstance(t.tf32, bool), f"trainer.tf32={t.tf32!r} must be true or false")
    check(t.inter_op_threads >= -1, f"trainer.inter_op_threads={t.inter_op_threads} must be >= -1 (-1: auto)")


def _check_eval(check, e: EvalConfig) -> None:
    """eval.* checks (`validate`)."""
    check(e.mode in EVAL_MODES, f"eval.mode={e.mode!r} not in {EVAL_MODES}")
    check(len(e.scales) >= 1 and all(s > 0 for s in e.scales), f"eval.scales={e.scales} must be positive")
    check(
        all(0 < s <= c for s, c in zip(e.stride, e.crop_size)),
        f"eval.stride={e.stride} must be in (0, crop_size]",
    )
    check(e.window_batch >= 1, f"eval.window_batch={e.window_batch} must be >= 1")


def validate(config: ExperimentConfig) -> ExperimentConfig:
    """Checks cross-field consistency; returns the config or raises ConfigError."""
    m, d, o, t, e = config.model, config.data, config.optimizer, config.trainer, config.eval
    problems = []

    def check(ok, message):
        if not ok:
            problems.append(message)

    _check_model(check, m)
    _check_data(check, d, m)
    _check_training(check, o, t, d)
    _check_eval(check, e)
    if problems:
        raise ConfigError(f"invalid experiment {config.name!r}:\n  " + "\n  ".join(problems))
    return config


def _leaf_keys(config, prefix=""):
    keys = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys += _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _parse(text: str, hint, key: str):
    """Parses `text` as a value of the annotated type `hint`."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse(p, args[0], key) for p in parts)
        if len(parts) != len(args):
            raise ConfigError(f"{key} needs {len(args)} comma-separated values, got {text!r}")
        return tuple(_parse(p, a, key) for p, a in zip(parts, args))
    text = text.strip()
    try:
        if hint is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{key}: cannot read {text!r} as {hint.__name__}") from None
    return text


def override(config: ExperimentConfig, *assignments: str) -> ExperimentConfig:
    """Returns `config` with dotted `key=value` assignments applied.

    Args:
      config: the experiment to change.
      *assignments: strings like "trainer.train_steps=20" or
        "data.crop_size=256,256".

    Raises:
      ConfigError: on a malformed assignment, an unknown key (the message
        lists the valid keys) or a value that does not parse.
    """
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"override {assignment!r} is not of the form key=value")
        path = key.split(".")
        node, parents = config, []
        for name in path[:-1]:
            child = getattr(node, name, None) if dataclasses.is_dataclass(node) else None
            if not dataclasses.is_dataclass(child):
                node = None
                break
            parents.append((node, name))
            node = child
        fields = {f.name: f for f in dataclasses.fields(node)} if node is not None else {}
        if path[-1] not in fields or dataclasses.is_dataclass(getattr(node, path[-1])):
            valid = ", ".join(_leaf_keys(config))
            raise ConfigError(f"unknown config key {key!r}; valid keys: {valid}")
        hints = typing.get_type_hints(type(node))
        value = _parse(text, hints[path[-1]], key)
        new = dataclasses.replace(node, **{path[-1]: value})
        for parent, name in reversed(parents):
            new = dataclasses.replace(parent, **{name: new})
        config = new
    return config


def to_dict(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_json(config: ExperimentConfig) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=False)


# Training writes the resolved config here in its workdir; evaluation, export
# and predict read it back so they rebuild the model the run trained.
WORKDIR_CONFIG = "config.json"


def read_workdir_config(workdir: str | None) -> ExperimentConfig | None:
    """The config a training run wrote to `WORKDIR/config.json`, or None if there is none.

    Raises:
      ConfigError: the file is not valid JSON or holds keys this version of
        fcn_tf does not know (the message names the file and the keys).
    """
    if not workdir:
        return None
    # Read through TensorFlow's filesystem layer: the workdir may be a URL (gs://, file://, ...).
    # Imported here: the schema itself stays importable without TensorFlow.
    import tensorflow as tf

    path = os.path.join(workdir if "://" in workdir else os.path.expanduser(workdir), WORKDIR_CONFIG)
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as f:
            values = json.loads(f.read())
        return from_dict(values)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def from_dict(values: dict[str, Any]) -> ExperimentConfig:
    """Rebuilds a config written by `to_json` (lists become tuples).

    Strict: a key the schema does not have is an error, not silently
    dropped, so a config written by another version of fcn_tf (or edited by
    hand with a typo) is never half-read. Keys the dict leaves out take
    their defaults.

    Args:
      values: a dict of the shape `to_dict` returns.

    Raises:
      ConfigError: unknown keys (all of them, dotted) or a missing `name`.
    """
    unknown = []

    def build(cls, vals, prefix):
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown.extend(f"{prefix}{key}" for key in vals if key not in fields)
        kwargs = {}
        for name in fields & set(vals):
            v, hint = vals[name], hints[name]
            if dataclasses.is_dataclass(hint):
                v = build(hint, v, f"{prefix}{name}.")
            elif isinstance(v, list):
                v = tuple(v)
            kwargs[name] = v
        return None if unknown else cls(**kwargs)

    if "name" not in values:
        raise ConfigError("the config has no 'name'")
    config = build(ExperimentConfig, values, "")
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(sorted(unknown))} (written by another version of fcn_tf?); "
            f"valid keys: {', '.join(_leaf_keys(ExperimentConfig(name='')))}"
        )
    return config
