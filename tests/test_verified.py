"""The verified schedule (the default without `retrain_interval`)."""

import jax
import jax.numpy as jnp
import optax
import pytest

import lgfjax

N = 200


def argtrigls(x):
    # More-Garbow-Hillstrom problem 26 (trigonometric least squares), minimum 0.
    j = jnp.arange(1, N + 1)
    r = N - jnp.sum(jnp.cos(x)) + j * (1 - jnp.cos(x)) - jnp.sin(x)
    return jnp.sum(r**2)


def run(opt, loss, x0, steps, use_value=True):
    @jax.jit
    def step(p, s):
        v, g = lgfjax.value_and_grad(loss)(p, s)
        u, s = opt.update(g, s, p, value=v) if use_value else opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    p, s = x0, opt.init(x0)
    for _ in range(steps):
        p, s = step(p, s)
    return p, s


def test_quadratic_default_lgf_saves_most_gradients():
    loss = lambda x: 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * x**2)  # noqa: E731
    p, s = run(lgfjax.lgf(optax.sgd(0.1), dt=0.1), loss, jnp.ones(2), 200)
    # On a linear gradient field the linear model is exact up to rounding, so every
    # verification agrees; the first fit needs K = 10 true steps and each phase one.
    assert int(s.info.verified) == int(s.info.verifications) >= 3
    assert int(lgfjax.gradient_evaluations(s)) <= 10 + int(s.info.verifications) + 1
    assert float(loss(p)) < 1e-12


@pytest.mark.parametrize("use_value", [True, False], ids=["value", "no_value"])
def test_argtrigls_lgf_adam_never_worse_than_adam(use_value):
    # Adam from the same start for the same gradients is the bar (issue 13 item 4).
    x0 = jnp.full(N, 1.0 / N)
    p, s = run(lgfjax.lgf_adam(1e-2), argtrigls, x0, 1000, use_value)
    g = int(lgfjax.gradient_evaluations(s))
    assert g < 1000
    a, st = x0, optax.adam(1e-2).init(x0)
    adam = optax.adam(1e-2)

    @jax.jit
    def astep(a, st):
        u, st = adam.update(jax.grad(argtrigls)(a), st, a)
        return optax.apply_updates(a, u), st

    for _ in range(g):
        a, st = astep(a, st)
    assert bool(jnp.all(jnp.isfinite(p)))
    # Both end near the minimum; a factor 10 covers rounding differences of two runs
    # that each stall at O(1e-6) of a loss whose start is O(1e2).
    assert float(argtrigls(p)) <= 10 * float(argtrigls(a)) + 1e-10


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="retrain_interval"):
        lgfjax.lgf(optax.sgd(0.1), dt=0.1, schedule="verified", retrain_interval=30)
    with pytest.raises(ValueError, match="schedule"):
        lgfjax.lgf(optax.sgd(0.1), dt=0.1, schedule="sometimes")
    with pytest.raises(ValueError, match="verify_tolerance"):
        lgfjax.lgf(optax.sgd(0.1), dt=0.1, verify_tolerance=1.5)
    with pytest.raises(ValueError, match="history_size"):
        lgfjax.lgf(optax.sgd(0.1), dt=0.1, schedule="fixed")


def test_status_is_public_and_messages_clear():
    assert lgfjax.status_message(lgfjax.Status.LOSS_ROSE).startswith("the loss rose")
    with pytest.raises(ValueError, match="Status"):
        lgfjax.status_message(99)
    with pytest.raises(ValueError, match="found 0"):
        lgfjax.gradient_evaluations(optax.sgd(0.1).init(jnp.ones(2)))
