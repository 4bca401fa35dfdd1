"""A folder dataset through every script: prepare, train, evaluate (the user's class names), export,
predict (the user's colours); and the demo's data in the folder layout reaching the demo's mIoU."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from fcn_tf.data import synthetic
from harness import runs

NAMES = ("sea", "blob", "box", "wedge", "hoop")
COLOURS = ((10, 20, 30), (200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0))
DEMO_MIOU = 0.7


def _run(script, *args, timeout=900):
    proc = subprocess.run(
        [sys.executable, f"{runs.REPO}/scripts/{script}", *args],
        env=runs.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _write(root: Path, coloured: bool) -> None:
    """The synthetic shapes in the folder layout, under the user's own names (and colours)."""
    synthetic.write_dataset(root, num_train=6, num_val=2, height=48, width=64, layout="folder")
    if coloured:
        # Index masks repainted in the user's colours, the ignore band in white.
        colours = np.full((256, 3), 255, np.uint8)
        colours[: len(COLOURS)] = COLOURS
        for path in sorted(root.glob("annotations/*/*.png")):
            index = tf.io.decode_png(path.read_bytes(), channels=1).numpy()[..., 0]
            path.write_bytes(tf.io.encode_png(colours[index]).numpy())
        lines = [f"{n} {r} {g} {b}" for n, (r, g, b) in zip(NAMES, COLOURS)] + ["ignore 255 255 255"]
    else:
        lines = list(NAMES)
    (root / "classes.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("coloured", [False, True], ids=["index_masks", "rgb_masks"])
def test_folder_dataset_through_every_script(coloured, tmp_path):
    raw, data_dir, workdir = tmp_path / "raw", tmp_path / "tfds", tmp_path / "run"
    _write(raw, coloured)
    out = _run(
        "prepare_data.py", "--dataset=folder", f"--manual_dir={raw}", "--name=mine", f"--data_dir={data_dir}"
    )
    assert "Prepared mine" in out and "(train: 6, val: 2)" in out and "Pixels per class in train" in out
    overrides = [f"--override={o}" for o in (*runs.TINY_OVERRIDES, "data.name=mine", "trainer.train_steps=3")]
    _run("train.py", "--experiment=folder_r50_os8", f"--workdir={workdir}", f"--data_dir={data_dir}",
         "--from_scratch", *overrides)  # fmt: skip
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["num_classes"] == 5 and tuple(config["data"]["class_names"]) == NAMES
    table = _run("evaluate.py", "--experiment=folder_r50_os8", f"--workdir={workdir}")
    rows = [line.split()[0] for line in table.splitlines() if re.match(r"^[a-z]+\s+[\d.na]+\s", line)]
    assert rows == list(NAMES), table
    export_dir = tmp_path / "export"
    _run("export.py", "--experiment=folder_r50_os8", f"--workdir={workdir}", f"--export_dir={export_dir}")
    assets = export_dir / "1" / "assets"
    assert (assets / "labels.txt").read_text().split("\n")[: len(NAMES)] == list(NAMES)
    palette = [
        tuple(int(v) for v in line.split()) for line in (assets / "palette.txt").read_text().splitlines()
    ]
    if coloured:
        assert palette == list(COLOURS)
    predictions = tmp_path / "predictions"
    _run(
        "predict.py", f"--export_dir={export_dir}", f"--input={raw / 'images/val'}", f"--output={predictions}"
    )
    painted = tf.io.decode_png((predictions / "val_00000_labels.png").read_bytes(), channels=3).numpy()
    assert {tuple(c) for c in painted.reshape(-1, 3).tolist()} <= set(palette)


def _demo_recipe(script: str) -> list[str]:
    """The flags `make demo` passes to `script` (Makefile), so this test follows the demo's budget."""
    for line in (Path(runs.REPO) / "Makefile").read_text().splitlines():
        if f"scripts/{script}" in line:
            args = shlex.split(line.split(f"scripts/{script}", 1)[1])
            return [
                a
                for a in args
                if not a.startswith(("--output_dir", "--workdir", "--experiment", "--data_dir"))
            ]
    raise AssertionError(f"the Makefile's demo does not run scripts/{script}")


@pytest.mark.slow
def test_demo_data_in_the_folder_layout_reaches_the_demo_miou(tmp_path):
    # The demo experiment as it is (model, trainer, optimizer budget), only the data section
    # switched to the folder dataset written from the same synthetic images.
    raw, data_dir, workdir = tmp_path / "raw", tmp_path / "tfds", tmp_path / "run"
    start = time.perf_counter()
    _run("make_synthetic.py", f"--output_dir={raw}", "--layout=folder", *_demo_recipe("make_synthetic.py"))
    _run(
        "prepare_data.py",
        "--dataset=folder",
        f"--manual_dir={raw}",
        "--name=shapes",
        f"--data_dir={data_dir}",
    )
    data = ["data.dataset=folder", "data.name=shapes", "data.eval_split=val"]
    _run("train.py", "--experiment=synthetic_r18_os8", f"--workdir={workdir}", f"--data_dir={data_dir}",
         *[f"--override={o}" for o in data], *_demo_recipe("train.py"), timeout=3600)  # fmt: skip
    _run(
        "evaluate.py",
        "--experiment=synthetic_r18_os8",
        f"--workdir={workdir}",
        f"--output={workdir}/eval.json",
    )
    elapsed = time.perf_counter() - start
    result = json.loads((workdir / "eval.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
    assert config["data"]["dataset"] == "folder" and config["data"]["name"] == "shapes"
    print(f"demo through the folder dataset: {elapsed:.0f} s, mIoU {result['miou']:.4f}")
    assert result["miou"] >= DEMO_MIOU, result
