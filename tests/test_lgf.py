"""The LGF transformation: schedule, true steps, learned flow, pytrees, dtypes, jit."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import perturb, pytree_quadratic, quadratic, rotated_quadratic, run

import lgfjax
from lgfjax._flow import integrate


def _counting_loss(loss, counter):
    """Wrap `loss` so that every real execution bumps a host-side counter."""

    def bump():
        counter[0] += 1

    def wrapped(x):
        jax.debug.callback(bump)
        return loss(x)

    return wrapped


@pytest.mark.parametrize("K,M", [(3, 5), (5, 12), (10, 10), (8, 20)])
@pytest.mark.parametrize("rank", [None, 2])
def test_cycle_schedule_counts_true_evaluations(K, M, rank):
    problem = quadratic(n=3, condition=4.0)
    if rank is not None and rank > K:
        pytest.skip("rank must not exceed K")
    counter = [0]
    loss = _counting_loss(problem.loss, counter)
    opt = lgfjax.lgf(
        optax.sgd(problem.lr),
        dt=problem.lr,
        schedule=lgfjax.Fixed(history_size=K, retrain_interval=M),
        fit=lgfjax.Fit(rank=rank),
    )
    grad_fn = lgfjax.value_and_grad(loss)

    @jax.jit
    def step(params, state):
        _, grads = grad_fn(params, state)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = problem.x0, opt.init(problem.x0)
    steps = 3 * M + 2
    phases = []
    for _ in range(steps):
        phases.append(int(lgfjax.needs_gradient(state)))
        params, state = step(params, state)
    jax.effects_barrier()
    expected = 3 * K + min(2, K)
    assert counter[0] == expected
    assert int(lgfjax.gradient_evaluations(state)) == expected
    assert int(state.info.fallbacks) == 0
    # The schedule itself: K true steps then M - K surrogate steps, every cycle.
    assert phases == ([1] * K + [0] * (M - K)) * 3 + [1, 1]


@pytest.mark.numerics
@pytest.mark.parametrize("base", [optax.sgd(0.05), optax.sgd(0.02, momentum=0.9), optax.adam(0.05)])
def test_true_steps_equal_base(base):
    # Every true step is exactly the base's update, and the base state only advances
    # on true steps (a shadow copy of the base, fed the same inputs, stays equal).
    problem = rotated_quadratic(n=4, condition=10.0)
    K, M = 6, 10
    opt = lgfjax.lgf(
        base,
        dt=0.05,
        schedule=lgfjax.Fixed(history_size=K, retrain_interval=M),
        integrator=lgfjax.Integrator(max_step_ratio=None),
    )
    grad = jax.grad(problem.loss)
    x, s = problem.x0, opt.init(problem.x0)
    shadow = base.init(problem.x0)
    update = jax.jit(opt.update)
    true_steps = 0
    for _ in range(3 * M):
        g = grad(x)
        if bool(lgfjax.needs_gradient(s)):
            expected, shadow = base.update(g, shadow, x)
            u, s = update(g, s, x)
            # The same base update on the same inputs, compiled in another program:
            # equal up to XLA's fusion choices, a few ulps (1e-13 is 450 eps64).
            np.testing.assert_allclose(u, expected, rtol=1e-13, atol=1e-15)
            true_steps += 1
        else:
            u, s = update(jnp.zeros_like(g), s, x)
        x = optax.apply_updates(x, u)
        for a, b in zip(jax.tree_util.tree_leaves(s.base_state), jax.tree_util.tree_leaves(shadow)):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    assert true_steps == int(lgfjax.gradient_evaluations(s)) >= 3 * K


def test_first_cycle_identical_to_base_and_buffer_records_iterates():
    problem = quadratic(n=3, condition=4.0)
    K, M = 5, 9
    base = optax.sgd(problem.lr)
    opt = lgfjax.lgf(base, dt=problem.lr, schedule=lgfjax.Fixed(history_size=K, retrain_interval=M))
    x, s = problem.x0, opt.init(problem.x0)
    update = jax.jit(opt.update)
    xs = [x]
    for _ in range(K + 1):
        u, s = update(jax.grad(problem.loss)(x), s, x)
        x = optax.apply_updates(x, u)
        xs.append(x)
    # Rows 0..K of the buffer are the iterates x_0..x_K of plain gradient descent.
    gd = [problem.x0]
    for _ in range(K):
        gd.append(gd[-1] - problem.lr * jax.grad(problem.loss)(gd[-1]))
    np.testing.assert_allclose(s.window.trajectory, np.stack(gd), rtol=0, atol=1e-15)


def _fd_rate(q, lr, fd_order):
    """The finite-difference derivative estimate of a geometric sequence q^k, over q^k."""
    if fd_order == 1:
        return (q - 1) / lr
    if fd_order == 2:
        return (q - 1 / q) / (2 * lr)
    return (-(q**2) + 8 * q - 8 / q + q**-2) / (12 * lr)


@pytest.mark.numerics
@pytest.mark.parametrize("fd_order", [1, 2, 4])
def test_learned_gradient_descent_flow_on_quadratic(fd_order):
    # On a quadratic gradient descent is linear, x_{k+1} = (I - lr D) x_k, so every
    # finite difference of the iterates is an exact multiple of them: the fit must
    # return that multiple, and the surrogate must track true gradient descent.
    problem = quadratic(n=3, condition=4.0)
    lr, K, M = 0.5 / 4.0, 12, 40
    opt = lgfjax.lgf(
        optax.sgd(lr),
        dt=lr,
        schedule=lgfjax.Fixed(history_size=K, retrain_interval=M, fd_order=fd_order),
        fit=lgfjax.Fit(include_bias=False, threshold=1e-10),
    )
    params, state, _ = run(opt, problem, M)
    d = jnp.diag(jax.hessian(problem.loss)(problem.x0))
    coef = state.model.coefficients
    np.testing.assert_allclose(jnp.diag(coef), _fd_rate(1 - lr * d, lr, fd_order), rtol=1e-6)
    assert np.max(np.abs(coef - np.diag(np.diag(coef)))) < 1e-8
    gd = problem.x0
    for _ in range(M):
        gd = gd - lr * jax.grad(problem.loss)(gd)
    rel = float(jnp.linalg.norm(params - gd) / jnp.linalg.norm(gd))
    # A forward difference learns -D, whose exact flow decays slower than the
    # discrete map; central differences match the map to second order.
    tol = {1: 0.3, 2: 0.02, 4: 0.02}[fd_order]
    assert rel < tol, rel
    assert int(lgfjax.gradient_evaluations(state)) == K


@pytest.mark.numerics
def test_forward_difference_recovers_discrete_map_exactly():
    # With fd_order=1 the forward difference of GD iterates is exactly -grad, so the
    # fitted coefficients are the Hessian to rounding.
    problem = rotated_quadratic(n=3, condition=10.0, seed=1)
    lr, K = problem.lr, 8
    opt = lgfjax.lgf(
        optax.sgd(lr),
        dt=lr,
        schedule=lgfjax.Fixed(history_size=K, retrain_interval=K + 2, fd_order=1),
        fit=lgfjax.Fit(threshold=0.0, alpha=0.0),
    )
    _, state, _ = run(opt, problem, K + 1)
    h = jax.hessian(problem.loss)(problem.x0)
    c = h @ (problem.minimum)
    # dz/dt = -H x + H c: linear part -H, bias H c (library: 1, x0, x1, x2).
    np.testing.assert_allclose(state.model.coefficients[1:].T, -h, atol=1e-7)
    np.testing.assert_allclose(state.model.coefficients[0], c, atol=1e-7)


@pytest.mark.numerics
@pytest.mark.parametrize("degree", [1, 2])
def test_reduced_step_equals_full_space_integration_of_projected_field(degree):
    problem = rotated_quadratic(n=6, condition=10.0, seed=2)
    lr, K, rank = problem.lr, 10, 3
    opt = lgfjax.lgf(
        optax.sgd(lr),
        dt=lr,
        schedule=lgfjax.Fixed(history_size=K, retrain_interval=K + 5),
        fit=lgfjax.Fit(rank=rank, poly_order=degree),
    )
    x, s = problem.x0, opt.init(problem.x0)
    update = jax.jit(opt.update)
    for _ in range(K):
        u, s = update(jax.grad(problem.loss)(x), s, x)
        x = optax.apply_updates(x, u)
    u, s = update(jnp.zeros_like(x), s, x)  # fit + first surrogate step
    assert int(s.info.status) == 0 and int(s.info.accepted) == 1
    x1 = x + u
    basis = s.model.basis  # (r, n)
    np.testing.assert_allclose(basis @ basis.T, np.eye(rank), atol=1e-10)
    flow = lgfjax.PolynomialFlow(s.model.coefficients, degree, True)

    def full_field(t, y, args):
        return basis.T @ flow(t, basis @ y)

    y1, ok = integrate(
        full_field,
        x,
        jnp.asarray(lr),
        solver=lgfjax.RK4(),
        substeps=1,
        stepsize_controller=diffrax.ConstantStepSize(),
        max_steps=4,
    )
    assert bool(ok)
    np.testing.assert_allclose(x1, y1, rtol=0, atol=1e-12)


def test_no_retracing_over_cycles():
    problem = quadratic(n=3)
    opt = lgfjax.lgf(
        optax.sgd(problem.lr),
        dt=problem.lr,
        schedule=lgfjax.Fixed(history_size=4, retrain_interval=7),
        fit=lgfjax.Fit(rank=2),
    )
    traces = [0]
    grad_fn = lgfjax.value_and_grad(problem.loss)

    @jax.jit
    def step(params, state):
        traces[0] += 1
        _, grads = grad_fn(params, state)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = problem.x0, opt.init(problem.x0)
    for _ in range(30):
        params, state = step(params, state)
    assert traces[0] == 1


@pytest.mark.parametrize("position", ["first", "last"])
def test_inside_optax_chain(position):
    problem = quadratic(n=3)
    lgf = lgfjax.lgf(
        optax.sgd(problem.lr),
        dt=problem.lr,
        schedule=lgfjax.Fixed(history_size=5, retrain_interval=10),
    )
    opt = (
        optax.chain(lgf, optax.scale(1.0))
        if position == "first"
        else optax.chain(optax.clip_by_global_norm(1e3), lgf)
    )
    params, state, losses = run(opt, problem, 30)
    assert int(lgfjax.gradient_evaluations(state)) == 15
    assert losses[-1] < 1e-2 * problem.loss(problem.x0)
    assert isinstance(lgfjax.diagnostics(state), lgfjax.Diagnostics)


@pytest.mark.numerics
@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_pytree_params_keep_structure_and_dtypes(rank, dtype):
    problem = pytree_quadratic(dtype)
    opt = lgfjax.lgf(
        optax.sgd(problem.lr),
        dt=problem.lr,
        schedule=lgfjax.Fixed(history_size=6, retrain_interval=15),
        fit=lgfjax.Fit(rank=rank),
    )
    params, state, losses = run(opt, problem, 30)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(problem.x0)
    for p, q in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(problem.x0)):
        assert p.dtype == q.dtype and p.shape == q.shape
        assert bool(jnp.all(jnp.isfinite(p)))
    assert state.model.coefficients.dtype == dtype
    assert int(state.info.fallbacks) == 0
    assert losses[-1] < 1e-3 * float(problem.loss(problem.x0))


@pytest.mark.numerics
@pytest.mark.parametrize("derivative", ["strong", "weak"])
def test_float32_matches_float64(derivative):
    p64 = rotated_quadratic(n=4, condition=10.0)
    x0_32 = p64.x0.astype(jnp.float32)
    opt = lgfjax.lgf(
        optax.sgd(p64.lr), dt=p64.lr, schedule=lgfjax.Fixed(10, 25, derivative=derivative)
    )
    x64, s64, _ = run(opt, p64, 50)
    p32 = p64._replace(x0=x0_32, loss=lambda x: p64.loss(x.astype(jnp.float64)).astype(jnp.float32))
    x32, s32, _ = run(opt, p32, 50)
    assert x32.dtype == jnp.float32 and s32.model.coefficients.dtype == jnp.float32
    # Float32 rounding (eps 1.2e-7) enters the fit through an ill-conditioned library:
    # one cycle's iterates nearly lie on the slow mode, so the fitted coefficients carry
    # relative errors up to ~kappa eps32 (1e-3..1e-2 here; the weak form's integration
    # weights add to it), and the surrogate's endpoint moves by that fraction of the
    # distance it covers, which is at most the distance left to the minimum. 5e-2 of that
    # distance bounds it with margin; the floor is 100 ulps of float32 at |c| ~ 1.
    remaining = float(jnp.max(jnp.abs(x64 - p64.minimum)))
    np.testing.assert_allclose(x32, x64, rtol=0, atol=5e-2 * remaining + 100 * 2.0**-23)
    # Both runs converge the same way: the float32 run is not worse than float64's by
    # more than that tolerance, and rounding did not cost it a surrogate phase.
    assert float(jnp.max(jnp.abs(x32 - p64.minimum))) <= 1.05 * remaining + 100 * 2.0**-23
    assert int(s32.info.fallbacks) == int(s64.info.fallbacks) == 0


@pytest.mark.numerics
def test_weak_form_learns_quadratic_flow():
    problem = quadratic(n=2, condition=3.0)
    lr, K, M = problem.lr, 20, 60
    opt = lgfjax.lgf(
        optax.sgd(lr),
        dt=lr,
        schedule=lgfjax.Fixed(history_size=K, retrain_interval=M, derivative="weak"),
        fit=lgfjax.Fit(include_bias=False),
    )
    params, state, _ = run(opt, problem, M)
    gd = problem.x0
    for _ in range(M):
        gd = gd - lr * jax.grad(problem.loss)(gd)
    assert float(jnp.linalg.norm(params - gd) / jnp.linalg.norm(gd)) < 0.05
    assert float(state.info.fit_residual) < 1e-2


@pytest.mark.numerics
def test_centred_pod_resolves_small_moves_in_float32():
    # Parameters near 100 moving by O(1): the uncentred float32 Gram matrix keeps
    # only the leading (mean) mode, the centred one keeps the directions of motion.
    d = jnp.array([1.0, 2.0, 3.0, 4.0], jnp.float32)
    c = jnp.full(4, 100.0, jnp.float32)
    problem = quadratic(n=4)._replace(
        loss=lambda x: 0.5 * jnp.sum(d * (x - c) ** 2),
        x0=c + jnp.array([1.0, -1.0, 0.5, 0.2], jnp.float32),
    )
    results = {}
    for center in (False, True):
        opt = lgfjax.lgf(
            optax.sgd(0.1),
            dt=0.1,
            schedule=lgfjax.Fixed(history_size=10, retrain_interval=30),
            fit=lgfjax.Fit(rank=3, center=center),
        )
        params, state, losses = run(opt, problem, 60)
        results[center] = (losses[-1], int(state.info.active_terms))
    assert results[True][1] == 12 and results[False][1] < 12
    assert results[True][0] < 1e-3 * results[False][0]


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("substeps", [1, 2, 3, 5])
@pytest.mark.parametrize("solver", [lgfjax.RK4(), diffrax.Tsit5(), diffrax.Heun()])
def test_fixed_steps_take_diffeqsolves_steps(dtype, substeps, solver):
    # With a constant step size `integrate` takes the solver's steps itself instead of
    # calling `diffeqsolve` (much cheaper to compile and, for a full-space state, to
    # run). First-same-as-last solvers (Tsit5) step diffrax's own solver: one or two
    # steps are the same to the bit. Other explicit RK solvers (RK4, Heun) take the
    # same tableau's stages written out (`erk_step`), whose sums round differently
    # from diffrax's stage contractions. And from three steps on diffrax computes the
    # step times as t1 * k / n, which XLA may round differently in the two programs
    # (one ulp of t). So the states agree to a few ulps per step of a contracting,
    # smooth field (|df/dy| <= 2 here, t1 <= 1; a stage sums at most 4 terms): 8 eps
    # per step, relative.
    rng = np.random.default_rng(0)
    y0 = jnp.asarray(perturb(rng.normal(size=4)), dtype)
    t1 = jnp.asarray(perturb(0.37), dtype)
    c = jnp.asarray(0.2, dtype)

    def field(t, y, args):
        return -y * (1.0 + 0.3 * jnp.sin(3 * t + args)) + 0.1 * y**2

    @jax.jit
    def ours(y0, t1):
        return integrate(
            field,
            y0,
            t1,
            solver=solver,
            substeps=substeps,
            stepsize_controller=diffrax.ConstantStepSize(),
            max_steps=16,
            args=c,
        )

    @jax.jit
    def reference(y0, t1):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            t0=0.0,
            t1=t1,
            dt0=t1 / substeps,
            y0=y0,
            args=c,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.ConstantStepSize(),
            max_steps=16,
            throw=False,
        )
        return sol.ys[0], sol.result == diffrax.RESULTS.successful

    y, ok = ours(y0, t1)
    y_ref, ok_ref = reference(y0, t1)
    assert bool(ok) and bool(ok_ref) and y.dtype == y_ref.dtype
    if substeps <= 2 and isinstance(solver, diffrax.Tsit5):
        np.testing.assert_array_equal(y, y_ref)
    else:
        eps = float(jnp.finfo(dtype).eps)
        np.testing.assert_allclose(y, y_ref, rtol=8 * substeps * eps, atol=0)


def test_fixed_steps_fail_like_diffeqsolve_when_max_steps_is_too_small():
    # Fewer allowed steps than substeps: diffrax's own loop runs and reports failure.
    y, ok = integrate(
        lambda t, y, a: -y,
        jnp.ones(2),
        jnp.asarray(1.0),
        solver=lgfjax.RK4(),
        substeps=4,
        stepsize_controller=diffrax.ConstantStepSize(),
        max_steps=2,
    )
    assert not bool(ok)
