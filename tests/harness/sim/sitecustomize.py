"""Simulated machine for a test's child process (loaded by Python at start-up from PYTHONPATH).

`harness.cluster` puts this folder first on a child's PYTHONPATH and describes
the machine to simulate in the `FCN_TF_SIM` variable (JSON, see
`harness.cluster.Sim`). Python imports `sitecustomize` before the child's own
code, so the child runs unmodified (`scripts/train.py` as a user runs it) on:

* `logical_cpus`: the CPU split into that many logical devices as soon as
  TensorFlow is imported (before any op can initialize the devices), which
  are also MultiWorkerMirroredStrategy's local replicas (as a worker's GPUs
  would be);
* `tf_gpus` / `tf_tpus`: that many GPUs / TPUs in TensorFlow's device lists
  (`tf.config.list_physical_devices` and `list_logical_devices`; nothing can
  run on them: for decisions made from device queries);
* `platform`: what TensorFlow's failure handling takes the machine for
  (`failure_handling_util.detect_platform`, e.g. "GCE_GPU"), and `on_gcp`;
* `trace`: a file where every device query, TensorFlow's device
  initialization and every Slurm resolver call is appended in order, one
  JSON line each, so a test can check what happened before what.

Nothing is patched when `FCN_TF_SIM` is unset. A real `sitecustomize` found
later on the path is not shadowed: it is executed too.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import time

_SIM = json.loads(os.environ.get("FCN_TF_SIM") or "{}")


def _trace(event: str, **details) -> None:
    path = _SIM.get("trace")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, "pid": os.getpid(), "time": time.time(), **details}) + "\n")


def _fake_devices(tf, kind: str, count: int, logical: bool):
    if logical:
        return [tf.config.LogicalDevice(name=f"/device:{kind}:{i}", device_type=kind) for i in range(count)]
    return [
        tf.config.PhysicalDevice(name=f"/physical_device:{kind}:{i}", device_type=kind) for i in range(count)
    ]


def _patch_device_lists(tf) -> None:
    from tensorflow.python.eager import context

    fake = {"GPU": int(_SIM.get("tf_gpus", 0)), "TPU": int(_SIM.get("tf_tpus", 0))}

    def wrap(original, logical):
        def listed(self, device_type=None):
            _trace("list_logical_devices" if logical else "list_physical_devices", device_type=device_type)
            devices = [
                d
                for d in original(self, device_type)
                if d.device_type not in ("GPU", "TPU") or not fake[d.device_type]
            ]
            for kind, count in fake.items():
                if count and device_type in (None, kind):
                    devices += _fake_devices(tf, kind, count, logical)
            return devices

        return listed

    context.Context.list_physical_devices = wrap(context.Context.list_physical_devices, False)
    context.Context.list_logical_devices = wrap(context.Context.list_logical_devices, True)
    initialize = context.Context.ensure_initialized

    def ensure_initialized(self):
        if self._context_handle is None:
            _trace("tensorflow_initialized")
        return initialize(self)

    context.Context.ensure_initialized = ensure_initialized


def _patch_platform() -> None:
    from tensorflow.python.distribute.failure_handling import failure_handling_util as util

    if "platform" in _SIM:
        platform = util.PlatformDevice[_SIM["platform"]]
        util.detect_platform = lambda: platform
    if "on_gcp" in _SIM:
        util.on_gcp = lambda: bool(_SIM["on_gcp"])


def _patch_slurm() -> None:
    from tensorflow.python.distribute.cluster_resolver import slurm_cluster_resolver as slurm

    cluster_spec = slurm.SlurmClusterResolver.cluster_spec

    def traced(self):
        spec = cluster_spec(self)
        _trace("slurm_cluster_spec", cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
        return spec

    slurm.SlurmClusterResolver.cluster_spec = traced


def _patch_multiworker_devices(cpus: int) -> None:
    """MultiWorkerMirroredStrategy takes `cpus` logical CPUs as its local replicas, as it takes a machine's GPUs.

    TensorFlow's strategy uses one CPU device per worker whatever the logical
    devices: without this, several replicas per worker (the multi-GPU case)
    cannot be simulated on a CPU.
    """
    from tensorflow.python.distribute import collective_all_reduce_strategy as collective

    initialize = collective.CollectiveAllReduceExtended._initialize_local_devices

    def local_devices(self, cluster_resolver, worker_device):
        devices, kind = initialize(self, cluster_resolver, worker_device)
        if kind == "CPU":
            devices = tuple(f"{worker_device}/device:CPU:{i}" for i in range(cpus))
        return devices, kind

    collective.CollectiveAllReduceExtended._initialize_local_devices = local_devices


def _after_tensorflow_import(tf) -> None:
    cpus = int(_SIM.get("logical_cpus", 1))
    if cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpus)
        _patch_multiworker_devices(cpus)
    _patch_device_lists(tf)
    _patch_platform()
    _patch_slurm()
    _trace("tensorflow_imported")


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `_after_tensorflow_import` once `tensorflow` has finished importing."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            _after_tensorflow_import(module)

        loader.exec_module = exec_then_patch
        return spec


def _chain_real_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if os.path.abspath(entry or ".") == here:
            continue
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [entry])
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return


if _SIM:
    sys.meta_path.insert(0, _AfterImport())
_chain_real_sitecustomize()
