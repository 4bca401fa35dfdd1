"""Describing the cluster: TensorFlow's Slurm and TF_CONFIG resolvers, the collective choice, flag errors.

The Slurm case runs two processes with the variables `srun --ntasks=2` sets on
one node (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST,
SLURM_STEP_TASKS_PER_NODE, the ones SlurmClusterResolver reads); each builds
the strategy through `distribute.make_strategy` and all-reduces its task id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness import cluster, runs

HERE = os.path.dirname(os.path.abspath(__file__))


def _task(port_base):
    import tensorflow as tf

    from fcn_tf import distribute

    strategy = distribute.make_strategy("auto", "slurm", "ring", int(port_base))
    assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), strategy
    resolver = strategy.cluster_resolver
    implementation = strategy.extended._communication_options.implementation
    total = strategy.reduce(
        tf.distribute.ReduceOp.SUM,
        strategy.run(lambda: tf.constant(float(resolver.task_id + 1))),
        axis=None,
    )
    print(
        "RESULT "
        + json.dumps(
            {
                "replicas": strategy.num_replicas_in_sync,
                "cluster": resolver.cluster_spec().as_dict(),
                "task": [resolver.task_type, resolver.task_id],
                "chief": distribute.is_chief(strategy),
                "workers": distribute.num_workers(strategy),
                "collective": implementation.name,
                "sum": float(total),
            }
        ),
        flush=True,
    )


def _slurm_env(rank, tasks=2):
    env = runs.subprocess_env(
        SLURM_PROCID=str(rank),
        SLURM_STEP_NUM_TASKS=str(tasks),
        SLURM_STEP_NODELIST="127.0.0.1",
        SLURM_STEP_TASKS_PER_NODE=str(tasks),
    )
    env.pop("CUDA_VISIBLE_DEVICES")  # as on a CPU node of a real job: no NVIDIA driver
    return env


def test_slurm_variables_of_two_tasks_give_a_two_worker_strategy():
    base = cluster.consecutive_free_ports(2)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--task", str(base)],
            env=_slurm_env(rank),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    results = [
        json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        for out in outputs
    ]
    addresses = [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
    for rank, result in enumerate(results):
        assert result["cluster"] == {"worker": addresses}
        assert result["task"] == ["worker", rank]
        assert result["replicas"] == 2 and result["workers"] == 2
        assert result["chief"] == (rank == 0)
        assert result["collective"] == "RING"
        assert result["sum"] == 3.0  # 1 + 2: the two tasks really all-reduced


def test_bad_cluster_and_collective_values_give_one_line_errors(monkeypatch):
    from fcn_tf import distribute

    for name in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError) as info:
        distribute.make_strategy("auto", "slurm")
    assert "SLURM_PROCID" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown cluster 'k8s'; choose one of tf_config, slurm"):
        distribute.make_strategy("auto", "k8s")
    with pytest.raises(ValueError, match="unknown collective 'mpi'; choose one of auto, nccl, ring"):
        distribute.make_strategy("auto", "tf_config", "mpi")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        distribute.make_strategy("auto")


def test_cli_rejects_bad_cluster_and_collective(tmp_path):
    from fcn_tf.config import COLLECTIVES

    script = os.path.join(runs.REPO, "scripts", "train.py")
    base = [sys.executable, script, "--experiment=synthetic_r18_os8", f"--workdir={tmp_path}"]
    env = runs.subprocess_env()
    collective = subprocess.run(
        [*base, "--override=trainer.collective=mpi"], capture_output=True, text=True, env=env
    )
    assert collective.returncode != 0
    # config.validate's message (all problems of the config, one per line).
    assert f"trainer.collective='mpi' not in {COLLECTIVES}" in collective.stderr, collective.stderr[-2000:]
    slurm = subprocess.run([*base, "--cluster=slurm"], capture_output=True, text=True, env=env)
    assert slurm.returncode != 0
    last = slurm.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --cluster=slurm: SLURM_PROCID not found"), slurm.stderr[-2000:]
    assert not os.path.exists(tmp_path / "config.json")


if __name__ == "__main__" and "--task" in sys.argv:
    _task(sys.argv[sys.argv.index("--task") + 1])
