"""The checkpoint converter: strict errors, file formats, backbone import and the CLI."""

import os
import subprocess
import sys

import numpy as np
import pytest

import experiments
from fcn_tf.models import build_fcn, convert
from tests.models import reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def config():
    return experiments.get("voc_r50_os16").model


@pytest.fixture(scope="module")
def state_dict():
    return reference.generate_state_dict("r50_os16")


@pytest.fixture(scope="module")
def model(config):
    return build_fcn(config)


def _first_kernel(model):
    return np.asarray(model.get_layer("backbone").get_layer("stem_conv1").kernel).copy()


def test_missing_key_is_named_and_nothing_assigned(model, config, state_dict):
    before = _first_kernel(model)
    broken = dict(state_dict)
    del broken["decoder.4.running_var"]
    with pytest.raises(convert.ConversionError, match=r"missing keys \(1\): decoder.4.running_var"):
        convert.convert_fcn(model, broken, config)
    np.testing.assert_array_equal(_first_kernel(model), before)


def test_extra_key_is_named(model, config, state_dict):
    broken = dict(state_dict, **{"decoder.9.weight": np.zeros((3,), np.float32)})
    with pytest.raises(convert.ConversionError, match=r"unexpected keys \(1\): decoder.9.weight"):
        convert.convert_fcn(model, broken, config)


def test_wrong_shape_is_named(model, config, state_dict):
    broken = dict(state_dict)
    broken["backbone_net.layer2.1.conv2.weight"] = np.zeros((128, 128, 1, 1), np.float32)
    with pytest.raises(
        convert.ConversionError, match=r"shape mismatches \(1\):\s+backbone_net.layer2.1.conv2.weight"
    ):
        convert.convert_fcn(model, broken, config)


def test_wrong_num_classes_is_a_shape_error(state_dict):
    ade = experiments.get("ade20k_r50_os16").model
    with pytest.raises(convert.ConversionError, match="decoder.7.weight"):
        convert.convert_fcn(build_fcn(ade), state_dict, ade)


def _write(tmp_path, state, fmt):
    path = str(tmp_path / f"ckpt.{fmt}")
    if fmt == "npz":
        np.savez(path, **state)
    else:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
    return path


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_file_formats_and_wrapper(tmp_path, config, state_dict, fmt):
    path = _write(tmp_path, state_dict, fmt)
    out = str(tmp_path / "fcn.weights.h5")
    summary = convert.convert_checkpoint(config, path, out)
    assert summary["kind"] == "fcn" and os.path.isfile(out)
    assert summary["skipped"] and all(k.endswith("num_batches_tracked") for k in summary["skipped"])
    loaded = build_fcn(config)
    loaded.load_weights(out)
    np.testing.assert_array_equal(loaded.get_layer("head_classifier").bias, state_dict["decoder.7.bias"])


def test_failed_conversion_writes_nothing(tmp_path, config, state_dict):
    broken = dict(state_dict)
    del broken["backbone_net.stem.0.weight"]
    path = _write(tmp_path, broken, "npz")
    out = tmp_path / "fcn.weights.h5"
    with pytest.raises(convert.ConversionError):
        convert.convert_checkpoint(config, path, str(out))
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".weights.h5")]


def test_imagenet_backbone_converts_and_loads_as_pretrained(tmp_path, config, state_dict):
    # An ImageNet ResNet-v1c checkpoint: the backbone keys without prefix, plus the fc classifier.
    imagenet = {k[len("backbone_net.") :]: v for k, v in state_dict.items() if k.startswith("backbone_net.")}
    imagenet["fc.weight"] = np.zeros((1000, 2048), np.float32)
    imagenet["fc.bias"] = np.zeros((1000,), np.float32)
    path = _write(tmp_path, imagenet, "npz")
    out = str(tmp_path / "resnet50_v1c.weights.h5")
    summary = convert.convert_checkpoint(config, path, out)
    assert summary["kind"] == "backbone"
    assert {"fc.weight", "fc.bias"} <= set(summary["skipped"])
    model = build_fcn(config)
    convert.load_pretrained_backbone(model, out)
    np.testing.assert_array_equal(
        np.asarray(model.get_layer("backbone").get_layer("layer4_block2_conv3").kernel),
        imagenet["layer4.2.conv3.weight"].transpose(2, 3, 1, 0),
    )


def test_missing_pretrained_backbone_names_file_and_source(config):
    with pytest.raises(
        FileNotFoundError, match=r"nowhere/resnet50_v1c.weights.h5.*openmmlab.*--from_scratch"
    ):
        convert.load_pretrained_backbone(
            build_fcn(config),
            "/nowhere/resnet50_v1c.weights.h5",
            source="https://download.openmmlab.com/x.pth",
        )


def test_cli_converts_and_reports_errors(tmp_path, state_dict):
    path = _write(tmp_path, state_dict, "npz")
    out = tmp_path / "cli.weights.h5"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts/convert_checkpoint.py"),
        "--experiment=voc_r50_os16",
        f"--input={path}",
        f"--output={out}",
    ]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "converted" in ok.stdout and out.exists()
    bad = subprocess.run(
        cmd[:2]
        + [
            "--experiment=voc_r50_os16",
            f"--input={tmp_path}/absent.npz",
            f"--output={tmp_path}/x.weights.h5",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode != 0 and "absent.npz" in bad.stderr
