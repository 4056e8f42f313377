"""Runtime shape checks: the public functions' jaxtyping annotations hold when called.

Each function is wrapped in `jaxtyping.jaxtyped` with beartype, so a call whose
arguments or result disagree with the annotated shapes (the same symbol bound to two
sizes, a missing axis) raises. Valid calls must pass; wrong shapes must be caught.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

import lgfjax


def checked(fn):
    return jaxtyped(typechecker=beartype)(fn)


def _x(k=9, n=3):
    return jnp.asarray(np.random.default_rng(0).normal(size=(k, n)))


def test_library_and_flow():
    x = _x()
    theta = checked(lgfjax.polynomial_library)(x, 2)
    assert theta.shape == (9, lgfjax.library_size(3, 2, True))
    flow = lgfjax.PolynomialFlow(jnp.ones((theta.shape[1], 3)), 2, True)
    assert checked(flow.__call__)(0.0, x[0]).shape == (3,)
    with pytest.raises(TypeCheckError):  # a state is one vector, not a batch
        checked(flow.__call__)(0.0, x)


def test_pod():
    basis, coords, energy = checked(lgfjax.pod)(_x(), 2)
    assert basis.shape == (3, 2) and coords.shape == (9, 2) and energy.shape == ()
    with pytest.raises(TypeCheckError):  # snapshots need two axes (K, n)
        checked(lgfjax.pod)(_x()[0], 2)


@pytest.mark.parametrize("targets", [None, 1, 3])
def test_stlsq(targets):
    # (A 1-D target gives 1-D coefficients: the annotation said (P, d) until this test.)
    x = _x()
    theta = lgfjax.polynomial_library(x, 1)
    y = x[:, 0] if targets is None else x[:, :targets]
    coef = checked(lgfjax.stlsq)(theta, y, threshold=0.0, alpha=0.0)
    assert coef.shape == (theta.shape[1],) + y.shape[1:]
    with pytest.raises(TypeCheckError):  # fewer target rows than library rows
        checked(lgfjax.stlsq)(theta, y[:-1])


def test_derivative_forms():
    x = _x()
    theta = lgfjax.polynomial_library(x, 1)
    for order in (1, 2, 4):
        dx = checked(lgfjax.finite_difference)(x, 0.1, order)
        assert dx.shape[1] == 3
        target, rows = checked(lgfjax.strong_form)(x, theta, 0.1, order)
        assert target.shape[0] == rows.shape[0] and rows.shape[1] == theta.shape[1]
    target, rows = checked(lgfjax.weak_form)(x, theta, 0.1)
    assert target.shape[0] == rows.shape[0]
    with pytest.raises(TypeCheckError):  # library rows must match the trajectory's
        checked(lgfjax.strong_form)(x, theta[:-1], 0.1)
