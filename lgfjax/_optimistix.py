"""`LGFMinimiser`: an LGF transformation as an `optimistix` minimiser.

optimistix is an optional dependency: this module imports it at the top, so it is
only imported when `LGFMinimiser` is asked for (``from lgfjax._optimistix import
LGFMinimiser``, or ``lgfjax.LGFMinimiser`` through the package's lazy attribute).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import optax
import optimistix as optx
from jaxtyping import Array, Bool, Int, PyTree, Scalar

from ._state import find_state, needs_gradient


class _LGFMinimiserState(eqx.Module):
    step: Int[Array, ""]  # int32: solver steps taken (true and surrogate)
    f: Scalar  # f's dtype: objective at the last true step (dtype max before any)
    opt_state: Any  # the LGF transformation's state (an `lgfjax.LGFState` inside)
    terminate: Bool[Array, ""]  # bool: the last true step met the tolerance
    function_evaluations: Int[Array, ""]  # int32: calls of fn (with or without grad)


def _small_step(rtol, atol, norm, y, dy, f, df) -> Bool[Array, ""]:
    # optimistix's Cauchy test (as in its OptaxMinimiser), written out here so that
    # nothing private of optimistix is imported.
    y_scale = jax.tree_util.tree_map(lambda a: atol + rtol * jnp.abs(a), y)
    dy_rel = jax.tree_util.tree_map(lambda d, s: jnp.abs(d) / s, dy, y_scale)
    return (norm(dy_rel) < 1) & (jnp.abs(df) < atol + rtol * jnp.abs(f))


def _zeros_like_struct(struct):
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), struct)


class LGFMinimiser(optx.AbstractMinimiser):
    """Learned gradient flow as an `optimistix.AbstractMinimiser`.

    Each step is one update of `optim`, an lgfjax transformation such as
    `lgfjax.lgf(optax.sgd(lr), ...)`. In true steps ``fn`` is evaluated with its
    gradient; in surrogate steps neither ``fn`` nor its gradient is computed (a
    `jax.lax.cond` skips them), unlike ``optimistix.OptaxMinimiser(lgfjax.lgf(...))``,
    which evaluates ``fn`` and its gradient in every step and so saves nothing.

    Termination is decided at true steps only, with optimistix's Cauchy criterion on
    that true step: the step ``dy`` is small, ``norm(|dy| / (atol + rtol |y|)) < 1``,
    and so is the change of ``fn`` since the previous true step,
    ``|f - f_prev| < atol + rtol |f|``. Surrogate steps never terminate: their moves
    come from the learned model, not from the objective, and their values are not
    known. A converged run therefore ends on a true step, possibly after finishing
    a surrogate phase (all without gradients: at most ``retrain_interval -
    history_size`` extra steps under `lgfjax.Fixed`, and the phase's planned length,
    at most the schedule's ``max_surrogate_steps``, under `lgfjax.Verified`).
    ``sol.stats`` reports ``gradient_evaluations`` (true gradients) and
    ``function_evaluations`` (calls of ``fn``, including any value checks);
    ``num_steps`` counts every step. The loss of each true step is
    passed as ``value``, and ``value_fn`` is ``fn(y, args)`` (evaluated without a
    gradient: `lgfjax.Fixed`'s ``check_every`` checks, or the verified schedule's
    paired comparisons under noise).

    **Arguments:**

    - `optim`: an lgfjax transformation (`lgfjax.lgf`, `lgfjax.lgf_adam`, possibly
      chained with other optax transformations).
    - `rtol`, `atol`: tolerances of the termination test above.
    - `norm`: the norm of the step test, e.g. `optimistix.max_norm` (default).
    - `verbose`: as for optimistix's solvers (False, True or a callable).

    ```python
    import jax.numpy as jnp, optax, optimistix as optx, lgfjax
    from lgfjax._optimistix import LGFMinimiser

    def fn(x, args):
        return 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * x**2)

    opt = lgfjax.lgf(optax.sgd(0.2), dt=0.2, schedule=lgfjax.Fixed(6, 30))
    sol = optx.minimise(fn, LGFMinimiser(opt, rtol=1e-6, atol=1e-8), jnp.ones(2),
                        max_steps=500)
    assert jnp.allclose(sol.value, 0.0, atol=1e-5)
    assert sol.stats["gradient_evaluations"] < sol.stats["num_steps"]
    ```
    """

    optim: Any
    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar]
    verbose: Callable[..., None]

    def __init__(
        self,
        optim: optax.GradientTransformation,
        rtol: float,
        atol: float,
        norm: Callable[[PyTree], Scalar] = optx.max_norm,
        verbose: bool | Callable[..., None] = False,
    ):
        if not isinstance(optim, optax.GradientTransformation):
            raise ValueError(f"`optim` must be an optax transformation, got {optim!r}.")
        # optax transformations are closures; make any arrays they hold visible to
        # JAX, as optimistix.OptaxMinimiser does.
        self.optim = eqxi.closure_to_pytree(optim)
        self.rtol = rtol
        self.atol = atol
        self.norm = norm
        if verbose is False:
            self.verbose = lambda **kwargs: None
        elif verbose is True:
            self.verbose = lambda **kwargs: jax.debug.print(
                ", ".join(f"{name}: {{}}" for name, _ in kwargs.values()),
                *(v for _, v in kwargs.values()),
            )
        else:
            self.verbose = verbose

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del fn, args, options, aux_struct, tags
        opt_state = self.optim.init(y)
        find_state(opt_state)  # fails early if `optim` holds no LGF state
        return _LGFMinimiserState(
            step=jnp.zeros((), jnp.int32),
            f=jnp.array(jnp.finfo(f_struct.dtype).max, f_struct.dtype),
            opt_state=opt_state,
            terminate=jnp.array(False),
            function_evaluations=jnp.zeros((), jnp.int32),
        )

    def step(self, fn, y, args, options, state, tags):
        del options, tags
        true_step = needs_gradient(state.opt_state)
        value_and_grad = eqx.filter_value_and_grad(fn, has_aux=True)

        def evaluate(y):
            (f, aux), grads = value_and_grad(y, args)
            return f, aux, grads

        def skip(y):
            (_, aux_struct) = jax.eval_shape(fn, y, args)
            grads = jax.tree_util.tree_map(jnp.zeros_like, y)
            return state.f, _zeros_like_struct(aux_struct), grads

        f, aux, grads = jax.lax.cond(true_step, evaluate, skip, y)
        self.verbose(
            num_steps=("Step", state.step),
            true_step=("True step", true_step),
            loss=("Loss at the last true step", f),
        )
        lgf_before = find_state(state.opt_state)
        # `value` lets the verified schedule judge each phase by the loss (it reads it at
        # true steps only); `value_fn` serves the fixed schedule's checks.
        updates, opt_state = self.optim.update(
            grads, state.opt_state, y, value=f, value_fn=lambda z: fn(z, args)[0]
        )
        checks = find_state(opt_state).info.value_evaluations - lgf_before.info.value_evaluations
        new_y = eqx.apply_updates(y, updates)
        converged = _small_step(self.rtol, self.atol, self.norm, y, updates, f, f - state.f)
        return (
            new_y,
            _LGFMinimiserState(
                step=state.step + 1,
                f=jnp.where(true_step, f, state.f),
                opt_state=opt_state,
                terminate=true_step & converged,
                function_evaluations=state.function_evaluations + true_step + checks,
            ),
            aux,
        )

    def terminate(self, fn, y, args, options, state, tags):
        del fn, y, args, options, tags
        return state.terminate, optx.RESULTS.successful

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        del fn, args, options, tags, result
        lgf_state = find_state(state.opt_state)
        stats = {
            "gradient_evaluations": lgf_state.info.gradient_evaluations,
            "function_evaluations": state.function_evaluations,
            "fallbacks": lgf_state.info.fallbacks,
        }
        return y, aux, stats
