"""Sequentially-thresholded least squares (STLSQ), as in SINDy, with fixed shapes."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from ._validate import check_nonnegative, check_positive_int

# pysindy decides which coefficients take part in the unbiasing refit by this cut.
_NONZERO = 1e-14
# Above this many entries the (P, N, N) outer-product table of the dual form is not
# built at once; the kernel matrices are then formed one target at a time.
_DUAL_TABLE_LIMIT = 2**26


def _column_scale(theta, normalize_columns: bool):
    if not normalize_columns:
        return jnp.ones(theta.shape[1], theta.dtype)
    norms = jnp.linalg.norm(theta, axis=0)
    # A zero column stays zero; pysindy would divide by zero here.
    return jnp.where(norms > 0, norms, 1.0)


def _per_target(fn, *args):
    """``jax.vmap(fn)(*args)``, one target per leading index, without batched LAPACK
    calls on CPU.

    jaxlib's CPU LAPACK kernels (0.10) split a batch over XLA's intra-op thread pool
    and block a pool thread until it is done. When as many computations as the pool
    has threads do so at once, as simulated devices (``--xla_force_host_platform_
    device_count``) do, the process deadlocks. On CPU the targets are therefore solved
    one at a time with `jax.lax.map`; other backends keep the batched solve.
    """
    return jax.lax.platform_dependent(
        *args,
        cpu=lambda *a: jax.lax.map(lambda t: fn(*t), a),
        default=jax.vmap(fn),
    )


def _pinv_factor(s, shape, dtype):
    """``1 / s`` above `jnp.linalg.lstsq`'s cut (eps * max(M, N) * s_max), else 0."""
    cut = jnp.finfo(dtype).eps * max(shape) * s[0]
    return jnp.where(s > cut, 1.0 / jnp.where(s > cut, s, 1.0), 0.0)


def _lstsq(a, b):
    """Minimum-norm least squares with `jnp.linalg.lstsq`'s cut (eps * max(M, N)).

    Uses the QR-iteration SVD: the default divide-and-conquer driver is ~100x slower
    on the numerically rank-deficient matrices that polynomial libraries produce.
    """
    u, s, vt = jax.lax.linalg.svd(a, full_matrices=False, algorithm=jax.lax.linalg.SvdAlgorithm.QR)
    inv = _pinv_factor(s, a.shape, a.dtype)
    if b.ndim == 2:
        inv = inv[:, None]
    return vt.T @ (inv * (u.T @ b))


def _primal_solve(x, y, masks, alpha):
    """Ridge (``alpha > 0``) or min-norm least squares on each target's support.

    ``x``: (N, P), ``y``: (N, d), ``masks``: (d, P). Returns (d, P).
    """
    if alpha is None:
        # Unregularised refit: SVD least squares on the masked columns gives the
        # minimum-norm solution, which is exactly zero on the masked-out columns.
        return _svd_solve(x, y, masks, None)
    fm = masks.astype(x.dtype)
    gram = x.T @ x
    rhs = x.T @ y

    def one(m, bj):
        a = gram * jnp.outer(m, m) + jnp.diag(alpha * m + (1.0 - m))
        return m * jnp.linalg.solve(a, m * bj)

    return _per_target(one, fm, rhs.T)


def _dual_kernels(x, fm):
    """``K_j = x diag(m_j) x^T`` for every target j, shape (d, N, N), with no (P, P)."""
    n_rows, n_feat = x.shape
    if n_feat * n_rows * n_rows <= _DUAL_TABLE_LIMIT:
        # One GEMM over all targets: (d, P) @ (P, N*N).
        table = jnp.einsum("ip,jp->pij", x, x).reshape(n_feat, n_rows * n_rows)
        return (fm @ table).reshape(-1, n_rows, n_rows)
    return jax.lax.map(lambda m: (x * m) @ x.T, fm)


def _minnorm_qr(x, y, masks):
    """Minimum-norm least squares on each support through a QR of ``X_m^T`` (P x N).

    ``X_m^T = Q R`` and ``R = U S V^T`` give ``pinv(X_m) = Q U S^+ V^T``: singular
    values of `x` itself, not their squares, so float32 keeps those down to
    ~eps * P of the largest. Costs a QR of a P x N matrix per target (about 15x the
    kernel path's time at P = 25,651, N = 13).
    """
    fm = masks.astype(x.dtype)
    cut_factor = jnp.finfo(x.dtype).eps * max(x.shape)

    def one(m, yj):
        q, r = jnp.linalg.qr((x * m).T)
        u, s, vt = jax.lax.linalg.svd(
            r, full_matrices=False, algorithm=jax.lax.linalg.SvdAlgorithm.QR
        )
        inv = jnp.where(s > cut_factor * s[0], 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
        return m * (q @ (u @ (inv * (vt @ yj))))

    return _per_target(one, fm, y.T)


def _dual_solve(x, y, masks, alpha):
    """Kernel form of `_primal_solve` for more features than rows: w = X_m^T z."""
    if alpha is None and x.dtype == jnp.float32:
        # The kernel squares the condition number; float32 would lose every singular
        # value below ~1e-3 of the largest. Refit in float64 when it is available,
        # else through a QR of the (P x N) masked library.
        if not jax.config.jax_enable_x64:  # pyright: ignore[reportAttributeAccessIssue]
            return _minnorm_qr(x, y, masks)
        w = _dual_solve(x.astype(jnp.float64), y.astype(jnp.float64), masks, None)
        return w.astype(x.dtype)
    fm = masks.astype(x.dtype)
    kernels = _dual_kernels(x, fm)
    n_rows = x.shape[0]
    if alpha is None:
        # Minimum-norm solution through the pseudo-inverse of each kernel. The kernel
        # squares the condition number, so two steps of iterative refinement on the
        # residual ``y - X_m X_m^T z`` (formed without squaring) win back the digits
        # a float32 eigendecomposition loses; an SVD per target would cost far more.
        def pinv_solve(k, m, yj):
            lam, vec = jnp.linalg.eigh(k)
            cut = 10 * jnp.finfo(x.dtype).eps * n_rows * jnp.max(jnp.abs(lam))
            inv = jnp.where(lam > cut, 1.0 / jnp.where(lam > cut, lam, 1.0), 0.0)

            def pinv(r):
                return vec @ (inv * (vec.T @ r))

            xm = x * m
            z = pinv(yj)
            for _ in range(2):
                z = z + pinv(yj - xm @ (xm.T @ z))
            return z

        z = _per_target(pinv_solve, kernels, fm, y.T)  # (d, N)
        return fm * (z @ x)

    def one(k, yj):
        return jnp.linalg.solve(k + alpha * jnp.eye(n_rows, dtype=x.dtype), yj)

    z = _per_target(one, kernels, y.T)  # (d, N)
    return fm * (z @ x)


def _svd_solve(x, y, masks, alpha, plain=None):
    """`_primal_solve` / `_dual_solve` through one SVD of each masked library.

    With ``X_m = U S V^T``, ridge is ``V diag(s / (s^2 + alpha)) U^T y`` and the
    unregularised refit is `_lstsq`'s pseudo-inverse (the same cut): the singular values
    of `x` itself, not the squares a Gram or kernel matrix holds, so float32 keeps terms
    down to ~eps * P of the largest. Zero columns give zero coefficients exactly (their
    rows of ``V`` pair with zero singular values only, and the mask zeroes them anyway).
    One LAPACK routine (gesvd) serves every solve of STLSQ, which keeps the compiled program
    small; `_masked_solve` takes it while an SVD per target is cheap. With a traced
    `plain`, the same solve is the ridge fit (False) or plain least squares (True), so
    `stlsq` compiles one solve for its first fit, its ridge fits and its refit.
    """
    fm = masks.astype(x.dtype)

    def one(m, yj):
        u, s, vt = jax.lax.linalg.svd(
            x * m, full_matrices=False, algorithm=jax.lax.linalg.SvdAlgorithm.QR
        )
        if alpha is None:
            factor = _pinv_factor(s, x.shape, x.dtype)
        else:
            # A traced ``alpha == 0`` meets zero singular values of masked-out columns:
            # their terms are 0, not 0 / 0.
            den = s * s + alpha
            factor = s / jnp.where(den > 0, den, 1.0)
            if plain is not None:
                factor = jnp.where(plain, _pinv_factor(s, x.shape, x.dtype), factor)
        return m * (vt.T @ (factor * (u.T @ yj)))

    return _per_target(one, fm, y.T)


# An SVD of the (N, P) masked library per target costs ~ max(N, P) min(N, P)^2 and runs
# about 2x slower than the Gram / kernel solves at LGF's POD sizes (a whole STLSQ fit,
# float64, 5 targets: 112 vs 58 us at N, P = 10, 6; 273 vs 127 us at 9, 15), paid once
# per fit, for a smaller compiled fit. Larger fits fall further behind (11.3 vs 2.0 ms
# at 64, 64), so they, and full-space fits (P = n + 1), keep the LU (primal) or kernel
# (dual) form.
_SVD_WORK_LIMIT = 2**12


def _svd_sized(shape) -> bool:
    n_rows, n_feat = shape
    return max(n_rows, n_feat) * min(n_rows, n_feat) ** 2 <= _SVD_WORK_LIMIT


def _masked_solve(x, y, masks, alpha):
    n_rows, n_feat = x.shape
    if _svd_sized(x.shape):
        return _svd_solve(x, y, masks, alpha)
    solve = _dual_solve if n_feat > n_rows else _primal_solve
    return solve(x, y, masks, alpha)


def stlsq(
    theta: Float[Array, "N P"],
    target: Float[Array, "N d"] | Float[Array, " N"],
    *,
    threshold=0.1,
    alpha=0.05,
    max_iter: int = 20,
    normalize_columns: bool = False,
    unbias: bool = True,
) -> Float[Array, "P d"] | Float[Array, " P"]:
    """Sparse regression ``target ~ theta @ coefficients`` by STLSQ.

    The algorithm and its stopping rule are pysindy's ``STLSQ``: start from every
    term, repeatedly ridge-regress each target on its current support (``alpha``
    without a ``1/N`` factor), keep the coefficients with ``|c| >= threshold``, and
    stop when no term was ever dropped or the support stops changing, after at most
    ``max_iter`` ridge fits. With `unbias` the surviving terms are refitted without
    regularisation. With `normalize_columns` all of this happens for unit-norm
    columns and the coefficients are scaled back at the end.

    Supports are boolean masks, so the shapes never change and the function works
    under `jax.jit`, `jax.vmap` and `jax.lax.cond`. Small fits solve through an SVD of
    each masked library (condition number ``kappa``, not ``kappa^2``); larger ones use
    the Gram form, or when ``P > N`` the dual (kernel) form, which needs ``N x N``
    systems and no ``P x P`` matrix.

    **Arguments:**

    - `theta`: library matrix, one sample per row.
    - `target`: derivative targets, one column per state variable.
    - `threshold`: the hard threshold, ``>= 0``.
    - `alpha`: ridge strength, ``>= 0`` (0 means plain least squares).
    - `max_iter`: the largest number of ridge fits, ``>= 1``.
    - `normalize_columns`: threshold in the space of unit-norm columns.
    - `unbias`: refit the selected terms without regularisation.

    **Returns:** coefficients of shape ``(P, d)`` (``(P,)`` for a 1-D target).

    ```python
    import jax.numpy as jnp
    import lgfjax

    t = jnp.linspace(0.0, 1.0, 50)
    x = jnp.stack([jnp.exp(-t), jnp.exp(2 * t)], axis=1)  # x0' = -x0, x1' = 2 x1
    theta = lgfjax.polynomial_library(x, degree=2)
    target = jnp.stack([-x[:, 0], 2 * x[:, 1]], axis=1)
    xi = lgfjax.stlsq(theta, target, threshold=0.1, alpha=0.0)
    assert jnp.allclose(xi[1:3], jnp.array([[-1.0, 0.0], [0.0, 2.0]]), atol=1e-5)
    ```
    """
    check_nonnegative("threshold", threshold)
    check_nonnegative("alpha", alpha)
    check_positive_int("max_iter", max_iter)
    theta = jnp.asarray(theta)
    target = jnp.asarray(target, theta.dtype)
    squeeze = target.ndim == 1
    y = target[:, None] if squeeze else target
    n_feat, n_targets = theta.shape[1], y.shape[1]

    scale = _column_scale(theta, normalize_columns)
    x = theta / scale
    ridge_alpha = None if (isinstance(alpha, (int, float)) and alpha == 0) else alpha
    all_masks = jnp.ones((n_targets, n_feat), bool)
    # pysindy compares the first support against that of a plain least-squares fit,
    # and refits the final support without regularisation (`unbias`). Small fits take
    # both as passes of the thresholding loop through its one SVD solve (`_svd_solve`
    # with a traced mode), so the compiled program holds one solve, not three.
    in_loop = _svd_sized(x.shape)
    INITIAL, THRESHOLD, REFITTED = 0, 1, 2

    def cond(carry):
        k, _, _, done, stage = carry
        thresholding = (k < max_iter) & ~done
        if not in_loop:
            return thresholding
        return (stage == INITIAL) | ((stage == THRESHOLD) & (thresholding | unbias))

    def body(carry):
        k, masks, previous, done, stage = carry
        if in_loop:
            # A pass that is not a ridge fit: the first (plain least squares on every
            # term) or, once thresholding is over, the refit of the final support.
            ridge = (stage == THRESHOLD) & (k < max_iter) & ~done
            support = jnp.where(ridge | (stage == INITIAL), masks, jnp.abs(previous) > _NONZERO)
            solved = _svd_solve(x, y, support, ridge_alpha, ~ridge)
        else:
            ridge = jnp.asarray(True)
            solved = _masked_solve(x, y, masks, ridge_alpha)
        big = jnp.abs(solved) >= threshold
        # A target whose support is already empty is skipped and keeps it.
        empty = ~jnp.any(masks, axis=1, keepdims=True)
        new_masks = jnp.where(empty, masks, big)
        coef = jnp.where(big & ~empty, solved, 0.0)
        nothing_dropped = jnp.sum(new_masks) == n_feat * n_targets
        same_support = jnp.all((coef != 0) == (previous != 0))
        stop = nothing_dropped | same_support | ~jnp.any(masks)
        return (
            jnp.where(ridge, k + 1, k),
            jnp.where(ridge, new_masks, masks),
            jnp.where(ridge, coef, solved),
            jnp.where(ridge, stop, done),
            jnp.where(ridge | (stage == INITIAL), THRESHOLD, REFITTED).astype(jnp.int32),
        )

    if in_loop:
        initial = jnp.zeros((n_targets, n_feat), x.dtype)  # the first pass computes it
        stage = jnp.asarray(INITIAL, jnp.int32)
    else:
        # Every target has the full support here, so one SVD of `x` serves them all
        # (and needs no kernel, whose squared condition number float32 could not hold).
        initial = _lstsq(x, y).T
        stage = jnp.asarray(THRESHOLD, jnp.int32)
    carry = (jnp.asarray(0, jnp.int32), all_masks, initial, jnp.asarray(False), stage)
    _, _, coef, _, _ = jax.lax.while_loop(cond, body, carry)

    if unbias and not in_loop:
        support: Bool[Array, "d P"] = jnp.abs(coef) > _NONZERO
        coef = _masked_solve(x, y, support, None)
    coef = (coef / scale).T
    return coef[:, 0] if squeeze else coef
