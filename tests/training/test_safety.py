"""Safety of the training loop: non-finite loss, a locked workdir, a missing pretrained backbone, CLI errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from fcn_tf import training
from fcn_tf.config import ExperimentConfig, ModelConfig, OptimizerConfig, TrainerConfig
from harness import runs, tiny


def _config(**trainer):
    values = dict(train_steps=8, log_every=1, checkpoint_every=2, image_summary_every=0)
    values.update(trainer)
    return ExperimentConfig(
        name="tiny",
        model=ModelConfig(num_classes=3),
        optimizer=OptimizerConfig(base_lr=0.01),
        trainer=TrainerConfig(**values),
    )


def _train(workdir, config=None, dataset_fn=None, **kwargs):
    from fcn_tf.config import override

    config = config or _config()
    config = override(config, "data.global_batch_size=4")
    return training.train(
        config,
        str(workdir),
        tf.distribute.get_strategy(),
        model_fn=lambda c: tiny.tiny_segmenter(),
        dataset_fn=dataset_fn or tiny.dataset_fn(),
        evaluate=False,
        **kwargs,
    )


def _poisoned_dataset_fn(good_steps: int, batch: int = 4):
    """Finite images for `good_steps` steps, then NaN images (the loss becomes NaN)."""
    images, labels = tiny.batch(0, 8 * batch)
    images[good_steps * batch :] = np.nan

    def make(ctx=None):
        return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch, drop_remainder=True).repeat()

    return make


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(training.NonFiniteLossError) as info:
        _train(tmp_path, dataset_fn=_poisoned_dataset_fn(good_steps=3))
    message = str(info.value)
    assert "non-finite loss nan at step 4" in message
    assert "ckpt-2" in message and str(tmp_path) in message
    # Nothing was saved after the last good checkpoint (step 2; step 4 is the bad one).
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-2")
    assert not any(name.startswith("ckpt-4") for name in os.listdir(tmp_path / "checkpoints"))
    variables = runs.checkpoint_variables(str(tmp_path / "checkpoints" / "ckpt-2"))
    assert all(np.all(np.isfinite(v)) for v in variables.values() if v.dtype.kind == "f")
    # The lock was released: the workdir can be used again (and resumes from the good checkpoint).
    result = _train(tmp_path, config=_config(train_steps=3), dataset_fn=_poisoned_dataset_fn(good_steps=3))
    assert result["step"] == 3 and np.isfinite(result["loss"])


def test_second_run_on_same_workdir_refuses(tmp_path):
    # Another process holds the workdir lock, the way a running train.py does.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(tmp_path / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "os.pwrite(fd, str(os.getpid()).encode(), 0)\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(training.WorkdirLockedError) as info:
            _train(tmp_path)
        assert str(tmp_path) in str(info.value) and f"pid {holder.pid}" in str(info.value)
        # The refused run wrote nothing.
        assert not os.path.exists(tmp_path / "config.json")
        assert not os.path.exists(tmp_path / "checkpoints")
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone (even killed), the lock is free again.
    assert _train(tmp_path, config=_config(train_steps=1))["step"] == 1


def test_lock_in_the_same_process_also_refuses(tmp_path):
    with training.workdir_lock(str(tmp_path)):
        with pytest.raises(training.WorkdirLockedError, match=f"pid {os.getpid()}"):
            _train(tmp_path)


def test_config_json_written_before_training(tmp_path):
    from fcn_tf.config import from_dict

    _train(tmp_path, config=_config(train_steps=1))
    import json

    with open(tmp_path / "config.json") as f:
        written = from_dict(json.load(f))
    assert written.trainer.train_steps == 1 and written.data.global_batch_size == 4


def test_missing_pretrained_backbone_names_file_source_and_escape(tmp_path):
    import dataclasses

    config = _config(train_steps=1)
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(
            config.model,
            pretrained_backbone=str(tmp_path / "nope" / "resnet50_v1c.weights.h5"),
            pretrained_backbone_source="https://example.org/resnet50_v1c.pth",
        ),
    )
    with pytest.raises(FileNotFoundError) as info:
        _train(tmp_path / "run", config=config)
    message = str(info.value)
    for expected in ("resnet50_v1c.weights.h5", "https://example.org/resnet50_v1c.pth", "--from_scratch"):
        assert expected in message
    assert "--override=model.pretrained_backbone=" in message
    assert _train(tmp_path / "run", config=config, from_scratch=True)["step"] == 1


def test_batch_not_divisible_by_replicas_and_accumulation(tmp_path):
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        _train(tmp_path, config=_config(grad_accum_steps=3))


def test_cli_rejects_unknown_experiment_and_key(tmp_path):
    script = os.path.join(runs.REPO, "scripts", "train.py")
    env = runs.subprocess_env()
    bad_name = subprocess.run(
        [sys.executable, script, "--experiment=nope", f"--workdir={tmp_path}"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad_name.returncode != 0
    assert "unknown experiment 'nope'" in bad_name.stderr and "synthetic_r18_os8" in bad_name.stderr
    bad_key = subprocess.run(
        [
            sys.executable,
            script,
            "--experiment=synthetic_r18_os8",
            f"--workdir={tmp_path}",
            "--override=trainer.stepz=3",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad_key.returncode != 0
    assert "unknown config key 'trainer.stepz'" in bad_key.stderr and "trainer.train_steps" in bad_key.stderr
    assert not os.path.exists(tmp_path / "config.json")
