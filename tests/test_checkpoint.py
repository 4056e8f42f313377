"""Checkpointing: the state is a stable pytree of arrays, and a restored run continues
bitwise identically in a fresh process."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lgfjax
from lgfjax._adam import lgf_adam

# The script builds the optimiser, optionally restores a checkpoint, runs some jitted
# steps and saves params and state (and, if asked, a checkpoint after `at` of those
# steps). It runs in fresh interpreters so that nothing (compilation caches, Python
# objects) survives between the save and the restore.
SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np, optax, lgfjax
    from lgfjax._adam import lgf_adam
    from problems import perturb  # 4 ulps under pytest --perturb (LGFJAX_TEST_PERTURB)

    kind, steps, load, save = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    at, checkpoint = (int(sys.argv[5]), sys.argv[6]) if len(sys.argv) > 6 else (None, None)
    if kind == "lgf":
        opt = lgfjax.lgf(optax.sgd(0.05), dt=0.05, schedule=lgfjax.Fixed(6, 15, check_every=3),
                         fit=lgfjax.Fit(rank=2))
    else:
        opt = lgf_adam(0.05, schedule=lgfjax.Fixed(6, 15), fit=lgfjax.Fit(rank=2))

    def loss(p):
        return jnp.sum(jnp.array([1.0, 3.0, 0.5]) * p["w"] ** 2) + jnp.sum((p["b"] - 1.0) ** 2)

    params = perturb({"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.zeros((2, 2))})
    state = opt.init(params)
    treedef = jax.tree_util.tree_structure((params, state))
    if load != "-":
        data = np.load(load)
        leaves = [jnp.asarray(data[f"leaf{i}"]) for i in range(len(data.files))]
        params, state = jax.tree_util.tree_unflatten(treedef, leaves)

    @jax.jit
    def step(params, state):
        _, grads = lgfjax.value_and_grad(loss)(params, state)
        updates, state = opt.update(grads, state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    def dump(path):
        leaves = jax.tree_util.tree_leaves((params, state))
        np.savez(path, **{f"leaf{i}": np.asarray(x) for i, x in enumerate(leaves)})

    for i in range(steps):
        params, state = step(params, state)
        if i + 1 == at:
            dump(checkpoint)
    dump(save)
    """
)


def _run(tmp_path, kind, steps, load, save, *checkpoint):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    # The script imports tests/problems.py; LGFJAX_TEST_PERTURB passes through the env.
    tests = str(Path(__file__).parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    subprocess.run(
        [sys.executable, str(script), kind, str(steps), str(load), str(save)]
        + [str(c) for c in checkpoint],
        check=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path},
    )
    data = np.load(save)
    return [data[f"leaf{i}"] for i in range(len(data.files))]


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["lgf", "lgf_adam"])
def test_restore_in_fresh_process_is_bitwise_identical(tmp_path, kind):
    # 9 steps stops inside the surrogate phase of the first cycle (K = 6, M = 15). The
    # straight run writes that checkpoint on its way (saving reads the arrays, it changes
    # nothing); a second, fresh process restores it and runs the remaining 16 steps.
    straight = _run(tmp_path, kind, 25, "-", tmp_path / "straight.npz", 9, tmp_path / "half.npz")
    resumed = _run(tmp_path, kind, 16, tmp_path / "half.npz", tmp_path / "resumed.npz")
    assert len(straight) == len(resumed)
    for a, b in zip(straight, resumed):
        assert a.dtype == b.dtype and a.shape == b.shape
        # Bitwise is what is guaranteed: every step is the same compiled program (same
        # script, jax and machine) applied to bitwise the same params and state, and XLA's
        # CPU code is deterministic; a checkpoint that dropped or re-rounded any leaf
        # (e.g. through float32) would show here.
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("make", ["lgf", "lgf_adam"])
def test_state_structure_shapes_and_dtypes_are_stable_across_phases(rank, make):
    if make == "lgf":
        opt = lgfjax.lgf(
            optax.sgd(0.1),
            dt=0.1,
            schedule=lgfjax.Fixed(history_size=4, retrain_interval=9),
            fit=lgfjax.Fit(rank=rank),
        )
    else:
        opt = lgf_adam(
            0.1,
            schedule=lgfjax.Fixed(history_size=4, retrain_interval=9),
            fit=lgfjax.Fit(rank=rank),
        )
    params = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones((2,), jnp.float64)}
    state = opt.init(params)

    def signature(tree):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return treedef, [(x.shape, x.dtype) for x in leaves]

    reference = signature(state)
    step = jax.jit(lambda g, s, p: opt.update(g, s, p))
    for _ in range(20):
        grads = jax.tree_util.tree_map(lambda p: 0.3 * p, params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert signature(state) == reference
        assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(state))
