"""Polynomial library: pysindy column order, sizes, names, and JAX transformations."""

import warnings

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pysindy as ps
import pytest
from hypothesis import given, settings, strategies as st

import lgfjax

from .problems import perturb

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)

CASES = [
    (1, 1, True),
    (1, 3, False),
    (2, 2, True),
    (2, 4, False),
    (3, 2, False),
    (3, 3, True),
    (4, 2, True),
    (5, 3, False),
]


def _pysindy_library(x, degree, include_bias):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lib = ps.PolynomialLibrary(degree=degree, include_bias=include_bias).fit(x)
        return lib, np.asarray(lib.transform(x))


@pytest.mark.numerics
@pytest.mark.parametrize("n, degree, include_bias", CASES)
def test_matches_pysindy(n, degree, include_bias):
    x = np.asarray(perturb(np.random.default_rng(n * 10 + degree).normal(size=(7, n))))
    lib, ref = _pysindy_library(x, degree, include_bias)
    got = np.asarray(lgfjax.polynomial_library(jnp.asarray(x), degree, include_bias))
    size = lgfjax.library_size(n, degree, include_bias)
    assert got.shape == ref.shape == (7, size)
    # A degree-d monomial is d - 1 multiplications (eps64 / 2 each; pysindy's powers are
    # within an ulp): each side is within d eps64 of the exact product in any order.
    np.testing.assert_allclose(got, ref, rtol=2 * degree * EPS64, atol=0)
    np.testing.assert_array_equal(lgfjax.polynomial_exponents(n, degree, include_bias), lib.powers_)
    assert lgfjax.feature_names(n, degree, include_bias) == lib.get_feature_names()


def test_library_size_formula():
    # P = C(n + degree, degree) with the bias, one fewer without it.
    from math import comb

    for n in range(1, 8):
        for degree in range(1, 5):
            assert lgfjax.library_size(n, degree) == comb(n + degree, degree)
            assert lgfjax.library_size(n, degree, False) == comb(n + degree, degree) - 1
    # The benchmark's large case.
    assert lgfjax.library_size(225, 2) == 25_651


def test_feature_names_custom_and_docstring_example():
    assert lgfjax.feature_names(2, 2, names=["a", "b"]) == ["1", "a", "b", "a^2", "a b", "b^2"]
    theta = lgfjax.polynomial_library(jnp.array([[2.0, 3.0]]), degree=2)
    # Exact: products of small integers are representable.
    assert theta.tolist() == [[1.0, 2.0, 3.0, 4.0, 6.0, 9.0]]


@pytest.mark.numerics
@settings(max_examples=30, deadline=None)
@given(
    x=hnp.arrays(np.float64, (5, 3), elements=st.floats(-3.0, 3.0)),
    degree=st.integers(1, 3),
    include_bias=st.booleans(),
)
def test_columns_are_the_monomials_of_the_exponent_table(x, degree, include_bias):
    x = np.asarray(perturb(x))
    theta = np.asarray(lgfjax.polynomial_library(jnp.asarray(x), degree, include_bias))
    exps = lgfjax.polynomial_exponents(3, degree, include_bias)
    expected = np.prod(x[:, None, :] ** exps[None, :, :], axis=-1)
    # As in test_matches_pysindy: each side within degree * eps64 of the exact product;
    # the atol covers products of hypothesis' tiny floats that underflow (or flush) to 0.
    np.testing.assert_allclose(theta, expected, rtol=2 * degree * EPS64, atol=1e-300)
    # Total degrees are non-decreasing along the columns, as in pysindy.
    assert np.all(np.diff(exps.sum(axis=1)) >= 0)


@pytest.mark.numerics
def test_batch_dimensions_are_rowwise():
    x = perturb(jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 3))))
    theta = lgfjax.polynomial_library(x, 3)
    assert theta.shape == (2, 4, lgfjax.library_size(3, 3))
    flat = lgfjax.polynomial_library(x.reshape(8, 3), 3)
    # Two programs (shapes) may multiply a cubic's 3 factors in another order: 2 roundings
    # of eps64 / 2 each way. A row mixed up with another would be off by O(1).
    np.testing.assert_allclose(np.asarray(theta).reshape(8, -1), flat, rtol=2 * EPS64, atol=0)


@pytest.mark.numerics
def test_jit_vmap_and_float32():
    x = perturb(jnp.asarray(np.random.default_rng(2).normal(size=(6, 4))))
    eager = lgfjax.polynomial_library(x, 2)
    jitted = jax.jit(lgfjax.polynomial_library, static_argnums=(1, 2))(x, 2, True)
    # Bitwise in any program: a degree-2 monomial is one correctly rounded product of two
    # factors (times the reduction's exact 1.0), which no evaluation order can change.
    np.testing.assert_array_equal(jitted, eager)
    per_row = jax.vmap(lambda row: lgfjax.polynomial_library(row, 2))(x)
    np.testing.assert_array_equal(per_row, eager)
    x32 = x.astype(jnp.float32)
    theta32 = jax.jit(lambda v: lgfjax.polynomial_library(v, 2))(x32)
    assert theta32.dtype == jnp.float32
    # Rounding both factors to float32 and the product once: <= 3 eps32 / 2 relative.
    np.testing.assert_allclose(theta32, eager, rtol=2 * EPS32, atol=0)


@pytest.mark.parametrize("degree", [0, -1])
def test_degree_below_one_raises(degree):
    with pytest.raises(ValueError, match="degree"):
        lgfjax.polynomial_library(jnp.ones((3, 2)), degree)
