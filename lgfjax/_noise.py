"""Noise in what a true step measures: verdicts that stay valid under mini-batches.

With mini-batch gradients or resampled collocation points, two losses from different
batches differ by noise, and one gradient differs from the learned flow by noise, even
when the flow is right. The verified schedule's verdicts take that into account:

- **The loss.** A loss comes with a standard error: the spread of per-sample losses over
  the square root of their number when `value` is a vector of them, else an estimate
  from the rises between consecutive true steps' losses, and over each kept surrogate
  phase (from its start's loss to its judging step's; zero while they only fall, as in
  a deterministic descent). With a
  `value_fn` bound to the judging step's batch, the phase's start is evaluated on that
  same batch (a paired comparison, as stochastic line searches do); per-sample vectors
  then give the paired difference's standard error. A phase is undone when the loss rose
  by more than `Z` standard errors (plus the loss's rounding), and the verdict is
  *inconclusive* when the change is within them: no evidence either way, so the next
  phase keeps the length it had.
- **The flow.** The relative noise of the recorded measurements is estimated from their
  second differences along consecutive true steps (a smooth trajectory has almost none;
  independent noise of variance s^2 gives 6 s^2), and the flow agrees with a true step
  when its error is within ``max(verify_tolerance, KAPPA * noise)``.

A deterministic run keeps its strictness: a loss that never rises between consecutive
true steps has standard error zero, and smooth measurements have noise near zero.
"""

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

# A phase is undone (or judged inconclusive) against Z standard errors of the loss
# difference: about 2.3 % of phases that did not change the loss are undone by noise.
Z = 2.0
# The flow agrees while its error is within KAPPA times the measurements' noise: the
# error of a right flow against one noisy measurement is about the noise itself.
KAPPA = 2.0
# Rounding of a loss: a rise within ROUNDING * eps * |loss| is not a rise.
ROUNDING = 64
# A paired comparison (one value evaluation) is spent on a phase of at least this many
# surrogate steps, and only when the free comparison leaves it in doubt: a shorter phase
# saves fewer gradients than that, and changes the loss by little next to its noise.
PAIRED_MIN_LENGTH = 4
# Weight of the newest rise in the loss noise's running mean.
RISE_WEIGHT = 0.1
# Below this relative noise, measurements count as exact (no change to any rule).
NOISE_FLOOR = 0.1
# What is known of the batches (`LossNoise.resampled`): nothing yet, one fixed objective
# (a point's loss is the same at every true step: the loss then has no noise, and its
# rises are judged as rises), or a batch drawn per true step. `RESAMPLED` is final;
# `SAME` is checked again on a rise, at most once per doubling of the run's gradients
# (see `same_batch`).
UNKNOWN, SAME, RESAMPLED = 0, 1, 2
# Once batches are known to be resampled, a confirmed phase whose change of the loss was
# within its noise lengthens its steps to this many `dt` (mini-batches: the learned flow
# is the mean of the noisy steps, and a longer step costs no gradient).
NOISY_HORIZON = 2


class LossNoise(NamedTuple):
    """Scalars that track the loss's noise along consecutive true steps."""

    last_loss: Float[Array, ""]  # mean loss at the last true step (nan if none)
    last_count: Int[Array, ""]  # update count of that step
    rise2: Float[Array, ""]  # running mean of squared rises between consecutive ones
    resampled: Int[Array, ""]  # `UNKNOWN`, `SAME` or `RESAMPLED` (see `same_batch`)
    checked: Int[Array, ""]  # true gradients counted when `resampled` was last checked


def init_loss_noise(dtype) -> LossNoise:
    return LossNoise(
        jnp.full((), jnp.nan, dtype),
        jnp.full((), -2, jnp.int32),
        jnp.zeros((), dtype),
        jnp.full((), UNKNOWN, jnp.int32),
        jnp.zeros((), jnp.int32),
    )


def mean_and_error(value, dtype):
    """``(mean, standard error)`` of a loss given as a scalar or per-sample losses.

    The standard error of a scalar is zero here (`LossNoise` estimates it).
    """
    value = jnp.asarray(value, dtype)
    if value.ndim == 0:
        return value, jnp.zeros((), dtype)
    count = value.size
    mean = jnp.mean(value)
    spread = jnp.std(value, ddof=1) if count > 1 else jnp.zeros((), dtype)
    return mean, spread / jnp.sqrt(jnp.asarray(count, dtype))


def track(noise: LossNoise, is_true, count, loss, kept=False) -> LossNoise:
    """`noise` after a true step with mean loss `loss` at update `count` (else as is).

    A rise from the last true step's loss is a sample if the two true steps are
    consecutive, or if this one judged a surrogate phase that it `kept` (not undone:
    an undone phase's rise was judged real, not noise). Without the phases' samples,
    a run whose phases alternate with their judging steps takes no two consecutive
    true steps, and an early rise set the estimate for good: COSINE (n = 10,000),
    `lgf_adam`, kept a deterministic descent's loss noise at 114 from its first
    gradients on, so every later verdict was inconclusive and its phases never grew
    (1,000 gradients: -9998.66 against Adam's -9999).
    """
    follows = is_true & ((noise.last_count == count - 1) | kept) & jnp.isfinite(loss)
    follows = follows & jnp.isfinite(noise.last_loss)
    rise = jnp.maximum(loss - noise.last_loss, 0)
    rise2 = jnp.where(follows, (1 - RISE_WEIGHT) * noise.rise2 + RISE_WEIGHT * rise**2, noise.rise2)
    return LossNoise(
        jnp.where(is_true, loss, noise.last_loss).astype(noise.last_loss.dtype),
        jnp.where(is_true, count, noise.last_count).astype(jnp.int32),
        rise2.astype(noise.rise2.dtype),
        noise.resampled,
        noise.checked,
    )


def same_batch(again, recorded, dtype):
    """`SAME` or `RESAMPLED`: whether a point's loss evaluated `again` (by the judging
    step's `value_fn`) is the loss `recorded` there at an earlier true step.

    The same objective gives the same value up to the rounding of its sum in another
    order (another compiled function): a few ulps times the sum's condition. Values that
    differ by more than ``sqrt(eps)`` relative came from different batches. Batch noise
    below that can still grow later, relative to the loss: a classifier's first
    cross-entropies are near ``log(10)`` on every batch (two batches' means 5e-5 apart
    relative, in float32 under ``sqrt(eps)`` = 3.5e-4), far apart once it has fallen.
    So `SAME` is not final: the engine checks it again on a rise (`_verified.judge`).
    """
    tol = jnp.sqrt(jnp.finfo(dtype).eps) * jnp.maximum(jnp.abs(again), jnp.abs(recorded))
    same = jnp.abs(again - recorded) <= tol
    return jnp.where(same, SAME, RESAMPLED).astype(jnp.int32)


def scalar_error(noise: LossNoise):
    """Standard error of one scalar loss: the rises' root mean square.

    For independent losses ``L = l + s e``, a rise ``max(L' - L, 0)`` has mean square
    ``s^2``; a loss that only falls has none.
    """
    return jnp.sqrt(noise.rise2)


def verdict(difference, error, loss, reference, dtype):
    """``(rose, inconclusive)`` for a change `difference` of the loss with standard
    error `error` (`loss` and `reference` size the rounding allowance)."""
    eps = jnp.finfo(dtype).eps
    rounding = ROUNDING * eps * jnp.maximum(jnp.abs(loss), jnp.abs(reference))
    rounding = jnp.where(jnp.isfinite(rounding), rounding, 0)
    allowance = Z * error + rounding
    rose = ~(difference <= allowance)
    inconclusive = ~rose & (error > 0) & (difference > -Z * error)
    return rose, inconclusive


def measurement_noise(gram: Float[Array, "K K"], stamps: Int[Array, " K"]):
    """Relative noise of recorded measurements from their Gram matrix ``T T^T``.

    Rows recorded at consecutive updates (`stamps` s, s + 1, s + 2; -1 marks an empty
    row) give second differences ``t_{s+2} - 2 t_{s+1} + t_s``, whose mean square is
    ``6 s^2`` for independent noise of variance ``s^2`` per row and nearly zero along a
    smooth trajectory. Returned relative to the rows' root mean square (0 without any
    such triple): ``sqrt(mean |d|^2 / 6) / rms |t|``.
    """
    order = jnp.argsort(jnp.where(stamps >= 0, stamps, jnp.iinfo(jnp.int32).max))
    s = stamps[order]
    g = gram[order][:, order]
    i = jnp.arange(s.shape[0] - 2)
    j, k = i + 1, i + 2
    valid = (s[i] >= 0) & (s[j] == s[i] + 1) & (s[k] == s[i] + 2)
    d2 = (
        g[i, i] + 4 * g[j, j] + g[k, k] - 4 * g[i, j] + 2 * g[i, k] - 4 * g[j, k]
    )  # |t_i - 2 t_j + t_k|^2
    d2 = jnp.maximum(d2, 0)
    count = jnp.sum(valid)
    mean_d2 = jnp.sum(jnp.where(valid, d2, 0)) / jnp.maximum(count, 1)
    rows = stamps >= 0
    mean_t2 = jnp.sum(jnp.where(rows, jnp.diagonal(gram), 0)) / jnp.maximum(jnp.sum(rows), 1)
    noise = jnp.sqrt(mean_d2 / 6) / jnp.sqrt(jnp.where(mean_t2 > 0, mean_t2, 1))
    noise = jnp.where((count > 0) & jnp.isfinite(noise), noise, 0)
    return noise.astype(gram.dtype)


def agreement_tolerance(tolerance, noise):
    """The flow's error accepted at a judgement: `tolerance`, or `KAPPA` times the
    measurements' relative `noise` where that is larger (and above `NOISE_FLOOR`)."""
    noisy = noise > NOISE_FLOOR
    return jnp.where(noisy, jnp.maximum(tolerance, KAPPA * noise), tolerance)


def second_moment_scale(noise):
    """Factor on ``g^2`` in the Adam ODE's second moment when ``g`` is a learned mean.

    A true ``v`` tracks ``E[g^2] = mean^2 + variance``; with the measurements' relative
    noise ``r`` (variance over ``E[g^2]``), ``E[g^2] ~ mean^2 / (1 - r^2)``. Exact
    measurements (below `NOISE_FLOOR`) keep the factor 1.
    """
    r2 = jnp.minimum(noise**2, 0.9)
    return jnp.where(noise > NOISE_FLOOR, 1 / (1 - r2), 1.0)


def mean_predicts_better(
    features: Float[Array, "K P"], target: Float[Array, "K r"], weights=None
) -> Bool[Array, ""]:
    """Whether the targets' mean predicts a left-out pair better than the full library.

    Leave-one-out errors from one fit each (PRESS), summed over the pairs with
    `weights` (default: all): the mean's residual grows by ``K / (K - 1)``; least
    squares on every column of `features` has residual ``e_i / (1 - h_ii)``, with ``h``
    the hat matrix's diagonal (a pair the fit can only interpolate, ``h_ii = 1``,
    predicts nothing). With noisy targets and few pairs an affine or polynomial fit
    extrapolates its noise: where a mini-batch phase starts, past the newest pair, it
    predicted steps several times longer than any measured one (digits MLP, batch 64:
    2-45x), and most phases were refused.
    """
    k = features.shape[0]
    dtype = target.dtype
    w = jnp.ones((k,), dtype) if weights is None else jnp.asarray(weights, dtype)
    around = target - jnp.mean(target, axis=0)
    press_mean = jnp.sum(w[:, None] * around**2) * (k / (k - 1)) ** 2
    u, s, _ = jnp.linalg.svd(features.astype(dtype), full_matrices=False)
    keep = s > jnp.finfo(dtype).eps * max(features.shape) * s[0]
    u = jnp.where(keep, u, 0)
    leverage = jnp.sum(u * u, axis=1)
    residual = target - u @ (u.T @ target)
    free = 1 - leverage
    # A left-out pair at leverage 1 (to rounding) cannot be predicted at all.
    fits = free > 16 * jnp.finfo(dtype).eps * k
    loo = residual / jnp.where(fits, free, 1)[:, None]
    press_full = jnp.sum(w[:, None] * loo**2)
    return press_mean <= jnp.where(jnp.all(fits | (w == 0)), press_full, jnp.inf)
