"""The verified schedule (the default without `retrain_interval`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import evaluations_to_reach, perturb, safeguard_set, trace, trace_base

import lgfjax

N = 200


def argtrigls(x):
    # More-Garbow-Hillstrom problem 26 (trigonometric least squares), minimum 0.
    j = jnp.arange(1, N + 1)
    r = N - jnp.sum(jnp.cos(x)) + j * (1 - jnp.cos(x)) - jnp.sin(x)
    return jnp.sum(r**2)


# Compiled steps, one per (optimiser, loss, use_value): a test that reruns the same
# optimiser for 1, 2, 3, ... steps compiles its step once. The cache keeps the key's
# objects alive, so their ids stay unique.
_STEPS = {}


def run(opt, loss, x0, steps, use_value=True, state=None):
    key = (id(opt), id(loss), use_value)
    if key not in _STEPS:

        @jax.jit
        def step(p, s):
            v, g = lgfjax.value_and_grad(loss)(p, s)
            u, s = opt.update(g, s, p, value=v) if use_value else opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        _STEPS[key] = (opt, loss, step)
    step = _STEPS[key][-1]
    p, s = x0, opt.init(x0) if state is None else state
    for _ in range(steps):
        p, s = step(p, s)
    return p, s


@pytest.mark.numerics
def test_quadratic_default_lgf_saves_most_gradients():
    loss = lambda x: 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * x**2)  # noqa: E731
    p, s = run(lgfjax.lgf(optax.sgd(0.1), dt=0.1), loss, perturb(jnp.ones(2)), 200)
    # On a linear gradient field the (rank-2 = n, centred) linear model is exact up to
    # rounding: the flow error at each judgement is O(kappa eps64) ~ 1e-14, far below
    # the 0.2 tolerance, so every judgement agrees and the phases double 10, 20, 40,
    # ... (>= 3 judgements within 200 steps). Then the count is exact: K = 10 true
    # steps before the first fit and one per judgement.
    assert int(s.info.verified) == int(s.info.verifications) >= 3
    assert int(lgfjax.gradient_evaluations(s)) == 10 + int(s.info.verifications)
    assert int(s.info.fallbacks) == 0
    # The gradient flow contracts the loss by exp(-2 t) at least, t = 20 here.
    assert float(loss(p)) < 1e-12


@pytest.mark.numerics
@pytest.mark.parametrize("max_horizon", [1, 4])
def test_confirmed_flow_outruns_the_base(max_horizon):
    # A slow quadratic (eigenvalues 0.01..0.04, lr 0.1): gradient descent needs ~5000
    # steps to shrink the loss by 1e-8. The linear model is exact to rounding (see
    # above), so every judgement agrees; phases double up to 4 K = 40 steps, and each
    # later confirmed phase doubles the horizon up to `max_horizon` dt per step.
    d = jnp.array([0.01, 0.04])
    loss = lambda x: 0.5 * jnp.sum(d * x**2)  # noqa: E731
    opt = lgfjax.lgf(
        optax.sgd(0.1),
        dt=0.1,
        schedule=lgfjax.Verified(max_horizon=max_horizon, max_surrogate_steps=40),
    )
    x0 = perturb(jnp.ones(2))
    p, s = run(opt, loss, x0, 600)
    assert int(s.info.verified) == int(s.info.verifications) >= 5
    assert int(s.info.fallbacks) == 0
    assert int(s.schedule.horizon) == max_horizon
    # The surrogate follows the exact flow exp(-t D) x0 (RK4 with h = dt: relative
    # error per step ~ (h lambda)^5 / 120 < 1e-11), so after 600 updates it has covered
    # at least (600 - 10 true steps - judgements) x dt x (1 for max_horizon=1); with a
    # horizon of 4 it gets much further than gradient descent's 600 steps: the loss
    # factor exp(-2 lambda_min t) at t >= 60 is <= exp(-1.2); at t >= 150, <= exp(-3).
    sgd_loss = float(loss(x0 * (1 - 0.1 * d) ** 600))
    if max_horizon == 1:
        # Steps of dt only: the exact flow contracts by exp(-lambda dt) per step against
        # SGD's 1 - lambda dt, a loss ratio <= 1 + (lambda dt)^2 per step, under 1 % over
        # 600 steps (lambda dt <= 0.004): the run tracks the base step for step...
        assert float(loss(p)) <= 1.01 * sgd_loss
    else:
        assert float(loss(p)) < 0.2 * sgd_loss  # ...unless steps outrun it
    assert int(lgfjax.gradient_evaluations(s)) == 10 + int(s.info.verifications)


def test_max_horizon_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="max_horizon"):
        lgfjax.lgf(optax.sgd(0.1), dt=0.1, schedule=lgfjax.Verified(max_horizon=3))
    with pytest.raises(ValueError, match="max_horizon"):
        lgfjax.lgf_adam(0.1, schedule=lgfjax.Verified(max_horizon=0))


@pytest.mark.parametrize("use_value", [True, False], ids=["value", "no_value"])
@pytest.mark.numerics
def test_argtrigls_lgf_adam_never_worse_than_adam(use_value):
    # Adam from the same start for the same gradients is the bar (issue 13 item 4).
    x0 = perturb(jnp.full(N, 1.0 / N))
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
    # Adam at a constant step does not converge: it stalls in a band around the
    # minimum whose width its step size sets (here O(1e-6) of a loss that starts at
    # O(1e2)). The factor 10 allows for where within that band each run stops; a
    # phase that made things worse, as the old schedule did (loss 1e3), fails it.
    assert float(argtrigls(p)) <= 10 * float(argtrigls(a)) + 1e-10


def test_schedule_arguments_are_checked():
    sgd = optax.sgd(0.1)
    with pytest.raises(ValueError, match="schedule"):
        lgfjax.lgf(sgd, dt=0.1, schedule="sometimes")
    with pytest.raises(ValueError, match="tolerance"):
        lgfjax.Verified(tolerance=1.5)
    with pytest.raises(ValueError, match="history_size"):
        lgfjax.lgf(sgd, dt=0.1, schedule="fixed")  # the old string needs K and M
    with pytest.raises(ValueError, match="retrain_interval"):
        lgfjax.Fixed(10, 5)
    with pytest.raises(ValueError, match="max_horizon"):
        lgfjax.Verified(max_horizon=3)
    # The fixed schedule's options do not reach the verified one (old flat keywords).
    for name, value in (("derivative", "weak"), ("adaptive", True), ("check_every", 2)):
        with pytest.raises(ValueError, match=name):
            lgfjax.lgf_adam(0.1, **{name: value})


def test_defaults_and_center_choice():
    x = jnp.ones(40)
    s = lgfjax.lgf(optax.sgd(0.1), dt=0.1).init(x)
    # Default: K = 10, a centred POD of rank K // 2 = 5.
    assert s.model.coefficients.shape == (6, 5) and s.model.origin is not None
    assert s.buffers.points.shape == (10, 40)
    s = lgfjax.lgf(optax.sgd(0.1), dt=0.1, fit=lgfjax.Fit(rank=3, center=False)).init(x)
    assert s.model.coefficients.shape == (4, 3) and s.model.origin is None
    # The uncentred POD path runs too: on a 2-parameter quadratic, rank 2 is exact.
    loss = lambda y: 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * y**2)  # noqa: E731
    opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1, fit=lgfjax.Fit(rank=2, center=False))
    p, st = run(opt, loss, jnp.ones(2), 100)
    assert float(loss(p)) < 1e-6 * float(loss(jnp.ones(2)))
    assert int(lgfjax.gradient_evaluations(st)) < 50
    s = lgfjax.lgf(optax.sgd(0.1), dt=0.1, fit=lgfjax.Fit(rank=None)).init(x)
    assert s.model.coefficients.shape == (41, 40) and s.model.basis is None


def test_status_is_public_and_messages_clear():
    assert lgfjax.status_message(lgfjax.Status.LOSS_ROSE).startswith("the loss rose")
    with pytest.raises(ValueError, match="Status"):
        lgfjax.status_message(99)
    with pytest.raises(ValueError, match="found 0"):
        lgfjax.gradient_evaluations(optax.sgd(0.1).init(jnp.ones(2)))


@pytest.mark.parametrize("kind", ["lgf", "lgf_adam"])
def test_nonfinite_gradient_never_reaches_the_parameters(kind):
    # The loss is NaN for x[0] > 0.5 (sqrt of a negative number): gradient descent
    # from x0 = (1, 1) would step into NaN at once. The verified schedule skips each
    # true step whose gradient is not finite, says why, and keeps the parameters.
    def loss(x):
        return jnp.sqrt(0.5 - x[0]) + jnp.sum(x**2)

    opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1) if kind == "lgf" else lgfjax.lgf_adam(0.1)
    x0 = jnp.ones(2)
    p, s = run(opt, loss, x0, 5)
    assert bool(jnp.all(p == x0))  # every update was skipped: zero, exactly
    assert int(s.info.status) == int(lgfjax.Status.NONFINITE_GRADIENT)
    assert int(lgfjax.gradient_evaluations(s)) == 5  # evaluated, so counted
    assert int(s.buffers.filled) == 0  # nothing recorded
    # The same state resumes once the gradients are finite: it trains from there on.
    good = lambda x: jnp.sum((x - 0.25) ** 2)  # noqa: E731
    p, s = run(opt, good, p, 60, state=s)
    assert bool(jnp.all(jnp.isfinite(p)))
    # SGD contracts the error by 0.8 per step; Adam at a constant lr of 0.1 oscillates
    # about the minimum with a decaying amplitude of O(lr) per coordinate, so its last
    # iterate may sit high on a swing: the best true point it reached is far below 0.1x.
    assert float(good(lgfjax.best_params(s, p))) < 0.1 * float(good(x0))


@pytest.mark.parametrize("nonfinite", ["gradient", "base update"])
def test_true_step_checks_the_gradient_and_the_base_update(nonfinite):
    # Either a non-finite gradient or a finite gradient that the base turns into a
    # non-finite update (here scaled by inf) skips the true step: the parameters stay
    # exactly where they were and the state says why.
    if nonfinite == "gradient":
        base, loss = optax.sgd(0.1), lambda x: jnp.sum(jnp.sqrt(-x))  # NaN at x > 0
    else:
        base, loss = optax.chain(optax.sgd(0.1), optax.scale(jnp.inf)), lambda x: jnp.sum(x**2)
    opt = lgfjax.lgf(base, dt=0.1)
    x0 = jnp.ones(2)
    assert bool(jnp.all(jnp.isfinite(jax.grad(loss)(x0)))) == (nonfinite != "gradient")
    p, s = run(opt, loss, x0, 3)
    assert bool(jnp.all(p == x0))
    assert int(s.info.status) == int(lgfjax.Status.NONFINITE_GRADIENT)
    assert int(s.buffers.filled) == 0


def test_a_step_into_an_undefined_loss_is_taken_back_and_the_next_step_halved():
    # The loss and its gradient are NaN for x < 0 (0 * sqrt(x)). Gradient descent at lr
    # 1.2 on (x - 1)^2 maps x to 2.4 - 1.4 x: from 3 its first step lands at -1.8. That
    # step came from the base itself, so no guard could refuse it; the next true step
    # finds the loss undefined, skips, and goes back to the last true iterate (3). The
    # base's step from there would land at -1.8 again, so the next true step is halved.
    # Exact: 3, the gradient 4 and the halving are exact, and the arithmetic below is
    # the same IEEE operations as optax.sgd's update and apply_updates.
    def loss(x):
        return jnp.sum(jnp.where(x >= 0, (x - 1.0) ** 2, 0.0) + 0.0 * jnp.sqrt(x))

    opt = lgfjax.lgf(optax.sgd(1.2), dt=1.2)
    x0 = jnp.full((1,), 3.0)
    p, _ = run(opt, loss, x0, 1)
    assert not bool(jnp.isfinite(loss(p)))  # the base's own step lands where loss is NaN
    p, s = run(opt, loss, x0, 2)
    assert bool(jnp.all(p == x0)) and int(s.schedule.backoff) == 1
    assert int(s.info.status) == int(lgfjax.Status.NONFINITE_GRADIENT)
    p, s = run(opt, loss, x0, 3)
    half = np.float64(3.0) + 0.5 * (-1.2 * np.float64(4.0))
    assert float(p[0]) == half and bool(jnp.isfinite(loss(p)))
    # That point is defined, so the true step taken there is the base's own again. Its
    # product -1.2 * 2 (half - 1) is inexact, and XLA may contract it with the add into
    # one FMA: the two roundings then differ by at most one ulp of each term.
    p, s = run(opt, loss, x0, 4)
    assert int(s.schedule.backoff) == 0
    move = -1.2 * (2 * (half - 1.0))
    eps = np.finfo(np.float64).eps
    assert abs(float(p[0]) - (half + move)) <= eps * (abs(half + move) + abs(move))


# The safeguard set at the reduced sizes of tests/test_problem_set.py.
SAFEGUARD_CASES = list(zip(safeguard_set(), (600, 600, 600, 200, 200)))


@pytest.mark.numerics
@pytest.mark.parametrize(
    "problem, steps", SAFEGUARD_CASES, ids=[c[0].name.split("(")[0] for c in SAFEGUARD_CASES]
)
def test_default_needs_no_more_gradients_than_gradient_descent(problem, steps):
    # Issue 13: the default, untuned, judged by the free loss, never needs more true
    # gradients than gradient descent to reach its loss after `steps` steps, in at
    # most 3x the steps, and never emits a non-finite iterate (rollbacks and guards).
    base = optax.sgd(problem.lr)
    _, base_losses, base_evals = trace_base(base, problem, steps)
    target = float(base_losses[-1]) * (1 + 1e-9)  # 1e-9: far above rounding of a loss
    base_needs = evaluations_to_reach(base_losses, base_evals, target)
    opt = lgfjax.lgf(base, dt=problem.lr)
    _, state, losses, evals = trace(opt, problem, 3 * steps, value=True)
    assert np.all(np.isfinite(losses))
    needs = evaluations_to_reach(losses, evals, target)
    assert needs is not None and needs <= base_needs, (needs, base_needs)
    assert int(lgfjax.diagnostics(state).value_evaluations) == 0  # the loss came free


def _schedule(phase, todo, length, horizon, verify):
    from lgfjax._verified import Schedule

    i = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    false = jnp.asarray(False)
    return Schedule(
        i(phase), i(todo), i(length), i(horizon), jnp.asarray(verify), i(0), i(0), false
    )


def _rule_config():
    """Static settings for the pure schedule rule (no fit runs)."""
    from lgfjax._verified import VerifiedConfig

    return VerifiedConfig(
        fit=None,
        max_step_ratio=3.0,
        verify_tolerance=0.2,
        first_length=10,
        max_length=500,
        max_horizon=8,
        refresh=5,
    )


@pytest.mark.parametrize(
    "case, sch, code, agree, undo, expect",
    [
        # expect: (length, horizon, want_fit, failed, phase_over)
        ("confirmed short phase", (0, 1, 20, 1, True), 0, True, False, (40, 1, True, False, False)),
        ("confirmed long phase", (0, 1, 40, 2, True), 0, True, False, (80, 4, True, False, False)),
        ("disagreement", (0, 1, 40, 4, True), 8, False, False, (20, 2, False, True, False)),
        ("undone phase", (0, 1, 40, 4, True), 9, False, True, (20, 2, False, True, False)),
        ("guard in a phase", (1, 7, 40, 4, False), 6, False, False, (20, 2, False, True, True)),
        ("last surrogate step", (1, 1, 40, 4, False), 0, False, False, (40, 4, False, False, True)),
        ("refresh done", (0, 1, 10, 1, False), 0, False, False, (10, 1, True, False, False)),
        ("skipped true step", (0, 3, 16, 2, False), 10, False, False, (8, 1, False, True, False)),
    ],
)
def test_schedule_step_is_a_pure_rule(case, sch, code, agree, undo, expect):
    # Integer arithmetic only: every field is exact.
    from lgfjax._verified import schedule_step

    cfg = _rule_config()
    nxt = schedule_step(
        _schedule(*sch), cfg, jnp.int32(code), jnp.asarray(agree), jnp.asarray(undo), True
    )
    got = (int(nxt.length), int(nxt.horizon), bool(nxt.want_fit), bool(nxt.failed))
    assert got + (bool(nxt.phase_over),) == expect, case


@pytest.mark.parametrize(
    "horizon, resampled, expect",
    [(1, True, 2), (2, True, 2), (1, False, 1), (4, True, 4)],
)
def test_inconclusive_agreement_lengthens_steps_only_when_resampled(horizon, resampled, expect):
    # A confirmed phase whose loss change was within its noise keeps its length; once
    # the batches are known to be resampled its steps double, up to NOISY_HORIZON (2)
    # and never below what they were. Integer arithmetic: exact.
    from lgfjax._noise import NOISY_HORIZON
    from lgfjax._verified import schedule_step

    assert NOISY_HORIZON == 2
    cfg = _rule_config()
    t = jnp.asarray(True)
    nxt = schedule_step(
        _schedule(0, 1, 20, horizon, True),
        cfg,
        jnp.int32(0),
        t,
        jnp.asarray(False),
        True,
        inconclusive=t,
        resampled=jnp.asarray(resampled),
    )
    assert (int(nxt.length), int(nxt.horizon), bool(nxt.failed)) == (20, expect, False)


def test_eager_updates_compile_once():
    # Without a user's jit, `update` is one cached program: the second eager call
    # compiles nothing (issue 16: eager steps re-traced loops and diffrax, seconds each).
    loss = lambda x: 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * x**2)  # noqa: E731
    opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1)
    p = jnp.ones(2)
    s = opt.init(p)
    v, g = lgfjax.value_and_grad(loss)(p, s)
    opt.update(g, s, p, value=v)  # compiles
    # The gated objective too, even when `value_and_grad(loss)` is built afresh per step.
    with jax.log_compiles():
        import logging

        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("jax").addHandler(handler)
        try:
            v, g = lgfjax.value_and_grad(loss)(p, s)
            opt.update(g, s, p, value=v)
        finally:
            logging.getLogger("jax").removeHandler(handler)
    assert not [r for r in records if "Compiling" in r.getMessage()]
