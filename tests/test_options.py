"""The option objects (`Verified`, `Fixed`, `Fit`, `Integrator`): their checks, the old
flat keywords that map onto them, and the front door's one-time warnings."""

import inspect
import warnings

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lgfjax
from lgfjax import _validate

from .problems import quadratic


def test_front_ends_have_small_signatures():
    # The options live on objects: lgf's signature has a handful of parameters.
    assert len(inspect.signature(lgfjax.lgf).parameters) <= 12
    assert len(inspect.signature(lgfjax.lgf_adam).parameters) <= 13


@pytest.mark.parametrize(
    "build, name, value",
    [
        (lambda: lgfjax.Verified(history_size=2), "history_size", "2"),
        (lambda: lgfjax.Verified(tolerance=1.0), "tolerance", "1.0"),
        (lambda: lgfjax.Verified(tolerance=-0.1), "tolerance", "-0.1"),
        (lambda: lgfjax.Verified(max_horizon=3), "max_horizon", "3"),
        (lambda: lgfjax.Verified(max_surrogate_steps=0), "max_surrogate_steps", "0"),
        (lambda: lgfjax.Fixed(10, 5), "retrain_interval", "5"),
        (lambda: lgfjax.Fixed(10.0, 20), "history_size", "10.0"),
        (lambda: lgfjax.Fixed(10, 20, derivative="spectral"), "derivative", "'spectral'"),
        (lambda: lgfjax.Fixed(10, 20, fd_order=3), "fd_order", "3"),
        (lambda: lgfjax.Fixed(10, 20, weak_width=12), "weak_width", "12"),
        (lambda: lgfjax.Fixed(10, 20, check_every=0), "check_every", "0"),
        (lambda: lgfjax.Fixed(10, 20, check_tolerance=-1.0), "check_tolerance", "-1.0"),
        (lambda: lgfjax.Fixed(10, 20, adaptive="yes"), "adaptive", "'yes'"),
        (lambda: lgfjax.Fit(poly_order=0), "poly_order", "0"),
        (lambda: lgfjax.Fit(rank=0), "rank", "0"),
        (lambda: lgfjax.Fit(rank=2.5), "rank", "2.5"),
        (lambda: lgfjax.Fit(center=1), "center", "1"),
        (lambda: lgfjax.Fit(threshold=-1e-3), "threshold", "-0.001"),
        (lambda: lgfjax.Fit(alpha=-1.0), "alpha", "-1.0"),
        (lambda: lgfjax.Fit(max_iter=0), "max_iter", "0"),
        (lambda: lgfjax.Integrator(solver="rk4"), "solver", "'rk4'"),
        (lambda: lgfjax.Integrator(substeps=0), "substeps", "0"),
        (lambda: lgfjax.Integrator(stepsize_controller=1), "stepsize_controller", "1"),
        (lambda: lgfjax.Integrator(substeps=4, max_steps=2), "max_steps", "2"),
        (lambda: lgfjax.Integrator(max_step_ratio=0.0), "max_step_ratio", "0.0"),
    ],
)
def test_bad_option_raises_naming_it(build, name, value):
    with pytest.raises(ValueError) as info:
        build()
    message = str(info.value)
    assert f"`{name}`" in message and value in message
    assert any(word in message for word in ("must be", "one of"))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(schedule=lgfjax.Verified(history_size=4), fit=lgfjax.Fit(rank=5)), "rank"),
        (dict(schedule=lgfjax.Fixed(2, 10)), "history_size"),  # the stencil needs 3
        (dict(fit=lgfjax.Fit(center=True, rank=None)), "center"),
        (dict(schedule=lgfjax.Verified(), history_size=4), "history_size"),
        (dict(fit=lgfjax.Fit(), poly_order=2), "poly_order"),
        (dict(history_size=4, retrain_interval=8, max_horizon=2), "max_horizon"),
        (dict(schedule=lgfjax.Fixed(4, 8), max_horizon=2), "max_horizon"),
        (dict(check_every=2), "check_every"),
        (dict(schedule="paper"), "schedule"),
        (dict(schedule=lgfjax.Fit()), "schedule"),
        (dict(fit=lgfjax.Verified()), "fit"),
    ],
)
def test_options_that_do_not_fit_together_raise(kwargs, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match=f"`{name}`"):
            lgfjax.lgf(optax.sgd(0.1), dt=0.1, **kwargs)


def test_adam_rejects_the_derivative_options_and_unknown_keywords():
    with pytest.raises(ValueError, match="`derivative`"):
        lgfjax.lgf_adam(0.1, schedule=lgfjax.Fixed(4, 8, derivative="weak"))
    with pytest.raises(TypeError, match="history"):
        lgfjax.lgf(optax.sgd(0.1), dt=0.1, history=4)


def _trajectory(opt, steps=40):
    problem = quadratic(n=3)
    grad = jax.grad(problem.loss)

    @jax.jit
    def step(x, s):
        u, s = opt.update(grad(x), s, x, value=problem.loss(x))
        return optax.apply_updates(x, u), s

    x, s, xs = problem.x0, opt.init(problem.x0), []
    for _ in range(steps):
        x, s = step(x, s)
        xs.append(x)
    return np.stack(xs)


OLD_AND_NEW = [
    (
        "lgf",
        dict(history_size=4, retrain_interval=10, rank=2, poly_order=2, substeps=2),
        dict(
            schedule=lgfjax.Fixed(4, 10),
            fit=lgfjax.Fit(rank=2, poly_order=2),
            integrator=lgfjax.Integrator(substeps=2),
        ),
    ),
    (
        "lgf",
        dict(history_size=6, verify_tolerance=0.3, max_horizon=2, max_step_ratio=2.0),
        dict(
            schedule=lgfjax.Verified(history_size=6, tolerance=0.3, max_horizon=2),
            integrator=lgfjax.Integrator(max_step_ratio=2.0),
        ),
    ),
    (
        "lgf",
        dict(schedule="fixed", history_size=5, retrain_interval=12, derivative="weak"),
        dict(schedule=lgfjax.Fixed(5, 12, derivative="weak")),
    ),
    ("lgf_adam", dict(history_size=4, retrain_interval=10), dict(schedule=lgfjax.Fixed(4, 10))),
    (
        "lgf_adam",
        dict(history_size=5, threshold=1e-3),
        dict(schedule=lgfjax.Verified(history_size=5), fit=lgfjax.Fit(threshold=1e-3)),
    ),
]


@pytest.mark.parametrize("front, old, new", OLD_AND_NEW)
def test_old_keywords_warn_with_the_new_spelling_and_build_the_same(front, old, new):
    def make(**kwargs):
        if front == "lgf":
            return lgfjax.lgf(optax.sgd(0.1), dt=0.1, **kwargs)
        return lgfjax.lgf_adam(0.1, **kwargs)

    with pytest.warns(DeprecationWarning) as record:
        old_opt = make(**old)
    message = str(record[0].message)
    for key in new:
        assert f"{key}=lgfjax." in message  # the spelling to write instead
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new_opt = make(**new)
    # Exact: both spellings build the same engine, so the same compiled program.
    np.testing.assert_array_equal(_trajectory(old_opt), _trajectory(new_opt))


def test_old_keywords_still_work_under_inject_hyperparams():
    # optax hands the flat keywords on as one dict; they still build the optimiser.
    with pytest.warns(DeprecationWarning):
        opt = optax.inject_hyperparams(lgfjax.lgf)(
            optax.sgd(0.1), dt=0.1, history_size=4, retrain_interval=10
        )
        state = opt.init(jnp.zeros(2))
    assert set(state.hyperparams) == {"dt"}
    assert lgfjax.diagnostics(state.inner_state).phase == 0


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_validate, "_WARNED", set())


def test_missing_value_warns_once(fresh_warnings):
    opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1, schedule=lgfjax.Verified(history_size=4))
    x = jnp.ones(2)
    state = opt.init(x)
    with pytest.warns(UserWarning, match="no `value=`") as record:
        for _ in range(3):
            _, state = opt.update(x, state, x)
    assert sum("no `value=`" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.update(x, state, x, value=jnp.asarray(1.0))  # with it: no warning


def test_eager_fixed_schedule_warns_once_and_jit_does_not(fresh_warnings):
    opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1, schedule=lgfjax.Fixed(4, 8))
    x = jnp.ones(2)
    state = opt.init(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.jit(opt.update)(x, state, x)
    with pytest.warns(UserWarning, match="eagerly") as record:
        for _ in range(2):
            _, state = opt.update(x, state, x)
    assert sum("eagerly" in str(w.message) for w in record) == 1


def test_objects_are_equal_by_value():
    # Two optimisers built from equal options are configured alike (equinox modules).
    assert lgfjax.Fixed(4, 8) == lgfjax.Fixed(history_size=4, retrain_interval=8)
    assert lgfjax.Integrator() == lgfjax.Integrator(solver=lgfjax.RK4())
    assert lgfjax.Integrator(stepsize_controller=diffrax.ConstantStepSize()).substeps == 1
