"""Damped Newton as an optax transformation, and Newton directions from a Hessian solve."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import lineax as lx
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Int

from ._state import when_needed
from ._validate import check_positive


class NewtonState(NamedTuple):
    """State of `lgfjax.newton`."""

    count: Int[Array, ""]  # int32: updates applied so far (indexes a schedule)


def newton(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    """Damped Newton: the incoming updates are the Newton direction, not the gradient.

    The update is ``-learning_rate * direction``, where the caller supplies the
    direction: ``H^{-1} g`` for a minimisation (see `lgfjax.newton_direction` and
    `lgfjax.value_and_newton_direction`) or ``J^{-1} R`` for a residual ``R(x) = 0``.
    Its continuous limit is the Newton flow ``dx/dt = -H^{-1} g``, so wrapped in
    `lgfjax.lgf` the right `dt` is the learning rate.

    **Arguments:**

    - `learning_rate`: the damping factor ``> 0`` (1 is the full Newton step), or an
      optax schedule of the step count.

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state is a
    `NewtonState`. Extra keyword arguments of `update` are accepted and ignored.

    ```python
    import jax.numpy as jnp, optax, lgfjax

    def loss(x):
        return 0.5 * x @ jnp.array([[3.0, 1.0], [1.0, 2.0]]) @ x - x[0]

    opt = lgfjax.newton(1.0)
    params = jnp.zeros(2)
    state = opt.init(params)
    _, direction = lgfjax.newton_direction(loss)(params)
    updates, state = opt.update(direction, state, params)
    params = optax.apply_updates(params, updates)  # one full step solves a quadratic
    assert jnp.allclose(params, jnp.array([0.4, -0.2]))
    ```
    """
    if not callable(learning_rate):
        check_positive("learning_rate", learning_rate)

    def init_fn(params):
        del params
        return NewtonState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        lr: Any = learning_rate(state.count) if callable(learning_rate) else learning_rate
        updates = jax.tree_util.tree_map(lambda d: (-lr * d).astype(jnp.result_type(d)), updates)
        return updates, NewtonState(count=jnp.asarray(optax.safe_increment(state.count)))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def newton_direction(
    fun: Callable,
    *,
    solver: lx.AbstractLinearSolver | None = None,
    tags=lx.symmetric_tag,
) -> Callable:
    """The Newton direction ``H^{-1} g`` of a scalar function of a pytree.

    Returns ``(params, *args, **kwargs) -> (value, direction)``; `direction` has the
    structure of `params`. The parameters are flattened with
    `jax.flatten_util.ravel_pytree`, the dense ``n x n`` Hessian is formed by
    forward-over-reverse differentiation (one pass gives the value, the gradient
    and the Hessian), and ``H d = g`` is solved with lineax. This always evaluates
    `fun`; inside an LGF loop use `lgfjax.value_and_newton_direction`.

    **Arguments:**

    - `fun`: the objective, ``fun(params, *args, **kwargs) -> scalar``.
    - `solver`: a lineax solver; default ``lineax.LU()`` (what
      ``lineax.AutoLinearSolver(well_posed=None)`` picks for an untagged square
      matrix; it does not need a definite Hessian). For a convex objective,
      ``lineax.Cholesky()`` with ``tags=lineax.positive_semidefinite_tag`` halves
      the cost.
    - `tags`: lineax tags of the Hessian operator (default: symmetric).

    ```python
    import jax.numpy as jnp, lgfjax

    def loss(p):
        return jnp.sum(p["a"] ** 2) + 2.0 * p["b"] ** 2 - p["b"]

    value, d = lgfjax.newton_direction(loss)({"a": jnp.ones(2), "b": jnp.asarray(1.0)})
    assert jnp.allclose(d["a"], 1.0) and jnp.allclose(d["b"], 0.75)
    ```
    """
    solver = lx.LU() if solver is None else solver
    if not isinstance(solver, lx.AbstractLinearSolver):
        raise ValueError(
            f"`solver` must be a lineax.AbstractLinearSolver such as lineax.LU(), got {solver!r}."
        )

    def direction_fn(params, *args, **kwargs):
        flat, unravel = ravel_pytree(params)

        def grad_and_aux(x):
            value, grad = jax.value_and_grad(lambda y: fun(unravel(y), *args, **kwargs))(x)
            return grad, (value, grad)

        hess, (value, grad) = jax.jacfwd(grad_and_aux, has_aux=True)(flat)
        operator = lx.MatrixLinearOperator(hess, tags)
        step = lx.linear_solve(operator, grad, solver).value
        return value, unravel(step)

    return direction_fn


def value_and_newton_direction(
    fun: Callable,
    *,
    solver: lx.AbstractLinearSolver | None = None,
    tags=lx.symmetric_tag,
) -> Callable:
    """`lgfjax.newton_direction`, evaluated only when the LGF optimiser needs it.

    Returns ``(params, state, *args, **kwargs) -> (value, direction)``, the Newton
    analogue of `lgfjax.value_and_grad`: when `lgfjax.needs_gradient(state)` is false
    (a surrogate step, which ignores its input) neither `fun` nor its Hessian is
    computed (`jax.lax.cond`), the value is NaN and the direction zeros. Arguments as
    in `lgfjax.newton_direction`.

    ```python
    import jax, jax.numpy as jnp, optax, lgfjax

    def loss(x):
        return jnp.sum(jnp.cosh(x - 1.0))

    opt = lgfjax.lgf(lgfjax.newton(0.2), dt=0.2, schedule=lgfjax.Fixed(8, 16))
    params = jnp.zeros(2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        _, direction = lgfjax.value_and_newton_direction(loss)(params, state)
        updates, state = opt.update(direction, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(64):
        params, state = step(params, state)
    assert lgfjax.gradient_evaluations(state) < 64
    assert jnp.allclose(params, 1.0, atol=1e-3)
    ```
    """
    return when_needed(newton_direction(fun, solver=solver, tags=tags))
