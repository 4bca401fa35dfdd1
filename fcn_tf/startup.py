"""What every script runs first: oneDNN preference and a quiet start unless asked otherwise.

TensorFlow's C++ start-up messages ("Could not find cuda drivers", "failed
call to cuInit", the oneDNN and CPU-instruction notices, each after "All log
messages before absl::InitializeLog() is called") are written to file
descriptor 2 while TensorFlow is imported and its devices are listed, before
`TF_CPP_MIN_LOG_LEVEL` applies to some of them (even level 3 prints four of
them). `start` runs both with descriptor 2 captured and passes on every line
but those notices and TensorFlow's INFO lines: warnings and errors still
reach the user. It also keeps the INFO lines of TensorFlow, TFDS and Keras
out of absl's log (e.g. "Sharding callback duration" at every checkpoint);
the project's own INFO lines (training progress) stay.

All of it is skipped, and every line shown, when the user asks: absl's
`--verbosity=1` (or `-v 1`) on the command line, or their own
`TF_CPP_MIN_LOG_LEVEL`. Nothing of TensorFlow is imported before `start`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading

from fcn_tf import devices

# Start-up notices that say nothing the user can act on (matched per line).
_NOTICES = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    re.compile(r"^To enable the following instructions: .*rebuild TensorFlow"),
    # glog INFO lines (the oneDNN, CPU-instruction and CUDA-driver notices).
    re.compile(r"^I\d{4} "),
)
# cuInit fails wherever no NVIDIA driver or no visible GPU is there: noise there only.
_CUINIT = re.compile(r"^E\d{4} .*failed call to cuInit")
# Libraries whose INFO log lines are chatter to a script's user.
_CHATTY = ("tensorflow", "tensorflow_datasets", "keras", "tf_keras", "etils")


# Set beside TF_CPP_MIN_LOG_LEVEL by `start`: the level is ours, not the user's
# (child processes inherit both and start quietly too).
_OURS = "FCN_TF_QUIET_START"


def verbose_requested(argv: list[str], environ=os.environ) -> bool:
    """Whether the user asked for TensorFlow's own messages: --verbosity/-v >= 1 or their TF_CPP_MIN_LOG_LEVEL."""
    if "TF_CPP_MIN_LOG_LEVEL" in environ and _OURS not in environ:
        return True
    for i, arg in enumerate(argv[1:], 1):
        match = re.fullmatch(r"--?(?:verbosity|v)(?:=(.*))?", arg)
        if match:
            value = (
                match.group(1) if match.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else "")
            )
            with contextlib.suppress(ValueError):
                return int(value) >= 1
    return False


def _no_gpu_here(environ=os.environ) -> bool:
    return environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1") or not os.path.exists("/dev/nvidiactl")


def is_notice(line: str, no_gpu: bool) -> bool:
    """Whether a captured stderr line is a start-up notice (dropped) rather than a warning or error."""
    return any(p.match(line) for p in _NOTICES) or (no_gpu and bool(_CUINIT.match(line)))


@contextlib.contextmanager
def _filtered_stderr():
    """File descriptor 2 through a filter: each line is passed on as it comes, notices dropped."""
    no_gpu = _no_gpu_here()
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()

    def forward():
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:
                if not is_notice(raw.decode(errors="replace"), no_gpu):
                    os.write(original, raw)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the thread reads to its end
        thread.join()
        os.close(original)


class _DropLibraryInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        # TensorFlow's own logger, or absl's called from a library module.
        return record.name.split(".")[0] not in _CHATTY and not any(
            f"{os.sep}{name}{os.sep}" in record.pathname for name in _CHATTY
        )


def start(onednn: bool = False, argv: list[str] | None = None, devices_now: bool = True) -> None:
    """A script's first call: before anything imports TensorFlow.

    Args:
      onednn: prefer TensorFlow's oneDNN CPU kernels (`devices.prefer_onednn`;
        the training, evaluation and prediction scripts).
      argv: the command line (default `sys.argv`), read for `--verbosity`.
      devices_now: also start TensorFlow's devices here. False where a
        cluster resolver must choose this process's GPUs first
        (`SlurmClusterResolver` sets CUDA_VISIBLE_DEVICES, which the first
        device query fixes): the script calls `start_devices` after it.
    """
    if onednn:
        devices.prefer_onednn()
    if verbose_requested(sys.argv if argv is None else argv):
        return
    # TensorFlow's C++ INFO lines after start-up; warnings and errors stay.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"
    os.environ[_OURS] = "1"
    from absl import logging as absl_logging

    # absl's handler on the root logger before TensorFlow is imported: TensorFlow
    # then logs through it (it adds a handler of its own only to a bare root logger).
    absl_logging.use_absl_handler()
    absl_logging.get_absl_handler().addFilter(_DropLibraryInfo())
    with _filtered_stderr():
        import tensorflow  # noqa: F401

    global _quiet
    _quiet = True
    if devices_now:
        start_devices()


# Whether `start` chose the quiet start (`start_devices` filters then too).
_quiet = False


def start_devices() -> None:
    """Starts TensorFlow's device platforms (cuInit), quietly where `start` was.

    `start` calls it unless told not to; train.py calls it once its cluster
    resolver has set the GPUs this process may use.
    """
    import tensorflow as tf

    with _filtered_stderr() if _quiet else contextlib.nullcontext():
        tf.config.list_physical_devices()
