"""The named experiments: one function each, one visible registry (`EXPERIMENTS`).

The 12 reference experiments `{voc,ade20k,cityscapes}_r{50,101}_os{8,16}`
carry the recipe of sssegmentation's FCN (README "Experiments" lists the
published mIoU of each). Each is its dataset's recipe (`voc`, `ade20k`,
`cityscapes`) with the depth and output stride set by `_fcn`. Run one with

    python scripts/train.py --experiment=ade20k_r50_os8 --workdir=/tmp/run

The `folder_*` experiments are the same recipe on a user's own dataset
(`scripts/prepare_data.py --dataset=folder --name=NAME`), chosen with
`--override=data.name=NAME`; its class count, names and palette are read
from the prepared dataset by `resolve` (docs/custom_data.md).

The `synthetic_*` experiments train on the generated dataset
(`scripts/make_synthetic.py`) in minutes on a CPU; they are the demo and
the tests' default.

Every script turns its flags into a config with `resolve` (the one way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from fcn_tf.config import (
    ConfigError,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    OptimizerConfig,
    TrainerConfig,
    override,
    read_workdir_config,
    validate,
)
from fcn_tf.data.classes import num_classes
from fcn_tf.data.folder_info import with_dataset_classes

# OpenMMLab's ImageNet ResNet-v1c checkpoints, the reference's starting point.
_PRETRAINED_URL = {
    50: "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
    101: "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
}


def _reference_recipe(
    dataset: str,
    description: str,
    epochs: int,
    global_batch: int,
    crop_size: tuple[int, int],
    resize_target: tuple[int, int],
    checkpoint_every: int,
    eval_every: int,
    slide_stride: tuple[int, int],
) -> ExperimentConfig:
    """The reference's recipe on `dataset`: what differs between datasets is an argument.

    Args:
      dataset: a DataConfig.dataset value; its class count and split size
        come from `fcn_tf.data.classes`.
      description: one line for `list_experiments.py`.
      epochs: the reference's epochs; iterations are epochs x len(dataloader),
        which drops the last incomplete batch (derived when training starts,
        `fcn_tf.training.recipe`; the split size is that of
        `fcn_tf.data.classes.SPLIT_SIZES` for a complete dataset).
      global_batch: images per step over all replicas.
      crop_size: (h, w) training crop and sliding window.
      resize_target: (long, short) keep-ratio resize target of training (x
        the random ratio) and evaluation.
      checkpoint_every: steps between checkpoints.
      eval_every: steps between periodic evaluations.
      slide_stride: (h, w) sliding-window stride.
    """
    return ExperimentConfig(
        name=dataset,
        description=description,
        model=ModelConfig(num_classes=num_classes(dataset)),
        data=DataConfig(
            dataset=dataset,
            train_split="train",
            eval_split="validation",
            crop_size=crop_size,
            scale_target=resize_target,
            eval_target=resize_target,
            global_batch_size=global_batch,
        ),
        # The reference's LR is for its global batch: kept for any other batch
        # unless optimizer.lr_scaling=linear (fcn_tf.training.recipe).
        optimizer=OptimizerConfig(lr_reference_batch_size=global_batch),
        # train_steps 0: epochs x (split size // global batch), derived when
        # training starts from the prepared split and the batch that runs.
        trainer=TrainerConfig(
            train_steps=0,
            epochs=epochs,
            checkpoint_every=checkpoint_every,
            eval_every=eval_every,
        ),
        eval=EvalConfig(crop_size=crop_size, stride=slide_stride),
    )


def voc() -> ExperimentConfig:
    """PASCAL VOC 2012 + SBD trainaug (10,582) -> val (1,449), 21 classes, 60 epochs."""
    return _reference_recipe(
        "voc_aug",
        "PASCAL VOC 2012 + SBD trainaug (10,582) -> val (1,449), 21 classes",
        epochs=60,
        global_batch=16,
        crop_size=(512, 512),
        resize_target=(2048, 512),
        checkpoint_every=2000,
        eval_every=10000,
        slide_stride=(341, 341),
    )


def ade20k() -> ExperimentConfig:
    """ADE20k (ADEChallengeData2016) training (20,210) -> validation (2,000), 150 classes, 130 epochs."""
    return _reference_recipe(
        "ade20k",
        "ADE20k training (20,210) -> validation (2,000), 150 classes",
        epochs=130,
        global_batch=16,
        crop_size=(512, 512),
        resize_target=(2048, 512),
        checkpoint_every=4000,
        eval_every=20000,
        slide_stride=(341, 341),
    )


def cityscapes() -> ExperimentConfig:
    """Cityscapes fine train (2,975) -> val (500), 19 train ids, 220 epochs."""
    return _reference_recipe(
        "cityscapes",
        "Cityscapes fine train (2,975) -> val (500), 19 classes",
        epochs=220,
        global_batch=8,
        crop_size=(512, 1024),
        resize_target=(2048, 1024),
        checkpoint_every=2000,
        eval_every=10000,
        slide_stride=(341, 683),
    )


def folder() -> ExperimentConfig:
    """A user's folder dataset (data.name=NAME) with the reference's VOC/ADE20k recipe.

    512x512 crops, keep-ratio resize (2048, 512) x [0.5, 2], photometric
    distortion, SGD 0.01, poly, aux 0.4, batch 16. The class count, names and
    palette come from the prepared dataset (`resolve`); the evaluation split
    is the "val" folder. Training runs 60 epochs of the prepared train split
    (VOC's count; train steps = 60 x (split size // 16), derived at start;
    `--override=trainer.epochs=N` for another).
    """
    return ExperimentConfig(
        name="folder",
        description="your folder dataset (--override=data.name=NAME), reference recipe",
        data=DataConfig(
            dataset="folder",
            train_split="train",
            eval_split="val",
            crop_size=(512, 512),
            scale_target=(2048, 512),
            eval_target=(2048, 512),
            global_batch_size=16,
        ),
        trainer=TrainerConfig(train_steps=0, epochs=60, checkpoint_every=2000, eval_every=0),
        eval=EvalConfig(crop_size=(512, 512), stride=(341, 341)),
    )


def _fcn(base: ExperimentConfig, name: str, depth: int, output_stride: int) -> ExperimentConfig:
    """FCN-R{depth}-D{output_stride} on `base`'s recipe, from the ImageNet ResNet-v1c backbone."""
    return dataclasses.replace(
        base,
        name=name,
        description=f"FCN-R{depth}-D{output_stride} on {base.description}",
        model=dataclasses.replace(
            base.model,
            backbone_depth=depth,
            output_stride=output_stride,
            pretrained_backbone=f"~/.fcn_tf/pretrained/resnet{depth}_v1c.weights.h5",
            pretrained_backbone_source=_PRETRAINED_URL[depth],
        ),
    )


def voc_r50_os8() -> ExperimentConfig:
    return _fcn(voc(), "voc_r50_os8", 50, 8)


def voc_r50_os16() -> ExperimentConfig:
    return _fcn(voc(), "voc_r50_os16", 50, 16)


def voc_r101_os8() -> ExperimentConfig:
    return _fcn(voc(), "voc_r101_os8", 101, 8)


def voc_r101_os16() -> ExperimentConfig:
    return _fcn(voc(), "voc_r101_os16", 101, 16)


def ade20k_r50_os8() -> ExperimentConfig:
    return _fcn(ade20k(), "ade20k_r50_os8", 50, 8)


def ade20k_r50_os16() -> ExperimentConfig:
    return _fcn(ade20k(), "ade20k_r50_os16", 50, 16)


def ade20k_r101_os8() -> ExperimentConfig:
    return _fcn(ade20k(), "ade20k_r101_os8", 101, 8)


def ade20k_r101_os16() -> ExperimentConfig:
    return _fcn(ade20k(), "ade20k_r101_os16", 101, 16)


def cityscapes_r50_os8() -> ExperimentConfig:
    return _fcn(cityscapes(), "cityscapes_r50_os8", 50, 8)


def cityscapes_r50_os16() -> ExperimentConfig:
    return _fcn(cityscapes(), "cityscapes_r50_os16", 50, 16)


def cityscapes_r101_os8() -> ExperimentConfig:
    return _fcn(cityscapes(), "cityscapes_r101_os8", 101, 8)


def cityscapes_r101_os16() -> ExperimentConfig:
    return _fcn(cityscapes(), "cityscapes_r101_os16", 101, 16)


def folder_r50_os8() -> ExperimentConfig:
    return _fcn(folder(), "folder_r50_os8", 50, 8)


def folder_r50_os16() -> ExperimentConfig:
    return _fcn(folder(), "folder_r50_os16", 50, 16)


def folder_r101_os8() -> ExperimentConfig:
    return _fcn(folder(), "folder_r101_os8", 101, 8)


def folder_r101_os16() -> ExperimentConfig:
    return _fcn(folder(), "folder_r101_os16", 101, 16)


def synthetic_r18_os8() -> ExperimentConfig:
    """The demo: FCN-R18-D8 from scratch on the synthetic shapes dataset.

    `make demo` trains and evaluates it on a 2-core CPU in under 10 minutes,
    a new virtual environment included (434 s measured);
    expected mIoU on the synthetic validation split: >= 0.7 (the measured
    figure is in BENCHMARKS.md).
    """
    return ExperimentConfig(
        name="synthetic_r18_os8",
        description="Demo: FCN-R18-D8 from scratch on synthetic shapes (CPU, minutes)",
        model=ModelConfig(
            num_classes=num_classes("synthetic"),
            backbone_depth=18,
            output_stride=8,
            head_channels=128,
            aux_channels=64,
        ),
        data=DataConfig(
            dataset="synthetic",
            data_dir="data/tfds",
            train_split="train",
            eval_split="validation",
            crop_size=(96, 96),
            scale_target=(128, 96),
            ratio_range=(0.75, 1.5),
            eval_target=(128, 96),
            global_batch_size=8,
        ),
        # Chosen by an lr x steps sweep to fit the demo's 10 minutes with a new
        # virtual environment (BENCHMARKS.md, "The demo"): 350 steps at lr 0.03
        # reached mIoU 0.740, 300 at 0.04 0.732, 450 at 0.02 0.755; output
        # stride 16 is 4x faster per step but stopped near 0.68 (900 steps).
        optimizer=OptimizerConfig(base_lr=0.03, weight_decay=1e-4, lr_reference_batch_size=8),
        trainer=TrainerConfig(
            train_steps=350,
            log_every=25,
            image_summary_every=175,
            checkpoint_every=175,
            eval_every=350,
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
    "voc_r50_os8": voc_r50_os8,
    "voc_r50_os16": voc_r50_os16,
    "voc_r101_os8": voc_r101_os8,
    "voc_r101_os16": voc_r101_os16,
    "ade20k_r50_os8": ade20k_r50_os8,
    "ade20k_r50_os16": ade20k_r50_os16,
    "ade20k_r101_os8": ade20k_r101_os8,
    "ade20k_r101_os16": ade20k_r101_os16,
    "cityscapes_r50_os8": cityscapes_r50_os8,
    "cityscapes_r50_os16": cityscapes_r50_os16,
    "cityscapes_r101_os8": cityscapes_r101_os8,
    "cityscapes_r101_os16": cityscapes_r101_os16,
    "folder_r50_os8": folder_r50_os8,
    "folder_r50_os16": folder_r50_os16,
    "folder_r101_os8": folder_r101_os8,
    "folder_r101_os16": folder_r101_os16,
    "synthetic_r18_os8": synthetic_r18_os8,
    "synthetic_r50_os8": synthetic_r50_os8,
}


def get(name: str) -> ExperimentConfig:
    """Returns the validated experiment `name`.

    Raises:
      ConfigError: `name` is not registered; the message lists the valid names.
    """
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; valid experiments: {', '.join(EXPERIMENTS)}")
    return validate(EXPERIMENTS[name]())


def resolve(name: str, workdir: str | None = None, overrides=()) -> ExperimentConfig:
    """The config a script runs: the one way from flags to an `ExperimentConfig`.

    The starting point is the config a training run wrote to
    `WORKDIR/config.json` when there is one (so evaluation, export, predict
    and a resumed training rebuild the model that was trained), else the
    registered experiment `name`; then `overrides` are applied in order and
    the result is validated. A folder dataset's class count, names and
    palette are read from the prepared dataset (`data.name`) unless the
    workdir's config already holds them.

    Args:
      name: a registered experiment name.
      workdir: a training work directory, or None.
      overrides: "key=value" assignments (`fcn_tf.config.override`), e.g.
        from --override and from the scripts' own flags.

    Raises:
      ConfigError: unknown experiment, a workdir trained with ANOTHER
        experiment (the one rule for a name mismatch: refuse, naming both),
        an unreadable config.json, a bad override, or a folder experiment
        without data.name or whose dataset is not prepared.
    """
    config = get(name)
    saved = read_workdir_config(workdir)
    if saved is not None:
        if saved.name != name:
            raise ConfigError(
                f"{workdir} was trained with experiment {saved.name!r}, not {name!r}: "
                f"pass --experiment={saved.name} or another workdir"
            )
        config = saved
    return validate(with_dataset_classes(override(config, *overrides)))
