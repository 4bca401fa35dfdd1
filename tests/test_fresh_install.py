"""The README's sequence on the plain install: a fresh virtual environment with only `pip install -e .`.

make_synthetic -> prepare_data -> train (demo size, seconds) -> export ->
predict -> the export served by a fresh process the way TF Serving loads it
(the saved graph in a session, the warm-up records replayed). The
environment has none of the optional packages, so the LiteRT export must
stop with one line naming what is missing. The package is installed from a
clone of the committed files, so nothing is left in this checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from harness import runs

# Runs with the fresh environment's Python: TensorFlow and the serving protos only.
SERVE = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = sys.argv[1]
    replayed = []
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
        for record in tf.compat.v1.io.tf_record_iterator(path + "/assets.extra/tf_serving_warmup_requests"):
            request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
            signature = meta_graph.signature_def[request.model_spec.signature_name]
            feeds = {signature.inputs[k].name: tf.make_ndarray(v) for k, v in request.inputs.items()}
            labels = session.run(signature.outputs["labels"].name, feeds)
            assert labels.shape[-2:] == (24, 32) and labels.min() >= 0 and labels.max() < 5, labels.shape
            replayed.append(request.model_spec.signature_name)
    print("replayed", ",".join(sorted(replayed)))
    """
)


def run(args, cwd, env, timeout=1800):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow  # creates a virtual environment and installs TensorFlow into it: minutes
def test_readme_sequence_on_the_plain_install(tmp_path):
    start = time.perf_counter()
    clone, venv = tmp_path / "clone", tmp_path / "venv"
    subprocess.run(["git", "clone", "-q", runs.REPO, str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = runs.subprocess_env()
    env.pop("PYTHONPATH")  # the fresh environment's installation only
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    run([python, "-m", "pip", "install", "-q", "-e", "."], clone, env)
    installed = time.perf_counter()
    modules = run(
        [
            python,
            "-c",
            "import importlib.util as u; print([m for m in ('ai_edge_litert', 'tf2onnx', 'onnxruntime') if u.find_spec(m)])",
        ],
        clone,
        env,
    )
    assert modules.stdout.strip() == "[]"  # no optional package came along

    overrides = [f"--override={o}" for o in runs.TINY_OVERRIDES + ("trainer.train_steps=4",)]
    run(
        [
            python,
            "scripts/make_synthetic.py",
            "--output_dir=data/synthetic_raw",
            "--num_train=12",
            "--num_val=3",
        ],
        clone,
        env,
    )
    run(
        [
            python,
            "scripts/prepare_data.py",
            "--dataset=synthetic",
            "--manual_dir=data/synthetic_raw",
            "--data_dir=data/tfds",
            "--allow_count_mismatch",
        ],
        clone,
        env,
    )
    run(
        [python, "scripts/train.py", "--experiment=synthetic_r18_os8", "--workdir=runs/demo", *overrides],
        clone,
        env,
    )
    # The README's export and predict commands, verbatim.
    exported = run(
        [
            python,
            "scripts/export.py",
            "--experiment=synthetic_r18_os8",
            "--workdir=runs/demo",
            "--export_dir=exports/fcn",
        ],
        clone,
        env,
    )
    assert exported.stdout.strip().endswith("to exports/fcn/1"), exported.stdout
    assert (clone / "exports/fcn/1/assets.extra/tf_serving_warmup_requests").is_file()
    photos = clone / "data/synthetic_raw/VOCdevkit/VOC2012/JPEGImages"
    predicted = run(
        [
            python,
            "scripts/predict.py",
            "--export_dir=exports/fcn",
            f"--input={photos}",
            "--output=predictions/",
        ],
        clone,
        env,
    )
    assert predicted.stdout.strip().splitlines()[-1] == "15 of 15 images segmented, 0 failed"
    assert len(os.listdir(clone / "predictions")) == 30

    (tmp_path / "serve.py").write_text(SERVE)
    served = run([python, str(tmp_path / "serve.py"), str(clone / "exports/fcn/1")], tmp_path, env)
    assert served.stdout.strip() == "replayed predict_images,predict_images_with_logits,serving_default"

    # An optional runtime that is not installed: one line, before any work.
    litert = subprocess.run(
        [
            python,
            "scripts/export.py",
            "--experiment=synthetic_r18_os8",
            "--workdir=runs/demo",
            "--export_dir=exports/lite",
            "--format=litert",
        ],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert litert.returncode == 1
    assert litert.stderr.strip().splitlines()[-1] == (
        "export.py: the litert export needs ai-edge-litert (pip install -e '.[litert]'), which is not installed"
    )
    assert "Traceback" not in litert.stderr and not (clone / "exports/lite").exists()
    print(
        f"fresh install: pip install -e . {installed - start:.0f} s, "
        f"whole sequence {time.perf_counter() - start:.0f} s"
    )
