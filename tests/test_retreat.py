"""A flow that steps into an undefined loss is not refitted to step there again.

The heat example's default, run to 3x its steps (on one machine's rounding), converged
and then had a surrogate step land at a negative conductivity (an undefined misfit).
The true step there found no finite gradient and retreated to the last recorded
iterate; the refit on the same pairs gave the same flow, and its trust region, sized by
the retreat itself, let it take the same step again: its last 1,000 updates alternated
between those two points, a gradient every other update. After a retreat the refit's
trust region is now at most half that of the model that ran into it
(`lgfjax._verified.fit_model`, `retreated`).

The same first-phase state also tests `judge` on what a run knows of its objective:
one fixed objective has no loss noise (its rises are undone), and that knowledge is
checked again on a rise (`lgfjax._noise.same_batch`, `LossNoise.checked`).
"""

import jax.numpy as jnp
import optax
import pytest

import lgfjax
from lgfjax import _lgf
from lgfjax._verified import Anchor, fit_model


def _fitted(monkeypatch):
    """A verified `lgf(sgd)` state in its first surrogate phase, and its config."""
    seen = {}
    make = _lgf.make_verified

    def capture(**kwargs):
        seen["cfg"] = kwargs["cfg"]
        return make(**kwargs)

    monkeypatch.setattr(_lgf, "make_verified", capture)
    opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1)
    scale = jnp.array([1.0, 2.0, 3.0])
    loss = lambda x: 0.5 * jnp.sum(scale * x**2)  # noqa: E731
    params = jnp.array([1.0, -1.0, 0.5])
    state = opt.init(params)
    while int(state.schedule.phase) == 0:
        value, grads = lgfjax.value_and_grad(loss)(params, state)
        updates, state = opt.update(grads, state, params, value=value)
        params = optax.apply_updates(params, updates)
    return seen["cfg"], state, params


@pytest.mark.parametrize("retreated", [False, True])
def test_refit_after_a_retreat_halves_the_trust_region(monkeypatch, retreated):
    cfg, state, params = _fitted(monkeypatch)
    old = float(state.model.step_bound)
    assert 0 < old < float("inf")
    # A long way back, as a retreat is: sized alone, it would allow a step of
    # max_step_ratio x 100.
    way_back = jnp.full_like(params, 100.0 / jnp.sqrt(params.size))
    start = Anchor(params, state.base_state, jnp.asarray(1.0), jnp.asarray(0.0))
    model, _, info = fit_model(
        jnp.asarray(True),
        state.model,
        state.info,
        state.buffers,
        start,
        state.anchor,
        way_back,
        lambda: way_back,
        cfg,
        jnp.asarray(retreated),
    )
    assert int(info.status) == int(lgfjax.Status.OK)
    sized = cfg.max_step_ratio * 100.0  # |way_back| = 100 (to rounding)
    expect = min(sized, old / 2) if retreated else sized
    # The bound is computed in the fit's float64 from |way_back|: a few ulps.
    assert float(model.step_bound) == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("resampled, undone", [(0, False), (1, True)])
def test_a_fixed_objective_has_no_loss_noise(monkeypatch, resampled, undone):
    # A rise of 0.5 against a loss noise of 2 (the rises' root mean square) is within
    # the noise: inconclusive, kept. Once the run has found its objective fixed
    # (`resampled` 1, `_noise.SAME`), the same rise is a rise: the phase is undone.
    from lgfjax._verified import judge

    cfg, state, params = _fitted(monkeypatch)
    i = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    noise = state.noise._replace(rise2=jnp.asarray(4.0), resampled=i(resampled))
    anchor = state.anchor._replace(loss=jnp.asarray(1.0), loss_error=jnp.asarray(0.0))
    state = state._replace(noise=noise, anchor=anchor)
    measured = lambda: jnp.zeros_like(params)  # noqa: E731
    found = judge(
        jnp.asarray(True),
        i(1),
        state.model,
        params,
        measured,
        jnp.asarray(1.5),
        None,
        state,
        cfg,
        jnp.asarray(False),
    )
    assert bool(found.undo) == undone
    assert bool(found.inconclusive) == (not undone)


@pytest.mark.parametrize(
    "gradients, checked, again, expect, calls",
    [
        (30, 17, 1.0, 1, 0),  # 30 < 2 x 17: no check yet, still one fixed objective
        (34, 17, 1.0, 1, 1),  # checked again: the same value, still SAME
        (34, 17, 1.1, 2, 1),  # checked again: another value, so resampled
        (34, 0, 1.1, 2, 1),
    ],
)
def test_one_fixed_objective_is_checked_again_on_a_rise(
    monkeypatch, gradients, checked, again, expect, calls
):
    # A digits classifier's first cross-entropies are near log(10) on every batch: the
    # check after 17 gradients read one fixed objective. A rise then re-evaluates the
    # best point on this batch, at most once per doubling of the gradients since the
    # last check; a value other than the one recorded there means resampled (final).
    from lgfjax._verified import judge

    cfg, state, params = _fitted(monkeypatch)
    i = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    noise = state.noise._replace(resampled=i(1), checked=i(checked))
    anchor = state.anchor._replace(loss=jnp.asarray(1.0), loss_error=jnp.asarray(0.0))
    best = state.best._replace(loss=jnp.asarray(1.0, state.best.loss.dtype))
    info = state.info._replace(gradient_evaluations=i(gradients))
    state = state._replace(noise=noise, anchor=anchor, best=best, info=info)
    measured = lambda: jnp.zeros_like(params)  # noqa: E731
    value_fn = lambda p: jnp.asarray(again)  # noqa: E731
    found = judge(
        jnp.asarray(True), i(1), state.model, params, measured, jnp.asarray(1.5), value_fn,
        state, cfg, jnp.asarray(False),
    )  # fmt: skip
    assert bool(found.undo)  # a rise of 0.5 with no loss noise: undone either way
    assert int(found.resampled) == expect
    assert int(found.value_calls) == calls
    assert int(found.checked) == (gradients if calls else checked)


@pytest.mark.parametrize("size, agree", [(1e-3, True), (1e3, False)])
def test_a_flow_error_within_the_parameters_rounding_is_no_error(monkeypatch, size, agree):
    # A converged base's steps are the parameters' rounding, which no flow predicts:
    # a flow that stands still (all coefficients zero) against a measured step of
    # `size` times that rounding (64 eps |params|; the velocity is the step over dt) is
    # 100 % wrong relative to it, and agrees when the step is within the rounding.
    from lgfjax._noise import ROUNDING
    from lgfjax._verified import judge

    cfg, state, params = _fitted(monkeypatch)
    assert cfg.step_time == pytest.approx(0.1)
    model = state.model._replace(coefficients=jnp.zeros_like(state.model.coefficients))
    dtype = model.coefficients.dtype
    rounding = ROUNDING * jnp.finfo(dtype).eps * jnp.linalg.norm(params)
    direction = jnp.ones_like(params) / jnp.sqrt(params.size)
    if model.basis is not None:  # a step the model's coordinates see in full
        direction = model.basis[0]
    step = size * rounding * direction
    measured = lambda: step / cfg.step_time  # noqa: E731
    i = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    found = judge(
        jnp.asarray(True), i(1), model, params, measured, None, None, state, cfg, jnp.asarray(False)
    )
    assert float(found.error) == pytest.approx(1.0, rel=1e-6)  # |0 - v| / |v|
    assert bool(found.agree) == agree
