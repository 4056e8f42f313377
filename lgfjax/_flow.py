"""The learned flow: a polynomial vector field and its integration with diffrax."""

from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from ._library import polynomial_library
from ._sharding import explicit_out_sharding

_rk4_tableau = diffrax.ButcherTableau(
    a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    # Embedded midpoint rule, only used if an adaptive controller is chosen.
    b_error=np.array([1 / 6, -2 / 3, 1 / 3, 1 / 6]),
    c=np.array([0.5, 0.5, 1.0]),
)


class RK4(diffrax.AbstractERK):
    """The classical fourth-order Runge--Kutta method, four stages.

    diffrax ships no classical RK4; the LGF paper integrates with it, so it is provided
    here as a diffrax solver. Its error estimate (against the midpoint rule) is only
    used with an adaptive step-size controller.
    """

    tableau: ClassVar[diffrax.ButcherTableau] = _rk4_tableau
    interpolation_cls: ClassVar = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        del terms
        return 4


class PolynomialFlow(eqx.Module):
    """The vector field ``dz/dt = polynomial_library(z) @ coefficients``.

    **Arguments:**

    - `coefficients`: ``(P, r)`` coefficients of the library columns.
    - `degree`, `include_bias`: the library, as in `lgfjax.polynomial_library`.
    """

    coefficients: Float[Array, "P r"]
    degree: int = eqx.field(static=True)
    include_bias: bool = eqx.field(static=True)

    def __call__(self, t, z: Float[Array, " r"], args=None) -> Float[Array, " r"]:
        del t, args
        return polynomial_library(z, self.degree, self.include_bias) @ self.coefficients


def integrate(
    vector_field,
    y0,
    t1,
    *,
    solver: diffrax.AbstractSolver,
    substeps: int,
    stepsize_controller: diffrax.AbstractStepSizeController,
    max_steps: int,
    t0=0.0,
    args=None,
) -> tuple[Float[Array, "..."], Bool[Array, ""]]:
    """Integrate ``dy/dt = vector_field(t, y, args)`` from `t0` to `t1`.

    Returns the state at `t1` and whether diffrax reported success. diffrax never
    raises here (``throw=False``), and no backward pass is ever built (forward-mode
    adjoint), because the surrogate step is not differentiated.
    """
    dt0 = (t1 - t0) / substeps

    def solve(y0, args, field):
        if isinstance(stepsize_controller, diffrax.ConstantStepSize) and max_steps >= substeps:
            return _fixed_steps(field, y0, t0, t1, dt0, args, solver, substeps)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            t0=t0,
            t1=t1,
            dt0=dt0,
            y0=y0,
            args=args,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=stepsize_controller,
            max_steps=max_steps,
            throw=False,
            adjoint=diffrax.ForwardMode(),
        )
        y1 = jax.tree_util.tree_map(lambda y: y[0], sol.ys)
        return y1, sol.result == diffrax.RESULTS.successful

    out_sharding = explicit_out_sharding(y0)
    if out_sharding is None:
        return solve(y0, args, vector_field)
    # diffrax's step buffers cannot hold explicitly sharded states: solve with the
    # mesh axes in auto mode and hand the result back laid out like `y0`. Arrays the
    # vector field closes over become explicit arguments, as `auto_axes` requires.
    converted, consts = jax.closure_convert(vector_field, jnp.asarray(t0), y0, args)

    def solve_converted(y0, args, consts):
        return solve(y0, args, lambda t, y, a: converted(t, y, a, *consts))

    auto = jax.sharding.auto_axes(solve_converted, out_sharding=out_sharding)
    return auto(y0, args, consts)  # pyright: ignore[reportCallIssue] (typed as one argument)


def _fixed_steps(field, y0, t0, t1, dt0, args, solver, substeps: int):
    """`substeps` steps of `solver` from `t0` to `t1`, as `diffrax.diffeqsolve` takes them
    with a `diffrax.ConstantStepSize` controller, without its machinery.

    The step times are diffrax's own (``t0 + dt0``, then ``t0 + (t1 - t0) k / substeps``,
    the last exactly `t1`); what is left out (the adaptive loop, its error checks,
    dense output and saving) is what makes ``diffeqsolve`` several times as expensive
    to compile as the steps themselves. An explicit Runge--Kutta solver that is not
    first-same-as-last (`RK4`, Heun, ...) takes its tableau's steps in `erk_step`, the
    same scheme rounded differently; any other solver takes its own ``step``, the same
    to the bit, and reports its own result (`ok` is its success flag).
    """
    term = diffrax.ODETerm(field)
    unrolled = _unrolled_tableau(solver)
    t0 = jnp.asarray(t0, jnp.result_type(t1))
    first = t0 + dt0

    def time(k):  # the end of step k (1-based), as diffrax's controller computes it
        frac = jnp.asarray(k, t1.dtype) / jnp.asarray(substeps, t1.dtype)
        tk = jnp.where(k == 1, first, t0 + (t1 - t0) * frac)
        return jnp.where(k == substeps, t1, tk)

    def step(k, carry):
        y, ok, state, tprev = carry
        tnext = time(k + 1)
        if unrolled is not None:
            return erk_step(unrolled, field, tprev, tnext, y, args), ok, state, tnext
        y, _, _, state, result = solver.step(term, tprev, tnext, y, args, state, False)
        return y, ok & (result == diffrax.RESULTS.successful), state, tnext

    state = None if unrolled is not None else solver.init(term, t0, time(1), y0, args)
    carry = (y0, jnp.asarray(True), state, t0)
    if substeps == 1:
        carry = step(0, carry)
    else:
        carry = jax.lax.fori_loop(0, substeps, step, carry)
    return carry[0], carry[1]


def _unrolled_tableau(solver):
    """The Butcher tableau of an explicit Runge--Kutta solver whose steps `erk_step`
    takes (neither first-same-as-last nor solution-same-as-last), or None."""
    if not isinstance(solver, diffrax.AbstractERK):
        return None
    tableau = solver.tableau
    if not isinstance(tableau, diffrax.ButcherTableau) or tableau.fsal or tableau.ssal:
        return None
    return tableau


def erk_step(tableau: diffrax.ButcherTableau, field, t0, t1, y0, args):
    """One step of an explicit Runge--Kutta method, its stages written out.

    The arithmetic is diffrax's (each stage's ``k_j = h f(t_j, y_j)``, then
    ``y0 + sum_j a_ij k_j``) with the tableau's zero coefficients left out: no stage
    buffer and no loop over the stages, so that the stages' elementwise work fuses.
    For a full-space state (`lgf_adam`'s moments) diffrax's stage buffers and their
    (stages, n) contractions cost several passes over ``n`` per stage.
    """
    h = t1 - t0
    ks = []

    def combine(coefficients):
        used = [j for j, a in enumerate(coefficients[: len(ks)]) if float(a) != 0.0]

        def leaf(y, *kj):
            total = y
            for j, k in zip(used, kj):
                total = total + jnp.asarray(float(coefficients[j]), k.dtype) * k
            return total

        return jax.tree_util.tree_map(leaf, y0, *(ks[j] for j in used))

    for i in range(len(tableau.b_sol)):
        yi = y0 if i == 0 else combine(tableau.a_lower[i - 1])
        ti = t0 if i == 0 else t0 + jnp.asarray(float(tableau.c[i - 1]), h.dtype) * h
        f = field(ti, yi, args)
        ks.append(jax.tree_util.tree_map(lambda x: x * h.astype(x.dtype), f))
    return combine(tableau.b_sol)


def integrate_span(vector_field, y0, dt, span, *, args=None, shift_args=None, **options):
    """`integrate` over `span` consecutive intervals of length `dt`.

    `span` is the Python int 1 (one solve, exactly `integrate`) or an int32 array:
    then one diffrax solve over the static length `dt` runs in a while loop `span`
    times. A traced end time would make diffrax's program about 13x larger (its step
    count is no longer known when compiling), and compile time with it.
    ``shift_args(args, k)`` gives the arguments of the k-th interval (for a vector
    field whose time origin moves, as the Adam ODE's step count does).
    """
    if isinstance(span, int) and span == 1:
        return integrate(vector_field, y0, dt, args=args, **options)

    def body(carry):
        k, y, ok = carry
        a = args if shift_args is None else shift_args(args, k)
        y1, ok1 = integrate(vector_field, y, dt, args=a, **options)
        return k + 1, y1, ok & ok1

    carry = (jnp.zeros((), jnp.int32), y0, jnp.asarray(True))
    _, y, ok = jax.lax.while_loop(lambda c: c[0] < span, body, carry)
    return y, ok
