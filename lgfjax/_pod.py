"""Proper orthogonal decomposition of a snapshot matrix through its Gram matrix."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._sharding import reduced_sharding


def gram_modes(
    gram: Float[Array, "K K"], rank: int
) -> tuple[Float[Array, "K r"], Float[Array, " r"], Float[Array, ""]]:
    """Leading right singular vectors of ``X`` from ``gram = X X^T``.

    **Returns:** ``(v, s, energy)``: the ``rank`` leading eigenvectors of `gram`
    (columns), the matching singular values ``s = sqrt(eigenvalue)`` (zero for
    numerically null directions) and the captured energy fraction
    ``sum(s^2) / trace(gram)``.
    """
    lam, vec = jnp.linalg.eigh(gram)
    lam, vec = lam[::-1][:rank], vec[:, ::-1][:, :rank]
    total = jnp.trace(gram)
    # Modes below the Gram matrix's rounding floor carry no trustworthy direction.
    floor = jnp.finfo(gram.dtype).eps * gram.shape[0] * jnp.maximum(lam[0], 0.0)
    keep = lam > floor
    s = jnp.where(keep, jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
    energy = jnp.where(total > 0, jnp.sum(s**2) / jnp.where(total > 0, total, 1.0), 0.0)
    return vec, s, energy


def pod(
    snapshots: Float[Array, "K n"], rank: int
) -> tuple[Float[Array, "n r"], Float[Array, "K r"], Float[Array, ""]]:
    """Rank-`rank` POD basis of a trajectory, at cost linear in ``n``.

    The snapshots are not centred, as in the LGF paper. The basis comes from the
    ``K x K`` Gram matrix, so no ``n x n`` matrix or ``n x K`` SVD is formed.

    **Arguments:**

    - `snapshots`: one state per row.
    - `rank`: number of modes, ``1 <= rank <= K``.

    **Returns:** ``(basis, coords, energy)``: orthonormal columns ``basis`` (a column
    is zero if the snapshots span fewer than `rank` directions), the modal coordinates
    ``coords = snapshots @ basis`` and the captured energy fraction.

    ```python
    import jax.numpy as jnp
    import lgfjax

    x = jnp.outer(jnp.arange(1.0, 6.0), jnp.array([1.0, 2.0, 2.0]))  # rank one
    basis, coords, energy = lgfjax.pod(x, rank=1)
    assert jnp.allclose(coords @ basis.T, x, atol=1e-5) and energy > 0.999
    ```
    """
    if not 1 <= rank <= snapshots.shape[0]:
        raise ValueError(
            f"`rank` must be in [1, {snapshots.shape[0]}] for {snapshots.shape[0]} "
            f"snapshots, got {rank!r}."
        )
    v, s, energy = gram_modes(tree_gram(snapshots, snapshots.dtype), rank)
    basis = tree_basis(snapshots, v, s, snapshots.dtype)
    return basis.T, v * s, energy


# Pytree versions used by the optimiser: snapshots are pytrees whose leaves carry a
# leading snapshot axis, so sharded parameters stay sharded along their own axes and
# every contraction over ``n`` is a reduction that JAX can keep distributed.


def _flat2(leaf):
    return leaf.reshape(leaf.shape[0], -1)


def _contract(subscripts, a, b):
    return jnp.einsum(subscripts, a, b, out_sharding=reduced_sharding(a, b))


def tree_gram(snapshots, dtype) -> Float[Array, "K K"]:
    """``X X^T`` for a pytree of snapshot leaves of shape ``(K, *shape)``."""
    grams = [
        _contract("kn,jn->kj", _flat2(leaf).astype(dtype), _flat2(leaf).astype(dtype))
        for leaf in jax.tree_util.tree_leaves(snapshots)
    ]
    return sum(grams[1:], grams[0])


def tree_basis(snapshots, v: Float[Array, "K r"], s: Float[Array, " r"], dtype):
    """Basis leaves ``(r, *shape)`` with ``U = X^T v / s``, stored in `dtype`."""
    inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
    weights = v * inv

    def one(leaf):
        flat = jnp.einsum("kr,kn->rn", weights, _flat2(leaf).astype(weights.dtype))
        return flat.reshape((weights.shape[1],) + leaf.shape[1:]).astype(dtype)

    return jax.tree_util.tree_map(one, snapshots)


def tree_project(basis, tree, dtype) -> Float[Array, " r"]:
    """Modal coordinates ``U^T x`` of a pytree ``x`` (a sum of per-leaf contractions)."""
    return tree_project_rows(basis, jax.tree_util.tree_map(lambda x: x[None], tree), dtype)[0]


def tree_project_rows(basis, snapshots, dtype) -> Float[Array, "K r"]:
    """Modal coordinates of every snapshot: ``X U``."""
    parts = [
        _contract("kn,rn->kr", _flat2(leaf).astype(dtype), _flat2(b).astype(dtype))
        for b, leaf in zip(jax.tree_util.tree_leaves(basis), jax.tree_util.tree_leaves(snapshots))
    ]
    return sum(parts[1:], parts[0])


def tree_lift(basis, dz: Float[Array, " r"], like):
    """``U dz`` as a pytree shaped and typed like `like`."""

    def one(b, leaf):
        flat = dz @ _flat2(b).astype(dz.dtype)
        return flat.reshape(leaf.shape).astype(leaf.dtype)

    return jax.tree_util.tree_map(one, basis, like)
