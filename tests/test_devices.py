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


def _fake_strategy(devices):
    from types import SimpleNamespace

    return SimpleNamespace(
        extended=SimpleNamespace(worker_devices=devices), num_replicas_in_sync=len(devices)
    )


def test_training_settings_apply_tf32_and_the_config_records_it(tmp_path):
    import json

    import tensorflow as tf

    from fcn_tf.config import ExperimentConfig, TrainerConfig
    from fcn_tf.train_lib import apply_training_settings, write_config

    previous = tf.config.experimental.tensor_float_32_execution_enabled()
    try:
        for tf32 in (True, False):
            config = ExperimentConfig(name="x", trainer=TrainerConfig(tf32=tf32))
            apply_training_settings(config, _fake_strategy(["/cpu:0"]))
            assert tf.config.experimental.tensor_float_32_execution_enabled() is tf32
            written = json.load(open(write_config(config, str(tmp_path))))
            assert written["trainer"]["tf32"] is tf32
        assert TrainerConfig().tf32 is False  # the reference publishes its numbers without TF32
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(previous)


def test_xla_with_synchronized_batch_norm_is_refused_up_front_where_tensorflow_cannot_run_it():
    import pytest

    from fcn_tf.config import ExperimentConfig, ModelConfig, TrainerConfig
    from fcn_tf.models.sync_batch_norm import SyncBatchNormXlaError
    from fcn_tf.train_lib import apply_training_settings

    jit = ExperimentConfig(name="x", trainer=TrainerConfig(jit_compile=True))
    with pytest.raises(SyncBatchNormXlaError, match="trainer.jit_compile=false or model.sync_bn=false"):
        apply_training_settings(jit, _fake_strategy(["/cpu:0", "/cpu:1"]))
    # TensorFlow compiles the all-reduce into XLA when every replica is a GPU;
    # one replica has no all-reduce; without SyncBN nothing cross-replica is compiled.
    apply_training_settings(jit, _fake_strategy(["/gpu:0", "/gpu:1"]))
    apply_training_settings(jit, _fake_strategy(["/cpu:0"]))
    no_sync = ExperimentConfig(
        name="x", model=ModelConfig(sync_bn=False), trainer=TrainerConfig(jit_compile=True)
    )
    apply_training_settings(no_sync, _fake_strategy(["/cpu:0", "/cpu:1"]))
