"""The verified schedule: surrogate phases that last as long as the learned flow is right.

Every true step yields a pair (iterate, what the base measured there: its velocity
``update / dt``, or for Adam the gradient). The last `history_size` pairs live in a
ring buffer, so a fit needs no contiguous window and every true step is data. The first
true step after a phase is also a free test of the model: the flow's prediction there
is compared with what the base measured, and the loss (`value`) with the loss before
the phase (`judge`; under mini-batch noise, see `lgfjax._noise`).

- agreement: refit with the new pair and resume at once, the next phase twice as long;
- disagreement: take `refresh` more true steps, refit, and halve the phase length (with
  `drift` or `resume_on_drop`, a phase that lowered the loss refits at once instead);
- a rise of the loss beyond its noise (without `value`: a prediction farther from the
  truth than standing still): undo the phase, then as for disagreement;
- a change of the loss within its noise: keep the phase and its length;
- a true step whose gradient is not finite is skipped; if the loss there is not finite
  either, the iterate returns to the last true iterate (`retreat`) and the following
  true steps are halved until they land well (`back_off`).

`VerifiedConfig`'s flags (`drift` for `lgf`; `restore_state`, `target_basis`,
`resume_on_drop`, `length_from_error` for `lgf_adam`) and their measured reasons are in
docs/design.md. The engine (`make_verified`) runs one `verified_update` in the parameter
layout of `lgfjax._layout`, as five steps with explicit arguments: `take_step` (the
base's true step, or one surrogate step with its guards), `judge`, `record` (the ring
buffer), `schedule_step` (the pure schedule rule) and `fit_model` (the refit).

Constraints it keeps: the ``(K, n)`` buffers never pass through a `lax.cond` or
`lax.switch`, and no operation reads them before the loop that writes them in place (XLA
would copy them on every update; `tests/test_scale.py` checks the compiled step); the
model and anchor are written after their reads (`tied`); one array per counter, so
states can be donated; shapes are fixed at `init`; on CPU, STLSQ solves its targets one
at a time.
"""

import dataclasses
import functools
import operator
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._best import Best, back_to_best, init_best, keep_best, keep_best_point, watch
from ._engine import (
    SurrogateModel,
    _fit_dtype,
    _i32,
    flat_unravel,
    once_or_never,
    rows_like,
    schedule_reads,
    tied,
    zero_info,
)
from ._fit import FitConfig, fit_pairs
from ._flow import PolynomialFlow
from ._layout import compiled_init, init_in_layout, is_flat, update_in_layout
from ._library import library_size
from ._noise import (
    NOISE_FLOOR,
    NOISY_HORIZON,
    PAIRED_MIN_LENGTH,
    RESAMPLED,
    ROUNDING,
    SAME,
    UNKNOWN,
    LossNoise,
    Z,
    agreement_tolerance,
    init_loss_noise,
    mean_and_error,
    measurement_noise,
    same_batch,
    scalar_error,
    track,
    verdict,
)
from ._pod import tree_gram, tree_lift, tree_project
from ._sharding import gathered
from ._status import (
    FLOW_DISAGREED,
    LOSS_INCONCLUSIVE,
    LOSS_ROSE,
    NONFINITE_GRADIENT,
    NONFINITE_STEP,
    OK,
    RETURNED_TO_BEST,
    SOLVER_FAILED,
    STEP_TOO_LARGE,
)
from ._validate import _concrete, warn_once


class Schedule(NamedTuple):
    phase: Int[Array, ""]  # 0: the next update is a true step; 1: surrogate
    todo: Int[Array, ""]  # steps left in this phase (true steps before a fit, or surrogate)
    length: Int[Array, ""]  # length of the next surrogate phase
    horizon: Int[Array, ""]  # time of one surrogate step, in units of `dt` (a power of 2)
    verify: Bool[Array, ""]  # the next true step judges the phase that just ended
    count: Int[Array, ""]  # updates applied
    backoff: Int[Array, ""]  # true steps are scaled by 2**-backoff (after retreats)
    probing: Bool[Array, ""]  # the last true step was so scaled: the next one tests it


class Buffers(NamedTuple):
    points: PyTree[Array]  # leaves (K, *shape): iterates where true steps were taken
    targets: PyTree[Array]  # leaves (K, *shape): the base's velocity (or gradient) there
    head: Int[Array, ""]  # next row to write
    filled: Int[Array, ""]  # rows holding data, up to K
    stamps: Int[Array, " K"]  # update count at which each row was recorded (-1: empty)


class Model(NamedTuple):
    coefficients: Float[Array, "P r"]  # fit dtype
    basis: PyTree[Array] | None  # leaves (r, *shape), or None in full space
    origin: PyTree[Array] | None  # where the phase began (POD coordinates zero)
    step_bound: Float[Array, ""]  # trust region: longest surrogate step accepted
    drift: PyTree[Array] | None  # last measurement outside the basis (None without `drift`)
    # with `drift`: |drift|^2 + 0 * sum(basis), NaN unless both are finite; a surrogate
    # step then measures its length in the subspace, |dz|^2 + t^2 |drift|^2 (`_lgf`)
    drift_sq: Float[Array, ""] | None
    out_basis: PyTree[Array] | None  # with `target_basis`: POD basis of the targets
    noise: Float[Array, ""]  # relative noise of the recorded measurements (`_noise`)


class Anchor(NamedTuple):
    params: PyTree[Array]  # where the current phase began
    base_state: Any
    loss: Float[Array, ""]  # the last loss seen before the phase (inf if unknown)
    loss_error: Float[Array, ""]  # its standard error (0: exact, or unknown)


class VerifiedInfo(NamedTuple):
    gradient_evaluations: Int[Array, ""]  # true gradients consumed
    value_evaluations: Int[Array, ""]  # value_fn calls (the judging step's paired loss)
    fit_residual: Float[Array, ""]
    active_terms: Int[Array, ""]
    pod_energy: Float[Array, ""]
    accepted: Int[Array, ""]  # surrogate steps kept
    rejected: Int[Array, ""]  # surrogate steps refused by a guard
    fallbacks: Int[
        Array, ""
    ]  # events that cut a phase short: a guard, a disagreement, an undo, a failed fit
    status: Int[Array, ""]  # reason of the last fallback (`lgfjax.Status`)
    verifications: Int[Array, ""]  # phases judged by a true step
    verified: Int[Array, ""]  # of those, how many the true step confirmed
    inconclusive: Int[Array, ""]  # of those, how many changed the loss within its noise
    flow_error: Float[Array, ""]  # relative error of the flow at the last judgement
    ungated: Int[Array, ""]  # surrogate steps handed a non-zero gradient (wasted work)


@schedule_reads
class VerifiedState(NamedTuple):
    """State of `lgfjax.lgf` / `lgfjax.lgf_adam` with ``schedule="verified"``."""

    schedule: Schedule
    base_state: Any
    buffers: Buffers
    model: Model
    anchor: Anchor
    info: VerifiedInfo
    noise: LossNoise
    best: Best


class VerifiedConfig(NamedTuple):
    """Static settings of the verified schedule (Python values)."""

    fit: FitConfig  # rank here is the requested one; "auto" is resolved at init
    max_step_ratio: float | None
    verify_tolerance: float
    first_length: int
    max_length: int
    max_horizon: int  # longest surrogate step, in units of `dt` (1: never outrun the base)
    refresh: int
    drift: bool = False  # hold the measurement's part outside the POD basis over a phase
    # Options `lgf_adam` turns on (see the module notes):
    restore_state: bool = False  # the judging true step starts from a restored base state
    # the flow's output in a POD basis of the measurements, and its error judged against
    # the whole measurement (outside that basis too), not its projection
    target_basis: bool = False
    resume_on_drop: bool = False  # a disagreement after a loss drop refits and resumes at once
    # the next phase length from the judged error, length * tol / err (clipped to
    # [length / 2, 2 length]), for judged phases that were not undone
    length_from_error: bool = False
    # The time that turns a recorded target into a step (`dt` for velocity targets;
    # None for gradients): a flow error within the parameters' rounding is no error.
    step_time: float | None = None


def _surrogate_model(model: Model, degree, include_bias, params) -> SurrogateModel:
    unravel = flat_unravel(params) if model.basis is None else None
    flow = PolynomialFlow(model.coefficients, degree, include_bias)
    return SurrogateModel(
        flow,
        model.basis,
        unravel,
        model.origin,
        model.drift,
        model.out_basis,
        model.noise,
        model.drift_sq,
    )


UNGATED_WARNING = (
    "lgfjax: a surrogate step was handed a non-zero gradient, so the objective ran "
    "although no true step was due and nothing was saved. Take gradients with "
    "`lgfjax.value_and_grad` / `lgfjax.filter_value_and_grad` (or gate them on "
    "`lgfjax.needs_gradient(state)`); `lgfjax.diagnostics(state).ungated_gradients` "
    "counts such steps."
)


def _simulated_devices() -> bool:
    """Whether this process runs several CPU devices (``--xla_force_host_platform_
    device_count``, or multi-process CPU), where collectives run on XLA's CPU runtime.

    There, a step whose conditionals hold collectives (sharded parameters) can deadlock
    when nothing orders its execution (jaxlib 0.10: 2 of 18 runs of the sharding guide's
    example under load, none in 26 with a host callback in the step). Such steps keep
    the ungated-gradient warning as a host callback, which orders them; everywhere else
    the step has none, so that JAX's persistent compilation cache can store it.
    """
    return jax.default_backend() == "cpu" and jax.device_count() > 1


NO_VALUE_WARNING = (
    "lgfjax: the verified schedule's `update` got no `value=` (the loss at `params`, "
    "which `lgfjax.value_and_grad` returns): a surrogate phase that raised the loss "
    "cannot be undone, and phases are judged by the flow's agreement alone. Pass "
    "`opt.update(grads, state, params, value=loss)`."
)


def _host_warning():
    """``warn(flag)``: the ungated-gradient warning from inside the compiled step, once
    per optimiser (only with `_simulated_devices`)."""
    warned = []

    def host(flag):
        if not warned and bool(np.any(flag)):
            warned.append(True)
            warnings.warn(UNGATED_WARNING, UserWarning, stacklevel=1)

    def warn(flag):
        jax.lax.cond(flag, lambda f: jax.debug.callback(host, f), lambda f: None, flag)

    return warn


def _warn_if_ungated(before, after) -> None:
    """The ungated-gradient `UserWarning`, if `after`'s counter grew (concrete states only).

    No host callback is compiled into the step for this (but see `_simulated_devices`):
    JAX's persistent compilation cache refuses programs with host callbacks, and a
    cached step is worth more than a warning inside `jit`. Eager updates warn here;
    `lgfjax.diagnostics` warns too.
    """
    if _simulated_devices():
        return  # the compiled step warns itself
    grew = after.info.ungated > before.info.ungated
    if _concrete(grew) and bool(grew):
        warnings.warn(UNGATED_WARNING, UserWarning, stacklevel=3)


def _all_finite(*trees):
    """Whether every entry of `trees` (of one structure and leaf shapes) is finite.

    One floating-point sum per leaf position of ``x - x`` (NaN exactly when some ``x``
    is not finite; XLA does not fold it, as that would change NaN), so that the check
    is one fused read of its operands: a boolean reduction would write an ``n``-sized
    mask first, and ``x * 0`` an ``n``-sized array of zeros (XLA CPU's reduction kernel
    takes the broadcast constant as an operand: 1.1 ms of a 10 ms `lgf_adam` true step
    at n = 1e6). Integer leaves are always finite.
    """

    def zero_or_nan(*xs):
        xs = [x for x in xs if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
        if not xs or not all(jnp.size(x) for x in xs):
            return jnp.zeros((), jnp.float32)
        parts = (jnp.real(x) - jnp.real(x) + (jnp.imag(x) - jnp.imag(x)) for x in xs)
        total = functools.reduce(operator.add, parts)
        return jnp.sum(total, dtype=jnp.float32)

    sums = jax.tree.leaves(jax.tree.map(zero_or_nan, *trees))
    return jnp.isfinite(functools.reduce(operator.add, sums, jnp.zeros((), jnp.float32)))


def _relative_error(predicted, measured):
    diff = optax.tree.norm(optax.tree.sub(predicted, measured))
    size = optax.tree.norm(measured)
    return diff / jnp.where(size > 0, size, 1.0)


def make_verified(
    *,
    base_init: Callable,
    base_update: Callable,
    surrogate_fn: Callable,
    target_fn: Callable,
    cfg: VerifiedConfig,
    buffer_dtype,
    restore_fn: Callable | None = None,
    elementwise_base: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """The verified-schedule engine shared by `lgf` and `lgf_adam`.

    `elementwise_base`: the base runs in the engine's parameter layout (`lgfjax._layout`;
    a front-end's own elementwise base), not on the user's pytree.

    `restore_fn(anchor_state, state)` (with ``cfg.restore_state``) is the base state
    the judging true step starts from, given the state where the phase began and the
    state the surrogate phase left (default: the former).

    `target_fn(grads, true_update)` is what a true step measured (the quantity the flow
    models); `surrogate_fn(model, params, base_state, dtype)` is one surrogate step.
    """

    @compiled_init
    def init_fn(params):
        return init_in_layout(
            lambda p, base_state: init_state(p, base_state, cfg, buffer_dtype),
            base_init,
            params,
            elementwise_base,
        )

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        if params is None:
            raise ValueError("lgfjax transformations need `params` in `update`.")
        if value is None:
            warn_once("no value", NO_VALUE_WARNING)
        if extra_args:  # may hold callables: no jit boundary of our own
            step, new_state = update(updates, state, params, value, extra_args)
            _warn_if_ungated(state, new_state)
            return step, new_state
        # One compiled program per transformation: eager calls hit the cache instead of
        # re-tracing the loops, the conditionals and diffrax at every step (seconds);
        # inside a user's jit this is inlined.
        step, new_state = jitted_update(updates, state, params, value)
        _warn_if_ungated(state, new_state)
        return step, new_state

    def update(updates, state, params, value, extra_args):
        flat = is_flat(state.anchor.params, params)
        value_fn = extra_args.get("value_fn")

        def in_layout(u, s, p, b, to_tree):
            # `value_fn` takes the user's pytree; the engine passes its own layout.
            layout_value_fn = None if value_fn is None else lambda q: value_fn(to_tree(q))
            return core(u, s, p, value, extra_args, b, layout_value_fn)

        return update_in_layout(
            in_layout,
            base_update,
            flat,
            updates,
            state,
            params,
            elementwise_base,
        )

    host_warning = _host_warning()
    core = functools.partial(
        verified_update,
        surrogate_fn=surrogate_fn,
        target_fn=target_fn,
        cfg=cfg,
        restore_fn=restore_fn,
        host_warning=host_warning,
    )

    jitted_update = jax.jit(lambda u, s, p, v: update(u, s, p, v, {}))
    # (optax types a state as an array tree; our NamedTuples are such trees.)
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # pyright: ignore


def verified_update(
    updates,
    state,
    params,
    value,
    extra_args,
    base_update,
    value_fn,
    *,
    surrogate_fn,
    target_fn,
    cfg,
    restore_fn,
    host_warning,
):
    """One update of the verified engine, in the engine's layout (`make_verified`)."""
    K = cfg.fit.history_size
    sch, model, info = state.schedule, state.model, state.info
    dtype = model.coefficients.dtype
    is_true = sch.phase == 0

    # 0. A true step at a new best point copies that point and the base state there
    # first, before the step updates the state in place (read after it, the state would
    # be copied on every update). The gradient's finiteness is checked here, once.
    grads_finite = jax.lax.cond(is_true, _all_finite, lambda u: jnp.asarray(False), updates)
    new_best = is_true & grads_finite & (mean_loss(value, dtype) < state.best.loss)
    best_point, params, base_state = keep_best_point(state.best, new_best, params, state.base_state)
    never = state.buffers.head < 0
    base_state = tied(base_state, (best_point.params, best_point.base_state), never)
    state = state._replace(base_state=base_state, best=best_point)
    # 1. The step: the base's true step (skipped if not finite), or the learned flow.
    step, base_state, code, ungated = take_step(
        updates, state, params, base_update, surrogate_fn, cfg, extra_args, restore_fn, grads_finite
    )
    if _simulated_devices():
        host_warning(ungated)
    skipped = is_true & (code == NONFINITE_GRADIENT)
    took = is_true & ~skipped  # a true step that reached the parameters
    backoff, probing, scale = back_off(sch, took)
    # 2. The first true step after a phase judges it, for free. What the true step
    # measured (from its step before `back_off`'s power-of-two scale, exactly) is
    # computed where it is used (the judgement, the record, the fit), each taken only
    # on true steps: a surrogate step never pays an O(n) pass for it.
    true_step = step

    def measured():
        return target_fn(updates, jax.tree.map(lambda u: u / scale.astype(u.dtype), true_step))

    judging = is_true & sch.verify
    found = judge(
        judging, sch.length, model, params, measured, value, value_fn, state, cfg, new_best
    )
    err, agree = found.error, found.agree
    # A kept phase samples the loss noise too, unless resampled (see `_noise.track`).
    resampled = found.resampled == RESAMPLED
    kept = judging & ~found.undo & ~resampled
    loss, loss_error, noise = observe(value, state.noise, took, sch.count, dtype, kept)
    noise = noise._replace(resampled=found.resampled, checked=found.checked)
    # A stay far above the best true loss ends back at the best true point (`_best`).
    go_back, above = watch(state.best, took, loss, K)
    # An undefined loss sends the iterate back to the last true iterate (below), which
    # beats undoing to an anchor that may itself be the undefined point.
    lost = is_lost(skipped, value, state.buffers)
    undo = found.undo & ~lost & ~go_back
    step, base_state = undo_phase(undo, state.anchor, params, step, base_state)
    step, base_state = back_to_best(go_back, state.best, params, step, base_state)
    undo = undo | go_back
    disagree = judging & ~agree
    # With `drift`, a phase that lowered the loss keeps going after a refit at once.
    # After a retreat the learned flow takes over at once (the base's own step just
    # overshot into an undefined loss: repeating it would only do so again).
    resume = lost
    if (cfg.drift or cfg.resume_on_drop) and value is not None:
        resume = resume | (disagree & ~undo & found.lowered)
    # Under noise, a disagreement that the loss does not confirm is mostly the noise of
    # one measurement: refit at once rather than spend fresh true steps first. (Also on
    # batches known to be resampled, where the measured noise is low: paper's deep
    # energy 0.604x -> 0.592x, but the PINN's Adam runs then spiked, up to 3,900x.)
    noisy = state.model.noise > NOISE_FLOOR
    resume = resume | (disagree & ~undo & noisy & (found.inconclusive | found.lowered))
    code = jnp.where(
        skipped, code, jnp.where(undo, LOSS_ROSE, jnp.where(disagree, FLOW_DISAGREED, code))
    )
    code = jnp.where(go_back, RETURNED_TO_BEST, code)
    # 3. Record the pair (never a point that is being undone, nor a skipped step), then
    # read the buffer for a retreat: in-place writes come before reads (see `tied`).
    buffers = record(state.buffers, took & ~undo, params, measured, sch.count)
    step = retreat(lost, buffers, params, step)
    # 4. The schedule; 5. the fit, once or never, where the next step starts.
    nxt = schedule_step(
        sch, cfg, code, agree, undo, buffers.filled >= K, resume, err, found.inconclusive, resampled
    )
    # After a return, the phases start short again.
    nxt = nxt._replace(
        length=jnp.where(go_back, 1, nxt.length).astype(jnp.int32),
        horizon=jnp.where(go_back, 1, nxt.horizon).astype(jnp.int32),
    )
    # (A new best excludes a return: its loss is below the best, a return's above.)
    best = keep_best(best_point, new_best, loss, loss_error, above, go_back)
    # After a return, the next phase's reference loss is the best one's. (After an undo
    # it stays the loss of the point undone.)
    loss = jnp.where(go_back, state.best.loss, loss)
    loss_error = jnp.where(go_back, state.best.error, loss_error)
    # The fit writes the model and the anchor in place: ordered after their reads.
    model, anchor = tied((model, state.anchor), (step, base_state, err, code), buffers.head < 0)
    model, anchor, fit_info = fit_model(
        nxt.want_fit,
        model,
        info,
        buffers,
        Anchor(params, base_state, loss, loss_error),
        anchor,
        step,
        measured,
        cfg,
        lost,
    )
    fit_ok = nxt.want_fit & (fit_info.status == OK)
    fit_failed = nxt.want_fit & (fit_info.status != OK)
    code = jnp.where(fit_failed, fit_info.status, code)
    failed = nxt.failed | fit_failed
    todo = jnp.where(fit_ok, nxt.length, nxt.todo)
    todo = jnp.where(nxt.phase_over | fit_failed, cfg.refresh, todo)
    new_state = VerifiedState(
        schedule=Schedule(
            phase=jnp.where(fit_ok, 1, jnp.where(nxt.phase_over, 0, sch.phase)).astype(jnp.int32),
            todo=todo.astype(jnp.int32),
            length=nxt.length,
            horizon=nxt.horizon,
            verify=nxt.phase_over,
            count=sch.count + 1,
            backoff=jnp.where(lost, jnp.minimum(backoff + 1, MAX_BACKOFF), backoff).astype(
                jnp.int32
            ),
            probing=probing & ~lost,
        ),
        base_state=base_state,
        buffers=buffers,
        model=model,
        anchor=anchor,
        info=count_update(fit_info, info, is_true, code, failed, judging, found, ungated),
        noise=noise,
        best=best,
    )
    # Every read of `params` above (the loops, the conditionals) comes before the
    # caller's in-place ``params + step`` once `step` depends on their results; else XLA
    # copies the parameters on every update.
    step = tied(step, (buffers.head, fit_info.status, err, code), buffers.head < 0)
    return optax.tree.cast_like(step, updates), new_state


def mean_loss(value, dtype):
    """The mean loss of `value` (inf if unknown or not finite)."""
    if value is None:
        return jnp.asarray(jnp.inf, dtype)
    loss = mean_and_error(value, dtype)[0]
    return jnp.where(jnp.isfinite(loss), loss, jnp.inf)


def observe(value, noise: LossNoise, is_true, count, dtype, kept):
    """``(loss, standard error, noise)``: this update's mean loss (inf if unknown), its
    standard error, and the loss-noise tracker after it (`lgfjax._noise`)."""
    if value is None:
        return jnp.asarray(jnp.inf, dtype), jnp.zeros((), dtype), noise
    loss, error = mean_and_error(value, dtype)
    noise = track(noise, is_true, count, loss, kept)
    error = jnp.where(error > 0, error, scalar_error(noise))
    return jnp.where(jnp.isfinite(loss), loss, jnp.inf), error, noise


def count_update(fit_info, info, is_true, code, failed, judging, found, ungated):
    """`VerifiedInfo` after an update: the fit's fields, and every counter advanced."""
    kept = ~is_true & (code == OK)
    status = jnp.where(failed, code, jnp.where(found.inconclusive, LOSS_INCONCLUSIVE, info.status))
    return fit_info._replace(
        gradient_evaluations=info.gradient_evaluations + is_true,
        accepted=info.accepted + kept,
        rejected=info.rejected + (~is_true & (code != OK)),
        fallbacks=info.fallbacks + failed,
        status=status.astype(jnp.int32),
        verifications=info.verifications + judging,
        verified=info.verified + found.agree,
        inconclusive=info.inconclusive + found.inconclusive,
        value_evaluations=info.value_evaluations + found.value_calls,
        flow_error=jnp.where(judging, found.error, info.flow_error),
        ungated=info.ungated + ungated,
    )


def _copy(tree):
    return jax.tree_util.tree_map(lambda x: jnp.array(x) if isinstance(x, jax.Array) else x, tree)


def init_state(params, base_state, cfg: VerifiedConfig, buffer_dtype) -> VerifiedState:
    """The state before the first update: K true steps to take, empty buffers."""
    fit_cfg, K = cfg.fit, cfg.fit.history_size
    dtype = _fit_dtype(params)
    n = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
    rank = fit_cfg.rank
    if rank == "auto":
        rank = max(1, min(n, K // 2))
    r = n if rank is None else rank
    P = library_size(r, fit_cfg.degree, fit_cfg.include_bias)

    def buffer(rows, leaf_dtype=None):
        return rows_like(params, rows, leaf_dtype or buffer_dtype)

    zero_f = lambda: jnp.zeros((), dtype)  # noqa: E731
    return VerifiedState(
        schedule=Schedule(
            _i32(0),
            _i32(K),
            _i32(cfg.first_length),
            _i32(1),
            jnp.asarray(False),
            _i32(),
            _i32(),
            jnp.asarray(False),
        ),
        base_state=base_state,
        buffers=Buffers(buffer(K), buffer(K), _i32(), _i32(), jnp.full((K,), -1, jnp.int32)),
        model=Model(
            coefficients=jnp.zeros((P, r), dtype),
            basis=None if rank is None else buffer(r, dtype),
            origin=(
                jax.tree_util.tree_map(jnp.array, params)
                if rank is not None and fit_cfg.center
                else None
            ),
            step_bound=zero_f(),
            drift=(
                jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, dtype=dtype), params)
                if cfg.drift and rank is not None
                else None
            ),
            drift_sq=zero_f() if cfg.drift and rank is not None else None,
            out_basis=buffer(r, dtype) if cfg.target_basis and rank is not None else None,
            noise=zero_f(),
        ),
        # Copies, not the arrays `params` and `base_state` hold: a state can be donated.
        anchor=Anchor(_copy(params), _copy(base_state), zero_f() + jnp.inf, zero_f()),
        info=zero_info(VerifiedInfo, dtype),
        noise=init_loss_noise(dtype),
        best=init_best(params, base_state, dtype, _copy),
    )


def take_step(
    updates, state, params, base_update, surrogate_fn, cfg, extra_args, restore_fn, grads_finite
):
    """The base's true step or one surrogate step: ``(step, base_state, status, ungated)``.

    A non-finite gradient (or base update) never reaches the parameters: the true
    step is skipped as by `optax.apply_if_finite`, the base state stays, and the run
    resumes when the gradients are finite again. A surrogate step that fails a guard
    (solver, finiteness, trust region) is zero and leaves the base state as it was.
    """
    sch, model = state.schedule, state.model
    dtype = model.coefficients.dtype

    def true_step(base_state):
        new_updates, new_base = base_update(updates, base_state, params, **extra_args)
        finite = grads_finite & _all_finite(new_updates)
        # Skipped if not finite, scaled after retreats (`back_off`): one select.
        scale = back_off(sch, finite)[2]
        new_updates = jax.tree_util.tree_map(
            lambda u, g: jnp.where(finite, (u * scale.astype(u.dtype)).astype(g.dtype), 0),
            new_updates,
            updates,
        )
        new_base = optax.tree.where(finite, new_base, base_state)
        code = jnp.where(finite, OK, NONFINITE_GRADIENT).astype(jnp.int32)
        return new_updates, new_base, code, jnp.asarray(False)

    def surrogate_step(base_state):
        sm = _surrogate_model(model, cfg.fit.degree, cfg.fit.include_bias, params)
        # With `max_horizon` 1 the span is the static 1: the solve's length is known.
        span = sch.horizon if cfg.max_horizon > 1 else 1
        bound = model.step_bound * sch.horizon.astype(dtype)

        def gate(length, solver_ok):
            # The surrogate decides where to measure `length` (in the subspace, where it
            # can) and returns a zero step unless the code is OK.
            code = jnp.where(solver_ok, OK, SOLVER_FAILED)
            code = jnp.where((code == OK) & ~jnp.isfinite(length), NONFINITE_STEP, code)
            return jnp.where((code == OK) & (length > bound), STEP_TOO_LARGE, code)

        step, new_base, code = surrogate_fn(sm, params, base_state, dtype, span, gate=gate)
        new_base = optax.tree.where(code == OK, new_base, base_state)
        # The objective ran although no true step was due (`lgfjax.value_and_grad` was
        # not used): nothing is saved, and the state says so.
        ungated = optax.tree.norm(updates) != 0
        return optax.tree.cast_like(step, updates), new_base, code.astype(jnp.int32), ungated

    base_state = state.base_state
    if cfg.restore_state:
        # The judging true step starts from a restored base state (Adam's moments as
        # they were where the phase began), as the front-end's `restore_fn` decides
        # (once or never: other updates read nothing of the anchor for it).
        def restore(base_state):
            anchor_state = state.anchor.base_state
            return anchor_state if restore_fn is None else restore_fn(anchor_state, base_state)

        base_state = once_or_never((sch.phase == 0) & sch.verify, restore, base_state)
    return jax.lax.cond(sch.phase == 0, true_step, surrogate_step, base_state)


class Verdict(NamedTuple):
    """What a judging true step found (all False / zero when it does not judge)."""

    error: Float[Array, ""]  # relative error of the flow against the measurement
    agree: Bool[Array, ""]  # within the tolerance (widened by the measurements' noise)
    undo: Bool[Array, ""]  # the loss rose beyond its noise: back to the phase's start
    inconclusive: Bool[Array, ""]  # the loss changed within its noise: shorter next phase
    lowered: Bool[Array, ""]  # the loss fell by more than its noise
    value_calls: Int[Array, ""]  # value_fn evaluations spent (the paired loss)
    resampled: Int[Array, ""]  # what is known of the batches after it (`_noise.UNKNOWN`...)
    checked: Int[Array, ""]  # true gradients counted at the last check of `resampled`


def judge(judging, length, model: Model, params, measure, value, value_fn, state, cfg, new_best):
    """The `Verdict` on the phase a true step ends.

    `measure()` is what the true step measured (called only when `judging`).

    The flow error is relative, in the model's own coordinates: a POD model can only be
    right about the part of the measurement inside its subspace (the rest is what the
    fit left out from the start, and the loss judges its effect). It agrees within
    `verify_tolerance`, or within the measurements' noise where that is larger
    (`lgfjax._noise`). A rise of the loss (`value`, a scalar or per-sample losses) over
    the phase beyond its standard error undoes it. With `value_fn`, a phase of at least
    `PAIRED_MIN_LENGTH` steps (`length`) that this leaves in doubt has its start
    evaluated on the judging step's batch (a paired comparison, one value evaluation).
    Without `value`, a prediction farther from the truth than standing still (error
    > 1) undoes it.

    The first verdict that agrees but is inconclusive (and is not itself at a `new_best`
    point, already written into `state.best`) also evaluates the best true point
    (`state.best`) on this batch (one more value evaluation): its loss there is the one
    recorded at it if the objective is one fixed function, else the batches are
    resampled (`_noise.same_batch`). Only a run known to be resampled lengthens its steps
    on such verdicts (`schedule_step`); a run known to minimise one fixed objective has
    no loss noise from then on, so its rises (Adam's own oscillation, read as noise
    until then) are judged as rises. Resampled is final. One fixed objective is checked
    again on a rise (the verdict it changes), at most once per doubling of the true
    gradients since the last check: batch noise too small to tell early in a run can
    grow relative to the loss later (a digits classifier read one fixed objective after
    17 gradients, then undid most of its phases: 0.54x to 0.93x of Adam's evaluations).
    """
    dtype = model.coefficients.dtype
    anchor, noise, best = state.anchor, state.noise, state.best

    def flow_error(_):
        measured = measure()
        sm = _surrogate_model(model, cfg.fit.degree, cfg.fit.include_bias, params)
        predicted = sm.flow(0.0, sm.project(params, dtype))
        if model.basis is None:
            seen = ravel_pytree(gathered(measured))[0].astype(dtype)
        else:
            seen = tree_project(
                model.basis if model.out_basis is None else model.out_basis, measured, dtype
            )
        if cfg.target_basis and model.basis is not None:
            # |U p - g| / |g| with U orthonormal: the out-of-basis part counts as error.
            inside = optax.tree.norm(optax.tree.sub(predicted, seen))
            total = optax.tree.norm(measured).astype(dtype)
            outside2 = jnp.maximum(total**2 - optax.tree.norm(seen) ** 2, 0)
            size = jnp.where(total > 0, total, 1.0)
            return (jnp.sqrt(inside**2 + outside2) / size).astype(dtype), jnp.asarray(False)
        err = _relative_error(predicted, seen).astype(dtype)
        if cfg.step_time is None:
            return err, jnp.asarray(False)
        # The predicted and the measured step differ by less than the parameters'
        # rounding: a converged base's steps are rounding, which no flow predicts.
        miss = optax.tree.norm(optax.tree.sub(predicted, seen)) * cfg.step_time
        size = optax.tree.norm(params)
        rounding = ROUNDING * jnp.finfo(dtype).eps * size
        return err, (miss <= rounding) & jnp.isfinite(size)

    err, within_rounding = jax.lax.cond(
        judging, flow_error, lambda _: (jnp.zeros((), dtype), jnp.asarray(False)), None
    )
    err = jnp.where(jnp.isfinite(err), err, jnp.inf)
    false, calls = jnp.asarray(False), jnp.zeros((), jnp.int32)
    resampled = noise.resampled
    if value is None:
        agree = judging & ((err <= cfg.verify_tolerance) | within_rounding)
        return Verdict(
            err, agree, judging & ~(err <= 1.0), false, false, calls, resampled, noise.checked
        )
    loss, loss_error = mean_and_error(value, dtype)
    own = jnp.where(loss_error > 0, loss_error, scalar_error(noise))
    # A run found to minimise one fixed objective has no loss noise: its rises (Adam's
    # oscillation, a log-loss's long steps near its minimum) are rises.
    fixed = noise.resampled == SAME
    own = jnp.where(fixed, 0, own)
    # The measurements' noise widens the tolerance only where the loss is noisy too: a
    # deterministic descent's rough measurements (projected or clipped steps) are not
    # noise (topology: the default no longer reached its target with it).
    noise_level = jnp.where(own > 0, model.noise, 0)
    agree = judging & (
        (err <= agreement_tolerance(cfg.verify_tolerance, noise_level)) | within_rounding
    )
    # Losses from different batches: their standard errors add.
    error = jnp.where(fixed, 0, jnp.sqrt(own**2 + anchor.loss_error**2))
    reference = anchor.loss
    if value_fn is not None:
        # Where that leaves a phase of some length in doubt, its start is evaluated on
        # this step's batch: a paired difference, for one value evaluation.
        rose, inconclusive = verdict(loss - reference, error, loss, reference, dtype)
        pair = judging & (length >= PAIRED_MIN_LENGTH) & (rose | inconclusive)

        def paired(_):
            start = jnp.asarray(value_fn(anchor.params), dtype)
            diff = jnp.asarray(value, dtype) - start
            if diff.ndim == 0:
                return jnp.mean(start), jnp.zeros((), dtype)
            return jnp.mean(start), mean_and_error(diff, dtype)[1]

        reference, error = jax.lax.cond(pair, paired, lambda _: (reference, error), None)
        calls = pair.astype(jnp.int32)
    difference = loss - reference
    rose, inconclusive = verdict(difference, error, loss, reference, dtype)
    lowered = judging & (difference < -Z * error)
    checked = noise.checked
    if value_fn is not None:
        # Where it matters (the rule it decides): see the docstring.
        known = jnp.isfinite(best.loss)
        probe = agree & inconclusive & (resampled == UNKNOWN) & known
        gradients = state.info.gradient_evaluations
        recheck = judging & rose & fixed & known & (gradients >= 2 * noise.checked)
        probe = (probe | recheck) & ~new_best

        def again(_):
            here = jnp.mean(jnp.asarray(value_fn(best.params), dtype))
            return same_batch(here, best.loss.astype(dtype), dtype)

        resampled = jax.lax.cond(probe, again, lambda _: resampled, None)
        checked = jnp.where(probe, gradients, checked).astype(jnp.int32)
        calls = calls + probe.astype(jnp.int32)
    return Verdict(
        err, agree, judging & rose, judging & inconclusive, lowered, calls, resampled, checked
    )


def is_lost(skipped, value, buf: Buffers):
    """Whether a skipped true step (non-finite gradient) found the loss here not finite.

    Then the point itself is bad (e.g. a step of the base overshot into a region where
    the objective is undefined), and `retreat` returns to the last recorded true
    iterate, whose gradient was finite. Without `value` there is no retreat.
    """
    if value is None:
        return jnp.asarray(False)
    finite = jnp.all(jnp.isfinite(jnp.asarray(value, jnp.result_type(value))))
    return skipped & ~finite & (buf.filled > 0)


def retreat(lost, buf: Buffers, params, step):
    """`step`, or if `lost` the way back to the last recorded true iterate.

    The row is read in a loop taken once or never: an update that does not retreat
    reads nothing of the buffer.
    """
    rows = jax.tree_util.tree_leaves(buf.points)[0].shape[0]

    def back(_):
        row = (buf.head - 1) % rows
        last = jax.tree_util.tree_map(
            lambda b: jax.lax.dynamic_index_in_dim(b, row, keepdims=False), buf.points
        )
        return optax.tree.cast_like(
            optax.tree.sub(optax.tree.cast_like(last, params), params), step
        )

    return once_or_never(lost, back, step)


def undo_phase(undo, anchor: Anchor, params, step, base_state):
    """``(step, base_state)`` back to where the phase began if `undo` (once or never)."""

    def back(_):
        way = optax.tree.sub(anchor.params, params)
        return optax.tree.cast_like(way, step), anchor.base_state

    return once_or_never(undo, back, (step, base_state))


# 2**-20 of the base's step: any longer retreat streak means the point is a dead end.
MAX_BACKOFF = 20


def back_off(sch: Schedule, fine):
    """``(backoff, probing, scale)``: the base's step is scaled by `scale` after retreats.

    A retreat (see `retreat`) means the base's own step from the last true iterate
    landed where the loss is undefined; taken again from there it would land there
    again. So every retreat halves the true steps that follow (`backoff`), and each
    true step that finds the point reached after such a scaled step well defined
    (`fine`: its gradient is finite) doubles them back, up to the base's own step. A
    backtracking rule on undefined losses only: without a retreat ``backoff`` is 0 and
    the step is the base's, bitwise (a power-of-two scale is exact).
    """
    backoff = jnp.maximum(sch.backoff - (fine & sch.probing), 0)
    scale = jnp.where(fine, jnp.ldexp(jnp.ones(()), -backoff), 1.0)
    probing = jnp.where(fine, backoff > 0, sch.probing)
    return backoff, probing, scale


def record(buf: Buffers, when, params, measure, count) -> Buffers:
    """`buf` with the pair (params, ``measure()``) written at its head if `when`,
    stamped with the update `count`.

    The write is a loop taken once or never, so the (K, n) buffers are updated in
    place and nothing is read when `when` is false.
    """
    rows = jax.tree_util.tree_leaves(buf.points)[0].shape[0]

    def write(b):
        points, targets = b
        put = lambda t, x: t.at[buf.head].set(x.astype(t.dtype))  # noqa: E731
        return (
            jax.tree_util.tree_map(put, points, params),
            jax.tree_util.tree_map(put, targets, measure()),
        )

    points, targets = once_or_never(when, write, (buf.points, buf.targets))
    stamps = buf.stamps.at[buf.head].set(jnp.where(when, count, buf.stamps[buf.head]))
    head = jnp.where(when, (buf.head + 1) % rows, buf.head).astype(jnp.int32)
    filled = jnp.minimum(buf.filled + when, rows).astype(jnp.int32)
    return Buffers(points, targets, head, filled, stamps)


class NextSchedule(NamedTuple):
    length: Int[Array, ""]  # of the next surrogate phase
    horizon: Int[Array, ""]  # of the next surrogate steps, in units of dt
    todo: Int[Array, ""]  # steps left in the current phase (before a fit resets it)
    want_fit: Bool[Array, ""]  # fit now (the next update would start a phase)
    failed: Bool[Array, ""]  # this update ended a phase early or undid one
    phase_over: Bool[Array, ""]  # a surrogate phase ends with this update


def schedule_step(
    sch: Schedule,
    cfg,
    code,
    agree,
    undo,
    full,
    resume: Any = False,
    err: Any = None,
    inconclusive: Any = False,
    resampled: Any = False,
) -> NextSchedule:
    """The pure schedule rule, given this update's outcome (testable on its own).

    - a confirmed phase doubles the next one (up to `max_length`); once phases are at
      least 4 K long it also doubles the horizon of each step (up to `max_horizon`);
    - any failure (a guard, a disagreement, an undo, a skipped true step) halves both;
    - a phase whose change of the loss was within its noise (`inconclusive`, mini-batches)
      keeps its length: it is no evidence either way (halving made phases collapse to one
      step under noise; doubling let rises within the noise accumulate); where the flow
      agreed and batches are known to be `resampled`, its steps lengthen instead, up to
      `NOISY_HORIZON` dt (the flow is the mean of the noisy steps, and its longer steps
      cost no gradient: a longer phase could);
    - after a disagreement, `refresh` fresh true steps (the judging step counts, unless
      it was undone) come before the refit; after agreement the refit is at once, and
      so it is with `resume` (a disagreement under the engine's `drift` rule, or a
      retreat from an undefined loss);
    - a fit needs a full buffer (`full`).
    """
    is_true = sch.phase == 0
    judging = is_true & sch.verify
    disagree = judging & ~agree
    skipped = is_true & (code == NONFINITE_GRADIENT)
    failed = (~is_true & (code != OK)) | disagree | undo | skipped
    phase_over = ~is_true & ((sch.todo <= 1) | (code != OK))
    length = jnp.where(agree, jnp.minimum(2 * sch.length, cfg.max_length), sch.length)
    length = jnp.where(inconclusive, sch.length, length)
    length = jnp.where(failed, jnp.maximum(sch.length // 2, 1), length)
    if getattr(cfg, "length_from_error", False) and err is not None:
        # Error grows about linearly with the phase's length: aim the next at the tolerance.
        e = jnp.maximum(jnp.asarray(err, jnp.float32), 1e-6)
        factor = jnp.clip(cfg.verify_tolerance / e, 0.5, 2.0)
        scaled = jnp.floor(sch.length.astype(jnp.float32) * factor).astype(jnp.int32)
        scaled = jnp.clip(scaled, 1, cfg.max_length)
        by_error = judging & ~undo & ~skipped & ~inconclusive & ~(~is_true & (code != OK))
        length = jnp.where(by_error, scaled, length)
    grow = agree & (sch.length >= jnp.minimum(4 * cfg.first_length, cfg.max_length))
    horizon = jnp.where(grow, jnp.minimum(2 * sch.horizon, cfg.max_horizon), sch.horizon)
    noisy_cap = min(NOISY_HORIZON, cfg.max_horizon)
    stride = agree & inconclusive & resampled & (sch.horizon < noisy_cap)
    horizon = jnp.where(stride, jnp.minimum(2 * sch.horizon, noisy_cap), horizon)
    horizon = jnp.where(failed, jnp.maximum(sch.horizon // 2, 1), horizon)
    # `refresh >= 2`, so no fit follows a disagreement at once.
    todo = jnp.where(disagree, cfg.refresh - (~undo).astype(jnp.int32), sch.todo - 1)
    want_fit = is_true & full & (agree | resume | (~judging & (todo <= 0)))
    return NextSchedule(
        length.astype(jnp.int32),
        horizon.astype(jnp.int32),
        todo.astype(jnp.int32),
        want_fit,
        failed,
        phase_over,
    )


def fit_model(
    when,
    model: Model,
    info: VerifiedInfo,
    buf: Buffers,
    start: Anchor,
    anchor: Anchor,
    last_step,
    measure,
    cfg,
    retreated: Any = False,
):
    """``(model, anchor, info)`` refitted to the buffered pairs if `when` (once or never).

    The POD is centred at ``start.params + last_step`` (where the next surrogate step
    starts), which with the rest of `start` becomes the anchor of the phase if the fit
    succeeds; the trust region is `max_step_ratio` times the last step, and after a
    retreat (`retreated`: the last step is the way back from an undefined loss, not a
    step of the base) at most half the trust region of the model whose phase ran into
    it: the same pairs refit the same flow, whose step would land there again (heat
    example at 3x its steps: 1,000 updates of that loop, a gradient every other one);
    the drift (if kept) is the part of ``measure()``, the last true step's measurement,
    outside the new basis. Model and anchor are written inside the loop, so an update
    that does not fit touches neither. ``info.status`` is the fit's status (`OK` when
    no fit ran); the engine folds it into the step's status.
    """
    dtype = model.coefficients.dtype
    rank = None if model.basis is None else jax.tree_util.tree_leaves(model.basis)[0].shape[0]
    fit_cfg = dataclasses.replace(cfg.fit, rank=rank)  # "auto" was resolved at init

    def do_fit(carry):
        ((_, basis, origin, old_bound, drift, drift_sq, out_basis, _), anchor), _ = carry
        at = optax.tree.add(start.params, last_step)
        o = None if origin is None else optax.tree.cast_like(at, origin)
        # The measurements' noise counts only where the loss is noisy too: a deterministic
        # descent's rough measurements (projected or clipped steps) are not noise.
        gram = tree_gram(buf.targets, dtype)  # once: the noise and the targets' POD
        noise = measurement_noise(gram, buf.stamps)
        noise = jnp.where(start.loss_error > 0, noise, 0).astype(noise.dtype)
        fit = fit_pairs(
            fit_cfg, buf.points, buf.targets, o, dtype, cfg.target_basis, noise, buf.stamps, gram
        )
        scale = optax.tree.norm(last_step).astype(dtype)
        bound = (
            jnp.asarray(jnp.inf, dtype)
            if cfg.max_step_ratio is None
            else (cfg.max_step_ratio * scale).astype(dtype)
        )
        # (No model yet, bound 0: the base's own step ran into it; nothing to halve.)
        halve = retreated & (old_bound > 0)
        bound = jnp.where(halve, jnp.minimum(bound, old_bound / 2), bound).astype(dtype)
        new_basis = optax.tree.cast_like(fit.basis, basis)
        if drift is not None:
            measured = measure()
            inside = tree_lift(new_basis, tree_project(new_basis, measured, dtype), drift)
            drift = optax.tree.sub(optax.tree.cast_like(measured, drift), inside)
            # Read once per fit: a surrogate step's length needs no pass over `n`.
            drift_sq = jnp.asarray(optax.tree.norm(drift, squared=True), dtype)
            drift_sq = drift_sq + 0 * jnp.asarray(optax.tree.sum(new_basis), dtype)
        if out_basis is not None:
            out_basis = optax.tree.cast_like(fit.out_basis, out_basis)
        new_model = Model(
            fit.coefficients.astype(dtype), new_basis, o, bound, drift, drift_sq, out_basis, noise
        )
        anchor = optax.tree.where(fit.status == OK, start._replace(params=at), anchor)
        return (new_model, anchor), (
            fit.residual.astype(dtype),
            fit.active.astype(jnp.int32),
            fit.energy.astype(dtype),
            fit.status.astype(jnp.int32),
        )

    fit_info = (info.fit_residual, info.active_terms, info.pod_energy, _i32(OK))
    (model, anchor), (residual, active, energy, status) = once_or_never(
        when, do_fit, ((model, anchor), fit_info)
    )
    return (
        model,
        anchor,
        info._replace(fit_residual=residual, active_terms=active, pod_energy=energy, status=status),
    )
