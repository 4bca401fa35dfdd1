"""The reference recipe on the replicas a run has: train steps from the epochs, the LR rule, the refusal.

An experiment keeps the reference's recipe: global batch, epochs and learning
rate. When a run starts, `for_replicas` turns it into what runs on this many
replicas:

* `trainer.train_steps` 0 is derived from `trainer.epochs` as the reference
  counts iterations, `epochs x len(dataloader)` with drop_last:
  `floor(epochs x (split size // global batch))`, the split size read from the
  prepared dataset (`fcn_tf.data.sources.num_examples`); an explicit
  `train_steps` wins.
* `optimizer.lr_scaling="linear"` multiplies `base_lr` and `min_lr` by
  `global batch / optimizer.lr_reference_batch_size` (the poly schedule keeps
  its shape); "none" (the default) keeps the reference's rates.
* a global batch the replicas (x gradient accumulation) do not divide is
  refused with the overrides that would start, numbers filled in.

The config `for_replicas` returns is what runs: its learning rates are
already scaled (its `lr_scaling` is "none", so resolving it again changes
nothing). The workdir's config.json keeps the config as given, which a
resumed run resolves again to the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from fcn_tf.config import ConfigError, ExperimentConfig, validate


def steps_per_epoch(split_size: int, global_batch: int) -> int:
    """len(dataloader) of the reference: full global batches in one pass over the split (drop_last)."""
    return split_size // global_batch


def derived_train_steps(epochs: float, split_size: int, global_batch: int) -> int:
    """`floor(epochs x (split_size // global_batch))`: the reference's iterations for `epochs` passes.

    Args:
      epochs: passes over the split (may be fractional).
      split_size: examples in the training split.
      global_batch: images per step over all replicas.
    """
    # round() first: 60 x 661 must not become 39659.999... in floating point.
    return math.floor(round(epochs * steps_per_epoch(split_size, global_batch), 6))


def lr_factor(config: ExperimentConfig) -> float:
    """The factor `optimizer.lr_scaling` applies to the learning rates (1.0 for "none")."""
    o = config.optimizer
    if o.lr_scaling == "linear":
        return config.data.global_batch_size / o.lr_reference_batch_size
    return 1.0


def _suggested_batch(global_batch: int, divisor: int) -> int:
    """The smallest multiple of `divisor` that is >= `global_batch`."""
    return math.ceil(global_batch / divisor) * divisor


def check_batch_split(config: ExperimentConfig, replicas: int) -> None:
    """Refuses a global batch that `replicas` x `trainer.grad_accum_steps` does not divide.

    Raises:
      ConfigError: one line naming the numbers and the overrides that start,
        e.g. `--override=data.global_batch_size=32 --override=optimizer.lr_scaling=linear`.
    """
    batch, accum = config.data.global_batch_size, config.trainer.grad_accum_steps
    if batch % (replicas * accum) == 0:
        return
    suggested = _suggested_batch(batch, replicas * accum)
    overrides = [f"--override=data.global_batch_size={suggested}"]
    if config.optimizer.lr_scaling == "none":
        overrides.append("--override=optimizer.lr_scaling=linear")
    fixed = _advised(config, suggested)
    lr = config.optimizer.base_lr * lr_factor(fixed)
    steps = (
        f"trainer.train_steps stays {config.trainer.train_steps}"
        if config.trainer.train_steps
        else f"train steps follow from trainer.epochs={config.trainer.epochs:g}"
    )
    raise ConfigError(
        f"data.global_batch_size={batch} is not divisible by {replicas} replica(s) x "
        f"trainer.grad_accum_steps={accum}: rerun with {' '.join(overrides)} "
        f"({steps}; learning rate {config.optimizer.base_lr:g} -> {lr:g}, scaled with the batch)"
    )


def _advised(config: ExperimentConfig, global_batch: int) -> ExperimentConfig:
    """`config` with global batch `global_batch` and, when it had none, linear LR scaling (the refusal's advice)."""
    optimizer = config.optimizer
    if optimizer.lr_scaling == "none":
        optimizer = dataclasses.replace(optimizer, lr_scaling="linear")
    data = dataclasses.replace(config.data, global_batch_size=global_batch)
    return dataclasses.replace(config, data=data, optimizer=optimizer)


def for_replicas(
    config: ExperimentConfig, replicas: int, split_size: Callable[[], int] | None = None
) -> tuple[ExperimentConfig, str]:
    """The config that runs on `replicas` replicas, and the line that says how it was derived.

    Args:
      config: the experiment as given (validated).
      replicas: `strategy.num_replicas_in_sync`.
      split_size: `() -> examples in the training split`; default
        `fcn_tf.data.sources.num_examples` of `config.data.train_split`
        (called only when `trainer.train_steps` is 0).

    Returns:
      (the resolved config, a log line: train steps and learning rate, and
      where they come from).

    Raises:
      ConfigError: the global batch does not split over the replicas (the
        message gives the overrides), or the derived train steps are 0.
    """
    check_batch_split(config, replicas)
    t, o, batch = config.trainer, config.optimizer, config.data.global_batch_size
    if t.train_steps:
        steps, steps_from = t.train_steps, "trainer.train_steps"
    else:
        if split_size is None:
            from fcn_tf.data import sources

            def split_size():
                return sources.num_examples(config.data, config.data.train_split)

        size = split_size()
        steps = derived_train_steps(t.epochs, size, batch)
        steps_from = (
            f"trainer.epochs={t.epochs:g} x ({size} examples in {config.data.train_split} // "
            f"global batch {batch} = {steps_per_epoch(size, batch)} steps per epoch)"
        )
        if steps < 1:
            raise ConfigError(
                f"{steps_from} gives 0 train steps: lower data.global_batch_size, raise trainer.epochs "
                "or set --override=trainer.train_steps=N"
            )
    factor = lr_factor(config)
    resolved = dataclasses.replace(
        config,
        trainer=dataclasses.replace(t, train_steps=steps),
        optimizer=dataclasses.replace(
            o, base_lr=o.base_lr * factor, min_lr=o.min_lr * factor, lr_scaling="none"
        ),
    )
    lr_from = (
        f"optimizer.lr_scaling=linear: {o.base_lr:g} x {batch}/{o.lr_reference_batch_size}"
        if o.lr_scaling == "linear"
        else "optimizer.lr_scaling=none"
    )
    line = (
        f"Train steps {steps} ({steps_from}); learning rate {resolved.optimizer.base_lr:g} ({lr_from}), "
        f"global batch {batch} on {replicas} replica(s)"
    )
    return validate(resolved), line
