"""Safeguarded LGF on test problems with known minima, against gradient descent.

For each problem, gradient descent (optax.sgd) runs N steps; its final loss is the
target (gradient descent may reach it before step N, when it has converged). Each
LGF variant runs up to 3N steps (it spends fewer gradients per step) with
the same base and reports the true gradient evaluations it had spent when it first
reached that target. Three variants:

- fixed:     the default guards only (no loss evaluations at all);
- checked:   plus a `value_fn` acceptance check every 10 surrogate steps;
- adaptive:  checked, with the surrogate phase doubled/halved by the checks;
- default:   ``lgf(sgd(lr), dt=lr)`` with nothing else: the verified schedule, judged
             by the loss that comes free with each true gradient.

Value evaluations (loss only, no gradient) are reported separately; they are not
gradient evaluations, but they are not free either. Run:

    python benchmarks/bench_problems.py [--markdown benchmarks/problems.md]
"""

import argparse
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import optax  # noqa: E402

import lgfjax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from problems import evaluations_to_reach, safeguard_set, trace, trace_base  # noqa: E402

# Per problem of the shared set: gradient-descent steps N, K, M, rank.
SIZES = [
    (3000, 20, 60, None),  # ill-conditioned quadratic
    (3000, 20, 60, None),  # Rosenbrock
    (2000, 20, 60, None),  # tanh network
    (300, 10, 30, None),  # logistic regression
    (400, 20, 60, None),  # rippled bowl
]
CASES = [(problem, *size) for problem, size in zip(safeguard_set(), SIZES)]

VARIANTS = {
    "fixed": {},
    "checked": {"check_every": 10},
    "adaptive": {"check_every": 10, "adaptive": True},
}


def run_case(problem, steps, K, M, rank):
    base = optax.sgd(problem.lr)
    _, base_losses, base_evals = trace_base(base, problem, steps)
    target = float(base_losses[-1]) * (1 + 1e-9) + 1e-300
    base_hit = evaluations_to_reach(base_losses, base_evals, target)
    rows = [
        dict(
            problem=problem.name,
            variant="gradient descent",
            evals=steps,
            to_target=base_hit,
            value_evals=0,
            fallbacks=0,
            final=float(base_losses[-1]),
        )
    ]
    for name, extra in [*VARIANTS.items(), ("default", None)]:
        if extra is None:  # the verified schedule, nothing tuned; judged by the free loss
            opt, extra = lgfjax.lgf(base, dt=problem.lr), {"value": True}
        else:
            opt = lgfjax.lgf(
                base,
                dt=problem.lr,
                schedule=lgfjax.Fixed(history_size=K, retrain_interval=M, **extra),
                fit=lgfjax.Fit(rank=rank),
            )
        t0 = time.perf_counter()
        _, state, losses, evals = trace(
            opt,
            problem,
            3 * steps,
            value_fn="check_every" in extra,
            value=bool(extra.get("value")),
        )
        elapsed = time.perf_counter() - t0
        d = lgfjax.diagnostics(state)
        rows.append(
            dict(
                problem=problem.name,
                variant=f"LGF {name}",
                evals=int(d.gradient_evaluations),
                to_target=evaluations_to_reach(losses, evals, target),
                value_evals=int(d.value_evaluations),
                fallbacks=int(d.fallbacks),
                final=float(losses[-1]),
                seconds=elapsed,
            )
        )
    return target, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, default=None, help="also write a Markdown table")
    args = parser.parse_args()
    lines = [
        "| problem | optimiser | gradients to GD's final loss | ratio | gradients | loss evals "
        "| fallbacks | final loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for problem, steps, K, M, rank in CASES:
        target, rows = run_case(problem, steps, K, M, rank)
        base_hit = rows[0]["to_target"]
        for r in rows:
            hit = r["to_target"]
            ratio = "never" if hit is None else f"{hit / base_hit:.2f}"
            lines.append(
                f"| {r['problem']} | {r['variant']} "
                f"| {hit if hit is not None else 'never'} | {ratio} "
                f"| {r['evals']} | {r['value_evals']} | {r['fallbacks']} | {r['final']:.3e} |"
            )
        print("\n".join(lines[-len(rows) :]), flush=True)
    table = "\n".join(lines)
    print()
    print(table)
    if args.markdown:
        args.markdown.write_text(
            "Gradient descent runs N steps; its final loss is the target. LGF runs up to 3N "
            "steps. Ratio = true gradients to reach the target / gradient descent's "
            "(lower is better; 'never' = not reached in 3N steps). Loss evals are "
            "`value_fn` calls (no gradient). Columns 'gradients' and 'fallbacks' are for "
            "the whole 3N-step run.\n\n" + table + "\n"
        )


if __name__ == "__main__":
    main()
