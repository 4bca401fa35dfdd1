"""Export latency: every export of a model timed side by side in its runtime, with its size and mIoU.

    python scripts/benchmark.py --what=export --exports=exports/fcn,exports/fcn_edge \
        --repeats=10 --warmup=2 [--evaluate --checkpoint=runs/demo]

An export is a SavedModel (a version directory, or `BASE/NAME` for its
latest version), a .tflite or .onnx file, or a directory holding a
SavedModel and/or fixed-size files (`fcn_tf.export.fixed_size.VARIANTS`'
file names, in that order). All of them run one after the other in one
fresh process (`benchmarks.harness.run_child`; TensorFlow, LiteRT and ONNX
Runtime on `threads` threads, GPUs hidden) on the fixed-size check batch
(`fixed_size.check_images`) at each file's input shape; a SavedModel gets
the first file's batch (one image at `fixed_size.default_size` when there
is no file) as uint8 through its `predict_images` signature, which also
resizes and normalizes.

Each row gives the export's size on disk and the median milliseconds per
image over `repeats` calls after `warmup` untimed ones. With `evaluate`,
each fixed-size file is scored on the experiment's evaluation split
(`fixed_size.evaluate`, with the config the export carries in its assets),
and with a `checkpoint` a first row scores the same fixed-size function run
by TensorFlow in-process: the reference the files are checked against.

This module imports neither TensorFlow nor fcn_tf at import time: the
parent (`benchmarks.suite`) stays light and the figures come from the child.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence

from benchmarks.harness import load_average, run_child, thread_env, time_calls

SAVED_MODEL = "saved_model"
TENSORFLOW_ROW = "tensorflow (in-process)"


def find_exports(paths: Sequence[str]) -> list[tuple[str, str]]:
    """[(row name, path)] of the exports at `paths`, in order.

    Args:
      paths: SavedModel directories, .tflite / .onnx files, or directories
        holding a SavedModel and/or fixed-size files.

    Raises:
      FileNotFoundError: a path holds no export.
    """
    from fcn_tf import export

    # {file name: row name}, in VARIANTS' order.
    names = {v.filename: f"{v.format} {v.name}" for v in export.VARIANTS.values()}
    found = []
    for path in (os.path.expanduser(p) for p in paths):
        if os.path.isfile(path):
            found.append((names.get(os.path.basename(path), os.path.basename(path)), path))
            continue
        before = len(found)
        try:
            found.append((SAVED_MODEL, export.resolve_version_dir(path)))
        except FileNotFoundError:
            pass
        found += [
            (name, os.path.join(path, f))
            for f, name in names.items()
            if os.path.isfile(os.path.join(path, f))
        ]
        if len(found) == before:
            raise FileNotFoundError(f"no export in {path}: no SavedModel, none of {', '.join(names)}")
    return found


def _disk_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def measure(
    exports: Sequence[str],
    checkpoint: str = "",
    repeats: int = 3,
    warmup: int = 1,
    threads: int = 2,
    evaluate: bool = False,
) -> list[dict]:
    """Times (and with `evaluate` scores) each export in this process; returns one row per export.

    Call it in a fresh process (`main` does): the thread settings apply only
    before TensorFlow runs anything.

    Args:
      exports: paths (see `find_exports`).
      checkpoint: with `evaluate`, also score TensorFlow in-process from
        this workdir, checkpoint prefix or `.weights.h5`.
      repeats: timed calls per export.
      warmup: untimed calls first (graph building, allocation, caches).
      threads: intra-op threads of every runtime.
      evaluate: score each fixed-size file on the evaluation split.

    Returns:
      [{"export", "path", "bytes", "ms_per_image", "miou"}], None where not measured.
    """
    from benchmarks.model import configure_tensorflow

    configure_tensorflow(threads)
    import tensorflow as tf

    from fcn_tf import export

    found = find_exports(exports)
    first = found[0][1]
    config = export.read_config(first if os.path.isdir(first) else os.path.dirname(first))
    runners = {
        path: export.load_runner(path, num_threads=threads) for name, path in found if name != SAVED_MODEL
    }
    if runners:
        shape = next(iter(runners.values())).input_shape
    else:
        shape = (1, *export.default_size(config), 3)
    rows = []
    if evaluate and checkpoint:
        model, _ = export.restored_model(config, checkpoint)
        first_runner = next(iter(runners.values()), None)
        dtype = first_runner.input_dtype.name if first_runner else "uint8"
        module = export.FixedSizeModel(config, model, shape[1:3], shape[0], dtype)
        miou = export.fixed_size.evaluate(export.TensorFlowRunner(module), config)["miou"]
        rows.append(_row(TENSORFLOW_ROW, None, None, None, miou))
    for name, path in found:
        if name == SAVED_MODEL:
            signature = tf.saved_model.load(path).signatures[export.PREDICT_IMAGES]
            images = tf.constant(export.fixed_size.check_images(tf.TensorSpec(shape, tf.uint8)))

            def call(signature=signature, images=images):
                return signature(images=images)["labels"].numpy()

            batch, miou = shape[0], None
        else:
            runner = runners[path]
            images = export.fixed_size.check_images(tf.TensorSpec(runner.input_shape, runner.input_dtype))

            def call(runner=runner, images=images):
                return runner(images)

            batch = runner.input_shape[0]
            miou = export.fixed_size.evaluate(runner, config)["miou"] if evaluate else None
        times = time_calls(call, warmup, repeats)
        rows.append(_row(name, path, _disk_bytes(path), statistics.median(times) / batch * 1e3, miou))
    return rows


def _row(name, path, size_bytes, ms_per_image, miou) -> dict:
    return {"export": name, "path": path, "bytes": size_bytes, "ms_per_image": ms_per_image, "miou": miou}


def format_table(rows: Sequence[dict]) -> str:
    """The rows side by side: export, size in MB, milliseconds per image, mIoU ("-" where not measured)."""
    lines = [f"{'export':<24} {'size MB':>8} {'ms/image':>9} {'mIoU':>7}"]
    for r in rows:
        size_text = f"{r['bytes'] / 1e6:8.1f}" if r["bytes"] is not None else f"{'-':>8}"
        latency_text = f"{r['ms_per_image']:9.1f}" if r["ms_per_image"] is not None else f"{'-':>9}"
        miou_text = f"{r['miou']:7.4f}" if r["miou"] is not None else f"{'-':>7}"
        lines.append(f"{r['export']:<24} {size_text} {latency_text} {miou_text}")
    return "\n".join(lines)


def main(
    exports: Sequence[str],
    checkpoint: str = "",
    repeats: int = 3,
    warmup: int = 1,
    threads: int = 2,
    evaluate: bool = False,
    log=print,
) -> list[dict]:
    """Runs `measure` in a fresh process and prints its table; returns the rows.

    Args:
      exports: paths (see `find_exports`).
      checkpoint: see `measure`.
      repeats: timed calls per export.
      warmup: untimed calls first.
      threads: intra-op threads of every runtime.
      evaluate: score each fixed-size file on the evaluation split.
      log: line printer.
    """
    kwargs = dict(
        exports=list(exports),
        checkpoint=checkpoint,
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        evaluate=evaluate,
    )
    env = {**thread_env(threads), "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    rows = run_child("benchmarks.export:measure", {"kwargs": kwargs}, env)
    log("")
    log(
        f"exports: {threads} threads, {warmup} warm-up + {repeats} timed calls, "
        f"load average now {load_average():.2f}"
    )
    log(format_table(rows))
    return rows
