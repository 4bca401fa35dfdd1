"""The Python API: the README's example runs as written; numpy images and files give the same labels."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import experiments
import fcn_tf
from fcn_tf import training
from fcn_tf.config import ConfigError
from fcn_tf.data import sources, synthetic
from fcn_tf.models import build_fcn
from harness.runs import TINY_OVERRIDES

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The first python code block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def demo_dir(tmp_path, monkeypatch):
    """A working directory as `make demo` leaves it, with a tiny dataset and a tiny trained run."""
    monkeypatch.chdir(tmp_path)
    synthetic.write_dataset("data/synthetic_raw", num_train=6, num_val=2, height=48, width=64)
    sources.prepare("synthetic", "data/synthetic_raw", "data/tfds", allow_count_mismatch=True)
    config = experiments.resolve("synthetic_r18_os8", overrides=[*TINY_OVERRIDES, "trainer.train_steps=2"])
    training.train(config, "runs/demo", evaluate=False)
    return tmp_path


@pytest.fixture
def untrained_dir(tmp_path, monkeypatch):
    """A workdir holding an untrained tiny model's checkpoint and its config.json."""
    monkeypatch.chdir(tmp_path)
    config = experiments.resolve("synthetic_r18_os8", overrides=TINY_OVERRIDES)
    Path("runs/demo").mkdir(parents=True)
    training.write_config(config, "runs/demo")
    tf.train.Checkpoint(model=build_fcn(config.model)).save("runs/demo/checkpoints/ckpt")
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)
    Path("photo.png").write_bytes(tf.io.encode_png(image).numpy())
    return tmp_path


@pytest.mark.slow
def test_readme_example_runs_as_written(demo_dir, capsys):
    code = readme_example()
    assert 'fcn_tf.Segmenter.load("runs/demo")' in code and "fcn_tf.train(" in code
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "mIoU" in out and "(48, 64)" in out
    assert (demo_dir / "runs/api_example/checkpoints").is_dir()


def test_numpy_image_and_file_give_the_same_labels(untrained_dir):
    segmenter = fcn_tf.Segmenter.load("runs/demo")
    path = "photo.png"
    from_file = segmenter.segment(path)
    pixels = tf.io.decode_png(tf.io.read_file(path)).numpy()
    from_array = segmenter.segment(pixels)
    np.testing.assert_array_equal(from_file.labels, from_array.labels)
    assert from_array.overlay.shape == (48, 64, 3) and from_array.overlay.dtype == np.uint8
    assert from_file.class_names == ["background", "disc", "square", "triangle", "ring"]
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        segmenter.segment(np.zeros((4, 4), np.uint8))


def test_checkpoint_outside_a_workdir_needs_its_config(untrained_dir):
    prefix = tf.train.latest_checkpoint("runs/demo/checkpoints")
    with pytest.raises(ConfigError, match="pass its config"):
        fcn_tf.Segmenter.load(prefix)
    config = experiments.resolve("synthetic_r18_os8", workdir="runs/demo")
    by_prefix = fcn_tf.Segmenter.load(prefix, config).segment("photo.png")
    by_workdir = fcn_tf.Segmenter.load("runs/demo").segment("photo.png")
    np.testing.assert_array_equal(by_prefix.labels, by_workdir.labels)
