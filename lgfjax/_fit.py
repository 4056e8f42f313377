"""Fitting the learned flow to the recorded trajectory: POD, library, targets, STLSQ."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int

from ._derivatives import strong_form, weak_form
from ._library import polynomial_library
from ._noise import NOISE_FLOOR, mean_predicts_better
from ._pod import gram_modes, tree_basis, tree_gram, tree_project_rows
from ._sharding import gathered
from ._status import EMPTY_MODEL, FIT_FAILED, NONFINITE_TRAJECTORY, OK
from ._stlsq import stlsq


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Static description of one fit; every field is a Python value."""

    history_size: int
    degree: int
    include_bias: bool
    rank: int | None  # (the verified schedule passes "auto", resolved at its init)
    center: bool  # POD of the iterates relative to the last one (rank only)
    derivative: str  # "strong", "weak" or "tracked"
    fd_order: int
    weak_width: int | None
    weak_power: int
    threshold: float
    relative_threshold: bool  # threshold relative to the targets' typical column norm
    alpha: float
    max_iter: int
    normalize_columns: bool
    unbias: bool


class Fit(NamedTuple):
    coefficients: Float[Array, "P r"]
    basis: object  # pytree of (r, *shape) leaves, or None in full space
    energy: Float[Array, ""]
    residual: Float[Array, ""]
    active: Int[Array, ""]
    status: Int[Array, ""]
    out_basis: object = None  # with `target_basis`: POD basis of the targets (r, *shape)


def _ravel_rows(tree, dtype):
    return jax.vmap(lambda t: ravel_pytree(t)[0])(gathered(tree)).astype(dtype)


def fit_flow(cfg: FitConfig, trajectory, gradients, dt, dtype) -> Fit:
    """Fit the flow to a trajectory buffer (and, for ``"tracked"``, its gradients).

    `trajectory` leaves have shape ``(K + 1, *shape)``: the iterates at the start of
    each of the K true steps and the point the last one reached. `gradients` leaves
    have shape ``(K, *shape)``.
    """
    if cfg.rank is None:
        basis = None
        coords = _ravel_rows(trajectory, dtype)
        energy = jnp.ones((), dtype)
    else:
        origin = None
        if cfg.center:
            # Differences are formed before the Gram matrix, so small moves of large
            # parameters keep their digits (an uncentred float32 Gram matrix loses
            # every mode below ~1e-3 of the leading one).
            origin = jax.tree_util.tree_map(lambda b: b[-1], trajectory)
        v, s, energy = gram_modes(tree_gram(trajectory, dtype, origin), cfg.rank)
        basis = tree_basis(trajectory, v, s, dtype, origin)
        coords = v * s
    finite_traj = jnp.all(jnp.isfinite(coords))
    coords = jnp.where(finite_traj, coords, 0.0)

    if cfg.derivative == "tracked":
        if basis is None:
            target = _ravel_rows(gradients, dtype)
        else:
            target = tree_project_rows(basis, gradients, dtype)
        features = polynomial_library(coords[:-1], cfg.degree, cfg.include_bias)
    else:
        theta = polynomial_library(coords, cfg.degree, cfg.include_bias)
        if cfg.derivative == "strong":
            target, features = strong_form(coords, theta, dt, cfg.fd_order)
        else:
            target, features = weak_form(
                coords, theta, dt, width=cfg.weak_width, power=cfg.weak_power
            )
    finite_traj = finite_traj & jnp.all(jnp.isfinite(target))
    target = jnp.where(finite_traj, target, 0.0)

    return regress(cfg, features, target, finite_traj, basis, energy, dtype)


def fit_pairs(
    cfg: FitConfig,
    points,
    targets,
    origin,
    dtype,
    target_basis=False,
    noise=None,
    stamps=None,
    target_gram=None,
) -> Fit:
    """Fit a model of the targets at recorded points (no contiguous window needed).

    `points` and `targets` leaves have shape ``(K, *shape)``: the iterates at which
    true steps were taken and what was measured there (the base's velocity, or the
    gradient). With a rank, the POD is of ``points - origin`` (`origin` is where the
    surrogate starts, so it has coordinates zero); with `origin` None the POD is
    uncentred. `noise`, the targets' relative noise (`lgfjax._noise`): above
    `NOISE_FLOOR`, the model is the targets' mean wherever that predicts the newest
    pairs (by `stamps`, their update counts), each left out in turn, better than the
    library does (`mean_predicts_better`): a phase starts beyond the newest pair.
    `target_gram`: ``T T^T`` of the targets if the caller has it (else computed here).
    """
    if cfg.rank is None:
        basis = None
        coords = _ravel_rows(points, dtype)
        target = _ravel_rows(targets, dtype)
        energy = jnp.ones((), dtype)
    else:
        v, s, energy = gram_modes(tree_gram(points, dtype, origin), cfg.rank)
        basis = tree_basis(points, v, s, dtype, origin)
        coords = v * s
        target = tree_project_rows(basis, targets, dtype)
    out_basis = None
    if target_basis and cfg.rank is not None:
        # `target_basis`: the targets in their own (uncentred) POD basis, so the model's
        # output is not confined to the directions the iterates moved in.
        if target_gram is None:
            target_gram = tree_gram(targets, dtype)
        vt, st, _ = gram_modes(target_gram, cfg.rank)
        out_basis = tree_basis(targets, vt, st, dtype)
        target = vt * st
    finite = jnp.all(jnp.isfinite(coords)) & jnp.all(jnp.isfinite(target))
    coords = jnp.where(finite, coords, 0.0)
    target = jnp.where(finite, target, 0.0)
    features = polynomial_library(coords, cfg.degree, cfg.include_bias)
    fit = regress(cfg, features, target, finite, basis, energy, dtype)
    if noise is not None and cfg.include_bias:
        # Bias first in the library: the mean model is the targets' mean on it.
        use_mean = (noise > NOISE_FLOOR) & mean_predicts_better(
            features, target, _newest(stamps, target.shape[0])
        )
        mean = jnp.zeros_like(fit.coefficients).at[0].set(jnp.mean(target, axis=0))
        coefficients = jnp.where(use_mean & (fit.status == OK), mean, fit.coefficients)
        fit = fit._replace(coefficients=coefficients.astype(fit.coefficients.dtype))
    return fit._replace(out_basis=out_basis)


# Pairs, newest first, on which the mean and the library are compared (leave-one-out).
NEWEST = 3


def _newest(stamps, rows: int):
    """Weights 1 on the `NEWEST` pairs with the largest stamps (all pairs without stamps)."""
    if stamps is None or rows <= NEWEST:
        return None
    return stamps >= jnp.sort(stamps)[rows - NEWEST]


def regress(cfg: FitConfig, features, target, finite_traj, basis, energy, dtype) -> Fit:
    """STLSQ of `target` on `features`, with the fit's status (shared by both fits)."""
    scale_t = jnp.ones((), dtype)
    if cfg.relative_threshold:
        # STLSQ is linear in the targets for a fixed support, so fitting targets of
        # unit typical column norm and scaling back thresholds relative to that
        # norm: the fit keeps its terms as the iterates' velocities shrink.
        norm = jnp.linalg.norm(target) / jnp.sqrt(target.shape[1])
        scale_t = jnp.where(norm > 0, norm, 1.0).astype(dtype)
    coef = scale_t * stlsq(
        features,
        target / scale_t,
        threshold=cfg.threshold,
        alpha=cfg.alpha,
        max_iter=cfg.max_iter,
        normalize_columns=cfg.normalize_columns,
        unbias=cfg.unbias,
    )
    scale = jnp.linalg.norm(target)
    residual = jnp.linalg.norm(target - features @ coef) / jnp.where(scale > 0, scale, 1.0)
    active = jnp.sum(coef != 0).astype(jnp.int32)
    status = jnp.where(
        ~finite_traj,
        NONFINITE_TRAJECTORY,
        jnp.where(
            ~(jnp.all(jnp.isfinite(coef)) & jnp.isfinite(residual)),
            FIT_FAILED,
            # No term for targets that are all zero is the exact (zero) model.
            jnp.where((active == 0) & (scale > 0), EMPTY_MODEL, OK),
        ),
    ).astype(jnp.int32)
    coef = jnp.where(status == OK, coef, 0.0)
    return Fit(coef, basis, energy.astype(dtype), residual, active, status)
