"""Equinox models: `lgfjax.filter_value_and_grad`, and counting that cannot mislead."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import perturb

import lgfjax

STEPS = 150


def setup(seed=0):
    model = eqx.nn.MLP(2, 1, 8, 1, key=jax.random.PRNGKey(seed))
    model = eqx.combine(perturb(eqx.filter(model, eqx.is_inexact_array)), model)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 2))
    y = jnp.sin(x[:, :1])

    def loss(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    return model, x, y, loss


def train(opt, gated: bool, steps=STEPS):
    model, x, y, loss = setup()
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    calls = []  # how often the objective actually ran (host callback)

    def counted(model, x, y):
        jax.debug.callback(lambda: calls.append(1))
        return loss(model, x, y)

    @eqx.filter_jit
    def step(model, state):
        if gated:
            value, grads = lgfjax.filter_value_and_grad(counted)(model, state, x, y)
        else:
            value, grads = eqx.filter_value_and_grad(counted)(model, x, y)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, state = opt.update(grads, state, params, value=value)
        return eqx.apply_updates(model, updates), state

    start = loss(model, x, y)
    for _ in range(steps):
        model, state = step(model, state)
    jax.effects_barrier()
    return float(start), float(loss(model, x, y)), state, len(calls)


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["lgf", "lgf_adam"])
def test_equinox_mlp_trains_and_objective_runs_only_in_true_steps(kind):
    opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1) if kind == "lgf" else lgfjax.lgf_adam(1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gated: no ungated-gradient warning
        start, end, state, calls = train(opt, gated=True)
    d = lgfjax.diagnostics(state)
    # Exact: the gated objective runs once per true step and never otherwise.
    assert calls == int(d.gradient_evaluations)
    assert int(d.gradient_evaluations) < STEPS  # some surrogate steps ran
    assert int(d.ungated_gradients) == 0
    # Training made progress (rounding cannot undo a drop of a whole order here:
    # the start's loss is O(1), 150 steps of lr 0.1 / 1e-2 bring it well below half).
    assert end < 0.5 * start


def test_ungated_gradients_are_reported():
    # The usual equinox loop evaluates the objective every step: LGF saves nothing, and
    # the diagnostics say so (a surrogate step handed a non-zero gradient), with a
    # warning. The jitted step itself has no host callback to warn with (it would keep
    # JAX's persistent compilation cache from storing it), so it stays silent.
    opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, state, calls = train(opt, gated=False, steps=60)
    with pytest.warns(UserWarning, match="non-zero gradient"):
        d = lgfjax.diagnostics(state)
    assert calls == 60  # exact: once per step
    surrogate = 60 - int(d.gradient_evaluations)
    assert surrogate > 0 and int(d.ungated_gradients) == surrogate


def test_skipped_evaluation_is_nan_and_zeros():
    model, x, y, loss = setup()
    opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    surrogate = state._replace(schedule=state.schedule._replace(phase=jnp.int32(1)))
    value, grads = lgfjax.filter_value_and_grad(loss)(model, surrogate, x, y)
    assert bool(jnp.isnan(value))
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(bool(jnp.all(g == 0)) for g in leaves)
    # In a true step it is equinox's own, compiled inside a `lax.cond` instead of op by
    # op: only the order of the 32-sample sums may differ, |error| <= 32 eps64 times the
    # sum of |terms| (bounded by 10x the largest gradient entry here, a tanh MLP).
    value, grads = lgfjax.filter_value_and_grad(loss)(model, state, x, y)
    ref_value, ref_grads = eqx.filter_value_and_grad(loss)(model, x, y)
    eps = jnp.finfo(jnp.float64).eps
    assert abs(float(value - ref_value)) <= 32 * eps * 10 * abs(float(ref_value))
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        assert float(jnp.max(jnp.abs(a - b))) <= 32 * eps * 10 * float(jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("gate", ["value_and_grad", "filter_value_and_grad"])
def test_objective_is_traced_once_per_step(gate):
    # The skipped branch takes its shapes from the evaluated one instead of tracing the
    # objective again (`jax.eval_shape`): a user's objective costs one trace per step.
    model, x, y, loss = setup()
    traces = []

    def counted(model, x, y):
        traces.append(None)
        return loss(model, x, y)

    params = eqx.filter(model, eqx.is_inexact_array)
    opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1)
    if gate == "value_and_grad":
        static = eqx.filter(model, eqx.is_inexact_array, inverse=True)
        evaluate = lgfjax.value_and_grad(lambda p, x, y: counted(eqx.combine(p, static), x, y))
    else:
        evaluate = lgfjax.filter_value_and_grad(counted)

    def step(p, s):
        m = p if gate == "value_and_grad" else eqx.combine(p, model)
        value, grads = evaluate(m, s, x, y)
        grads = eqx.filter(grads, eqx.is_inexact_array)
        updates, s = opt.update(grads, s, p, value=value)
        return optax.apply_updates(p, updates), s

    jax.jit(step).lower(params, opt.init(params))
    assert len(traces) == 1


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["lgf", "lgf_adam"])
def test_float32_network_with_defaults_beats_its_base_per_gradient(kind):
    # Issue 16: a float32 equinox MLP (1,185 weights) with the defaults reaches, with
    # its G true gradients, a loss no higher than its base reaches with the same G
    # gradients: the best loss seen at true steps (and at the end) against the base's
    # best over its first G steps, i.e. evaluations to a target, as the report counts
    # them. Adam runs at lr 1e-3, where its path is smooth. At lr 1e-2 it is spiky here
    # (its loss jumps 10x within a few steps, and so does LGF-Adam's, whose true steps
    # are Adam's), and the outcome is chaotic: the best-loss ratio was 0.66x-1.03x over
    # the 4-ulp nudge and code generated for other instruction sets (AVX without FMA,
    # SSE4.2), so it is not a claim that holds on every machine. At lr 1e-3 it was
    # 0.23x-0.57x (LGF-Adam) and 0.15x-0.34x (LGF) over 3 seeds, with and without the
    # nudge, for this machine's code and AVX code (and SSE4.2 code for seed 0).
    model = eqx.nn.MLP(2, 1, 32, 2, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    params = perturb(jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params))
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 2), jnp.float32)
    y = jnp.sin(2 * x[:, :1]) * jnp.cos(x[:, 1:])

    def loss(p):
        return jnp.mean((jax.vmap(eqx.combine(p, static))(x) - y) ** 2)

    if kind == "lgf":
        base, opt = optax.sgd(0.1), lgfjax.lgf(optax.sgd(0.1), dt=0.1)
    else:
        base, opt = optax.adam(1e-3), lgfjax.lgf_adam(1e-3)

    @jax.jit
    def run_lgf(p):
        def body(c, _):
            p, s = c
            v, g = lgfjax.value_and_grad(loss)(p, s)
            u, s = opt.update(g, s, p, value=v)
            return (optax.apply_updates(p, u), s), v

        return jax.lax.scan(body, (p, opt.init(p)), None, length=600)

    @jax.jit
    def base_losses(p):
        def body(c, _):
            p, s = c
            u, s = base.update(jax.grad(loss)(p), s, p)
            p = optax.apply_updates(p, u)
            return (p, s), loss(p)

        return jax.lax.scan(body, (p, base.init(p)), None, length=600)[1]

    (p, s), values = run_lgf(params)
    assert {a.dtype for a in jax.tree_util.tree_leaves(p)} == {jnp.dtype(jnp.float32)}
    g = int(lgfjax.gradient_evaluations(s))
    assert g < 600
    # values[i] is the loss where the i-th update started (NaN in surrogate steps); the
    # final point, reached with all G gradients, counts too.
    seen = np.append(np.asarray(values)[np.isfinite(np.asarray(values))], float(loss(p)))
    base = np.asarray(base_losses(params))  # base[j]: the loss after j + 1 gradients
    assert seen.min() <= base[:g].min()


def test_filter_value_and_grad_docstring_example_runs():
    import re
    import textwrap

    doc = lgfjax.filter_value_and_grad.__doc__
    exec(textwrap.dedent(re.search(r"```python\n(.*?)```", doc, re.S).group(1)), {})
