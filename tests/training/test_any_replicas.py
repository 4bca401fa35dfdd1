"""32 replicas (logical CPU devices): voc's recipe is refused with the overrides to use; with them it trains.

The refusal is checked through `scripts/train.py` as a user meets it; the run
with the overrides is this file as a child (`--child`) on a tiny model, so
that 32 replicas trace in seconds, reading a prepared synthetic split of 64
examples: 1 epoch at global batch 32 is 2 derived steps.
"""

from __future__ import annotations

import re
import sys

import pytest

from harness import runs, tiny
from harness.cluster import Cluster, Sim

REPLICAS = 32


def _child(workdir, data_dir, *overrides):
    from absl import logging

    import experiments
    from fcn_tf import distribute, training
    from fcn_tf.config import override
    from fcn_tf.data.classes import num_classes

    logging.set_verbosity(logging.INFO)
    strategy = distribute.make_strategy("auto")
    assert strategy.num_replicas_in_sync == REPLICAS, strategy.num_replicas_in_sync
    config = override(
        experiments.get("voc_r50_os8"),  # the recipe: global batch 16, 60 epochs, lr 0.01
        "data.dataset=synthetic",
        f"data.data_dir={data_dir}",
        f"model.num_classes={num_classes('synthetic')}",
        "data.crop_size=16,16",
        "data.scale_target=48,32",
        "trainer.epochs=1",
        "trainer.log_every=1",
        "trainer.image_summary_every=0",
        *overrides,
    )
    result = training.train(
        config,
        workdir,
        strategy,
        from_scratch=True,
        model_fn=lambda c: tiny.tiny_segmenter(c.model.num_classes),
        evaluate=False,
    )
    print(f"RESULT step {result['step']}", flush=True)


@pytest.mark.slow
def test_32_replicas_refuse_the_voc_recipe_with_the_overrides_and_train_with_them(tmp_path):
    data_dir = runs.make_synthetic_tfds(tmp_path, num_train=64, num_val=2)
    with Cluster(tmp_path / "refused", workers=1, sim=Sim(logical_cpus=REPLICAS), launcher="none") as cluster:
        cluster.start(
            [
                sys.executable,
                f"{runs.REPO}/scripts/train.py",
                "--experiment=voc_r50_os8",
                f"--workdir={tmp_path / 'voc'}",
            ]
        )
        (refused,) = cluster.wait(timeout=300)
    assert refused.returncode == 1, refused.output[-3000:]
    (line,) = refused.lines(r"^error: ")
    assert "data.global_batch_size=16 is not divisible by 32 replica(s)" in line, refused.output[-3000:]
    assert "Traceback" not in refused.output
    overrides = re.findall(r"--override=(\S+)", line)
    assert overrides == ["data.global_batch_size=32", "optimizer.lr_scaling=linear"], line

    with Cluster(tmp_path / "run", workers=1, sim=Sim(logical_cpus=REPLICAS), launcher="none") as cluster:
        cluster.start([sys.executable, __file__, "--child", str(tmp_path / "run-wd"), data_dir, *overrides])
        (run,) = cluster.wait(timeout=900)
    assert run.returncode == 0, run.output[-5000:]
    assert run.lines(r"^RESULT step 2$"), run.output[-3000:]
    (derived,) = run.lines(r"Train steps \d+ \(")
    assert (
        "Train steps 2 (trainer.epochs=1 x (64 examples in train // global batch 32 = 2 steps per epoch)); "
        "learning rate 0.02 (optimizer.lr_scaling=linear: 0.01 x 32/16), global batch 32 on 32 replica(s)"
    ) in derived
    assert run.lines(r"step 2/2 loss [\d.]+ .* lr 0\.0")


if __name__ == "__main__" and "--child" in sys.argv:
    _child(*sys.argv[sys.argv.index("--child") + 1 :])
