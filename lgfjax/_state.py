"""Reading an LGF state, and evaluating the objective only when a step needs it."""

import warnings
import weakref
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._fixed import LGFState
from ._layout import HOST_VALUES, jit_when
from ._status import STATUS_MESSAGES
from ._validate import _concrete
from ._verified import UNGATED_WARNING, VerifiedState

_STATES = (LGFState, VerifiedState)


def find_state(state) -> LGFState | VerifiedState:
    """The lgfjax state inside a (possibly chained or wrapped) optimiser state."""
    if isinstance(state, _STATES):
        return state
    found = [
        leaf
        for leaf in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, _STATES))
        if isinstance(leaf, _STATES)
    ]
    if len(found) != 1:
        hint = (
            " Pass the state returned by the lgfjax optimiser's `init`/`update` (for a "
            "checkpoint restored with orbax, restore with that state as the target so that "
            "its NamedTuple structure comes back)."
            if not found
            else " Use one lgfjax transformation per optimiser."
        )
        raise ValueError(
            "expected exactly one lgfjax state (LGFState or VerifiedState) inside the "
            f"optimiser state, found {len(found)}.{hint}"
        )
    return found[0]


def needs_gradient(state) -> jax.Array:
    """Whether the next `update` takes a true step and so needs the true gradient.

    In surrogate steps the incoming updates are ignored, so they may be zeros.
    """
    return find_state(state).schedule.phase == 0


def gradient_evaluations(state) -> jax.Array:
    """True gradients consumed so far (int32)."""
    return find_state(state).info.gradient_evaluations


def status_message(code: int) -> str:
    """Text for a fallback reason stored in ``state.status`` (an `lgfjax.Status`)."""
    try:
        return STATUS_MESSAGES[int(code)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"`code` must be one of the lgfjax.Status codes {sorted(STATUS_MESSAGES)}, "
            f"got {code!r}."
        ) from None


class Diagnostics(NamedTuple):
    """A cheap summary of an LGF state, safe to log every step (all scalars)."""

    phase: Int[Array, ""]  # 0: next update is a true step; 1: surrogate step
    steps: Int[Array, ""]
    gradient_evaluations: Int[Array, ""]
    value_evaluations: Int[Array, ""]
    fit_residual: Float[Array, ""]
    active_terms: Int[Array, ""]
    pod_energy: Float[Array, ""]
    accepted: Int[Array, ""]
    rejected: Int[Array, ""]
    fallbacks: Int[Array, ""]
    status: Int[Array, ""]
    surrogate_steps: Int[Array, ""]
    # Surrogate steps that were handed a non-zero gradient: the objective ran although
    # no true step was due, so nothing was saved (use `lgfjax.value_and_grad`). -1
    # where not tracked (the fixed schedule).
    ungated_gradients: Int[Array, ""]


def diagnostics(state) -> Diagnostics:
    """Diagnostics of the (possibly nested) LGF state; see `Diagnostics`."""
    s = find_state(state)
    shared = {f: getattr(s.info, f) for f in Diagnostics._fields if hasattr(s.info, f)}
    if isinstance(s, VerifiedState):
        ungated = s.info.ungated
        if _concrete(ungated) and int(ungated) > 0:
            # The compiled step has no host callback (it would keep JAX's persistent
            # compilation cache from storing the user's step), so the warning is here.
            warnings.warn(UNGATED_WARNING, UserWarning, stacklevel=2)
        return Diagnostics(
            phase=s.schedule.phase,
            steps=s.schedule.count,
            surrogate_steps=s.schedule.length,
            ungated_gradients=s.info.ungated,
            **shared,
        )
    return Diagnostics(
        phase=s.schedule.phase,
        steps=s.schedule.count,
        surrogate_steps=s.schedule.surrogate_steps,
        ungated_gradients=jnp.full((), -1, jnp.int32),
        **shared,
    )


def _placeholder(shape_dtype, fill):
    if jnp.issubdtype(shape_dtype.dtype, jnp.inexact):
        return jnp.full(shape_dtype.shape, fill, shape_dtype.dtype)
    return jnp.zeros(shape_dtype.shape, shape_dtype.dtype)


def value_and_grad(fun: Callable, *, has_aux: bool = False) -> Callable:
    """Like `jax.value_and_grad`, but only evaluated when the optimiser needs it.

    Returns a function ``(params, state, *args, **kwargs) -> (value, grads)``. When
    `needs_gradient` is false, `fun` is not executed (the branch is switched with
    `jax.lax.cond`), the value is NaN and the gradients are zeros; with `has_aux` the
    result is ``((value, aux), grads)`` and aux is NaN/zero filled.

    Under `jax.vmap` with a batched state, `lax.cond` becomes `lax.select`: both
    branches run and nothing is saved. Map over runs with `lax.map` or
    `jax.lax.scan` if skipping matters there.

    ```python
    import jax.numpy as jnp, optax, lgfjax

    opt = lgfjax.lgf(optax.sgd(0.1), history_size=4, retrain_interval=8, dt=0.1)
    state = opt.init(jnp.ones(2))
    value, grads = lgfjax.value_and_grad(lambda x: jnp.sum(x**2))(jnp.ones(2), state)
    assert value == 2.0 and grads.tolist() == [2.0, 2.0]
    ```
    """
    return _cached(
        fun,
        ("value_and_grad", has_aux),
        lambda: _jit_if_arrays(when_needed(jax.value_and_grad(fun, has_aux=has_aux))),
    )


def filter_value_and_grad(fun: Callable, *, has_aux: bool = False) -> Callable:
    """`value_and_grad` for equinox models: `equinox.filter_value_and_grad`, gated.

    Returns ``(model, state, *args, **kwargs) -> (value, grads)``. The model (and the
    arguments) may hold non-arrays (activation functions, static fields): only their
    arrays pass through the `jax.lax.cond`. As in `equinox.filter_value_and_grad`,
    gradients are taken with respect to the model's floating-point arrays, and `grads`
    has ``None`` elsewhere; when no true step is due, `fun` does not run, the value is
    NaN and the gradients are zeros.

    ```python
    import equinox as eqx, jax, jax.numpy as jnp, optax, lgfjax

    model = eqx.nn.MLP(2, 1, 8, 1, key=jax.random.PRNGKey(0))
    opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    def loss(model, x):
        return jnp.mean(jax.vmap(model)(x) ** 2)

    value, grads = lgfjax.filter_value_and_grad(loss)(model, state, jnp.ones((4, 2)))
    updates, state = opt.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
    model = eqx.apply_updates(model, updates)
    ```
    """
    import equinox as eqx

    def make():
        grad_fn = eqx.filter_value_and_grad(fun, has_aux=has_aux)

        def wrapped(model, state, *args, **kwargs):
            dynamic, static = eqx.partition((model, args, kwargs), eqx.is_array)

            def evaluate(dyn):
                m, a, k = eqx.combine(dyn, static)
                return grad_fn(m, *a, **k)

            return when_needed(evaluate)(dynamic, state)

        # Compiled once and cached, so eager loops do not re-trace the cond each step.
        return eqx.filter_jit(wrapped)

    return _cached(fun, ("filter_value_and_grad", has_aux), make)


# Gated evaluators by objective, so that calling `value_and_grad(loss)` afresh at every
# eager step reuses one compiled program (weak keys: nothing is kept alive).
_CACHE: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()


def _cached(fun, key, make):
    try:
        per_fun = _CACHE.setdefault(fun, {})
    except TypeError:  # not weak-referenceable: build afresh
        return make()
    if key not in per_fun:
        per_fun[key] = make()
    return per_fun[key]


def _jit_if_arrays(fn: Callable) -> Callable:
    """`fn` through a cached `jax.jit` when every argument leaf is an array or number.

    Eager calls then dispatch one compiled program instead of re-tracing the
    `lax.cond` (tens of milliseconds); inside a user's `jit` it is inlined. Other
    leaves (strings, callables) go to `fn` directly.
    """
    return jit_when(fn, lambda leaf: isinstance(leaf, (*HOST_VALUES, jax.Array)))


def when_needed(fn: Callable) -> Callable:
    """``fn(params, *args, **kwargs) -> (value, result)`` gated on `needs_gradient`.

    Returns ``(params, state, *args, **kwargs) -> (value, result)`` that runs `fn`
    inside `jax.lax.cond` only when the optimiser state asks for a true step; otherwise
    the value tree is NaN and the result tree zeros, of the same shapes.
    """

    def wrapped(params, state, *args, **kwargs):
        traced = []  # the shapes `evaluate` returned, so that `fn` is traced once

        def evaluate(operands):
            p, a, k = operands
            out = fn(p, *a, **k)
            traced.append(
                jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), out)
            )
            return out

        def skip(operands):
            p, a, k = operands
            # `lax.cond` traces `evaluate` first; should it not, `fn` is traced again.
            value_shapes, result_shapes = traced[-1] if traced else jax.eval_shape(fn, p, *a, **k)
            value = jax.tree_util.tree_map(lambda s: _placeholder(s, jnp.nan), value_shapes)
            result = jax.tree_util.tree_map(lambda s: _placeholder(s, 0.0), result_shapes)
            return value, result

        return jax.lax.cond(needs_gradient(state), evaluate, skip, (params, args, kwargs))

    return wrapped
