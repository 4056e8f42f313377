"""POD through the Gram matrix, against numpy's SVD, and the pytree helpers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import lgfjax
from lgfjax import _pod

from .problems import perturb

EPS64 = float(np.finfo(np.float64).eps)

pod = jax.jit(lgfjax.pod, static_argnums=1)


def _snapshots(num=12, n=40, true_rank=None, seed=0):
    rng = np.random.default_rng(seed)
    if true_rank is None:
        # Full rank with a decaying spectrum, like an optimiser trajectory.
        u, _ = np.linalg.qr(rng.normal(size=(num, num)))
        v, _ = np.linalg.qr(rng.normal(size=(n, num)))
        return np.asarray(perturb((u * np.logspace(1, -3, num)) @ v.T))
    return np.asarray(perturb(rng.normal(size=(num, true_rank)) @ rng.normal(size=(true_rank, n))))


@pytest.mark.numerics
@pytest.mark.parametrize("rank", [1, 4, 12])
def test_pod_against_numpy_svd(rank):
    x = _snapshots()
    basis, coords, energy = (np.asarray(a) for a in pod(jnp.asarray(x), rank))
    assert basis.shape == (40, rank) and coords.shape == (12, rank)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    # The Gram route squares the condition number: modes lose ~eps (s_0 / s_j)^2.
    tol = 100 * np.finfo(np.float64).eps * (s[0] / s[rank - 1]) ** 2
    np.testing.assert_allclose(basis.T @ basis, np.eye(rank), atol=tol)
    # coords_j = v_j s_j, while x @ basis_j = G v_j / s_j: they differ by the eigen-residual
    # of G (~eps64 s_0^2) over s_j (measured 2x that).
    eig_residual = 100 * EPS64 * s[0] ** 2 / s[:rank]
    np.testing.assert_allclose(coords, x @ basis, rtol=0, atol=eig_residual.max())
    # Eigenvalues are exact to ~eps64 s_0^2 and s_0^2 dominates both sums: the captured
    # fraction is ~K eps64 relative (measured <= 4.3 eps64).
    k = x.shape[0]
    np.testing.assert_allclose(energy, np.sum(s[:rank] ** 2) / np.sum(s**2), rtol=10 * k * EPS64)
    # Leading left singular vectors of X^T (right of X), up to sign: same projector,
    # and each column matches its numpy counterpart (distinct singular values).
    np.testing.assert_allclose(basis @ basis.T, vt[:rank].T @ vt[:rank], atol=tol)
    np.testing.assert_allclose(np.abs(np.sum(basis * vt[:rank].T, axis=0)), 1.0, atol=tol)
    # Coordinates carry the singular values: |coords_j| = s_j = sqrt(lambda_j), where
    # lambda_j is exact to ~eps64 s_0^2, i.e. relative ~eps64 (s_0 / s_j)^2 (measured 2.5x).
    rel = 100 * EPS64 * (s[0] / s[:rank]) ** 2
    got_s = np.linalg.norm(coords, axis=0)
    assert np.all(np.abs(got_s - s[:rank]) <= rel * s[:rank]), (got_s, s[:rank])
    if rank == 12:
        # v v^T x with v orthonormal to ~eps64 (the 1/s_j and s_j cancel): ~K eps64 |x|
        # (measured 3 eps64 |x|).
        np.testing.assert_allclose(coords @ basis.T, x, atol=10 * k * EPS64 * np.abs(x).max())


@pytest.mark.numerics
def test_low_rank_reconstruction_is_exact():
    x = _snapshots(true_rank=3)
    basis, coords, energy = pod(jnp.asarray(x), 3)
    s = np.linalg.svd(x, compute_uv=False)
    # The 3 modes span the data up to the eigenvectors' error ~eps64 (s_0 / s_2)^2 relative
    # (Gram route; (s_0 / s_2)^2 = 11 here, measured 3 eps64 |x|).
    tol = 100 * EPS64 * (s[0] / s[2]) ** 2 * np.abs(x).max()
    np.testing.assert_allclose(coords @ basis.T, x, atol=tol)
    # The dropped eigenvalues are rounding, ~eps64 lambda_0 each, of a trace >= lambda_0.
    assert abs(float(energy) - 1.0) < 10 * x.shape[0] * EPS64


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rank_deficient_gives_zero_columns_not_nan(dtype):
    x = np.asarray(perturb(jnp.asarray(_snapshots(true_rank=2).astype(dtype))))
    basis, coords, energy = (np.asarray(a) for a in pod(jnp.asarray(x), 5))
    assert basis.dtype == dtype
    assert np.all(np.isfinite(basis)) and np.all(np.isfinite(coords)) and np.isfinite(energy)
    eps = float(np.finfo(dtype).eps)
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    # Unit columns up to the Gram route's eps (s_0 / s_j)^2 ((s_0 / s_1)^2 = 2.6 here).
    col_norms = np.linalg.norm(basis, axis=0)
    np.testing.assert_allclose(col_norms[:2], 1.0, atol=100 * eps * (s[0] / s[1]) ** 2)
    # Exact: the null eigenvalues come out at rounding, ~eps lambda_0, below the floor
    # K eps lambda_0, so their 1 / s and s are set to exactly 0 by construction.
    np.testing.assert_array_equal(col_norms[2:], 0.0)
    np.testing.assert_array_equal(coords[:, 2:], 0.0)
    # As in test_low_rank_reconstruction_is_exact, in this dtype (measured <= 4 eps |x|).
    tol = 100 * eps * (s[0] / s[1]) ** 2
    np.testing.assert_allclose(coords @ basis.T, x, atol=tol * np.abs(x).max())
    # All-zero snapshots: an all-zero basis, zero energy (exact: nothing is rounded).
    basis0, coords0, energy0 = pod(jnp.zeros((4, 6), dtype), 2)
    assert not np.any(np.asarray(basis0)) and not np.any(np.asarray(coords0))
    assert float(energy0) == 0.0


@pytest.mark.parametrize("rank", [0, 13, -1])
def test_rank_out_of_range(rank):
    with pytest.raises(ValueError, match="rank"):
        lgfjax.pod(jnp.ones((12, 5)), rank)


# --- pytree helpers ----------------------------------------------------------------


def _tree_snapshots(num=9, seed=1):
    rng = np.random.default_rng(seed)
    return perturb(
        {
            "w": jnp.asarray(rng.normal(size=(num, 3, 4))),
            "b": jnp.asarray(rng.normal(size=(num, 5))),
            "s": jnp.asarray(rng.normal(size=(num,))),
            "nested": (jnp.asarray(rng.normal(size=(num, 2, 1, 2))),),
        }
    )


def _flatten_rows(tree):
    # Row k is the ravel of snapshot k, in the same leaf order as ravel_pytree.
    return jax.vmap(lambda one: ravel_pytree(one)[0])(tree)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _tree_pipeline(snaps, rank, work_dtype, store_dtype, index, dz):
    """Every tree helper, as the optimiser chains them, in one compiled function."""
    gram = _pod.tree_gram(snaps, work_dtype)
    v, s, energy = _pod.gram_modes(gram, rank)
    basis = _pod.tree_basis(snaps, v, s, store_dtype)
    rows = _pod.tree_project_rows(basis, snaps, work_dtype)
    one = jax.tree_util.tree_map(lambda a: a[index], snaps)
    coords = _pod.tree_project(basis, one, work_dtype)
    lifted = _pod.tree_lift(basis, dz, one)
    roundtrip = _pod.tree_lift(basis, coords, one)
    return gram, energy, basis, rows, coords, lifted, roundtrip


@pytest.mark.numerics
def test_tree_helpers_agree_with_flat_versions():
    snaps = _tree_snapshots()
    flat = _flatten_rows(snaps)
    rank = 4
    dz = jnp.asarray([0.5, -1.0, 2.0, 0.25])
    gram, energy, basis, rows, coords, lifted, _ = _tree_pipeline(
        snaps, rank, jnp.float64, jnp.float64, 3, dz
    )
    flat_basis, flat_coords, flat_energy = pod(flat, rank)
    f = np.asarray(flat)
    n = f.shape[1]
    # A sum of per-leaf products against one product: the dot-product bound, per entry.
    np.testing.assert_array_less(np.abs(gram - f @ f.T), 2 * n * EPS64 * np.abs(f) @ np.abs(f).T)
    # The two Gram matrices differ by ~n eps64 lambda_0, which moves the eigenvalues by as
    # much (Weyl): the energy fraction agrees to ~n eps64 relative (measured: bitwise).
    np.testing.assert_allclose(energy, flat_energy, rtol=10 * n * EPS64)
    # ... and the unit eigenvectors by that over the smallest gap among the leading rank + 1
    # eigenvalues (Davis-Kahan; measured <= 200 eps64 against a bound of ~4000 eps64).
    lam = np.linalg.eigvalsh(f @ f.T)[::-1]
    vec_tol = 10 * n * EPS64 * lam[0] / np.min(-np.diff(lam[: rank + 1]))
    row_tol = vec_tol * np.sqrt(lam[0])  # coordinates: rows of norm <= s_0
    # Basis leaves carry the mode axis first: row r of the ravel is mode r.
    assert jax.tree_util.tree_map(jnp.shape, basis) == jax.tree_util.tree_map(
        lambda a: (rank,) + a.shape[1:], snaps
    )
    np.testing.assert_allclose(_flatten_rows(basis).T, flat_basis, atol=vec_tol)
    np.testing.assert_allclose(rows, flat_coords, atol=row_tol)
    np.testing.assert_allclose(coords, flat[3] @ flat_basis, atol=row_tol)
    one = jax.tree_util.tree_map(lambda a: a[3], snaps)
    assert jax.tree_util.tree_structure(lifted) == jax.tree_util.tree_structure(one)
    np.testing.assert_allclose(
        ravel_pytree(lifted)[0], flat_basis @ dz, atol=vec_tol * np.abs(dz).sum()
    )


@pytest.mark.numerics
def test_tree_helpers_mixed_dtypes():
    # float32 parameters with float64 POD arithmetic: basis stored in float32, the
    # lifted update typed like the parameters.
    snaps = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), _tree_snapshots())
    gram, _, basis, rows, coords, _, roundtrip = _tree_pipeline(
        snaps, 9, jnp.float64, jnp.float32, 0, jnp.zeros(9)
    )
    assert gram.dtype == rows.dtype == coords.dtype == jnp.float64
    assert all(b.dtype == jnp.float32 for b in jax.tree_util.tree_leaves(basis))
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(roundtrip))
    # Full rank: every snapshot is in the span, so projecting and lifting returns it. The
    # float64 arithmetic is exact to ~kappa^2 eps64 (kappa = 3.2); the basis stored in
    # float32 (half an ulp per entry) and the lift rounded to float32 leave
    # <= 2 n eps32 max|x| over the n = 22 entries (measured 0.5 eps32 |x|).
    one = ravel_pytree(jax.tree_util.tree_map(lambda a: a[0], snaps))[0]
    eps32 = float(np.finfo(np.float32).eps)
    tol = 2 * one.size * eps32 * np.abs(np.asarray(one)).max()
    np.testing.assert_allclose(ravel_pytree(roundtrip)[0], one, atol=tol)


@jax.jit
def _centred(points, origin, weights_v, weights_s):
    gram = _pod.tree_gram(points, jnp.float32, origin)
    basis = _pod.tree_basis(points, weights_v, weights_s, jnp.float32, origin)
    return gram, basis


def test_centred_contractions_in_blocks_are_exact():
    # A leaf longer than `BLOCK` is centred block by block (no (K, n) temporary). With
    # small integers every product and partial sum is an integer below 2^24, so float32
    # sums them exactly in any order: the Gram matrix must equal the exact one.
    rng = np.random.default_rng(3)
    k, n = 5, 2 * _pod.BLOCK + 77
    points = {
        "big": rng.integers(-2, 3, size=(k, n)).astype(np.float32),
        "small": rng.integers(-2, 3, size=(k, 3, 4)).astype(np.float32),
    }
    origin = {
        "big": rng.integers(-2, 3, size=n).astype(np.float32),
        "small": rng.integers(-2, 3, size=(3, 4)).astype(np.float32),
    }
    d = np.concatenate(
        [
            (points["big"] - origin["big"]).astype(np.float64),
            (points["small"] - origin["small"]).reshape(k, -1).astype(np.float64),
        ],
        axis=1,
    )
    v = np.linalg.qr(rng.normal(size=(k, 3)))[0].astype(np.float32)
    s = np.asarray([4.0, 2.0, 0.5], np.float32)
    gram, basis = _centred(points, origin, v, s)
    np.testing.assert_array_equal(np.asarray(gram, np.float64), d @ d.T)
    # Each basis entry is a k-term dot product in float32 (weights v / s rounded once):
    # the dot-product bound (k + 2) eps32 sum |w d|, against the same formula in float64.
    w = v.astype(np.float64) / s.astype(np.float64)
    got = np.concatenate(
        [np.asarray(basis["big"]), np.asarray(basis["small"]).reshape(3, -1)], axis=1
    )
    bound = (k + 2) * np.finfo(np.float32).eps * (np.abs(w).T @ np.abs(d))
    np.testing.assert_array_less(np.abs(got - w.T @ d), bound + np.finfo(np.float32).tiny)
