"""The GPU smoke check (`pytest -m gpu`): a few train steps of a small FCN on every visible GPU.

`test_every_gpu_trains_on_the_gpu` runs `fcn_tf.gpu_check.gpu_check` in a fresh
process that sees the GPUs the user's shell sees (the test harness hides
them from the tests themselves), and fails when a convolution, matmul or
BatchNorm op of the step is placed off the GPU or the CPU-only kernels are in
the step's graph; it is skipped where no GPU is visible. The same check runs
on the CPU in every test run, once with the CPU's kernels and once with the
accelerator branch forced, so its placement and graph inspection are tested
where no GPU exists.
"""

import json
import os
import subprocess
import sys

import pytest

from fcn_tf import devices, gpu_check
from harness import runs


@pytest.mark.gpu
def test_every_gpu_trains_on_the_gpu():
    env = runs.subprocess_env()
    user_gpus = os.environ.get("FCN_TF_USER_CUDA_VISIBLE_DEVICES")
    env.pop("CUDA_VISIBLE_DEVICES")
    if user_gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = user_gpus
    code = "import json; from fcn_tf.gpu_check import gpu_check; print('RESULT ' + json.dumps(gpu_check()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(lines[-1][len("RESULT ") :])
    if report["gpus"] == 0:
        pytest.skip("no GPU visible")
    for run in report["runs"]:
        print(run["devices"], run["precision"], f"{run['seconds_per_step']:.3f} s/step", run["placed"])
    assert report["status"] == "ok", report["problems"]


@pytest.mark.parametrize("accelerator_branch", [False, True])
def test_the_check_on_the_cpu(accelerator_branch, monkeypatch):
    if accelerator_branch:
        # The kernels a GPU machine builds, here on the CPU.
        monkeypatch.setattr(devices, "accelerators_visible", lambda: True)
    report = gpu_check.check_train_step(["/cpu:0"], steps=2, image_size=32)
    assert report["problems"] == [], report
    assert report["kernels"] == (["tensorflow"] if accelerator_branch else ["cpu_fast"])
    # The placement was read: convolutions, their gradients and BatchNorms ran on the CPU.
    placed = " ".join(report["placed"])
    for op_type in ("Conv2D", "FusedBatchNorm", "Conv2DBackpropFilter"):
        assert op_type in placed, report["placed"]
    assert (report["cpu_kernel_ops"] == 0) is accelerator_branch
