"""Reading an LGF state, and evaluating the objective only when a step needs it."""

import warnings
import weakref
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int

from ._fixed import LGFState
from ._layout import HOST_VALUES, is_flat, jit_when
from ._noise import NOISE_FLOOR, RESAMPLED, scalar_error
from ._status import STATUS_MESSAGES, Status
from ._validate import _concrete, warn_once
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


def best_params(state, params):
    """The true iterate with the lowest loss so far, shaped like `params`.

    The verified schedule keeps it from the losses passed as `value` (see `Diagnostics`'
    `returns`): a run that ends on an overshoot or a noisy step hands back the best point
    it measured instead. Before any true step with a loss, it is where the run began.
    `params` gives the pytree (the current parameters will do).

    ```python
    import jax.numpy as jnp, optax, lgfjax

    opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1)
    params = {"w": jnp.ones(2), "b": jnp.zeros(())}
    state = opt.init(params)
    assert lgfjax.best_params(state, params)["w"].tolist() == [1.0, 1.0]
    ```
    """
    s = find_state(state)
    if not isinstance(s, VerifiedState):
        raise ValueError(
            "`best_params` reads the verified schedule's state; the fixed schedule keeps no "
            "best point (use `value_fn` checks, or track the loss yourself)."
        )
    kept = s.best.params
    if is_flat(kept, params):
        return optax.tree.cast_like(ravel_pytree(params)[1](kept), params)
    return kept


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
    """A cheap summary of an LGF state, safe to log every step (all scalars).

    Printed (``print(lgfjax.diagnostics(state))``), it shows plain numbers and the
    status by name. The fields, and how to read them, are in the guide's
    "Reading diagnostics" page; in short:

    - `phase`: 0 if the next update is a true step (it needs a gradient), 1 if not;
    - `steps`, `gradient_evaluations`, `value_evaluations`: updates applied, true
      gradients consumed, and `value_fn` calls (a forward pass each);
    - `accepted`, `rejected`: surrogate steps kept, and refused by a guard;
    - `fallbacks`, `status`: events that cut a phase short, and the last one's reason
      (an `lgfjax.Status`; not reset afterwards);
    - `verifications`, `verified`, `verification_ratio`: phases judged by a true step,
      how many it confirmed, and their ratio (the best single indicator that LGF pays
      off); `inconclusive`: judged phases whose change of the loss was within its
      noise; `flow_error`: the flow's relative error at the last judgement;
    - `noise`, `loss_noise`: the recorded measurements' relative noise (near 0 for a
      deterministic objective, about 1 or more for small mini-batches) and the
      loss's standard error at the last true step;
    - `resampled`: what the run found of its batches: 0 not known yet, 1 one fixed
      objective, 2 a batch drawn per true step (checked with `value_fn` on the first
      confirmed phase whose change of the loss was within its noise; 1 is checked again
      on a rise, at most once per doubling of the gradients; 2 is final);
    - `next_phase_length`: the length planned for the next surrogate phase (fixed
      schedule: surrogate steps per cycle);
    - `returns`: how often the run went back to its best true point after staying far
      above it (`lgfjax.best_params` reads that point);
    - `fit_residual`, `active_terms`, `pod_energy`: the last fit;
    - `ungated_gradients`: surrogate steps handed a non-zero gradient (must be 0).

    The fixed schedule does not track the verified schedule's judgements: those
    fields are -1 (counts) or NaN there.
    """

    phase: Int[Array, ""]
    steps: Int[Array, ""]
    gradient_evaluations: Int[Array, ""]
    value_evaluations: Int[Array, ""]
    accepted: Int[Array, ""]
    rejected: Int[Array, ""]
    fallbacks: Int[Array, ""]
    status: Int[Array, ""]
    verifications: Int[Array, ""]
    verified: Int[Array, ""]
    verification_ratio: Float[Array, ""]
    inconclusive: Int[Array, ""]
    flow_error: Float[Array, ""]
    noise: Float[Array, ""]
    loss_noise: Float[Array, ""]
    resampled: Int[Array, ""]
    next_phase_length: Int[Array, ""]
    returns: Int[Array, ""]
    fit_residual: Float[Array, ""]
    active_terms: Int[Array, ""]
    pod_energy: Float[Array, ""]
    ungated_gradients: Int[Array, ""]

    @property
    def surrogate_steps(self):
        """Deprecated name of `next_phase_length`."""
        warnings.warn(
            "`Diagnostics.surrogate_steps` is now `next_phase_length` (the length planned "
            "for the next surrogate phase, not a count of steps taken).",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.next_phase_length

    def __repr__(self) -> str:
        if not all(_concrete(x) and jnp.ndim(x) == 0 for x in self):
            return "Diagnostics(" + ", ".join(f"{k}={v!r}" for k, v in self._asdict().items()) + ")"
        parts = []
        for name, x in self._asdict().items():
            if name == "status":
                code = int(x)
                label = _STATUS_NAMES.get(code, str(code))
                parts.append(f"status={label}")
            elif jnp.issubdtype(jnp.result_type(x), jnp.integer):
                parts.append(f"{name}={int(x)}")
            else:
                parts.append(f"{name}={float(x):.4g}")
        return "Diagnostics(" + ", ".join(parts) + ")"

    __str__ = __repr__


def diagnostics(state) -> Diagnostics:
    """Diagnostics of the (possibly nested) LGF state; see `Diagnostics`.

    Outside `jax.jit` it also warns, once per process and reason, when a verified run
    handed surrogate steps a gradient (nothing was saved) or when its phases are rarely
    confirmed (LGF is saving little on this problem).
    """
    s = find_state(state)
    if isinstance(s, VerifiedState):
        info = s.info
        _warn_if_concrete(s)
        ratio = info.verified / jnp.maximum(info.verifications, 1)
        return Diagnostics(
            phase=s.schedule.phase,
            steps=s.schedule.count,
            gradient_evaluations=info.gradient_evaluations,
            value_evaluations=info.value_evaluations,
            accepted=info.accepted,
            rejected=info.rejected,
            fallbacks=info.fallbacks,
            status=info.status,
            verifications=info.verifications,
            verified=info.verified,
            verification_ratio=ratio.astype(info.flow_error.dtype),
            inconclusive=info.inconclusive,
            flow_error=info.flow_error,
            noise=s.model.noise,
            loss_noise=_loss_noise(s),
            resampled=s.noise.resampled,
            next_phase_length=s.schedule.length,
            returns=s.best.returns,
            fit_residual=info.fit_residual,
            active_terms=info.active_terms,
            pod_energy=info.pod_energy,
            ungated_gradients=info.ungated,
        )
    info = s.info
    nan = jnp.full((), jnp.nan, info.fit_residual.dtype)
    none = jnp.full((), -1, jnp.int32)
    return Diagnostics(
        phase=s.schedule.phase,
        steps=s.schedule.count,
        gradient_evaluations=info.gradient_evaluations,
        value_evaluations=info.value_evaluations,
        accepted=info.accepted,
        rejected=info.rejected,
        fallbacks=info.fallbacks,
        status=info.status,
        verifications=none,
        verified=none,
        verification_ratio=nan,
        inconclusive=none,
        flow_error=nan,
        noise=nan,
        loss_noise=nan,
        resampled=none,
        next_phase_length=s.schedule.surrogate_steps,
        returns=none,
        fit_residual=info.fit_residual,
        active_terms=info.active_terms,
        pod_energy=info.pod_energy,
        ungated_gradients=none,
    )


def _loss_noise(s: VerifiedState):
    return scalar_error(s.noise)


_STATUS_NAMES = {int(code): code.name for code in Status}
# A verified run whose phases the next true step confirms this rarely saves little.
RARELY = 0.2
RARELY_AFTER = 20  # judged phases before the warning can fire


def _warn_once(key: str, message: str) -> None:
    warn_once(key, message, stacklevel=4)


def _warn_if_concrete(s: VerifiedState) -> None:
    info = s.info
    counts = (info.ungated, info.verified, info.verifications, info.inconclusive)
    if not all(_concrete(x) for x in (*counts, s.noise.resampled)):
        return
    if int(info.ungated) > 0:
        # The compiled step has no host callback (it would keep JAX's persistent
        # compilation cache from storing the user's step), so the warning is here.
        warnings.warn(UNGATED_WARNING, UserWarning, stacklevel=3)
    judged = int(info.verifications)
    noise = float(s.model.noise) if _concrete(s.model.noise) else 0.0
    kept = int(info.verified)
    if noise > NOISE_FLOOR or int(s.noise.resampled) == RESAMPLED:
        # Under noise a phase whose loss change was within its noise is kept, and the
        # run goes on at once even when one noisy true step disagreed with the flow: it
        # saved its steps too. (A phase both confirmed and inconclusive counts twice, so
        # this warns only where both are rare.)
        kept += int(info.inconclusive)
    if judged >= RARELY_AFTER and kept < RARELY * judged:
        why = (
            f" The recorded gradients are noisy (relative noise {noise:.2g}, as with small "
            "mini-batches): one true step says little about the learned flow, and phases "
            "stay short. Larger batches, or the base optimiser alone, may serve better."
            if noise > 0.5
            else " The base's path is not well described by a low-order model in a few "
            "POD modes here (see the guide's 'When to use it')."
        )
        _warn_once(
            "rarely",
            f"lgfjax: only {int(info.verified)} of {judged} surrogate phases were confirmed "
            f"by the next true step, so LGF is saving few gradients on this problem.{why}",
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


def _is_operand(leaf) -> bool:
    """Whether a leaf can pass through `jax.lax.cond` (an array or a number)."""
    return isinstance(leaf, (*HOST_VALUES, bool, jax.Array))  # tracers are jax.Arrays


def when_needed(fn: Callable) -> Callable:
    """``fn(params, *args, **kwargs) -> (value, result)`` gated on `needs_gradient`.

    Returns ``(params, state, *args, **kwargs) -> (value, result)`` that runs `fn`
    inside `jax.lax.cond` only when the optimiser state asks for a true step; otherwise
    the value tree is NaN and the result tree zeros, of the same shapes. Only the
    arrays and numbers among the arguments are operands of the conditional; other
    leaves (an equinox model's static parts, a function, a string) are passed to `fn`
    as they are.
    """

    def wrapped(params, state, *args, **kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs))
        dynamic = [leaf if _is_operand(leaf) else None for leaf in leaves]
        static = [None if _is_operand(leaf) else leaf for leaf in leaves]
        traced = []  # the shapes `evaluate` returned, so that `fn` is traced once

        def call(operands):
            merged = [d if s is None else s for d, s in zip(operands, static)]
            p, a, k = jax.tree_util.tree_unflatten(treedef, merged)
            return fn(p, *a, **k)

        def evaluate(operands):
            out = call(operands)
            traced.append(
                jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), out)
            )
            return out

        def skip(operands):
            # `lax.cond` traces `evaluate` first; should it not, `fn` is traced again.
            value_shapes, result_shapes = traced[-1] if traced else jax.eval_shape(call, operands)
            value = jax.tree_util.tree_map(lambda s: _placeholder(s, jnp.nan), value_shapes)
            result = jax.tree_util.tree_map(lambda s: _placeholder(s, 0.0), result_shapes)
            return value, result

        return jax.lax.cond(needs_gradient(state), evaluate, skip, dynamic)

    return wrapped
