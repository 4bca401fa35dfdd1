"""TensorBoard output of training, read back with TensorBoard's own event reader; colour helpers."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fcn_tf import summaries, training
from fcn_tf.config import ExperimentConfig, ModelConfig, TrainerConfig, override
from harness import tiny


def _tags(logdir):
    accumulator = EventAccumulator(logdir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    # tf.summary (TF2) writes scalars and images as tensor summaries.
    return set(tags["tensors"]) | set(tags["scalars"]) | set(tags["images"]), accumulator


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("summaries"))
    config = ExperimentConfig(
        name="tiny",
        model=ModelConfig(num_classes=3),
        trainer=TrainerConfig(
            train_steps=4, log_every=2, checkpoint_every=4, image_summary_every=2, eval_every=2
        ),
    )
    config = override(config, "data.global_batch_size=4", "data.dataset=synthetic")
    result = training.train(
        config,
        workdir,
        tf.distribute.get_strategy(),
        model_fn=lambda c: tiny.tiny_segmenter(),
        dataset_fn=tiny.dataset_fn(),
        eval_dataset_fn=tiny.eval_dataset_fn(),
    )
    return workdir, result


def test_train_event_file_has_scalar_and_image_tags(trained):
    workdir, _ = trained
    tags, accumulator = _tags(summaries.summary_dir(workdir, "train"))
    missing = set(summaries.TRAIN_SCALAR_TAGS + summaries.IMAGE_TAGS) - tags
    assert not missing, (missing, tags)
    steps = [event.step for event in accumulator.Tensors("loss/total")]
    assert steps == [1, 2, 4]  # the first step, then every log_every
    lr = [float(tf.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors("learning_rate")]
    assert lr[0] == pytest.approx(0.01) and lr[-1] < lr[0]
    image = accumulator.Tensors("images/prediction")[0]
    assert image.step == 2


def test_eval_event_file_has_miou_accuracy_and_per_class_iou(trained):
    workdir, result = trained
    tags, accumulator = _tags(summaries.summary_dir(workdir, "eval"))
    for tag in ("eval/mIoU", "eval/aAcc", "eval/mAcc"):
        assert tag in tags, tags
    assert any(tag.startswith("eval/IoU/") for tag in tags), tags
    assert [e.step for e in accumulator.Tensors("eval/mIoU")] == [2, 4]
    final = float(tf.make_ndarray(accumulator.Tensors("eval/mIoU")[-1].tensor_proto))
    assert final == pytest.approx(result["eval"]["miou"], rel=1e-6)


def test_denormalize_inverts_normalization():
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    pixels = np.array([[[[0, 128, 255]]]], np.float32)
    normalized = (pixels - np.array(mean)) / np.array(std)
    np.testing.assert_array_equal(
        summaries.denormalize(normalized, mean, std).numpy(), pixels.astype(np.uint8)
    )


def test_eval_scalars_skips_absent_classes():
    scalars = summaries.eval_scalars(
        {"miou": 0.5, "aacc": 0.9, "iou": np.array([0.4, np.nan, 0.6]), "class_names": ["a", "b", "c"]}
    )
    assert scalars == {"eval/mIoU": 0.5, "eval/aAcc": 0.9, "eval/IoU/a": 0.4, "eval/IoU/c": 0.6}
