"""The export latency benchmark (benchmarks/export.py) on a tiny model's SavedModel, LiteRT and ONNX files."""

import keras
import pytest

import experiments
from benchmarks import export as export_bench
from benchmarks import suite
from fcn_tf import export
from fcn_tf.config import override
from fcn_tf.export import fixed_size, saved_model
from harness import runs
from harness.tiny import tiny_segmenter

NUM_CLASSES = 5  # the synthetic dataset's


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A SavedModel and LiteRT / ONNX float32 files of one tiny model in one directory, with a dataset."""
    root = tmp_path_factory.mktemp("bench_export")
    data_dir = runs.make_synthetic_tfds(str(root / "data"), num_train=2, num_val=3)
    config = override(
        experiments.get("synthetic_r18_os8"), f"data.data_dir={data_dir}", "data.eval_target=64,48"
    )
    keras.utils.set_random_seed(0)
    model = tiny_segmenter(NUM_CLASSES, sync_bn=False)
    directory = root / "fcn"
    saved_model.export(config, model, str(directory), warmup=False)
    fixed_size.export(
        config, model, str(directory), variants=[("litert", "float32"), ("onnx", "float32")], size=(48, 64)
    )
    return config, model, directory


def test_finds_every_export_of_a_directory_in_order(exported):
    _, _, directory = exported
    found = export_bench.find_exports([str(directory), str(directory / "model.onnx")])
    assert [name for name, _ in found] == ["saved_model", "litert float32", "onnx float32", "onnx float32"]
    assert found[0][1] == str(directory / "1")
    with pytest.raises(FileNotFoundError, match="no export in"):
        export_bench.find_exports([str(directory / "assets")])


def test_measure_times_each_export_and_scores_the_files(exported, monkeypatch):
    config, model, directory = exported
    # The TensorFlow row restores the checkpoint into the experiment's model: here, the tiny one.
    monkeypatch.setattr(export, "restored_model", lambda config, checkpoint: (model, checkpoint))
    rows = export_bench.measure([str(directory)], checkpoint="tiny", repeats=2, warmup=1, evaluate=True)
    assert [r["export"] for r in rows] == [
        "tensorflow (in-process)",
        "saved_model",
        "litert float32",
        "onnx float32",
    ]
    reference, saved, *files = rows
    assert reference["bytes"] is None and reference["ms_per_image"] is None
    assert saved["bytes"] > 0 and saved["ms_per_image"] > 0 and saved["miou"] is None
    for row in files:
        assert row["bytes"] > 0 and row["ms_per_image"] > 0
        # float32 files reproduce the TensorFlow function: the same score.
        assert row["miou"] == pytest.approx(reference["miou"], abs=0.01)
    header, first, *_ = export_bench.format_table(rows).splitlines()
    assert header.split() == ["export", "size", "MB", "ms/image", "mIoU"]
    assert first.split() == ["tensorflow", "(in-process)", "-", "-", f"{reference['miou']:.4f}"]


def test_suite_runs_the_export_table_without_an_experiment(monkeypatch, capsys):
    rows = [export_bench._row("onnx float32", "model.onnx", 2_000_000, 12.5, None)]
    calls = []

    def fake_child(target, payload, env=None, timeout=None):
        calls.append((target, payload["kwargs"], env))
        return rows

    monkeypatch.setattr(export_bench, "run_child", fake_child)
    options = suite.Options(what=suite.parse_what(["export"]), exports=("exports/fcn",), repeats=5, threads=1)
    out = suite.run(options)
    assert out == {"export": rows}
    (target, kwargs, env) = calls[0]
    assert target == "benchmarks.export:measure" and kwargs["exports"] == ["exports/fcn"]
    assert kwargs["repeats"] == 5 and env["CUDA_VISIBLE_DEVICES"] == "" and env["OMP_NUM_THREADS"] == "1"
    assert ["onnx", "float32", "2.0", "12.5", "-"] in [
        line.split() for line in capsys.readouterr().out.splitlines()
    ]
    with pytest.raises(ValueError, match="--what=export needs --exports"):
        suite.Options(what=("export",))
    assert "export" not in suite.parse_what(["all"])
