"""The named experiments: one function each, one visible registry (`EXPERIMENTS`).

The 12 reference experiments `{voc,ade20k,cityscapes}_r{50,101}_os{8,16}`
carry the recipe of sssegmentation's FCN (see README "Experiments" for the
published mIoU). Each is a dataset base plus `dataclasses.replace` for the
depth and output stride. Run one with

    python scripts/train.py --experiment=ade20k_r50_os8 --workdir=/tmp/run

The `synthetic_*` experiments train on the generated dataset
(`scripts/make_synthetic.py`) in minutes on a CPU; they are the demo and
the tests' default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from fcn_tf.config import (
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    OptimizerConfig,
    TrainerConfig,
    validate,
)

# OpenMMLab's ImageNet ResNet-v1c checkpoints, the reference's starting point.
_PRETRAINED_URL = {
    50: "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
    101: "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
}


def _pretrained(depth: int) -> dict:
    return dict(
        pretrained_backbone=f"~/.fcn_tf/pretrained/resnet{depth}_v1c.weights.h5",
        pretrained_backbone_source=_PRETRAINED_URL[depth],
    )


def _iterations(epochs: int, num_train: int, global_batch: int) -> int:
    # The reference counts iterations as epochs x len(dataloader), which drops
    # the last incomplete batch.
    return epochs * (num_train // global_batch)


def _voc() -> ExperimentConfig:
    """PASCAL VOC 2012 + SBD trainaug (10,582) -> val (1,449), 21 classes."""
    return ExperimentConfig(
        name="voc",
        description="PASCAL VOC 2012 + SBD trainaug (10,582) -> val (1,449), 21 classes",
        model=ModelConfig(num_classes=21),
        data=DataConfig(
            dataset="voc_aug",
            train_split="train",
            eval_split="validation",
            num_classes=21,
            crop_size=(512, 512),
            scale_target=(2048, 512),
            eval_target=(2048, 512),
            global_batch_size=16,
        ),
        trainer=TrainerConfig(
            train_steps=_iterations(60, 10582, 16), epochs=60, checkpoint_every=2000, eval_every=10000
        ),
        eval=EvalConfig(crop_size=(512, 512), stride=(341, 341)),
    )


def _ade20k() -> ExperimentConfig:
    """ADE20k (ADEChallengeData2016) training (20,210) -> validation (2,000), 150 classes."""
    return ExperimentConfig(
        name="ade20k",
        description="ADE20k training (20,210) -> validation (2,000), 150 classes",
        model=ModelConfig(num_classes=150),
        data=DataConfig(
            dataset="ade20k",
            train_split="train",
            eval_split="validation",
            num_classes=150,
            crop_size=(512, 512),
            scale_target=(2048, 512),
            eval_target=(2048, 512),
            global_batch_size=16,
        ),
        trainer=TrainerConfig(
            train_steps=_iterations(130, 20210, 16), epochs=130, checkpoint_every=4000, eval_every=20000
        ),
        eval=EvalConfig(crop_size=(512, 512), stride=(341, 341)),
    )


def _cityscapes() -> ExperimentConfig:
    """Cityscapes fine train (2,975) -> val (500), 19 train ids."""
    return ExperimentConfig(
        name="cityscapes",
        description="Cityscapes fine train (2,975) -> val (500), 19 classes",
        model=ModelConfig(num_classes=19),
        data=DataConfig(
            dataset="cityscapes",
            train_split="train",
            eval_split="validation",
            num_classes=19,
            crop_size=(512, 1024),
            scale_target=(2048, 1024),
            eval_target=(2048, 1024),
            global_batch_size=8,
        ),
        trainer=TrainerConfig(
            train_steps=_iterations(220, 2975, 8), epochs=220, checkpoint_every=2000, eval_every=10000
        ),
        eval=EvalConfig(crop_size=(512, 1024), stride=(341, 683)),
    )


_BASES = {"voc": _voc, "ade20k": _ade20k, "cityscapes": _cityscapes}


def _reference(dataset: str, depth: int, output_stride: int) -> Callable[[], ExperimentConfig]:
    def make() -> ExperimentConfig:
        base = _BASES[dataset]()
        name = f"{dataset}_r{depth}_os{output_stride}"
        return dataclasses.replace(
            base,
            name=name,
            description=f"FCN-R{depth}-D{output_stride} on {base.description}",
            model=dataclasses.replace(
                base.model, backbone_depth=depth, output_stride=output_stride, **_pretrained(depth)
            ),
        )

    make.__doc__ = f"FCN ResNet-{depth} output stride {output_stride} on {dataset} (reference recipe)."
    return make


def synthetic_r18_os8() -> ExperimentConfig:
    """The demo: FCN-R18-D8 from scratch on the synthetic shapes dataset.

    `make demo` runs it on a 2-core CPU in under 10 minutes; expected mIoU on
    the synthetic validation split: >= 0.7.
    """
    return ExperimentConfig(
        name="synthetic_r18_os8",
        description="Demo: FCN-R18-D8 from scratch on synthetic shapes (CPU, minutes)",
        model=ModelConfig(
            num_classes=5, backbone_depth=18, output_stride=8, head_channels=128, aux_channels=64
        ),
        data=DataConfig(
            dataset="synthetic",
            data_dir="data/tfds",
            train_split="train",
            eval_split="validation",
            num_classes=5,
            crop_size=(96, 96),
            scale_target=(128, 96),
            ratio_range=(0.75, 1.5),
            eval_target=(128, 96),
            global_batch_size=8,
        ),
        # 450 steps at lr 0.02 reached mIoU 0.752 (600 steps at 0.01: 0.742;
        # 500 at 0.01: 0.725; 450 at 0.015: 0.745), about 0.7 s per step on 2 cores.
        optimizer=OptimizerConfig(base_lr=0.02, weight_decay=1e-4),
        trainer=TrainerConfig(
            train_steps=450,
            log_every=25,
            image_summary_every=150,
            checkpoint_every=150,
            eval_every=450,
            deterministic=False,
        ),
        eval=EvalConfig(crop_size=(96, 96), stride=(64, 64)),
    )


def synthetic_r50_os8() -> ExperimentConfig:
    """The reference architecture (FCN-R50-D8, deep stem) on synthetic shapes."""
    base = synthetic_r18_os8()
    return dataclasses.replace(
        base,
        name="synthetic_r50_os8",
        description="FCN-R50-D8 (reference architecture) from scratch on synthetic shapes",
        model=dataclasses.replace(base.model, backbone_depth=50, head_channels=512, aux_channels=512),
    )


# The registry: every named experiment, in the order `list_experiments.py` prints.
EXPERIMENTS: dict[str, Callable[[], ExperimentConfig]] = {
    f"{dataset}_r{depth}_os{stride}": _reference(dataset, depth, stride)
    for dataset in ("voc", "ade20k", "cityscapes")
    for depth in (50, 101)
    for stride in (8, 16)
}
EXPERIMENTS["synthetic_r18_os8"] = synthetic_r18_os8
EXPERIMENTS["synthetic_r50_os8"] = synthetic_r50_os8


def get(name: str) -> ExperimentConfig:
    """Returns the validated experiment `name`.

    Raises:
      KeyError: `name` is not registered; the message lists the valid names.
    """
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; valid experiments: {', '.join(EXPERIMENTS)}")
    return validate(EXPERIMENTS[name]())
