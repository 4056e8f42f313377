"""`lgf`, the front end: its options, checked, and the engine of the schedule they select.

The shared builders here (`fit_options`, `build_engine`) also serve `lgf_adam`."""

from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp
import optax

from ._derivatives import FD_ORDERS
from ._engine import gate_step
from ._fit import FitConfig
from ._fixed import FixedConfig, make_transformation
from ._flow import RK4, integrate_span
from ._options import Fit, Fixed, Integrator, Verified, flat_options, from_keywords
from ._status import OK
from ._validate import (
    _concrete,
    check_bool,
    check_choice,
    check_nonnegative,
    check_positive,
    check_positive_int,
)
from ._verified import VerifiedConfig, make_verified


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
    schedule: Verified | Fixed | None = None,
    fit: Fit | None = None,
    integrator: Integrator | None = None,
    buffer_dtype=None,
    **old_keywords,
) -> optax.GradientTransformationExtraArgs:
    """Learned gradient flow (LGF) around any optax optimiser.

    True steps of `base` are recorded; a sparse polynomial ODE is fitted to them (in a
    POD subspace) and integrated with diffrax instead of evaluating the gradient. Use
    `lgfjax.value_and_grad` (or `lgfjax.needs_gradient`) so that the objective is not
    evaluated in surrogate steps.

    With the default `lgfjax.Verified` schedule, each true step records the base's
    velocity ``update / dt``, a linear model in a centred rank-``K // 2`` POD is
    fitted to the last K of them, and the first true step after each surrogate phase
    judges it for free: agreement lengthens the next phase, disagreement shortens it
    and takes fresh true steps, and a loss rise (pass the loss as the extra argument
    ``value``) undoes the phase. `lgfjax.Fixed` is the paper's schedule: every cycle
    of M updates takes K true steps, fits, and integrates the flow for the rest.

    Safeguards cost no gradient: a fit that is not finite or keeps no term, a diffrax
    failure, a non-finite step, or a step longer than the trust region abandons the
    surrogate phase; that update is zero and true steps follow. The reason is kept in
    the state (see `lgfjax.diagnostics`).

    **Arguments:**

    - `base`: the optimiser taking the true steps, e.g. ``optax.sgd(1e-2)``.
    - `dt`: time between recorded iterates, and integration time per surrogate step.
      For gradient descent, its learning rate. With a decaying schedule in `base`, the
      learned velocity carries the rate of the recent true steps; keep `dt` at the
      schedule's initial rate.
    - `schedule`: `lgfjax.Verified(...)` (default) or `lgfjax.Fixed(history_size,
      retrain_interval, ...)`, with the schedule's own options.
    - `fit`: `lgfjax.Fit(...)`: the polynomial library, the POD rank and STLSQ.
    - `integrator`: `lgfjax.Integrator(...)`: the diffrax solver of a surrogate step
      and the trust region (``max_step_ratio``, default 3).
    - `buffer_dtype`: storage dtype of the trajectory buffer (e.g. ``jnp.bfloat16``);
      the fit itself runs in float32 or float64. Each row is rounded to ``eps |x|`` of
      that dtype, so a POD mode that moves less than that over the window is rounding
      noise; the trust region then refuses the phase (a fallback, never a non-finite
      step). Use low-precision buffers where the iterates move by much more than their
      own rounding over K steps.
    - `old_keywords` (``**``): the flat keywords of earlier releases (``history_size=``,
      ``retrain_interval=``, ``poly_order=``, ...) still work for this release, with a
      `DeprecationWarning` that shows the new spelling.

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state is an
    `lgfjax.VerifiedState` (verified) or an `lgfjax.LGFState` (fixed).

    `optax.inject_hyperparams(lgfjax.lgf)(base=..., dt=...)` injects `dt`; to inject
    an option of an object, wrap the construction in a function of that float (see
    the guide's "Configuration").

    ```python
    import jax, jax.numpy as jnp, optax, lgfjax

    def loss(x):
        return 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * x**2)

    opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1, schedule=lgfjax.Fixed(10, 30))
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
    schedule, fit, integrator = from_keywords("lgf", schedule, fit, integrator, old_keywords)
    options = flat_options(schedule, fit, integrator, max_step_ratio=3.0, derivatives=True)
    return _lgf(base, dt=dt, buffer_dtype=buffer_dtype, **options)


def _lgf(
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
    """`lgf` with the flat options of earlier releases, checked and built (the engine
    behind the public front end; `flat_options` turns the option objects into these)."""
    if not isinstance(base, optax.GradientTransformation):
        raise ValueError(f"`base` must be an optax.GradientTransformation, got {base!r}.")
    check_choice("derivative", derivative, ("strong", "weak"))
    check_choice("fd_order", fd_order, tuple(FD_ORDERS))
    lo, hi = FD_ORDERS[fd_order] if derivative == "strong" else (0, 0)
    schedule, cfg = fit_options(
        min_history=max(3, lo + hi + 1), **shared_options(fit_options, locals(), "min_history")
    )
    surrogate_fn = velocity_surrogate(
        dt,
        solver=solver,
        substeps=substeps,
        stepsize_controller=stepsize_controller,
        max_steps=16 * substeps if max_steps is None else max_steps,
    )

    def velocity(grads, true_update):
        # What the flow models: the base's step over `dt` at the true iterate.
        return jax.tree_util.tree_map(lambda u: u / jnp.asarray(dt, u.dtype), true_update)

    return build_engine(
        base.init,
        base.update,
        surrogate_fn,
        target_fn=velocity,
        record_gradients=False,
        # The out-of-basis part of the base's velocity is the step the base itself
        # would take there; held over a phase it keeps those directions moving.
        drift=True,
        **shared_options(build_engine, locals(), "target_fn", "record_gradients"),
    )


def velocity_surrogate(dt, *, solver, substeps, stepsize_controller, max_steps):
    """The surrogate step of a base with a learned velocity: the flow over `dt`.

    ``surrogate_fn(model, params, base_state, dtype, span=1, gate=None)`` integrates
    the learned flow over ``span * dt`` (`span` the int 1, or an int32 array) from
    `params`, in the model's coordinates, and returns ``(step, base_state, ok)``; the
    base state is not touched (the base only moves in true steps). With
    ``gate(length, solver_ok) -> code`` (the verified engine's guards) it returns
    ``(step, base_state, code)`` with a zero step unless the code is `OK`, the length
    measured in the subspace where the model allows (`SurrogateModel.step_length`).
    """

    def surrogate_fn(model, params, base_state, dtype, span=1, gate=None):
        z0 = model.project(params, dtype)
        z1, ok = integrate_span(
            model.flow,
            z0,
            jnp.asarray(dt, dtype),
            span,
            solver=solver,
            substeps=substeps,
            stepsize_controller=stepsize_controller,
            max_steps=max_steps,
        )
        time = jnp.asarray(span * dt, dtype)
        step = model.lift(z1 - z0, params)
        length = None if gate is None else model.step_length(z1 - z0, time)
        keep = True
        if gate is not None and length is not None:
            # Measured in the subspace: the step is formed and guarded in one pass over
            # `n` (no norm over `n`, no second select). A refused step is exactly zero,
            # whatever the basis and drift hold.
            code = gate(length, ok)
            keep = code == OK
        if model.drift is not None:
            # What the subspace cannot see moves on at the last measured velocity.
            step = jax.tree_util.tree_map(
                lambda s, d: jnp.where(keep, s + (time * d.astype(dtype)).astype(s.dtype), 0),
                step,
                model.drift,
            )
        if gate is None:
            return step, base_state, ok
        if length is None:
            step, code = gate_step(step, ok, gate)
        return step, base_state, code

    return surrogate_fn


def fit_options(
    *,
    schedule,
    history_size,
    retrain_interval,
    rank,
    center,
    min_history: int,
    derivative="tracked",
    fd_order=2,
    weak_width=None,
    weak_power=4,
    poly_order,
    include_bias,
    dt,
    threshold,
    relative_threshold,
    alpha,
    max_iter,
    normalize_columns,
    unbias,
    solver,
    substeps,
    max_steps,
    max_step_ratio,
    check_every,
    check_tolerance,
) -> tuple[str, FitConfig]:
    """``(schedule, FitConfig)``: the options both front-ends share, checked once.

    `min_history` is the fixed schedule's smallest K (its derivative stencil, or two
    pairs for a gradient model); ``derivative="tracked"`` marks a front-end whose
    targets are recorded with each true step (Adam's gradient).
    """
    schedule, history_size, rank, center = resolve_schedule(
        schedule, history_size, retrain_interval, rank, center
    )
    if relative_threshold is None:
        # The verified schedule keeps fitting as a run converges and steps shrink.
        relative_threshold = schedule == "verified"
    if schedule == "fixed":
        validate_schedule(history_size, retrain_interval, rank, min_history, center)
    elif derivative not in ("strong", "tracked"):
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
        rank=rank,  # pyright: ignore[reportArgumentType] ("auto": resolved at init)
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
    return schedule, cfg


def shared_options(fn: Callable, arguments: dict, *given: str) -> dict:
    """The keyword arguments of `fn` among a front-end's own (its ``locals()``).

    Both front-ends hand their flat keyword arguments on this way, so that the shared
    builders (`fit_options`, `build_engine`) are the one place that lists them.
    `given` names the ones the caller passes itself.
    """
    import inspect

    parameters = inspect.signature(fn).parameters.values()
    names = {p.name for p in parameters if p.kind is p.KEYWORD_ONLY} - set(given)
    return {k: v for k, v in arguments.items() if k in names}


def build_engine(
    base_init,
    base_update,
    surrogate_fn,
    *,
    schedule,
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
    drift=False,
    restore_state=False,
    target_basis=False,
    resume_on_drop=False,
    length_from_error=False,
    restore_fn=None,
    elementwise_base=False,
):
    """The engine of either schedule for a front-end's base flow (shared by both).

    `target_fn(grads, true_update)` is what the verified schedule records at a true
    step (the quantity the flow models); `record_gradients` says the same for the
    fixed schedule (gradients for Adam's flow, else the iterates' differences).
    """
    if schedule == "verified":
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
                drift=drift,
                restore_state=restore_state,
                target_basis=target_basis,
                resume_on_drop=resume_on_drop,
                length_from_error=length_from_error,
                step_time=None if record_gradients else dt,
            ),
            buffer_dtype=buffer_dtype,
            restore_fn=restore_fn,
            elementwise_base=elementwise_base,
        )
    max_surrogate_steps = _check_adaptive(
        adaptive, max_surrogate_steps, retrain_interval - cfg.history_size
    )
    fixed = FixedConfig(
        fit=cfg,
        retrain_interval=retrain_interval,
        dt=dt,
        max_step_ratio=max_step_ratio,
        check_every=check_every,
        check_tolerance=check_tolerance,
        adaptive=adaptive,
        max_surrogate_steps=max_surrogate_steps,
    )
    return make_transformation(
        base_init=base_init,
        base_update=base_update,
        surrogate_fn=surrogate_fn,
        record_gradients=record_gradients,
        cfg=fixed,
        buffer_dtype=buffer_dtype,
        elementwise_base=elementwise_base,
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
    drift=False,
    restore_state=False,
    target_basis=False,
    resume_on_drop=False,
    length_from_error=False,
    step_time=None,
):
    """Check the verified schedule's own options and build its `VerifiedConfig`."""
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
        drift=drift,
        restore_state=restore_state,
        target_basis=target_basis and fit.rank is not None,
        resume_on_drop=resume_on_drop,
        length_from_error=length_from_error,
        step_time=step_time,
    )
