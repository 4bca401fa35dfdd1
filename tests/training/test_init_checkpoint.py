"""Fine-tuning from another model: matching weights loaded, other class counts re-initialized, said in
the log; an interrupted fine-tuning run resumes from its own checkpoint, not from the init checkpoint."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf

from fcn_tf import training
from fcn_tf.config import ExperimentConfig, ModelConfig, OptimizerConfig, TrainerConfig, override
from fcn_tf.models import build_fcn
from harness import tiny

CLASSIFIERS = {
    "head_classifier/kernel",
    "head_classifier/bias",
    "aux_classifier/kernel",
    "aux_classifier/bias",
}


def _config(num_classes: int, steps: int) -> ExperimentConfig:
    config = ExperimentConfig(
        name="tiny_fcn",
        model=ModelConfig(num_classes=num_classes, backbone_depth=18, head_channels=16, aux_channels=8),
        optimizer=OptimizerConfig(base_lr=0.01),
        trainer=TrainerConfig(train_steps=steps, log_every=1, checkpoint_every=1, image_summary_every=0),
    )
    return override(config, "data.global_batch_size=2")


def _train(workdir, config, **kwargs):
    return training.train(
        config,
        str(workdir),
        tf.distribute.get_strategy(),
        dataset_fn=tiny.dataset_fn(global_batch=2, hw=16),
        evaluate=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A 5-class run's workdir (config.json and checkpoints/ckpt-1, as training writes them) and its model."""
    workdir = tmp_path_factory.mktemp("source")
    config = _config(5, 1)
    model = build_fcn(config.model, sync_bn=False)
    training.write_config(config, str(workdir))
    tf.train.Checkpoint(model=model).save(str(workdir / "checkpoints" / "ckpt"))
    return workdir, model


def _check_report(report, model, source, fresh):
    assert set(name for name, _ in report.reinitialized) == CLASSIFIERS
    reasons = dict(report.reinitialized)
    assert reasons["head_classifier/kernel"] == "shape (1, 1, 16, 5) in the checkpoint, (1, 1, 16, 3) here"
    assert reasons["aux_classifier/bias"] == "shape (5,) in the checkpoint, (3,) here"
    expected = {w.path for w in model.weights} - CLASSIFIERS
    assert set(report.loaded) == expected
    assert {
        "stem_conv1/kernel",
        "layer4_block1_conv2/kernel",
        "head_conv1/kernel",
        "head_bn2/moving_mean",
    } <= (set(report.loaded))
    assert report.num_classes == 5 and report.unused == ()
    values = {w.path: w.numpy() for w in source.weights}
    for w in model.weights:
        if w.path in CLASSIFIERS:
            np.testing.assert_array_equal(w.numpy(), fresh[w.path])  # left at its initialization
        else:
            np.testing.assert_array_equal(w.numpy(), values[w.path])


def test_workdir_checkpoint_loads_backbone_and_heads_and_reinitializes_classifiers(source_run):
    workdir, source = source_run
    model = build_fcn(_config(3, 1).model)
    fresh = {w.path: w.numpy() for w in model.weights}
    report = training.initialize(model, str(workdir), _config(3, 1).model)
    _check_report(report, model, source, fresh)
    lines = report.lines()
    assert lines[0].startswith(f"Initialized from {workdir}/checkpoints/ckpt-1 (5 classes): loaded ")
    assert "stem_conv1, stem_bn1" in lines[0] and "head_conv1" in lines[0]
    assert lines[1].startswith("Re-initialized 4 weights: ") and "head_classifier/kernel (shape" in lines[1]


def test_converted_weights_file_gives_its_class_count(source_run, tmp_path):
    # A converted reference model is a .weights.h5 of build_fcn with the reference's classes.
    _, source = source_run
    path = str(tmp_path / "reference.weights.h5")
    source.save_weights(path)
    model = build_fcn(_config(3, 1).model)
    fresh = {w.path: w.numpy() for w in model.weights}
    report = training.initialize(model, path, _config(3, 1).model)
    _check_report(report, model, source, fresh)


def test_not_an_fcn_is_one_line(tmp_path):
    path = str(tmp_path / "other.weights.h5")
    tiny.tiny_segmenter(num_classes=5).save_weights(path)
    model = build_fcn(_config(3, 1).model)
    with pytest.raises(training.InitCheckpointError, match="does not hold an FCN of backbone depth 18"):
        training.initialize(model, path, _config(3, 1).model)
    damaged = tmp_path / "damaged.weights.h5"
    damaged.write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(training.InitCheckpointError, match="damaged.weights.h5: not a readable weights file"):
        training.initialize(model, str(damaged), _config(3, 1).model)


@pytest.mark.slow
def test_fine_tuning_logs_what_it_loaded_and_resumes_from_its_own_checkpoint(tmp_path, caplog):
    source = tmp_path / "source"
    _train(source, _config(5, 1))  # a real 5-class run
    caplog.set_level(logging.INFO)
    # Also absl's own logger: a test run earlier in the process may have parsed absl flags (WARNING).
    caplog.set_level(logging.INFO, logger="absl")
    run = tmp_path / "finetune"
    first = _train(run, _config(3, 2), init_checkpoint=str(source))
    log = caplog.text
    assert first["step"] == 2
    assert f"Initialized from {source}/checkpoints/ckpt-1 (5 classes)" in log
    assert "Re-initialized 4 weights: " in log and "aux_classifier/kernel (shape (1, 1, 8, 5)" in log
    caplog.clear()
    # The interrupted run is rerun with the same command: it resumes, it does not re-initialize.
    second = _train(run, _config(3, 4), init_checkpoint=str(source))
    assert second["step"] == 4
    assert f"Resumed from {run}/checkpoints/ckpt-2 (step 2)" in caplog.text
    assert "Initialized from" not in caplog.text
