"""Experiments: every one builds and validates; overrides reject what they should."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import experiments
from fcn_tf import config as config_lib
from fcn_tf.config import ConfigError, from_dict, override, read_workdir_config, to_dict, to_json
from fcn_tf.data.classes import SPLIT_SIZES
from fcn_tf.models import build_fcn
from fcn_tf.training import recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = [f"{d}_r{n}_os{s}" for d in ("voc", "ade20k", "cityscapes") for n in (50, 101) for s in (8, 16)]


def test_registry_has_the_twelve_reference_experiments():
    assert REFERENCE == [n for n in experiments.EXPERIMENTS if not n.startswith(("synthetic", "folder"))]


@pytest.mark.parametrize("name", list(experiments.EXPERIMENTS))
def test_every_experiment_validates_and_builds(name):
    config = experiments.get(name)
    assert config.name == name and config.description
    model = build_fcn(config.model)
    out = model(np.zeros((1, 33, 41, 3), np.float32), training=False)
    assert out["logits"].shape == (1, 33, 41, config.model.num_classes)


@pytest.mark.parametrize(
    "name, classes, crop, batch, steps",
    [
        ("voc_r50_os8", 21, (512, 512), 16, 39660),
        ("ade20k_r101_os16", 150, (512, 512), 16, 164190),
        ("cityscapes_r50_os8", 19, (512, 1024), 8, 81620),
    ],
)
def test_reference_recipe(name, classes, crop, batch, steps):
    c = experiments.get(name)
    assert (c.model.num_classes, c.data.crop_size, c.data.global_batch_size) == (classes, crop, batch)
    # The steps are derived when training starts, from the split size of the prepared dataset.
    assert c.trainer.train_steps == 0 and c.optimizer.lr_reference_batch_size == batch
    resolved, _ = recipe.for_replicas(c, 8, split_size=lambda: SPLIT_SIZES[c.data.dataset]["train"])
    assert resolved.trainer.train_steps == steps
    assert (c.optimizer.base_lr, c.optimizer.min_lr, c.optimizer.power) == (0.01, 1e-4, 0.9)
    assert (c.optimizer.momentum, c.optimizer.weight_decay, c.trainer.aux_weight) == (0.9, 5e-4, 0.4)
    assert c.model.stem == "deep" and c.model.head_num_convs == 2 and c.model.head_channels == 512
    assert c.data.ignore_label == 255 and c.data.cat_max_ratio == 0.75


def test_unknown_experiment_lists_choices():
    with pytest.raises(ConfigError, match="voc_r50_os8"):
        experiments.get("voc_r50_os4")


def test_registry_names_every_experiment_literally():
    # `grep voc_r50_os8 experiments/` must find the experiment: one function per name.
    source = open(experiments.__file__).read()
    for name, make in experiments.EXPERIMENTS.items():
        assert make.__name__ == name and f'"{name}": {name},' in source
        assert experiments.get(name).name == name


def test_resolve_starts_from_the_workdir_config_and_refuses_another_experiment(tmp_path):
    base = experiments.get("synthetic_r18_os8")
    assert experiments.resolve("synthetic_r18_os8") == base
    trained = override(base, "model.head_channels=32")
    (tmp_path / "config.json").write_text(to_json(trained))
    resolved = experiments.resolve("synthetic_r18_os8", str(tmp_path), ["trainer.train_steps=3"])
    assert resolved.model == trained.model and resolved.trainer.train_steps == 3
    with pytest.raises(
        ConfigError, match="trained with experiment 'synthetic_r18_os8', not 'synthetic_r50_os8'"
    ):
        experiments.resolve("synthetic_r50_os8", str(tmp_path))


def test_from_dict_is_strict(tmp_path):
    values = to_dict(experiments.get("synthetic_r18_os8"))
    assert from_dict(json.loads(json.dumps(values))) == experiments.get("synthetic_r18_os8")
    values["data"]["num_classes"] = 5  # a key of an older fcn_tf
    values["trainer"]["epochz"] = 3
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) data.num_classes, trainer.epochz"):
        from_dict(values)
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ConfigError, match="config.json: unknown config key"):
        read_workdir_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_workdir_config(str(tmp_path))


def test_override_parses_types_and_rejects_unknown_keys():
    c = experiments.get("voc_r50_os8")
    c2 = config_lib.override(
        c,
        "trainer.train_steps=20",
        "data.crop_size=256,128",
        "eval.flip=true",
        "eval.scales=0.5,1.0,1.5",
        "model.pretrained_backbone=",
    )
    assert (c2.trainer.train_steps, c2.data.crop_size, c2.eval.flip) == (20, (256, 128), True)
    assert c2.eval.scales == (0.5, 1.0, 1.5) and c2.model.pretrained_backbone == ""
    assert c.trainer.train_steps == 0  # the original is untouched
    with pytest.raises(
        config_lib.ConfigError, match="unknown config key 'trainer.stepz'.*trainer.train_steps"
    ):
        config_lib.override(c, "trainer.stepz=1")
    with pytest.raises(config_lib.ConfigError, match="cannot read 'ten' as int"):
        config_lib.override(c, "trainer.train_steps=ten")
    with pytest.raises(config_lib.ConfigError, match="key=value"):
        config_lib.override(c, "trainer.train_steps")
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'model'"):
        config_lib.override(c, "model=3")


def test_validate_reports_inconsistent_values():
    c = experiments.get("voc_r50_os8")
    bad = dataclasses.replace(c, model=dataclasses.replace(c.model, output_stride=4, num_classes=300))
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(bad)
    assert "output_stride=4" in str(e.value) and "model.num_classes=300, 255]" in str(e.value)
    with pytest.raises(config_lib.ConfigError, match="inter_op_threads=-2"):
        config_lib.validate(config_lib.override(c, "trainer.inter_op_threads=-2"))


def test_json_round_trip():
    c = config_lib.override(experiments.get("cityscapes_r101_os16"), "eval.scales=0.75,1.0")
    assert config_lib.from_dict(__import__("json").loads(config_lib.to_json(c))) == c


def test_list_experiments_script():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts/list_experiments.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in REFERENCE:
        assert name in out
