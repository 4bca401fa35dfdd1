"""Tiny end-to-end runs: script command lines, their environment, prepared datasets, checkpoint contents."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(REPO, "tests")


# A seconds-sized variant of synthetic_r18_os8 for subprocess tests of scripts/train.py.
TINY_OVERRIDES = (
    "model.backbone_depth=18",
    "model.head_channels=32",
    "model.aux_channels=16",
    "data.crop_size=32,32",
    "data.scale_target=48,32",
    "data.eval_target=48,32",
    "data.global_batch_size=2",
    "eval.crop_size=32,32",
    "eval.stride=32,32",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.image_summary_every=0",
    "trainer.checkpoint_every=2",
    "trainer.deterministic=true",
)


def make_synthetic_tfds(root, num_train: int = 12, num_val: int = 3) -> str:
    """Writes and prepares a tiny synthetic dataset under `root`; returns its TFDS data_dir."""
    from fcn_tf.data import sources, synthetic

    raw, data_dir = os.path.join(root, "raw"), os.path.join(root, "tfds")
    synthetic.write_dataset(raw, num_train=num_train, num_val=num_val, height=48, width=64)
    sources.prepare("synthetic", raw, data_dir, allow_count_mismatch=True)
    return data_dir


def train_command(workdir, data_dir, *overrides, experiment="synthetic_r18_os8", extra=()):
    """The scripts/train.py command line for a tiny run."""
    args = [sys.executable, f"{REPO}/scripts/train.py", f"--experiment={experiment}", f"--workdir={workdir}"]
    args.append(f"--data_dir={data_dir}")
    args += [f"--override={o}" for o in (*TINY_OVERRIDES, *overrides)]
    return args + list(extra)


def subprocess_env(**extra):
    # The tests folder too: children import the harness as the pytest process does.
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="2",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join([REPO, TESTS]),
    )
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def checkpoint_variables(prefix: str) -> dict:
    """Model and optimizer variables of a checkpoint (iterator and bookkeeping state left out)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    keys = [
        k
        for k in reader.get_variable_to_shape_map()
        if (k.startswith("model/") or k.startswith("optimizer/")) and "OBJECT_GRAPH" not in k
    ]
    return {k: reader.get_tensor(k) for k in keys}
