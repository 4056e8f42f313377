"""STLSQ: parity with pysindy, properties, the dual (kernel) path, and JAX transformations.

Every lgfjax call goes through a cached `jax.jit` so that a batch of problems of one
shape costs one compilation; eager calls would compile the solver's while-loop anew
each time.
"""

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pysindy as ps
import pytest
from hypothesis import given, settings, strategies as st

import lgfjax
from lgfjax import _stlsq

from .problems import perturb

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)

MAX_ITER = 20
# (rows N, library terms P, targets d, problems); P > N takes the dual path.
SHAPES = {"primal": (30, 10, 3, 14), "dual": (8, 24, 2, 8)}


def _problems(kind, seed=None, density=0.4, noise=0.01, spread=10.0):
    """A batch of random sparse regressions of the fixed shape ``SHAPES[kind]``."""
    n_rows, n_feat, n_targets, count = SHAPES[kind]
    if seed is None:
        seed = 12345 if kind == "primal" else 54321
    rng = np.random.default_rng(seed)
    # Columns on very different scales, so normalize_columns changes the answer.
    scales = rng.uniform(1.0 / spread, spread, (count, 1, n_feat))
    x = rng.normal(size=(count, n_rows, n_feat)) * scales
    c = rng.normal(size=(count, n_feat, n_targets)) * (
        rng.random((count, n_feat, n_targets)) < density
    )
    y = np.einsum("bnp,bpd->bnd", x, c) + noise * rng.normal(size=(count, n_rows, n_targets))
    return np.asarray(perturb(x)), np.asarray(perturb(y))


def _gram_tol(x, coef, alpha=0.0, eps=EPS64, factor=100.0):
    """How far two backward-stable solvers of the final fit may disagree: ~cond eps
    max|coef|, with cond that of the system solved on each target's support S (the
    nonzeros of `coef`). Least squares (alpha = 0, also every unbiased refit) works
    with kappa(x[:, S])^2; ridge with (s_max^2 + alpha) / (s_min^2 + alpha) over the
    system's size, which for the dual path (P > N) is N, so s_min = 0 when |S| < N.
    `factor` is the margin for the constant (measured ratios <= 11)."""
    coef = np.asarray(coef).reshape(np.shape(coef)[0], -1)
    dual = x.shape[1] > x.shape[0]
    conds = [1.0]
    for j in range(coef.shape[1]):
        support = coef[:, j] != 0
        if not support.any():
            continue
        sv = np.linalg.svd(x[:, support], compute_uv=False)
        if alpha == 0:
            conds.append((sv[0] / sv[-1]) ** 2)
        else:
            smallest = 0.0 if dual and support.sum() < x.shape[0] else sv[-1] ** 2
            conds.append((sv[0] ** 2 + alpha) / (smallest + alpha))
    return factor * max(conds) * eps * np.abs(coef).max()


@functools.cache
def _batched_stlsq(normalize_columns, unbias, ridge):
    """vmapped, jitted stlsq over (theta, target, threshold); alpha traced iff ridge."""

    def one(theta, target, threshold, alpha):
        return lgfjax.stlsq(
            theta,
            target,
            threshold=threshold,
            alpha=alpha if ridge else 0.0,
            max_iter=MAX_ITER,
            normalize_columns=normalize_columns,
            unbias=unbias,
        )

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None)))


def _pysindy_stlsq(x, y, threshold, alpha, normalize_columns, unbias):
    opt = ps.STLSQ(
        threshold=threshold,
        alpha=alpha,
        max_iter=MAX_ITER,
        normalize_columns=normalize_columns,
        unbias=unbias,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.fit(x, y)
    return opt.coef_.T


# The dual batch without unbiasing is the slow tail of the grid (one compilation each).
@pytest.mark.numerics
@pytest.mark.parametrize(
    "kind, unbias",
    [
        ("primal", True),
        ("primal", False),
        ("dual", True),
        pytest.param("dual", False, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("normalize_columns", [False, True])
@pytest.mark.parametrize("alphas", [(0.0,), (0.05, 1.0)], ids=["alpha0", "ridge"])
def test_parity_with_pysindy(kind, unbias, normalize_columns, alphas):
    x, y = _problems(kind)
    count = x.shape[0]
    # Thresholds vary per problem; normalised coefficients are larger (|column| >> 1).
    lo, hi = (0.3, 3.0) if normalize_columns else (0.05, 0.4)
    thresholds = np.random.default_rng(count).uniform(lo, hi, count)
    fit = _batched_stlsq(normalize_columns, unbias, alphas != (0.0,))
    pruned = 0
    for alpha in alphas:
        got = np.asarray(fit(jnp.asarray(x), jnp.asarray(y), jnp.asarray(thresholds), alpha))
        for b in range(count):
            ref = _pysindy_stlsq(x[b], y[b], thresholds[b], alpha, normalize_columns, unbias)
            # The support is discrete: rounding (<~1e-13 here) flips a term only if its
            # coefficient lies that close to its threshold (drawn uniformly at random).
            np.testing.assert_array_equal(got[b] != 0, ref != 0, err_msg=f"support, problem {b}")
            # Both solve the same final ridge fit or least-squares refit (lgfjax and
            # sklearn by different factorisations): ~cond eps64 |c| apart, cond that of
            # the final system (see _gram_tol), in the coordinates that were fitted
            # (unit-norm columns with normalize_columns).
            fitted = x[b] / np.linalg.norm(x[b], axis=0) if normalize_columns else x[b]
            tol = _gram_tol(fitted, ref, 0.0 if unbias else alpha)
            np.testing.assert_allclose(got[b], ref, rtol=0, atol=tol, err_msg=f"problem {b}")
            pruned += 0 < np.count_nonzero(ref) < ref.size
    # The batch exercises real thresholding, not only keep-all or drop-all outcomes.
    assert pruned >= len(alphas) * count // 2


# --- properties -------------------------------------------------------------------
# These reuse the parity tests' shapes and compiled functions: hypothesis draws the
# problem family (seed, density, noise, column spread, thresholds), not the shapes.


@pytest.mark.numerics
@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    density=st.floats(0.1, 0.9),
    noise=st.floats(0.0, 1.0),
    spread=st.floats(1.0, 100.0),
    threshold_scale=st.floats(0.01, 10.0),
    kind=st.sampled_from(["primal", "dual"]),
)
def test_kept_terms_clear_the_threshold_and_unbias_keeps_support(
    seed, density, noise, spread, threshold_scale, kind
):
    x, y = _problems(kind, seed, density, noise, spread)
    count, _, n_feat = x.shape
    thresholds = threshold_scale * np.random.default_rng(seed).uniform(0.1, 1.0, count)
    args = (jnp.asarray(x), jnp.asarray(y), jnp.asarray(thresholds), 0.05)
    biased = np.asarray(_batched_stlsq(True, False, True)(*args))
    unbiased = np.asarray(_batched_stlsq(True, True, True)(*args))
    assert biased.shape == unbiased.shape == y.shape[:1] + (n_feat, y.shape[2])
    assert np.all(np.isfinite(biased)) and np.all(np.isfinite(unbiased))
    norms = np.linalg.norm(x, axis=1)[:, :, None]  # (count, P, 1)
    kept = biased != 0
    # Before unbiasing, every kept coefficient clears the threshold in the space where
    # it was thresholded (unit-norm columns). Recomputing that space rounds the norm (a sum
    # of N = 30 or 8 squares: <= (N + 2) eps64 relative) and the two scalings (one ulp
    # each); 1e-12 relative is ~100x that and far below any real violation.
    cleared = np.abs(biased * norms) >= thresholds[:, None, None] * (1 - 1e-12)
    assert np.all(cleared[kept])
    # The unbiasing refit never adds a term.
    assert not np.any((unbiased != 0) & ~kept)


@pytest.mark.numerics
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), density=st.floats(0.0, 1.0))
def test_noiseless_sparse_model_is_recovered_exactly(seed, density):
    n_rows, n_feat, n_targets, count = SHAPES["primal"]
    rng = np.random.default_rng(seed)
    x = np.asarray(perturb(rng.normal(size=(count, n_rows, n_feat))))
    support = rng.random((count, n_feat, n_targets)) < density
    # Every true coefficient is well above the threshold, every other one is zero.
    values = rng.uniform(0.5, 10.0, support.shape) * rng.choice([-1.0, 1.0], support.shape)
    coef = np.where(support, values, 0.0)
    y = np.einsum("bnp,bpd->bnd", x, coef)
    thresholds = jnp.full(count, 0.1)
    got = np.asarray(_batched_stlsq(False, True, False)(x, y, thresholds, 0.0))
    # Every true term is >= 0.5, every false one comes out at rounding level (~1e-14),
    # against a threshold of 0.1: the support is not a rounding decision.
    np.testing.assert_array_equal(got != 0, support)
    for b in range(count):
        # A consistent system (y = x c rounded to eps64 |y|) solved by a backward-stable
        # SVD least squares: error ~kappa(x) eps64 |c| (measured <= 14x that, kappa <= 5).
        tol = 1e3 * np.linalg.cond(x[b]) * EPS64 * max(np.abs(coef[b]).max(), 1.0)
        np.testing.assert_allclose(got[b], coef[b], rtol=0, atol=tol)


# --- the dual (kernel) path -------------------------------------------------------

_primal = jax.jit(_stlsq._primal_solve, static_argnums=3)
_dual = jax.jit(_stlsq._dual_solve, static_argnums=3)


@pytest.mark.numerics
@pytest.mark.parametrize("n_rows, n_feat", [(6, 15), (20, 8)])
@pytest.mark.parametrize("alpha", [0.3, None], ids=["ridge", "minnorm"])
def test_dual_solve_equals_primal_solve(n_rows, n_feat, alpha):
    rng = np.random.default_rng(n_rows)
    x = perturb(jnp.asarray(rng.normal(size=(n_rows, n_feat))))
    y = perturb(jnp.asarray(rng.normal(size=(n_rows, 3))))
    masks = rng.random((3, n_feat)) < 0.6
    masks[:, 0] = True
    masks[2] = True  # one target on the full library
    primal = np.asarray(_primal(x, y, jnp.asarray(masks), alpha))
    dual = np.asarray(_dual(x, y, jnp.asarray(masks), alpha))
    # Exact: masked-out coefficients are multiplied by a zero mask.
    assert np.all(primal[~masks] == 0) and np.all(dual[~masks] == 0)
    # The kernel X_m X_m^T and the Gram X_m^T X_m both square kappa(X_m): the two forms
    # agree to ~kappa^2 eps64 |w| (measured <= 2.2x that, with kappa <= 3.7 here).
    kappa = max(np.linalg.cond(np.asarray(x)[:, m]) for m in masks)
    tol = 100 * kappa**2 * EPS64 * np.abs(primal).max()
    np.testing.assert_allclose(dual, primal, rtol=0, atol=tol)
    for j in range(3):
        xm = np.asarray(x)[:, masks[j]]
        if alpha is None:
            # Minimum-norm least squares on each support: the pseudo-inverse solution.
            expected = np.linalg.pinv(xm) @ np.asarray(y)[:, j]
        else:
            # Ridge normal equations on each support.
            expected = np.linalg.solve(
                xm.T @ xm + alpha * np.eye(masks[j].sum()), xm.T @ np.asarray(y)[:, j]
            )
        # numpy's pinv / LU solve of the same problem: again ~kappa^2 eps64 |w| apart.
        np.testing.assert_allclose(primal[j, masks[j]], expected, rtol=0, atol=tol)


@pytest.mark.numerics
def test_wide_problem_uses_dual_path_and_kernel_loop(monkeypatch):
    x, y = _problems("dual")
    ref = _pysindy_stlsq(x[0], y[0], 0.2, 0.05, False, True)

    def forbidden(*args):
        raise AssertionError("P > N must not take the primal (P x P) path")

    calls = []
    dual = _stlsq._dual_solve

    def counted(*args):
        calls.append(args[3])
        return dual(*args)

    monkeypatch.setattr(_stlsq, "_primal_solve", forbidden)
    monkeypatch.setattr(_stlsq, "_svd_solve", forbidden)
    monkeypatch.setattr(_stlsq, "_dual_solve", counted)
    # Small fits take the SVD route; switch it off to reach the kernel form.
    monkeypatch.setattr(_stlsq, "_SVD_WORK_LIMIT", 0)
    # Also force the one-target-at-a-time kernel construction used for large P N^2.
    monkeypatch.setattr(_stlsq, "_DUAL_TABLE_LIMIT", 0)
    fresh = jax.jit(functools.partial(lgfjax.stlsq, threshold=0.2, alpha=0.05))
    # Kernel form against pysindy's primal form; the unbiased refit is least squares on
    # the support, ~kappa(x[:, S])^2 eps64 |c| apart.
    np.testing.assert_allclose(fresh(x[0], y[0]), ref, rtol=0, atol=_gram_tol(x[0], ref))
    assert 0.05 in calls and None in calls  # ridge steps and the refit both traced here


_svd = jax.jit(_stlsq._svd_solve, static_argnums=3)


@pytest.mark.numerics
@pytest.mark.parametrize("n_rows, n_feat", [(6, 15), (20, 8)])
@pytest.mark.parametrize("alpha", [0.3, None], ids=["ridge", "minnorm"])
def test_svd_solve_equals_normal_equations(n_rows, n_feat, alpha):
    rng = np.random.default_rng(100 + n_rows)
    x = perturb(jnp.asarray(rng.normal(size=(n_rows, n_feat))))
    y = perturb(jnp.asarray(rng.normal(size=(n_rows, 3))))
    masks = rng.random((3, n_feat)) < 0.6
    masks[:, 0] = True
    masks[1] = False  # one target with an empty support
    masks[2] = True  # one target on the full library
    got = np.asarray(_svd(x, y, jnp.asarray(masks), alpha))
    # Exact: masked-out coefficients are multiplied by a zero mask.
    assert np.all(got[~masks] == 0)
    gram = _dual if n_feat > n_rows else _primal
    ref = np.asarray(gram(x, y, jnp.asarray(masks), alpha))
    # The SVD route carries ~kappa eps64 |w| of rounding, the Gram / kernel forms
    # ~kappa^2 eps64 |w|: they agree to the larger bound.
    kappa = max(np.linalg.cond(np.asarray(x)[:, m]) for m in masks if m.any())
    tol = 100 * kappa**2 * EPS64 * max(np.abs(ref).max(), 1.0)
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)


def test_small_fits_take_the_svd_route(monkeypatch):
    def forbidden(*args):
        raise AssertionError("a small fit must not take the Gram / kernel forms")

    monkeypatch.setattr(_stlsq, "_primal_solve", forbidden)
    monkeypatch.setattr(_stlsq, "_dual_solve", forbidden)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(30, 10)))  # 30 * 10^2 <= _SVD_WORK_LIMIT
    coef = np.zeros((10, 2))
    coef[[1, 4], 0] = [1.5, -2.0]
    coef[[0, 7], 1] = [0.7, 3.0]
    y = x @ jnp.asarray(coef)
    fit = jax.jit(lambda a: lgfjax.stlsq(x, y, threshold=0.1, alpha=a))
    # A traced alpha of 0 is plain least squares: zero singular values of masked-out
    # columns must give zero terms, not 0 / 0.
    for alpha in (0.05, 0.0):
        got = np.asarray(fit(alpha))
        # Noise-free data: the smallest true coefficient (0.7) is far above the
        # threshold, so the support is exact, and the refit by SVD least squares carries
        # ~kappa(x) eps64 |c| of rounding.
        np.testing.assert_array_equal(got != 0, coef != 0)
        tol = 100 * np.linalg.cond(np.asarray(x)) * EPS64 * np.abs(coef).max()
        np.testing.assert_allclose(got, coef, rtol=0, atol=tol)


@pytest.mark.parametrize("unbias", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.05], ids=["lstsq", "ridge"])
def test_small_fit_compiles_one_solve(alpha, unbias):
    # The first least-squares fit, the ridge passes and the unbiasing refit of a small
    # fit are passes of one loop through one SVD solve: the compiled program holds
    # exactly one SVD (a structural count, the same on every machine).
    x = jnp.ones((10, 6), jnp.float32)
    y = jnp.ones((10, 5), jnp.float32)
    fit = jax.jit(lambda a, b: lgfjax.stlsq(a, b, threshold=0.1, alpha=alpha, unbias=unbias))
    hlo = fit.lower(x, y).as_text()  # StableHLO, before XLA: one call site per solve
    calls = re.findall(r"custom_call @\w*svd\w*", hlo)
    assert len(calls) == 1, calls


# --- JAX transformations and dtypes ----------------------------------------------


@jax.jit
def _maybe_fit(flag, theta, target, threshold):
    return jax.lax.cond(
        flag,
        lambda a, b, t: lgfjax.stlsq(a, b, threshold=t, alpha=0.05),
        lambda a, b, t: jnp.zeros((a.shape[1],) + b.shape[1:], a.dtype),
        theta,
        target,
        threshold,
    )


@pytest.mark.numerics
def test_jit_vmap_equal_loop_and_cond():
    x, y = _problems("primal")
    thresholds = np.linspace(0.05, 0.6, x.shape[0])
    batched = np.asarray(_batched_stlsq(False, True, True)(x, y, jnp.asarray(thresholds), 0.05))
    # The loop runs each problem alone, inside jit and lax.cond.
    looped = np.stack([_maybe_fit(True, x[i], y[i], thresholds[i]) for i in range(len(x))])
    # Same algorithm in two programs (vmapped vs alone under cond): XLA may order the
    # reductions differently, so they agree to the solves' rounding, ~kappa^2 eps64 |c|.
    for b in range(len(x)):
        np.testing.assert_allclose(batched[b], looped[b], rtol=0, atol=_gram_tol(x[b], looped[b]))
    # Problems in the batch stop after different numbers of iterations.
    assert len({int(np.count_nonzero(c)) for c in batched}) > 1
    ref = _pysindy_stlsq(x[1], y[1], thresholds[1], 0.05, False, True)
    tol1 = _gram_tol(x[1], ref)
    np.testing.assert_allclose(looped[1], ref, rtol=0, atol=tol1)
    assert not np.any(np.asarray(_maybe_fit(False, x[1], y[1], thresholds[1])))
    # The 1-D target form of the same problem.
    one = _maybe_fit(True, x[1], y[1][:, 1], thresholds[1])
    assert one.shape == (x.shape[2],)
    np.testing.assert_allclose(one, ref[:, 1], rtol=0, atol=tol1)


def _float32_case(kind):
    # A low-noise batch with moderate column spread, fitted in float64 and float32.
    x, y = _problems(kind, seed=5, noise=1e-4, spread=2.0)
    thresholds = jnp.full(x.shape[0], 0.05)
    fit = _batched_stlsq(False, True, True)
    f64 = np.asarray(fit(x, y, thresholds, 0.05))
    f32 = fit(x.astype(np.float32), y.astype(np.float32), thresholds.astype(jnp.float32), 0.05)
    assert f32.dtype == jnp.float32
    # Discrete: float32 rounding (~1e-5 of |c| here) flips a term only within that of 0.05.
    np.testing.assert_array_equal(np.asarray(f32) != 0, f64 != 0)
    err = np.max(np.abs(np.asarray(f32, np.float64) - f64), axis=(1, 2))
    # The ridge iterations square kappa(x) (Gram or kernel): float32 is ~kappa^2 eps32
    # |c| from float64 (measured <= 2.2x that); allow 100x per problem.
    bound = np.array([100 * np.linalg.cond(a) ** 2 * EPS32 for a in x])
    return err, bound * np.max(np.abs(f64), axis=(1, 2))


@pytest.mark.parametrize("alpha", [0.0, 1e-3], ids=["minnorm", "ridge"])
@pytest.mark.parametrize("n_rows", [13, 60], ids=["dual", "primal"])
def test_cpu_lapack_calls_are_not_batched(alpha, n_rows):
    # A batched jaxlib CPU LAPACK call blocks an intra-op pool thread on sub-tasks
    # queued to the same pool, which deadlocks with simulated devices; every
    # per-target solve must reach LAPACK one matrix at a time.
    x = jnp.ones((n_rows, 45), jnp.float32)
    y = jnp.ones((n_rows, 8), jnp.float32)
    fit = jax.jit(lambda a, b: lgfjax.stlsq(a, b, threshold=0.1, alpha=alpha))
    hlo = fit.lower(x, y).compile().as_text()
    calls = [line for line in hlo.splitlines() if 'custom_call_target="lapack_' in line]
    assert calls
    for line in calls:
        results = line.split("=", 1)[1].split("custom-call(")[0]
        # Matrices are rank 2; a batched call has rank-3 results such as f32[8,19,19].
        assert all(dims.count(",") <= 1 for dims in re.findall(r"\[([\d,]*)\]", results)), line


@pytest.mark.numerics
def test_float32_in_float32_out():
    err, bound = _float32_case("primal")
    assert np.all(err <= bound), (err, bound)


@pytest.mark.numerics
def test_float32_dual_minnorm_refit_keeps_small_singular_values():
    """The dual path's unbiasing refit in float32.

    The pseudo-inverse of ``K = X_m X_m^T`` works with squared singular values, so in
    float32 it would drop singular values below ~1e-3 of the largest. Problem 3 of
    this batch refits an 8 x 8 support of condition number ~660: done in float32 it
    was off by ~9.3; the refit now runs in float64 when x64 is enabled.
    """
    err, bound = _float32_case("dual")
    assert np.all(err <= bound), f"float32 vs float64 errors per problem: {err} > {bound}"
    # The same square refit solved directly: dual must match the float64 pseudo-inverse.
    x, y = _problems("dual", seed=5, noise=1e-4, spread=2.0)
    fit = _batched_stlsq(False, True, True)
    support = np.asarray(fit(x, y, jnp.full(x.shape[0], 0.05), 0.05))[3].T != 0
    x32, y32 = x[3].astype(np.float32), y[3].astype(np.float32)
    dual = np.asarray(_dual(x32, y32, jnp.asarray(support), None), np.float64)
    exact = np.zeros_like(dual)
    x64, y64 = x32.astype(np.float64), y32.astype(np.float64)  # the problem dual was given
    for j in range(support.shape[0]):
        exact[j, support[j]] = np.linalg.pinv(x64[:, support[j]]) @ y64[:, j]
    # The refit runs in float64 (kappa^2 eps64 ~ 1e-10 relative at kappa ~660) and is
    # rounded to float32 (half an ulp): 4 eps32 |w| bounds both; the float32 kernel
    # would be off by ~kappa^2 eps32 ~ 0.05 relative (it was 9.3 absolute).
    np.testing.assert_allclose(dual, exact, rtol=0, atol=4 * EPS32 * np.abs(exact).max())


@pytest.mark.numerics
@pytest.mark.parametrize("cond", [1e2, 1e3, 1e4])
def test_float32_dual_minnorm_without_x64_uses_singular_values_not_squares(cond):
    """Without x64 the float32 dual refit cannot move to float64; it goes through a QR
    of ``X_m^T`` instead of the kernel ``X_m X_m^T``, whose eigendecomposition loses
    every singular value below ~1e-3 of the largest (relative error ~1 at cond 1e3)."""
    rng = np.random.default_rng(int(np.log10(cond)))
    n_rows, n_feat, d = 12, 40, 4
    u, _ = np.linalg.qr(rng.normal(size=(n_rows, n_rows)))
    v, _ = np.linalg.qr(rng.normal(size=(n_feat, n_rows)))
    x = (u * np.logspace(0, -np.log10(cond), n_rows)) @ v.T
    y = rng.normal(size=(n_rows, d))
    masks = rng.random((d, n_feat)) < 0.8
    # The float32 inputs (moved 4 float32 ulps under --perturb) and, in float64, the
    # exact minimum-norm solution of exactly that problem.
    x32 = np.asarray(perturb(jnp.asarray(x, jnp.float32)))
    y32 = np.asarray(perturb(jnp.asarray(y, jnp.float32)))
    x64, y64 = x32.astype(np.float64), y32.astype(np.float64)
    exact = np.zeros((d, n_feat))
    for j in range(d):
        exact[j, masks[j]] = np.linalg.pinv(x64[:, masks[j]], rcond=1e-9) @ y64[:, j]
    with jax.enable_x64(False):
        got = jax.jit(_stlsq._dual_solve, static_argnums=3)(
            jnp.asarray(x32), jnp.asarray(y32), jnp.asarray(masks), None
        )
        assert got.dtype == jnp.float32
    err = np.max(np.abs(np.asarray(got, np.float64) - exact)) / np.max(np.abs(exact))
    # QR + SVD of X_m^T are backward stable: relative error ~kappa(X_m) eps32 (measured
    # <= 0.27x that); the kernel route would give ~kappa^2 eps32, i.e. ~1 at cond 1e3.
    kappa = max(np.linalg.cond(x64[:, m]) for m in masks)
    assert err <= 10 * kappa * EPS32, (err, kappa)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"threshold": -0.1}, "threshold"),
        ({"alpha": -1e-3}, "alpha"),
        ({"max_iter": 0}, "max_iter"),
        ({"max_iter": 2.5}, "max_iter"),
        ({"threshold": float("nan")}, "threshold"),
    ],
)
def test_invalid_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lgfjax.stlsq(jnp.ones((4, 3)), jnp.ones((4, 1)), **kwargs)
