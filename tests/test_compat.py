"""The optax compatibility suite, run over `lgf` and `lgf_adam`."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import perturb, quadratic, run

import lgfjax
from lgfjax._adam import lgf_adam

K, M = 4, 10
EPS64 = 2.0**-52


def _fit_tolerance(state, scale):
    """Bound on how far two float64 runs that round differently can drift apart.

    The fit solves least squares on the degree-1 library [1, x] of the recorded iterates,
    so an ulp-level difference in the data moves the learned coefficients by ~kappa eps64
    relative (kappa: the library's condition), and the surrogate steps by that fraction
    of the distance they cover (< `scale`). Margin 10x; a real mismatch is O(scale).
    """
    x = np.asarray(lgfjax._state.find_state(state).window.trajectory)
    x = x.reshape(x.shape[0], -1)
    kappa = float(np.linalg.cond(np.hstack([np.ones((x.shape[0], 1)), x])))
    return 10 * kappa * EPS64 * scale


def make(kind, **kw):
    if kind == "lgf":
        return lgfjax.lgf(
            optax.sgd(0.1), dt=0.1, **kw, schedule=lgfjax.Fixed(history_size=K, retrain_interval=M)
        )
    return lgf_adam(0.1, **kw, schedule=lgfjax.Fixed(history_size=K, retrain_interval=M))


KINDS = ["lgf", "lgf_adam"]


@pytest.mark.parametrize("kind", KINDS)
def test_extra_kwargs_are_accepted_and_ignored(kind):
    opt = make(kind)
    params = jnp.array([1.0, -1.0])
    state = opt.init(params)
    u1, s1 = opt.update(params, state, params)
    u2, s2 = opt.update(params, state, params, unrelated=3, value=jnp.ones(()), grad=params)
    # Bitwise: the same computation on the same inputs (the extras are never read).
    np.testing.assert_array_equal(u1, u2)
    for a, b in zip(jax.tree_util.tree_leaves(s1), jax.tree_util.tree_leaves(s2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.numerics
@pytest.mark.parametrize("kind", KINDS)
def test_chain_and_state_lookup(kind):
    opt = optax.chain(optax.clip_by_global_norm(10.0), make(kind))
    problem = quadratic(n=3)
    params, state, losses = run(opt, problem, 2 * M)
    # Exact: the schedule takes K true steps per cycle and no guard can fire. The
    # quadratic's gradient is exactly linear in x, so the float64 fit is exact to kappa
    # eps64 (~1e-12); velocities ~0.1 are far above the 1e-8 threshold and the learned
    # flow contracts, far inside the trust region of 3x the last true step.
    assert int(lgfjax.gradient_evaluations(state)) == 2 * K
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("factory", ["lgf", "lgf_adam"])
@pytest.mark.parametrize("static", [False, True])
def test_inject_hyperparams_needs_no_static_args(factory, static):
    # The options that fix shapes live in objects, which optax leaves alone; only the
    # top-level floats (dt, Adam's rate and moments) are injected. `static_args` is
    # still accepted.
    f = getattr(lgfjax, factory)
    args = (optax.sgd(0.1),) if factory == "lgf" else (0.05,)
    kwargs = {"dt": 0.1} if factory == "lgf" else {}
    extra = {"static_args": lgfjax.static_args(f)} if static else {}
    opt = optax.inject_hyperparams(f, **extra)(*args, **kwargs)
    x = jnp.zeros(3)
    state = opt.init(x)
    loss = lambda p: jnp.sum((p - 1.0) ** 2)  # noqa: E731
    step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p))
    for _ in range(40):
        updates, state = step(x, state)
        x = optax.apply_updates(x, updates)
    assert float(loss(x)) < loss(jnp.zeros(3))  # it trains (3 at the start)


def test_numbers_are_checked_at_construction():
    with pytest.raises(ValueError, match="`dt` must be a real number, got '0.1'"):
        lgfjax.lgf(optax.sgd(0.1), dt="0.1")
    with pytest.raises(ValueError, match="`threshold` must be a real number"):
        lgfjax.lgf_adam(1e-2, fit=lgfjax.Fit(threshold=None))


@pytest.mark.numerics
def test_inject_hyperparams():
    # An option of an object is injected through a factory of that float; the
    # sizes stay in the objects, static.
    def factory(dt, threshold):
        return lgfjax.lgf(
            optax.sgd(0.1),
            dt=dt,
            schedule=lgfjax.Fixed(K, M),
            fit=lgfjax.Fit(threshold=threshold),
        )

    opt = optax.inject_hyperparams(factory)(dt=0.1, threshold=1e-8)
    problem = quadratic(n=2)
    grad = jax.grad(problem.loss)

    def trajectory(opt, state, with_state=False):
        update = jax.jit(opt.update)
        x, xs = problem.x0, []
        for _ in range(2 * M):
            u, state = update(grad(x), state, x)
            x = optax.apply_updates(x, u)
            xs.append(x)
        return (np.stack(xs), state) if with_state else np.stack(xs)

    injected, state = trajectory(opt, opt.init(problem.x0), with_state=True)
    # Hyperparameters read from the state instead of folded in as constants: the two
    # programs round differently (measured 5e-14 relative), which the fit amplifies by
    # its library's condition (~3e3 here); see _fit_tolerance. |x| <= |x0| = 1.
    tol = _fit_tolerance(state, scale=1.0)
    np.testing.assert_allclose(
        injected, trajectory(make("lgf"), make("lgf").init(problem.x0)), rtol=0, atol=tol
    )
    # A new threshold set in the state takes effect: it matches an optimiser built
    # with it. (dt alone would not do: the learned flow scales as 1/dt and is then
    # integrated over dt, so the surrogate steps are invariant to it.)
    state = opt.init(problem.x0)
    state = state._replace(hyperparams={**state.hyperparams, "threshold": jnp.asarray(100.0)})
    changed = trajectory(opt, state)
    rebuilt = lgfjax.lgf(
        optax.sgd(0.1), dt=0.1, schedule=lgfjax.Fixed(K, M), fit=lgfjax.Fit(threshold=100.0)
    )
    # (Threshold 100 drops every term, so both fall back to the same SGD steps.)
    np.testing.assert_allclose(
        changed, trajectory(rebuilt, rebuilt.init(problem.x0)), rtol=0, atol=tol
    )
    assert not np.allclose(changed, injected)  # they differ by ~0.07


@pytest.mark.numerics
@pytest.mark.parametrize("kind", KINDS)
def test_multisteps_wrapping(kind):
    opt = optax.MultiSteps(make(kind), every_k_schedule=2)
    problem = quadratic(n=3)
    grad = jax.grad(problem.loss)

    @jax.jit
    def step(x, s):
        u, s = opt.update(grad(x), s, x)
        return optax.apply_updates(x, u), s

    x, s = problem.x0, opt.init(problem.x0)
    for _ in range(4 * M):
        x, s = step(x, s)
    inner = lgfjax.diagnostics(s.inner_opt_state)
    # Exact: MultiSteps passes every 2nd update on; the K true steps per cycle are the
    # schedule's, no guard can fire (see test_chain_and_state_lookup).
    assert int(inner.steps) == 2 * M and int(inner.gradient_evaluations) == 2 * K
    assert float(problem.loss(x)) < float(problem.loss(problem.x0))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_dtypes_preserved(kind, dtype):
    opt = make(kind)
    params = {"a": jnp.ones((3,), dtype), "b": jnp.ones((2, 2), jnp.float32)}
    state = opt.init(params)
    step = jax.jit(opt.update)
    for _ in range(M + 2):
        grads = jax.tree_util.tree_map(lambda p: 0.5 * p, params)
        updates, state = step(grads, state, params)
        for u, p in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(params)):
            assert u.dtype == p.dtype and u.shape == p.shape
        params = optax.apply_updates(params, updates)
    assert all(
        bool(jnp.all(jnp.isfinite(p.astype(jnp.float32))))
        for p in jax.tree_util.tree_leaves(params)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_state_survives_randomly_taken_cond(kind):
    # lax.cond demands identical structure, shapes and dtypes from both branches: an
    # update that changed any of them would not even compile here.
    opt = make(kind)
    problem = quadratic(n=3)
    grad = jax.grad(problem.loss)

    @jax.jit
    def step(x, s, key):
        def do(operands):
            x, s = operands
            u, s = opt.update(grad(x), s, x)
            return optax.apply_updates(x, u), s

        return jax.lax.cond(jax.random.bernoulli(key), do, lambda o: o, (x, s))

    x, s = problem.x0, opt.init(problem.x0)
    for key in jax.random.split(jax.random.PRNGKey(0), 3 * M):
        x, s = step(x, s, key)
    assert bool(jnp.all(jnp.isfinite(x)))
    assert 0 < int(s.schedule.count) < 3 * M


@pytest.mark.parametrize("kind", KINDS)
def test_no_recompilation_on_later_updates(kind):
    opt = make(kind, fit=lgfjax.Fit(rank=2))
    problem = quadratic(n=3)
    step = jax.jit(functools.partial(opt.update))
    x, s = problem.x0, opt.init(problem.x0)
    for _ in range(3 * M):
        u, s = step(jax.grad(problem.loss)(x), s, x)
        x = optax.apply_updates(x, u)
    assert step._cache_size() == 1


# lgf on the fixed schedule under vmap is tests/test_vmap.py's subject (16 runs, seeds
# and learning rates); here lgf_adam, and lgf again under `python -m pytest -m slow`.
@pytest.mark.numerics
@pytest.mark.parametrize("kind", [pytest.param("lgf", marks=pytest.mark.slow), "lgf_adam"])
def test_vmap_over_independent_runs(kind):
    # Under vmap lax.cond becomes select: every branch runs, but results are exact.
    opt = make(kind)
    problem = quadratic(n=2)
    grad = jax.grad(problem.loss)

    def trajectory(x0):
        def body(carry, _):
            x, s = carry
            u, s = opt.update(grad(x), s, x)
            return (optax.apply_updates(x, u), s), None

        (x, s), _ = jax.lax.scan(body, (x0, opt.init(x0)), None, length=2 * M)
        return x, s

    starts = jnp.stack([jnp.array([1.0, 2.0]), jnp.array([-0.5, 0.3]), jnp.array([3.0, -1.0])])
    starts = perturb(starts)
    xs, states = jax.jit(jax.vmap(trajectory))(starts)
    for i in range(starts.shape[0]):
        x, s = jax.jit(trajectory)(starts[i])
        # Batched and unbatched programs round differently (measured <= 1.4e-15), which
        # the fit amplifies by its library's condition (up to ~1e4); see _fit_tolerance.
        tol = _fit_tolerance(s, scale=float(jnp.max(jnp.abs(starts[i]))))
        np.testing.assert_allclose(xs[i], x, rtol=0, atol=tol)
        # Exact: K true steps per cycle, no guard fires (see test_chain_and_state_lookup).
        assert int(states.gradient_evaluations[i]) == int(s.gradient_evaluations) == 2 * K


@pytest.mark.parametrize(
    "make",
    [
        lambda: lgfjax.lgf(optax.sgd(0.1), dt=0.1),
        lambda: lgfjax.lgf_adam(1e-2),
        lambda: lgfjax.lgf(
            optax.sgd(0.1), dt=0.1, schedule=lgfjax.Fixed(history_size=4, retrain_interval=8)
        ),
    ],
    ids=["lgf", "lgf_adam", "lgf fixed"],
)
def test_compiled_step_has_no_host_callback(make):
    # JAX's persistent compilation cache (`jax_compilation_cache_dir`) refuses programs
    # with host callbacks: a user's step with an lgfjax optimiser must have none.
    opt = make()
    loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)  # noqa: E731
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}

    def step(p, s):
        value, grads = lgfjax.value_and_grad(loss)(p, s)
        updates, s = opt.update(grads, s, p, value=value)
        return optax.apply_updates(p, updates), s

    text = jax.jit(step).lower(params, opt.init(params)).compile().as_text()
    targets = re.findall(r'custom_call_target="([^"]+)"', text)
    assert not [t for t in targets if "callback" in t]


def test_eager_update_warns_about_ungated_gradients():
    # Without a jit of the user's own, `update` sees the new state on the host and
    # warns when a surrogate step was handed a non-zero gradient.
    opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1, schedule=lgfjax.Verified(history_size=4))
    loss = lambda x: jnp.sum(x**2)  # noqa: E731
    x, s = jnp.ones(2), opt.init(jnp.ones(2))
    for _ in range(50):  # true steps until the first surrogate step is due
        if not bool(lgfjax.needs_gradient(s)):
            break
        u, s = opt.update(jax.grad(loss)(x), s, x)
        x = optax.apply_updates(x, u)
    assert not bool(lgfjax.needs_gradient(s)) and int(s.info.ungated) == 0
    with pytest.warns(UserWarning, match="non-zero gradient"):
        opt.update(jax.grad(loss)(x), s, x)
