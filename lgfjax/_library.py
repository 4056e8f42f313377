"""Polynomial feature libraries, in pysindy's ``PolynomialLibrary`` column order."""

import functools
import itertools
import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


def library_size(n: int, degree: int, include_bias: bool = True) -> int:
    """Number of monomials of total degree ``1..degree`` in ``n`` variables, plus bias."""
    size = sum(math.comb(n + d - 1, d) for d in range(1, degree + 1))
    return size + int(include_bias)


@functools.lru_cache(maxsize=64)
def _index_tables(n: int, degree: int) -> tuple[np.ndarray, ...]:
    # One (C_d, d) table of variable indices per degree d, built once per shape; the
    # combinations-with-replacement order is the one pysindy uses.
    tables = []
    for d in range(1, degree + 1):
        combos = list(itertools.combinations_with_replacement(range(n), d))
        tables.append(np.asarray(combos, dtype=np.int32).reshape(len(combos), d))
    return tuple(tables)


def polynomial_exponents(n: int, degree: int, include_bias: bool = True) -> np.ndarray:
    """Integer exponent matrix of shape ``(P, n)``: row ``p`` is the monomial of column ``p``.

    Useful for naming features and for tests; the library itself never forms it.
    """
    rows = [np.zeros((1, n), dtype=np.int32)] if include_bias else []
    for table in _index_tables(n, degree):
        exps = np.zeros((table.shape[0], n), dtype=np.int32)
        for col in range(table.shape[1]):
            np.add.at(exps, (np.arange(table.shape[0]), table[:, col]), 1)
        rows.append(exps)
    return np.concatenate(rows, axis=0) if rows else np.zeros((0, n), np.int32)


def feature_names(n: int, degree: int, include_bias: bool = True, names=None) -> list[str]:
    """Human-readable names of the library columns, e.g. ``["1", "x0", "x0 x1"]``."""
    names = [f"x{i}" for i in range(n)] if names is None else list(names)
    out = []
    for row in polynomial_exponents(n, degree, include_bias):
        parts = [names[i] if e == 1 else f"{names[i]}^{e}" for i, e in enumerate(row) if e]
        out.append(" ".join(parts) if parts else "1")
    return out


def polynomial_library(
    x: Float[Array, "*batch n"], degree: int, include_bias: bool = True
) -> Float[Array, "*batch P"]:
    """All monomials of ``x`` up to total degree ``degree``.

    Columns are ordered as in pysindy's ``PolynomialLibrary``: the bias (if
    ``include_bias``), then degree 1, then degree 2 by combinations with replacement,
    and so on. The index tables are static, so this is one gather and one product per
    degree under ``jax.jit``.

    **Arguments:**

    - `x`: points of shape ``(..., n)``.
    - `degree`: the largest total degree, a Python int ``>= 1``.
    - `include_bias`: whether to prepend the constant column.

    **Returns:** features of shape ``(..., P)`` with ``P = library_size(n, degree,
    include_bias)``.

    ```python
    import jax.numpy as jnp
    import lgfjax

    theta = lgfjax.polynomial_library(jnp.array([[2.0, 3.0]]), degree=2)
    # columns: 1, x0, x1, x0^2, x0 x1, x1^2
    assert theta.tolist() == [[1.0, 2.0, 3.0, 4.0, 6.0, 9.0]]
    ```
    """
    x = jnp.asarray(x)
    if degree < 1:
        raise ValueError(f"`degree` must be an integer >= 1, got {degree!r}.")
    n = x.shape[-1]
    cols = []
    if include_bias:
        cols.append(jnp.ones(x.shape[:-1] + (1,), x.dtype))
    for table in _index_tables(n, degree):
        cols.append(jnp.prod(x[..., table], axis=-1))
    return jnp.concatenate(cols, axis=-1)
