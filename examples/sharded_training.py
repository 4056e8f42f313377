"""Training an MLP whose weights are sharded over 8 (simulated CPU) devices with LGF.

The hidden layers' weight matrices are sharded over a 1-d device mesh along their
hidden axis; `lgfjax.lgf(..., rank=r)` records the trajectory in a buffer sharded the
same way, builds its POD basis from the K x K Gram matrix (an all-reduce of per-shard
contractions, no all-gather of parameters) and lifts surrogate steps back with one
contraction per leaf. The script compares it with the base optimiser on the same
sharded parameters and prints true gradient evaluations and losses.

``opt.init`` creates the buffers with the parameters' shardings (a leading
unsharded axis for the K + 1 snapshots).

Run: ``python examples/sharded_training.py [--steps 600] [--no-plot]``.

On this small MLP LGF does not pay off: it stops with fewer true gradients than
SGD, but SGD reaches LGF's final loss with fewer still (see the table). The point of
the script is the sharding: every run keeps the parameters' layout.

With 8 simulated devices on a 2-core machine this script used to hang at the first
degree-2 fit: jaxlib 0.10's CPU LAPACK kernels block a thread-pool worker while their
batch runs on the same pool. lgfjax now makes its per-target solves one at a time on
CPU (``tests/test_sharding.py::test_multi_target_fit_does_not_deadlock``).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import lgfjax  # noqa: E402

try:
    from _common import new_figure, plot_convergence, print_table, save_figure
except ImportError:  # run from the repository root as a module
    from examples._common import new_figure, plot_convergence, print_table, save_figure

HIDDEN = 64
LR = 0.05


def setup():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {
        "w1": jax.random.normal(k1, (1, HIDDEN)),
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, HIDDEN)) / jnp.sqrt(HIDDEN),
        "b2": jnp.zeros(HIDDEN),
        "w3": jax.random.normal(k3, (HIDDEN, 1)) / jnp.sqrt(HIDDEN),
    }
    specs = {"w1": P(None, "x"), "b1": P("x"), "w2": P("x", None), "b2": P(), "w3": P()}
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    xs = jnp.linspace(-1.0, 1.0, 128)[:, None]
    ys = jnp.sin(3.0 * xs) * jnp.exp(-(xs**2))

    def loss(p):
        h = jnp.tanh(xs @ p["w1"] + p["b1"])
        h = jnp.tanh(h @ p["w2"] + p["b2"])
        return jnp.mean((h @ p["w3"] - ys) ** 2)

    return jax.device_put(params, shardings), shardings, loss


def train(opt, params, shardings, loss, steps, lgf):
    state = opt.init(params)  # LGF's buffers come out sharded like the params
    grad_fn = lgfjax.value_and_grad(loss) if lgf else None

    @jax.jit
    def step(params, state):
        if lgf:
            _, grads = grad_fn(params, state)
        else:
            grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return params, state, loss(params)

    losses, evals = [], []
    for i in range(steps):
        params, state, value = step(params, state)
        losses.append(float(value))
        evals.append(int(lgfjax.gradient_evaluations(state)) if lgf else i + 1)
    kept = all(params[k].sharding.is_equivalent_to(shardings[k], params[k].ndim) for k in params)
    return np.asarray(losses), np.asarray(evals), kept, state


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()

    params, shardings, loss = setup()
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"{jax.device_count()} devices, {n} parameters, w1/b1/w2 sharded along the hidden axis")
    runs = {
        "SGD": (optax.sgd(LR), False),
        "LGF r=4 (K=20, M=60)": (
            lgfjax.lgf(
                optax.sgd(LR),
                dt=LR,
                schedule=lgfjax.Fixed(history_size=20, retrain_interval=60),
                fit=lgfjax.Fit(rank=4),
            ),
            True,
        ),
        "LGF r=8 deg 2 (K=20, M=40)": (
            lgfjax.lgf(
                optax.sgd(LR),
                dt=LR,
                schedule=lgfjax.Fixed(history_size=20, retrain_interval=40),
                fit=lgfjax.Fit(rank=8, poly_order=2),
            ),
            True,
        ),
    }
    results = {
        name: train(opt, params, shardings, loss, args.steps, lgf)
        for name, (opt, lgf) in runs.items()
    }
    sgd_losses = results["SGD"][0]
    columns = {}
    for name, (losses, evals, kept, state) in results.items():
        # Gradients SGD needed to reach this run's final loss.
        reach = np.flatnonzero(sgd_losses <= losses[-1])
        columns[name] = [
            int(evals[-1]),
            float(losses[-1]),
            int(reach[0]) + 1 if reach.size else None,
            int(lgfjax.diagnostics(state).fallbacks) if name != "SGD" else None,
            "yes" if kept else "NO",
        ]
    print_table(
        columns,
        [
            "true gradients",
            "final loss",
            "SGD gradients to that loss",
            "fallbacks",
            "sharding kept",
        ],
        title=f"{args.steps} steps, learning rate {LR}",
    )
    if not args.no_plot:
        fig, (ax,) = new_figure(1)
        plot_convergence(
            ax,
            {name: (r[1], r[0]) for name, r in results.items()},
            xlabel="true gradient evaluations",
            ylabel="training loss",
        )
        print("plot:", save_figure(fig, "sharded_training.png"))


if __name__ == "__main__":
    main()
