"""A long LGF run with its diagnostics on a progress bar.

Trains a small tanh network (the `mlp_regression` test problem: 25 weights fitting
sin(3x)) for many steps with gradient descent and with safeguarded, adaptive LGF, and
shows what the LGF state reports while it runs: the phase, true gradients spent, the
last fit's residual and active terms, the POD energy, accepted/rejected surrogate
steps and the last fallback reason. All of it is read from the state with
`lgfjax.diagnostics`, which costs a few scalar copies per step.

    python examples/long_run_diagnostics.py [--steps 3000] [--no-plot]
"""

import argparse
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lgfjax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import first_below, new_figure, plot_convergence, print_table, save_figure  # noqa: E402
from problems import mlp_regression  # noqa: E402


def run(steps: int, *, show: bool = True):
    problem = mlp_regression()
    loss = problem.loss
    opt = lgfjax.lgf(
        optax.sgd(problem.lr),
        dt=problem.lr,
        schedule=lgfjax.Fixed(history_size=20, retrain_interval=60, check_every=10, adaptive=True),
        fit=lgfjax.Fit(rank=6, center=True),
    )
    grad_fn = lgfjax.value_and_grad(loss)

    @jax.jit
    def step(params, state):
        _, grads = grad_fn(params, state)
        updates, state = opt.update(grads, state, params, value_fn=loss)
        params = optax.apply_updates(params, updates)
        return params, state, loss(params), lgfjax.diagnostics(state)

    @jax.jit
    def gd_step(params, state):
        updates, state = optax.sgd(problem.lr).update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
        return params, state, loss(params)

    params, state = problem.x0, opt.init(problem.x0)
    losses, evals = [], []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), disable=not show, desc="LGF", mininterval=0.5)
    for i in bar:
        params, state, value, d = step(params, state)
        losses.append(float(value))
        evals.append(int(d.gradient_evaluations))
        if i % 25 == 0:
            bar.set_postfix(
                phase="true" if int(d.phase) == 0 else "flow",
                grads=int(d.gradient_evaluations),
                loss=f"{float(value):.2e}",
                resid=f"{float(d.fit_residual):.1e}",
                terms=int(d.active_terms),
                energy=f"{float(d.pod_energy):.3f}",
                acc=int(d.accepted),
                rej=int(d.rejected),
                S=int(d.surrogate_steps),
                why=lgfjax.status_message(d.status)[:18],
            )
    lgf_time = time.perf_counter() - t0

    gd_params, gd_state = problem.x0, optax.sgd(problem.lr).init(problem.x0)
    gd_losses = []
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), disable=not show, desc="GD ", mininterval=0.5):
        gd_params, gd_state, value = gd_step(gd_params, gd_state)
        gd_losses.append(float(value))
    gd_time = time.perf_counter() - t0
    return dict(
        losses=np.asarray(losses),
        evals=np.asarray(evals),
        gd_losses=np.asarray(gd_losses),
        diagnostics=lgfjax.diagnostics(state),
        lgf_time=lgf_time,
        gd_time=gd_time,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--outdir", default=None)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    out = run(args.steps)
    d, gd = out["diagnostics"], out["gd_losses"]
    target = float(gd[-1])
    lgf_hit = first_below(out["losses"], target * (1 + 1e-9))
    print_table(
        {
            "GD": [args.steps, 0, target, args.steps, "-", "-", "-", out["gd_time"]],
            "LGF": [
                int(d.gradient_evaluations),
                int(d.value_evaluations),
                float(out["losses"][-1]),
                None if lgf_hit is None else int(out["evals"][lgf_hit]),
                f"{int(d.accepted)}/{int(d.rejected)}",
                int(d.fallbacks),
                int(d.surrogate_steps),
                out["lgf_time"],
            ],
        },
        [
            "true gradients",
            "loss evaluations (checks)",
            "final loss",
            "gradients to GD's final loss",
            "surrogate steps accepted/rejected",
            "fallbacks",
            "final surrogate phase length",
            "wall time incl. compile [s]",
        ],
        title=f"\nMLP regression, {args.steps} steps",
    )
    if not args.no_plot:
        fig, (ax,) = new_figure(1, width=6.0)
        plot_convergence(
            ax,
            {
                "gradient descent": (np.arange(1, len(gd) + 1), gd),
                "LGF": (out["evals"], out["losses"]),
            },
            xlabel="true gradient evaluations",
            ylabel="loss",
        )
        print("saved", save_figure(fig, "long_run_diagnostics.png", args.outdir))


if __name__ == "__main__":
    main()
