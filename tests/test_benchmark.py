"""Smoke and unit tests of the model benchmark (fcn_tf/benchmark/model.py) on a tiny FCN.

None of them needs torch: the torchvision side is only planned here, never run.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

import experiments
from fcn_tf.benchmark import model as bm
from fcn_tf.config import ModelConfig
from fcn_tf.models import build_fcn

TINY = dict(num_classes=3, backbone_depth=18, head_channels=8, aux_channels=4)


def _tiny_measurement(**changes):
    m = bm.Measurement(
        label="tiny", framework="tf", what="infer", model=TINY, batch=1, size=(32, 32), warmup=1, repeats=2
    )
    return dataclasses.replace(m, **changes)


def test_measurement_json_round_trip():
    m = _tiny_measurement(jit_compile=True, size=(48, 64))
    assert bm.Measurement.from_json(m.to_json()) == m


def test_time_calls_counts_warmup_and_repeats():
    calls = []
    times = bm.time_calls(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_graph_flops_of_a_conv_is_two_multiply_adds_per_output():
    conv = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)
    conv.build((1, 16, 16, 4))
    flops = bm.graph_flops(tf.function(conv), tf.TensorSpec([1, 16, 16, 4], tf.float32))
    assert flops == 2 * 16 * 16 * 8 * (3 * 3 * 4)


def test_graph_flops_of_the_fcn_scales_with_the_image_area():
    forward = bm.inference_fn(build_fcn(ModelConfig(**TINY), sync_bn=False))
    small = bm.graph_flops(forward, tf.TensorSpec([1, 32, 32, 3], tf.float32))
    large = bm.graph_flops(forward, tf.TensorSpec([1, 64, 64, 3], tf.float32))
    assert small > 0
    # Convolutions dominate and grow with the area; resize and padding only roughly.
    assert 3.5 < large / small < 4.5


def test_logits_model_drops_the_aux_head():
    model = build_fcn(ModelConfig(**TINY), sync_bn=False)
    main = bm.logits_model(model)
    names = {layer.name for layer in main.layers}
    assert "aux_classifier" in {layer.name for layer in model.layers}
    assert "aux_classifier" not in names
    x = tf.random.normal([1, 32, 32, 3])
    np.testing.assert_array_equal(main(x, training=False), model(x, training=False)["logits"])


def test_train_step_fn_updates_the_weights():
    config = experiments.get("synthetic_r18_os8")
    model_config = ModelConfig(**TINY)
    config = dataclasses.replace(config, model=model_config)
    model = build_fcn(model_config, sync_bn=False)
    images, labels = bm.random_batch(1, (32, 32), 3)
    before = [w.numpy().copy() for w in model.trainable_weights]
    call, which = bm.train_step_fn(model, config, images, labels)
    call()
    assert which
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights)]
    assert all(changed)


@pytest.mark.parametrize("what, fold_bn", [("infer", False), ("infer", True), ("train", False)])
def test_run_tf_in_process_reports_the_figures(what, fold_bn):
    m = _tiny_measurement(what=what, experiment="synthetic_r18_os8", flops=True, fold_bn=fold_bn)
    m = dataclasses.replace(m, model={**TINY, "num_classes": 5})
    result = bm.run_tf(m)
    assert len(result["times"]) == 2
    assert result["images_per_s"] == pytest.approx(1 / np.median(result["times"]))
    assert result["flops_per_image"] > 0
    if what == "train":
        assert result["flops_per_image"] == 3 * result["forward_flops_per_image"]
    assert result["peak_rss_mb"] >= result["baseline_rss_mb"] > 0


def test_run_tf_slide_times_whole_images():
    m = _tiny_measurement(what="slide", experiment="synthetic_r18_os8", size=(100, 130), batch=2)
    m = dataclasses.replace(m, model={**TINY, "num_classes": 5})
    result = bm.run_tf(m)
    # One image per call, whatever the number of windows.
    assert result["images_per_s"] == pytest.approx(1 / np.median(result["times"]))


def test_plan_compares_like_for_like():
    config = experiments.get("voc_r50_os8")
    plan = bm.plan_measurements(config, ["train", "infer"], batch=2, size=(512, 512), compare="torchvision")
    labels = [m.label for m in plan]
    assert labels == [
        "train: ours",
        "train: ours (torchvision layout)",
        "train: torchvision fcn_resnet50",
        "infer: ours",
        "infer: ours (torchvision layout)",
        "infer: torchvision fcn_resnet50",
    ]
    tv_layout = plan[1].model
    assert (tv_layout["stem"], tv_layout["head_num_convs"], tv_layout["aux_channels"]) == ("standard", 1, 256)
    assert plan[0].model["stem"] == "deep"
    assert plan[2].model == {"arch": "fcn_resnet50", "num_classes": 21}
    assert {(m.batch, m.size, m.threads, m.repeats) for m in plan} == {(2, (512, 512), 2, 3)}
    # auto: XLA for inference, the experiment's trainer.jit_compile for training.
    assert plan[0].jit_compile == config.trainer.jit_compile
    assert plan[3].jit_compile == bm.AUTO_JIT_INFERENCE
    auto = bm.plan_measurements(config, ["train", "infer"], 2, (512, 512), onednn="auto")
    assert [m.onednn for m in auto] == [bm.AUTO_ONEDNN["train"]] * 2 + [bm.AUTO_ONEDNN["infer"]] * 2
    # inter-op auto (-1): the train rows get train.py's setting, inference TensorFlow's default.
    inter = bm.plan_measurements(config, ["train", "infer"], 2, (512, 512), inter_op_threads=-1)
    assert [m.inter_op_threads for m in inter] == [-1, -1, 0, 0]
    with pytest.raises(ValueError, match="ResNet-18"):
        bm.plan_measurements(
            experiments.get("synthetic_r18_os8"), ["infer"], 1, (64, 64), compare="torchvision"
        )


def test_summarize_ratios_and_table():
    results = [
        dict(label="infer: ours", framework="tf", what="infer", batch=2, times=[4.0], images_per_s=0.5,
             flops_per_image=300e9, peak_rss_mb=3000.0, jit_compile=True, fold_bn=True, onednn="default"),
        dict(label="infer: torchvision", framework="torch", what="infer", batch=2, times=[5.0], images_per_s=0.4,
             flops_per_image=250e9, peak_rss_mb=2000.0),
        dict(label="train: ours", error="exit 1: boom"),
        dict(label="train: ours (1 inter-op)", framework="tf", what="train", batch=2, times=[10.0],
             images_per_s=0.2, peak_rss_mb=3000.0, jit_compile=False, onednn="1", inter_op_threads=1),
    ]  # fmt: skip
    rows = bm.summarize(results, peak_gflops=200.0)
    assert rows[0]["speed_ratio"] == pytest.approx(1.25)
    assert rows[0]["flops_ratio"] == pytest.approx(150.0 / 100.0)
    assert rows[0]["memory_ratio"] == pytest.approx(1.5)
    assert rows[0]["peak_share"] == pytest.approx(150.0 / 200.0)
    assert "speed_ratio" not in rows[1]
    table = bm.format_table(rows)
    assert (
        "| infer: ours | 0.500 | 1.25 | 300.0 | 150.0 | 75 | 1.50 | 3000 | 1.50 | xla, bn folded |" in table
    )
    assert "error: exit 1: boom" in table
    assert "| no xla, onednn, inter-op 1 |" in table


def test_matmul_peak_is_positive():
    assert bm.matmul_peak_gflops(n=128, threads=1, repeats=1) > 0


@pytest.mark.slow
def test_run_isolated_runs_in_a_fresh_process():
    result = bm.run_isolated(_tiny_measurement(model={**TINY, "num_classes": 5}))
    assert "error" not in result, result.get("error")
    assert result["label"] == "tiny" and len(result["times"]) == 2
    bad = bm.run_isolated(_tiny_measurement(what="nonsense"))
    assert "unknown measurement kind" in bad["error"]
