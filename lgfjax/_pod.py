"""Proper orthogonal decomposition of a snapshot matrix through its Gram matrix."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._sharding import explicit_spec, reduced_sharding


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


# Columns per block when a centred contraction is formed block by block (see `_blocks`).
BLOCK = 1 << 16


def _blocks(leaf, origin, dtype, block_fn, init):
    """Fold ``block_fn(carry, start, X[:, cols] - o[cols])`` over column blocks of a leaf.

    `leaf` is ``(K, *shape)`` flattened to ``(K, n)``; `origin` (``shape``, or None)
    is subtracted from every row. A leaf of at most `BLOCK` columns, or one that is
    explicitly sharded, is centred in one piece. A larger one is centred one block of
    `BLOCK` columns at a time in a loop (and its remainder after it), so that no
    ``(K, n)`` temporary is formed: a compiled training step would otherwise hold one
    in its temporaries on every update, true or surrogate, not only when it fits.
    """
    flat = _flat2(leaf)
    o = None if origin is None else origin.reshape(-1)

    def centred(start, size):
        cols = jax.lax.dynamic_slice_in_dim(flat, start, size, axis=1).astype(dtype)
        if o is None:
            return cols
        return cols - jax.lax.dynamic_slice_in_dim(o, start, size).astype(dtype)

    n = flat.shape[1]
    if n <= BLOCK or origin is None or explicit_spec(leaf) is not None:
        whole = flat.astype(dtype) if o is None else flat.astype(dtype) - o.astype(dtype)
        return block_fn(init, 0, whole)
    count, tail = divmod(n, BLOCK)
    carry = jax.lax.fori_loop(
        0, count, lambda i, c: block_fn(c, i * BLOCK, centred(i * BLOCK, BLOCK)), init
    )
    if tail:
        carry = block_fn(carry, count * BLOCK, centred(count * BLOCK, tail))
    return carry


def tree_gram(snapshots, dtype, origin=None) -> Float[Array, "K K"]:
    """``X X^T`` for a pytree of snapshot leaves of shape ``(K, *shape)``.

    With `origin` (a pytree of ``shape`` leaves), the Gram matrix of ``X - origin``,
    centred before the products so that small moves of large parameters keep their
    digits, and without a ``(K, n)`` temporary for large leaves.
    """
    origins = [None] * len(jax.tree_util.tree_leaves(snapshots))
    if origin is not None:
        origins = jax.tree_util.tree_leaves(origin)

    def one(leaf, o):
        k = leaf.shape[0]

        def add(gram, _, d):
            return gram + _contract("kn,jn->kj", d, d)

        return _blocks(leaf, o, dtype, add, jnp.zeros((k, k), dtype))

    grams = [one(leaf, o) for leaf, o in zip(jax.tree_util.tree_leaves(snapshots), origins)]
    return sum(grams[1:], grams[0])


def tree_basis(snapshots, v: Float[Array, "K r"], s: Float[Array, " r"], dtype, origin=None):
    """Basis leaves ``(r, *shape)`` with ``U = (X - origin)^T v / s``, stored in `dtype`.

    `origin` as in `tree_gram` (None: ``X`` itself).
    """
    inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
    weights = v * inv
    r = weights.shape[1]

    def one(leaf, o):
        def put(out, start, d):
            part = jnp.einsum("kr,kn->rn", weights, d.astype(weights.dtype)).astype(dtype)
            if out is None:
                return part
            return jax.lax.dynamic_update_slice_in_dim(out, part, start, axis=1)

        flat = _flat2(leaf)
        blocked = flat.shape[1] > BLOCK and o is not None and explicit_spec(leaf) is None
        init = jnp.zeros((r, flat.shape[1]), dtype) if blocked else None
        out = _blocks(leaf, o, weights.dtype, put, init)
        return out.reshape((r,) + leaf.shape[1:])

    if origin is None:
        return jax.tree_util.tree_map(lambda leaf: one(leaf, None), snapshots)
    return jax.tree_util.tree_map(one, snapshots, origin)


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
