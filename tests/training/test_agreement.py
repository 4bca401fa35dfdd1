"""Workers agree before the first step: a different config or pretrained file stops both, naming worker 1."""

from __future__ import annotations

import numpy as np
import pytest

import experiments
from fcn_tf.config import ExperimentConfig, OptimizerConfig
from fcn_tf.training import agreement
from harness import runs
from harness.cluster import Cluster


def _facts(config, pretrained=""):
    return agreement.start_facts(config, 2, "CPU", "cpu_fast, oneDNN on", pretrained)


def _row(facts, step=agreement.FRESH):
    return [agreement._hash(f.value) for f in facts] + [step]


def test_compare_names_the_first_worker_and_fact_that_differ():
    base = ExperimentConfig(name="x")
    other = ExperimentConfig(name="x", optimizer=OptimizerConfig(base_lr=0.02))
    mine, theirs = _facts(base), _facts(other)
    rows = np.array([_row(mine), _row(mine), _row(theirs)], np.int64)
    assert agreement.compare(mine, np.array([_row(mine)] * 3, np.int64), 0) is None
    message = agreement.compare(theirs, rows, 2)
    assert message.startswith(
        "worker 2 differs from worker 0 in optimizer.base_lr (worker 2: optimizer.base_lr 0.02)"
    )
    # The pretrained file: missing on one worker.
    rows = np.array([_row(_facts(base, "ab12")), _row(_facts(base, "missing: /x.h5"))], np.int64)
    assert "worker 1 differs from worker 0 in pretrained weights" in agreement.compare(_facts(base), rows, 0)


def _train(tmp_path, workdir, data_dir, *overrides, home=None):
    command = runs.train_command(workdir, data_dir, "trainer.train_steps=2", *overrides)
    return (["env", f"HOME={home}"] if home else []) + command


@pytest.mark.slow
@pytest.mark.parametrize(
    "key, value",
    [
        # The reproduction (both trained to the end before); 0.05 differs from the demo's own LR.
        ("optimizer.base_lr", "0.05"),
        ("model.head_channels", "16"),  # other variable shapes: compared before any variable is made
    ],
)
def test_a_different_config_on_worker_1_stops_both_naming_worker_1_and_the_key(tmp_path, key, value):
    section, field = key.split(".")
    # Not vacuous: worker 1's value must differ from the experiment's (the demo's LR changed once).
    assert str(getattr(getattr(experiments.get("synthetic_r18_os8"), section), field)) != value
    data_dir = runs.make_synthetic_tfds(tmp_path, num_train=4, num_val=2)
    workdir = str(tmp_path / "run")
    with Cluster(tmp_path / "cluster", workers=2) as cluster:
        cluster.start(lambda k: _train(tmp_path, workdir, data_dir, *([f"{key}={value}"] if k == 1 else [])))
        results = cluster.wait(timeout=600)
    for r in results:
        assert r.returncode == 1, r.output[-3000:]
        (line,) = r.lines(r"^error: ")
        assert f"workers disagree before the first step: worker 1 differs from worker 0 in {key}" in line
        assert "Traceback" not in r.output
    assert f"(worker 1: {key} {value})" in results[1].output


@pytest.mark.slow
def test_a_missing_pretrained_file_on_worker_1_stops_both(tmp_path):
    data_dir = runs.make_synthetic_tfds(tmp_path, num_train=4, num_val=2)
    homes = [tmp_path / "home0", tmp_path / "home1"]
    (homes[0] / "weights").mkdir(parents=True)
    (homes[0] / "weights" / "backbone.weights.h5").write_bytes(b"not read: the workers disagree first")
    workdir = str(tmp_path / "run")
    with Cluster(tmp_path / "cluster", workers=2) as cluster:
        cluster.start(
            lambda k: _train(
                tmp_path,
                workdir,
                data_dir,
                "model.pretrained_backbone=~/weights/backbone.weights.h5",
                home=homes[k],
            )
        )
        results = cluster.wait(timeout=600)
    for r in results:
        assert r.returncode == 1, r.output[-3000:]
        (line,) = r.lines(r"^error: ")
        assert "worker 1 differs from worker 0 in pretrained weights" in line, line
    assert (
        f"(worker 1: pretrained weights missing: {homes[1]}/weights/backbone.weights.h5)" in results[1].output
    )


@pytest.mark.slow
def test_a_newer_checkpoint_seen_by_worker_1_only_does_not_split_the_resume_step(tmp_path):
    # Each worker gets its own view of the workdir, as NFS attribute caching can give:
    # worker 1's has a newer complete checkpoint (step 6) that the chief's lacks.
    import shutil

    from fcn_tf import checkpoints
    from fcn_tf.training import recovery

    data_dir = runs.make_synthetic_tfds(tmp_path, num_train=4, num_val=2)
    first = str(tmp_path / "first")
    with Cluster(tmp_path / "c1", workers=2) as cluster:
        cluster.start(runs.train_command(first, data_dir, "trainer.train_steps=6"))
        assert [r.returncode for r in cluster.wait(timeout=900)] == [0, 0]
    views = [str(tmp_path / "chief_view"), str(tmp_path / "worker1_view")]
    for view in views:
        shutil.copytree(first, view)
    recovery.discard(checkpoints.prefix_of(checkpoints.checkpoint_dir(views[0]), 6))
    with Cluster(tmp_path / "c2", workers=2) as cluster:
        cluster.start(lambda k: runs.train_command(views[k], data_dir, "trainer.train_steps=8"))
        results = cluster.wait(timeout=900)
    for r in results:
        assert r.returncode == 0, r.output[-3000:]
        assert "(from step 4)" in r.output, r.output[-3000:]
        assert "Resumed from" in r.output and "(step 4)" in r.output
