"""Launchers and machines as they are: Slurm with one task per GPU, the collective, GPU installs, TPUs.

Every case runs without GPUs: `harness.cluster` gives each process a fake
`nvidia-smi`, patched TensorFlow device lists and a trace of device queries.
"""

from __future__ import annotations

import json

import pytest
import tensorflow as tf

from fcn_tf import devices, distribute
from harness import cluster, runs
from harness.cluster import Cluster, Sim


@pytest.mark.parametrize(
    "tasks, visible", [(2, ["0", "1"]), (1, ["0,1"])], ids=["task_per_gpu", "task_per_node"]
)
def test_slurm_tasks_get_their_gpus_before_any_device_query(tmp_path, tasks, visible):
    # srun --ntasks-per-node=TASKS on a node with 2 GPUs; TensorFlow here has no CUDA: each
    # task is refused in one line, after the resolver gave it its share of the GPUs.
    with Cluster(tmp_path, workers=tasks, launcher="slurm", sim=Sim(gpus=2, trace=True)) as job:
        job.start(lambda k: runs.train_command(tmp_path / "run", tmp_path / "data"))
        results = job.wait(timeout=240)
        traces = [job.trace(k) for k in range(tasks)]
    for k, (result, trace) in enumerate(zip(results, traces)):
        assert result.returncode == 1, result.output[-3000:]
        errors = result.lines(r"^error: ")
        assert errors == [
            "error: nvidia-smi lists 2 GPU(s) but TensorFlow sees none (installed without its CUDA libraries?): "
            "pip install -e '.[gpu]' (tensorflow[and-cuda]), or pass --allow_cpu to train on the CPU anyway"
        ], result.output[-3000:]
        events = [e["event"] for e in trace]
        first_query = min(
            i for i, e in enumerate(events) if e.startswith("list_") or e == "tensorflow_initialized"
        )
        resolved = events.index("slurm_cluster_spec")
        assert resolved < first_query, events
        assert trace[resolved]["cuda_visible_devices"] == visible[k]  # its own GPU(s)


def test_collective_auto_is_nccl_on_gpus_and_ring_elsewhere(monkeypatch):
    assert distribute.resolve_collective("auto", gpus=True) == "nccl"
    assert distribute.resolve_collective("auto", gpus=False) == "ring"
    assert distribute.resolve_collective("ring", gpus=True) == "ring"
    assert distribute.resolve_collective("nccl", gpus=False) == "nccl"
    # What make_strategy hands TensorFlow, on a 2-worker TF_CONFIG cluster.
    made = []
    monkeypatch.setattr(
        tf.distribute, "MultiWorkerMirroredStrategy", lambda **kwargs: made.append(kwargs) or kwargs
    )
    monkeypatch.setenv("TF_CONFIG", cluster.tf_config(cluster.free_ports(2), 0))
    implementation = tf.distribute.experimental.CommunicationImplementation
    real = tf.config.list_physical_devices
    gpu = tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")
    for gpus, expected in ((1, implementation.NCCL), (0, implementation.RING)):

        def listed(kind=None, gpus=gpus):
            return [gpu] * gpus if kind == "GPU" else real(kind)

        monkeypatch.setattr(tf.config, "list_physical_devices", listed)
        distribute.make_strategy("auto", "tf_config", "auto")
        assert made[-1]["communication_options"].implementation == expected


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", cluster.write_fake_nvidia_smi(str(tmp_path / "bin"), 2))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.nvidia_smi_gpus() == 2


def test_gpus_the_driver_lists_but_tensorflow_does_not_see_are_refused(fake_nvidia_smi, monkeypatch):
    with pytest.raises(devices.AcceleratorError) as info:
        devices.check_accelerators()
    assert "nvidia-smi lists 2 GPU(s) but TensorFlow sees none" in str(info.value)
    assert "--allow_cpu" in str(info.value) and "\n" not in str(info.value)
    devices.check_accelerators(allow_cpu=True)  # the flag trains on the CPU anyway
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden on purpose
    devices.check_accelerators()


def test_a_tpu_machine_is_refused_in_one_line(monkeypatch):
    real = tf.config.list_physical_devices
    tpu = [tf.config.PhysicalDevice("/physical_device:TPU:0", "TPU")]
    monkeypatch.setattr(
        tf.config, "list_physical_devices", lambda kind=None: tpu if kind == "TPU" else real(kind)
    )
    with pytest.raises(devices.AcceleratorError, match="TPUs, which fcn_tf does not support"):
        devices.check_accelerators(allow_cpu=True)


def test_tf32_is_on_by_default_and_false_gives_exact_float32():
    from fcn_tf.config import ExperimentConfig, TrainerConfig, override
    from fcn_tf.training import apply_training_settings

    previous = tf.config.experimental.tensor_float_32_execution_enabled()
    try:
        config = ExperimentConfig(name="x")
        apply_training_settings(config, tf.distribute.get_strategy())
        assert config.trainer.tf32 and tf.config.experimental.tensor_float_32_execution_enabled()
        apply_training_settings(override(config, "trainer.tf32=false"), tf.distribute.get_strategy())
        assert not tf.config.experimental.tensor_float_32_execution_enabled()
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(previous)
    assert json.loads(json.dumps({"tf32": TrainerConfig().tf32})) == {"tf32": True}
