"""The cluster simulation harness itself: each simulated piece reaches the child process.

The cluster tests (tests/training/, tests/test_distribute.py, ...) rely on
these: a harness whose patch silently did nothing would make them pass
without testing anything.
"""

from __future__ import annotations

import json

from harness.cluster import Cluster, Sim, python

PROBE = """
import json, os, shutil, subprocess
import tensorflow as tf
from tensorflow.python.distribute.failure_handling import failure_handling_util as util
smi = shutil.which("nvidia-smi")
listed = subprocess.run([smi, "--list-gpus"], capture_output=True, text=True).stdout if smi else ""
print("RESULT " + json.dumps({
    "cpus": len(tf.config.list_logical_devices("CPU")),
    "gpus": len(tf.config.list_physical_devices("GPU")),
    "tpus": len(tf.config.list_logical_devices("TPU")),
    "platform": util.detect_platform().name,
    "nvidia_smi_gpus": len(listed.splitlines()),
    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    "slurm_procid": os.environ.get("SLURM_PROCID"),
    "tf_config": os.environ.get("TF_CONFIG"),
}))
"""


def _result(result):
    assert result.returncode == 0, result.output[-3000:]
    return json.loads(result.lines(r"^RESULT ")[-1][len("RESULT ") :])


def test_each_simulated_machine_reaches_its_process(tmp_path):
    sims = [
        Sim(logical_cpus=2, gpus=8, tf_gpus=2, platform="GCE_GPU", trace=True, cuda_visible_devices="3"),
        Sim(logical_cpus=3, tf_tpus=1, platform="GCE_CPU"),
    ]
    with Cluster(tmp_path, workers=2, sim=sims, launcher="none") as cluster:
        cluster.start(python(PROBE))
        first, second = (_result(r) for r in cluster.wait(timeout=120))
        trace = [event["event"] for event in cluster.trace(0)]
    assert first == {
        "cpus": 2,
        "gpus": 2,
        "tpus": 0,
        "platform": "GCE_GPU",
        "nvidia_smi_gpus": 8,
        "cuda_visible_devices": "3",
        "slurm_procid": None,
        "tf_config": None,
    }
    assert (second["cpus"], second["gpus"], second["tpus"], second["platform"]) == (3, 0, 1, "GCE_CPU")
    assert second["nvidia_smi_gpus"] == 0 and second["cuda_visible_devices"] is None
    assert trace[0] == "tensorflow_imported" and "list_logical_devices" in trace
    assert "list_physical_devices" in trace


def test_launchers_give_each_task_its_variables(tmp_path):
    with Cluster(tmp_path / "k8s", workers=2, chief=True) as cluster:
        cluster.start(python(PROBE))
        configs = [json.loads(_result(r)["tf_config"]) for r in cluster.wait(timeout=120)]
    assert [c["task"] for c in configs] == [{"type": "chief", "index": 0}, {"type": "worker", "index": 0}]
    assert configs[0]["cluster"] == configs[1]["cluster"] and len(configs[0]["cluster"]["worker"]) == 1
    with Cluster(tmp_path / "slurm", workers=2, launcher="slurm") as cluster:
        cluster.start(python(PROBE))
        results = [_result(r) for r in cluster.wait(timeout=120)]
    assert [r["slurm_procid"] for r in results] == ["0", "1"]
    assert all(r["tf_config"] is None for r in results)


def test_slurm_resolver_splits_the_fake_gpus_between_tasks(tmp_path):
    # TensorFlow's own SlurmClusterResolver counts GPUs with nvidia-smi and gives
    # each task of the node its share through CUDA_VISIBLE_DEVICES; the trace
    # records the resolver call.
    code = (
        "import json, os\n"
        "from tensorflow.python.distribute.cluster_resolver import SlurmClusterResolver\n"
        "SlurmClusterResolver(port_base=int(os.environ['PORT_BASE'])).cluster_spec()\n"
        "print('RESULT ' + json.dumps({'cuda_visible_devices': os.environ['CUDA_VISIBLE_DEVICES']}))\n"
    )
    with Cluster(tmp_path, workers=2, sim=Sim(gpus=2, trace=True), launcher="slurm") as cluster:
        cluster.extra_env["PORT_BASE"] = str(cluster.port_base)
        cluster.start(python(code))
        results = [_result(r) for r in cluster.wait(timeout=120)]
        events = [[e["event"] for e in cluster.trace(k)] for k in range(2)]
    assert [r["cuda_visible_devices"] for r in results] == ["0", "1"]
    assert all("slurm_cluster_spec" in e for e in events)
