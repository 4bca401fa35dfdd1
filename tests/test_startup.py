"""Scripts start quietly: no TensorFlow C++ start-up notices, no library INFO chatter, unless asked."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

from fcn_tf import startup
from harness import runs

# The start-up notices a user saw before the first useful line (one pattern each).
NOTICES = (
    "absl::InitializeLog",
    "cudart_stub",
    "cuInit",
    "port.cc",
    "cpu_feature_guard",
    "To enable the following",
)


def _quiet_env():
    # As a user runs a script: no TF_CPP_MIN_LOG_LEVEL of their own (the test harness sets one).
    env = runs.subprocess_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL")
    return env


def _script(name, *args, env=None):
    out = subprocess.run(
        [sys.executable, f"{runs.REPO}/scripts/{name}", *args],
        env=env or _quiet_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_the_demo_scripts_start_without_notices_and_say_what_they_prepare(tmp_path):
    raw, data_dir = tmp_path / "raw", tmp_path / "tfds"
    made = _script("make_synthetic.py", f"--output_dir={raw}", "--num_train=4", "--num_val=2")
    prepared = _script(
        "prepare_data.py",
        "--dataset=synthetic",
        f"--manual_dir={raw}",
        f"--data_dir={data_dir}",
        "--allow_count_mismatch",
    )
    for output in (made, prepared):
        assert not [line for line in output.splitlines() if any(n in line for n in NOTICES)], output[:3000]
    assert "Downloading" not in prepared and "downloaded" not in prepared, prepared[:3000]
    assert re.search(rf"Preparing synthetic \S+ from the raw files in {re.escape(str(raw))}", prepared), (
        prepared
    )
    assert "Prepared synthetic in" in prepared


def test_the_notices_are_shown_when_asked(tmp_path):
    # Not vacuous: the same script shows them with --verbosity=1 or the user's own TF_CPP_MIN_LOG_LEVEL.
    for args, env in ((["--verbosity=1"], None), ([], dict(_quiet_env(), TF_CPP_MIN_LOG_LEVEL="0"))):
        output = _script(
            "make_synthetic.py", f"--output_dir={tmp_path}", "--num_train=1", "--num_val=1", *args, env=env
        )
        assert "absl::InitializeLog" in output and "cudart_stub" in output, output[:2000]


def test_warnings_and_errors_pass_the_filter():
    no_gpu = True
    assert startup.is_notice("I0000 00:00:1.2 123 port.cc:153] oneDNN custom operations are on.", no_gpu)
    assert startup.is_notice("E0000 00:00:1.5 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL", no_gpu)
    # Where a GPU could be there, a failed cuInit is a real error.
    assert not startup.is_notice(
        "E0000 00:00:1.5 1 cuda_platform.cc:52] failed call to cuInit: INTERNAL", False
    )
    for line in (
        "W0000 00:00:1.2 1 x.cc:1] a real warning",
        "E0000 00:00:1.2 1 x.cc:1] an error",
        "Traceback",
    ):
        assert not startup.is_notice(line, no_gpu)


def test_verbosity_from_the_command_line_or_the_users_log_level():
    assert not startup.verbose_requested(["s.py", "--x=1"], environ={})
    for argv in (["s.py", "--verbosity=1"], ["s.py", "-v", "2"], ["s.py", "--v=1"]):
        assert startup.verbose_requested(argv, environ={}), argv
    assert not startup.verbose_requested(["s.py", "--verbosity=0"], environ={})
    assert startup.verbose_requested(["s.py"], environ={"TF_CPP_MIN_LOG_LEVEL": "0"})
    # The level a quiet start set (inherited by child processes) is not the user's.
    assert not startup.verbose_requested(["s.py"], environ={"TF_CPP_MIN_LOG_LEVEL": "1", startup._OURS: "1"})


def test_library_info_lines_are_dropped_and_ours_kept():
    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "message", None, None)

    drop = startup._DropLibraryInfo()
    assert not drop.filter(logging.LogRecord("tensorflow", logging.INFO, "app.py", 1, "watcher", None, None))
    sharding = os.path.join("site-packages", "tensorflow", "python", "checkpoint", "functional_saver.py")
    assert not drop.filter(record(sharding, logging.INFO))  # "Sharding callback duration" at each checkpoint
    assert drop.filter(record(sharding, logging.WARNING))
    assert drop.filter(record(os.path.join(runs.REPO, "fcn_tf", "training", "loop.py"), logging.INFO))


def test_run_time_notices_are_dropped_and_warnings_kept():
    no_gpu = True
    assert startup.is_notice(
        "W0000 00:00:1.2 30062 dataset.h:598] FAILED_PRECONDITION: DatasetToSingleElement is stateful.",
        no_gpu,
    )
    assert startup.is_notice(
        "E0000 00:00:1.2 30021 util.cc:131] oneDNN supports DT_UINT8 only on platforms with AVX-512. Falling "
        "back to the default Eigen-based implementation if present.",
        no_gpu,
    )
    assert not startup.is_notice("W0000 00:00:1.2 1 dataset.h:598] FAILED_PRECONDITION: other state.", no_gpu)
    # absl's Python log lines (ours) look like glog's but carry the real date: they pass.
    assert not startup.is_notice("I1202 12:07:18.052030 139807 sources.py:144] Preparing synthetic", no_gpu)


def test_the_filter_keeps_every_line_of_a_crash_and_of_a_normal_exit():
    # The filter is a process of its own: a script killed outright still has its last lines shown.
    lines_then = (
        "import os, sys; from fcn_tf import startup; startup.start(devices_now=False); "
        "os.write(2, b'I0000 00:00:1.2 1 port.cc:153] notice\\n'); "
        "[sys.stderr.write('line %d\\n' % i) for i in range(500)]; sys.stderr.flush()"
    )
    for ending, returncode in (("; os.kill(os.getpid(), 9)", -9), ("", 0)):
        out = subprocess.run(
            [sys.executable, "-c", lines_then + ending],
            env=_quiet_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == returncode, out.stderr[-2000:]
        lines = out.stderr.splitlines()
        assert [line for line in lines if line.startswith("line ")] == [f"line {i}" for i in range(500)]
        assert not any("port.cc" in line for line in lines)
