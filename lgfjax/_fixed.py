"""The paper's fixed schedule: K true steps, a fit, then M - K surrogate steps, per cycle.

Every cycle of M = `retrain_interval` updates records the iterates of K true steps of
the base (and, for Adam's flow, its gradients) in ``(K + 1, n)`` buffers, fits the
flow to that window at the first surrogate update, and integrates it for the rest of
the cycle. `make_transformation`'s `update` reads as the module-level steps:

- `record_cycle`: the iterate (and gradient) into the window;
- `fit_cycle`: the fit, at the first surrogate update of a cycle;
- `true_step` / `surrogate_step`: the base's step, or one step of the learned flow with
  its guards (`guard_step`) and the optional `value_fn` check (`value_check`, which owns
  its state `ValueCheck` and the rollback);
- `next_cycle`: the pure schedule rule (`adaptive` phase lengths).

Constraints the engine keeps (each was learned the hard way): the ``(K + 1, n)``
buffers never pass through the `lax.switch` (a branch returning an operand unchanged
makes XLA copy it, O(K n) per step); recording and the fit are loops taken once or
never (`once_or_never`), whose carries XLA updates in place; one array per counter, so
states can be donated; static sizes are Python ints fixed at `init`, so nothing
recompiles between steps or cycles; on CPU, STLSQ solves its targets one at a time.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PyTree

from ._engine import (
    SurrogateModel,
    _fit_dtype,
    _i32,
    flat_unravel,
    once_or_never,
    rows_like,
    schedule_reads,
    zero_info,
)
from ._fit import FitConfig, fit_flow
from ._flow import PolynomialFlow
from ._layout import compiled_init, init_in_layout, is_flat, update_in_layout
from ._library import library_size
from ._status import NONFINITE_STEP, OK, SOLVER_FAILED, STEP_TOO_LARGE, VALUE_REJECTED
from ._validate import _concrete, warn_once


class CycleSchedule(NamedTuple):
    count: Int[Array, ""]  # updates applied so far
    cycle_step: Int[Array, ""]  # position in the current cycle, 0 .. K + S - 1
    phase: Int[Array, ""]  # 0 if the next update needs a true gradient, else 1
    surrogate_steps: Int[Array, ""]  # S, surrogate steps in this cycle


class Window(NamedTuple):
    trajectory: PyTree[Array]  # leaves (K + 1, *shape), buffer dtype: cycle iterates
    gradients: PyTree[Array] | None  # leaves (K, *shape): true gradients (Adam only)


class FlowModel(NamedTuple):
    coefficients: Float[Array, "P r"]  # fit dtype: the learned flow
    basis: PyTree[Array] | None  # leaves (r, *shape), fit dtype: POD basis (rank only)
    step_bound: Float[Array, ""]  # fit dtype: largest surrogate step accepted


class ValueCheck(NamedTuple):
    since_check: Int[Array, ""]  # surrogate steps since the last accepted point
    reference_loss: Float[Array, ""]  # fit dtype: value_fn at the last accepted point
    anchor: Any  # (params, base_state) at the last accepted point, or None


class LGFInfo(NamedTuple):
    gradient_evaluations: Int[Array, ""]  # true gradients consumed
    value_evaluations: Int[Array, ""]  # value_fn calls made by acceptance checks
    fit_residual: Float[Array, ""]  # fit dtype: relative residual of the last fit
    active_terms: Int[Array, ""]  # non-zero coefficients of the last fit
    pod_energy: Float[Array, ""]  # fit dtype: energy captured by the basis (1 if full)
    accepted: Int[Array, ""]  # surrogate steps kept
    rejected: Int[Array, ""]  # surrogate steps refused or rolled back
    fallbacks: Int[Array, ""]  # surrogate phases abandoned
    status: Int[Array, ""]  # reason of the last fallback (an `lgfjax.Status`)


@schedule_reads
class LGFState(NamedTuple):
    """State of `lgfjax.lgf` / `lgfjax.lgf_adam` with the fixed schedule.

    Every field is a small NamedTuple of array leaves (counters are int32 scalars;
    "fit dtype" is float64 if any parameter is float64, else float32):
    `schedule` (`CycleSchedule`), `base_state` (the base optimiser's, advanced by true
    steps only), `window` (the cycle's ``(K + 1, n)`` buffers), `model` (the learned
    flow), `check` (the `value_fn` acceptance test) and `info` (counters and the last
    fit, read by `lgfjax.diagnostics`).
    """

    schedule: CycleSchedule
    base_state: Any
    window: Window
    model: FlowModel
    check: ValueCheck
    info: LGFInfo


class FixedConfig(NamedTuple):
    """Static settings of the fixed schedule (Python values)."""

    fit: FitConfig
    retrain_interval: int
    dt: float
    max_step_ratio: float | None
    check_every: int | None
    check_tolerance: float
    adaptive: bool
    max_surrogate_steps: int


EAGER_WARNING = (
    "lgfjax: the fixed schedule's `update` runs eagerly here (its parameters are not "
    "traced), one JAX operation at a time: a second or more per update. Wrap the "
    "training step in `jax.jit`, as in the quickstart."
)


def make_transformation(
    *,
    base_init: Callable,
    base_update: Callable,
    surrogate_fn: Callable,
    record_gradients: bool,
    cfg: FixedConfig,
    buffer_dtype,
    elementwise_base: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """The fixed-schedule engine shared by `lgf` and `lgf_adam`.

    `elementwise_base`: the base runs in the engine's parameter layout (`lgfjax._layout`).

    `surrogate_fn(model, params, base_state, dtype)` returns ``(updates, base_state,
    ok)`` for one surrogate step; everything else is common.
    """
    K = cfg.fit.history_size
    checking = cfg.check_every is not None

    @compiled_init
    def init_fn(params):
        return init_in_layout(
            lambda p, base_state: init_state(p, base_state, cfg, record_gradients, buffer_dtype),
            base_init,
            params,
            elementwise_base,
        )

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        if params is None:
            raise ValueError("lgfjax transformations need `params` in `update`.")
        if checking and value_fn is None:
            raise ValueError(
                "`check_every` is set, so `update` needs the extra argument "
                "`value_fn` (params -> scalar loss), as for `optax.lbfgs`."
            )
        if all(_concrete(x) for x in jax.tree_util.tree_leaves(params)):
            warn_once("eager fixed", EAGER_WARNING)
        flat = is_flat(state.window.trajectory, params)

        def in_layout(updates, state, params, base_update, to_tree):
            user_value_fn = value_fn
            layout_value_fn = None if user_value_fn is None else lambda p: user_value_fn(to_tree(p))
            return core(updates, state, params, base_update, layout_value_fn, extra_args)

        return update_in_layout(
            in_layout, base_update, flat, updates, state, params, elementwise_base
        )

    def core(updates, state, params, base_update, value_fn, extra_args):
        sch = state.schedule
        cs = sch.cycle_step
        last_of_cycle = cs + 1 >= K + sch.surrogate_steps
        is_fit = (sch.phase != 0) & (cs == K)
        # 1. Record; 2. fit at the first surrogate update (both outside the switch).
        window = record_cycle(state.window, sch, params, updates, K)
        model, info, fit_status = fit_cycle(is_fit, state, window, cfg)
        # 3. The step: true, fit-then-surrogate, or surrogate. The buffers and the
        # basis stay out of the switch (its operands would be copied).
        light = state._replace(window=None, model=model._replace(basis=None), info=info)
        model_fn = _surrogate_model(model.basis, window, params, cfg.fit)

        def step_with(code):
            def branch(updates, light, params):
                step = surrogate_step(
                    light, params, code, model_fn, surrogate_fn, value_fn, last_of_cycle, cfg
                )
                return (optax.tree.cast_like(step[0], updates),) + step[1:]

            return branch

        def true_branch(updates, light, params):
            return true_step(updates, light, params, base_update, extra_args)

        def fit_branch(updates, light, params):
            if checking:
                light = start_check(light, params, fit_status, value_fn)
            return step_with(fit_status)(updates, light, params)

        branch = jnp.where(sch.phase == 0, 0, jnp.where(cs == K, 1, 2))
        new_updates, new, code = jax.lax.switch(
            branch, (true_branch, fit_branch, step_with(_i32(OK))), updates, light, params
        )
        # 4. The schedule.
        schedule, failed = next_cycle(sch, code, last_of_cycle, K, cfg)
        info = new.info._replace(
            status=jnp.where(failed, code, new.info.status).astype(jnp.int32),
            fallbacks=new.info.fallbacks + failed,
        )
        new_state = new._replace(
            schedule=schedule, window=window, model=new.model._replace(basis=model.basis)
        )
        return new_updates, new_state._replace(info=info)

    # (optax types a state as an array tree; our NamedTuples are such trees.)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # pyright: ignore


def init_state(params, base_state, cfg: FixedConfig, record_gradients, buffer_dtype) -> LGFState:
    """The state before the first update: a cycle starting with K true steps."""
    fit, K = cfg.fit, cfg.fit.history_size
    dtype = _fit_dtype(params)
    n = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
    r = n if fit.rank is None else fit.rank
    P = library_size(r, fit.degree, fit.include_bias)

    def buffer(rows, dtype=None):
        return rows_like(params, rows, dtype or buffer_dtype)

    zero_f = lambda: jnp.zeros((), dtype)  # noqa: E731
    checking = cfg.check_every is not None
    return LGFState(
        schedule=CycleSchedule(_i32(), _i32(), _i32(), _i32(cfg.retrain_interval - K)),
        base_state=base_state,
        window=Window(buffer(K + 1), buffer(K) if record_gradients else None),
        model=FlowModel(
            jnp.zeros((P, r), dtype), None if fit.rank is None else buffer(r, dtype), zero_f()
        ),
        check=ValueCheck(
            _i32(),
            zero_f(),
            (jax.tree_util.tree_map(jnp.array, params), base_state) if checking else None,
        ),
        info=zero_info(LGFInfo, dtype),
    )


def record_cycle(window: Window, sch: CycleSchedule, params, updates, K: int) -> Window:
    """The window with this update's iterate (and gradient) written, once or never.

    True steps record their iterate at row ``cycle_step``; the fit update records the
    last one at row K. Unlike a masked write, nothing is read when nothing is recorded.
    """
    cs = sch.cycle_step
    is_true = sch.phase == 0
    is_fit = (sch.phase != 0) & (cs == K)

    def write(buffers, leaves, row, when):
        def put(b):
            return jax.tree_util.tree_map(lambda t, x: t.at[row].set(x.astype(t.dtype)), b, leaves)

        return once_or_never(when, put, buffers)

    trajectory = write(window.trajectory, params, jnp.minimum(cs, K), (is_true & (cs < K)) | is_fit)
    gradients = window.gradients
    if gradients is not None:
        gradients = write(gradients, updates, jnp.minimum(cs, K - 1), is_true & (cs < K))
    return Window(trajectory, gradients)


def _last_step_length(trajectory, dtype):
    # The surrogate continues from the last recorded iterate, so the last true step
    # is the natural scale for how far one surrogate step may go.
    return optax.tree.norm(
        jax.tree_util.tree_map(lambda b: b[-1].astype(dtype) - b[-2].astype(dtype), trajectory)
    )


def fit_cycle(when, state: LGFState, window: Window, cfg: FixedConfig):
    """``(model, info, status)``: the flow fitted to the window if `when` (once or never).

    The trust region is `max_step_ratio` times the last true step; `status` is the
    fit's (`OK` when no fit ran).
    """
    model, info = state.model, state.info
    dtype = model.coefficients.dtype

    def do_fit(carry):
        fit = fit_flow(cfg.fit, window.trajectory, window.gradients, cfg.dt, dtype)
        if cfg.max_step_ratio is None:
            bound = jnp.asarray(jnp.inf, dtype)
        else:
            bound = cfg.max_step_ratio * _last_step_length(window.trajectory, dtype)
        return (
            fit.coefficients.astype(dtype),
            optax.tree.cast_like(fit.basis, carry[1]),
            bound.astype(dtype),
            fit.residual.astype(dtype),
            fit.active.astype(jnp.int32),
            fit.energy.astype(dtype),
            fit.status.astype(jnp.int32),
        )

    carry = (
        model.coefficients,
        model.basis,
        model.step_bound,
        info.fit_residual,
        info.active_terms,
        info.pod_energy,
        _i32(OK),
    )
    coefficients, basis, bound, residual, active, energy, status = once_or_never(
        when, do_fit, carry
    )
    info = info._replace(fit_residual=residual, active_terms=active, pod_energy=energy)
    return FlowModel(coefficients, basis, bound), info, status


def _surrogate_model(basis, window: Window, params, fit: FitConfig) -> Callable:
    """``coefficients -> SurrogateModel`` in the window's coordinates."""
    unravel = flat_unravel(params) if fit.rank is None else None
    origin = None
    if fit.center:
        origin = jax.tree_util.tree_map(lambda b: b[fit.history_size], window.trajectory)

    def model(coefficients):
        flow = PolynomialFlow(coefficients, fit.degree, fit.include_bias)
        return SurrogateModel(flow, basis, unravel, origin)

    return model


def true_step(updates, state: LGFState, params, base_update, extra_args):
    """The base's step; the base state advances and one gradient is counted."""
    new_updates, base_state = base_update(updates, state.base_state, params, **extra_args)
    info = state.info._replace(gradient_evaluations=state.info.gradient_evaluations + 1)
    new_updates = optax.tree.cast_like(new_updates, updates)
    return new_updates, state._replace(base_state=base_state, info=info), _i32(OK)


def guard_step(step, length, bound, solver_ok, code):
    """The status of a surrogate step: the first failure wins (`code` comes first)."""
    code = jnp.where(code != OK, code, jnp.where(solver_ok, OK, SOLVER_FAILED))
    code = jnp.where((code == OK) & ~jnp.isfinite(length), NONFINITE_STEP, code)
    return jnp.where((code == OK) & (length > bound), STEP_TOO_LARGE, code)


def surrogate_step(state, params, code, model_fn, surrogate_fn, value_fn, last_of_cycle, cfg):
    """One step of the learned flow with its guards (and the value check, if on).

    A refused step is zero and leaves the base state as it was; `code` is the fit's
    status on the fit update (a failed fit refuses the step).
    """
    dtype = state.model.coefficients.dtype
    model = model_fn(state.model.coefficients)
    step, base_state, solver_ok = surrogate_fn(model, params, state.base_state, dtype)
    code = guard_step(step, optax.tree.norm(step), state.model.step_bound, solver_ok, code)
    ok = code == OK
    step = optax.tree.where(ok, step, optax.tree.zeros_like(step))
    base_state = optax.tree.where(ok, base_state, state.base_state)
    if cfg.check_every is None:
        info = state.info._replace(
            accepted=state.info.accepted + ok, rejected=state.info.rejected + ~ok
        )
        return step, state._replace(base_state=base_state, info=info), code
    return value_check(state, params, step, base_state, code, value_fn, last_of_cycle, cfg)


def start_check(state: LGFState, params, fit_status, value_fn) -> LGFState:
    """At a fit: the reference loss (one `value_fn` call if the fit succeeded)."""
    dtype = state.model.coefficients.dtype
    ref = jax.lax.cond(
        fit_status == OK,
        lambda p: jnp.asarray(value_fn(p), dtype),
        lambda p: jnp.asarray(jnp.inf, dtype),
        params,
    )
    return state._replace(
        check=ValueCheck(_i32(), ref, (params, state.base_state)),
        info=state.info._replace(
            value_evaluations=state.info.value_evaluations + (fit_status == OK)
        ),
    )


def value_check(state, params, step, base_state, code, value_fn, last_of_cycle, cfg):
    """Every `check_every` surrogate steps and at the phase's end: keep or roll back.

    A check passes when ``loss <= reference + check_tolerance * |reference|``; a failed
    check (or a refused step) returns to the last accepted point (`ValueCheck.anchor`).
    """
    dtype = state.model.coefficients.dtype
    chk, info = state.check, state.info
    ok = code == OK
    since = chk.since_check + 1
    do_check = ok & ((since >= cfg.check_every) | last_of_cycle)
    candidate = optax.tree.add(params, step)
    loss = jax.lax.cond(
        do_check,
        lambda p: jnp.asarray(value_fn(p), dtype),
        lambda p: chk.reference_loss,
        candidate,
    )
    ref = chk.reference_loss
    passed = jnp.isfinite(loss) & (loss <= ref + cfg.check_tolerance * jnp.abs(ref))
    keep = do_check & passed
    roll_back = ~ok | (do_check & ~passed)
    anchor_params, anchor_base = chk.anchor
    step = optax.tree.where(roll_back, optax.tree.sub(anchor_params, params), step)
    base_state = optax.tree.where(roll_back, anchor_base, base_state)
    code = jnp.where(ok & roll_back, VALUE_REJECTED, code)
    check = ValueCheck(
        since_check=jnp.where(keep | roll_back, 0, since),
        reference_loss=jnp.where(keep, loss, ref),
        anchor=optax.tree.where(keep, (candidate, base_state), chk.anchor),
    )
    info = info._replace(
        value_evaluations=info.value_evaluations + do_check,
        accepted=info.accepted + jnp.where(keep, since, 0),
        rejected=info.rejected + jnp.where(roll_back, since, 0),
    )
    new_state = state._replace(base_state=base_state, check=check, info=info)
    return step, new_state, code


def next_cycle(sch: CycleSchedule, code, last_of_cycle, K: int, cfg: FixedConfig):
    """``(schedule, failed)`` after an update with status `code` (a pure rule).

    A failure ends the surrogate phase (the rest of the cycle takes true steps); with
    `adaptive`, a cycle without fallback doubles the next phase (up to
    `max_surrogate_steps`) and one with a fallback halves it (down to 1).
    """
    cs = sch.cycle_step
    failed = code != OK
    fell_back = failed | ((sch.phase == 0) & (cs >= K))
    next_cs = jnp.where(last_of_cycle, 0, cs + 1)
    next_phase = ((next_cs >= K) & ~fell_back).astype(jnp.int32)
    surrogate_steps = sch.surrogate_steps
    if cfg.adaptive:
        grown = jnp.minimum(2 * surrogate_steps, cfg.max_surrogate_steps)
        shrunk = jnp.maximum(surrogate_steps // 2, 1)
        surrogate_steps = jnp.where(
            last_of_cycle, jnp.where(fell_back, shrunk, grown), surrogate_steps
        )
    schedule = CycleSchedule(
        count=sch.count + 1,
        cycle_step=next_cs.astype(jnp.int32),
        phase=next_phase,
        surrogate_steps=surrogate_steps.astype(jnp.int32),
    )
    return schedule, failed
