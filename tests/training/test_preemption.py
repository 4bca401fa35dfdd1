"""Preemption on every platform: SIGTERM during training or evaluation saves the current step and stops.

TensorFlow's PreemptionCheckpointHandler behaves by platform (it ignores
SIGTERM on Google Cloud GPU VMs and saves nothing on Google Cloud CPU and TPU
VMs); the run catches SIGTERM itself (fcn_tf/training/preemption.py). The
in-process tests patch TensorFlow's platform detection to each platform it
knows; the multi-worker case runs scripts/train.py in two processes on a
simulated Google Cloud CPU machine (tests/harness/cluster.py).
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.distribute.failure_handling import failure_handling_util

from fcn_tf import checkpoints, training
from fcn_tf.config import ExperimentConfig, ModelConfig, override
from harness import tiny

PLATFORMS = ("GCE_GPU", "GCE_CPU", "UNSUPPORTED")  # UNSUPPORTED: anything else (a laptop, AWS, ...)


def _config(**values) -> ExperimentConfig:
    assignments = {
        "data.global_batch_size": 4,
        "optimizer.base_lr": 0.01,
        "trainer.train_steps": 400,
        "trainer.checkpoint_every": 1000,
        "trainer.log_every": 1000,
        "trainer.image_summary_every": 0,
        "trainer.eval_every": 0,
        **values,
    }
    return override(
        ExperimentConfig(name="tiny", model=ModelConfig(num_classes=3)),
        *(f"{k}={v}" for k, v in assignments.items()),
    )


def _sigterm_at(step, pace=0.02):
    """An input observer that sends this process SIGTERM after `step`, and paces the steps."""

    def observe(done, extras):
        del extras
        if done == step:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(pace)

    return observe


@pytest.fixture(params=PLATFORMS)
def platform(request, monkeypatch):
    device = failure_handling_util.PlatformDevice[request.param]
    monkeypatch.setattr(failure_handling_util, "detect_platform", lambda: device)
    return request.param


def _train(workdir, config, **kwargs):
    return training.train(
        config,
        str(workdir),
        tf.distribute.get_strategy(),
        model_fn=lambda c: tiny.tiny_segmenter(),
        dataset_fn=tiny.dataset_fn(),
        **kwargs,
    )


def test_sigterm_during_training_saves_the_current_step_on_every_platform(platform, tmp_path):
    start = time.monotonic()
    with pytest.raises(training.Preempted) as info:
        _train(tmp_path, _config(), evaluate=False, input_observer=_sigterm_at(3))
    seconds = time.monotonic() - start
    step = info.value.step
    # The handler polls the watcher every second and saves after the next step.
    assert 3 < step < 3 + 2.5 / 0.02, step
    assert info.value.exit_code == 143
    assert info.value.checkpoint == checkpoints.prefix_of(str(tmp_path / "checkpoints"), step)
    assert tf.io.gfile.exists(info.value.checkpoint + ".index")
    assert seconds < 60
    # The rerun resumes from that step.
    result = _train(tmp_path, _config(**{"trainer.train_steps": step + 2}), evaluate=False)
    assert result["step"] == step + 2


def test_sigterm_during_evaluation_stops_between_batches(platform, tmp_path):
    images = 800  # as many as ADE20k's periodic evaluation on one GPU would take minutes for
    killed, read = [], []

    def eval_dataset():
        def kill_at_fifth(index):
            read.append(int(index))
            if index == 5 and not killed:
                killed.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGTERM)
            return index

        ids = tf.data.Dataset.range(images).map(lambda i: tf.py_function(kill_at_fifth, [i], tf.int64))
        data = tiny.eval_dataset_fn(count=1)()
        return tf.data.Dataset.zip(ids, data.repeat()).map(lambda i, x: x)

    config = _config(**{"trainer.eval_every": 2})
    with pytest.raises(training.Preempted) as info:
        _train(tmp_path, config, eval_dataset_fn=eval_dataset)
    stopped = time.monotonic()
    assert killed and stopped - killed[0] < 10
    assert max(read) < 100, f"evaluation read {max(read) + 1} of {images} images after SIGTERM"
    assert info.value.step == 2  # the step being evaluated, saved then
    assert tf.io.gfile.exists(checkpoints.prefix_of(str(tmp_path / "checkpoints"), 2) + ".index")
    result = _train(tmp_path, _config(**{"trainer.train_steps": 3}), evaluate=False)
    assert result["step"] == 3


def test_sigterm_during_a_save_is_honoured_when_the_save_ends(tmp_path, monkeypatch):
    from fcn_tf.training import resume

    save = resume.save
    saves = []

    def save_with_sigterm(*args, **kwargs):
        if not saves:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the step-2 checkpoint is written
            time.sleep(0.5)
        saves.append(args[1])
        return save(*args, **kwargs)

    monkeypatch.setattr(resume, "save", save_with_sigterm)
    config = _config(**{"trainer.checkpoint_every": 2})
    with pytest.raises(training.Preempted) as info:
        _train(tmp_path, config, evaluate=False, input_observer=_sigterm_at(-1))
    assert saves[0] == 2  # the interrupted save completed
    assert 2 < info.value.step < 2 + 2.5 / 0.02 and saves[-1] == info.value.step


def test_the_exit_code_is_configurable(tmp_path):
    config = _config(**{"trainer.preemption_exit_code": 130})
    with pytest.raises(training.Preempted) as info:
        _train(tmp_path, config, evaluate=False, input_observer=_sigterm_at(1))
    assert info.value.exit_code == 130
    assert np.isfinite(info.value.step)


@pytest.mark.slow
def test_two_workers_on_google_cloud_cpu_vms_save_the_same_step_and_resume(tmp_path):
    from harness import runs
    from harness.cluster import Cluster, Sim

    data_dir = runs.make_synthetic_tfds(str(tmp_path / "data"))
    workdir = tmp_path / "run"
    sim = Sim(platform="GCE_CPU")  # where TensorFlow's handler alone would save nothing

    def command(steps):
        return lambda k: runs.train_command(
            workdir, data_dir, f"trainer.train_steps={steps}", "trainer.checkpoint_every=1000"
        )

    with Cluster(tmp_path / "job", workers=2, sim=sim) as job:
        job.start(command(400))
        job.wait_for(0, r"step 3/")
        job.signal(1, signal.SIGTERM)  # one pod evicted
        signalled = time.monotonic()
        results = job.wait(timeout=300)
        seconds = time.monotonic() - signalled
    steps = []
    for result in results:
        assert result.returncode == 143, result.output[-3000:]
        (line,) = result.lines(r"preempted \(SIGTERM\): checkpoint saved at step")
        steps.append(int(line.split("checkpoint saved at step ")[1].split()[0]))
    assert steps[0] == steps[1], steps
    step = steps[0]
    assert seconds < 60, seconds
    for k in range(2):
        assert tf.io.gfile.exists(f"{workdir}/checkpoints/input/worker-{k}/ckpt-{step}.index")
    assert tf.io.gfile.exists(f"{workdir}/checkpoints/ckpt-{step}.index")
    with Cluster(tmp_path / "rerun", workers=2, sim=sim) as job:
        job.start(command(step + 2))
        results = job.wait(timeout=300)
    for result in results:
        assert result.returncode == 0, result.output[-3000:]
        assert result.lines(rf"Resumed from .*ckpt-{step} \(step {step}\)"), result.output[-3000:]
