"""A cluster simulated on this machine: worker processes on 127.0.0.1, each on a simulated machine.

No machine here has a GPU or a cluster, so cluster behaviour is tested the way
a launcher would run the job, with every piece a launcher or a machine
contributes simulated:

* the launcher: `TF_CONFIG` (Kubernetes operators, most launchers) or the
  variables `srun` sets (SLURM_PROCID, SLURM_STEP_NUM_TASKS,
  SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE, SLURM_LOCALID, ...), one
  process per task, ports on 127.0.0.1 (one node);
* the machine (`Sim`): logical CPU devices as replicas, an `nvidia-smi` on
  PATH that lists GPUs, TensorFlow's device lists and platform detection
  patched, a trace of device queries (`tests/harness/sim/sitecustomize.py`);
* the run: the real command (`scripts/train.py ...`) in each process, its
  output in a file per worker, signals sent when a worker's output shows a
  line, every process killed at the end whatever happened.

Typical use::

    with Cluster(tmp_path, workers=2, sim=Sim(logical_cpus=2)) as cluster:
        cluster.start(lambda k: runs.train_command(workdir, data_dir))
        cluster.wait_for(0, r"step 3/")
        cluster.signal(1, signal.SIGTERM)
        results = cluster.wait()
    assert [r.returncode for r in results] == [143, 143]
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from harness import runs

SIM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sim")


@dataclasses.dataclass(frozen=True)
class Sim:
    """The machine a simulated worker runs on (see `sim/sitecustomize.py`).

    Attributes:
      logical_cpus: replicas on this worker: the CPU split into that many
        logical devices before TensorFlow initializes.
      gpus: GPUs an `nvidia-smi` on PATH lists (0: no `nvidia-smi`, as a
        machine without the NVIDIA driver). TensorFlow itself sees none
        unless `tf_gpus` says so.
      tf_gpus: GPUs in TensorFlow's device lists (patched; nothing runs on them).
      tf_tpus: TPUs in TensorFlow's device lists (patched).
      platform: TensorFlow's failure-handling platform, a `PlatformDevice`
        name ("GCE_GPU", "GCE_CPU", "GCE_TPU", "INTERNAL_CPU", ...); None: real.
      on_gcp: what TensorFlow's `on_gcp()` answers; None: real.
      trace: record device queries, TensorFlow's initialization and Slurm
        resolver calls in order (`Cluster.trace(k)` reads them).
      cuda_visible_devices: CUDA_VISIBLE_DEVICES as the launcher sets it
        (None: unset).
    """

    logical_cpus: int = 1
    gpus: int = 0
    tf_gpus: int = 0
    tf_tpus: int = 0
    platform: str | None = None
    on_gcp: bool | None = None
    trace: bool = False
    cuda_visible_devices: str | None = None


@dataclasses.dataclass
class Result:
    """How one worker process ended."""

    index: int
    returncode: int
    output: str  # stdout and stderr, interleaved as written

    def lines(self, pattern: str) -> list[str]:
        return [line for line in self.output.splitlines() if re.search(pattern, line)]


def free_ports(count: int) -> list[int]:
    """`count` ports free on 127.0.0.1 now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def consecutive_free_ports(count: int) -> int:
    """A first port such that it and the next `count - 1` are free (Slurm's port_base rule)."""
    for _ in range(100):
        (base,) = free_ports(1)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


def tf_config(ports: Sequence[int], index: int, chief: bool = False) -> str:
    """TF_CONFIG of task `index` in a cluster of workers on `ports` (the first one the chief if `chief`)."""
    addresses = [f"127.0.0.1:{p}" for p in ports]
    if chief:
        cluster = {"chief": addresses[:1], "worker": addresses[1:]}
        task = {"type": "chief", "index": 0} if index == 0 else {"type": "worker", "index": index - 1}
    else:
        cluster, task = {"worker": addresses}, {"type": "worker", "index": index}
    return json.dumps({"cluster": cluster, "task": task})


def slurm_env(rank: int, tasks: int) -> dict[str, str]:
    """The variables `srun --ntasks=TASKS` sets for task `rank` on one node (this machine, 127.0.0.1).

    One node only: the workers of a simulated job all listen on this machine,
    and Slurm's rule (task i of a node listens on port_base + i) would give
    the tasks of two nodes the same ports.
    """
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": str(tasks),
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_STEP_NODELIST": "127.0.0.1",
        "SLURM_STEP_TASKS_PER_NODE": str(tasks),
        "SLURM_STEP_NUM_NODES": "1",
    }


def write_fake_nvidia_smi(folder: str, gpus: int) -> str:
    """An `nvidia-smi` that lists `gpus` GPUs (`-L` / `--list-gpus`); returns its folder for PATH."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "nvidia-smi")
    listing = "".join(
        f"GPU {i}: NVIDIA A100-SXM4-40GB (UUID: GPU-00000000-0000-0000-0000-00000000000{i})\\n"
        for i in range(gpus)
    )
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nprintf "{listing}"\n')
    os.chmod(path, 0o755)
    return folder


class Cluster:
    """Worker processes of one simulated job; a context manager that kills them all on exit.

    Args:
      root: a folder of the test's own (outputs, traces, the fake nvidia-smi).
      workers: processes (tasks) of the job.
      sim: the machine each worker runs on; one `Sim` for all or one per worker.
      launcher: "tf_config" (TF_CONFIG with workers on free ports), "slurm"
        (Slurm variables; the resolver picks ports from `port_base`) or
        "none" (no cluster variables: single processes).
      chief: with "tf_config", the first task is a "chief" task.
      env: extra variables for every worker.
    """

    def __init__(
        self,
        root,
        workers: int = 2,
        sim: Sim | Sequence[Sim] = Sim(),
        launcher: str = "tf_config",
        chief: bool = False,
        env: dict | None = None,
    ):
        self.root = str(root)
        self.workers = workers
        self.sims = list(sim) if isinstance(sim, (list, tuple)) else [sim] * workers
        assert len(self.sims) == workers
        self.launcher = launcher
        self.chief = chief
        self.extra_env = dict(env or {})
        self.ports = free_ports(workers) if launcher == "tf_config" else []
        self.port_base = consecutive_free_ports(workers) if launcher == "slurm" else None
        self.procs: list[subprocess.Popen | None] = [None] * workers
        self._files = [os.path.join(self.root, f"worker-{k}.log") for k in range(workers)]
        os.makedirs(self.root, exist_ok=True)

    # ------------------------------------------------------------------ environment

    def trace_path(self, index: int) -> str:
        return os.path.join(self.root, f"worker-{index}.trace.jsonl")

    def env(self, index: int) -> dict[str, str]:
        """The complete environment of worker `index`."""
        sim = self.sims[index]
        env = runs.subprocess_env(**self.extra_env)
        env["PYTHONPATH"] = os.pathsep.join([SIM_DIR, env["PYTHONPATH"]])
        env.pop("CUDA_VISIBLE_DEVICES", None)
        if sim.cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = sim.cuda_visible_devices
        spec = {
            k: v
            for k, v in dataclasses.asdict(sim).items()
            if k not in ("gpus", "trace", "cuda_visible_devices")
        }
        spec = {k: v for k, v in spec.items() if v is not None}
        if sim.trace:
            spec["trace"] = self.trace_path(index)
        env["FCN_TF_SIM"] = json.dumps(spec)
        # A machine without the NVIDIA driver has no nvidia-smi: hide the real one if any.
        bin_dir = write_fake_nvidia_smi(os.path.join(self.root, f"bin-{index}"), sim.gpus)
        if not sim.gpus:
            os.remove(os.path.join(bin_dir, "nvidia-smi"))
        env["PATH"] = os.pathsep.join(
            [bin_dir, *(p for p in env["PATH"].split(os.pathsep) if not _has_nvidia_smi(p))]
        )
        if self.launcher == "tf_config":
            env["TF_CONFIG"] = tf_config(self.ports, index, self.chief)
        elif self.launcher == "slurm":
            env.pop("TF_CONFIG", None)
            env.update(slurm_env(index, self.workers))
        return env

    # ------------------------------------------------------------------ processes

    def start(self, command: Callable[[int], Sequence[str]] | Sequence[str], indices=None) -> None:
        """Starts worker k with `command(k)` (or the same command for all), output to its log file."""
        for k in range(self.workers) if indices is None else indices:
            argv = list(command(k) if callable(command) else command)
            if self.launcher == "slurm" and "--cluster=slurm" not in argv and argv[1].endswith("train.py"):
                argv += ["--cluster=slurm", f"--slurm_port_base={self.port_base}"]
            with open(self._files[k], "w") as out:
                self.procs[k] = subprocess.Popen(
                    argv,
                    env=self.env(k),
                    cwd=runs.REPO,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

    def output(self, index: int) -> str:
        with open(self._files[index], errors="replace") as f:
            return f.read()

    def wait_for(self, index: int, pattern: str, timeout: float = 300) -> str:
        """Waits until worker `index`'s output has a line matching `pattern`; returns that line.

        Raises:
          AssertionError: the worker ended or `timeout` passed first (with its output).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output(index).splitlines():
                if re.search(pattern, line):
                    return line
            if self.procs[index].poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"worker {index} never printed /{pattern}/:\n{self.output(index)[-4000:]}")

    def signal(self, index: int, sig: int = signal.SIGTERM) -> None:
        """Sends `sig` to worker `index`'s process (as Kubernetes or Slurm would)."""
        self.procs[index].send_signal(sig)

    def wait(self, timeout: float = 600, indices=None) -> list[Result]:
        """Waits for the workers to end; kills every worker if one is still running after `timeout`."""
        deadline = time.monotonic() + timeout
        indices = list(range(self.workers)) if indices is None else list(indices)
        for k in indices:
            try:
                self.procs[k].wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                self.kill()
                outputs = "\n".join(f"--- worker {j}:\n{self.output(j)[-3000:]}" for j in indices)
                raise AssertionError(
                    f"worker {k} still running after {timeout} s (all killed)\n{outputs}"
                ) from None
        return [Result(k, self.procs[k].returncode, self.output(k)) for k in indices]

    def kill(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def trace(self, index: int) -> list[dict]:
        """The trace of worker `index` (`Sim(trace=True)`): one dict per event, in order."""
        if not os.path.exists(self.trace_path(index)):
            return []
        with open(self.trace_path(index)) as f:
            return [json.loads(line) for line in f if line.strip()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def _has_nvidia_smi(folder: str) -> bool:
    return bool(folder) and os.path.exists(os.path.join(folder, "nvidia-smi"))


def python(code: str) -> list[str]:
    """A command that runs `code` in a fresh interpreter (for checks of a simulated process)."""
    return [sys.executable, "-c", code]
