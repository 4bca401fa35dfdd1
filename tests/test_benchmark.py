"""Smoke and unit tests of the benchmarks (benchmarks/: harness, model, suite) on a tiny FCN.

None of them needs torch: the torchvision side is only planned here, never run.
"""

import dataclasses
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import experiments
from benchmarks import harness, suite
from benchmarks import model as bm
from fcn_tf.config import ModelConfig
from fcn_tf.models import build_fcn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(num_classes=3, backbone_depth=18, head_channels=8, aux_channels=4)


def _tiny_measurement(**changes):
    m = harness.Measurement(
        label="tiny", framework="tf", what="infer", model=TINY, batch=1, size=(32, 32), warmup=1, repeats=2
    )
    return dataclasses.replace(m, **changes)


def test_measurement_json_round_trip():
    m = _tiny_measurement(jit_compile=True, size=(48, 64))
    assert harness.Measurement.from_json(m.to_json()) == m


def test_time_calls_counts_warmup_and_repeats():
    calls = []
    times = harness.time_calls(lambda: calls.append(1), warmup=2, repeats=3)
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
    plan = suite.plan_measurements(
        config, ["train", "infer"], batch=2, size=(512, 512), compare="torchvision"
    )
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
    assert plan[3].jit_compile == suite.AUTO_JIT_INFERENCE
    auto = suite.plan_measurements(config, ["train", "infer"], 2, (512, 512), onednn="auto")
    assert [m.onednn for m in auto] == [suite.AUTO_ONEDNN["train"]] * 2 + [suite.AUTO_ONEDNN["infer"]] * 2
    # inter-op auto (-1): the train rows get train.py's setting, inference TensorFlow's default.
    inter = suite.plan_measurements(config, ["train", "infer"], 2, (512, 512), inter_op_threads=-1)
    assert [m.inter_op_threads for m in inter] == [-1, -1, 0, 0]
    with pytest.raises(ValueError, match="ResNet-18"):
        suite.plan_measurements(
            experiments.get("synthetic_r18_os8"), ["infer"], 1, (64, 64), compare="torchvision"
        )


def test_summarize_ratios_and_table():
    results = [
        dict(label="infer: ours", framework="tf", what="infer", batch=2, times=[4.0], images_per_s=0.5,
             flops_per_image=300e9, peak_rss_mb=3000.0, jit_compile=True, fold_bn=True, onednn="default",
             peak_gflops=200.0),
        dict(label="infer: torchvision", framework="torch", what="infer", batch=2, times=[5.0], images_per_s=0.4,
             flops_per_image=250e9, peak_rss_mb=2000.0, peak_gflops=125.0),
        dict(label="train: ours", error="exit 1: boom"),
        dict(label="train: ours (1 inter-op)", framework="tf", what="train", batch=2, times=[10.0],
             images_per_s=0.2, peak_rss_mb=3000.0, jit_compile=False, onednn="1", inter_op_threads=1),
        dict(label="train: ours, grad_accum 4", framework="tf", what="train", batch=2, times=[40.0],
             images_per_s=0.2, peak_rss_mb=3100.0, jit_compile=False, onednn="1", grad_accum=4),
    ]  # fmt: skip
    rows = suite.summarize(results)
    assert rows[0]["speed_ratio"] == pytest.approx(1.25)
    assert rows[0]["flops_ratio"] == pytest.approx(150.0 / 100.0)
    assert rows[0]["memory_ratio"] == pytest.approx(1.5)
    # Each row against its own framework's peak.
    assert rows[0]["peak_share"] == pytest.approx(150.0 / 200.0)
    assert rows[1]["peak_share"] == pytest.approx(100.0 / 125.0)
    assert "speed_ratio" not in rows[1]
    table = suite.format_table(rows)
    assert (
        "| infer: ours | 0.500 | 1.25 | 300.0 | 150.0 | 75 | 1.50 | 3000 | 1.50 | xla, bn folded |" in table
    )
    assert "| infer: torchvision | 0.400 | - | 250.0 | 100.0 | 80 |" in table
    assert "error: exit 1: boom" in table
    assert "| no xla, onednn, inter-op 1 |" in table
    assert "| no xla, onednn, 4 x 2 accumulated |" in table


def test_tensorflow_matmul_peak_is_measured_per_size():
    peak = bm.matmul_gflops(threads=1, sizes=(64, 128), repeats=1)
    assert set(peak["by_size"]) == {"64", "128"}
    assert peak["gflops"] == max(peak["by_size"].values()) > 0


def test_matmul_peaks_follow_each_rows_framework_and_environment(monkeypatch):
    calls = []

    def fake_child(target, payload, env, timeout):
        calls.append((target, env.get("TF_ENABLE_ONEDNN_OPTS"), payload["kwargs"]["threads"]))
        return {"gflops": 100.0 + len(calls), "by_size": {"2048": 1.0}}

    monkeypatch.setattr(suite, "run_child", fake_child)
    config = experiments.get("voc_r50_os8")
    plan = suite.plan_measurements(
        config, ["train", "infer"], 2, (512, 512), compare="torchvision", onednn="auto"
    )
    plan.append(dataclasses.replace(plan[0], label="train: ours, no onednn", onednn="off"))
    peaks = suite.matmul_peaks(plan, log=lambda _: None)
    # One TensorFlow peak per oneDNN setting (the model's own kernels), one torch peak.
    assert calls == [
        ("benchmarks.model:matmul_gflops", "1", 2),
        ("benchmarks.torch_side:matmul_gflops", None, 2),
        ("benchmarks.model:matmul_gflops", "0", 2),
    ]
    assert len(peaks) == 3 and peaks[suite._peak_key(plan[0])] == 101.0


def test_what_takes_a_comma_list():
    assert suite.parse_what(["train", "infer"]) == ("train", "infer")
    assert suite.parse_what(["all"]) == ("train", "infer", "input")
    assert suite.parse_what(["infer", "train", "infer"]) == ("infer", "train")
    with pytest.raises(ValueError, match="choose from train, infer, input, export, reads or all"):
        suite.Options(experiment="voc_r50_os8", what=suite.parse_what(["train", "gpu"]))
    with pytest.raises(ValueError, match="--experiment is required"):
        suite.Options(what=("train",))
    assert suite.Options(what=("input",)).what == ("input",)
    assert suite.parse_size("512x1024") == (512, 1024)
    with pytest.raises(ValueError, match="not HxW"):
        suite.parse_size("512")


def test_grad_accum_row_steps_k_micro_batches_of_the_same_size():
    config = experiments.get("voc_r50_os8")
    plan = suite.plan_measurements(config, ["train"], 2, (512, 512), grad_accum=4)
    assert [m.label for m in plan] == [
        "train: ours",
        "train: ours, grad_accum 4",
        "train: ours (torchvision layout)",
    ]
    assert (plan[1].batch, plan[1].grad_accum, plan[1].images_per_call) == (2, 4, 8)
    assert plan[1].model == plan[0].model and plan[0].grad_accum == 1
    m = _tiny_measurement(what="train", experiment="synthetic_r18_os8", batch=1, grad_accum=2)
    result = bm.run_tf(dataclasses.replace(m, model={**TINY, "num_classes": 5}))
    # The project's own accumulating step, 2 micro-batches of 1 image per call.
    assert result["step"] == "fcn_tf.training.make_train_step" and result["grad_accum"] == 2
    assert result["images_per_s"] == pytest.approx(2 / np.median(result["times"]))


def test_gpu_plan_covers_precisions_xla_and_replica_counts():
    config = experiments.get("voc_r50_os8")
    assert suite.replica_counts(1) == [1] and suite.replica_counts(8) == [1, 2, 4, 8]
    assert suite.replica_counts(6) == [1, 2, 4, 6]
    plan = suite.plan_gpu(config, ["train", "infer"], gpus=2, batch=2, size=(512, 512))
    assert len(plan) == 2 * 2 * 2 * 2
    assert {(m.what, m.replicas, m.precision, m.jit_compile) for m in plan} == {
        (w, r, p, j)
        for w in ("train", "infer")
        for r in (1, 2)
        for p in ("float32", "mixed_float16")
        for j in (0, 1)
    }
    assert all(m.device == "gpu" and m.threads == 0 and m.onednn == "default" for m in plan)
    assert plan[0].label == "train: ours, 1 GPU, float32, no xla"
    # GPU rows keep the libraries' thread defaults and see the GPUs.
    env = harness.child_env(plan[0])
    assert "OMP_NUM_THREADS" not in env and "CUDA_VISIBLE_DEVICES" not in env
    assert harness.child_env(_tiny_measurement())["CUDA_VISIBLE_DEVICES"] == ""


def test_gpu_row_reports_peak_device_memory(monkeypatch):
    # A patched device query: TensorFlow "sees" a GPU and its allocator's peak is read per replica.
    real = tf.config.list_physical_devices
    monkeypatch.setattr(
        tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else real(kind)
    )
    monkeypatch.setattr(bm, "device_peak_mb", lambda devices: [512.0 + i for i, _ in enumerate(devices)])
    m = _tiny_measurement(device="gpu", experiment="synthetic_r18_os8", model={**TINY, "num_classes": 5})
    result = bm.run_tf(m)
    assert result["peak_device_mb"] == 512.0 and result["peak_device_mb_per_replica"] == [512.0]
    row = suite.format_gpu_table([{**result, "label": "infer: ours, 1 GPU, float32, no xla"}])
    assert "| infer: ours, 1 GPU, float32, no xla | 1 | float32 | no |" in row and "| 512 |" in row


def test_run_tf_refuses_a_gpu_row_without_a_gpu():
    with pytest.raises(ValueError, match="no GPU visible"):
        bm.run_tf(_tiny_measurement(device="gpu"))


def test_the_gpu_command_on_a_cpu_machine_runs_and_says_no_gpu(monkeypatch, capsys):
    # scripts/benchmark.py --what=train,infer's whole path (suite.run), with the
    # children run in this process: the CPU table of a tiny model, then "no GPU visible".
    import importlib

    def in_process_child(target, payload, env=None, timeout=None):
        module, _, name = target.partition(":")
        function = getattr(importlib.import_module(module), name)
        if target == "benchmarks.model:matmul_gflops":
            return function(sizes=(64,), repeats=1, **payload["kwargs"])
        return function(**payload["kwargs"])

    monkeypatch.setattr(suite, "run_child", in_process_child)
    monkeypatch.setattr(suite, "run_isolated", lambda m: bm.run_tf(m))
    monkeypatch.setattr(suite, "visible_gpus", lambda: bm.gpu_count())
    monkeypatch.setattr(
        experiments, "get", lambda name, _get=experiments.get: _tiny_experiment(_get("synthetic_r18_os8"))
    )
    options = suite.Options(
        experiment="tiny", what=suite.parse_what(["train", "infer"]), batch=1, size=(32, 32), repeats=1
    )
    out = suite.run(options)
    printed = capsys.readouterr().out
    assert suite.NO_GPU in printed and "gpu" not in out
    assert [r["label"] for r in out["cpu"]] == [
        "train: ours",
        "train: ours (torchvision layout)",
        "infer: ours",
        "infer: ours (torchvision layout)",
    ]
    assert all("error" not in r and r["peak_share"] > 0 for r in out["cpu"]), out["cpu"]
    assert "| train: ours |" in printed and "matmul peak (TensorFlow tf.linalg.matmul, oneDNN on" in printed


def _tiny_experiment(config):
    model = ModelConfig(**{**TINY, "num_classes": 5})
    return dataclasses.replace(config, name="synthetic_r18_os8", model=model)


def test_script_device_gpu_without_a_gpu_says_so():
    out = subprocess.run(
        [sys.executable, f"{REPO}/scripts/benchmark.py", "--what=train,infer", "--experiment=voc_r50_os8",
         "--device=gpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert suite.NO_GPU in out.stdout
    bad = subprocess.run(
        [sys.executable, f"{REPO}/scripts/benchmark.py", "--what=train,gpu", "--experiment=voc_r50_os8"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: --what=train,gpu")


def test_child_protocol_returns_results_and_errors():
    assert harness.run_child("benchmarks.harness:load_average", {"kwargs": {}}) >= 0
    with pytest.raises(RuntimeError, match="(?s)exit 1: .*No module named"):
        harness.run_child("benchmarks.no_such_module:f", {"kwargs": {}})
    # A child killed by a signal (the out-of-memory killer sends SIGKILL) is named as such.
    with pytest.raises(RuntimeError, match="killed by SIGABRT"):
        harness.run_child("os:abort", {"kwargs": {}})


def test_the_library_imports_neither_experiments_nor_the_benchmarks():
    # Every module of fcn_tf, imported in a fresh process.
    code = (
        "import pkgutil, importlib, sys, fcn_tf\n"
        "for m in pkgutil.walk_packages(fcn_tf.__path__, 'fcn_tf.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('experiments', 'benchmarks')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_run_isolated_runs_in_a_fresh_process_with_two_replicas():
    # The subprocess protocol end to end, on 2 logical CPU devices (synchronized BatchNorm).
    m = _tiny_measurement(what="train", experiment="synthetic_r18_os8", model={**TINY, "num_classes": 5})
    result = harness.run_isolated(dataclasses.replace(m, replicas=2))
    assert "error" not in result, result.get("error")
    assert result["label"] == "tiny" and len(result["times"]) == 2 and result["replicas"] == 2
    assert result["images_per_s"] == pytest.approx(2 / np.median(result["times"]))
    bad = harness.run_isolated(_tiny_measurement(what="nonsense"))
    assert "unknown measurement kind" in bad["error"]
