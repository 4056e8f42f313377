"""Parts both schedules' engines share: the surrogate's view of a model, state helpers,
and the in-place loop idioms (`once_or_never`, `tied`) that keep XLA from copying."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from ._flow import PolynomialFlow
from ._pod import tree_lift, tree_project
from ._sharding import gathered, placed_like
from ._status import OK


class SurrogateModel(NamedTuple):
    """What a surrogate step sees: the fitted flow and its coordinates."""

    flow: PolynomialFlow
    basis: Any  # POD basis leaves, or None for full space
    unravel: Callable | None  # full space only: flat vector -> pytree like params
    origin: Any = None  # with `center`: the point the POD coordinates are relative to
    drift: Any = None  # POD only: the measured velocity's part outside the basis, frozen
    out_basis: Any = None  # POD only, optional: the basis the flow's output lives in
    noise: Any = 0.0  # relative noise of the measurements it was fitted to (`_noise`)
    drift_sq: Any = None  # with `drift`: |drift|^2, NaN unless drift and basis are finite

    def step_length(self, dz, time):
        """The length of ``lift(dz) + time * drift`` from `r` numbers, or None.

        The POD basis is orthonormal and the drift lies outside it, so the squared
        length is ``|dz|^2 + time^2 |drift|^2`` (to rounding; a null mode, a zero
        column, only overestimates it). A non-finite basis or drift makes it NaN.
        """
        if self.drift_sq is None or self.out_basis is not None:
            return None
        return jnp.sqrt(jnp.sum(dz * dz) + time * time * self.drift_sq)

    def project(self, tree, dtype):
        if self.basis is None:
            return ravel_pytree(gathered(tree))[0].astype(dtype)
        if self.origin is not None:
            tree = jax.tree_util.tree_map(
                lambda x, o: x.astype(dtype) - o.astype(dtype), tree, self.origin
            )
        return tree_project(self.basis, tree, dtype)

    def lift(self, dz, like):
        if self.basis is None:
            assert self.unravel is not None  # full space always carries its unravel
            return placed_like(optax.tree.cast_like(self.unravel(dz), like), like)
        return tree_lift(self.basis if self.out_basis is None else self.out_basis, dz, like)


def gate_step(step, solver_ok, gate):
    """``(step, code)``: a surrogate step measured in full and guarded by
    ``gate(length, solver_ok) -> code``; the step is zero unless the code is `OK`."""
    code = gate(optax.tree.norm(step), solver_ok)
    return optax.tree.where(code == OK, step, optax.tree.zeros_like(step)), code


def flat_unravel(params) -> Callable:
    """Full space: flat vector (any dtype) -> pytree like `params`."""
    flat, unravel = ravel_pytree(gathered(params))
    return lambda v: unravel(v.astype(flat.dtype))


def _i32(x=0):
    # One array per counter, so that the state can be donated.
    return jnp.asarray(x, jnp.int32)


def zero_info(cls, dtype):
    """An ``info`` NamedTuple of zeros: fields annotated ``Float[...]`` in `dtype`, the
    rest int32 counters, each its own array."""
    hints = cls.__annotations__
    return cls(
        *(jnp.zeros((), dtype) if "Float" in str(hints[name]) else _i32() for name in cls._fields)
    )


def schedule_reads(cls):
    """Class decorator: the reads both schedules' states answer alike.

    ``state.phase`` (0: the next update is a true step) and
    ``state.gradient_evaluations``, read by `lgfjax.needs_gradient`,
    `lgfjax.gradient_evaluations` and users, from the ``schedule`` and ``info``
    sub-states every lgfjax state has. (A NamedTuple cannot take a mixin.)
    """
    cls.phase = property(lambda self: self.schedule.phase, doc="0: the next update is a true step")
    cls.gradient_evaluations = property(
        lambda self: self.info.gradient_evaluations, doc="true gradients consumed (int32)"
    )
    return cls


def once_or_never(when, fn, carry):
    """``fn(carry)`` if `when`, else `carry`, as a while loop taken once or never.

    XLA updates the carry in place (a `lax.cond` branch returning an operand
    unchanged would copy it), and nothing is read when `when` is false.
    """

    def body(c):
        return jnp.asarray(True), fn(c[1])

    return jax.lax.while_loop(lambda c: ~c[0], body, (~when, carry))[1]


def tied(tree, deps, never):
    """`tree`, unchanged, made to depend on `deps`: for in-place writes after reads.

    A once-or-never loop updates its carry in place, so XLA must run every earlier
    read of that operand first. When the reads and the loop are not linked by data
    (a conditional reads the POD origin, a loop then refits it), XLA cannot tell, and
    copies the whole operand on every update instead. Here each array's first entry
    is rewritten as itself unless `never` (a traced bool that is False at run time,
    which XLA cannot prove) holds, in which case it would take a value of `deps`. The
    value is bitwise unchanged, the write is one element in place, and every read that
    produced `deps` now comes first. (An optimisation barrier does not do this.)
    """
    first = [jnp.ravel(x)[:1] for x in jax.tree_util.tree_leaves(deps) if jnp.size(x)]
    dep = jnp.concatenate([f.astype(jnp.float32) for f in first]).sum()

    def tie(x):
        if not isinstance(x, jax.Array) or x.size == 0:
            return x
        at = (0,) * x.ndim
        return x.at[at].set(jnp.where(never, dep.astype(x.dtype), x[at]))

    return jax.tree_util.tree_map(tie, tree)


def _zeros_along(leaf, rows: int, dtype):
    """Zeros of shape ``(rows, *leaf.shape)``, sharded like `leaf` along its own axes."""
    zeros = jnp.zeros((rows,) + jnp.shape(leaf), dtype)
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = jax.sharding.PartitionSpec(None, *sharding.spec)
        zeros = jax.device_put(zeros, jax.sharding.NamedSharding(sharding.mesh, spec))
    return zeros


def rows_like(params, rows: int, dtype=None):
    """Zeros of shape ``(rows, *leaf.shape)`` per leaf of `params`, sharded like it, in
    `dtype` (default: each leaf's own): the state's buffers and POD bases."""
    return jax.tree_util.tree_map(
        lambda p: _zeros_along(p, rows, dtype or jnp.result_type(p)), params
    )


def _fit_dtype(params):
    dtypes = [jnp.result_type(leaf) for leaf in jax.tree_util.tree_leaves(params)]
    return jnp.result_type(np.float32, *dtypes)
