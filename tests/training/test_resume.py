"""Exact resume: a run killed mid-way and restarted ends with the weights of an uninterrupted run.

Each case runs scripts/train.py in subprocesses on a tiny synthetic dataset
with op determinism on: the straight run (N steps), then a run killed after
a checkpoint (SIGKILL) or preempted (SIGTERM -> TensorFlow's
PreemptionCheckpointHandler saves at the next step boundary and exits 143),
restarted with the same command until step N. The final checkpoints must
hold identical model and optimizer variables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from harness import runs

STEPS = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return runs.make_synthetic_tfds(str(tmp_path_factory.mktemp("resume_data")))


def _start(workdir, data_dir):
    return subprocess.Popen(
        runs.train_command(workdir, data_dir, f"trainer.train_steps={STEPS}"),
        env=runs.subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _latest(workdir):
    import tensorflow as tf

    return tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))


def _step_of(prefix):
    return int(prefix.rsplit("-", 1)[1]) if prefix else 0


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """The uninterrupted run, started in the background while each test interrupts its own."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    return workdir, _start(workdir, data_dir)


def _straight_result(straight):
    workdir, proc = straight
    if proc.returncode is None:
        code, out = _finish(proc)
        assert code == 0, out[-4000:]
    return _latest(workdir)


def _assert_same_weights(a, b):
    va, vb = runs.checkpoint_variables(a), runs.checkpoint_variables(b)
    assert va.keys() == vb.keys() and len(va) > 20
    assert any(k.startswith("optimizer/") for k in va)
    worst = max(va, key=lambda k: float(np.max(np.abs(va[k] - vb[k]))) if va[k].size else 0.0)
    np.testing.assert_array_equal(va[worst], vb[worst], err_msg=worst)
    for k in va:
        np.testing.assert_array_equal(va[k], vb[k], err_msg=k)


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_restart_matches_straight_run(straight, data_dir, tmp_path):
    workdir = str(tmp_path / "killed")
    proc = _start(workdir, data_dir)
    # A step is complete once its last part, the input position, is saved (the model goes
    # first): its state file, not ckpt-2.index, which appears before the save has recorded it.
    first = os.path.join(workdir, "checkpoints", "input", "worker-0", "checkpoint")
    deadline = time.time() + 300
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    code, out = _finish(proc)
    assert code == -signal.SIGKILL, out[-4000:]
    killed_at = _step_of(_latest(workdir))
    assert 2 <= killed_at < STEPS, f"the run was not interrupted mid-way (latest checkpoint step {killed_at})"

    code, out = _finish(_start(workdir, data_dir))  # the same command resumes
    assert code == 0, out[-4000:]
    assert f"(from step {killed_at})" in out
    resumed = _latest(workdir)
    assert _step_of(resumed) == STEPS
    _assert_same_weights(_straight_result(straight), resumed)


@pytest.mark.slow
def test_sigterm_saves_at_step_boundary_then_restart_matches_straight_run(straight, data_dir, tmp_path):
    workdir = str(tmp_path / "preempted")
    proc = _start(workdir, data_dir)
    lines = []
    for line in proc.stdout:  # wait for the first step to finish (tracing done)
        lines.append(line)
        if f"step 2/{STEPS}" in line:
            break
    proc.send_signal(signal.SIGTERM)
    code, out = _finish(proc)
    out = "".join(lines) + out
    assert code == 143, out[-4000:]
    assert "preempted (SIGTERM)" in out
    saved = _latest(workdir)
    assert 2 < _step_of(saved) < STEPS, out[-4000:]

    code, out = _finish(_start(workdir, data_dir))
    assert code == 0, out[-4000:]
    assert f"(from step {_step_of(saved)})" in out
    _assert_same_weights(_straight_result(straight), _latest(workdir))
