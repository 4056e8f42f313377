"""The best true point, and a run that returns to it rather than stay far above it.

The guarantee, in one line: **the loss at true steps never stays above the bound for
more than `history_size` true steps in a row; if it would, the run returns to the best
true point and the base's own state there, and its next phases are short**; once per
best point (from it the base's own steps may rise again, and a second return would
replay them). An adaptive base (Adam, RMSProp) returns with the larger of the kept
second moment and the one the run reached (`larger_second_moment`): the stay's
gradients are what keeps its steps from replaying the rise.

The bound is the best true loss so far plus the smaller of

- 9 times that loss (where it is not negative: 10x the best, for losses whose minimum
  is 0, such as least squares; a best of exactly 0 leaves no margin), and
- half the descent made from the first true loss to the best (a run that lost half
  of its progress: for any loss, whatever its offset or sign, such as a log-misfit or
  an energy),

plus 4 standard errors of the loss where the best was found (mini-batches) and 64 ulps
of the first true loss's size (the rounding of the loss's own sum near a minimum).
(It was 1e-6 of the first loss, with the factor rule for positive bests only: on
DENSCHNF, sif2jax, `lgf_adam` reached a loss of exactly 0, then sat at 3e-6 and ended
at 9.5e-3, all below that floor, where Adam ended at 2.6e-18; now it returns and ends
at 0.)

It costs no gradient (it reads the losses the true steps pass as `value`) and one copy
of the parameters (and the base's state) whenever a true step finds a new best.
`lgfjax.best_params` hands that point back; `Diagnostics.returns` counts the returns.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._engine import once_or_never

# How far above the best true loss a run may stay (for `history_size` true steps): a
# factor of the best (losses with minimum 0), or a share of the descent made so far.
SPIKE_FACTOR = 10.0
SPIKE_PROGRESS = 0.5
# Standard errors of the loss (mini-batches) added to that bound.
SPIKE_ERRORS = 4.0
# And this many ulps of the first true loss: a converged run's losses at the rounding
# of the loss's own sum are not a spike.
SPIKE_ROUNDING = 64


class Best(NamedTuple):
    params: PyTree[Array]  # the true iterate with the lowest loss so far (engine layout)
    base_state: Any  # the base's state there
    loss: Float[Array, ""]  # its loss (inf before the first)
    above: Int[Array, ""]  # consecutive true steps with a loss above the bound since
    returns: Int[Array, ""]  # how often the run returned to it
    first: Float[Array, ""]  # the first true loss (nan before it)
    error: Float[Array, ""]  # the loss's standard error when the best was found
    armed: Bool[Array, ""]  # no return to this best yet (one return per best point)


def init_best(params, base_state, dtype, copy) -> Best:
    return Best(
        copy(params),
        copy(base_state),
        jnp.full((), jnp.inf, dtype),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
        jnp.full((), jnp.nan, dtype),
        jnp.zeros((), dtype),
        jnp.asarray(True),
    )


def watch(best: Best, is_true, loss, patience: int) -> tuple[Bool[Array, ""], Any]:
    """``(go_back, above)``: whether this true step's `loss` ends a stay above the bound
    of `patience` true steps, and the new count of steps above it.

    The standard error in the bound is the one measured when the best was found: a run
    whose losses fluctuate by themselves (Adam's oscillation at a fixed rate, a
    mini-batch's noise) has a wide bound, and one that descended smoothly and then
    jumped has a narrow one, however much it fluctuates after the jump."""
    first = jnp.where(jnp.isfinite(best.first), best.first, jnp.inf)
    eps = jnp.finfo(best.loss.dtype).eps
    floor = SPIKE_ROUNDING * eps * jnp.abs(jnp.where(jnp.isfinite(first), first, 0))
    spread = SPIKE_ERRORS * best.error + floor
    factor = jnp.where(best.loss >= 0, (SPIKE_FACTOR - 1) * best.loss, jnp.inf)
    margin = jnp.minimum(factor, SPIKE_PROGRESS * (first - best.loss))
    bound = best.loss + margin + spread
    high = is_true & jnp.isfinite(best.loss) & jnp.isfinite(loss) & ~(loss <= bound)
    above = jnp.where(is_true, jnp.where(high, best.above + 1, 0), best.above)
    # One return per best point: from it, the base's own steps may rise again (Adam at a
    # fixed rate oscillates above a lucky best), and returning again would replay them.
    go_back = high & (above >= patience) & best.armed
    return go_back, jnp.where(go_back, 0, above).astype(jnp.int32)


def larger_second_moment(kept, reached):
    """The base state `kept` at the best point, with the larger of its second moments
    and those of the state the run `reached`.

    A second moment is a state field named ``nu`` (and AMSGrad's ``nu_max``), as in
    optax's Adam, AdamW, AMSGrad, RMSProp and `lgf_adam`; a base without one comes back
    as kept. A run returns after its true steps stayed far above the best: at a fixed
    rate that is mostly the base's own instability (``nu`` decayed until the steps
    outgrew the curvature), and the kept state would replay it step for step. The
    stay's gradients raised ``nu``; keeping them shortens the steps, as Adam recovers
    from its own spikes. SROSENBR (n = 5,000, `lgf_adam(1e-2)`, 1,000 gradients) with
    the kept state returned three times to a best of 1.2e-3, rose to 0.4-50 after each,
    and ended at 87; with the larger ``nu`` it ends at 1.9e-4 (Adam: 2.0e-3).
    """

    def moments(state):
        return isinstance(state, tuple) and "nu" in getattr(state, "_fields", ())

    def merge(k, r):
        if not moments(k):
            return k
        larger = {
            name: jax.tree_util.tree_map(jnp.maximum, getattr(k, name), getattr(r, name))
            for name in ("nu", "nu_max")
            if name in k._fields and getattr(k, name) is not None
        }
        return k._replace(**larger)

    return jax.tree_util.tree_map(merge, kept, reached, is_leaf=moments)


def back_to_best(go_back, best: Best, params, step, base_state):
    """``(step, base_state)`` that lead to the best true point (once or never), with
    the base state kept there and the larger second moments (`larger_second_moment`).
    """

    def back(carry):
        # The state reached is read from the loop's carry, not the enclosing scope: a
        # captured operand of the in-place loop would be copied on every update.
        _, reached = carry
        way = optax.tree.sub(optax.tree.cast_like(best.params, params), params)
        return optax.tree.cast_like(way, step), larger_second_moment(best.base_state, reached)

    return once_or_never(go_back, back, (step, base_state))


def keep_best_point(best: Best, when, params, base_state):
    """``(best, params, base_state)``: `best` with `params` and `base_state` written in
    place if `when` (a new best), before the step that would update the state in place
    (`keep_best` then records the loss). The caller goes on with the `params` and
    `base_state` returned: they pass through the loop's carry, as operands captured by
    an in-place loop would be copied on every update."""

    def write(carry):
        _, point = carry
        return jax.tree_util.tree_map(jnp.copy, point), point

    kept, point = once_or_never(when, write, ((best.params, best.base_state), (params, base_state)))
    return best._replace(params=kept[0], base_state=kept[1]), point[0], point[1]


def keep_best(best: Best, when, loss, error, above, go_back) -> Best:
    """`best` (its point already written by `keep_best_point`) with this true step's
    loss and standard error if `when` (a new best), and its counters advanced."""
    return best._replace(
        loss=jnp.where(when, loss, best.loss).astype(best.loss.dtype),
        above=jnp.where(when, 0, above).astype(jnp.int32),
        returns=(best.returns + go_back).astype(jnp.int32),
        first=jnp.where(jnp.isnan(best.first) & when, loss, best.first).astype(best.first.dtype),
        error=jnp.where(when, error, best.error).astype(best.error.dtype),
        armed=(when | best.armed) & ~go_back,
    )
