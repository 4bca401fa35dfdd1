"""Two worker processes on 127.0.0.1 under MultiWorkerMirroredStrategy end with identical weights.

Each worker runs this file with --worker: it builds the strategy from its
TF_CONFIG, trains a few steps of a tiny synthetic_r18_os8 (synchronized
BatchNorm, dataset sharded by input context) through `training.train` on a
shared workdir, and dumps its final weights. Only the chief locks the
workdir, writes config/summaries and keeps model checkpoints; each worker
keeps its own input position in checkpoints/input/worker-K.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from harness import runs
from harness.cluster import free_ports

HERE = os.path.dirname(os.path.abspath(__file__))

STEPS = 4


def _worker(workdir, data_dir, out):
    import tensorflow as tf
    from absl import logging

    import experiments
    from fcn_tf import distribute, training
    from fcn_tf.config import override

    logging.set_verbosity(logging.INFO)  # as scripts/train.py (absl.app) does
    strategy = distribute.make_strategy("auto")
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), strategy
    assert strategy.num_replicas_in_sync == 2
    config = override(
        experiments.get("synthetic_r18_os8"),
        *runs.TINY_OVERRIDES,
        f"data.data_dir={data_dir}",
        f"trainer.train_steps={STEPS}",
        "trainer.deterministic=false",
        "trainer.eval_max_examples=2",
    )
    holder = {}
    result = training.train(
        config, workdir, strategy, model_fn=lambda c: holder.setdefault("model", _build(c))
    )
    weights = {w.path: w.numpy() for w in holder["model"].weights}
    np.savez(out, **weights)
    print(
        "RESULT " + json.dumps({"step": result["step"], "chief": distribute.is_chief(strategy)}), flush=True
    )


def _build(config):
    from fcn_tf.models import build_fcn

    model = build_fcn(config.model)
    # Synchronized BatchNorm across the two workers' replicas.
    assert any(getattr(layer, "synchronized", False) for layer in model._flatten_layers())
    return model


def test_two_workers_train_to_identical_weights(tmp_path):
    data_dir = runs.make_synthetic_tfds(str(tmp_path / "data"))
    workdir = str(tmp_path / "run")
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", workdir, data_dir, str(tmp_path / f"w{index}.npz")],
                env=runs.subprocess_env(TF_CONFIG=tf_config),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=600)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-5000:]
    results = [
        json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        for out in outputs
    ]
    assert [r["chief"] for r in results] == [True, False]
    assert all(r["step"] == STEPS for r in results)
    w0, w1 = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    assert sorted(w0.files) == sorted(w1.files) and len(w0.files) > 20
    initial_moved = False
    for name in w0.files:
        np.testing.assert_array_equal(w0[name], w1[name], err_msg=name)
        initial_moved |= "moving_mean" in name and np.any(w0[name] != 0)
    assert initial_moved  # BN statistics were updated, so training really ran
    # The chief's model checkpoints and every worker's own input position, under the same steps.
    checkpoints = os.path.join(workdir, "checkpoints")
    assert os.path.exists(os.path.join(workdir, "config.json"))
    assert os.path.exists(os.path.join(checkpoints, f"ckpt-{STEPS}.index"))
    assert sorted(os.listdir(os.path.join(checkpoints, "input"))) == ["worker-0", "worker-1"]
    for worker in ("worker-0", "worker-1"):
        assert os.path.exists(os.path.join(checkpoints, "input", worker, f"ckpt-{STEPS}.index"))
    assert not any(name.startswith("workertemp") for name in os.listdir(workdir))


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(*sys.argv[sys.argv.index("--worker") + 1 :])
