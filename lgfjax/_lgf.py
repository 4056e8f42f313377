"""The LGF gradient transformation: true steps, a fit, then a learned surrogate flow."""

from collections.abc import Callable
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int, PyTree

from ._derivatives import FD_ORDERS
from ._fit import (
    NONFINITE_STEP,
    OK,
    SOLVER_FAILED,
    STEP_TOO_LARGE,
    VALUE_REJECTED,
    FitConfig,
    fit_flow,
)
from ._flow import RK4, PolynomialFlow, integrate_span
from ._library import library_size
from ._pod import gathered, placed_like, tree_lift, tree_project
from ._validate import (
    _concrete,
    check_bool,
    check_choice,
    check_nonnegative,
    check_positive,
    check_positive_int,
)


class LGFState(NamedTuple):
    """State of `lgfjax.lgf` and `lgfjax.lgf_adam`. Every field is an array leaf.

    Counters are int32 scalars. "Fit dtype" is float64 if any parameter is float64,
    else float32. ``K`` is `history_size`, ``r`` the rank (``n``, the number of
    parameters, in full space) and ``P`` the number of library terms.
    """

    count: Int[Array, ""]  # int32: updates applied so far
    cycle_step: Int[Array, ""]  # int32: position in the current cycle, 0 .. K + S - 1
    phase: Int[Array, ""]  # int32: 0 if the next update needs a true gradient, else 1
    gradient_evaluations: Int[Array, ""]  # int32: true gradients consumed
    value_evaluations: Int[Array, ""]  # int32: value_fn calls made by acceptance checks
    surrogate_steps: Int[Array, ""]  # int32: S, surrogate steps in this cycle
    base_state: Any  # the base optimiser's state, advanced by true steps only
    trajectory: PyTree[Array]  # leaves (K + 1, *shape), buffer dtype: cycle iterates
    gradients: PyTree[Array] | None  # leaves (K, *shape): true gradients (Adam only)
    coefficients: Float[Array, "P r"]  # fit dtype: the learned flow
    basis: PyTree[Array] | None  # leaves (r, *shape), fit dtype: POD basis (rank only)
    step_bound: Float[Array, ""]  # fit dtype: largest surrogate step accepted
    status: Int[Array, ""]  # int32: reason of the last fallback (see `status_message`)
    fallbacks: Int[Array, ""]  # int32: surrogate phases abandoned
    fit_residual: Float[Array, ""]  # fit dtype: relative residual of the last fit
    active_terms: Int[Array, ""]  # int32: non-zero coefficients of the last fit
    pod_energy: Float[Array, ""]  # fit dtype: energy captured by the basis (1 if full)
    accepted: Int[Array, ""]  # int32: surrogate steps kept
    rejected: Int[Array, ""]  # int32: surrogate steps refused or rolled back
    since_check: Int[Array, ""]  # int32: surrogate steps since the last accepted point
    reference_loss: Float[Array, ""]  # fit dtype: value_fn at the last accepted point
    anchor: Any  # (params, base_state) at the last accepted point, or None


class SurrogateModel(NamedTuple):
    """What a surrogate step sees: the fitted flow and its coordinates."""

    flow: PolynomialFlow
    basis: Any  # POD basis leaves, or None for full space
    unravel: Callable  # full space only: flat vector -> pytree like params
    origin: Any = None  # with `center`: the point the POD coordinates are relative to

    def project(self, tree, dtype):
        if self.basis is None:
            return ravel_pytree(gathered(tree))[0].astype(dtype)
        if self.origin is not None:
            tree = jax.tree_util.tree_map(
                lambda x, o: x.astype(dtype) - o.astype(dtype), tree, self.origin
            )
        return tree_project(self.basis, tree, dtype)

    def lift(self, dz, like):
        if self.basis is None:
            return placed_like(optax.tree.cast_like(self.unravel(dz), like), like)
        return tree_lift(self.basis, dz, like)


def flat_unravel(params) -> Callable:
    """Full space: flat vector (any dtype) -> pytree like `params`."""
    flat, unravel = ravel_pytree(gathered(params))
    return lambda v: unravel(v.astype(flat.dtype))


def once_or_never(when, fn, carry):
    """``fn(carry)`` if `when`, else `carry`, as a while loop taken once or never.

    XLA updates the carry in place (a `lax.cond` branch returning an operand
    unchanged would copy it), and nothing is read when `when` is false.
    """

    def body(c):
        return jnp.asarray(True), fn(c[1])

    return jax.lax.while_loop(lambda c: ~c[0], body, (~when, carry))[1]


def _zeros_along(leaf, rows: int, dtype):
    """Zeros of shape ``(rows, *leaf.shape)``, sharded like `leaf` along its own axes."""
    zeros = jnp.zeros((rows,) + jnp.shape(leaf), dtype)
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = jax.sharding.PartitionSpec(None, *sharding.spec)
        zeros = jax.device_put(zeros, jax.sharding.NamedSharding(sharding.mesh, spec))
    return zeros


def _fit_dtype(params):
    dtypes = [jnp.result_type(leaf) for leaf in jax.tree_util.tree_leaves(params)]
    return jnp.result_type(np.float32, *dtypes)


def _last_step_length(trajectory, dtype):
    # The surrogate continues from the last recorded iterate, so the last true step
    # is the natural scale for how far one surrogate step may go.
    return optax.tree.norm(
        jax.tree_util.tree_map(lambda b: b[-1].astype(dtype) - b[-2].astype(dtype), trajectory)
    )


def make_transformation(
    *,
    base_init: Callable,
    base_update: Callable,
    surrogate_fn: Callable,
    record_gradients: bool,
    cfg: FitConfig,
    retrain_interval: int,
    dt: float,
    max_step_ratio: float | None,
    check_every: int | None,
    check_tolerance: float,
    adaptive: bool,
    max_surrogate_steps: int,
    buffer_dtype,
) -> optax.GradientTransformationExtraArgs:
    """The cycle engine shared by `lgf` and `lgf_adam`.

    `surrogate_fn(model, params, base_state, dtype)` returns ``(updates, base_state,
    ok)`` for one surrogate step; everything else (recording, fitting, guards, value
    checks, the schedule) is common.
    """
    K = cfg.history_size
    checking = check_every is not None

    def init_fn(params):
        dtype = _fit_dtype(params)
        n = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))
        r = n if cfg.rank is None else cfg.rank
        P = library_size(r, cfg.degree, cfg.include_bias)

        def buffer(rows, dtype=None):
            return jax.tree_util.tree_map(
                lambda p: _zeros_along(p, rows, dtype or buffer_dtype or jnp.result_type(p)),
                params,
            )

        def zero_i():
            # One array per counter, so that the state can be donated.
            return jnp.zeros((), jnp.int32)

        base_state = base_init(params)
        return LGFState(
            count=zero_i(),
            cycle_step=zero_i(),
            phase=zero_i(),
            gradient_evaluations=zero_i(),
            value_evaluations=zero_i(),
            surrogate_steps=jnp.asarray(retrain_interval - K, jnp.int32),
            base_state=base_state,
            trajectory=buffer(K + 1),
            gradients=buffer(K) if record_gradients else None,
            coefficients=jnp.zeros((P, r), dtype),
            basis=None if cfg.rank is None else buffer(r, dtype),
            step_bound=jnp.zeros((), dtype),
            status=zero_i(),
            fallbacks=zero_i(),
            fit_residual=jnp.zeros((), dtype),
            active_terms=zero_i(),
            pod_energy=jnp.zeros((), dtype),
            accepted=zero_i(),
            rejected=zero_i(),
            since_check=zero_i(),
            reference_loss=jnp.zeros((), dtype),
            anchor=(
                jax.tree_util.tree_map(jnp.array, params),
                base_state,
            )
            if checking
            else None,
        )

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        if params is None:
            raise ValueError("lgfjax transformations need `params` in `update`.")
        if checking and value_fn is None:
            raise ValueError(
                "`check_every` is set, so `update` needs the extra argument "
                "`value_fn` (params -> scalar loss), as for `optax.lbfgs`."
            )
        dtype = state.coefficients.dtype
        cs = state.cycle_step
        last_of_cycle = cs + 1 >= K + state.surrogate_steps
        unravel = flat_unravel(params) if cfg.rank is None else None
        zeros = optax.tree.zeros_like(updates)

        def as_updates(tree):
            return optax.tree.cast_like(tree, updates)

        # The (K + 1, n) buffers never pass through the switch: a branch that returns
        # an operand unchanged makes XLA copy it, which would cost O(K n) per step.
        # Recording and the fit run in loops taken once or never (`once_or_never`),
        # whose carries XLA updates in place.
        is_true = state.phase == 0
        is_fit = (state.phase != 0) & (cs == K)

        def write(buffers, leaves, row, when):
            # Unlike a masked write, this reads nothing when there is nothing to record.
            def put(b):
                return jax.tree_util.tree_map(
                    lambda t, x: t.at[row].set(x.astype(t.dtype)), b, leaves
                )

            return once_or_never(when, put, buffers)

        trajectory = write(
            state.trajectory, params, jnp.minimum(cs, K), (is_true & (cs < K)) | is_fit
        )
        gradients = state.gradients
        if record_gradients:
            gradients = write(gradients, updates, jnp.minimum(cs, K - 1), is_true & (cs < K))

        def do_fit(carry):
            fit = fit_flow(cfg, trajectory, gradients, dt, dtype)
            if max_step_ratio is None:
                bound = jnp.asarray(jnp.inf, dtype)
            else:
                bound = max_step_ratio * _last_step_length(trajectory, dtype)
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
            state.coefficients,
            state.basis,
            state.step_bound,
            state.fit_residual,
            state.active_terms,
            state.pod_energy,
            jnp.asarray(OK, jnp.int32),
        )
        coefficients, basis, bound, residual, active, energy, fit_status = once_or_never(
            is_fit, do_fit, carry
        )
        light = state._replace(
            trajectory=None,
            gradients=None,
            basis=None,
            coefficients=coefficients,
            step_bound=bound,
            fit_residual=residual,
            active_terms=active,
            pod_energy=energy,
        )

        def true_branch(updates, state, params):
            new_updates, base_state = base_update(updates, state.base_state, params, **extra_args)
            state = state._replace(
                base_state=base_state,
                gradient_evaluations=state.gradient_evaluations + 1,
            )
            return as_updates(new_updates), state, jnp.asarray(OK, jnp.int32)

        def surrogate_step(state, params, code):
            origin = None
            if cfg.center:
                origin = jax.tree_util.tree_map(lambda b: b[K], trajectory)
            model = SurrogateModel(
                PolynomialFlow(state.coefficients, cfg.degree, cfg.include_bias),
                basis,
                unravel,
                origin,
            )
            step, base_state, solver_ok = surrogate_fn(model, params, state.base_state, dtype)
            length = optax.tree.norm(step)
            code = jnp.where(code != OK, code, jnp.where(solver_ok, OK, SOLVER_FAILED))
            code = jnp.where((code == OK) & ~jnp.isfinite(length), NONFINITE_STEP, code)
            code = jnp.where((code == OK) & (length > state.step_bound), STEP_TOO_LARGE, code)
            ok = code == OK
            step = optax.tree.where(ok, step, zeros)
            base_state = optax.tree.where(ok, base_state, state.base_state)
            if not checking:
                return (
                    as_updates(step),
                    state._replace(
                        base_state=base_state,
                        accepted=state.accepted + ok,
                        rejected=state.rejected + ~ok,
                    ),
                    code,
                )

            since = state.since_check + 1
            do_check = ok & ((since >= check_every) | last_of_cycle)
            candidate = optax.tree.add(params, step)
            loss = jax.lax.cond(
                do_check,
                lambda p: jnp.asarray(value_fn(p), dtype),
                lambda p: state.reference_loss,
                candidate,
            )
            ref = state.reference_loss
            passed = jnp.isfinite(loss) & (loss <= ref + check_tolerance * jnp.abs(ref))
            keep = do_check & passed
            roll_back = ~ok | (do_check & ~passed)
            anchor_params, anchor_base = state.anchor
            step = optax.tree.where(roll_back, optax.tree.sub(anchor_params, params), step)
            base_state = optax.tree.where(roll_back, anchor_base, base_state)
            code = jnp.where(ok & roll_back, VALUE_REJECTED, code)
            state = state._replace(
                base_state=base_state,
                value_evaluations=state.value_evaluations + do_check,
                accepted=state.accepted + jnp.where(keep, since, 0),
                rejected=state.rejected + jnp.where(roll_back, since, 0),
                since_check=jnp.where(keep | roll_back, 0, since),
                reference_loss=jnp.where(keep, loss, ref),
                anchor=optax.tree.where(keep, (candidate, base_state), state.anchor),
            )
            return as_updates(step), state, code

        def fit_branch(updates, state, params):
            if checking:
                ref = jax.lax.cond(
                    fit_status == OK,
                    lambda p: jnp.asarray(value_fn(p), dtype),
                    lambda p: jnp.asarray(jnp.inf, dtype),
                    params,
                )
                state = state._replace(
                    value_evaluations=state.value_evaluations + (fit_status == OK),
                    reference_loss=ref,
                    anchor=(params, state.base_state),
                    since_check=jnp.zeros((), jnp.int32),
                )
            return surrogate_step(state, params, fit_status)

        def surrogate_branch(updates, state, params):
            return surrogate_step(state, params, jnp.asarray(OK, jnp.int32))

        branch = jnp.where(state.phase == 0, 0, jnp.where(cs == K, 1, 2))
        new_updates, new_state, code = jax.lax.switch(
            branch, (true_branch, fit_branch, surrogate_branch), updates, light, params
        )
        new_state = new_state._replace(trajectory=trajectory, gradients=gradients, basis=basis)

        failed = code != OK
        fell_back = failed | ((state.phase == 0) & (cs >= K))
        next_cs = jnp.where(last_of_cycle, 0, cs + 1)
        next_phase = ((next_cs >= K) & ~fell_back).astype(jnp.int32)
        surrogate_steps = state.surrogate_steps
        if adaptive:
            grown = jnp.minimum(2 * surrogate_steps, max_surrogate_steps)
            shrunk = jnp.maximum(surrogate_steps // 2, 1)
            surrogate_steps = jnp.where(
                last_of_cycle, jnp.where(fell_back, shrunk, grown), surrogate_steps
            )
        new_state = new_state._replace(
            count=state.count + 1,
            cycle_step=next_cs.astype(jnp.int32),
            phase=next_phase,
            surrogate_steps=surrogate_steps.astype(jnp.int32),
            status=jnp.where(failed, code, state.status).astype(jnp.int32),
            fallbacks=state.fallbacks + failed,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def validate_schedule(history_size, retrain_interval, rank, min_history: int, center=False):
    check_positive_int("history_size", history_size, min_history)
    if not isinstance(center, bool) or (center and rank is None):
        raise ValueError(f"`center` must be False, or True together with a `rank`, got {center!r}.")
    check_positive_int("retrain_interval", retrain_interval, history_size)
    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= history_size:
            raise ValueError(
                f"`rank` must be None or an integer in [1, history_size={history_size}], "
                f"got {rank!r}."
            )


def validate_flow_options(
    *,
    poly_order,
    dt,
    threshold,
    relative_threshold,
    alpha,
    max_iter,
    solver,
    substeps,
    max_steps,
    max_step_ratio,
    check_every,
    check_tolerance,
    weak_power,
):
    check_positive_int("poly_order", poly_order)
    check_positive("dt", dt)
    check_nonnegative("threshold", threshold)
    check_bool("relative_threshold", relative_threshold)
    check_nonnegative("alpha", alpha)
    check_positive_int("max_iter", max_iter)
    if not isinstance(solver, diffrax.AbstractSolver):
        raise ValueError(
            f"`solver` must be a diffrax.AbstractSolver instance such as "
            f"lgfjax.RK4() or diffrax.Tsit5(), got {solver!r}."
        )
    check_positive_int("substeps", substeps)
    if max_steps is not None:
        check_positive_int("max_steps", max_steps, substeps)
    if max_step_ratio is not None:
        check_positive("max_step_ratio", max_step_ratio)
    if check_every is not None:
        check_positive_int("check_every", check_every)
    check_nonnegative("check_tolerance", check_tolerance)
    check_positive_int("weak_power", weak_power)


def lgf(
    base: optax.GradientTransformation,
    *,
    dt: float,
    history_size: int | None = None,
    retrain_interval: int | None = None,
    schedule: str | None = None,
    verify_tolerance: float = 0.2,
    poly_order: int = 1,
    include_bias: bool = True,
    rank: int | None | str = "auto",
    center: bool | None = None,
    derivative: str = "strong",
    fd_order: int = 2,
    weak_width: int | None = None,
    weak_power: int = 4,
    threshold: float = 1e-8,
    relative_threshold: bool | None = None,
    alpha: float = 1e-6,
    max_iter: int = 20,
    normalize_columns: bool = True,
    unbias: bool = True,
    solver: diffrax.AbstractSolver = RK4(),
    substeps: int = 1,
    stepsize_controller: diffrax.AbstractStepSizeController = diffrax.ConstantStepSize(),
    max_steps: int | None = None,
    max_step_ratio: float | None = 3.0,
    check_every: int | None = None,
    check_tolerance: float = 0.0,
    adaptive: bool = False,
    max_surrogate_steps: int | None = None,
    max_horizon: int = 8,
    buffer_dtype=None,
) -> optax.GradientTransformationExtraArgs:
    """Learned gradient flow (LGF) around any optax optimiser.

    Two schedules. Without `retrain_interval` the **verified** schedule runs (see
    `lgfjax._verified`): each true step records the base's velocity ``update / dt``
    at its iterate, a linear model in a centred rank-``K // 2`` POD is fitted to the
    last K of them, and the first true step after each surrogate phase judges it for
    free; agreement doubles the next phase, disagreement halves it and takes fresh
    true steps, and a loss rise (pass the loss as the extra argument ``value``)
    undoes the phase. With `retrain_interval` (or ``schedule="fixed"``) the paper's
    **fixed** schedule runs, as described next.

    Every cycle of `retrain_interval` (M) updates starts with `history_size` (K) true
    steps of `base`, whose iterates are recorded. The next update fits a sparse
    polynomial ODE ``dz/dt = Theta(z) Xi`` to that trajectory (sampled every `dt`),
    in the parameters themselves or in the coordinates of a rank-`rank` POD basis,
    and then each of the remaining M - K updates integrates the learned flow over
    `dt` with diffrax instead of using a gradient. Use `lgfjax.value_and_grad` (or
    `lgfjax.needs_gradient`) so that the objective is not evaluated in those steps.

    Safeguards cost no gradient: a fit that is not finite or keeps no term, a diffrax
    failure, a non-finite step, or a step longer than `max_step_ratio` times the
    last recorded true step (in parameter space) abandons the surrogate phase; that
    update is zero and the rest of the cycle takes true steps. The reason is kept in
    ``state.status``.
    With `check_every`, the loss is also checked through the extra argument
    `value_fn` every `check_every` surrogate steps and at the end of the phase (no
    gradient); a rise rolls back to the last accepted point.

    **Arguments:**

    - `base`: the optimiser taking the true steps, e.g. ``optax.sgd(1e-2)``. For
      gradient descent's flow, `dt` equals its learning rate.
    - `history_size`: K, true steps recorded per cycle (fixed), or the number of
      recent true steps the model is fitted to (verified; default 10).
    - `retrain_interval`: M, updates per cycle (``>= K``); selects the fixed schedule.
    - `schedule`: ``"verified"`` or ``"fixed"``; default: fixed if `retrain_interval`
      is given, else verified.
    - `verify_tolerance`: verified schedule: largest relative error
      ``|predicted - measured| / |measured|`` of the flow at the judging true step
      that counts as agreement, in [0, 1) (0.2: direction within about 11.5 degrees,
      speed within 20%).
    - `dt`: time between recorded iterates, and integration time per surrogate step.
    - `poly_order`, `include_bias`: the polynomial library.
    - `rank`: POD rank ``1 <= rank <= K``, or None to fit in full parameter space;
      ``"auto"`` (default) is None for the fixed schedule and ``min(n, K // 2)`` for
      the verified one.
    - `center`: (default: True with a rank under the verified schedule, else False)
      take the POD of the iterates minus the last one (the paper's POD is
      uncentred). Resolves small moves of large parameters in float32; the flow's
      coordinates are then relative to that iterate, so keep `include_bias`.
    - `derivative`: ``"strong"`` (finite differences of order `fd_order` in
      {1, 2, 4}) or ``"weak"`` (test functions of `weak_width` samples, power
      `weak_power`).
    - `threshold`, `alpha`, `max_iter`, `normalize_columns`, `unbias`: STLSQ, see
      `lgfjax.stlsq`.
    - `relative_threshold`: (default: True for the verified schedule, False for the
      fixed one) measure `threshold` in units of the targets' typical
      column norm instead of absolutely. With `normalize_columns` a term is then
      dropped when it contributes less than `threshold` of the target's size, so
      the fit does not empty as the iterates slow down near a minimum.
    - `solver`, `substeps`, `stepsize_controller`, `max_steps`: the diffrax solve of
      each surrogate step (initial step ``dt / substeps``).
    - `max_step_ratio`: trust-region factor, or None for no bound.
    - `derivative`, `fd_order`, `weak_width`, `weak_power`, `check_every`,
      `check_tolerance`, `adaptive`: fixed schedule only.
    - `check_every`, `check_tolerance`: the `value_fn` acceptance test; a check
      passes when ``loss <= reference + check_tolerance * |reference|``.
    - `adaptive`: double the surrogate phase after a cycle with no fallback, halve it
      after one with, between 1 and `max_surrogate_steps` (default ``4 (M - K)``).
    - `buffer_dtype`: storage dtype of the trajectory buffer (e.g. ``jnp.bfloat16``);
      the fit itself runs in float32 or float64. A known limit: each row is rounded to
      ``eps |x|`` of that dtype (bfloat16 2^-8, float16 2^-11), so a POD mode that moves
      less than that over the window is rounding noise, and its fitted rate can have
      the wrong sign; the trust region then refuses the phase (a fallback, never a
      non-finite step). Use low-precision buffers where the iterates move by much more
      than their own rounding over K steps.

    - `max_surrogate_steps`: the longest phase (default ``4 (M - K)`` fixed with
      `adaptive`, ``50 K`` verified).
    - `max_horizon`: verified schedule: the longest time one surrogate step
      integrates, in units of `dt` (a power of two; 1 keeps every step at `dt`). A
      confirmed phase of at least ``4 K`` steps doubles the horizon, any failure
      halves it, so a flow that stays right covers more ground per update (the
      integrator's own step stays ``dt / substeps``; the trust region grows with it).

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state is an
    `lgfjax.LGFState` (fixed) or a `VerifiedState` (verified).

    With `optax.inject_hyperparams`, list every integer and boolean argument in
    ``static_args`` (they fix array shapes or the program); `dt`, `threshold`,
    `alpha`, `max_step_ratio` and `check_tolerance` can be injected.

    ```python
    import jax, jax.numpy as jnp, optax, lgfjax

    def loss(x):
        return 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * x**2)

    opt = lgfjax.lgf(optax.sgd(0.1), history_size=10, retrain_interval=30, dt=0.1)
    params = jnp.array([1.0, 1.0])
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        _, grads = lgfjax.value_and_grad(loss)(params, state)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(90):
        params, state = step(params, state)
    assert lgfjax.gradient_evaluations(state) == 30 and loss(params) < 1e-6
    ```
    """
    if not isinstance(base, optax.GradientTransformation):
        raise ValueError(f"`base` must be an optax.GradientTransformation, got {base!r}.")
    schedule, history_size, rank, center = resolve_schedule(
        schedule, history_size, retrain_interval, rank, center
    )
    if relative_threshold is None:
        # The verified schedule keeps fitting as a run converges and steps shrink.
        relative_threshold = schedule == "verified"
    check_choice("derivative", derivative, ("strong", "weak"))
    check_choice("fd_order", fd_order, tuple(FD_ORDERS))
    if schedule == "fixed":
        lo, hi = FD_ORDERS[fd_order] if derivative == "strong" else (0, 0)
        validate_schedule(history_size, retrain_interval, rank, max(3, lo + hi + 1), center)
    elif derivative != "strong":
        raise ValueError(
            "`derivative` selects the fixed schedule's finite-difference or weak targets; "
            "the verified schedule models the base's velocity `update / dt` at each true "
            f"iterate, so use schedule='fixed' for derivative={derivative!r}."
        )
    validate_flow_options(
        poly_order=poly_order,
        dt=dt,
        threshold=threshold,
        relative_threshold=relative_threshold,
        alpha=alpha,
        max_iter=max_iter,
        solver=solver,
        substeps=substeps,
        max_steps=max_steps,
        max_step_ratio=max_step_ratio,
        check_every=check_every,
        check_tolerance=check_tolerance,
        weak_power=weak_power,
    )
    if weak_width is not None and not (
        isinstance(weak_width, int) and 4 <= weak_width <= history_size + 1
    ):
        raise ValueError(
            f"`weak_width` must be None or an integer in [4, history_size + 1="
            f"{history_size + 1}], got {weak_width!r}."
        )
    cfg = FitConfig(
        history_size=history_size,
        degree=poly_order,
        include_bias=include_bias,
        rank=rank,
        center=center,
        derivative="tracked" if schedule == "verified" else derivative,
        fd_order=fd_order,
        weak_width=weak_width,
        weak_power=weak_power,
        threshold=threshold,
        relative_threshold=relative_threshold,
        alpha=alpha,
        max_iter=max_iter,
        normalize_columns=normalize_columns,
        unbias=unbias,
    )
    steps_cap = 16 * substeps if max_steps is None else max_steps

    def surrogate_fn(model, params, base_state, dtype, span=1):
        # `span` (the int 1, or an int32 array) steps of `dt` in one surrogate step.
        z0 = model.project(params, dtype)
        z1, ok = integrate_span(
            model.flow,
            z0,
            jnp.asarray(dt, dtype),
            span,
            solver=solver,
            substeps=substeps,
            stepsize_controller=stepsize_controller,
            max_steps=steps_cap,
        )
        return model.lift(z1 - z0, params), base_state, ok

    def velocity(grads, true_update):
        # What the flow models: the base's step over `dt` at the true iterate.
        return jax.tree_util.tree_map(lambda u: u / jnp.asarray(dt, u.dtype), true_update)

    return build_engine(
        schedule,
        base.init,
        base.update,
        surrogate_fn,
        target_fn=velocity,
        record_gradients=False,
        cfg=cfg,
        retrain_interval=retrain_interval,
        dt=dt,
        verify_tolerance=verify_tolerance,
        max_step_ratio=max_step_ratio,
        check_every=check_every,
        check_tolerance=check_tolerance,
        adaptive=adaptive,
        max_surrogate_steps=max_surrogate_steps,
        max_horizon=max_horizon,
        buffer_dtype=buffer_dtype,
    )


def build_engine(
    schedule,
    base_init,
    base_update,
    surrogate_fn,
    *,
    target_fn,
    record_gradients,
    cfg,
    retrain_interval,
    dt,
    verify_tolerance,
    max_step_ratio,
    check_every,
    check_tolerance,
    adaptive,
    max_surrogate_steps,
    max_horizon,
    buffer_dtype,
):
    """The engine of either schedule for a front-end's base flow (shared by both).

    `target_fn(grads, true_update)` is what the verified schedule records at a true
    step (the quantity the flow models); `record_gradients` says the same for the
    fixed schedule (gradients for Adam's flow, else the iterates' differences).
    """
    if schedule == "verified":
        from ._verified import make_verified

        return make_verified(
            base_init=base_init,
            base_update=base_update,
            surrogate_fn=surrogate_fn,
            target_fn=target_fn,
            cfg=verified_config(
                cfg,
                verify_tolerance=verify_tolerance,
                max_step_ratio=max_step_ratio,
                check_every=check_every,
                adaptive=adaptive,
                max_surrogate_steps=max_surrogate_steps,
                max_horizon=max_horizon,
            ),
            buffer_dtype=buffer_dtype,
        )
    max_surrogate_steps = _check_adaptive(
        adaptive, max_surrogate_steps, retrain_interval - cfg.history_size
    )
    return make_transformation(
        base_init=base_init,
        base_update=base_update,
        surrogate_fn=surrogate_fn,
        record_gradients=record_gradients,
        cfg=cfg,
        retrain_interval=retrain_interval,
        dt=dt,
        max_step_ratio=max_step_ratio,
        check_every=check_every,
        check_tolerance=check_tolerance,
        adaptive=adaptive,
        max_surrogate_steps=max_surrogate_steps,
        buffer_dtype=buffer_dtype,
    )


def _check_adaptive(adaptive, max_surrogate_steps, default_steps):
    check_bool("adaptive", adaptive)
    if max_surrogate_steps is None:
        return max(1, 4 * default_steps)
    check_positive_int("max_surrogate_steps", max_surrogate_steps, max(1, default_steps))
    return max_surrogate_steps


def resolve_schedule(schedule, history_size, retrain_interval, rank, center):
    """``(schedule, history_size, rank, center)`` with the defaults filled in.

    Without `schedule`, giving `retrain_interval` selects the paper's fixed schedule
    (whose defaults are full space and no centring, as before); otherwise the
    verified schedule runs, by default with K = 10 and a centred rank-``K // 2`` POD.
    """
    if schedule is None:
        schedule = "fixed" if retrain_interval is not None else "verified"
    check_choice("schedule", schedule, ("verified", "fixed"))
    if schedule == "fixed":
        if history_size is None or retrain_interval is None:
            raise ValueError(
                "`schedule='fixed'` needs `history_size` and `retrain_interval` (K and M), "
                f"got history_size={history_size!r}, retrain_interval={retrain_interval!r}."
            )
        rank = None if rank == "auto" else rank
        center = False if center is None else center
        return schedule, history_size, rank, center
    if retrain_interval is not None:
        raise ValueError(
            "`retrain_interval` is the fixed schedule's cycle length; with "
            f"schedule='verified' phases follow the verification, got {retrain_interval!r}."
        )
    history_size = 10 if history_size is None else history_size
    check_positive_int("history_size", history_size, 3)
    if rank != "auto" and rank is not None:
        validate_schedule(history_size, history_size, rank, 3, bool(center))
    center = (rank is not None) if center is None else center
    if center and rank is None:
        raise ValueError("`center` must be False, or True together with a `rank`, got True.")
    return schedule, history_size, rank, center


def verified_config(
    fit: FitConfig,
    *,
    verify_tolerance,
    max_step_ratio,
    check_every,
    adaptive,
    max_surrogate_steps,
    max_horizon,
):
    """Check the verified schedule's own options and build its `VerifiedConfig`."""
    from ._verified import VerifiedConfig

    for name, value, hint in (
        ("check_every", check_every, "judges each phase by the loss passed as `value`"),
        ("adaptive", adaptive or None, "sets phase lengths from the verification record"),
    ):
        if value is not None:
            raise ValueError(
                f"`{name}` applies to schedule='fixed'; the verified schedule {hint}, "
                f"got {name}={value!r}."
            )
    check_nonnegative("verify_tolerance", verify_tolerance)
    if _concrete(verify_tolerance) and not float(verify_tolerance) < 1.0:
        raise ValueError(
            f"`verify_tolerance` must be a number in [0, 1), got {verify_tolerance!r}."
        )
    K = fit.history_size
    if max_surrogate_steps is None:
        max_surrogate_steps = 50 * K
    check_positive_int("max_surrogate_steps", max_surrogate_steps)
    power_of_two = isinstance(max_horizon, int) and max_horizon >= 1
    if not (power_of_two and max_horizon & (max_horizon - 1) == 0):
        raise ValueError(
            f"`max_horizon` must be a power of two >= 1 (surrogate steps of up to that many "
            f"`dt`), got {max_horizon!r}."
        )
    return VerifiedConfig(
        fit=fit,
        max_step_ratio=max_step_ratio,
        verify_tolerance=verify_tolerance,
        first_length=K,
        max_length=max_surrogate_steps,
        max_horizon=max_horizon,
        refresh=max(2, K // 2),
    )
