"""Shared test harness: the --slow flag and common fixtures."""

import os

# Quiet TensorFlow's C++ logs and keep runs on the CPU in every test process
# (the GPU check, tests/test_gpu_check.py, gives its own process the user's GPUs back).
if "CUDA_VISIBLE_DEVICES" in os.environ:
    os.environ.setdefault("FCN_TF_USER_CUDA_VISIBLE_DEVICES", os.environ["CUDA_VISIBLE_DEVICES"])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Every child process (a script, a worker, `python -c`) imports this checkout's
# fcn_tf and the harness first, not another copy an editable install points to.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_REPO, os.path.join(_REPO, "tests"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
)

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
