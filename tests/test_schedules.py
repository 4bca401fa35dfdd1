"""The poly schedule against its formula, with and without warmup."""

import numpy as np
import pytest

from fcn_tf.config import OptimizerConfig
from fcn_tf.schedules import PolySchedule, poly_from_config


def poly(step, base=0.01, min_lr=1e-4, power=0.9, total=1000):
    return (base - min_lr) * (1 - step / total) ** power + min_lr


@pytest.mark.parametrize("step", [0, 1, 500, 999, 1000])
def test_poly_matches_formula(step):
    schedule = PolySchedule(0.01, 1000, min_lr=1e-4, power=0.9)
    np.testing.assert_allclose(float(schedule(step)), poly(step), rtol=1e-6)


def test_poly_start_middle_end_values():
    schedule = PolySchedule(0.01, 1000, min_lr=1e-4, power=0.9)
    assert float(schedule(0)) == pytest.approx(0.01, rel=1e-6)
    assert float(schedule(500)) == pytest.approx(0.0099 * 0.5**0.9 + 1e-4, rel=1e-6)
    assert float(schedule(1000)) == pytest.approx(1e-4, rel=1e-6)
    # Past the horizon the rate stays at the floor instead of going complex/negative.
    assert float(schedule(1500)) == pytest.approx(1e-4, rel=1e-6)


def test_warmup_is_linear_from_start_factor_to_poly():
    schedule = PolySchedule(0.01, 1000, min_lr=1e-4, power=0.9, warmup_steps=100, warmup_start_factor=0.1)
    assert float(schedule(0)) == pytest.approx(0.1 * poly(0), rel=1e-6)
    assert float(schedule(50)) == pytest.approx((0.1 + 0.9 * 0.5) * poly(50), rel=1e-6)
    assert float(schedule(100)) == pytest.approx(poly(100), rel=1e-6)
    assert float(schedule(600)) == pytest.approx(poly(600), rel=1e-6)


def test_from_config_and_bad_values():
    config = OptimizerConfig(base_lr=0.02, min_lr=0.0, power=1.0)
    schedule = poly_from_config(config, 10)
    assert float(schedule(5)) == pytest.approx(0.01, rel=1e-6)
    with pytest.raises(ValueError, match="train_steps"):
        PolySchedule(0.01, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        PolySchedule(0.01, 10, warmup_steps=11)
