"""fcn_tf.training.settings: process-wide settings a training run makes before it builds the model."""


def _fake_strategy(devices):
    from types import SimpleNamespace

    return SimpleNamespace(
        extended=SimpleNamespace(worker_devices=devices), num_replicas_in_sync=len(devices)
    )


def test_training_settings_apply_tf32_and_the_config_records_it(tmp_path):
    import json

    import tensorflow as tf

    from fcn_tf.config import ExperimentConfig, TrainerConfig
    from fcn_tf.training import apply_training_settings, write_config

    previous = tf.config.experimental.tensor_float_32_execution_enabled()
    try:
        for tf32 in (True, False):
            config = ExperimentConfig(name="x", trainer=TrainerConfig(tf32=tf32))
            apply_training_settings(config, _fake_strategy(["/cpu:0"]))
            assert tf.config.experimental.tensor_float_32_execution_enabled() is tf32
            written = json.load(open(write_config(config, str(tmp_path))))
            assert written["trainer"]["tf32"] is tf32
        assert TrainerConfig().tf32 is True  # TensorFlow's default; trainer.tf32=false: exact float32
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(previous)


def test_xla_with_synchronized_batch_norm_is_refused_up_front_where_tensorflow_cannot_run_it():
    import pytest

    from fcn_tf.config import ExperimentConfig, ModelConfig, TrainerConfig
    from fcn_tf.models.sync_batch_norm import SyncBatchNormXlaError
    from fcn_tf.training import apply_training_settings

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


def test_xla_with_synchronized_batch_norm_and_a_ring_between_workers_is_refused():
    from types import SimpleNamespace

    import pytest

    from fcn_tf.config import ExperimentConfig, TrainerConfig
    from fcn_tf.models.sync_batch_norm import SyncBatchNormXlaError
    from fcn_tf.training import apply_training_settings

    spec = SimpleNamespace(as_dict=lambda: {"worker": ["a:1", "b:2"]})
    two_workers = _fake_strategy(["/job:worker/task:0/gpu:0", "/job:worker/task:0/gpu:1"])
    two_workers.cluster_resolver = SimpleNamespace(cluster_spec=lambda: spec, task_type="worker", task_id=0)
    ring = ExperimentConfig(name="x", trainer=TrainerConfig(jit_compile=True, collective="ring"))
    with pytest.raises(SyncBatchNormXlaError) as info:
        apply_training_settings(ring, two_workers)
    assert "trainer.collective=ring" in str(info.value) and "\n" not in str(info.value)
    # auto is NCCL on GPUs: compiled.
    apply_training_settings(ExperimentConfig(name="x", trainer=TrainerConfig(jit_compile=True)), two_workers)
