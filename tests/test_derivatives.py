"""Derivative targets: finite differences, the weak form, and ODE recovery with STLSQ."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lgfjax
from lgfjax import _derivatives
from lgfjax._derivatives import FD_ORDERS, default_weak_width

from .problems import perturb

EPS64 = float(np.finfo(np.float64).eps)
# Sum of |stencil weights| per finite-difference order: a difference of samples each
# rounded by eps |x| is off by at most about eps max|x| * STENCIL[order] / dt.
STENCIL = {1: 2.0, 2: 1.0, 4: 18.0 / 12.0}


def _fd_rounding(x, dt, order):
    # 32x the stencil's amplification of eps64 |x|: covers the rounding of the samples
    # (<= 1 ulp, 4 more under --perturb), of the stencil and of the division by dt.
    return 32 * EPS64 * np.abs(np.asarray(x)).max() * STENCIL[order] / dt


# One compiled STLSQ (plain least squares, unbiased) reused for every shape below.
fit = jax.jit(functools.partial(lgfjax.stlsq, alpha=0.0))


def _rk4(f, x0, dt, num, substeps=20):
    """Reference trajectory: ``num`` samples ``dt`` apart, RK4 with a fine inner step."""
    h = dt / substeps
    x = np.asarray(x0, np.float64)
    out = [x]
    for _ in range(num - 1):
        for _ in range(substeps):
            k1 = f(x)
            k2 = f(x + 0.5 * h * k1)
            k3 = f(x + 0.5 * h * k2)
            k4 = f(x + h * k3)
            x = x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(x)
    return np.stack(out)


# Library columns for n = 2, degree 2: 1, x0, x1, x0^2, x0 x1, x1^2.
_A = np.array([[-0.1, 1.0], [-1.0, -0.1]])
LINEAR = (
    lambda x: _A @ x,
    [2.0, 0.0],
    np.array([[0, 0], [-0.1, -1.0], [1.0, -0.1], [0, 0], [0, 0], [0, 0]]),
)
LOTKA_VOLTERRA = (
    lambda x: np.array([x[0] - 0.5 * x[0] * x[1], -0.75 * x[1] + 0.25 * x[0] * x[1]]),
    [3.0, 1.0],
    np.array([[0, 0], [1.0, 0], [0, -0.75], [0, 0], [-0.5, 0.25], [0, 0]]),
)
SYSTEMS = {"damped_oscillator": LINEAR, "lotka_volterra": LOTKA_VOLTERRA}


@functools.cache
def _trajectory(system, dt, num):
    f, x0, _ = SYSTEMS[system]
    return perturb(jnp.asarray(_rk4(f, x0, dt, num)))


def _targets(x, dt, form, width=None):
    theta = lgfjax.polynomial_library(x, 2)
    if form == "weak":
        return lgfjax.weak_form(x, theta, dt, width=width)
    return lgfjax.strong_form(x, theta, dt, form)


# --- finite differences ----------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("order, exact_degree", [(1, 1), (2, 2), (4, 4)])
def test_finite_difference_exact_on_polynomials(order, exact_degree):
    dt = 0.1
    t = dt * np.arange(12)
    x = np.stack([t**exact_degree, 1.0 + 2.0 * t], axis=1)
    # The stencil has no truncation error on these polynomials: only rounding is left.
    tol = _fd_rounding(x, dt, order)
    x = np.asarray(perturb(x))
    lo, hi = FD_ORDERS[order]
    d = np.asarray(lgfjax.finite_difference(jnp.asarray(x), dt, order))
    # Forward differences estimate the midpoint derivative; central ones the node's.
    tt = t[lo : len(t) - hi] + (0.5 * dt if order == 1 else 0.0)
    assert d.shape == (len(t) - lo - hi, 2)
    np.testing.assert_allclose(d[:, 0], exact_degree * tt ** (exact_degree - 1), atol=tol)
    np.testing.assert_allclose(d[:, 1], 2.0, atol=tol)


@pytest.mark.parametrize("order", [1, 2, 4])
def test_finite_difference_convergence_order(order):
    lo, hi = FD_ORDERS[order]
    errors = []
    for dt in (0.04, 0.02):
        t = dt * np.arange(int(round(1.0 / dt)) + 1)
        d = np.asarray(lgfjax.finite_difference(jnp.asarray(np.sin(t)[:, None]), dt, order))
        errors.append(np.max(np.abs(d[:, 0] - np.cos(t[lo : len(t) - hi]))))
    # Halving the step divides the error by about 2^order (order 1 against the node).
    # Rounding cannot move the rate: it adds ~eps64 * 2 / dt <= 3e-14, over 1e4 times
    # below the smallest truncation error (order 4 at dt = 0.02, ~1e-9); the 0.15 is
    # for the next term of the truncation error's expansion.
    rate = np.log2(errors[0] / errors[1])
    assert abs(rate - order) < 0.15, (errors, rate)


@pytest.mark.numerics
@pytest.mark.parametrize("order", [1, 2, 4])
def test_strong_form_rows_are_aligned(order):
    # x = t^2 with the feature column t: the target is exactly 2 * feature at each
    # node (order 2 and 4), and at the row's node + dt/2 for the forward difference.
    dt = 0.05
    t = dt * np.arange(20)
    x = perturb(jnp.asarray((t**2)[:, None]))
    theta = jnp.asarray(t[:, None])
    target, features = lgfjax.strong_form(x, theta, dt, order)
    shift = 0.5 * dt if order == 1 else 0.0
    assert target.shape == features.shape
    # Exact on t^2 up to rounding: a misaligned row would be off by 2 dt = 0.1.
    tol = _fd_rounding(x, dt, order)
    np.testing.assert_allclose(target, 2.0 * (features + shift), rtol=0, atol=tol)


# --- the weak form -----------------------------------------------------------------


def test_test_functions_shape_and_bump():
    phi, dphi = lgfjax.test_functions(20, 7, power=4, stride=2)
    assert phi.shape == dphi.shape == ((20 - 7) // 2 + 1, 20)
    s = np.arange(7.0)
    bump = (s * (6 - s)) ** 4 / 9.0**4
    # Bitwise: the same numpy expression on the same integers (exact below 2^53), then
    # one correctly rounded division by 9^4; the ends (0) and the peak (9^4 / 9^4) exact.
    np.testing.assert_array_equal(phi[1, 2:9], bump)
    assert phi[1, 2] == phi[1, 8] == 0.0 and phi[1].max() == 1.0
    assert np.count_nonzero(phi[1, :2]) == np.count_nonzero(phi[1, 9:]) == 0
    # dphi is the derivative of the bump polynomial (in sample units).
    poly = np.polynomial.Polynomial([0, 6, -1]) ** 4 / 9.0**4
    # dphi is exact integers over 9^4; evaluating the degree-7 derivative by Horner's rule
    # errs by <= 2 * 7 eps64 * sum |a_i| s^i (Higham), the bound used here.
    dpoly = poly.deriv()
    horner = 16 * EPS64 * np.polynomial.Polynomial(np.abs(dpoly.coef))(s).max()
    np.testing.assert_allclose(dphi[1, 2:9], dpoly(s), rtol=0, atol=horner)
    assert default_weak_width(20) == 10 and default_weak_width(4) == 4


def test_weak_form_integration_by_parts():
    # For x = sin t with the feature column cos t, the weak target equals the weak
    # feature, -int phi' x = int phi x', up to the quadrature error of the plain sums
    # (~8e-6 relative for 40 intervals per bump); rounding of the 41-term sums,
    # ~41 eps64 ~ 1e-14 relative, is negligible against it.
    dt = 0.02
    t = dt * np.arange(200)
    x = jnp.asarray(np.sin(t)[:, None])
    theta = jnp.asarray(np.cos(t)[:, None])
    target, features = lgfjax.weak_form(x, theta, dt, width=41, stride=10)
    assert target.shape == features.shape == ((200 - 41) // 10 + 1, 1)
    np.testing.assert_allclose(target, features, rtol=0, atol=3e-5 * np.abs(features).max())


def test_width_3_is_rejected_and_width_4_is_not_degenerate():
    # A width-3 bump has one interior sample (its peak), where its derivative is
    # zero, so its weak target would vanish for any data: it is refused.
    x = _trajectory("damped_oscillator", 0.05, 20)
    with pytest.raises(ValueError, match="width"):
        _targets(x, 0.05, "weak", width=3)
    target, _ = _targets(x, 0.05, "weak", width=4)
    # The targets are O(0.1-1) for this trajectory, not rounding-level: != 0 is robust.
    assert np.any(np.asarray(target) != 0)
    assert lgfjax._derivatives.default_weak_width(5) == 4


# --- ODE recovery ------------------------------------------------------------------

# Tolerance per form, from its truncation error at dt = 0.01 (observed errors are
# 5e-3 / 2e-5 / 1e-9 / 1e-8, so each bound has 2x to 10x margin and is well below the
# next-less-accurate form's error). Rounding is far smaller: fd4 targets lose
# ~eps64 * 150 * |x| <= 1e-13, which the fit amplifies by kappa(features) <= 2.7e3 to
# < 1e-9 relative; the weak form does no differencing (kappa <= 6.6e4, 400-term sums:
# < 1e-8). 4 ulps of the trajectory (--perturb) moved the coefficients by < 2e-15.
FORMS = [(1, 2e-2), (2, 1e-4), (4, 1e-8), ("weak", 1e-7)]


@pytest.mark.numerics
@pytest.mark.parametrize("system", list(SYSTEMS))
@pytest.mark.parametrize("form, tol", FORMS, ids=["fd1", "fd2", "fd4", "weak"])
def test_recovers_known_ode(system, form, tol):
    dt = 0.01
    x = _trajectory(system, dt, 400)
    target, features = _targets(x, dt, form)
    coef = np.asarray(fit(features, target, threshold=0.05))
    true = SYSTEMS[system][2]
    np.testing.assert_array_equal(coef != 0, true != 0)
    np.testing.assert_allclose(coef, true, rtol=0, atol=tol)


@pytest.mark.numerics
@pytest.mark.parametrize("num", [15, 30])
@pytest.mark.parametrize("system", list(SYSTEMS))
def test_short_history_weak_form_default_width(system, num):
    """15 to 30 noise-free samples: the default half-history test functions recover the
    model to < 1e-2 with the right support, and beat a narrow width-5 bump (whose
    discrete integration by parts is biased by ~3%). Not claimed: with noise none of
    these widths identifies a degree-2 model from so few samples, and width 4 (the
    trapezoid rule) is more accurate than the default on clean data.
    """
    dt = 0.05
    x = _trajectory(system, dt, num)
    true = SYSTEMS[system][2]
    default = np.asarray(fit(*_targets(x, dt, "weak")[::-1], threshold=0.05))
    narrow = np.asarray(fit(*_targets(x, dt, "weak", width=5)[::-1], threshold=0.05))
    err_default = np.abs(default - true).max()
    err_narrow = np.abs(narrow - true).max()
    np.testing.assert_array_equal(default != 0, true != 0)
    # Discretisation errors (default 5e-4..7e-3, narrow 3.3e-2): the features are
    # ill-conditioned (kappa up to 2.6e9 at 15 samples), but kappa eps64 ~ 6e-7 of
    # amplified rounding is far below both bounds.
    assert err_default < 1e-2
    assert err_default < 0.5 * err_narrow, (err_default, err_narrow)


@pytest.mark.numerics
def test_weak_form_under_jit():
    x = _trajectory("lotka_volterra", 0.05, 30)
    theta = lgfjax.polynomial_library(x, 2)
    eager = lgfjax.weak_form(x, theta, 0.05)
    jitted = jax.jit(lambda a, b, dt: lgfjax.weak_form(a, b, dt))(x, theta, 0.05)
    # Two programs may order each 30-term sum differently: they differ by at most
    # 2 * 30 eps64 * (|phi| @ |data|) per entry (the classic dot-product bound).
    phi, dphi = _derivatives.test_functions(30, default_weak_width(30))
    bounds = (np.abs(dphi) @ np.abs(x), 0.05 * np.abs(phi) @ np.abs(theta))
    for e, j, b in zip(eager, jitted, bounds, strict=True):
        assert np.all(np.abs(np.asarray(j) - np.asarray(e)) <= 2 * 30 * EPS64 * b)
    f32 = lgfjax.weak_form(x.astype(jnp.float32), theta.astype(jnp.float32), 0.05)
    assert all(a.dtype == jnp.float32 for a in f32)


# --- errors ------------------------------------------------------------------------


@pytest.mark.parametrize("order", [0, 3, 6])
def test_finite_difference_bad_order(order):
    with pytest.raises(ValueError, match="order"):
        lgfjax.finite_difference(jnp.ones((10, 2)), 0.1, order)
    with pytest.raises(ValueError, match="order"):
        lgfjax.strong_form(jnp.ones((10, 2)), jnp.ones((10, 3)), 0.1, order)


@pytest.mark.parametrize("width", [2, 11, 0])
def test_weak_form_bad_width(width):
    with pytest.raises(ValueError, match="width"):
        lgfjax.weak_form(jnp.ones((10, 2)), jnp.ones((10, 3)), 0.1, width=width)
