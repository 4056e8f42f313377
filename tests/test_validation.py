"""Construction-time validation: every bad hyperparameter names itself, its value and range."""

import diffrax
import jax.numpy as jnp
import optax
import pytest

import lgfjax

# The flat keywords of 0.1 (deprecated): their errors still name what the caller wrote.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BASE = dict(history_size=10, retrain_interval=20, dt=0.1)


@pytest.mark.parametrize(
    "overrides, name, value",
    [
        ({"history_size": 2}, "history_size", "2"),
        ({"history_size": 4, "fd_order": 4}, "history_size", "4"),
        ({"history_size": 3.0}, "history_size", "3.0"),
        ({"retrain_interval": 9}, "retrain_interval", "9"),
        ({"rank": 11}, "rank", "11"),
        ({"rank": 0}, "rank", "0"),
        ({"rank": 2.5}, "rank", "2.5"),
        ({"poly_order": 0}, "poly_order", "0"),
        ({"dt": 0.0}, "dt", "0.0"),
        ({"dt": -1e-3}, "dt", "-0.001"),
        ({"threshold": -1e-3}, "threshold", "-0.001"),
        ({"relative_threshold": 1}, "relative_threshold", "1"),
        ({"alpha": -1.0}, "alpha", "-1.0"),
        ({"max_iter": 0}, "max_iter", "0"),
        ({"fd_order": 3}, "fd_order", "3"),
        ({"derivative": "spectral"}, "derivative", "'spectral'"),
        ({"solver": "rk4"}, "solver", "'rk4'"),
        ({"substeps": 0}, "substeps", "0"),
        ({"max_steps": 0}, "max_steps", "0"),
        ({"max_step_ratio": 0.0}, "max_step_ratio", "0.0"),
        ({"check_every": 0}, "check_every", "0"),
        ({"check_tolerance": -0.1}, "check_tolerance", "-0.1"),
        ({"weak_width": 2, "derivative": "weak"}, "weak_width", "2"),
        ({"weak_width": 12, "derivative": "weak"}, "weak_width", "12"),
        ({"weak_power": 0}, "weak_power", "0"),
        ({"adaptive": "yes"}, "adaptive", "'yes'"),
        ({"max_surrogate_steps": 5}, "max_surrogate_steps", "5"),
        ({"center": True}, "center", "True"),
    ],
)
def test_bad_hyperparameter_raises_value_error_naming_it(overrides, name, value):
    kwargs = {**BASE, **overrides}
    with pytest.raises(ValueError) as info:
        lgfjax.lgf(optax.sgd(0.1), **kwargs)
    message = str(info.value)
    assert f"`{name}`" in message
    assert value in message
    # The message states what is allowed, not only what was wrong.
    assert any(word in message for word in ("must be", "one of"))


def test_base_must_be_a_transformation():
    with pytest.raises(ValueError, match="`base`"):
        lgfjax.lgf(lambda g: g, **BASE)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(history_size=3, retrain_interval=3, dt=1e-3),
        dict(history_size=5, retrain_interval=5, dt=1.0, fd_order=4),
        dict(
            history_size=10, retrain_interval=50, dt=0.1, rank=10, derivative="weak", weak_width=11
        ),
        dict(
            history_size=4,
            retrain_interval=8,
            dt=0.1,
            threshold=0.0,
            alpha=0.0,
            solver=diffrax.Tsit5(),
        ),
    ],
)
def test_boundary_values_are_accepted(kwargs):
    opt = lgfjax.lgf(optax.sgd(0.1), **kwargs)
    state = opt.init(jnp.ones(3))
    assert int(state.schedule.cycle_step) == 0


def test_value_fn_required_when_checking():
    opt = lgfjax.lgf(optax.sgd(0.1), check_every=2, **BASE)
    params = jnp.ones(2)
    with pytest.raises(ValueError, match="value_fn"):
        opt.update(params, opt.init(params), params)


def test_params_required():
    opt = lgfjax.lgf(optax.sgd(0.1), **BASE)
    params = jnp.ones(2)
    with pytest.raises(ValueError, match="params"):
        opt.update(params, opt.init(params))
