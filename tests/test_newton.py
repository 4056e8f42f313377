import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
import pytest

import lgfjax
from lgfjax._newton import newton, newton_direction, value_and_newton_direction

from .problems import perturb, pytree_quadratic, rotated_quadratic

EPS64 = 2.0**-52

H2 = np.array([[2.0, 1.0], [1.0, 3.0]])
B2 = np.array([1.0, 0.0])


def quad2(x):
    return 0.5 * x @ jnp.asarray(H2) @ x - jnp.asarray(B2) @ x


def test_direction_and_step_by_hand():
    # At x = (1, 1): g = H x - b = (2, 4), H^{-1} = [[3, -1], [-1, 2]] / 5, so
    # H^{-1} g = (0.4, 1.2); a step with learning rate 0.3 moves by -0.3 of that.
    x = jnp.ones(2)
    value, d = newton_direction(quad2)(x)
    # Integer data: 0.5 x^T H x - b^T x = 3.5 - 1 is computed without rounding.
    assert float(value) == 2.5
    # A backward-stable 2 x 2 solve: relative error <= c kappa eps64 with kappa(H2) = 2.6,
    # i.e. ~1e-15; 1e-12 leaves a 1000x margin for c and the rounded gradient.
    np.testing.assert_allclose(d, [0.4, 1.2], rtol=1e-12)
    opt = newton(0.3)
    state = opt.init(x)
    updates, state = opt.update(d, state, x, unused_extra=1.0)
    # One more multiplication by -0.3: half an ulp on top of the direction's error.
    np.testing.assert_allclose(updates, [-0.12, -0.36], rtol=1e-12)
    assert state.count == 1 and state.count.dtype == jnp.int32


def test_direction_matches_numpy_solve_3x3():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 3))
    h = a @ a.T + np.eye(3)
    b = rng.normal(size=3)
    x = rng.normal(size=3)
    _, d = jax.jit(newton_direction(lambda x: 0.5 * x @ h @ x - b @ x))(jnp.asarray(x))
    # Two backward-stable solves of the same system (kappa(h) = 4.5), with the gradient and
    # the (AD, symmetrised-by-construction) Hessian rounded differently: they differ by
    # ~kappa eps64 ~ 1e-15 relative; 1e-10 is far above that and far below any real error.
    np.testing.assert_allclose(d, np.linalg.solve(h, h @ x - b), rtol=1e-10)


@pytest.mark.numerics
@pytest.mark.parametrize("problem", [rotated_quadratic(n=5, condition=1e3), pytree_quadratic()])
def test_full_step_solves_a_quadratic(problem):
    opt = newton(1.0)
    params = problem.x0
    _, d = newton_direction(problem.loss)(params)
    updates, _ = opt.update(d, opt.init(params), params)
    params = optax.apply_updates(params, updates)
    leaves = zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(problem.minimum), strict=True
    )
    # One full Newton step on a quadratic lands on the minimiser up to the solve's
    # rounding, kappa eps64 |x*| <= 1e3 * 2.2e-16 * 0.93 = 2e-13 (measured 2.4e-15);
    # 1e-9 is 5000x that, and a wrong direction would miss by O(1).
    for got, want in leaves:
        np.testing.assert_allclose(got, want, atol=1e-9)


def test_direction_on_pytree_params_couples_leaves():
    # A loss coupling two leaves of different shapes: compare with a flat solve.
    rng = np.random.default_rng(2)
    a = rng.normal(size=(5, 5))
    h = a @ a.T + 0.5 * np.eye(5)

    def flat(p):
        return jnp.concatenate([p["w"].ravel(), p["b"][None]])

    def loss(p, shift):
        v = flat(p)
        return 0.5 * v @ h @ v + jnp.sum(jnp.cosh(v - shift))

    params = {"w": jnp.asarray(rng.normal(size=(2, 2))), "b": jnp.asarray(0.3)}
    value, d = newton_direction(loss)(params, 0.25)
    v = flat(params)
    g = jax.grad(lambda v: 0.5 * v @ h @ v + jnp.sum(jnp.cosh(v - 0.25)))(v)
    hess = h + np.diag(np.cosh(np.asarray(v) - 0.25))
    want = np.linalg.solve(hess, g)
    assert jax.tree_util.tree_structure(d) == jax.tree_util.tree_structure(params)
    assert d["w"].shape == (2, 2) and d["b"].shape == ()
    # Same system solved by lineax and numpy (kappa = 7.1): they differ by ~kappa eps64
    # ~ 2e-15 relative; 1e-10 is far above rounding and far below a missed coupling.
    np.testing.assert_allclose(flat(d), want, rtol=1e-10)
    # The same loss in another program: a few ulps apart (pytest.approx's rel 1e-6).
    assert value == pytest.approx(float(loss(params, 0.25)))


@pytest.mark.parametrize(
    "solver,tags",
    [(lx.LU(), lx.symmetric_tag), (lx.Cholesky(), lx.positive_semidefinite_tag), (lx.SVD(), ())],
)
def test_lineax_solvers(solver, tags):
    _, d = newton_direction(quad2, solver=solver, tags=tags)(jnp.ones(2))
    # Each solver is backward stable: relative error ~kappa(H2) eps64 = 6e-16 (SVD a few
    # times that); 1e-10 is far above rounding.
    np.testing.assert_allclose(d, [0.4, 1.2], rtol=1e-10)


def test_schedule_and_dtype():
    opt = newton(optax.linear_schedule(1.0, 0.5, 1))
    x = jnp.ones(2, jnp.float32)
    state = opt.init(x)
    u1, state = opt.update(jnp.ones(2, jnp.float32), state, x)
    u2, state = opt.update(jnp.ones(2, jnp.float32), state, x)
    # Exact: the schedule gives 1.0 and 0.5 (1 + (0.5 - 1) * 1 / 1), and -lr * 1 is exact
    # in binary floating point.
    np.testing.assert_array_equal(u1, -1.0)
    np.testing.assert_array_equal(u2, -0.5)
    assert u1.dtype == jnp.float32


# The start is zero, which scaling cannot perturb: under --perturb the data move by 4 ulps.
_C = perturb(jnp.array([1.0, -0.5, 2.0]))
_M = perturb(jnp.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]]))


def _convex(x):
    # Smooth, strictly convex, not quadratic: Newton needs many damped steps.
    return jnp.sum(jnp.cosh(x - _C)) + 0.5 * x @ _M @ x


def _run(opt, steps, calls):
    def counted(x):
        # Fires once per evaluation of the (value, gradient, Hessian) pass.
        jax.debug.callback(lambda: calls.append(1))
        return _convex(x)

    if isinstance(opt.init(jnp.zeros(3)), lgfjax.LGFState):
        direction = value_and_newton_direction(counted)
    else:
        plain = newton_direction(counted)
        direction = lambda x, state: plain(x)  # noqa: E731

    @jax.jit
    def step(x, state):
        _, d = direction(x, state)
        updates, state = opt.update(d, state, x)
        return optax.apply_updates(x, updates), state

    x, state = jnp.zeros(3), opt.init(jnp.zeros(3))
    path, evals = [], []
    for _ in range(steps):
        x, state = step(x, state)
        path.append(x)
        lgf = isinstance(state, lgfjax.LGFState)
        evals.append(int(lgfjax.gradient_evaluations(state) if lgf else state.count))
    return np.asarray(path), state, np.asarray(evals)


def _solution():
    x = jnp.zeros(3)
    for _ in range(30):
        x = x - newton_direction(_convex)(x)[1]
    return np.asarray(x)


@pytest.mark.numerics
def test_not_evaluated_in_surrogate_steps():
    calls = []
    opt = lgfjax.lgf(
        newton(0.2), dt=0.2, schedule=lgfjax.Fixed(history_size=6, retrain_interval=10)
    )
    _, state, _ = _run(opt, 20, calls)
    evals = int(lgfjax.gradient_evaluations(state))
    # Exact: two cycles of 6 true steps, and no guard can fire. In 20 damped steps from 0
    # the velocities are ~0.1-1 (the threshold is 1e-8), the fit's relative residual is
    # ~1e-7 and the surrogate steps shrink like Newton's (x0.8 per step), far inside the
    # trust region of 3x the last true step; no value checks are asked for.
    assert evals == 12
    assert int(lgfjax.diagnostics(state).fallbacks) == 0
    # Exact by construction: the callback fires once per evaluation, which the state counts.
    assert len(calls) == evals


def test_skipped_direction_is_nan_and_zeros():
    opt = lgfjax.lgf(newton(0.2), dt=0.2, schedule=lgfjax.Fixed(history_size=3, retrain_interval=6))
    state = opt.init(jnp.zeros(3))
    state = state._replace(schedule=state.schedule._replace(phase=jnp.ones((), jnp.int32)))
    value, d = value_and_newton_direction(_convex)(jnp.zeros(3), state)
    assert jnp.isnan(value) and jnp.all(d == 0)


@pytest.mark.numerics
def test_lgf_newton_reaches_newton_solution_with_fewer_evaluations():
    x_star = _solution()
    eta, steps = 0.2, 160
    newton_path, newton_state, _ = _run(newton(eta), steps, [])
    lgf_calls = []
    opt = lgfjax.lgf(
        newton(eta),
        dt=eta,
        schedule=lgfjax.Fixed(history_size=10, retrain_interval=20),
        fit=lgfjax.Fit(poly_order=2),
    )
    lgf_path, lgf_state, lgf_evals = _run(opt, steps, lgf_calls)
    assert newton_state.count == steps  # a step counter: exact
    evals = int(lgfjax.gradient_evaluations(lgf_state))
    assert evals == len(lgf_calls) and evals < steps
    # Convergence, not rounding: damped Newton contracts by ~0.8 per step, so 160 steps
    # end at the rounding floor kappa eps64 |x*| ~ 1e-15 (measured 7e-16); 1e-9 asks for
    # convergence with a wide margin over that floor.
    np.testing.assert_allclose(lgf_path[-1], x_star, atol=1e-9)
    # Evaluations needed to come within 1e-8 of the Newton solution. Both paths cross 1e-8
    # with ratio ~0.8 per step, so rounding (~1e-16 relative) cannot move a crossing by
    # a step; measured Newton 85 evaluations, LGF 44. The LGF count is read from the state
    # (fallbacks near convergence add true steps), and is at least the schedule's.
    tol = 1e-8
    newton_need = 1 + np.argmax(np.linalg.norm(newton_path - x_star, axis=1) < tol)
    lgf_hit = 1 + np.argmax(np.linalg.norm(lgf_path - x_star, axis=1) < tol)
    lgf_need = int(lgf_evals[lgf_hit - 1])
    assert lgf_need >= _evaluations_after(lgf_hit, history=10, cycle=20)
    assert lgf_need < newton_need


def _evaluations_after(steps, history, cycle):
    full, rest = divmod(steps, cycle)
    return full * history + min(rest, history)


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan")])
def test_learning_rate_validation(bad):
    with pytest.raises(ValueError, match=r"`learning_rate` must be a number > 0, got"):
        newton(bad)


def test_solver_validation():
    with pytest.raises(ValueError, match="`solver` must be a lineax"):
        newton_direction(quad2, solver="lu")
