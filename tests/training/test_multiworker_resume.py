"""Two workers on 127.0.0.1 killed with SIGKILL mid-run and restarted continue exactly.

Each worker runs this file with --worker: MultiWorkerMirroredStrategy from its
TF_CONFIG, a tiny model with synchronized BatchNorm, and a shuffled, sharded
dataset whose examples carry their id. `training.train`'s `input_observer`
appends the ids each step consumed to a per-worker file. The test compares,
step by step and worker by worker, the ids of an interrupted-and-resumed run
with an uninterrupted one, and the final weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from harness import tiny
from harness.cluster import Cluster, Sim

HERE = os.path.dirname(os.path.abspath(__file__))

STEPS = 12
NUM_EXAMPLES = 24
GLOBAL_BATCH = 4


def _dataset_fn(ctx):
    """Examples 0..NUM_EXAMPLES-1 made from their id, sharded by worker, reshuffled every epoch."""
    import tensorflow as tf

    def example(i):
        seed = tf.stack([i, tf.constant(7, tf.int64)])
        image = tf.random.stateless_normal([8, 8, 3], seed)
        label = tf.random.stateless_uniform([8, 8], seed, maxval=tiny.NUM_CLASSES, dtype=tf.int32)
        return image, label, {"image_id": i}

    ds = tf.data.Dataset.range(NUM_EXAMPLES).shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    ds = ds.shuffle(8, seed=3, reshuffle_each_iteration=True).repeat().map(example)
    return ds.batch(ctx.get_per_replica_batch_size(GLOBAL_BATCH), drop_remainder=True)


def _worker(workdir, ids_file, out, delay, local_devices):
    import tensorflow as tf
    from absl import logging

    from fcn_tf import distribute, training
    from fcn_tf.config import ExperimentConfig, ModelConfig, OptimizerConfig, TrainerConfig, override

    logging.set_verbosity(logging.INFO)
    strategy = distribute.make_strategy("auto")
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), strategy
    assert strategy.num_replicas_in_sync == 2 * int(local_devices), strategy.num_replicas_in_sync
    config = ExperimentConfig(
        name="tiny",
        model=ModelConfig(num_classes=tiny.NUM_CLASSES),
        optimizer=OptimizerConfig(base_lr=0.05),
        trainer=TrainerConfig(
            train_steps=STEPS, log_every=1, checkpoint_every=2, image_summary_every=0, deterministic=True
        ),
    )
    config = override(config, f"data.global_batch_size={GLOBAL_BATCH}")

    def record(step, extras):
        with open(ids_file, "a") as f:
            f.write(json.dumps({"step": step, "ids": extras["image_id"].ravel().tolist()}) + "\n")
        time.sleep(float(delay))  # a run slow enough to be killed mid-way

    holder = {}
    result = training.train(
        config,
        workdir,
        strategy,
        model_fn=lambda c: holder.setdefault("model", tiny.tiny_segmenter()),
        dataset_fn=_dataset_fn,
        evaluate=False,
        input_observer=record,
    )
    np.savez(out, **{w.path: w.numpy() for w in holder["model"].weights})
    print("RESULT " + json.dumps({"step": result["step"]}), flush=True)


def _start(tmp_path, workdir, name, delay, local_devices):
    # The simulated machine: TF_CONFIG on free ports, `local_devices` logical CPUs as each worker's replicas.
    cluster = Cluster(tmp_path / f"{name}-cluster", workers=2, sim=Sim(logical_cpus=local_devices))
    procs = []
    for index in range(2):
        log = open(tmp_path / f"{name}-w{index}.log", "w")
        args = [workdir, str(tmp_path / f"{name}-ids{index}.jsonl"), str(tmp_path / f"{name}-w{index}.npz")]
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", *args, str(delay), str(local_devices)],
                env=cluster.env(index),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def _wait(procs, tmp_path, name, timeout=600):
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for index, proc in enumerate(procs):
        assert proc.returncode == 0, (tmp_path / f"{name}-w{index}.log").read_text()[-5000:]


def _ids(path):
    """step -> ids the step consumed; a step run again after a resume overwrites its first record."""
    by_step = {}
    for line in open(path):
        record = json.loads(line)
        by_step[record["step"]] = record["ids"]
    return by_step


@pytest.mark.slow
@pytest.mark.parametrize("local_devices", [1, 2])
def test_two_workers_killed_and_restarted_continue_exactly(tmp_path, local_devices):
    # local_devices 2: several replicas per worker under MultiWorkerMirroredStrategy (4 in all).
    from fcn_tf import training

    straight_dir, killed_dir = str(tmp_path / "straight"), str(tmp_path / "killed")
    _wait(_start(tmp_path, straight_dir, "straight", 0, local_devices), tmp_path, "straight")

    procs = _start(tmp_path, killed_dir, "killed", 0.5, local_devices)
    first = os.path.join(killed_dir, "checkpoints", "ckpt-4.index")
    deadline = time.time() + 600
    while not os.path.exists(first) and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.05)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    for proc in procs:
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed-w0.log").read_text()[-5000:]
    killed_at = training.resume_step(killed_dir, 2)
    assert 2 <= killed_at < STEPS, killed_at
    consumed = [_ids(tmp_path / f"killed-ids{k}.jsonl") for k in range(2)]
    assert max(consumed[0]) < STEPS, "the run was not interrupted mid-way"
    # Another worker count is refused, with both counts in one line.
    with pytest.raises(RuntimeError, match=r"on 1 worker\(s\): .* saved by 2 worker\(s\)"):
        training.resume_step(killed_dir, 1)

    _wait(_start(tmp_path, killed_dir, "killed", 0, local_devices), tmp_path, "killed")
    assert f"(from step {killed_at})" in (tmp_path / "killed-w1.log").read_text()
    for k in range(2):
        straight, resumed = _ids(tmp_path / f"straight-ids{k}.jsonl"), _ids(tmp_path / f"killed-ids{k}.jsonl")
        assert sorted(straight) == list(range(1, STEPS + 1))
        assert resumed == straight, f"worker {k}"
    for step in range(1, STEPS + 1):  # the shards are disjoint
        a, b = (_ids(tmp_path / f"straight-ids{k}.jsonl")[step] for k in range(2))
        assert not set(a) & set(b), step
    expected = np.load(tmp_path / "straight-w0.npz")
    for k in range(2):
        got = np.load(tmp_path / f"killed-w{k}.npz")
        assert sorted(got.files) == sorted(expected.files)
        for name in expected.files:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"worker {k}: {name}")


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(*sys.argv[sys.argv.index("--worker") + 1 :])
