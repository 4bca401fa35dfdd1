"""What every script runs first: oneDNN preference and a quiet start unless asked otherwise.

TensorFlow's C++ start-up messages ("Could not find cuda drivers", "failed
call to cuInit", the oneDNN and CPU-instruction notices, each after "All log
messages before absl::InitializeLog() is called") are written to file
descriptor 2 while TensorFlow is imported and its devices are listed, before
`TF_CPP_MIN_LOG_LEVEL` applies to some of them (even level 3 prints four of
them). `start` routes descriptor 2 through a filter process for the whole
run and passes on every line but those notices, TensorFlow's INFO lines and
two run-time notices that say nothing a user can act on (tf.data's
"DatasetToSingleElement is stateful" once per record read, oneDNN's fall-back
for a byte-typed op): warnings and errors still reach the user, a crash's
output included (the filter outlives the script). It also keeps the INFO lines of TensorFlow, TFDS and Keras
out of absl's log (e.g. "Sharding callback duration" at every checkpoint);
the project's own INFO lines (training progress) stay.

All of it is skipped, and every line shown, when the user asks: absl's
`--verbosity=1` (or `-v 1`) on the command line, or their own
`TF_CPP_MIN_LOG_LEVEL`. Nothing of TensorFlow is imported before `start`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import sys
import time

from fcn_tf import devices

# Start-up notices that say nothing the user can act on (matched per line).
_NOTICES = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    re.compile(r"^To enable the following instructions: .*rebuild TensorFlow"),
    # TensorFlow's C++ INFO lines (the oneDNN, CPU-instruction and CUDA-driver notices). They are
    # dated "0000 00:00:" (absl::InitializeLog is never called); absl's Python log lines, ours
    # included, carry the real date and pass.
    re.compile(r"^I0000 00:00:"),
    # tf.data checking a symbolically checkpointed pipeline, once per element read: the
    # one-record read (`fcn_tf.data.pipeline`) is a pure function of its index.
    re.compile(r"^W0000 00:00:.*DatasetToSingleElement is stateful"),
    # oneDNN falls back to TensorFlow's own kernel for a byte-typed op (the label crop's transpose).
    re.compile(r"^E0000 00:00:.*oneDNN supports DT_U?INT8 only on platforms with AVX-512"),
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


def _filter_stderr() -> None:
    """Routes file descriptor 2 through a filter process for the rest of the run.

    Each line is passed on as it comes, notices dropped. A process, not a
    thread: if this process dies (a crash, a signal), the filter still drains
    what was written and exits at the end of its input, so no crash output is
    lost; at a normal exit this process waits for it (`_finish_filter`).
    """
    no_gpu = _no_gpu_here()
    sys.stdout.flush()
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the filter: outlives a crash of the script, not its input
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.close(write_end)
        try:
            with os.fdopen(read_end, "rb") as pipe:
                for raw in pipe:
                    if not is_notice(raw.decode(errors="replace"), no_gpu):
                        os.write(original, raw)
        finally:
            os._exit(0)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    atexit.register(_finish_filter, pid, original)


def _finish_filter(pid: int, original: int) -> None:
    # Gives file descriptor 2 back (closing this process's end of the pipe) and lets
    # the filter write its last lines; child processes still holding the pipe do not block the exit.
    sys.stderr.flush()
    os.dup2(original, 2)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
        time.sleep(0.01)


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
    _filter_stderr()
    if devices_now:
        start_devices()


def start_devices() -> None:
    """Starts TensorFlow's device platforms (cuInit).

    `start` calls it unless told not to; train.py calls it once its cluster
    resolver has set the GPUs this process may use.
    """
    import tensorflow as tf

    tf.config.list_physical_devices()
