"""scripts/evaluate.py end to end: synthetic TFDS data, a saved checkpoint, all three inference modes."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import experiments
from fcn_tf import inference
from fcn_tf.config import ConfigError, override, to_json
from fcn_tf.metrics import ConfusionMatrix

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "evaluate.py")
# A small FCN-R18 so that three script runs stay short.
MODEL_OVERRIDES = ("model.head_channels=16", "model.aux_channels=16")
MODES = {
    "whole": (),
    "slide": ("--mode=slide", "--override=eval.window_batch=2"),
    "multiscale_flip": ("--mode=slide", "--scales=0.75,1.0,1.25", "--flip"),
}
MODE_OVERRIDES = {
    "whole": (),
    "slide": ("eval.mode=slide", "eval.window_batch=2"),
    "multiscale_flip": ("eval.mode=slide", "eval.scales=0.75,1.0,1.25", "eval.flip=true"),
}
# Non-square images that the eval resize changes (80x120 -> 85x128), so the
# logits must be resized back to the label size.
HEIGHT, WIDTH, NUM_VAL = 80, 120, 3


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic TFDS data and a randomly initialized FCN checkpointed as training does."""
    from fcn_tf.data import sources, synthetic
    from fcn_tf.models import build_fcn

    root = tmp_path_factory.mktemp("evaluate_script")
    raw, data_dir, workdir = root / "raw", root / "tfds", root / "workdir"
    synthetic.write_dataset(raw, num_train=2, num_val=NUM_VAL, seed=0, height=HEIGHT, width=WIDTH)
    sources.prepare("synthetic", raw, data_dir, allow_count_mismatch=True)
    config = override(experiments.get("synthetic_r18_os8"), *MODEL_OVERRIDES, f"data.data_dir={data_dir}")
    keras.utils.set_random_seed(0)
    model = build_fcn(config.model)
    tf.train.Checkpoint(model=model).save(str(workdir / "checkpoints" / "ckpt"))
    # As training does: the resolved config beside the checkpoints (the script reads the
    # small heads from it; no --override needed).
    (workdir / "config.json").write_text(to_json(config))
    return config, model, str(data_dir), str(workdir)


def reference_matrix(config, model):
    """Eager evaluation through the pipeline, independent of eval_lib's distributed loop."""
    from fcn_tf.data import build_dataset

    cm = ConfusionMatrix(config.model.num_classes)
    logits_fn = inference.model_logits_fn(model)
    for example in build_dataset(config.data, training=False):
        label = example["label"]
        scores = inference.predict(logits_fn, example["image"], tf.shape(label)[1:3], config.eval, 5)
        cm.update(label, tf.argmax(scores, -1))
    return cm.matrix


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_evaluate_script_modes(trained, mode, tmp_path):
    config, model, data_dir, workdir = trained
    output, predictions = tmp_path / "results.json", tmp_path / "predictions"
    proc = run_script(
        "--experiment=synthetic_r18_os8",
        f"--workdir={workdir}",
        f"--data_dir={data_dir}",
        *MODES[mode],
        f"--output={output}",
        f"--save_predictions={predictions}",
        "--strategy=default",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The table with class names and the summary line.
    for name in ("background", "disc", "square", "triangle", "ring", "mIoU"):
        assert name in proc.stdout
    results = json.loads(output.read_text())
    assert results["num_examples"] == NUM_VAL
    assert results["eval"]["mode"] == ("whole" if mode == "whole" else "slide")
    assert results["eval"]["flip"] == (mode == "multiscale_flip")
    expected = reference_matrix(override(config, *MODE_OVERRIDES[mode]), model)
    np.testing.assert_array_equal(np.array(results["confusion_matrix"]), expected)
    assert results["num_pixels"] == expected.sum() > 0
    iou = [np.nan if v is None else v for v in results["iou"]]
    np.testing.assert_allclose(results["miou"], np.nanmean(iou))
    # Prediction PNGs at the original label size.
    files = sorted(os.listdir(predictions / "color"))
    assert len(files) == NUM_VAL
    png = tf.io.decode_png(tf.io.read_file(str(predictions / "color" / files[0])))
    assert png.shape == (HEIGHT, WIDTH, 3)


@pytest.mark.slow
def test_script_reports_missing_checkpoint(tmp_path):
    proc = run_script("--experiment=synthetic_r18_os8", f"--workdir={tmp_path}", "--strategy=default")
    assert proc.returncode != 0 and "no checkpoint in" in proc.stderr


def test_script_rejects_bad_arguments(tmp_path):
    # These fail before TensorFlow is imported, so they are quick.
    proc = run_script("--experiment=no_such_experiment", f"--workdir={tmp_path}")
    assert proc.returncode != 0
    assert "unknown experiment 'no_such_experiment'" in proc.stderr and "synthetic_r18_os8" in proc.stderr
    proc = run_script("--experiment=synthetic_r18_os8", f"--workdir={tmp_path}", f"--checkpoint={tmp_path}")
    assert proc.returncode != 0 and "exactly one of --workdir or --checkpoint" in proc.stderr
    proc = run_script("--experiment=synthetic_r18_os8", f"--workdir={tmp_path}", "--override=eval.nope=1")
    assert proc.returncode != 0 and "unknown config key 'eval.nope'" in proc.stderr


def test_workdir_config_then_overrides_then_eval_flags(tmp_path):
    eval_overrides = load_script().eval_overrides
    flags = eval_overrides(mode="slide", scales=["0.5", "1.0"], data_dir="/data")
    base = experiments.get("synthetic_r18_os8")
    trained = override(base, *MODEL_OVERRIDES, "eval.flip=true")
    (tmp_path / "config.json").write_text(to_json(trained))
    config = experiments.resolve(
        "synthetic_r18_os8", str(tmp_path), ["eval.window_batch=2", "eval.mode=whole", *flags]
    )
    assert config.model == trained.model  # the heads the checkpoint was trained with
    assert config.eval.flip and config.eval.window_batch == 2
    assert config.eval.mode == "slide" and config.eval.scales == (0.5, 1.0)  # flags win over --override
    assert config.data.data_dir == "/data"
    unflipped = experiments.resolve("synthetic_r18_os8", str(tmp_path), eval_overrides(flip=False))
    assert not unflipped.eval.flip
    with pytest.raises(ConfigError, match="eval.mode"):
        experiments.resolve("synthetic_r18_os8", overrides=eval_overrides(mode="tiles"))


@pytest.mark.slow
def test_trained_workdir_evaluates_to_the_training_final_eval(trained, tmp_path):
    """scripts/train.py for a few steps, then scripts/evaluate.py on its workdir: same mIoU."""
    _, _, data_dir, _ = trained
    workdir, output = tmp_path / "run", tmp_path / "eval.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    train = subprocess.run(
        [
            sys.executable, os.path.join(REPO, "scripts", "train.py"), "--experiment=synthetic_r18_os8",
            f"--workdir={workdir}", f"--data_dir={data_dir}", "--strategy=default",
            *[f"--override={o}" for o in (*MODEL_OVERRIDES, "trainer.train_steps=3", "data.global_batch_size=2",
                                          "trainer.checkpoint_every=3")],
        ],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-4000:]
    reported = float(re.search(r"mIoU (\d\.\d+)", train.stdout).group(1))
    proc = run_script("--experiment=synthetic_r18_os8", f"--workdir={workdir}", f"--output={output}",
                      "--strategy=default")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(output.read_text())
    assert results["checkpoint"].endswith("ckpt-3")
    assert abs(results["miou"] - reported) < 5e-5, (results["miou"], reported)
