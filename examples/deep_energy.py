"""Deep energy method for 3-D linear elasticity: Adam versus LGF-Adam.

A unit cube clamped on the face z = 0 (E = 1, nu = 0.25) carries the body force
b = 10 (-(y - 0.5), x - 0.5, 0), a torsion. The displacement is u(x) = z NN(x) with NN
an MLP 3-20-20-3 (tanh, no output bias; 560 weights), and the loss is the potential
energy, int 0.5 sigma:eps - b.u dV, by the midpoint rule on an N^3 grid. Both runs
take the same number of steps; LGF takes K = 35 true Adam steps in each cycle of 50
and integrates the Adam ODE with a learned gradient for the other 15.

    python examples/deep_energy.py             # default grid, a few minutes on 2 cores
    python examples/deep_energy.py --paper     # the 99^3 grid

With `--collocation random` the loss is a Monte Carlo estimate instead: `--points`
(5,000, the paper's choice) points drawn uniformly in the cube at every true gradient,
from a sequence fixed by `--seed` (the j-th true gradient of every optimiser sees the
same points). Adam, LGF-Adam and the default `lgf_adam(lr)` are then judged by the
energy on the fixed `--grid` (midpoint rule) and by how far their displacement
fields on that grid are from Adam's:

    python examples/deep_energy.py --collocation random --steps 1000 --points 1000
"""

import argparse
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lgfjax
from lgfjax._adam import lgf_adam

YOUNG, POISSON = 1.0, 0.25
LAME = YOUNG * POISSON / ((1 + POISSON) * (1 - 2 * POISSON))
SHEAR = YOUNG / (2 * (1 + POISSON))
LR, K, M = 2.5e-3, 35, 50
# Five POD modes: a linear model of the gradient in them has 6 x 5 coefficients, well
# determined by 35 samples. Full space (561 x 560 coefficients from 35 samples, a
# minimum-norm fit) extrapolates badly over the surrogate phase, and ranks of 8 or
# more over-fit and make some late surrogate phases raise the loss.
RANK = 5


def make_model(key=None):
    """The network NN as (params, static): params is the pytree the optimisers see."""
    key = jax.random.PRNGKey(0) if key is None else key
    mlp = eqx.nn.MLP(3, 3, 20, 2, activation=jnp.tanh, use_final_bias=False, key=key)
    return eqx.partition(mlp, eqx.is_array)


def grid(n: int):
    """Midpoints of an n^3 grid on the unit cube and the weight of each cell."""
    h = 1.0 / n
    c = (jnp.arange(n) + 0.5) * h
    x, y, z = jnp.meshgrid(c, c, c, indexing="ij")
    return jnp.stack([x.ravel(), y.ravel(), z.ravel()], axis=1), h**3


def displacement(params, static, x):
    """u(x) = z NN(x), zero on the clamped face z = 0."""
    return x[2] * eqx.combine(params, static)(x)


def body_force(x):
    return 10.0 * jnp.stack([-(x[1] - 0.5), x[0] - 0.5, jnp.zeros_like(x[0])])


def energy_density(params, static, x):
    grad_u = jax.jacfwd(lambda p: displacement(params, static, p))(x)
    strain = 0.5 * (grad_u + grad_u.T)
    trace = jnp.trace(strain)
    strain_energy = 0.5 * LAME * trace**2 + SHEAR * jnp.sum(strain**2)
    return strain_energy - body_force(x) @ displacement(params, static, x)


def make_loss(static, points, weight):
    def loss(params):
        return weight * jnp.sum(jax.vmap(lambda x: energy_density(params, static, x))(points))

    return loss


def random_points(key, index, count: int):
    """The `count` collocation points of the `index`-th true gradient, uniform in the cube.

    A function of (`key`, `index`) only, so every optimiser sees the same sequence of
    point sets, one per true gradient, whatever steps it takes in between.
    """
    dtype = jnp.result_type(float)  # float64 under jax_enable_x64
    return jax.random.uniform(jax.random.fold_in(key, index), (count, 3), dtype)


def make_random_loss(static):
    """``loss(params, points)``: the Monte Carlo energy (the cube's volume is 1)."""

    def loss(params, points):
        return jnp.mean(jax.vmap(lambda x: energy_density(params, static, x))(points))

    return loss


def run(opt, loss, params, steps: int):
    """`steps` updates in one compiled scan.

    Returns the final params and state, the loss at every step where a true gradient
    was evaluated (NaN in surrogate steps, where the objective is not run) and the
    wall time of the run without compilation.
    """
    grad_fn = lgfjax.value_and_grad(loss)

    state = opt.init(params)
    lgf = isinstance(state, lgfjax.LGFState | lgfjax.VerifiedState)

    def body(carry, _):
        p, s = carry
        if lgf:
            # The loss comes free with the gradient (NaN in surrogate steps); the
            # verified schedule judges each surrogate phase by it.
            value, g = grad_fn(p, s)
            u, s = opt.update(g, s, p, value=value)
        else:
            value, g = jax.value_and_grad(loss)(p)
            u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), value

    def all_steps(p, s):
        return jax.lax.scan(body, (p, s), None, length=steps)

    compiled = jax.jit(all_steps).lower(params, state).compile()
    start = time.perf_counter()
    (params, state), values = compiled(params, state)
    jax.block_until_ready(values)
    return params, state, np.asarray(values), time.perf_counter() - start


def evaluations_to_reach(values, final_loss, total, target):
    """True evaluations spent before reaching a loss <= target (None if never).

    `values` holds the loss at each step, NaN where no evaluation happened; the j-th
    evaluated loss (from 0) is that of a point reached with j evaluations. The loss
    at the final parameters is that of a point reached with all `total` evaluations.
    """
    evaluated = values[np.isfinite(values)]
    hit = np.nonzero(evaluated <= target)[0]
    if hit.size:
        return int(hit[0])
    return total if final_loss <= target else None


def compare(
    steps: int = 2000,
    n: int = 20,
    rank: int | None = RANK,
    seed: int = 0,
    default: bool = False,
    default_steps: int | None = None,
):
    """Run Adam and LGF-Adam from the same network; returns a dict of results.

    `default=True` also runs ``lgf_adam(LR)`` with nothing else (the verified schedule,
    untuned) as "LGF-Adam default", for `default_steps` updates (default `steps`).
    """
    params, static = make_model(jax.random.PRNGKey(seed))
    n_weights = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    points, weight = grid(n)
    loss = make_loss(static, points, weight)
    optimisers = {
        "Adam": optax.adam(LR),
        "LGF-Adam": lgf_adam(
            LR, schedule=lgfjax.Fixed(history_size=K, retrain_interval=M), fit=lgfjax.Fit(rank=rank)
        ),
    }
    if default:
        optimisers["LGF-Adam default"] = lgf_adam(LR)
    out = {"n_weights": n_weights, "grid": n, "steps": steps, "rank": rank}
    for name, opt in optimisers.items():
        n_steps = default_steps or steps if name == "LGF-Adam default" else steps
        final, state, values, seconds = run(opt, loss, params, n_steps)
        field = jax.vmap(displacement, in_axes=(None, None, 0))(final, static, points)
        evals = int(lgfjax.gradient_evaluations(state)) if name != "Adam" else steps
        out[name] = dict(
            params=final,
            state=state,
            values=values,
            seconds=seconds,
            field=np.asarray(field),
            evaluations=evals,
            final_loss=float(loss(final)),
        )
    a, b = out["Adam"], out["LGF-Adam"]
    out["relative_error"] = float(
        np.linalg.norm(b["field"] - a["field"]) / np.linalg.norm(a["field"])
    )
    # Common target: the worse of the two final losses, which both runs reached.
    out["target"] = max(a["final_loss"], b["final_loss"])
    # Milestones: Adam's loss after a given number of evaluations, and what LGF needs.
    out["milestones"] = []
    for evals in (100, 250, 500, 1000, b["evaluations"], a["evaluations"]):
        if evals <= a["evaluations"]:
            level = a["final_loss"] if evals == a["evaluations"] else float(a["values"][evals])
            seen = (b["values"], b["final_loss"], b["evaluations"])
            out["milestones"].append((evals, level, evaluations_to_reach(*seen, level)))
    for r in (a, b):
        seen = (r["values"], r["final_loss"], r["evaluations"])
        r["to_target"] = evaluations_to_reach(*seen, out["target"])
        r["to_adam"] = evaluations_to_reach(*seen, a["final_loss"])
    return out


def table(out) -> str:
    a, b = out["Adam"], out["LGF-Adam"]
    d = lgfjax.diagnostics(b["state"])

    def fmt(v):
        return "never" if v is None else str(v)

    rows = [
        ("true gradient evaluations", a["evaluations"], b["evaluations"]),
        ("final loss (potential energy)", f"{a['final_loss']:.6f}", f"{b['final_loss']:.6f}"),
        (f"evaluations to loss <= {out['target']:.6f}", fmt(a["to_target"]), fmt(b["to_target"])),
        ("evaluations to Adam's final loss", fmt(a["to_adam"]), fmt(b["to_adam"])),
        ("wall time of the run [s]", f"{a['seconds']:.2f}", f"{b['seconds']:.2f}"),
        ("surrogate steps kept / refused", "-", f"{int(d.accepted)} / {int(d.rejected)}"),
        ("fallbacks", "-", str(int(d.fallbacks))),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'Adam':>12}  {'LGF-Adam':>12}"]
    lines += [f"{r[0]:{width}}  {str(r[1]):>12}  {str(r[2]):>12}" for r in rows]
    lines.append("Adam's loss after n evaluations, and the evaluations LGF-Adam needs for it:")
    for evals, level, lgf_evals in out["milestones"]:
        lines.append(f"  n = {evals:5d}  loss {level:.6f}  LGF-Adam: {fmt(lgf_evals)}")
    ratio = f"{b['to_target'] / a['to_target']:.3f}" if a["to_target"] and b["to_target"] else "n/a"
    lines.append(f"evaluation ratio LGF/Adam at the common target: {ratio}")
    lines.append(
        f"relative displacement difference ||u_LGF - u_Adam|| / ||u_Adam|| on the grid: "
        f"{out['relative_error']:.3e}"
    )
    return "\n".join(lines)


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lo = min(np.nanmin(out[n]["values"]) for n in ("Adam", "LGF-Adam"))
    for ax, span in zip(axes, (0.6, 0.03), strict=True):
        for name in ("Adam", "LGF-Adam"):
            v = out[name]["values"]
            v = v[np.isfinite(v)]
            label = f"{name} ({out[name]['evaluations']} evals)"
            ax.plot(np.arange(v.size), v, label=label)
        ax.axhline(out["target"], color="grey", ls=":", lw=1, label="common target")
        ax.set_ylim(lo - 0.1 * span * abs(lo), lo + span * abs(lo))
        ax.set_xlabel("true gradient evaluations")
        ax.set_ylabel("potential energy (loss)")
    axes[0].set_title(f"Deep energy method, {out['grid']}^3 grid, {out['steps']} steps")
    axes[1].set_title("zoom on the tail")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_random(opt, loss, energy, params, steps: int, key, count: int, every: int):
    """`steps` updates with points redrawn for each true gradient (`random_points`).

    The points of an update are those of the true gradient it would take: the
    optimiser's evaluations so far (Adam: its step). Returns the final params and
    state, the evaluations after each update (true gradients plus any `value_fn`
    calls), the fixed-grid `energy` after every `every`-th update and the last (NaN
    elsewhere), and the wall time of the run without compilation.
    """
    grad_fn = lgfjax.value_and_grad(loss)
    state = opt.init(params)
    lgf = isinstance(state, lgfjax.LGFState | lgfjax.VerifiedState)

    def body(carry, step):
        p, s = carry
        if lgf:
            points = random_points(key, lgfjax.gradient_evaluations(s), count)
            value, g = grad_fn(p, s, points)
            u, s = opt.update(g, s, p, value=value, value_fn=lambda q: loss(q, points))
            spent = lgfjax.gradient_evaluations(s) + s.info.value_evaluations
        else:
            g = jax.grad(loss)(p, random_points(key, step, count))
            u, s = opt.update(g, s, p)
            spent = step + 1
        p = optax.apply_updates(p, u)
        due = ((step + 1) % every == 0) | (step == steps - 1)
        e = jax.lax.cond(due, energy, lambda q: jnp.full((), jnp.nan, jnp.result_type(float)), p)
        return (p, s), (spent, e)

    def all_steps(p, s):
        return jax.lax.scan(body, (p, s), jnp.arange(steps))

    compiled = jax.jit(all_steps).lower(params, state).compile()
    start = time.perf_counter()
    (params, state), (spent, energies) = compiled(params, state)
    jax.block_until_ready(energies)
    seconds = time.perf_counter() - start
    return params, state, np.asarray(spent), np.asarray(energies), seconds


def compare_random(
    steps: int = 2000,
    n: int = 16,
    count: int = 5000,
    seed: int = 0,
    every: int = 10,
    default_steps: int | None = None,
):
    """Adam, LGF-Adam (the fixed K, M) and the default `lgf_adam(LR)`, each for `steps`
    updates (the default for `default_steps`, if given) with `count` random points per
    true gradient; judged on the fixed n^3 grid.
    """
    params, static = make_model(jax.random.PRNGKey(seed))
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    points, weight = grid(n)
    energy = make_loss(static, points, weight)
    loss = make_random_loss(static)
    optimisers = {
        "Adam": optax.adam(LR),
        "LGF-Adam": lgf_adam(
            LR, schedule=lgfjax.Fixed(history_size=K, retrain_interval=M), fit=lgfjax.Fit(rank=RANK)
        ),
        "LGF-Adam default": lgf_adam(LR),
    }
    out = {"grid": n, "steps": steps, "points": count, "seed": seed, "runs": {}}
    for name, opt in optimisers.items():
        updates = steps if name != "LGF-Adam default" or default_steps is None else default_steps
        final, state, spent, energies, seconds = run_random(
            opt, loss, energy, params, updates, key, count, every
        )
        field = jax.vmap(displacement, in_axes=(None, None, 0))(final, static, points)
        out["runs"][name] = dict(
            state=state,
            spent=spent,
            energies=energies,
            seconds=seconds,
            field=np.asarray(field),
            evaluations=int(spent[-1]),
            final_energy=float(energies[-1]),
        )
    adam = out["runs"]["Adam"]
    for r in out["runs"].values():
        r["relative_error"] = float(
            np.linalg.norm(r["field"] - adam["field"]) / np.linalg.norm(adam["field"])
        )
        hit = np.flatnonzero(r["energies"] <= adam["final_energy"])  # NaN never counts
        r["to_adam"] = int(r["spent"][hit[0]]) if hit.size else None
    return out


def table_random(out) -> str:
    runs = out["runs"]

    def lgf_counts(r):
        """(surrogate steps kept / refused, phases confirmed / judged), "-" where none."""
        state = r["state"]
        if not isinstance(state, lgfjax.LGFState | lgfjax.VerifiedState):
            return "-", "-"
        d = lgfjax.diagnostics(state)
        judged = "-"  # the fixed schedule judges no phases
        if isinstance(state, lgfjax.VerifiedState):
            judged = f"{int(state.info.verified)} / {int(state.info.verifications)}"
        return f"{int(d.accepted)} / {int(d.rejected)}", judged

    rows = {
        "evaluations (gradients + value_fn calls)": [r["evaluations"] for r in runs.values()],
        "energy on the fixed grid": [f"{r['final_energy']:.6f}" for r in runs.values()],
        "evaluations to Adam's final energy": [r["to_adam"] or "never" for r in runs.values()],
        "||u - u_Adam|| / ||u_Adam|| on the grid": [
            f"{r['relative_error']:.3e}" for r in runs.values()
        ],
        "wall time of the run [s]": [f"{r['seconds']:.2f}" for r in runs.values()],
        "surrogate steps kept / refused": [lgf_counts(r)[0] for r in runs.values()],
        "phases confirmed / judged": [lgf_counts(r)[1] for r in runs.values()],
    }
    width = max(map(len, rows))
    lines = [f"{'':{width}}" + "".join(f"  {name:>16}" for name in runs)]
    for label, cells in rows.items():
        lines.append(f"{label:{width}}" + "".join(f"  {str(c):>16}" for c in cells))
    return "\n".join(lines)


def plot_random(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in out["runs"].items():
        seen = np.isfinite(r["energies"])
        ax.plot(r["spent"][seen], r["energies"][seen], label=f"{name} ({r['evaluations']} evals)")
    lo = min(np.nanmin(r["energies"]) for r in out["runs"].values())
    ax.set_ylim(lo - 0.05 * abs(lo), lo + 0.6 * abs(lo))
    ax.set_xlabel("evaluations")
    ax.set_ylabel(f"energy on the fixed {out['grid']}^3 grid")
    ax.set_title(f"Deep energy, {out['points']} random points per gradient, seed {out['seed']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main_random(args):
    out = compare_random(args.steps, args.grid, args.points, args.seed, args.record_every)
    print(
        f"Deep energy method, random collocation: {args.points} points per true gradient "
        f"(seed {args.seed}), {args.steps} steps, energy judged on the fixed {args.grid}^3 "
        f"grid every {args.record_every} steps, lr={LR} (times measured on a shared machine)"
    )
    print(table_random(out))
    if not args.no_plot:
        os.makedirs(args.outdir, exist_ok=True)
        path = os.path.join(args.outdir, "deep_energy_random.png")
        plot_random(out, path)
        print(f"plot: {path}")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--rank", type=int, default=RANK, help="POD rank; 0 for full space")
    parser.add_argument("--paper", action="store_true", help="the 99^3 grid of the paper")
    parser.add_argument("--outdir", default=os.path.join(os.path.dirname(__file__), "outputs"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--collocation",
        choices=("grid", "random"),
        default="grid",
        help="grid: the midpoint rule on the --grid (default); random: --points uniform "
        "points per true gradient, judged on the --grid",
    )
    parser.add_argument("--points", type=int, default=5000, help="random points per gradient")
    parser.add_argument("--seed", type=int, default=0, help="network and random points")
    parser.add_argument(
        "--record-every", type=int, default=10, help="random: fixed-grid energy every N steps"
    )
    args = parser.parse_args(argv)
    n = 99 if args.paper else args.grid
    # The fit needs float64: the iterates of a cycle differ by ~1e-3 relative, so the
    # uncentred POD's Gram matrix loses all but its first mode in float32.
    jax.config.update("jax_enable_x64", True)
    if args.collocation == "random":
        args.grid = n
        return main_random(args)
    out = compare(args.steps, n, rank=args.rank or None, seed=args.seed)
    print(
        f"Deep energy method: {out['n_weights']} weights, {n}^3 grid, {args.steps} steps, "
        f"K={K}, M={M}, lr={LR}, rank={out['rank'] or 'full'} (times measured on a "
        f"shared machine)"
    )
    print(table(out))
    if not args.no_plot:
        os.makedirs(args.outdir, exist_ok=True)
        path = os.path.join(args.outdir, "deep_energy.png")
        plot(out, path)
        print(f"plot: {path}")
    return out


if __name__ == "__main__":
    main()
