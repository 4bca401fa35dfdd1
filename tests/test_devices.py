"""fcn_tf.devices: settings made before TensorFlow is imported."""

import os
import subprocess
import sys

from fcn_tf.devices import prefer_onednn


def test_prefer_onednn_sets_a_default_and_keeps_the_users_choice(monkeypatch):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    prefer_onednn()
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    prefer_onednn()
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"


def test_devices_module_does_not_import_tensorflow():
    # The scripts call prefer_onednn() first; importing it must not load TensorFlow,
    # which reads the variable once, at import.
    code = "import sys, fcn_tf.devices; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _inter_op_after(arg):
    code = (
        "import tensorflow as tf\n"
        "from fcn_tf.devices import set_inter_op_threads\n"
        f"got = set_inter_op_threads({arg})\n"
        "tf.constant(1.0) + 1.0  # TensorFlow starts with that pool\n"
        "print(got, tf.config.threading.get_inter_op_parallelism_threads())\n"
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(v) for v in out.stdout.split()]


def test_inter_op_threads_auto_is_one_without_accelerators_and_explicit_values_win():
    assert _inter_op_after(-1) == [1, 1]  # this machine has no GPU/TPU
    assert _inter_op_after(3) == [3, 3]
    assert _inter_op_after(0) == [0, 0]  # TensorFlow's default


def test_inter_op_threads_rejects_values_below_minus_one():
    import pytest

    from fcn_tf.devices import set_inter_op_threads

    with pytest.raises(ValueError, match="-2"):
        set_inter_op_threads(-2)


def test_onednn_enabled_reports_the_import_time_setting():
    code = "from fcn_tf.devices import onednn_enabled; print(onednn_enabled())"
    for value, expected in (("1", "True"), ("0", "False")):
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=value, TF_CPP_MIN_LOG_LEVEL="3")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == expected
