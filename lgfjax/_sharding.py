"""Explicit sharding: where a contraction's result lives, gathering and re-placing leaves.

With `jax.sharding.AxisType.Explicit` mesh axes JAX asks where every result that
mixes sharded axes goes. These helpers answer for the optimiser: small results of a
contraction over the parameters are replicated, the flat vector of full-space LGF is
formed from replicated leaves, and a step goes back where its parameter lives. With
no explicit mesh axis each is a no-op.
"""

import jax
from jax.sharding import PartitionSpec


def reduced_sharding(*arrays):
    """Output sharding of a contraction over ``n`` under explicit sharding.

    With `jax.sharding.AxisType.Explicit` mesh axes, JAX refuses to guess how the
    result of contracting a sharded axis is laid out; the small result (Gram matrix,
    coordinates) is replicated, i.e. an all-reduce. None (JAX's default) otherwise.
    """
    for x in arrays:
        found = explicit_spec(x)
        if found is not None:
            return jax.sharding.NamedSharding(found[0], PartitionSpec())
    return None


def explicit_spec(x):
    """The mesh and spec of `x` if it is sharded along an explicit mesh axis, else None."""
    sharding = jax.typeof(x).sharding
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None
    if not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return None
    if all(p is None for p in sharding.spec):
        return None
    return mesh, sharding.spec


def gathered(tree):
    """`tree` with every explicitly sharded leaf replicated (a no-op otherwise).

    Full-space LGF works with the flat parameter vector, which `ravel_pytree` can
    only form from leaves laid out alike.
    """

    def one(x):
        found = explicit_spec(x)
        if found is None:
            return x
        return jax.sharding.reshard(x, jax.sharding.NamedSharding(found[0], PartitionSpec()))

    return jax.tree_util.tree_map(one, tree)


def placed_like(tree, like):
    """`tree` resharded leaf by leaf like `like` where that is explicitly sharded."""

    def one(x, y):
        found = explicit_spec(y)
        if found is None:
            return x
        return jax.sharding.reshard(x, jax.sharding.NamedSharding(*found))

    return jax.tree_util.tree_map(one, tree, like)


def explicit_out_sharding(tree):
    """``(shardings like tree, replicated)`` if `tree` has an explicitly sharded leaf.

    The output shardings `jax.sharding.auto_axes` needs to return a state laid out
    like `tree` together with a replicated flag; None without explicit sharding.
    """
    found = [explicit_spec(x) for x in jax.tree_util.tree_leaves(tree)]
    mesh = next((f[0] for f in found if f is not None), None)
    if mesh is None:
        return None

    def like(x):
        spec = explicit_spec(x)
        return jax.sharding.NamedSharding(mesh, PartitionSpec() if spec is None else spec[1])

    return jax.tree_util.tree_map(like, tree), jax.sharding.NamedSharding(mesh, PartitionSpec())
