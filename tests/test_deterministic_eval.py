"""Evaluation with `tf.config.experimental.enable_op_determinism()` on.

Op determinism is process-wide, so the evaluation runs in a fresh subprocess
(this file run as a script with --child). It runs twice there: with this
machine's CPU kernels, and with the device query patched to report an
accelerator, which selects the formulations used under op determinism on a
GPU (counts by sorting instead of `tf.math.bincount`, sliding windows added
in order instead of a scatter-add); both must give the eager reference's
confusion matrix.
"""

import os
import sys

import pytest

from harness.child import child_results, print_result

HERE = os.path.dirname(os.path.abspath(__file__))

MODES = {
    "whole": (),
    "slide": ("eval.mode=slide", "eval.crop_size=6,6", "eval.stride=4,4", "eval.window_batch=3"),
}


def _child():
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    import test_eval_lib

    from fcn_tf import devices, eval_lib

    results = {}
    for accelerator in (False, True):
        devices.accelerators_visible = lambda accelerator=accelerator: accelerator
        assert devices.deterministic_accelerator() is accelerator
        for mode, overrides in MODES.items():
            config = test_eval_lib.config_for(*overrides)
            num_classes = config.model.num_classes
            model = test_eval_lib.tiny_model(num_classes)
            items = test_eval_lib.examples(num_classes)
            got = eval_lib.evaluate(model, test_eval_lib.as_dataset(items), config)["confusion_matrix"]
            want = test_eval_lib.expected_matrix(model, items, config)
            results[f"{mode}/{'accelerator' if accelerator else 'cpu'}"] = {
                "equal": bool((got == want).all()),
                "pixels": int(want.sum()),
            }
    print_result(results)


@pytest.fixture(scope="module")
def results():
    return child_results(__file__)


@pytest.mark.parametrize("kernels", ["cpu", "accelerator"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_evaluation_under_op_determinism_equals_the_eager_reference(results, mode, kernels):
    result = results[f"{mode}/{kernels}"]
    assert result["equal"] and result["pixels"] > 0, result


if __name__ == "__main__" and "--child" in sys.argv:
    _child()
