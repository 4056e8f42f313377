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


@pytest.mark.parametrize("n, degree, include_bias", CASES)
def test_matches_pysindy(n, degree, include_bias):
    x = np.random.default_rng(n * 10 + degree).normal(size=(7, n))
    lib, ref = _pysindy_library(x, degree, include_bias)
    got = np.asarray(lgfjax.polynomial_library(jnp.asarray(x), degree, include_bias))
    size = lgfjax.library_size(n, degree, include_bias)
    assert got.shape == ref.shape == (7, size)
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=1e-13)
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
    assert theta.tolist() == [[1.0, 2.0, 3.0, 4.0, 6.0, 9.0]]


@settings(max_examples=30, deadline=None)
@given(
    x=hnp.arrays(np.float64, (5, 3), elements=st.floats(-3.0, 3.0)),
    degree=st.integers(1, 3),
    include_bias=st.booleans(),
)
def test_columns_are_the_monomials_of_the_exponent_table(x, degree, include_bias):
    theta = np.asarray(lgfjax.polynomial_library(jnp.asarray(x), degree, include_bias))
    exps = lgfjax.polynomial_exponents(3, degree, include_bias)
    expected = np.prod(x[:, None, :] ** exps[None, :, :], axis=-1)
    np.testing.assert_allclose(theta, expected, rtol=1e-12, atol=1e-12)
    # Total degrees are non-decreasing along the columns, as in pysindy.
    assert np.all(np.diff(exps.sum(axis=1)) >= 0)


def test_batch_dimensions_are_rowwise():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 3)))
    theta = lgfjax.polynomial_library(x, 3)
    assert theta.shape == (2, 4, lgfjax.library_size(3, 3))
    flat = lgfjax.polynomial_library(x.reshape(8, 3), 3)
    np.testing.assert_array_equal(np.asarray(theta).reshape(8, -1), np.asarray(flat))


def test_jit_vmap_and_float32():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(6, 4)))
    eager = lgfjax.polynomial_library(x, 2)
    jitted = jax.jit(lgfjax.polynomial_library, static_argnums=(1, 2))(x, 2, True)
    np.testing.assert_allclose(jitted, eager, rtol=1e-14)
    per_row = jax.vmap(lambda row: lgfjax.polynomial_library(row, 2))(x)
    np.testing.assert_allclose(per_row, eager, rtol=1e-14)
    x32 = x.astype(jnp.float32)
    theta32 = jax.jit(lambda v: lgfjax.polynomial_library(v, 2))(x32)
    assert theta32.dtype == jnp.float32
    np.testing.assert_allclose(theta32, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("degree", [0, -1])
def test_degree_below_one_raises(degree):
    with pytest.raises(ValueError, match="degree"):
        lgfjax.polynomial_library(jnp.ones((3, 2)), degree)
