"""Shared test problems with known minima, used by tests and benchmarks."""

import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Set by `pytest --perturb` (tests/conftest.py): every problem's starting point and
# data are scaled by (1 + PERTURB_ULPS eps) of their dtype, a change of a few ulps
# that a test resting on the numerics (not on one machine's rounding) must survive.
PERTURB = os.environ.get("LGFJAX_TEST_PERTURB") == "1"
PERTURB_ULPS = 4


def perturb(tree):
    """`tree` scaled by ``1 + 4 eps`` of each leaf's dtype under ``--perturb``, else as is."""
    if not PERTURB:
        return tree

    def scale(x):
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return (x * (1 + PERTURB_ULPS * jnp.finfo(x.dtype).eps)).astype(x.dtype)

    return jax.tree_util.tree_map(scale, tree)


class Problem(NamedTuple):
    name: str
    loss: Callable  # params -> scalar
    x0: object  # initial params (pytree)
    minimum: object  # known minimiser (pytree)
    lr: float  # a stable gradient-descent learning rate


def quadratic(n: int = 2, condition: float = 4.0, dtype=jnp.float64) -> Problem:
    """``0.5 * sum(d_i x_i^2)`` with eigenvalues log-spaced in ``[1, condition]``."""
    d = perturb(jnp.asarray(np.logspace(0, np.log10(condition), n), dtype))
    return Problem(
        f"quadratic(n={n}, cond={condition:g})",
        lambda x: 0.5 * jnp.sum(d * x**2),
        perturb(jnp.ones(n, dtype)),
        jnp.zeros(n, dtype),
        float(0.5 / condition),
    )


def rotated_quadratic(n: int = 4, condition: float = 1e4, seed: int = 0) -> Problem:
    """An ill-conditioned quadratic in a random orthonormal basis, minimum at ``c``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    h = perturb(jnp.asarray(q @ np.diag(np.logspace(0, np.log10(condition), n)) @ q.T))
    # x0 is zero, which no scaling perturbs: the minimum (the data) carries it.
    c = perturb(jnp.asarray(rng.normal(size=n)))
    return Problem(
        f"rotated_quadratic(n={n}, cond={condition:g})",
        lambda x: 0.5 * (x - c) @ h @ (x - c),
        jnp.zeros(n),
        c,
        float(0.5 / condition),
    )


def rosenbrock() -> Problem:
    return Problem(
        "rosenbrock",
        lambda x: (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2,
        perturb(jnp.array([-1.2, 1.0])),
        jnp.array([1.0, 1.0]),
        1e-3,
    )


def pytree_quadratic(dtype=jnp.float64) -> Problem:
    """A quadratic over a dict of mixed-shape leaves."""
    x0 = {
        "w": jnp.ones((2, 3), dtype),
        "b": jnp.full((3,), 2.0, dtype),
        "s": jnp.asarray(-1.0, dtype),
    }
    scale = {
        "w": jnp.arange(1.0, 7.0, dtype=dtype).reshape(2, 3) / 6,
        "b": jnp.array([0.5, 1.0, 0.25], dtype),
        "s": jnp.asarray(0.8, dtype),
    }

    def loss(p):
        return 0.5 * sum(
            jnp.sum(s * x**2)
            for s, x in zip(jax.tree_util.tree_leaves(scale), jax.tree_util.tree_leaves(p))
        )

    x0, scale = perturb(x0), perturb(scale)
    return Problem("pytree_quadratic", loss, x0, jax.tree_util.tree_map(jnp.zeros_like, x0), 0.5)


def mlp_regression(seed: int = 0, hidden: int = 8, samples: int = 64) -> Problem:
    """A one-hidden-layer tanh network fitted to ``sin(3 x)``; the minimum is not known in
    closed form, so `minimum` holds None and tests compare losses instead."""
    key = jax.random.PRNGKey(seed)
    k1, k2 = jax.random.split(key)
    xs = jnp.linspace(-1.0, 1.0, samples)[:, None]
    ys = jnp.sin(3.0 * xs)
    params = {
        "w1": 0.5 * jax.random.normal(k1, (1, hidden)),
        "b1": jnp.zeros(hidden),
        "w2": 0.5 * jax.random.normal(k2, (hidden, 1)),
        "b2": jnp.zeros(1),
    }
    params = perturb(params)

    def loss(p):
        h = jnp.tanh(xs @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] + p["b2"] - ys) ** 2)

    return Problem("mlp_regression", loss, params, None, 0.1)


def run(opt, problem: Problem, steps: int, *, skip: bool = True, value_fn: bool = False):
    """Run `steps` jitted updates; returns (params, state, losses per step).

    With `skip`, gradients come from `lgfjax.value_and_grad`; a Python-side counter
    is not used: the test counts evaluations through `jax.debug.callback` itself.
    """
    import optax

    import lgfjax

    loss = problem.loss
    grad_fn = lgfjax.value_and_grad(loss) if skip else None

    @jax.jit
    def step(params, state):
        if skip:
            _, grads = grad_fn(params, state)
        else:
            grads = jax.grad(loss)(params)
        extra = {"value_fn": loss} if value_fn else {}
        updates, state = opt.update(grads, state, params, **extra)
        params = optax.apply_updates(params, updates)
        return params, state, loss(params)

    params, state = problem.x0, opt.init(problem.x0)
    losses = []
    for _ in range(steps):
        params, state, value = step(params, state)
        losses.append(float(value))
    return params, state, np.asarray(losses)


def oscillatory(n: int = 2) -> Problem:
    """A bowl with ripples: gradient descent zig-zags, so a low-order learned flow of
    its trajectory is poor. The global minimum is at the origin."""
    return Problem(
        "oscillatory",
        lambda x: jnp.sum(x**2) + 0.05 * jnp.sum(1.0 - jnp.cos(20.0 * x)),
        perturb(jnp.full((n,), 0.8)),
        jnp.zeros(n),
        0.02,
    )


def logistic_regression(seed: int = 0, samples: int = 200, features: int = 5) -> Problem:
    """L2-regularised logistic regression on separable-ish synthetic data (strongly
    convex; the minimiser is computed numerically by Newton's method)."""
    rng = np.random.default_rng(seed)
    a = perturb(jnp.asarray(rng.normal(size=(samples, features))))
    w_true = jnp.asarray(rng.normal(size=features))
    y = jnp.where(a @ w_true + 0.5 * jnp.asarray(rng.normal(size=samples)) > 0, 1.0, -1.0)

    def loss(w):
        return jnp.mean(jnp.logaddexp(0.0, -y * (a @ w))) + 0.05 * jnp.sum(w**2)

    w = jnp.zeros(features)
    for _ in range(30):
        w = w - jnp.linalg.solve(jax.hessian(loss)(w), jax.grad(loss)(w))
    return Problem("logistic_regression", loss, jnp.zeros(features), w, 1.0)


def trace(opt, problem: Problem, steps: int, *, value_fn: bool = False, value: bool = False):
    """Run `steps` updates in one `lax.scan`; returns (params, state, losses,
    gradient evaluations after each step). Losses are measured after every step for
    reporting only; the optimiser itself evaluates `problem.loss` only through
    `lgfjax.value_and_grad` (and `value_fn` checks), which the state counts. With
    `value`, the loss that comes free with each true gradient is passed as the extra
    argument ``value`` (the verified schedule judges its phases by it)."""
    import optax

    import lgfjax

    loss = problem.loss
    grad_fn = lgfjax.value_and_grad(loss)

    def body(carry, _):
        params, state = carry
        v, grads = grad_fn(params, state)
        extra = {"value_fn": loss} if value_fn else {}
        if value:
            extra["value"] = v
        updates, state = opt.update(grads, state, params, **extra)
        params = optax.apply_updates(params, updates)
        return (params, state), (loss(params), lgfjax.gradient_evaluations(state))

    @jax.jit
    def go(params):
        return jax.lax.scan(body, (params, opt.init(params)), None, length=steps)

    (params, state), (losses, evals) = go(problem.x0)
    return params, state, np.asarray(losses), np.asarray(evals)


def trace_base(opt, problem: Problem, steps: int):
    """`trace` for a plain optax optimiser: one true gradient per step."""
    import optax

    def run_all(params):
        def step(carry, _):
            params, state = carry
            updates, state = opt.update(jax.grad(problem.loss)(params), state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), problem.loss(params)

        return jax.lax.scan(step, (params, opt.init(params)), None, length=steps)

    (params, _), losses = jax.jit(run_all)(problem.x0)
    return params, np.asarray(losses), np.arange(1, steps + 1)


def evaluations_to_reach(losses, evals, target):
    """True evaluations spent when the loss first reaches `target` (None if never)."""
    hit = np.nonzero(np.asarray(losses) <= target)[0]
    return None if hit.size == 0 else int(np.asarray(evals)[hit[0]])


def safeguard_set() -> list[Problem]:
    """The five problems of the safeguard study, in order: an ill-conditioned quadratic
    (cond 1e4), Rosenbrock, a tanh network, logistic regression, and a rippled bowl on
    which the learned flow is known to be poor. `benchmarks/bench_problems.py` runs
    them at full size, `tests/test_problem_set.py` reduced."""
    return [
        rotated_quadratic(n=6, condition=1e4, seed=0),
        rosenbrock(),
        mlp_regression(),
        logistic_regression(),
        oscillatory(),
    ]


class MiniBatchProblem(NamedTuple):
    """A least-squares problem sampled by mini-batches (a known, noisy gradient)."""

    name: str
    per_sample: Callable  # (params, batch index array) -> per-sample losses
    full: Callable  # params -> the loss over every sample
    x0: object
    minimum: object  # the least-squares solution over every sample
    lr: float  # a stable SGD rate
    samples: int  # how many samples a batch index may take

    def loss(self, params, batch):
        return jnp.mean(self.per_sample(params, batch))

    def batch(self, seed: int, index, size: int):
        """The batch of true gradient `index` for `seed` (the same for every optimiser)."""
        key = jax.random.fold_in(jax.random.key(seed), index)
        return jax.random.randint(key, (size,), 0, self.samples)


def least_squares(n: int = 20, samples: int = 2000, dtype=jnp.float32) -> MiniBatchProblem:
    """``mean_i 0.5 (a_i . x - y_i)^2`` over `samples` rows with unit-variance targets'
    noise: the mini-batch gradient is the full one plus noise of known statistics."""
    rng = np.random.default_rng(0)
    a = perturb(jnp.asarray(rng.normal(size=(samples, n)) * np.linspace(0.5, 1.5, n), dtype))
    truth = rng.normal(size=n)
    y = perturb(jnp.asarray(np.asarray(a) @ truth + rng.normal(size=samples), dtype))
    solution = jnp.asarray(np.linalg.lstsq(np.asarray(a, np.float64), np.asarray(y, np.float64))[0])

    def per_sample(x, batch):
        return 0.5 * (a[batch] @ x - y[batch]) ** 2

    return MiniBatchProblem(
        f"least_squares(n={n})",
        per_sample,
        lambda x: jnp.mean(0.5 * (a @ x - y) ** 2),
        jnp.zeros(n, dtype),
        solution.astype(dtype),
        0.05,
        samples,
    )
