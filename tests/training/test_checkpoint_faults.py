"""Damaged checkpoints, failed saves and leftovers of killed saves (fcn_tf.checkpoints, fcn_tf.training.recovery).

Resume must verify the checkpoint it restores and fall back to the newest
readable one; a save that fails must stop with one clear line and leave no
partial files; a starting run removes the `ckpt-STEP_temp/` folders of
killed saves. Most cases train the tiny model of tests/harness/tiny.py
in-process (a second each); the CLI case runs scripts/train.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import uuid

import pytest
import tensorflow as tf
from absl import logging as absl_logging

from fcn_tf import checkpoints, training
from fcn_tf.config import ExperimentConfig, ModelConfig, OptimizerConfig, TrainerConfig, override
from fcn_tf.training import recovery
from harness import runs, tiny


@pytest.fixture(autouse=True)
def _absl_info_logs():
    """The messages under test are absl INFO/WARNING logs: another test may have lowered absl's verbosity."""
    previous = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    yield
    absl_logging.set_verbosity(previous)


DATA = "ckpt-{}.data-00000-of-00001"


def _config(steps: int, num_classes: int = 3) -> ExperimentConfig:
    config = ExperimentConfig(
        name="tiny",
        model=ModelConfig(num_classes=num_classes),
        optimizer=OptimizerConfig(base_lr=0.01),
        trainer=TrainerConfig(
            train_steps=steps, log_every=1, checkpoint_every=2, image_summary_every=0, keep_checkpoints=3
        ),
    )
    return override(config, "data.global_batch_size=4")


def _train(workdir, steps: int, num_classes: int = 3) -> dict:
    return training.train(
        _config(steps, num_classes),
        str(workdir),
        tf.distribute.get_strategy(),
        model_fn=lambda c: tiny.tiny_segmenter(num_classes),
        dataset_fn=tiny.dataset_fn(),
        evaluate=False,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir after 6 steps: checkpoints ckpt-2, ckpt-4, ckpt-6."""
    workdir = tmp_path_factory.mktemp("trained")
    _train(workdir, 6)
    return workdir


@pytest.fixture
def workdir(trained, tmp_path):
    """A private copy of `trained`."""
    copy = tmp_path / "work"
    shutil.copytree(trained, copy)
    return copy


def _ckpt_dir(workdir) -> str:
    return os.path.join(str(workdir), "checkpoints")


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _digests(directory) -> dict:
    return {
        os.path.relpath(os.path.join(d, f), directory): _digest(os.path.join(d, f))
        for d, _, files in os.walk(directory)
        for f in files
    }


def _listed(workdir) -> list[str]:
    state = tf.train.get_checkpoint_state(_ckpt_dir(workdir))
    return [os.path.basename(p) for p in state.all_model_checkpoint_paths]


def _truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def _flip_byte(path, at=0.5):
    with open(path, "r+b") as f:
        offset = int(os.path.getsize(path) * at)
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


# --------------------------------------------------------------------------- verify


DAMAGES = {
    # name: (damage to ckpt-6, words of the reason)
    "truncated data": (lambda d: _truncate(os.path.join(d, DATA.format(6))), [DATA.format(6), "truncated"]),
    "empty data": (lambda d: _truncate(os.path.join(d, DATA.format(6)), 0), [DATA.format(6), "truncated"]),
    "flipped data byte": (
        lambda d: _flip_byte(os.path.join(d, DATA.format(6))),
        [DATA.format(6), "damaged", "checksum"],
    ),
    "missing data": (lambda d: os.remove(os.path.join(d, DATA.format(6))), ["ckpt-6.data-*", "missing"]),
    "flipped index byte": (
        lambda d: _flip_byte(os.path.join(d, "ckpt-6.index"), 0.3),
        ["ckpt-6.index", "damaged", "checksum mismatch"],
    ),
    "truncated index": (
        lambda d: _truncate(os.path.join(d, "ckpt-6.index")),
        ["ckpt-6.index", "damaged", "not an sstable"],
    ),
    "missing index": (lambda d: os.remove(os.path.join(d, "ckpt-6.index")), ["ckpt-6.index is missing"]),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_verify_names_the_file_and_the_problem(workdir, damage):
    directory = _ckpt_dir(workdir)
    checkpoints.verify(os.path.join(directory, "ckpt-6"))  # intact: no error
    make, words = DAMAGES[damage]
    make(directory)
    with pytest.raises(checkpoints.UnreadableCheckpointError) as info:
        checkpoints.verify(os.path.join(directory, "ckpt-6"))
    # TensorFlow words a checksum error "Checksum does not match" or "checksum mismatch" by where it falls.
    for word in words:
        assert word.lower() in info.value.reason.lower()
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("damage", ["truncated data", "flipped index byte"])
def test_unreadable_newest_checkpoint_resumes_from_previous_with_warning(workdir, damage, caplog):
    directory = _ckpt_dir(workdir)
    make, words = DAMAGES[damage]
    make(directory)
    bad = {name: _digest(os.path.join(directory, name)) for name in ("ckpt-6.index", DATA.format(6))}
    caplog.set_level(logging.INFO)

    result = _train(workdir, 8)

    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "ckpt-6" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    for word in words + [f"Resuming from {directory}/ckpt-4 instead"]:
        assert word in warnings[0]
    assert f"Resumed from {directory}/ckpt-4 (step 4)" in caplog.text
    assert result["step"] == 8
    # The bad files are kept, byte for byte, out of the manager's way.
    unreadable = os.path.join(directory, "unreadable")
    assert {name: _digest(os.path.join(unreadable, name)) for name in bad} == bad
    # The bookkeeping carried on: steps 6 and 8 saved again, keep-3 dropped ckpt-2 as usual.
    assert _listed(workdir) == ["ckpt-4", "ckpt-6", "ckpt-8"]
    assert sorted(n for n in os.listdir(directory) if n.startswith("ckpt-")) == [
        f"ckpt-{s}{ext}" for s in (4, 6, 8) for ext in (".data-00000-of-00001", ".index")
    ]
    for step in (4, 6, 8):
        checkpoints.verify(os.path.join(directory, f"ckpt-{step}"))


def test_every_newer_unreadable_checkpoint_is_set_aside(workdir, caplog):
    directory = _ckpt_dir(workdir)
    _truncate(os.path.join(directory, DATA.format(6)))
    _truncate(os.path.join(directory, "ckpt-4.index"))
    caplog.set_level(logging.INFO)
    assert _train(workdir, 4)["step"] == 4  # resumed at 2, trained to 4, saved ckpt-4 anew
    assert f"Resumed from {directory}/ckpt-2 (step 2)" in caplog.text
    assert sorted(os.listdir(os.path.join(directory, "unreadable"))) == sorted(
        [DATA.format(4), DATA.format(6), "ckpt-4.index", "ckpt-6.index"]
    )
    assert _listed(workdir) == ["ckpt-2", "ckpt-4"]


def test_other_workers_only_read(workdir):
    directory = _ckpt_dir(workdir)
    _truncate(os.path.join(directory, DATA.format(6)))
    before = _digests(directory)
    assert recovery.newest_readable(directory, set_aside=False) == os.path.join(directory, "ckpt-4")
    assert _digests(directory) == before


def test_damaged_or_missing_state_file_finds_checkpoints_by_name(workdir, caplog):
    directory = _ckpt_dir(workdir)
    state = os.path.join(directory, "checkpoint")
    with open(state, "w") as f:
        f.write("model_checkpoint_path: ckpt-6 ???\n")
    caplog.set_level(logging.INFO)
    assert recovery.newest_readable(directory) == os.path.join(directory, "ckpt-6")
    assert "checkpoint state file" in caplog.text and "is damaged" in caplog.text
    with open(os.path.join(directory, "unreadable", "checkpoint")) as f:
        assert "???" in f.read()  # kept for inspection
    assert _listed(workdir) == ["ckpt-2", "ckpt-4", "ckpt-6"]

    os.remove(state)
    _truncate(os.path.join(directory, DATA.format(6)))
    assert recovery.newest_readable(directory) == os.path.join(directory, "ckpt-4")
    assert _listed(workdir) == ["ckpt-2", "ckpt-4"]
    assert tf.train.latest_checkpoint(directory) == os.path.join(directory, "ckpt-4")


def test_all_checkpoints_unreadable_stops_with_one_line_and_changes_nothing(workdir, tmp_path):
    directory = _ckpt_dir(workdir)
    _truncate(os.path.join(directory, DATA.format(6)))
    _flip_byte(os.path.join(directory, "ckpt-4.index"), 0.3)
    os.remove(os.path.join(directory, DATA.format(2)))
    before = _digests(directory)
    data_dir = runs.make_synthetic_tfds(str(tmp_path / "data"), num_train=4, num_val=1)
    # The workdir was trained in process under another experiment name, which the script would refuse.
    os.remove(os.path.join(workdir, "config.json"))

    proc = subprocess.run(
        runs.train_command(str(workdir), data_dir, "trainer.train_steps=8"),
        env=runs.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot resume: none of the 3 checkpoint(s) in {directory} is readable")
    for words in (
        f"ckpt-6: {DATA.format(6)}",
        "truncated",
        "ckpt-4: ckpt-4.index",
        "checksum mismatch",
        "ckpt-2: ckpt-2.data-* is missing",
        "new --workdir",
    ):
        assert words in last, last
    assert _digests(directory) == before


def test_readable_checkpoint_of_another_model_keeps_the_mismatch_message(workdir):
    with pytest.raises(checkpoints.CheckpointMismatchError, match="different model or input pipeline"):
        _train(workdir, 8, num_classes=4)
    assert _listed(workdir) == ["ckpt-2", "ckpt-4", "ckpt-6"]
    assert not os.path.exists(os.path.join(_ckpt_dir(workdir), "unreadable"))


# --------------------------------------------------------------------------- save


def _assert_failed_save(error, directory, step, last_good, cause, part=""):
    """`part`: "" when the model checkpoint failed, "input/worker-0/" when the input position did."""
    message = str(error)
    assert "\n" not in message
    for words in (
        f"cannot save checkpoint {directory}/{part}ckpt-{step}: {cause}",
        "A checkpoint needs about",
        f"(the size of {directory}/{part}ckpt-{last_good})",
        "free there",
        "Its partial files were removed",
        f"the last good checkpoint is {directory}/ckpt-{last_good}",
        "rerun the same command: it resumes from there",
    ):
        assert words in message, message
    names = os.listdir(os.path.join(directory, part))
    assert not any(n.startswith(f"ckpt-{step}") for n in names), names
    assert not any(n.startswith("checkpoint.tmp") for n in names), names
    assert tf.train.latest_checkpoint(directory) == os.path.join(directory, f"ckpt-{last_good}")


def test_failed_save_stops_with_one_line_and_the_rerun_resumes(workdir, monkeypatch, caplog):
    from tensorflow.python.ops import io_ops

    directory = _ckpt_dir(workdir)
    real_save_v2 = io_ops.save_v2

    def full_disk(prefix, *args, **kwargs):
        # Writes the shard into ckpt-8_temp/ as TensorFlow does, then fails like a full disk.
        real_save_v2(prefix, *args, **kwargs)
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{prefix.numpy().decode()}; No space left on device"
        )

    monkeypatch.setattr(io_ops, "save_v2", full_disk)
    intact = _digests(directory)
    with pytest.raises(checkpoints.CheckpointSaveError) as info:
        _train(workdir, 8)
    _assert_failed_save(info.value, directory, 8, 6, "No space left on device (ResourceExhaustedError)")
    assert _digests(directory) == intact  # earlier checkpoints and the state file untouched

    monkeypatch.undo()
    caplog.set_level(logging.INFO)
    assert _train(workdir, 8)["step"] == 8
    assert f"Resumed from {directory}/ckpt-6 (step 6)" in caplog.text
    assert _listed(workdir) == ["ckpt-4", "ckpt-6", "ckpt-8"]


def test_first_save_failing_names_the_variables_size(tmp_path, monkeypatch):
    from tensorflow.python.ops import io_ops

    def read_only(prefix, *args, **kwargs):
        raise tf.errors.PermissionDeniedError(None, None, f"{prefix.numpy().decode()}; Permission denied")

    monkeypatch.setattr(io_ops, "save_v2", read_only)
    with pytest.raises(checkpoints.CheckpointSaveError) as info:
        _train(tmp_path, 2)
    message = str(info.value)
    assert "Permission denied (PermissionDeniedError)" in message
    assert "for the variables alone" in message and "there is no earlier checkpoint" in message
    assert "it starts from step 0" in message and "\n" not in message
    assert not os.path.exists(_ckpt_dir(tmp_path)) or os.listdir(_ckpt_dir(tmp_path)) == []


def test_failed_save_on_sigterm_is_the_same_error(tmp_path, monkeypatch):
    """The save TensorFlow's PreemptionCheckpointHandler makes on SIGTERM goes through the same manager."""
    from tensorflow.python.ops import io_ops

    def full_disk(prefix, *args, **kwargs):
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{prefix.numpy().decode()}; No space left on device"
        )

    directory = str(tmp_path / "checkpoints")
    manager = checkpoints.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(tf.zeros([256]))), directory, 3)
    assert manager.save(checkpoint_number=1) == os.path.join(directory, "ckpt-1")
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            None,
            manager,
            termination_config=tf.distribute.experimental.TerminationConfig(exit_fn=lambda: None),
        )
        monkeypatch.setattr(io_ops, "save_v2", full_disk)
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(checkpoints.CheckpointSaveError) as info:
            # As in the training loop, once per step: the handler saves at the step boundary after the signal.
            for _ in range(3):
                handler.save_checkpoint_if_preempted(checkpoint_number=2)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    message = str(info.value)
    assert f"cannot save checkpoint {directory}/ckpt-2: No space left on device" in message
    assert f"the last good checkpoint is {directory}/ckpt-1" in message
    assert sorted(os.listdir(directory)) == ["checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index"]


@contextlib.contextmanager
def _tmpfs(path, size: str):
    """A small tmpfs at `path` (root only), or skip."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield lambda *options: subprocess.run(
            ["mount", "-o", ",".join(("remount", *options)), str(path)], check=True
        )
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_full_and_read_only_disk_on_a_real_filesystem(tmp_path, caplog):
    directory = _ckpt_dir(tmp_path)
    # A step of the tiny model is ~5 KB of model and ~23 KB of input position:
    # 80 KB fills up at step 4 or 6, in one part or the other (page rounding).
    with _tmpfs(directory, "80k") as remount:
        with pytest.raises(checkpoints.CheckpointSaveError) as info:
            _train(tmp_path, 8)
        failed = re.search(
            rf"cannot save checkpoint {directory}/((?:input/worker-0/)?)ckpt-(\d+):", str(info.value)
        )
        assert failed, str(info.value)
        part, step = failed.group(1), int(failed.group(2))
        assert step in (4, 6), str(info.value)
        _assert_failed_save(
            info.value, directory, step, step - 2, "No space left on device (ResourceExhaustedError)", part
        )
        assert f"the last good checkpoint is {directory}/ckpt-{step - 2}." in str(info.value)
        assert "KB free there" in str(info.value)
        checkpoints.verify(os.path.join(directory, f"ckpt-{step - 2}"))

        remount("ro")
        with pytest.raises(checkpoints.CheckpointSaveError) as info:
            _train(tmp_path, 8)
        # Read-only: the model checkpoint of the step after the resume point fails.
        _assert_failed_save(info.value, directory, step, step - 2, "Read-only file system")

        remount("rw", "size=1m")
        caplog.set_level(logging.INFO)
        assert _train(tmp_path, 8)["step"] == 8
        assert f"Resumed from {directory}/ckpt-{step - 2} (step {step - 2})" in caplog.text
        assert _listed(tmp_path)[-1] == "ckpt-8"


@pytest.mark.slow
def test_full_disk_through_the_cli_is_one_line_and_the_rerun_resumes(tmp_path):
    data_dir = runs.make_synthetic_tfds(str(tmp_path / "data"), num_train=4, num_val=1)
    workdir = tmp_path / "run"
    directory = _ckpt_dir(workdir)
    command = runs.train_command(str(workdir), data_dir, "trainer.train_steps=4")

    def run():
        return subprocess.run(command, env=runs.subprocess_env(), capture_output=True, text=True, timeout=900)

    # One checkpoint of the CLI's tiny R-18 (~90 MB) fits in 140 MB, a second does not.
    with _tmpfs(directory, "140m") as remount:
        proc = run()
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(
            f"error: cannot save checkpoint {directory}/ckpt-4: No space left on device"
        ), last
        assert f"the last good checkpoint is {directory}/ckpt-2" in last
        # The model checkpoint of step 2 and, under input/, the input position of step 2.
        assert sorted(os.listdir(directory)) == ["checkpoint", DATA.format(2), "ckpt-2.index", "input"]
        assert sorted(os.listdir(os.path.join(directory, "input", "worker-0"))) == [
            "checkpoint",
            DATA.format(2),
            "ckpt-2.index",
        ]

        remount("size=400m")
        proc = run()
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "(from step 2)" in proc.stderr
        assert tf.train.latest_checkpoint(directory) == os.path.join(directory, "ckpt-4")


# --------------------------------------------------------------------------- leftovers


def test_start_removes_partial_folders_of_killed_saves_only(workdir, caplog):
    directory = _ckpt_dir(workdir)
    partial = os.path.join(directory, "ckpt-8_temp")
    os.makedirs(partial)
    with open(os.path.join(partial, "part-00000-of-00001.data-00000-of-00001.tempstate123"), "wb") as f:
        f.write(b"\0" * 4096)
    state_tmp = os.path.join(directory, f"checkpoint.tmp{uuid.uuid4().hex}")
    with open(state_tmp, "w") as f:
        f.write("model_checkpoint_path: ")
    keep = [os.path.join(directory, "ckpt-8_temp.txt"), os.path.join(directory, "notes_temp")]
    open(keep[0], "w").close()
    os.makedirs(keep[1])
    caplog.set_level(logging.INFO)

    assert _train(workdir, 8)["step"] == 8

    assert not os.path.exists(partial) and not os.path.exists(state_tmp)
    assert all(os.path.exists(p) for p in keep)
    assert f"Removed {partial} (4.0 KB), left by an interrupted checkpoint save" in caplog.text
    assert f"Resumed from {directory}/ckpt-6 (step 6)" in caplog.text
