"""CUTEst's unconstrained problems (sif2jax): LGF's defaults against their bases.

Nothing here is tuned to a problem. Each problem runs in float64 with a budget of 1,000
true gradients:

- `optax.adam(1e-2)` (1,000 steps) against `lgfjax.lgf_adam(1e-2)` and against
  `lgfjax.lgf(optax.adam(1e-2), dt=1e-2)`;
- `optax.sgd(lr)` against `lgfjax.lgf(optax.sgd(lr), dt=lr)`, with ``lr = min(1 / lam,
  1)``, ``lam`` the largest Hessian eigenvalue in modulus at the start, estimated by 20
  power iterations with Hessian-vector products (not counted in the budget; both runs
  share it);
- `optax.lbfgs()` for reference, its zoom line search's evaluations counted: every
  trial point costs one value and gradient, as does the first point. Its last
  iteration may overrun the budget; the run then ends at the last point reached within
  it.

Each LGF update gets the loss as ``value=`` and its gradient from
`lgfjax.value_and_grad`; a run takes updates until 1,000 true gradients are spent, or
20x the base's steps (20,000 updates). Runs are one compiled loop each, so the wall
times include compilation.

The problems, chosen by this rule before any result was seen: sif2jax's unconstrained
minimisation problems sorted by class name, those with at most 10,000 variables at
their default size, and of these every 4th (the 1st, 5th, 9th, ...); a problem whose
objective or gradient is not finite at its start is skipped (and listed as skipped).

Losses are compared as gaps ``f - f_low`` over a floor: ``f_low`` is the lowest loss
any run saw on the problem (or sif2jax's expected minimum, if lower), and the floor is
``1e-12 max(1, |f(x0)|)``, so that two runs at the problem's precision compare equal
and a problem with a negative minimum compares like any other. A diverged run's final
loss is infinite. Per LGF variant, against its base:

- *no worse*: final gap at most 1.01x the base's;
- *half*: the loss at a true gradient reached the base's final loss within half the
  gradients the base needed for it (the base's count is the first of its 1,000
  gradients whose loss is that low; where none is, all 1,000);
- *gradient ratio*: LGF's gradients to the base's final loss over the base's
  (infinite where never reached), whose median the summary gives;
- *worst*: the largest final gap ratios, with the problems' names.

Run (sif2jax is an optional dependency: ``pip install sif2jax``):

    python benchmarks/bench_cutest.py [--problems N] [--json FILE] [--resume] [--quick]

``--json FILE`` writes every problem's results as it finishes; with ``--resume`` the
problems already in FILE are read back instead of rerun, so a long set can be run in
pieces. ``--quick``: the first 6 problems at 200 gradients.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import lgfjax  # noqa: E402

MAX_VARIABLES = 10_000
EVERY = 4
BUDGET = 1000
UPDATE_FACTOR = 20  # LGF may take up to this many times the base's steps
ADAM_LR = 1e-2
SGD_LR_CAP = 1.0
POWER_ITERATIONS = 20
SLACK = 1.01  # "no worse": final gap at most 1 % above the base's
FLOOR = 1e-12  # gaps below FLOOR * max(1, |f(x0)|) compare equal

# (name, base, constructor of the transformation from the SGD rate)
VARIANTS = {
    "adam": ("adam", lambda lr: optax.adam(ADAM_LR)),
    "lgf_adam": ("adam", lambda lr: lgfjax.lgf_adam(ADAM_LR)),
    "lgf(adam)": ("adam", lambda lr: lgfjax.lgf(optax.adam(ADAM_LR), dt=ADAM_LR)),
    "sgd": ("sgd", lambda lr: optax.sgd(lr)),
    "lgf(sgd)": ("sgd", lambda lr: lgfjax.lgf(optax.sgd(lr), dt=lr)),
}
LGF_VARIANTS = [name for name, (base, _) in VARIANTS.items() if name != base]


def sif2jax_problems():
    """sif2jax's unconstrained problems, or a clear exit if it is not installed."""
    try:
        import sif2jax
    except ImportError:
        sys.exit(
            "bench_cutest.py needs sif2jax (CUTEst problems in JAX), an optional "
            "dependency: pip install sif2jax"
        )
    return sif2jax.unconstrained_minimisation_problems


def selected_problems():
    """The rule of the module docstring: every `EVERY`-th by name of size <= 10,000."""
    # The tuple holds each problem at its default size.
    eligible = [p for p in sif2jax_problems() if int(np.size(p.y0)) <= MAX_VARIABLES]
    eligible.sort(key=lambda p: type(p).__name__)
    return eligible[::EVERY]


def objective(problem):
    args = problem.args
    return lambda y: problem.objective(y, args)


def top_curvature(f, x0) -> float:
    """``|lam|`` of the largest-modulus Hessian eigenvalue at `x0` (power iterations)."""
    hvp = lambda v: jax.jvp(jax.grad(f), (x0,), (v,))[1]  # noqa: E731

    def body(_, carry):
        v, _lam = carry
        w = hvp(v)
        norm = jnp.linalg.norm(w)
        return jnp.where(norm > 0, w / norm, v), jnp.vdot(v, w)

    v0 = jax.random.normal(jax.random.PRNGKey(0), x0.shape, x0.dtype)
    v0 = v0 / jnp.linalg.norm(v0)
    _, lam = jax.jit(lambda v: jax.lax.fori_loop(0, POWER_ITERATIONS, body, (v, 0.0 * v[0])))(v0)
    return abs(float(lam))


def sgd_rate(f, x0) -> float:
    lam = top_curvature(f, x0)
    return SGD_LR_CAP if not math.isfinite(lam) or lam <= 0 else min(1.0 / lam, SGD_LR_CAP)


def run_base(opt, f, x0, budget):
    """`budget` plain steps: ``(final params, loss at each gradient, updates)``."""

    @jax.jit
    def run(x0):
        def body(carry, _):
            params, state = carry
            value, grads = jax.value_and_grad(f)(params)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), value

        (params, _), values = jax.lax.scan(body, (x0, opt.init(x0)), None, budget)
        return params, values

    params, values = run(x0)
    return params, np.asarray(values), budget


def run_lgf(opt, f, x0, budget):
    """LGF updates until `budget` true gradients (or the update cap) are spent.

    Returns ``(final params, loss at each true gradient (NaN where none), updates)``.
    """
    value_and_grad = lgfjax.value_and_grad(f)
    cap = UPDATE_FACTOR * budget

    @jax.jit
    def run(x0):
        def cond(carry):
            _, state, k, _ = carry
            return (lgfjax.gradient_evaluations(state) < budget) & (k < cap)

        def body(carry):
            params, state, k, values = carry
            spent = lgfjax.gradient_evaluations(state)
            value, grads = value_and_grad(params, state)
            updates, state = opt.update(grads, state, params, value=value)
            took = lgfjax.gradient_evaluations(state) > spent
            values = values.at[spent].set(jnp.where(took, value, values[spent]))
            return optax.apply_updates(params, updates), state, k + 1, values

        values = jnp.full((budget,), jnp.nan, x0.dtype)
        params, _, k, values = jax.lax.while_loop(
            cond, body, (x0, opt.init(x0), jnp.zeros((), jnp.int32), values)
        )
        return params, values, k

    params, values, k = run(x0)
    return params, np.asarray(values), int(k)


def run_lbfgs(f, x0, budget):
    """`optax.lbfgs` until `budget` evaluations: ``(params, loss at each evaluation
    (NaN at the line search's trial points), iterations)``."""
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(f)

    @jax.jit
    def run(x0):
        def cond(carry):
            _, _, spent, _, _, it = carry
            return (spent < budget) & (it < budget)

        def body(carry):
            params, state, spent, values, kept, it = carry
            fresh = ~jnp.isfinite(optax.tree.get(state, "value"))  # evaluated here
            value, grad = value_and_grad(params, state=state)
            values = values.at[spent].set(jnp.where(fresh, value, values[spent]))
            updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=f)
            searched = optax.tree.get(state, "num_linesearch_steps")
            spent = spent + fresh.astype(spent.dtype) + jnp.asarray(searched, spent.dtype)
            params = optax.apply_updates(params, updates)
            within = spent <= budget
            last = jnp.minimum(spent, budget) - 1
            new_value = optax.tree.get(state, "value")
            values = values.at[last].set(jnp.where(within, new_value, values[last]))
            kept = jnp.where(within, params, kept)
            return params, state, spent, values, kept, it + 1

        values = jnp.full((budget,), jnp.nan, x0.dtype)
        zero = jnp.zeros((), jnp.int32)
        carry = (x0, opt.init(x0), zero, values, x0, zero)
        _, _, _, values, kept, it = jax.lax.while_loop(cond, body, carry)
        return kept, values, it

    params, values, it = run(x0)
    return params, np.asarray(values), int(it)


def finite_or_inf(x) -> float:
    x = float(x)
    return x if math.isfinite(x) else math.inf


def first_at_most(values, target):
    """1-based index of the first loss <= target, or None."""
    hits = np.flatnonzero(np.nan_to_num(values, nan=np.inf) <= target)
    return int(hits[0]) + 1 if hits.size else None


def run_problem(problem, budget):
    """All variants on one problem: a JSON-able dict (or ``skipped`` with the reason)."""
    name, f = type(problem).__name__, objective(problem)
    x0 = jnp.asarray(problem.y0, jnp.float64)
    f0, g0 = jax.jit(jax.value_and_grad(f))(x0)
    row = dict(problem=name, n=int(x0.size), f0=float(f0))
    if not (np.isfinite(float(f0)) and bool(jnp.all(jnp.isfinite(g0)))):
        return dict(row, skipped="objective or gradient not finite at the start")
    lr = sgd_rate(f, x0)
    row["sgd_lr"] = lr
    runs = {}
    for variant, (base, make) in VARIANTS.items():
        t0 = time.perf_counter()
        runner = run_base if variant == base else run_lgf
        params, values, updates = runner(make(lr), f, x0, budget)
        runs[variant] = dict(
            final=finite_or_inf(f(params)),
            values=values,
            updates=updates,
            seconds=time.perf_counter() - t0,
        )
    t0 = time.perf_counter()
    params, values, iterations = run_lbfgs(f, x0, budget)
    runs["lbfgs"] = dict(
        final=finite_or_inf(f(params)),
        values=values,
        updates=iterations,
        seconds=time.perf_counter() - t0,
    )
    expected = problem.expected_objective_value
    seen = [r["final"] for r in runs.values()]
    seen += [float(np.nanmin(r["values"])) for r in runs.values() if np.isfinite(r["values"]).any()]
    if expected is not None and np.isfinite(float(expected)):
        seen.append(float(expected))
    row["f_low"] = f_low = min(s for s in seen if math.isfinite(s))
    row["floor"] = floor = FLOOR * max(1.0, abs(float(f0)))
    for r in runs.values():
        r["gap"] = max(r["final"] - f_low, 0.0) + floor
    for variant in LGF_VARIANTS:
        base = runs[VARIANTS[variant][0]]
        r = runs[variant]
        target = base["final"] + floor
        base_needs = first_at_most(base["values"], target) or budget
        needs = first_at_most(r["values"], target)
        if needs is None and r["final"] <= target:
            needs = budget
        # Both diverged: equal.
        r["gap_ratio"] = (
            1.0 if math.isinf(r["gap"]) and math.isinf(base["gap"]) else r["gap"] / base["gap"]
        )
        r["gradient_ratio"] = math.inf if needs is None else needs / base_needs
    for r in runs.values():  # every 10th loss seen, for plots; NaN where none
        r["values"] = [float(v) if np.isfinite(v) else None for v in r["values"][::10]]
    row["runs"] = runs
    return row


def summary(rows):
    """One line per LGF variant (see the module docstring)."""
    done = [r for r in rows if "runs" in r]
    lines = [
        "| variant | base | problems | no worse (1 % slack) | half the gradients or fewer "
        "| median gradient ratio | worst final gap ratios (above the slack) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in LGF_VARIANTS:
        base = VARIANTS[variant][0]
        gaps = [(r["runs"][variant]["gap_ratio"], r["problem"]) for r in done]
        ratios = [r["runs"][variant]["gradient_ratio"] for r in done]
        no_worse = sum(g <= SLACK for g, _ in gaps)
        half = sum(x <= 0.5 for x in ratios)
        median = float(np.median(ratios)) if ratios else math.nan
        losers = sorted(((g, p) for g, p in gaps if not g <= SLACK), reverse=True)
        worst = ", ".join(f"{p} {g:.3g}" for g, p in losers[:5]) or "none"
        lines.append(
            f"| {variant} | {base} | {len(done)} | {no_worse} | {half} | {median:.2f} | {worst} |"
        )
    return "\n".join(lines)


def per_problem(rows):
    cols = ["adam", "lgf_adam", "lgf(adam)", "sgd", "lgf(sgd)", "lbfgs"]
    lines = [
        "| problem | n | f(x0) | f_low | sgd lr | "
        + " | ".join(cols)
        + " | grad ratio lgf_adam / lgf(adam) / lgf(sgd) | seconds |",
        "|---|---|---|---|---|" + "---|" * len(cols) + "---|---|",
    ]
    for r in rows:
        if "runs" not in r:
            lines.append(f"| {r['problem']} | {r['n']} | {r['f0']:.3g} | skipped: {r['skipped']} |")
            continue
        runs = r["runs"]
        cells = []
        for c in cols:
            cell = f"{runs[c]['final']:.3g}"
            if c in LGF_VARIANTS:
                cell += f" ({runs[c]['gap_ratio']:.2g}x)"
            cells.append(cell)
        grads = " / ".join(f"{runs[c]['gradient_ratio']:.2g}" for c in LGF_VARIANTS)
        seconds = sum(x["seconds"] for x in runs.values())
        lines.append(
            f"| {r['problem']} | {r['n']} | {r['f0']:.3g} | {r['f_low']:.6g} | {r['sgd_lr']:.2g} | "
            + " | ".join(cells)
            + f" | {grads} | {seconds:.0f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=None, help="only the first N problems")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--resume", action="store_true", help="reuse the problems in --json")
    parser.add_argument("--quick", action="store_true", help="6 problems, 200 gradients")
    args = parser.parse_args()
    budget = 200 if args.quick else BUDGET
    problems = selected_problems()
    count = args.problems if args.problems is not None else (6 if args.quick else None)
    problems = problems[:count]
    saved = {}
    if args.resume and args.json and args.json.exists():
        data = json.loads(args.json.read_text())
        if data.get("budget") == budget:
            saved = {r["problem"]: r for r in data["rows"]}
    rows = []
    for problem in problems:
        name = type(problem).__name__
        if name in saved:
            rows.append(saved[name])
            continue
        t0 = time.perf_counter()
        row = run_problem(problem, budget)
        rows.append(row)
        verdict = row.get("skipped") or ", ".join(
            f"{v} {row['runs'][v]['gap_ratio']:.3g}x" for v in LGF_VARIANTS
        )
        print(f"{name} (n={row['n']}): {verdict} [{time.perf_counter() - t0:.0f} s]", flush=True)
        if args.json:
            args.json.write_text(json.dumps(dict(budget=budget, rows=rows), indent=1))
    print(f"\n{budget} true gradients per run; final gap ratio = LGF's final gap / the base's.\n")
    print(summary(rows))
    print()
    print(per_problem(rows))


if __name__ == "__main__":
    main()
