"""LGF around Adam: true Adam steps, a learned gradient, and the Adam ODE in between."""

from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int

from ._engine import gate_step
from ._flow import RK4, integrate_span
from ._lgf import build_engine, fit_options, shared_options
from ._noise import NOISE_FLOOR, second_moment_scale
from ._options import Fit, Fixed, Integrator, Verified, flat_options, from_keywords
from ._validate import _concrete, check_bool, check_nonnegative, check_positive


class AdamState(NamedTuple):
    """The Adam moments carried by `lgf_adam` (its ``LGFState.base_state``).

    Moments have the shapes and dtypes of the parameters.
    """

    count: Int[Array, ""]  # int32: Adam steps taken (true and surrogate)
    mu: Any  # pytree like params: first moment m
    nu: Any  # pytree like params: second moment v
    nu_max: Any  # pytree like params: AMSGrad's running max of v-hat, or None


def _bias(decay, count):
    # As optax: the power is taken in the default float dtype, then cast per leaf, so
    # that low-precision moments never see 1 - decay**count round to zero.
    return 1 - decay**count


def _rate(learning_rate, count) -> Any:
    # A schedule is evaluated at the Adam steps taken before this one, as optax does.
    return learning_rate(count) if callable(learning_rate) else learning_rate


def adam_base(learning_rate, b1, b2, eps, amsgrad: bool):
    """Adam as ``(init, update)`` whose discrete steps match `optax.adam` to rounding.

    Written as the semi-implicit Euler step, of length `learning_rate`, of the Adam ODE
    integrated by the surrogate steps: ``m += (1 - b1)(g - m)`` (computed as
    ``(1 - b1) g + b1 m``, which is optax's rounding), likewise for ``v`` with ``g^2``,
    then ``a -= eta mhat / (sqrt(vhat) + eps)`` with the updated moments.
    """

    def init(params):
        # Each moment its own arrays (one shared zeros tree could not be donated).
        return AdamState(
            count=jnp.zeros((), jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
            nu_max=optax.tree.zeros_like(params) if amsgrad else None,
        )

    def update(grads, state, params=None, **extra_args):
        del params, extra_args
        mu = jax.tree_util.tree_map(lambda g, m: (1 - b1) * g + b1 * m, grads, state.mu)
        nu = jax.tree_util.tree_map(lambda g, v: (1 - b2) * g**2 + b2 * v, grads, state.nu)
        count = jnp.asarray(optax.safe_increment(state.count))
        c1, c2 = _bias(b1, count), _bias(b2, count)
        mu_hat = jax.tree_util.tree_map(lambda m: m / c1.astype(m.dtype), mu)
        nu_hat = jax.tree_util.tree_map(lambda v: v / c2.astype(v.dtype), nu)
        nu_max = None
        if amsgrad:
            nu_max = jax.tree_util.tree_map(jnp.maximum, state.nu_max, nu_hat)
            nu_hat = nu_max
        lr = _rate(learning_rate, state.count)
        updates = jax.tree_util.tree_map(
            lambda m, v: -lr * (m / (jnp.sqrt(v) + eps)), mu_hat, nu_hat
        )
        updates = jax.tree_util.tree_map(lambda u, g: u.astype(g.dtype), updates, grads)
        return updates, AdamState(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return init, update


def adam_restore(b1):
    """``restore_fn`` of the verified engine: the Adam state a judging true step starts
    from.

    A phase of at most ``1 / (1 - b1)`` Adam steps (the first moment's memory) hands
    on the state of its start (moments and step count): the learned gradient, right
    only in a few POD directions, then never enters the moments, and what it would
    have added is little. A longer phase keeps the moments its flow integrated: the
    start's would be stale. (Tried and dropped: ``m = b1^L m0 + (1 - b1^L) g`` with the
    true gradient at the phase's end, which keeps the step count: deep energy reduced
    0.64x and never Adam's final loss, a tanh MLP at lr 1e-2 never Adam's 50 % loss.)
    """
    memory = 1.0 / (1.0 - float(b1)) if _concrete(b1) else 10.0

    def restore_fn(anchor_state, state):
        steps = state.count - anchor_state.count
        return optax.tree.where(steps <= memory, anchor_state, state)

    return restore_fn


def adam_surrogate(
    learning_rate,
    b1,
    b2,
    eps,
    amsgrad,
    dt,
    *,
    solver,
    substeps,
    stepsize_controller,
    max_steps,
):
    """The surrogate step: the Adam ODE in ``(a, m, v)`` over `dt`, learned gradient.

    With ``tau = count + s / eta`` (Adam steps elapsed, ``s`` the time within the step):

        dm/ds = (1 - b1) / eta (g(a) - m),   dv/ds = (1 - b2) / eta (g(a)^2 - v),
        da/ds = -mhat / (sqrt(vhat) + eps),  mhat = m / (1 - b1^tau), vhat = v / (1 - b2^tau).

    Its semi-implicit Euler step with ``ds = eta`` is exactly one Adam step, so the
    moments carry over unchanged into the next true phase. With AMSGrad the running
    max is held fixed within the step (the denominator uses ``max(nu_max, vhat(s))``)
    and updated at its end.
    """

    def surrogate_fn(model, params, base_state, dtype, span=1, gate=None):
        # A scheduled rate is held at its value at the step's start over the step (a
        # surrogate step of `span` > 1 Adam steps included); `dt` then follows it.
        eta = _rate(learning_rate, base_state.count)

        # `span` Adam steps (the int 1, or an int32 array) in one surrogate step.
        def vector_field(s, y, args):
            a, m, v = y
            count0, nu_max = args
            g = model.lift(model.flow(s, model.project(a, dtype)), like=a)
            tau = count0 + s / eta
            c1, c2 = 1 - b1**tau, 1 - b2**tau

            def da(m_, v_, vm_):
                v_hat = v_ / c2
                if vm_ is not None:
                    v_hat = jnp.maximum(vm_, v_hat)
                return -(m_ / c1) / (jnp.sqrt(v_hat) + eps)

            dm = jax.tree_util.tree_map(lambda g_, m_: (1 - b1) / eta * (g_ - m_), g, m)

            # A learned gradient is a mean: v relaxes toward E[g^2] = mean^2 / (1 - r^2)
            # for measurements of relative noise r (exactly g^2 when they are exact).
            # Under noise it does not decay: per coordinate, the true v also holds the
            # variance, which the mean has lost; without it the coordinates where noise
            # dominates (mean ~ 0) would move at the full rate, like sign descent.
            def dv_(g_, v_):
                rate = g_**2 * second - v_
                if noisy is not None:  # (the fixed schedule does not measure noise)
                    rate = jnp.where(noisy, jnp.maximum(rate, 0), rate)
                return (1 - b2) / eta * rate

            dv = jax.tree_util.tree_map(dv_, g, v)
            if nu_max is None:
                dadt = jax.tree_util.tree_map(lambda m_, v_: da(m_, v_, None), m, v)
            else:
                dadt = jax.tree_util.tree_map(da, m, v, nu_max)
            return dadt, dm, dv

        second = second_moment_scale(jnp.asarray(model.noise, dtype))
        noisy = None
        if isinstance(model.noise, jax.Array):
            noisy = jnp.asarray(model.noise, dtype) > NOISE_FLOOR

        def to_fit(tree):
            return jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), tree)

        # The moments live in the engine's layout, like `params` (`elementwise_base`).
        y0 = to_fit((params, base_state.mu, base_state.nu))
        count0 = base_state.count.astype(dtype)
        nu_max0 = None if base_state.nu_max is None else to_fit(base_state.nu_max)
        dt_ = jnp.asarray(eta if dt is None else dt, dtype)
        (a1, m1, v1), ok = integrate_span(
            vector_field,
            y0,
            dt_,
            span,
            solver=solver,
            substeps=substeps,
            stepsize_controller=stepsize_controller,
            max_steps=max_steps,
            args=(count0, nu_max0),
            # Each interval starts `dt / eta` Adam steps after the previous one.
            shift_args=lambda a, k: (a[0] + k.astype(dtype) * dt_ / eta, a[1]),
        )
        if isinstance(span, int) and span == 1:
            count = jnp.asarray(optax.safe_increment(base_state.count))
        else:
            count = base_state.count + jnp.asarray(span, base_state.count.dtype)
        nu_max = None
        if nu_max0 is not None:
            # The running max is over the bias-corrected v at the step's end, as in optax.
            c2 = 1 - b2 ** (count0 + span * dt_ / eta)
            nu_max = optax.tree.cast_like(
                jax.tree_util.tree_map(lambda vm, v: jnp.maximum(vm, v / c2), nu_max0, v1),
                base_state.nu_max,  # pyright: ignore[reportArgumentType] (not None here)
            )
        new_state = AdamState(
            count=count,
            mu=optax.tree.cast_like(m1, base_state.mu),
            nu=optax.tree.cast_like(v1, base_state.nu),
            nu_max=nu_max,
        )
        updates = optax.tree.cast_like(optax.tree.sub(a1, y0[0]), params)
        if gate is None:
            return updates, new_state, ok
        updates, code = gate_step(updates, ok, gate)
        return updates, new_state, code

    return surrogate_fn


def lgf_adam(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    dt: float | None = None,
    schedule: Verified | Fixed | None = None,
    fit: Fit | None = None,
    integrator: Integrator | None = None,
    buffer_dtype=None,
    amsgrad: bool = False,
    restore_moments: bool | None = None,
    gradient_basis: bool | None = None,
    **old_keywords,
) -> optax.GradientTransformationExtraArgs:
    """Learned gradient flow (LGF) with Adam as the base optimiser.

    True Adam steps (identical to `optax.adam`) record the iterates and their
    gradients. A sparse polynomial model of the gradient, ``g(a) ~ Theta(a) Xi``, is
    fitted to them by STLSQ (in a POD basis of the iterates), and surrogate steps
    integrate the Adam ODE

        dm/dt = (1 - b1)/eta (g - m),  dv/dt = (1 - b2)/eta (g^2 - v),
        da/dt = -mhat / (sqrt(vhat) + eps)

    over `dt` with diffrax, with the learned ``g`` and continuous bias corrections.
    One Adam step is the semi-implicit Euler step of this ODE with ``dt = eta``, so
    the moments carry over into the next true phase and the step counter advances by
    one per surrogate step as well. Use `lgfjax.value_and_grad` so that the objective
    is not evaluated in surrogate steps. The schedules and safeguards are those of
    `lgfjax.lgf`.

    **Arguments:**

    - `learning_rate`, `b1`, `b2`, `eps`: Adam's, as in `optax.adam`; `learning_rate`
      may be an optax schedule (of the Adam steps taken, true and surrogate): each
      surrogate step then integrates the Adam ODE over its own scheduled rate.
    - `dt`: integration time of one surrogate step; default `learning_rate` (one
      Adam step's worth of time).
    - `schedule`, `fit`: as in `lgfjax.lgf` (`lgfjax.Fixed`'s derivative options do
      not apply: the gradients are recorded). Under the verified schedule the judging
      true step compares the learned gradient with the true one.
    - `integrator`: as in `lgfjax.lgf`; the trust region's default here is 10.
    - `buffer_dtype`: storage dtype of the iterate and gradient buffers.
    - `amsgrad`: use AMSGrad's running max of ``vhat`` (as `optax.amsgrad`).
    - `restore_moments`: verified schedule (default True): a surrogate phase of at most
      ``1 / (1 - b1)`` Adam steps moves the parameters only; the true step that judges
      it starts from the Adam state (moments and step count) of the phase's start (a
      longer phase keeps the moments it integrated): moments integrated with a learned
      gradient in a few POD directions would steer the later true steps into slower
      progress. With it, a phase that lowered the loss also resumes after a refit when
      the judging step disagrees, and the next phase's length aims the judged error at
      the schedule's tolerance.
    - `gradient_basis`: verified schedule with a POD rank (default True): the learned
      gradient lives in a POD basis of the recorded gradients (its input is still the
      iterate's POD coordinates), and the judging step measures its error against the
      whole true gradient, not only its part in a basis.
    - `old_keywords` (``**``): the flat keywords of earlier releases, as in `lgfjax.lgf`.

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state is an
    `lgfjax.VerifiedState` (verified) or an `lgfjax.LGFState` (fixed); its
    ``base_state`` is an `AdamState`.

    ```python
    import jax, jax.numpy as jnp, optax, lgfjax

    def loss(x):
        return 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * (x - 1.0) ** 2)

    opt = lgfjax.lgf_adam(0.05, schedule=lgfjax.Fixed(10, 30))
    params = jnp.zeros(2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        _, grads = lgfjax.value_and_grad(loss)(params, state)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(300):
        params, state = step(params, state)
    assert lgfjax.gradient_evaluations(state) == 100 and loss(params) < 1e-3
    ```
    """
    schedule, fit, integrator = from_keywords("lgf_adam", schedule, fit, integrator, old_keywords)
    options = flat_options(schedule, fit, integrator, max_step_ratio=10.0, derivatives=False)
    return _lgf_adam(
        learning_rate,
        b1,
        b2,
        eps,
        dt=dt,
        buffer_dtype=buffer_dtype,
        amsgrad=amsgrad,
        restore_moments=restore_moments,
        gradient_basis=gradient_basis,
        **options,
    )


def _lgf_adam(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    history_size: int | None = None,
    retrain_interval: int | None = None,
    schedule: str | None = None,
    verify_tolerance: float = 0.2,
    dt: float | None = None,
    poly_order: int = 1,
    include_bias: bool = True,
    rank: int | None | str = "auto",
    center: bool | None = None,
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
    max_step_ratio: float | None = 10.0,
    check_every: int | None = None,
    check_tolerance: float = 0.0,
    adaptive: bool = False,
    max_surrogate_steps: int | None = None,
    max_horizon: int = 8,
    buffer_dtype=None,
    amsgrad: bool = False,
    restore_moments: bool | None = None,
    gradient_basis: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
    """`lgf_adam` with the flat options of earlier releases, checked and built."""
    scheduled = callable(learning_rate)
    if scheduled and dt is not None:
        raise ValueError(
            "`dt` must be None when `learning_rate` is a schedule: each surrogate step then "
            f"integrates over the scheduled rate of its Adam step, got dt={dt!r}."
        )
    if not scheduled:
        check_positive("learning_rate", learning_rate)
    for name, value in (("b1", b1), ("b2", b2)):
        if _concrete(value) and not 0.0 <= float(value) < 1.0:
            raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")
    check_nonnegative("eps", eps)
    check_bool("amsgrad", amsgrad)
    surrogate_dt = None if scheduled else dt
    if dt is None:  # (for the checks: a schedule's first rate)
        dt = float(learning_rate(0)) if scheduled else learning_rate  # pyright: ignore
    # A linear gradient model needs at least two (iterate, gradient) pairs.
    schedule, cfg = fit_options(
        min_history=2, **shared_options(fit_options, locals(), "min_history")
    )
    for name, value in (("restore_moments", restore_moments), ("gradient_basis", gradient_basis)):
        if value is not None:
            check_bool(name, value)
            if schedule != "verified":
                raise ValueError(
                    f"`{name}` applies to schedule='verified' only, got {name}={value!r}."
                )
    verified_options = (
        dict(
            restore_state=restore_moments is not False,
            target_basis=gradient_basis is not False,
            # A phase that lowered the loss keeps going after a refit with the judging pair:
            # the disagreement says the model needs that pair, not that the phase did harm.
            # (Safe only with restored moments: without, deep energy needs 1.42x Adam's.)
            resume_on_drop=restore_moments is not False,
            # The next phase's length aims the judged error at the tolerance (the error
            # grows about linearly with the length), instead of doubling or halving.
            length_from_error=restore_moments is not False,
        )
        if schedule == "verified"
        else {}
    )
    base_init, base_update = adam_base(learning_rate, b1, b2, eps, amsgrad)
    surrogate_fn = adam_surrogate(
        learning_rate,
        b1,
        b2,
        eps,
        amsgrad,
        surrogate_dt,
        solver=solver,
        substeps=substeps,
        stepsize_controller=stepsize_controller,
        max_steps=16 * substeps if max_steps is None else max_steps,
    )
    return build_engine(
        base_init,
        base_update,
        surrogate_fn,
        # Adam's flow models the gradient itself, which a true step receives.
        target_fn=lambda grads, true_update: grads,
        record_gradients=True,
        restore_fn=adam_restore(b1),
        # Adam is elementwise: its moments live in the engine's (flat) layout, where
        # the surrogate integrates them.
        elementwise_base=True,
        **verified_options,
        **shared_options(build_engine, locals(), "target_fn", "record_gradients"),
    )
