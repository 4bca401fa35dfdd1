"""What every benchmark shares: the measurement record, the child-process protocol, the readings.

Every quoted figure comes from a fresh Python process: peak resident memory
is a per-process high-water mark, thread pools and the oneDNN switch are
fixed when TensorFlow starts, and one model's allocations must not hide the
next one's. The parent runs

    python -m benchmarks.harness MODULE:FUNCTION JSON

in a child with the environment it chose; the child calls the function and
prints one `RESULT <json>` line, which `run_child` parses. The JSON is
either {"measurement": {...}} (the function gets a `Measurement`) or
{"kwargs": {...}} (the function gets keyword arguments).

This module imports neither TensorFlow nor torch at import time, so the
parent process stays light and the torch side never loads TensorFlow.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

RESULT_PREFIX = "RESULT "
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The function each framework's measurements run in the child.
RUNNERS = {"tf": "benchmarks.model:run_tf", "torch": "benchmarks.torch_side:run_torch"}


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One benchmark run, executed in its own process.

    Attributes:
      label: row name in the printed table.
      framework: "tf" (this project) or "torch" (torchvision).
      what: "train" (one optimizer step), "infer" (whole-image forward,
        main path only) or "slide" (sliding-window inference of one image).
      model: for "tf" the `ModelConfig` fields; for "torch"
        {"arch": "fcn_resnet50" | "fcn_resnet101", "num_classes": C}.
      batch: images per replica per forward pass (per window call for
        "slide": windows). A step takes batch x replicas x grad_accum images.
      size: (h, w) of the input (the whole image for "slide").
      warmup: untimed calls first (tracing, XLA compilation, allocator).
      repeats: timed calls; the median is quoted.
      threads: intra-op threads (torch.set_num_threads for torch).
      inter_op_threads: TensorFlow's inter-op pool (0: TensorFlow's default;
        -1: what scripts/train.py uses by default, `fcn_tf.devices.set_inter_op_threads(-1)`).
      jit_compile: compile the step / forward with XLA (tf only).
      precision: "float32", "mixed_bfloat16" or "mixed_float16" (tf only).
      fold_bn: fold BatchNorm into the convolutions for inference (tf only).
      onednn: "default", "on" or "off": TF_ENABLE_ONEDNN_OPTS (tf only).
      flops: also count the model's FLOPs per image with the profiler.
      experiment: experiment name (loss/optimizer settings for "train",
        eval window settings for "slide").
      seed: seed of the weights and the random inputs.
      device: "cpu" (GPUs hidden from the child) or "gpu" (tf only; peak
        device memory is read too).
      replicas: replicas of a MirroredStrategy (GPUs, or logical CPUs on
        "cpu"); 1: no strategy.
      keras_sync_bn: with several replicas, Keras' synchronized BatchNorm
        instead of fcn_tf's packed one (the side-by-side comparison).
      grad_accum: micro-batches accumulated per optimizer step
        (`trainer.grad_accum_steps`, "train" only).
    """

    label: str
    framework: str
    what: str
    model: dict
    batch: int = 2
    size: tuple[int, int] = (512, 512)
    warmup: int = 1
    repeats: int = 3
    threads: int = 2
    inter_op_threads: int = 0
    jit_compile: bool = False
    precision: str = "float32"
    fold_bn: bool = False
    onednn: str = "default"
    flops: bool = False
    experiment: str = ""
    seed: int = 0
    device: str = "cpu"
    replicas: int = 1
    grad_accum: int = 1
    keras_sync_bn: bool = False

    @property
    def images_per_call(self) -> int:
        """Images one timed call processes (one image for "slide", whatever its windows)."""
        if self.what == "slide":
            return 1
        return self.batch * self.replicas * (self.grad_accum if self.what == "train" else 1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Measurement:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, values: dict) -> Measurement:
        return cls(**{**values, "size": tuple(values["size"])})


# --------------------------------------------------------------------------- readings


def peak_rss_mb(*seen: float) -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB).

    At least the current size and every earlier reading `seen` (MiB): the
    kernel updates its high-water mark from per-thread counters in batches,
    so right after a growth it can lag the resident size by a few pages, and
    once the process shrinks it may never catch up with a reading taken then.
    """
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, current_rss_mb(), *seen)


def current_rss_mb() -> float:
    """This process's current resident set size in MiB (from /proc; psutil not needed)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def device_peak_mb(devices: Sequence[str]) -> list[float]:
    """Peak memory TensorFlow's allocator held on each device since the last reset, in MiB.

    Args:
      devices: TensorFlow device names, e.g. ["GPU:0", "GPU:1"].
    """
    import tensorflow as tf

    return [tf.config.experimental.get_memory_info(d)["peak"] / 2**20 for d in devices]


def load_average() -> float:
    """The 1-minute load average (how perturbed a timing is on a shared machine); nan if unknown."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after `warmup` untimed calls.

    `fn` must return only when its work is done (the callers fetch a value of
    the result to the host, which waits for every op it depends on).

    Args:
      fn: the call to time, without arguments.
      warmup: untimed calls first.
      repeats: timed calls.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------- the child-process protocol


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that cap the BLAS / OpenMP pools of a child process."""
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}


def child_env(measurement: Measurement) -> dict[str, str]:
    """The environment of a child running `measurement` (or its roofline).

    Thread caps, the oneDNN switch (TensorFlow reads it at import), GPUs
    hidden for "cpu" measurements, and the repository on PYTHONPATH so the
    child imports the same `benchmarks` and `fcn_tf`.
    """
    # threads 0 (GPU rows): the libraries' own defaults.
    env = {
        **(thread_env(measurement.threads) if measurement.threads > 0 else {}),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    if measurement.onednn != "default":
        env["TF_ENABLE_ONEDNN_OPTS"] = "1" if measurement.onednn == "on" else "0"
    if measurement.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_child(target: str, payload: dict, env: dict[str, str] | None = None, timeout: float = 3600.0) -> Any:
    """Runs `target` ("module:function") in a fresh Python process; returns what it returned.

    Args:
      target: the function the child calls.
      payload: {"measurement": {...}} or {"kwargs": {...}}, JSON-serializable.
      env: variables added to this process's environment.
      timeout: seconds before the child is killed.

    Raises:
      RuntimeError: the child failed, printed no result or timed out (the
        message holds the end of its output).
    """
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, full_env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "benchmarks.harness", target, json.dumps(payload)]
    try:
        out = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from error
    for line in reversed(out.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    if out.returncode < 0:
        # Killed: its own output does not say why (SIGKILL is usually the out-of-memory killer).
        name = signal.Signals(-out.returncode).name
        raise RuntimeError(
            f"killed by {name} (out of memory?), after {out.stdout.count(chr(10))} lines of output"
        )
    tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-5:])
    raise RuntimeError(f"exit {out.returncode}: {tail}")


def run_isolated(measurement: Measurement, timeout: float = 3600.0) -> dict:
    """Runs `measurement` in a fresh Python process and returns its result dict.

    A failure returns {"label", "error"} instead of raising, so one failing
    row does not lose the others.

    Args:
      measurement: what to run.
      timeout: seconds before the child is killed.
    """
    payload = {"measurement": dataclasses.asdict(measurement)}
    try:
        return run_child(RUNNERS[measurement.framework], payload, child_env(measurement), timeout)
    except RuntimeError as error:
        return {"label": measurement.label, "error": str(error)}


def _child_main(argv: Sequence[str]) -> None:
    if len(argv) != 3:
        raise SystemExit("usage: python -m benchmarks.harness MODULE:FUNCTION JSON")
    module, _, name = argv[1].partition(":")
    function = getattr(importlib.import_module(module), name)
    payload = json.loads(argv[2])
    if "measurement" in payload:
        # The importable module's class, not this __main__ copy's.
        from benchmarks.harness import Measurement as Record

        result = function(Record.from_dict(payload["measurement"]))
    else:
        result = function(**payload["kwargs"])
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    _child_main(sys.argv)
