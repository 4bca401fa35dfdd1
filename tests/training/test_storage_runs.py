"""Runs whose workdir and data_dir are URLs: everything lands there, nothing under the current directory.

TensorFlow's GCS client cannot be pointed at a local server, so bucket paths
are exercised through the same `tf.io.gfile` code with TensorFlow's in-process
`ram://` filesystem and `file://` URLs. The in-process run is watched by
patched `open`, `os` and `shutil` functions: a library call that handed a
user path to them (as `os.path.abspath("gs://b/run")` once did) fails it.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import logging
import os
import shutil
import socket
import sys
import uuid

import numpy as np
import pytest
import tensorflow as tf

import experiments
from fcn_tf import training
from fcn_tf.config import ExperimentConfig, ModelConfig, override
from fcn_tf.export import saved_model
from harness import runs, tiny

LIBRARY = os.path.join(runs.REPO, "fcn_tf") + os.sep


def _config(train_steps: int) -> ExperimentConfig:
    return override(
        ExperimentConfig(name="tiny", model=ModelConfig(num_classes=3)),
        "data.global_batch_size=4",
        "optimizer.base_lr=0.01",
        f"trainer.train_steps={train_steps}",
        "trainer.checkpoint_every=2",
        "trainer.image_summary_every=0",
    )


@pytest.fixture
def local_calls(monkeypatch, tmp_path):
    """Library calls of open/os/shutil/fcntl that get a `ram:` path; the run starts in an empty folder.

    Only calls made by fcn_tf itself count: TensorFlow's own checkpoint code
    uses `os.path` string functions on URLs, correctly.
    """
    seen = []

    def watch(owner, name):
        original = getattr(owner, name)

        def watched(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if args and "ram:" in str(args[0]) and caller.startswith(LIBRARY):
                seen.append(f"{caller}:{sys._getframe(1).f_lineno} {name}({args[0]!r})")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, watched)

    watch(builtins, "open")
    for name in ("open", "makedirs", "mkdir", "listdir", "replace", "rename", "remove", "stat", "scandir"):
        watch(os, name)
    for name in ("abspath", "realpath", "isfile", "isdir", "exists"):
        watch(os.path, name)
    for name in ("rmtree", "copy", "copyfile", "move", "disk_usage"):
        watch(shutil, name)
    watch(fcntl, "flock")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield seen
    assert os.listdir(cwd) == [], "created under the current directory"


def _tree(root: str) -> list[str]:
    return sorted(
        os.path.join(d, f)[len(root) + 1 :] for d, _, files in tf.io.gfile.walk(root) for f in files
    )


def test_ram_workdir_trains_checkpoints_resumes_and_exports_there(local_calls):
    root = f"ram://fcn_tf_{uuid.uuid4().hex[:8]}"
    workdir = f"{root}/run"
    models = []

    def run(steps):
        return training.train(
            _config(train_steps=steps),
            workdir,
            tf.distribute.get_strategy(),
            model_fn=lambda c: models.append(tiny.tiny_segmenter()) or models[-1],
            dataset_fn=tiny.dataset_fn(),
            evaluate=False,
        )

    first = run(4)
    assert first["checkpoint"] == f"{workdir}/checkpoints/ckpt-4"
    files = _tree(workdir)
    assert "config.json" in files and "checkpoints/ckpt-4.index" in files
    assert any(f.startswith("tensorboard/train/events") for f in files)
    assert ".lock" not in files  # released (object stores: only a record of the holder)
    resumed = run(6)
    assert resumed["step"] == 6 and resumed["checkpoint"] == f"{workdir}/checkpoints/ckpt-6"

    config = override(experiments.get("synthetic_r18_os8"), "model.num_classes=3")
    export_dir = saved_model.export(
        config, models[-1], f"{root}/export/fcn", warmup=False, class_names=["a", "b", "c"]
    )
    assert export_dir == f"{root}/export/fcn/1"
    served = tf.saved_model.load(export_dir).signatures["serving_default"]
    image = tf.io.encode_png(tf.zeros((8, 8, 3), tf.uint8))
    labels = served(images=tf.stack([image]))["labels"].numpy()
    assert labels.shape[-2:] == (8, 8) and np.all(labels < 3)
    assert local_calls == []


def test_file_url_data_dir_and_workdir(local_calls, tmp_path):
    data_dir = runs.make_synthetic_tfds(str(tmp_path / "data"), num_train=4, num_val=2)
    config = override(
        experiments.get("synthetic_r18_os8"),
        *runs.TINY_OVERRIDES,
        "trainer.train_steps=2",
        f"data.data_dir=file://{data_dir}",
    )
    workdir = f"file://{tmp_path}/run"
    result = training.train(
        config,
        workdir,
        tf.distribute.get_strategy(),
        model_fn=lambda c: tiny.tiny_segmenter(c.model.num_classes),
        evaluate=False,
    )
    assert result["checkpoint"] == f"{workdir}/checkpoints/ckpt-2"
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "ckpt-2.index")
    assert os.path.exists(tmp_path / "run" / "config.json")


def test_a_data_dir_tfds_cannot_open_is_one_line(tmp_path):
    from fcn_tf.data import build_dataset
    from fcn_tf.data.sources import DatasetNotPreparedError

    config = override(experiments.get("synthetic_r18_os8"), "data.data_dir=ram://nowhere")
    with pytest.raises(DatasetNotPreparedError, match="ram://nowhere: TensorFlow Datasets reads"):
        build_dataset(config.data, True)


# --------------------------------------------------------------------------- the workdir lock


def test_lock_on_a_filesystem_without_flock_is_one_line(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(training.WorkdirLockedError) as info:
        with training.workdir_lock(str(tmp_path)):
            pass
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path) in message and "No locks available" in message
    assert "--nolock_workdir" in message and "lock support" in message
    with training.workdir_lock(str(tmp_path), enabled=False):  # what --nolock_workdir does
        pass


def test_lock_records_the_holder_and_object_stores_warn_about_one(caplog):
    workdir = f"ram://fcn_tf_{uuid.uuid4().hex[:8]}/run"
    with training.workdir_lock(workdir) as path:
        holder = tf.io.gfile.GFile(path).read()
        assert holder == f"host {socket.gethostname()} pid {os.getpid()}"
        # No locks on an object store: a second run is warned, with the holder, not refused.
        with caplog.at_level(logging.WARNING), training.workdir_lock(workdir):
            pass
        assert any(
            holder in r.getMessage() and "one run per workdir" in r.getMessage() for r in caplog.records
        )
    assert not tf.io.gfile.exists(path)


@pytest.mark.slow
def test_scripts_with_file_urls_train_resume_and_export_there(tmp_path):
    import subprocess

    data_dir = runs.make_synthetic_tfds(str(tmp_path / "data"))
    workdir, export_dir = f"file://{tmp_path}/run", f"file://{tmp_path}/export/fcn"
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    def run(argv):
        done = subprocess.run(argv, cwd=cwd, env=runs.subprocess_env(), capture_output=True, text=True)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        return done.stdout + done.stderr

    run(runs.train_command(workdir, f"file://{data_dir}", "trainer.train_steps=2"))
    resumed = run(runs.train_command(workdir, f"file://{data_dir}", "trainer.train_steps=4"))
    assert f"Resumed from {workdir}/checkpoints/ckpt-2 (step 2)" in resumed
    assert (tmp_path / "run" / "checkpoints" / "ckpt-4.index").exists()
    assert (tmp_path / "run" / "config.json").exists()
    run(
        [
            runs.sys.executable,
            f"{runs.REPO}/scripts/export.py",
            "--experiment=synthetic_r18_os8",
            f"--workdir={workdir}",
            f"--export_dir={export_dir}",
            "--format=saved_model",
        ]
    )
    assert (tmp_path / "export" / "fcn" / "1" / "saved_model.pb").exists()
    assert os.listdir(cwd) == [], "created under the current directory"
