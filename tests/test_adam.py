"""lgf_adam: exact true Adam steps, the learned gradient, and the Adam ODE surrogate."""

import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import lgfjax
from lgfjax._adam import AdamState, adam_base, lgf_adam

from .problems import perturb, pytree_quadratic

EPS64, EPS32 = 2.0**-52, 2.0**-23


def _rotated(n=4, seed=0, eigs=None):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eigs = np.linspace(1.0, 4.0, n) if eigs is None else np.asarray(eigs)
    # Under --perturb the data move by 4 ulps (the start is zero, which scaling keeps).
    h = perturb(jnp.asarray(q @ np.diag(eigs) @ q.T))
    c = perturb(jnp.asarray(rng.normal(size=n)))
    return h, c, (lambda x: 0.5 * (x - c) @ h @ (x - c))


def _nonquadratic_tree(dtype):
    x0 = {
        "w": jnp.linspace(-1.0, 1.0, 6, dtype=dtype).reshape(2, 3),
        "b": jnp.array([0.3, -2.0, 1.5], dtype),
        "s": jnp.asarray(0.7, dtype),
    }
    x0 = perturb(x0)

    def loss(p):
        return (
            jnp.sum(jnp.cosh(p["w"] - 0.2))
            + jnp.sum((p["b"] - 1.0) ** 4)
            + (p["s"] * p["w"][0, 0] - 1.0) ** 2
        )

    return x0, loss


def _run_optax(opt, loss, x0, steps):
    state = opt.init(x0)

    @jax.jit
    def step(p, s):
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    p = x0
    for _ in range(steps):
        p, state = step(p, state)
    return p, state


def _run_lgf(opt, loss, x0, steps, value_fn=None, keep=()):
    """Run `steps` updates; also returns the (params, state) after each step in `keep`."""
    grad_fn = lgfjax.value_and_grad(loss)

    @jax.jit
    def step(p, s):
        _, g = grad_fn(p, s)
        extra = {} if value_fn is None else {"value_fn": value_fn}
        u, s = opt.update(g, s, p, **extra)
        return optax.apply_updates(p, u), s

    p, s = x0, opt.init(x0)
    kept = {}
    for i in range(steps):
        p, s = step(p, s)
        if i + 1 in keep:
            kept[i + 1] = (p, s)
    return (p, s, kept) if keep else (p, s)


# Compiling an lgf_adam step takes seconds, so tests share runs of one configuration.
H4, C4, ROT_LOSS = _rotated(n=4)
LR, K8, M24 = 0.05, 8, 24


@functools.cache
def _rotated_run():
    """Default lgf_adam on the rotated quadratic: one cycle and three true steps more."""
    opt = lgf_adam(LR, schedule=lgfjax.Fixed(history_size=K8, retrain_interval=M24))
    return _run_lgf(opt, ROT_LOSS, jnp.zeros(4), M24 + 3, keep=(K8, K8 + 1, M24))


def _close(a, b, rtol, atol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# adam_base against optax.adam: the same formulas in the same order, each compiled in its
# own jitted program, so they agree up to XLA's fusion choices (a contracted multiply-add
# is one rounding fewer): a few ulps of each step's ~lr-sized update, and Adam's
# normalised update m / sqrt(v) does not amplify relative errors, so over 200 steps the
# drift stays within 200 x a few ulps of lr = 0.01 on parameters of size ~1:
# float64 1e-13 is 450 eps64; float32 2e-6 is 17 eps32 (absolute floors ~1 ulp of 0.1).
TOL = {jnp.float64: (1e-13, 1e-15), jnp.float32: (2e-6, 1e-7)}


def _library_condition(s):
    """Condition of the fit's degree-1 library [1, x] over the recorded iterates."""
    x = np.asarray(s.window.trajectory).reshape(np.shape(s.window.trajectory)[0], -1)
    return float(np.linalg.cond(np.hstack([np.ones((x.shape[0], 1)), x])))


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_base_reproduces_optax_over_200_steps(dtype, amsgrad):
    x0, loss = _nonquadratic_tree(dtype)
    init, update = adam_base(0.01, 0.9, 0.999, 1e-8, amsgrad)
    ref = optax.amsgrad(0.01) if amsgrad else optax.adam(0.01)
    p_ref, s_ref = _run_optax(ref, loss, x0, 200)
    ours = optax.GradientTransformation(init, update)
    p, s = _run_optax(ours, loss, x0, 200)
    rtol, atol = TOL[dtype]
    _close(p, p_ref, rtol, atol)
    _close(s.mu, s_ref[0].mu, rtol, atol)
    _close(s.nu, s_ref[0].nu, rtol, atol)
    if amsgrad:
        _close(s.nu_max, s_ref[0].nu_max, rtol, atol)
    assert int(s.count) == 200 and s.count.dtype == jnp.int32
    # The run went somewhere: 200 steps of size ~0.01 moved the parameters.
    assert float(optax.tree.norm(optax.tree.sub(p, x0))) > 0.5


@pytest.mark.numerics
def test_gradient_model_full_space_is_the_hessian():
    _, _, kept = _rotated_run()
    s = kept[K8 + 1][1]
    coef = s.model.coefficients  # rows: [1, x0, x1, x2, x3]; the target is the gradient
    # The gradient is exactly linear in x, so the least-squares fit recovers H up to
    # rounding amplified by the library's condition (~7e4: early Adam iterates from 0
    # are nearly collinear): error <= kappa eps64 |H| (measured ~1x), 100x margin.
    tol = 100 * _library_condition(s) * EPS64 * float(jnp.max(jnp.abs(H4)))
    np.testing.assert_allclose(coef[1:], H4, atol=tol)
    np.testing.assert_allclose(coef[0], -H4 @ C4, atol=tol * float(jnp.max(jnp.abs(C4))))
    # The relative residual of an exact fit is rounding: at most kappa eps64, 100x margin.
    assert float(s.info.fit_residual) <= 100 * _library_condition(s) * EPS64


def test_gradient_model_in_pod_coordinates():
    # The iterates stay in span(e0, e1, e2) and the Hessian is block diagonal, so a
    # rank-3 basis captures the gradient exactly.
    h3, c3, _ = _rotated(n=3, seed=1)
    h = jnp.zeros((6, 6)).at[:3, :3].set(h3).at[3:, 3:].set(jnp.diag(jnp.array([5.0, 6.0, 7.0])))
    c = jnp.zeros(6).at[:3].set(c3)
    loss = lambda x: 0.5 * (x - c) @ h @ (x - c)
    K = 8
    opt = lgf_adam(
        0.1, schedule=lgfjax.Fixed(history_size=K, retrain_interval=20), fit=lgfjax.Fit(rank=3)
    )
    _, s = _run_lgf(opt, loss, jnp.zeros(6), K + 1)
    u = s.model.basis.T  # (n, r)
    np.testing.assert_allclose(u.T @ u, jnp.eye(3), atol=1e-10)
    projector = u @ u.T
    np.testing.assert_allclose(projector[:3, :3], jnp.eye(3), atol=1e-10)
    np.testing.assert_allclose(
        u @ s.model.coefficients[1:].T @ u.T, projector @ h @ projector, atol=1e-8
    )
    np.testing.assert_allclose(u @ s.model.coefficients[0], -h @ c, atol=1e-8)


@functools.cache
def _adam_ode_reference(duration):
    """K true Adam steps, then the continuous Adam ODE with the exact gradient."""
    p_k, (s_k, _) = _run_optax(optax.adam(LR), ROT_LOSS, jnp.zeros(4), K8)
    grad = jax.grad(ROT_LOSS)
    b1, b2, eps = 0.9, 0.999, 1e-8

    def field(t, y, args):
        a, m, v = y
        g = grad(a)
        tau = s_k.count + t / LR
        mhat, vhat = m / (1 - b1**tau), v / (1 - b2**tau)
        return -mhat / (jnp.sqrt(vhat) + eps), (1 - b1) / LR * (g - m), (1 - b2) / LR * (g**2 - v)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Dopri8(),
        t0=0.0,
        t1=duration,
        dt0=LR / 4,
        y0=(p_k, s_k.mu, s_k.nu),
        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-14),
        max_steps=100_000,
    )
    return p_k, jax.tree_util.tree_map(lambda y: y[-1], sol.ys)


@pytest.mark.numerics
@pytest.mark.parametrize("rank", [None, pytest.param(4, marks=pytest.mark.slow)])
def test_surrogate_phase_solves_the_adam_ode_and_tracks_adam(rank):
    # Four RK4 substeps per surrogate step: global error ~1e-8 here (one substep
    # gives ~2e-6, and the error falls 16x per halving: fourth order).
    opt = lgf_adam(
        LR,
        schedule=lgfjax.Fixed(history_size=K8, retrain_interval=M24),
        fit=lgfjax.Fit(rank=rank),
        integrator=lgfjax.Integrator(substeps=4),
    )
    p, s = _run_lgf(opt, ROT_LOSS, jnp.zeros(4), M24)
    assert int(lgfjax.diagnostics(s).accepted) == M24 - K8 and int(s.info.fallbacks) == 0
    p_k, (a, m, v) = _adam_ode_reference((M24 - K8) * LR)
    # The moments carried into the next true phase are the ODE solution. The tolerances
    # are RK4's truncation error (~1e-8, 5x margin); the fit's rounding error (kappa eps64
    # ~1e-11, see the Hessian test) and the Dopri8 reference's (rtol 1e-12) are far below.
    np.testing.assert_allclose(p, a, atol=5e-8)
    np.testing.assert_allclose(s.base_state.mu, m, atol=5e-8)
    np.testing.assert_allclose(s.base_state.nu, v, rtol=1e-6, atol=1e-10)
    assert int(s.base_state.count) == M24
    # Discrete Adam with true gradients differs from its ODE by O(lr) only.
    p_ref, _ = _run_optax(optax.adam(LR), ROT_LOSS, jnp.zeros(4), M24)
    travelled = float(jnp.linalg.norm(p_ref - p_k))
    assert float(jnp.linalg.norm(p - p_ref)) < 0.05 * travelled
    # A surrogate that froze the moments (or dropped bias correction) would drift far.
    assert travelled > 0.5


@pytest.mark.numerics
def test_true_steps_after_a_surrogate_phase_continue_adam():
    p2, s2, kept = _rotated_run()
    p, s = kept[M24]
    assert int(s.gradient_evaluations) == K8 and int(s.info.accepted) == M24 - K8
    # Three true Adam steps from the carried (params, m, v, count).
    ref = optax.adam(LR)
    adam_state = (
        optax.ScaleByAdamState(s.base_state.count, s.base_state.mu, s.base_state.nu),
        optax.EmptyState(),
    )
    q = p
    for _ in range(3):
        u, adam_state = ref.update(jax.grad(ROT_LOSS)(q), adam_state, q)
        q = optax.apply_updates(q, u)
    # Three Adam steps from the same carried state, in another program: equal up to
    # XLA's fusion choices, a few ulps per step (1e-13 is 450 eps64).
    np.testing.assert_allclose(p2, q, rtol=1e-13)
    np.testing.assert_allclose(s2.base_state.nu, adam_state[0].nu, rtol=1e-13)
    assert int(s2.base_state.count) == M24 + 3 and int(s2.gradient_evaluations) == K8 + 3


@pytest.mark.numerics
def test_evaluation_count_and_skipping():
    calls = []
    prob = pytree_quadratic()

    def loss(p):
        jax.debug.callback(lambda: calls.append(1))
        return prob.loss(p)

    K, M, cycles = 12, 20, 3
    traces = []
    opt = lgf_adam(
        0.05, schedule=lgfjax.Fixed(history_size=K, retrain_interval=M), fit=lgfjax.Fit(rank=3)
    )
    grad_fn = lgfjax.value_and_grad(loss)

    @jax.jit
    def step(p, s):
        traces.append(1)
        value, g = grad_fn(p, s)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    p, s = prob.x0, opt.init(prob.x0)
    values = []
    for _ in range(cycles * M):
        p, s, value = step(p, s)
        values.append(float(value))
    jax.effects_barrier()
    assert len(traces) == 1
    # Exact counts: the schedule fixes K true steps per cycle, and in float64 the fit of
    # this quadratic's exactly linear gradient is exact to kappa eps64, far from any
    # trust-region or step-ratio bound, so rounding cannot trigger a fallback (--perturb).
    assert len(calls) == cycles * K == int(lgfjax.gradient_evaluations(s))
    assert int(s.info.accepted) == cycles * (M - K) and int(s.info.fallbacks) == 0
    values = np.asarray(values).reshape(cycles, M)
    assert np.all(np.isnan(values[:, K:])) and np.all(np.isfinite(values[:, :K]))
    # Each cycle starts lower than the previous one ended: the surrogate phase made
    # progress without any evaluation.
    assert values[1, 0] < values[0, K - 1] and values[2, 0] < values[1, K - 1]
    assert jax.tree_util.tree_structure(p) == jax.tree_util.tree_structure(prob.x0)


@pytest.mark.parametrize(
    "dtype, rank", [pytest.param(jnp.float32, 4, marks=pytest.mark.slow), (jnp.float64, None)]
)
@pytest.mark.numerics
def test_pytree_exact_true_phase_and_progress(dtype, rank):
    prob = pytree_quadratic(dtype)
    K, M = 12, 30
    opt = lgf_adam(
        0.05, schedule=lgfjax.Fixed(history_size=K, retrain_interval=M), fit=lgfjax.Fit(rank=rank)
    )
    p, s, kept = _run_lgf(opt, prob.loss, prob.x0, 3 * M, keep=(K,))
    # The first K steps are optax.adam's.
    p_k, (s_k, _) = _run_optax(optax.adam(0.05), prob.loss, prob.x0, K)
    rtol, atol = TOL[dtype]
    _close(kept[K][0], p_k, rtol, atol)
    # Adam's moments live in the engine's layout: one flat vector for a pytree of one
    # dtype (`lgfjax._layout`), in `ravel_pytree` order.
    _close(kept[K][1].base_state.mu, ravel_pytree(s_k.mu)[0], rtol, atol)
    _close(kept[K][1].base_state.nu, ravel_pytree(s_k.nu)[0], rtol, atol)
    assert not bool(lgfjax.needs_gradient(kept[K][1]))

    p_ref, _ = _run_optax(optax.adam(0.05), prob.loss, prob.x0, 3 * M)
    for leaf, x0 in zip(
        jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(prob.x0), strict=True
    ):
        assert leaf.dtype == x0.dtype and leaf.shape == x0.shape
    assert isinstance(s.base_state, AdamState)
    assert all(m.dtype == dtype for m in jax.tree_util.tree_leaves(s.base_state.mu))
    assert s.model.coefficients.dtype == dtype
    assert int(s.info.fallbacks) == 0 and int(s.gradient_evaluations) == 3 * K
    loss0, loss_lgf, loss_ref = (float(prob.loss(x)) for x in (prob.x0, p, p_ref))
    assert loss_lgf < 0.05 * loss0
    # Same number of steps with 40% of the gradients: comparable accuracy.
    assert loss_lgf < 3.0 * loss_ref + 1e-3 * loss0


@pytest.mark.slow
def test_amsgrad_surrogate_keeps_running_max():
    opt = lgf_adam(LR, amsgrad=True, schedule=lgfjax.Fixed(history_size=K8, retrain_interval=M24))
    p, s, kept = _run_lgf(opt, ROT_LOSS, jnp.zeros(4), M24, keep=(K8,))
    p_k, s_k = kept[K8]
    p_ref, (s_ref, _) = _run_optax(optax.amsgrad(LR), ROT_LOSS, jnp.zeros(4), K8)
    np.testing.assert_allclose(p_k, p_ref, rtol=1e-13)
    np.testing.assert_allclose(s_k.base_state.nu_max, s_ref.nu_max, rtol=1e-13)
    assert int(s.info.accepted) == M24 - K8
    nu_max = s.base_state.nu_max
    assert np.all(nu_max >= s_k.base_state.nu_max)
    assert np.all(nu_max >= s.base_state.nu / (1 - 0.999**M24) * (1 - 1e-12))
    assert float(ROT_LOSS(p)) < 0.5 * float(ROT_LOSS(p_k))


@pytest.mark.slow
def test_value_check_rollback_restores_the_moments():
    # A value_fn that always rises as the loss falls rejects the first surrogate step;
    # the rollback must restore the Adam moments, so the run equals M - 1 Adam steps.
    opt = lgf_adam(LR, schedule=lgfjax.Fixed(history_size=K8, retrain_interval=M24, check_every=1))
    p, s = _run_lgf(opt, ROT_LOSS, jnp.zeros(4), M24, value_fn=lambda x: -ROT_LOSS(x))
    p_ref, (s_ref, _) = _run_optax(optax.adam(LR), ROT_LOSS, jnp.zeros(4), M24 - 1)
    np.testing.assert_allclose(p, p_ref, rtol=1e-13)
    np.testing.assert_allclose(s.base_state.mu, s_ref.mu, rtol=1e-13)
    assert int(s.base_state.count) == M24 - 1
    assert int(lgfjax.gradient_evaluations(s)) == M24 - 1
    assert lgfjax.status_message(int(s.info.status)).startswith("value_fn rejected")


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: lgf_adam(0.0), "learning_rate"),
        (lambda: lgf_adam(0.1, b1=1.0), "b1"),
        (lambda: lgf_adam(0.1, b1=-0.1), "b1"),
        (lambda: lgf_adam(0.1, b2=1.0), "b2"),
        (lambda: lgf_adam(0.1, eps=-1e-8), "eps"),
        (lambda: lgf_adam(0.1, schedule=lgfjax.Fixed(1, 20)), "history_size"),
        (lambda: lgf_adam(0.1, schedule=lgfjax.Fixed(10, 5)), "retrain_interval"),
        (lambda: lgf_adam(0.1, schedule=lgfjax.Fixed(10, 20), fit=lgfjax.Fit(rank=11)), "rank"),
        (lambda: lgf_adam(0.1, dt=-1.0), "dt"),
        (lambda: lgf_adam(0.1, amsgrad=1), "amsgrad"),
        (
            lambda: lgf_adam(
                0.1, schedule=lgfjax.Fixed(10, 20, adaptive=True, max_surrogate_steps=0)
            ),
            "max_surrogate_steps",
        ),
    ],
)
def test_argument_checks(build, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        build()


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_base_with_a_schedule_reproduces_optax(dtype):
    # A schedule is evaluated at the steps taken before each one, as in optax.adam; the
    # rates only shrink from 0.01, so the drift bound of TOL holds as for a constant rate.
    schedule = optax.cosine_decay_schedule(0.01, 200)
    x0, loss = _nonquadratic_tree(dtype)
    init, update = adam_base(schedule, 0.9, 0.999, 1e-8, False)
    p_ref, _ = _run_optax(optax.adam(schedule), loss, x0, 200)
    p, _ = _run_optax(optax.GradientTransformation(init, update), loss, x0, 200)
    _close(p, p_ref, *TOL[dtype])


def test_lgf_adam_takes_a_schedule():
    # The scheduled rate sets each true step and the surrogate's Adam time alike; with
    # a schedule `dt` follows it, so giving one is an error.
    schedule = optax.cosine_decay_schedule(0.05, 300)
    loss = lambda x: jnp.sum(jnp.arange(1.0, 5.0) * (x - 1.0) ** 2)  # noqa: E731
    opt = lgfjax.lgf_adam(schedule)
    x = jnp.zeros(4)
    state = opt.init(x)

    @jax.jit
    def step(x, state):
        value, grads = lgfjax.value_and_grad(loss)(x, state)
        updates, state = opt.update(grads, state, x, value=value)
        return optax.apply_updates(x, updates), state

    for _ in range(300):
        x, state = step(x, state)
    # Adam moves each coordinate by at most the rate per step (its normalised update):
    # 300 cosine-decayed steps from 0.05 cover up to ~7.5, seven times the unit distance
    # to the minimum, so a working run ends far below 1e-4 of the start's loss (10); a
    # stuck or diverging one cannot.
    assert float(loss(x)) < 1e-4 * 10.0
    assert int(lgfjax.gradient_evaluations(state)) < 300
    with pytest.raises(ValueError, match="`dt` must be None"):
        lgfjax.lgf_adam(schedule, dt=0.1)
