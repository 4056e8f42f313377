"""Fitting the learned flow to the recorded trajectory: POD, library, targets, STLSQ."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int

from ._derivatives import strong_form, weak_form
from ._library import polynomial_library
from ._pod import gathered, gram_modes, tree_basis, tree_gram, tree_project_rows
from ._stlsq import stlsq

# Reasons a cycle fell back to true steps, recorded in the state's `status` field.
OK = 0
NONFINITE_TRAJECTORY = 1
FIT_FAILED = 2
EMPTY_MODEL = 3
SOLVER_FAILED = 4
NONFINITE_STEP = 5
STEP_TOO_LARGE = 6
VALUE_REJECTED = 7

STATUS_MESSAGES = {
    OK: "ok",
    NONFINITE_TRAJECTORY: "the recorded trajectory is not finite",
    FIT_FAILED: "the sparse regression returned non-finite coefficients",
    EMPTY_MODEL: "every library term was thresholded away",
    SOLVER_FAILED: "the ODE solver did not reach the end of the step",
    NONFINITE_STEP: "the surrogate step was not finite",
    STEP_TOO_LARGE: "the surrogate step left the trust region",
    VALUE_REJECTED: "value_fn rejected the surrogate phase; rolled back",
}


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Static description of one fit; every field is a Python value."""

    history_size: int
    degree: int
    include_bias: bool
    rank: int | None
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
        snapshots = trajectory
        if cfg.center:
            # Differences are formed before the Gram matrix, so small moves of large
            # parameters keep their digits (an uncentred float32 Gram matrix loses
            # every mode below ~1e-3 of the leading one).
            snapshots = jax.tree_util.tree_map(
                lambda b: b.astype(dtype) - b[-1].astype(dtype), trajectory
            )
        v, s, energy = gram_modes(tree_gram(snapshots, dtype), cfg.rank)
        basis = tree_basis(snapshots, v, s, dtype)
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
            jnp.where(active == 0, EMPTY_MODEL, OK),
        ),
    ).astype(jnp.int32)
    coef = jnp.where(status == OK, coef, 0.0)
    return Fit(coef, basis, energy.astype(dtype), residual, active, status)
