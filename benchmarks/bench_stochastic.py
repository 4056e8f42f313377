"""Stochastic gradients (issue 30): LGF's defaults against their bases on mini-batches.

Each problem's gradient is a sample: a mini-batch, or a fresh set of collocation points.
The batch is a function of (seed, index of the true gradient) only, so the j-th true
gradient of the base and of every LGF variant sees the same batch, whatever surrogate
steps LGF takes in between. Problems:

- `classifier`: an equinox MLP 64-32-32-10 (tanh) on scikit-learn's digits (1,797
  images, float32), mini-batches of `--batch-size` (64) drawn without replacement;
  objective: the cross-entropy on the whole training set. `--sweep` runs it at three
  batch sizes a decade apart (16, 160, 1,600) instead.
- `pinn`: a PINN for -u'' = f on (0, 1), u = x (1 - x) NN(x) (MLP 1-32-32-1, tanh,
  float32; exact u = sin(pi x) + 0.2 sin(5 pi x)), `--points` (64) collocation points
  drawn uniformly per gradient; objective: the mean squared residual on a fixed grid
  of 1,000 midpoints, relative to the mean of f^2 there.
- `deep_energy_random`: `examples/deep_energy.py` (float64, MLP 3-20-20-3) with
  `--points` collocation points drawn uniformly in the cube per gradient (the paper's
  5,000; 1,000 by default here, for speed); objective: the energy on the fixed 16^3
  grid (midpoint rule), plus the relative L2 difference of the displacement on that
  grid from Adam's (same seed, at the budget).

Optimisers, defaults only: `optax.adam(lr)` with `lgfjax.lgf_adam(lr)` and
`lgfjax.lgf(optax.adam(lr), dt=lr)`, and `optax.sgd(lr_sgd)` with
`lgfjax.lgf(optax.sgd(lr_sgd), dt=lr_sgd)`. Each base takes `--steps` steps, one
gradient each: that is the budget. Each LGF variant runs, in one jitted loop, the
documented step (`lgfjax.value_and_grad(loss)(params, state, batch)`, then
``update(grads, state, params, value=value, value_fn=lambda p: loss(p, batch))``)
until its evaluations (true gradients plus `state.info.value_evaluations`, each one
evaluation) reach the budget, or for at most `--cap` times the base's steps. The
objective is recorded after every update (`--record-every`; deep energy: every 5th
and at the end) with the evaluations spent so far.

Reported per variant, median [min, max] over the seeds: (a) evaluations to reach the
base's final objective, as a ratio to the evaluations the base took to reach it
itself; (b) the objective at the base's budget, as a ratio to the base's final
objective (deep energy: (E - E_base) / |E_base|, since the energy is negative); (c)
on how many seeds the variant is no worse than the base at the budget.

    python benchmarks/bench_stochastic.py [--problem all|classifier|pinn|deep_energy_random]
        [--seeds 5] [--steps N] [--sweep] [--quick] [--json FILE] [--plot FILE]
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lgfjax

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PROBLEMS = ("classifier", "pinn", "deep_energy_random")
SWEEP = (16, 160, 1600)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A stochastic objective: `loss(params, batch)` with ``batch = batch(key, index)``."""

    name: str
    title: str
    init: Callable[[jax.Array], Any]  # key -> params (a pytree of arrays)
    loss: Callable[[Any, Any], jax.Array]  # (params, batch) -> scalar
    batch: Callable[[jax.Array, jax.Array], Any]  # (data key, gradient index) -> batch
    objective: Callable[[Any], jax.Array]  # params -> scalar, deterministic
    objective_name: str
    lr_adam: float
    lr_sgd: float
    steps: int
    record_every: int = 1
    x64: bool = False
    negative: bool = False  # the objective can be negative: report differences, not ratios
    field: Callable[[Any], jax.Array] | None = None  # params -> field compared with Adam's
    exact: Any = None  # the exact field, if known: the relative L2 error is reported


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    base: str  # the name of the base run it is compared with
    make: Callable[[Problem], optax.GradientTransformation]
    lgf: bool


VARIANTS = (
    Variant("Adam", "Adam", lambda p: optax.adam(p.lr_adam), False),
    Variant("lgf_adam", "Adam", lambda p: lgfjax.lgf_adam(p.lr_adam), True),
    Variant("lgf(adam)", "Adam", lambda p: lgfjax.lgf(optax.adam(p.lr_adam), dt=p.lr_adam), True),
    Variant("SGD", "SGD", lambda p: optax.sgd(p.lr_sgd), False),
    Variant("lgf(sgd)", "SGD", lambda p: lgfjax.lgf(optax.sgd(p.lr_sgd), dt=p.lr_sgd), True),
)
VARIANT = {v.name: v for v in VARIANTS}


def keys(seed: int):
    """(init key, data key) of a seed: every variant starts alike and sees one sequence."""
    key = jax.random.PRNGKey(seed)
    return key, jax.random.fold_in(key, 1)


def partitioned(make_model):
    """(init, static) for an equinox model `make_model(key)`: params are its arrays."""
    static = eqx.partition(make_model(jax.random.PRNGKey(0)), eqx.is_array)[1]
    return (lambda key: eqx.partition(make_model(key), eqx.is_array)[0]), static


# ----------------------------------------------------------------------------- problems


def classifier(batch_size=64, steps=1500, width=32, quick=False) -> Problem:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y, jnp.int32)
    if quick:
        x, y, width = x[:400], y[:400], 8
    n = x.shape[0]
    batch_size = min(batch_size, n)
    init, static = partitioned(
        lambda key: eqx.nn.MLP(64, 10, width, 2, jnp.tanh, dtype=jnp.float32, key=key)
    )

    def cross_entropy(params, xb, yb):
        logits = jax.vmap(eqx.combine(params, static))(xb)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

    def batch(key, index):
        rows = jax.random.choice(jax.random.fold_in(key, index), n, (batch_size,), replace=False)
        return x[rows], y[rows]

    return Problem(
        name=f"classifier_b{batch_size}" if batch_size != 64 else "classifier",
        title=f"digits MLP 64-{width}-{width}-10, batch {batch_size} of {n}",
        init=init,
        loss=lambda p, b: cross_entropy(p, *b),
        batch=batch,
        objective=lambda p: cross_entropy(p, x, y),
        objective_name="training-set cross-entropy",
        lr_adam=1e-3,
        lr_sgd=0.1,
        steps=steps,
    )


def pinn(points=64, steps=1500, width=32, quick=False) -> Problem:
    if quick:
        points, width = 16, 8
    pi = jnp.pi

    def source(x):  # -u'' for u = sin(pi x) + 0.2 sin(5 pi x)
        return pi**2 * jnp.sin(pi * x) + 5.0 * pi**2 * jnp.sin(5 * pi * x)

    def exact(x):
        return jnp.sin(pi * x) + 0.2 * jnp.sin(5 * pi * x)

    init, static = partitioned(
        lambda key: eqx.nn.MLP("scalar", "scalar", width, 2, jnp.tanh, dtype=jnp.float32, key=key)
    )

    def u(params, x):
        return x * (1 - x) * eqx.combine(params, static)(x)

    fine = (jnp.arange(1000, dtype=jnp.float32) + 0.5) / 1000
    scale = jnp.mean(source(fine) ** 2)

    def loss(params, xs):
        residual = jax.vmap(lambda x: jax.grad(jax.grad(u, 1), 1)(params, x) + source(x))(xs)
        return jnp.mean(residual**2) / scale

    def batch(key, index):
        return jax.random.uniform(jax.random.fold_in(key, index), (points,), jnp.float32)

    return Problem(
        name="pinn",
        title=f"PINN -u''=f, MLP 1-{width}-{width}-1, {points} random points per gradient",
        init=init,
        loss=loss,
        batch=batch,
        objective=lambda p: loss(p, fine),
        objective_name="relative residual on 1,000 fixed points",
        lr_adam=3e-3,
        lr_sgd=0.5,
        steps=steps,
        field=lambda p: jax.vmap(u, (None, 0))(p, fine),
        exact=np.asarray(exact(fine)),
    )


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deep_energy_random(points=1000, steps=1000, grid=16, quick=False) -> Problem:
    if quick:
        points, grid = 100, 6
    de = _example("deep_energy")  # build under jax_enable_x64: the example's float64
    static = de.make_model()[1]
    fine, weight = de.grid(grid)
    return Problem(
        name="deep_energy_random",
        title=f"deep energy (560 weights, float64), {points} random points per gradient",
        init=lambda key: de.make_model(key)[0],
        loss=de.make_random_loss(static),
        batch=lambda key, index: de.random_points(key, index, points),
        objective=de.make_loss(static, fine, weight),
        objective_name=f"energy on the fixed {grid}^3 grid",
        lr_adam=de.LR,
        lr_sgd=1e-2,
        steps=steps,
        record_every=5,
        x64=True,
        negative=True,
        field=lambda p: jax.vmap(de.displacement, (None, None, 0))(p, static, fine),
    )


# ----------------------------------------------------------------------------- runs


def recorded(problem: Problem, params, due):
    """The objective at `params` if `due`, else NaN (the objective only runs if due)."""
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    return jax.lax.cond(due, problem.objective, lambda _: jnp.full((), jnp.nan, dtype), params)


def base_program(problem: Problem, opt, budget: int):
    """``(params, data key) -> (params, None, objectives)``: `budget` steps, one gradient
    each; the batch of step j is batch j."""

    def go(params, data_key):
        def body(carry, step):
            p, s = carry
            g = jax.grad(problem.loss)(p, problem.batch(data_key, step))
            u, s = opt.update(g, s, p)
            p = optax.apply_updates(p, u)
            due = ((step + 1) % problem.record_every == 0) | (step == budget - 1)
            return (p, s), recorded(problem, p, due)

        carry = (params, opt.init(params))
        (params, _), objectives = jax.lax.scan(body, carry, jnp.arange(budget))
        return params, None, objectives

    return go


def spent(state):
    """Evaluations so far: true gradients plus value evaluations (one each)."""
    values = getattr(state.info, "value_evaluations", jnp.zeros((), jnp.int32))
    return lgfjax.gradient_evaluations(state) + values


def lgf_program(problem: Problem, opt, budget: int, cap: int, pass_value_fn: bool):
    """``(params, data key) -> (params, state, (updates, evaluations, objectives))``.

    Updates until `budget` evaluations are spent (or `cap` updates); the batch of an
    update is that of the true gradient it would take, ``gradient_evaluations(state)``.
    """
    grad_fn = lgfjax.value_and_grad(problem.loss)

    def go(params, data_key):
        state = opt.init(params)
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        evals = jnp.full(cap, -1, jnp.int32)
        objectives = jnp.full(cap, jnp.nan, dtype)

        def cond(carry):
            step, _, s, _, _ = carry
            return (step < cap) & (spent(s) < budget)

        def body(carry):
            step, p, s, ev, ob = carry
            batch = problem.batch(data_key, lgfjax.gradient_evaluations(s))
            value, g = grad_fn(p, s, batch)
            extra = {"value_fn": lambda q: problem.loss(q, batch)} if pass_value_fn else {}
            u, s = opt.update(g, s, p, value=value, **extra)
            p = optax.apply_updates(p, u)
            now = spent(s)
            due = ((step + 1) % problem.record_every == 0) | (now >= budget) | (step == cap - 1)
            ev = ev.at[step].set(now.astype(jnp.int32))
            ob = ob.at[step].set(recorded(problem, p, due))
            return step + 1, p, s, ev, ob

        carry = (jnp.zeros((), jnp.int32), params, state, evals, objectives)
        step, params, state, evals, objectives = jax.lax.while_loop(cond, body, carry)
        return params, state, (step, evals, objectives)

    return go


PAIRED = [True]  # pass `value_fn` (paired loss comparisons); --no-value-fn clears it


def compile_variant(problem, variant, budget, cap, params, data_key, notes):
    """The AOT-compiled run of `variant` and its compile time (seconds)."""
    opt = variant.make(problem)
    start = time.perf_counter()
    if not variant.lgf:
        program = base_program(problem, opt, budget)
        compiled = jax.jit(program).lower(params, data_key).compile()
        return compiled, time.perf_counter() - start
    try:
        program = lgf_program(problem, opt, budget, cap, pass_value_fn=PAIRED[0])
        compiled = jax.jit(program).lower(params, data_key).compile()
    except TypeError as error:  # `value_fn` rejected: run without it, and say so
        notes.append(f"{variant.name}: value_fn rejected ({error}); ran without it")
        program = lgf_program(problem, opt, budget, cap, pass_value_fn=False)
        compiled = jax.jit(program).lower(params, data_key).compile()
    return compiled, time.perf_counter() - start


def run_seed(problem, variant, compiled, seed, budget, cap):
    """One seed's record: evaluations and objective after each update (index 0: start)."""
    init_key, data_key = keys(seed)
    params = problem.init(init_key)
    start_objective = float(jax.jit(problem.objective)(params))
    start = time.perf_counter()
    final, state, out = compiled(params, data_key)
    jax.block_until_ready(final)
    seconds = time.perf_counter() - start
    if variant.lgf:
        updates, evals, objectives = (np.asarray(x) for x in out)
        evals, objectives = evals[: int(updates)], objectives[: int(updates)]
    else:
        evals, objectives = np.arange(1, budget + 1), np.asarray(out)
    record = dict(
        seed=seed,
        evals=np.concatenate([[0], evals]),
        objectives=np.concatenate([[start_objective], objectives]),
        updates=int(evals.size),
        seconds=seconds,
        capped=bool(variant.lgf and evals.size == cap and evals[-1] < budget),
        field=None if problem.field is None else np.asarray(jax.jit(problem.field)(final)),
    )
    if variant.lgf:
        d = lgfjax.diagnostics(state)
        info = state.info
        record["lgf"] = dict(
            gradient_evaluations=int(d.gradient_evaluations),
            value_evaluations=int(d.value_evaluations),
            accepted=int(d.accepted),
            rejected=int(d.rejected),
            fallbacks=int(d.fallbacks),
            status=lgfjax.Status(int(d.status)).name,
            verified=int(getattr(info, "verified", -1)),
            verifications=int(getattr(info, "verifications", -1)),
            ungated_gradients=int(d.ungated_gradients),
        )
    return record


# ----------------------------------------------------------------------------- metrics


def reached(record, target) -> int | None:
    """Evaluations spent when the objective first was <= `target` (None: never)."""
    hit = np.flatnonzero(np.isfinite(record["objectives"]) & (record["objectives"] <= target))
    return int(record["evals"][hit[0]]) if hit.size else None


def objective_at(record, evals) -> float:
    """The objective of the last recorded iterate reached with at most `evals` evaluations."""
    seen = np.flatnonzero(np.isfinite(record["objectives"]) & (record["evals"] <= evals))
    return float(record["objectives"][seen[-1]])


# The window of `tail_level`: the last tenth of the budget's evaluations.
TAIL = 0.1


def tail_level(record, evals) -> float:
    """Median objective of the iterates reached with between ``(1 - TAIL) evals`` and
    `evals` evaluations: the level a run sits at near the budget.

    Under noise an iterate's objective jumps between neighbouring evaluations (PINN,
    one seed's `lgf(sgd)`: 11x between evaluations 1,400 and 1,450; another's SGD 4.7x
    between 1,300 and 1,400), so which run is lower at exactly `evals` depends partly on
    where each run happens to stop; the window's median much less.
    """
    ev, ob = record["evals"], record["objectives"]
    inside = np.isfinite(ob) & (ev > (1 - TAIL) * evals) & (ev <= evals)
    if not inside.any():
        return objective_at(record, evals)
    return float(np.median(ob[inside]))


def curve(record, grid) -> np.ndarray:
    """`objective_at` on a grid of evaluations (a step function)."""
    seen = np.flatnonzero(np.isfinite(record["objectives"]))
    at = np.searchsorted(record["evals"][seen], grid, side="right") - 1
    return record["objectives"][seen][np.maximum(at, 0)]


def spread(values) -> dict:
    """Median, min and max (inf stands for "not reached")."""
    v = np.asarray(values, dtype=float)
    return dict(median=float(np.median(v)), min=float(v.min()), max=float(v.max()))


def compare(problem: Problem, runs: dict, budget: int) -> dict:
    """Per variant: the metrics against its base, seed by seed, and their spread."""
    out = {}
    for name, seeds in runs.items():
        base = runs[VARIANT[name].base]
        per_seed = []
        for rec, ref in zip(seeds, base, strict=True):
            ref_final = objective_at(ref, budget)
            ref_hit = reached(ref, ref_final)
            hit = reached(rec, ref_final)
            final = objective_at(rec, budget)
            tail, ref_tail = tail_level(rec, budget), tail_level(ref, budget)
            row = dict(
                seed=rec["seed"],
                evals_to_base_final=hit,
                base_evals_to_own_final=ref_hit,
                evals_ratio=math.inf if hit is None else hit / ref_hit,
                objective_at_budget=final,
                base_objective_at_budget=ref_final,
                objective_ratio=(final - ref_final) / abs(ref_final)
                if problem.negative
                else final / ref_final,
                no_worse=bool(final <= ref_final),
                tail_objective=tail,
                tail_ratio=(tail - ref_tail) / abs(ref_tail)
                if problem.negative
                else tail / ref_tail,
                no_worse_tail=bool(tail <= ref_tail),
                evaluations=int(rec["evals"][-1]),
                updates=rec["updates"],
                seconds=rec["seconds"],
                capped=rec["capped"],
            )
            if "Adam" in runs and rec["field"] is not None:
                adam = next(r for r in runs["Adam"] if r["seed"] == rec["seed"])["field"]
                row["field_difference_to_adam"] = relative(rec["field"], adam)
            if problem.exact is not None:
                row["error_to_exact"] = relative(rec["field"], problem.exact)
            if "lgf" in rec:
                row["lgf"] = rec["lgf"]
            per_seed.append(row)
        summary = dict(
            evals_ratio=spread([r["evals_ratio"] for r in per_seed]),
            reached=sum(r["evals_to_base_final"] is not None for r in per_seed),
            base_evals=spread([r["base_evals_to_own_final"] for r in per_seed]),
            objective_ratio=spread([r["objective_ratio"] for r in per_seed]),
            objective=spread([r["objective_at_budget"] for r in per_seed]),
            no_worse=sum(r["no_worse"] for r in per_seed),
            tail_ratio=spread([r["tail_ratio"] for r in per_seed]),
            no_worse_tail=sum(r["no_worse_tail"] for r in per_seed),
            updates=spread([r["updates"] for r in per_seed]),
            seconds=spread([r["seconds"] for r in per_seed]),
            capped=sum(r["capped"] for r in per_seed),
        )
        for key in ("field_difference_to_adam", "error_to_exact"):
            if key in per_seed[0]:
                summary[key] = spread([r[key] for r in per_seed])
        if "lgf" in per_seed[0]:
            summary["lgf"] = {
                k: spread([r["lgf"][k] for r in per_seed])
                for k in per_seed[0]["lgf"]
                if k != "status"
            }
        out[name] = dict(summary=summary, seeds=per_seed)
    return out


def relative(field, reference) -> float:
    return float(np.linalg.norm(field - reference) / np.linalg.norm(reference))


# ----------------------------------------------------------------------------- output


def fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isinf(x)):
        return "n.r."
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def band(s, digits=3) -> str:
    return f"{fmt(s['median'], digits)} [{fmt(s['min'], digits)}, {fmt(s['max'], digits)}]"


def table(problem: Problem, result: dict, meta: dict) -> str:
    n = len(next(iter(result.values()))["seeds"])
    rel = "(E - E_base) / |E_base|" if problem.negative else "ratio to base"
    lines = [
        f"{problem.name}: {problem.title}; objective: {problem.objective_name}",
        f"budget {meta['budget']} evaluations (base steps), LGF cap {meta['cap']} updates, "
        f"{n} seeds; median [min, max] over seeds; n.r. = not reached",
    ]
    header = (
        "variant",
        "evals to base's final",
        "reached",
        f"objective at budget, {rel}",
        "no worse",
        f"last {TAIL:.0%}: median, {rel}",
        "no worse",
        "updates",
        "run s",
        "compile s",
    )
    rows = [header]
    for name, r in result.items():
        s = r["summary"]
        base = VARIANT[name].base == name
        rows.append(
            (
                name,
                f"{band(s['base_evals'], 4)} evals" if base else band(s["evals_ratio"]),
                f"{s['reached']}/{n}",
                f"{band(s['objective'], 4)} (abs)" if base else band(s["objective_ratio"]),
                "-" if base else f"{s['no_worse']}/{n}",
                "-" if base else band(s["tail_ratio"]),
                "-" if base else f"{s['no_worse_tail']}/{n}",
                band(s["updates"], 5),
                fmt(s["seconds"]["median"]),
                fmt(meta["compile"][name]),
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(f"{str(c):<{w}}" for c, w in zip(row, widths, strict=True)))
    extra = []
    for name, r in result.items():
        s = r["summary"]
        bits = []
        if "field_difference_to_adam" in s and name != "Adam":
            bits.append(f"|u - u_Adam| / |u_Adam| {band(s['field_difference_to_adam'])}")
        if "error_to_exact" in s:
            bits.append(f"|u - u_exact| / |u_exact| {band(s['error_to_exact'])}")
        if "lgf" in s:
            g = s["lgf"]
            bits.append(
                f"gradients {fmt(g['gradient_evaluations']['median'], 5)}, value evals "
                f"{fmt(g['value_evaluations']['median'])}, surrogate kept/refused "
                f"{fmt(g['accepted']['median'], 5)}/{fmt(g['rejected']['median'], 5)}, "
                f"phases confirmed/judged {fmt(g['verified']['median'], 5)}/"
                f"{fmt(g['verifications']['median'], 5)}, fallbacks "
                f"{fmt(g['fallbacks']['median'], 5)}, ungated {fmt(g['ungated_gradients']['max'])}"
            )
        if s["capped"]:
            bits.append(f"hit the update cap on {s['capped']} seeds")
        if bits:
            extra.append(f"  {name}: " + "; ".join(bits) + " (medians)")
    return "\n".join(lines + extra)


def curves(problem: Problem, runs: dict, budget: int, points: int = 300) -> dict:
    grid = np.unique(np.linspace(0, budget, points).round().astype(int))
    out = {"evals": grid.tolist()}
    for name, seeds in runs.items():
        c = np.stack([curve(r, grid) for r in seeds])
        out[name] = dict(
            median=np.median(c, 0).tolist(), min=c.min(0).tolist(), max=c.max(0).tolist()
        )
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    colours = dict(zip(VARIANT, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, name in zip(axes[0], names, strict=True):
        r = results[name]
        c = r["curves"]
        x = np.asarray(c["evals"])
        for variant in r["variants"]:
            line = c[variant]
            style = "-" if VARIANT[variant].base == variant else "--"
            ax.plot(x, line["median"], style, color=colours[variant], label=variant)
            ax.fill_between(x, line["min"], line["max"], color=colours[variant], alpha=0.15)
        if not r["negative"]:
            ax.set_yscale("log")
        else:  # the energy's tail: from the best median up by 60 % of its size
            lo = min(min(c[v]["median"]) for v in r["variants"])
            ax.set_ylim(lo - 0.05 * abs(lo), lo + 0.6 * abs(lo))
        ax.set_xlabel("evaluations (true gradients + value evaluations)")
        ax.set_ylabel(r["objective_name"])
        ax.set_title(f"{name} ({r['seeds']} seeds: median, min-max)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def run_problem(problem: Problem, seeds: int, cap_factor: int, variants, notes) -> dict:
    budget, cap = problem.steps, cap_factor * problem.steps
    init_key, data_key = keys(0)
    params = problem.init(init_key)
    runs, compile_s, caught = {}, {}, []
    for variant in variants:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            compiled, compile_s[variant.name] = compile_variant(
                problem, variant, budget, cap, params, data_key, notes
            )
            runs[variant.name] = [
                run_seed(problem, variant, compiled, seed, budget, cap) for seed in range(seeds)
            ]
        caught += [f"{variant.name}: {w.category.__name__}: {w.message}" for w in seen]
        print(
            f"  {problem.name} {variant.name}: compile {compile_s[variant.name]:.1f} s, "
            f"runs {sum(r['seconds'] for r in runs[variant.name]):.1f} s",
            flush=True,
        )
    result = compare(problem, runs, budget)
    meta = dict(budget=budget, cap=cap, compile=compile_s)
    return dict(
        title=problem.title,
        objective_name=problem.objective_name,
        negative=problem.negative,
        lr_adam=problem.lr_adam,
        lr_sgd=problem.lr_sgd,
        seeds=seeds,
        variants=list(result),
        results=result,
        curves=curves(problem, runs, budget),
        warnings=sorted(set(caught)),
        table=table(problem, result, meta),
        **meta,
    )


def build(name: str, args) -> list[Problem]:
    if name == "classifier":
        sizes = SWEEP if args.sweep else (args.batch_size,)
        steps = args.steps or (60 if args.quick else 1500)
        return [classifier(b, steps, quick=args.quick) for b in sizes]
    if name == "pinn":
        steps = args.steps or (60 if args.quick else 1500)
        return [pinn(args.points or 64, steps, quick=args.quick)]
    steps = args.steps or (60 if args.quick else 1000)
    return [deep_energy_random(args.points or 1000, steps, quick=args.quick)]


def jsonable(x):
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=("all", *PROBLEMS), default="all")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, help="the base's steps (the budget)")
    parser.add_argument("--cap", type=int, default=10, help="LGF updates, times the budget")
    parser.add_argument("--batch-size", type=int, default=64, help="classifier")
    parser.add_argument("--sweep", action="store_true", help="classifier at 16, 160, 1600")
    parser.add_argument("--points", type=int, help="pinn (64) / deep energy (1000) points")
    parser.add_argument("--variants", help="comma-separated subset, e.g. Adam,lgf_adam")
    parser.add_argument("--lr-adam", type=float, help="override the problem's Adam rate")
    parser.add_argument("--lr-sgd", type=float, help="override the problem's SGD rate")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, 60 steps, 2 seeds: a smoke test"
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write the figure here")
    parser.add_argument(
        "--no-value-fn",
        action="store_true",
        help="pass only `value=` (losses of different batches are compared, no value calls)",
    )
    args = parser.parse_args(argv)
    PAIRED[0] = not args.no_value_fn
    if args.quick and args.seeds == 5:
        args.seeds = 2
    variants = VARIANTS
    if args.variants:
        variants = tuple(VARIANT[v] for v in args.variants.split(","))
        needed = {v.base for v in variants}
        variants = tuple(v for v in VARIANTS if v in variants or v.name in needed)
    names = PROBLEMS if args.problem == "all" else (args.problem,)
    results, notes, tables = {}, [], []
    for name in names:
        # Deep energy is the example's float64 problem; the others are float32 throughout.
        jax.config.update("jax_enable_x64", name == "deep_energy_random")
        for problem in build(name, args):
            rates = {"lr_adam": args.lr_adam, "lr_sgd": args.lr_sgd}
            problem = dataclasses.replace(
                problem, **{k: v for k, v in rates.items() if v is not None}
            )
            start = time.perf_counter()
            print(f"{problem.name}: {problem.title}", flush=True)
            results[problem.name] = run_problem(problem, args.seeds, args.cap, variants, notes)
            results[problem.name]["wall_s"] = time.perf_counter() - start
            tables.append(results[problem.name]["table"])
            print(f"  wall time {results[problem.name]['wall_s']:.0f} s", flush=True)
    print()
    print("\n\n".join(tables))
    caught = sorted({w for r in results.values() for w in r["warnings"]})
    for line in [*notes, *caught]:
        print(f"note: {line}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(jsonable(dict(results=results, notes=notes)), indent=1) + "\n"
        )
        print(f"json: {args.json}")
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return results


if __name__ == "__main__":
    main()
