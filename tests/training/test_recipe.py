"""The reference recipe on any number of replicas: derived train steps, the LR rule, the refusal's overrides."""

import pytest

import experiments
from fcn_tf.config import ConfigError, override, validate
from fcn_tf.training import recipe

VOC_TRAIN = 10582


def _voc(*overrides):
    return override(experiments.get("voc_r50_os8"), *overrides)


def test_train_steps_follow_the_epochs_as_the_reference_counts_them():
    # 60 epochs x len(dataloader) with drop_last (10582 // 16 = 661): 39660, sssegmentation's iterations.
    resolved, line = recipe.for_replicas(_voc(), 8, split_size=lambda: VOC_TRAIN)
    assert resolved.trainer.train_steps == 39660
    assert "Train steps 39660 (trainer.epochs=60 x (10582 examples in train // global batch 16" in line
    # Another global batch: the steps follow it; the reference LR stays (lr_scaling none).
    resolved, line = recipe.for_replicas(_voc("data.global_batch_size=32"), 32, split_size=lambda: VOC_TRAIN)
    assert resolved.trainer.train_steps == 60 * (VOC_TRAIN // 32) == 19800
    assert resolved.optimizer.base_lr == 0.01 and "learning rate 0.01 (optimizer.lr_scaling=none)" in line
    # Fractional epochs round down.
    resolved, _ = recipe.for_replicas(_voc("trainer.epochs=0.5"), 1, split_size=lambda: VOC_TRAIN)
    assert resolved.trainer.train_steps == 330


def test_an_explicit_train_steps_wins_and_the_split_is_not_read():
    def unread():
        raise AssertionError("the split size was read")

    resolved, line = recipe.for_replicas(_voc("trainer.train_steps=7"), 4, split_size=unread)
    assert resolved.trainer.train_steps == 7 and "Train steps 7 (trainer.train_steps)" in line


def test_linear_scaling_scales_both_rates_once():
    config = _voc("data.global_batch_size=32", "optimizer.lr_scaling=linear")
    resolved, line = recipe.for_replicas(config, 32, split_size=lambda: VOC_TRAIN)
    o = resolved.optimizer
    assert o.base_lr == pytest.approx(0.02) and o.min_lr == pytest.approx(2e-4)
    assert "learning rate 0.02 (optimizer.lr_scaling=linear: 0.01 x 32/16)" in line
    # What runs is already scaled: resolving it again changes nothing.
    again, _ = recipe.for_replicas(resolved, 32)
    assert again == resolved


def test_a_batch_the_replicas_do_not_split_is_refused_with_the_overrides_filled_in():
    with pytest.raises(ConfigError) as refused:
        recipe.for_replicas(_voc(), 32, split_size=lambda: VOC_TRAIN)
    message = str(refused.value)
    assert "\n" not in message
    assert (
        "data.global_batch_size=16 is not divisible by 32 replica(s) x trainer.grad_accum_steps=1: rerun with "
        "--override=data.global_batch_size=32 --override=optimizer.lr_scaling=linear" in message
    )
    assert "learning rate 0.01 -> 0.02" in message
    # With accumulation the batch must split over replicas x micro-batches.
    with pytest.raises(ConfigError, match=r"--override=data.global_batch_size=24 \("):
        recipe.for_replicas(_voc("trainer.grad_accum_steps=2", "optimizer.lr_scaling=linear"), 12)


def test_zero_derived_steps_are_refused():
    with pytest.raises(ConfigError, match="gives 0 train steps"):
        recipe.for_replicas(_voc(), 2, split_size=lambda: 10)


def test_train_steps_zero_needs_epochs():
    with pytest.raises(ConfigError, match="trainer.train_steps=0 must be >= 1, or 0 with trainer.epochs > 0"):
        validate(_voc("trainer.epochs=0"))
    with pytest.raises(ConfigError, match="lr_scaling='square' not in"):
        validate(_voc("optimizer.lr_scaling=square"))
