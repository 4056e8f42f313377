"""Verdicts under noisy gradients (mini-batches): `lgfjax._noise` and the verified engine.

Tolerances come from the tests' own statistics (fixed seeds): a rate measured over N
independent draws is within 5 binomial standard deviations of its exact value.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import MiniBatchProblem, least_squares

import lgfjax
from lgfjax import _noise


def _normal_tail(z):
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("shift", [0.0, 4.0])
def test_verdict_rates(shift):
    # A loss change of `shift` standard errors plus unit noise is judged "rose" with
    # probability P(N(0, 1) > Z - shift); N draws give a binomial rate.
    n = 20_000
    noise = np.random.default_rng(0).normal(size=n)
    difference = jnp.asarray(shift + noise)
    rose, inconclusive = _noise.verdict(difference, 1.0, 1.0, 1.0, jnp.float64)
    expected = _normal_tail(_noise.Z - shift)
    spread = 5 * math.sqrt(expected * (1 - expected) / n)
    assert abs(float(jnp.mean(rose)) - expected) <= spread
    # Inconclusive: within Z standard errors either way (and not a rise).
    expected = 1 - _normal_tail(_noise.Z - shift) - _normal_tail(_noise.Z + shift)
    spread = 5 * math.sqrt(expected * (1 - expected) / n)
    assert abs(float(jnp.mean(inconclusive)) - expected) <= spread


def test_verdict_exact_losses_keep_strictness():
    # Standard error zero: any rise beyond the rounding allowance is a rise, and no
    # verdict is inconclusive.
    eps = float(jnp.finfo(jnp.float64).eps)
    rose, inconclusive = _noise.verdict(jnp.asarray([1e-3, -1e-3, 0.0]), 0.0, 1.0, 1.0, jnp.float64)
    assert rose.tolist() == [True, False, False] and not bool(jnp.any(inconclusive))
    # Within the loss's rounding (ROUNDING eps |loss|) a rise is not a rise.
    tiny = 0.5 * _noise.ROUNDING * eps
    rose, _ = _noise.verdict(jnp.asarray(tiny), 0.0, 1.0, 1.0, jnp.float64)
    assert not bool(rose)


def _gram(rows):
    return rows @ rows.T


def test_measurement_noise_estimates_the_noise():
    # Rows on a straight line (second differences zero) plus independent noise of
    # standard deviation s per entry: |noise row|^2 = n s^2, so the estimate is
    # sqrt(n) s / rms|t|. It averages (K - 2) n squared entries, each triple's entries
    # correlated: a relative accuracy of a few / sqrt(n) (n = 4000: 10 % is > 5 sigma).
    rng = np.random.default_rng(1)
    K, n, s = 10, 4000, 0.3
    line = np.arange(K)[:, None] * rng.normal(size=n)[None] + rng.normal(size=n)[None]
    rows = line + s * rng.normal(size=(K, n))
    stamps = jnp.arange(100, 100 + K, dtype=jnp.int32)
    estimate = float(_noise.measurement_noise(jnp.asarray(_gram(rows)), stamps))
    truth = math.sqrt(n) * s / math.sqrt(np.mean(np.sum(rows**2, axis=1)))
    assert abs(estimate - truth) <= 0.1 * truth
    # The same rows without noise: zero to the Gram matrix's rounding (relative 1e-8
    # in float64 of entries of size |t|^2, a second difference of four of them).
    exact = float(_noise.measurement_noise(jnp.asarray(_gram(line)), stamps))
    assert exact <= 1e-6


def test_measurement_noise_uses_consecutive_rows_only():
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(6, 50))
    # No three rows recorded at consecutive updates: nothing to estimate from.
    gaps = jnp.asarray([0, 2, 4, 6, 8, 10], jnp.int32)
    assert float(_noise.measurement_noise(jnp.asarray(_gram(rows)), gaps)) == 0.0
    # Empty rows (-1) are ignored; the ring buffer's order does not matter.
    stamps = jnp.asarray([7, 5, 6, -1, -1, -1], jnp.int32)
    order = [1, 2, 0]  # updates 5, 6, 7
    d2 = rows[order[0]] - 2 * rows[order[1]] + rows[order[2]]
    rms = math.sqrt(np.mean(np.sum(rows[:3] ** 2, axis=1)))
    expected = math.sqrt(np.sum(d2**2) / 6) / rms
    got = float(_noise.measurement_noise(jnp.asarray(_gram(rows)), stamps))
    assert got == pytest.approx(expected, rel=1e-10)


# Compiled steps, one per (optimiser, problem, options): a test that steps a run a few
# updates at a time reuses its program instead of compiling a new one for each call.
# The seed is an argument of the program, so every seed shares it too.
_STEPS = {}


def _step_fn(opt, problem, paired, per_sample, calls):
    key = (id(opt), id(problem), paired, per_sample, id(calls))
    if key in _STEPS:
        return _STEPS[key][-1]

    @jax.jit
    def step(params, state, seed):
        batch = problem.batch(seed, lgfjax.gradient_evaluations(state), 32)

        def losses(p):
            values = problem.per_sample(p, batch)
            return jnp.mean(values), values

        (_, values), grads = lgfjax.value_and_grad(losses, has_aux=True)(params, state)
        value = values if per_sample else jnp.mean(values)
        extra = {}
        if paired:

            def value_fn(p):
                if calls is not None:  # counts the evaluations that actually run
                    jax.debug.callback(lambda: calls.append(1))
                return problem.per_sample(p, batch) if per_sample else problem.loss(p, batch)

            extra["value_fn"] = value_fn
        updates, state = opt.update(grads, state, params, value=value, **extra)
        return optax.apply_updates(params, updates), state

    # The key's objects are kept alive with the program, so their ids stay unique.
    _STEPS[key] = (opt, problem, calls, step)
    return step


def _run(
    opt, problem, seed, updates, params=None, state=None, paired=True, per_sample=True, calls=None
):
    """`updates` steps of a jitted mini-batch loop (from `params`, `state` if given);
    batch j is the one of the j-th true gradient, so every optimiser sees the same."""
    step = _step_fn(opt, problem, paired, per_sample, calls)
    if params is None:
        params = problem.x0
        state = opt.init(params)
    for _ in range(updates):
        params, state = step(params, state, seed)
    return params, state


@pytest.mark.parametrize("paired", [True, False])
def test_noisy_run_stays_finite_and_converges(paired):
    problem = least_squares()
    opt = lgfjax.lgf(optax.sgd(problem.lr), dt=problem.lr)
    calls = []
    params, state = _run(opt, problem, 0, 400, paired=paired, calls=calls)
    d = lgfjax.diagnostics(state)
    assert bool(jnp.all(jnp.isfinite(params)))
    # `value_evaluations` counts the value_fn calls that ran, at most one per judgement.
    assert int(d.value_evaluations) == len(calls) <= int(d.verifications)
    # The noise is seen: batches of 32 give relative gradient noise of order 1 here.
    assert float(d.noise) > _noise.NOISE_FLOOR
    # It converged: within the noise floor of SGD at this rate. SGD's stationary excess
    # loss is about lr tr(H) sigma^2 / (4 B) (sigma^2 ~ 2 x the per-sample loss); 3x that
    # on top of the minimum is a loose bound a diverging or stalled run cannot meet.
    floor = float(problem.full(problem.minimum))
    excess = problem.lr * 20 * 2 * 2 * floor / (4 * 32)
    assert float(problem.full(params)) <= floor + 3 * excess + 1e-3 * floor


def test_same_batch_tells_rounding_from_resampling():
    # The same sum in another order differs by a few ulps times its condition: SAME.
    # A batch noise of 1e-3 relative is 2^13 float32 ulps: RESAMPLED.
    f32 = jnp.float32
    eps = float(jnp.finfo(f32).eps)
    one = jnp.asarray(1.25, f32)
    assert int(_noise.same_batch(one, one, f32)) == _noise.SAME
    assert int(_noise.same_batch(one * (1 + 8 * eps), one, f32)) == _noise.SAME
    assert int(_noise.same_batch(one * (1 + 1e-3), one, f32)) == _noise.RESAMPLED
    assert int(_noise.same_batch(-one, one * (1 - 1e-3), f32)) == _noise.RESAMPLED


class _FixedBatch(MiniBatchProblem):
    def batch(self, seed, index, size):  # one batch for every gradient: deterministic
        return MiniBatchProblem.batch(self, seed, 0, size)


@pytest.mark.parametrize("resample", [True, False])
def test_the_run_finds_out_whether_batches_are_resampled(resample):
    # With value_fn, one evaluation of the best true point on a later batch tells a
    # resampled objective from a fixed one; its run records which (`resampled`), at the
    # cost of one value call counted in value_evaluations.
    problem = least_squares() if resample else _FixedBatch(*least_squares())
    opt = lgfjax.lgf(optax.sgd(problem.lr), dt=problem.lr)
    calls = []
    _, state = _run(opt, problem, 0, 400, calls=calls)
    d = lgfjax.diagnostics(state)
    assert int(d.value_evaluations) == len(calls)
    if resample:
        assert int(d.resampled) == _noise.RESAMPLED
    else:
        assert int(d.resampled) in (_noise.UNKNOWN, _noise.SAME)


def test_a_wrong_flow_is_undone_under_noise():
    # At the start of the first phase, the learned flow is replaced by one that climbs
    # (the coefficients negated, no drift) for 8 steps. On the judging step's batch the
    # loss rose by more than Z + 1 of its paired standard errors (checked here), so the
    # verdict must be "rose", whichever comparison the engine makes (the cross-batch one
    # has the larger error but a larger rise too): the parameters return to the phase's
    # start, status LOSS_ROSE, on every seed.
    problem = least_squares()
    lr = problem.lr
    opt = lgfjax.lgf(optax.sgd(lr), dt=lr, integrator=lgfjax.Integrator(max_step_ratio=None))
    undone = 0
    seeds = range(5)
    for seed in seeds:
        params, state = _run(opt, problem, seed, 1)
        while int(state.phase) == 0:  # to the first update of the first phase
            params, state = _run(opt, problem, seed, 1, params, state)
        start = params
        model = state.model._replace(
            coefficients=-state.model.coefficients, drift=jnp.zeros_like(state.model.drift)
        )
        length = 8
        schedule = state.schedule._replace(todo=jnp.asarray(length, jnp.int32))
        state = state._replace(model=model, schedule=schedule)
        params, state = _run(opt, problem, seed, length, params, state)
        # The judging step's batch: the paired rise in standard errors.
        batch = problem.batch(seed, lgfjax.gradient_evaluations(state), 32)
        rise = problem.per_sample(params, batch) - problem.per_sample(start, batch)
        assert float(jnp.mean(rise) / (jnp.std(rise, ddof=1) / jnp.sqrt(32.0))) > _noise.Z + 1
        before = int(state.info.fallbacks)
        end = params
        params, state = _run(opt, problem, seed, 1, params, state)  # the judging step
        if int(state.info.fallbacks) > before and int(state.info.status) == lgfjax.Status.LOSS_ROSE:
            undone += 1
            # The undo is an update ``start - end`` added to `end`: two float32 roundings
            # of numbers up to the larger of max |end| and max |start| (the result's size).
            size = max(float(jnp.max(jnp.abs(end))), float(jnp.max(jnp.abs(start))))
            tol = 2 * float(jnp.finfo(jnp.float32).eps) * size
            np.testing.assert_allclose(np.asarray(params), np.asarray(start), rtol=0, atol=tol)
    assert undone == len(seeds)


def _affine_features(z):
    return jnp.concatenate([jnp.ones((z.shape[0], 1)), z], axis=1)


def test_mean_model_chosen_by_leave_one_out():
    rng = np.random.default_rng(4)
    k, r = 10, 5
    z = jnp.asarray(rng.normal(size=(k, r)))
    features = _affine_features(z)
    # Targets that are exactly affine in z: the library's left-out residuals are zero
    # (to rounding), the mean's are not: keep the library.
    exact = features @ jnp.asarray(rng.normal(size=(r + 1, r)))
    assert not bool(_noise.mean_predicts_better(features, exact))
    # As many library columns as pairs: every pair has leverage 1, nothing is predicted.
    square = _affine_features(jnp.asarray(rng.normal(size=(k, k - 1))))
    assert bool(_noise.mean_predicts_better(square, exact))
    # Pure noise about a constant: the mean's expected PRESS is k^2 / (k - 1) sigma^2 r,
    # the affine fit's sigma^2 r sum 1 / (1 - h_ii) >= k sigma^2 r / (1 - (r + 1) / k)
    # (Jensen), 2.25x it here; each sums k r = 50 squared residuals (a spread of about
    # 20 %), so the mean wins on every one of 20 seeds (a reversal needs the ratio to
    # fall by more than half, several standard deviations).
    for seed in range(20):
        noise = np.random.default_rng(100 + seed).normal(size=(k, r))
        assert bool(_noise.mean_predicts_better(features, jnp.asarray(1.0 + noise)))
    # Weights restrict the comparison to some pairs (the newest, in the engine).
    newest = jnp.arange(k) >= k - 3
    assert not bool(_noise.mean_predicts_better(features, exact, newest))


@pytest.mark.parametrize("noise, decays", [(0.0, True), (0.9, False)])
def test_adam_surrogate_second_moment_does_not_decay_under_noise(noise, decays):
    # A learned gradient of zero (the coefficients zeroed): Adam's ODE relaxes v toward
    # g^2 = 0, but under noise (relative noise above NOISE_FLOOR) the true v also holds
    # the gradient's variance, which a learned mean has lost: v must stay as it was,
    # exactly (its rate is max(0 - v, 0) = 0, and RK4 adds zero increments).
    problem = least_squares()
    opt = lgfjax.lgf_adam(problem.lr)
    params, state = _run(opt, problem, 0, 1)
    while int(state.phase) == 0:
        params, state = _run(opt, problem, 0, 1, params, state)
    model = state.model._replace(
        coefficients=jnp.zeros_like(state.model.coefficients),
        noise=jnp.asarray(noise, state.model.noise.dtype),
    )
    state = state._replace(model=model)
    nu = jax.tree_util.tree_leaves(state.base_state.nu)
    _, after = _run(opt, problem, 0, 1, params, state)
    assert int(after.info.status) == lgfjax.Status.OK
    for before, now in zip(nu, jax.tree_util.tree_leaves(after.base_state.nu), strict=True):
        if decays:
            assert bool(jnp.all(now[before > 0] < before[before > 0]))
        else:
            np.testing.assert_array_equal(np.asarray(now), np.asarray(before))


@pytest.mark.parametrize(
    "verified, inconclusive, resampled, warns",
    [
        (10, 0, _noise.UNKNOWN, True),  # 10 of 100 confirmed: saving little
        (30, 0, _noise.UNKNOWN, False),
        (10, 80, _noise.UNKNOWN, True),  # inconclusive phases count only under noise
        (10, 80, _noise.RESAMPLED, False),  # kept within the noise, and the run went on
        (5, 5, _noise.RESAMPLED, True),
    ],
)
def test_rarely_confirmed_warning(monkeypatch, verified, inconclusive, resampled, warns):
    import warnings

    from lgfjax import _validate

    monkeypatch.setattr(_validate, "_WARNED", set())
    opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1)
    state = opt.init(jnp.zeros(3))
    i = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    info = state.info._replace(
        verifications=i(100), verified=i(verified), inconclusive=i(inconclusive)
    )
    state = state._replace(info=info, noise=state.noise._replace(resampled=i(resampled)))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lgfjax.diagnostics(state)
    said = [str(w.message) for w in record if "were confirmed" in str(w.message)]
    assert bool(said) == warns, said


@pytest.mark.parametrize("kept", [False, True])
def test_loss_noise_follows_kept_phases(kept):
    # One early rise of 10 between consecutive true steps sets the rises' mean square
    # to 0.1 x 100. Then only judging steps (every 5th update), each loss lower than
    # the last: counted as samples (kept phases), each multiplies it by 0.9; not
    # counted (the tracker before), it stays for good.
    f64 = jnp.float64
    noise = _noise.init_loss_noise(f64)
    noise = _noise.track(noise, True, 0, jnp.asarray(1.0, f64))
    noise = _noise.track(noise, True, 1, jnp.asarray(11.0, f64))
    assert float(noise.rise2) == pytest.approx(10.0, rel=1e-15)  # 0.1 x 10^2, rounded once
    for k in range(1, 49):
        noise = _noise.track(noise, True, 1 + 5 * k, jnp.asarray(11.0 - 0.01 * k, f64), kept)
    # 48 multiplications by 0.9, each rounded: well within 1e-12 relative.
    expect = 10.0 * 0.9**48 if kept else 10.0
    assert float(noise.rise2) == pytest.approx(expect, rel=1e-12)
