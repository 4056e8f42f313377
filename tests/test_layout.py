"""The engine's parameter layout (`lgfjax._layout`): one flat vector for a pytree of
one dtype, the pytree otherwise, and the same optimiser either way."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from problems import mlp_regression, pytree_quadratic, run

import lgfjax
from lgfjax import _layout


@pytest.mark.parametrize(
    "params, flat",
    [
        ({"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, True),
        (jnp.ones((2, 3)), False),  # one leaf: already flat
        ({"w": jnp.ones((2, 3)), "b": jnp.zeros(3, jnp.float32)}, False),  # two dtypes
        ([jnp.ones(2)], False),
    ],
)
def test_flat_layout_rule(params, flat):
    assert _layout.flat_layout(params) is flat


def _optimisers(lr):
    return {
        "lgf": lambda: lgfjax.lgf(optax.sgd(lr), dt=lr),
        "lgf fixed": lambda: lgfjax.lgf(
            optax.sgd(lr),
            dt=lr,
            schedule=lgfjax.Fixed(history_size=6, retrain_interval=15),
            fit=lgfjax.Fit(rank=3),
        ),
        "lgf_adam": lambda: lgfjax.lgf_adam(0.05),
        "lgf_adam fixed": lambda: lgfjax.lgf_adam(
            0.05, schedule=lgfjax.Fixed(history_size=6, retrain_interval=15), fit=lgfjax.Fit(rank=3)
        ),
    }


@pytest.mark.parametrize("kind", list(_optimisers(0.1)))
def test_pytree_state_is_one_flat_vector(kind):
    problem = pytree_quadratic()
    n = ravel_pytree(problem.x0)[0].size
    state = _optimisers(problem.lr)[kind]().init(problem.x0)
    rows = state.buffers.points if hasattr(state, "buffers") else state.window.trajectory
    assert jnp.shape(rows)[1:] == (n,)
    if kind.startswith("lgf_adam"):
        # lgf_adam's own Adam is elementwise and runs in the engine's layout.
        assert jnp.shape(state.base_state.mu) == (n,)


def test_a_users_base_keeps_its_own_pytree_state():
    # optax.adam as a user's base sees the parameters' pytree, so its state has
    # optax.adam's own structure and the first K true steps are optax.adam's (the flat
    # layout only ravels and unravels around it).
    problem = pytree_quadratic()
    K = 6
    opt = lgfjax.lgf(optax.adam(0.05), dt=0.05, schedule=lgfjax.Verified(history_size=K))
    ref = optax.adam(0.05)
    p, s = problem.x0, opt.init(problem.x0)
    q, r = problem.x0, ref.init(problem.x0)
    assert jax.tree_util.tree_structure(s.base_state) == jax.tree_util.tree_structure(r)
    grad = jax.jit(jax.grad(problem.loss))
    for _ in range(K):
        u, s = opt.update(grad(p), s, p)
        p = optax.apply_updates(p, u)
        v, r = ref.update(grad(q), r, q)
        q = optax.apply_updates(q, v)
    # The same update compiled in another program: equal up to XLA's fusion choices,
    # a few ulps (1e-13 is 450 eps64), as in test_lgf's test_true_steps_equal_base.
    leaves = zip(jax.tree_util.tree_leaves((p, s.base_state)), jax.tree_util.tree_leaves((q, r)))
    for a, b in leaves:
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


# "lgf fixed" runs the fixed engine in both layouts and "lgf_adam" Adam's moments in
# them; lgf_adam on the fixed engine combines the two (`python -m pytest -m slow`).
@pytest.mark.numerics
@pytest.mark.parametrize(
    "kind",
    ["lgf", "lgf fixed", "lgf_adam", pytest.param("lgf_adam fixed", marks=pytest.mark.slow)],
)
def test_flat_and_pytree_layouts_agree(kind, monkeypatch):
    problem = pytree_quadratic()
    make = _optimisers(problem.lr)[kind]
    p_flat, s_flat, _ = run(make(), problem, 60)
    monkeypatch.setattr(_layout, "flat_layout", lambda params: False)
    p_tree, s_tree, _ = run(make(), problem, 60)
    # The two runs really used the two layouts (the monkeypatch took effect).
    rows = [
        s.buffers.points if hasattr(s, "buffers") else s.window.trajectory for s in (s_flat, s_tree)
    ]
    assert not isinstance(rows[0], dict) and isinstance(rows[1], dict)
    # Elementwise work is identical in both layouts; sums over the parameters (Gram
    # matrix, projections, norms) add the same terms in another order, which changes
    # each by at most n eps64 ~ 2e-15 relative (n = 10). The least-squares fit
    # amplifies that by its condition number, large for a few nearly collinear
    # iterates of a gradient flow (the observed end-to-end effect is ~1e-10); 1e-7 of
    # the parameters' scale is that amplification bounded by 1e8 / n. The schedule's
    # decisions (flow errors ~1e-12 against a tolerance of 0.2) cannot flip.
    a, b = ravel_pytree(p_flat)[0], ravel_pytree(p_tree)[0]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-7 * float(jnp.max(jnp.abs(b))))
    assert int(lgfjax.gradient_evaluations(s_flat)) == int(lgfjax.gradient_evaluations(s_tree))


def test_value_fn_sees_the_users_pytree():
    # The fixed schedule's acceptance test calls `value_fn` on the user's pytree (this
    # loss indexes the dict, so a flat vector would raise).
    problem = mlp_regression()
    opt = lgfjax.lgf(
        optax.sgd(problem.lr),
        dt=problem.lr,
        schedule=lgfjax.Fixed(history_size=6, retrain_interval=15, check_every=1),
        fit=lgfjax.Fit(rank=3),
    )
    params, state, losses = run(opt, problem, 30, value_fn=True)
    assert int(state.info.value_evaluations) > 0
    assert np.all(np.isfinite(losses))


@pytest.mark.parametrize("kind", list(_optimisers(0.1)))
def test_eager_init_is_one_program_with_the_same_state(kind, monkeypatch):
    # `compiled_init` runs an eager `init` as one compiled program: the same zeros and
    # copies as op by op (bitwise), each its own buffer (so the state can be donated).
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    taken = []  # the compiled path's decision, leaf by leaf
    on_one_device = _layout._on_one_device
    monkeypatch.setattr(
        _layout, "_on_one_device", lambda x: taken.append(on_one_device(x)) or taken[-1]
    )
    state = _optimisers(0.1)[kind]().init(params)
    assert taken and all(taken)  # every leaf on one device: the jitted init ran
    calls = []
    monkeypatch.setattr(_layout, "_on_one_device", lambda x: calls.append(x) and False)
    eager = _optimisers(0.1)[kind]().init(params)  # built afresh: op by op
    assert calls
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(eager)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(eager)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for built in (state, eager):  # op by op too (lgf_adam's moments once shared one array)
        pointers = [x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves((built, params))]
        assert len(set(pointers)) == len(pointers)
