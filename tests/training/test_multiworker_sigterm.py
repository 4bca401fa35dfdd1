"""SIGTERM with several workers (2 workers x 2 logical devices): both save the same step, exit 143, and resume there."""

from __future__ import annotations

import re
import signal

import pytest

from fcn_tf.training import PREEMPTED_EXIT_CODE
from harness import runs
from harness.cluster import Cluster, Sim


@pytest.mark.slow
def test_sigterm_on_every_worker_saves_one_step_and_the_rerun_resumes_it(tmp_path):
    data_dir = runs.make_synthetic_tfds(tmp_path, num_train=8, num_val=2)
    workdir = str(tmp_path / "run")
    # Global batch 4 over 4 replicas; no periodic checkpoint before the signal.
    overrides = ("data.global_batch_size=4", "trainer.train_steps=60", "trainer.checkpoint_every=1000")
    with Cluster(tmp_path / "c1", workers=2, sim=Sim(logical_cpus=2)) as cluster:
        cluster.start(runs.train_command(workdir, data_dir, *overrides))
        cluster.wait_for(0, r"step 3/60", timeout=600)
        for k in range(2):
            cluster.signal(k, signal.SIGTERM)
        results = cluster.wait(timeout=600)
    assert [r.returncode for r in results] == [PREEMPTED_EXIT_CODE] * 2, results[0].output[-3000:]
    steps = {int(re.search(r"checkpoint saved at step (\d+)", r.output).group(1)) for r in results}
    assert len(steps) == 1, steps  # the same step on both workers
    (saved,) = steps
    assert 3 <= saved < 60
    with Cluster(tmp_path / "c2", workers=2, sim=Sim(logical_cpus=2)) as cluster:
        cluster.start(
            runs.train_command(workdir, data_dir, *overrides[:1], "trainer.train_steps=" + str(saved + 2))
        )
        results = cluster.wait(timeout=600)
    for r in results:
        assert r.returncode == 0, r.output[-3000:]
        assert f"(from step {saved})" in r.output
