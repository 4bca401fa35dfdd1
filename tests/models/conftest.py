"""Fixtures shared by the layer and kernel tests: the kernel choices, and a rerun under oneDNN."""

import os
import subprocess
import sys

import pytest

from fcn_tf.models import cpu_kernels, layers


@pytest.fixture(params=["plain", "onednn", "rowwise"])
def kernel_choices(request, monkeypatch):
    """Runs a test with each of the "cpu_fast" kernels' size-dependent choices.

    Two are taken from whether oneDNN runs (the layers ask
    `layers._onednn_enabled` when built; `cpu_kernels` takes it as an
    argument: pass `onednn=kernel_choices == "onednn"`); both sides compute
    the same values with any TensorFlow build, so both are checked here on
    whatever kernels this process has. "onednn" also drops the BatchNorm
    threshold to the tests' 8 channels; "rowwise" gathers every filter
    gradient one kernel row at a time.
    """
    onednn = request.param == "onednn"
    monkeypatch.setattr(layers, "_onednn_enabled", lambda: onednn)
    if onednn:
        monkeypatch.setattr(cpu_kernels, "_ONEDNN_REDUCED_BN_MIN_CHANNELS", 8)
    if request.param == "rowwise":
        monkeypatch.setattr(cpu_kernels, "_FILTER_GRAD_ROWWISE_MIN_WIDTH", 1)
    return request.param


def _rerun_with_onednn(path: str) -> None:
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1")
    code = "from fcn_tf.devices import onednn_enabled; assert onednn_enabled()"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout


@pytest.fixture
def rerun_with_onednn():
    """`rerun_with_onednn(path)` runs the tests of `path` in a process whose kernels are oneDNN's.

    oneDNN is the training default on CPU (fcn_tf.devices.prefer_onednn), and
    with it the kernel choices change; TensorFlow reads TF_ENABLE_ONEDNN_OPTS
    once, at import, hence a process of its own.
    """
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "1":
        pytest.skip("this process already runs oneDNN")
    return _rerun_with_onednn
