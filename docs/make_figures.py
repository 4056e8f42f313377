"""Draw the user guide's figure: a trajectory, the fitted flow and the surrogate phase.

    python docs/make_figures.py        # writes docs/images/lgf_flow.png (needs matplotlib)

A 2-parameter quadratic, minimised by ``lgfjax.lgf(optax.sgd(0.1), dt=0.1)`` (the
verified default). Left: the objective's contours, plain gradient descent's path, and
LGF's iterates, true steps (which cost a gradient) and surrogate steps (which do not)
marked apart by `lgfjax.needs_gradient`; the streamlines are the flow fitted after the
first K = 10 true steps, read from the state (``state.model``: coefficients, POD
basis and origin) and evaluated with `lgfjax.PolynomialFlow`. Right: the loss against
steps, and the true gradients spent, for both.
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lgfjax

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 60
LR = 0.1

# An anisotropic quadratic (curvatures 1 and 4) rotated by 30 degrees: curved paths.
_c, _s = np.cos(np.pi / 6), np.sin(np.pi / 6)
_R = np.array([[_c, -_s], [_s, _c]])
A = jnp.asarray(_R @ np.diag([1.0, 4.0]) @ _R.T, jnp.float32)
CENTRE = jnp.array([1.0, 0.5])
START = jnp.array([-1.6, 1.7])


def loss(x):
    d = x - CENTRE
    return 0.5 * d @ A @ d


def run_lgf():
    opt = lgfjax.lgf(optax.sgd(LR), dt=LR)
    state = opt.init(START)

    @jax.jit
    def step(params, state):
        value, grads = lgfjax.value_and_grad(loss)(params, state)
        updates, state = opt.update(grads, state, params, value=value)
        return optax.apply_updates(params, updates), state

    xs, true, evals, first_model = [START], [], [0], None
    params = START
    for _ in range(STEPS):
        true.append(bool(lgfjax.needs_gradient(state)))
        params, state = step(params, state)
        xs.append(params)
        evals.append(int(lgfjax.gradient_evaluations(state)))
        if first_model is None and not bool(lgfjax.needs_gradient(state)):
            first_model = state.model  # the first fit, before its first surrogate step
    return np.asarray(xs), np.asarray(true), np.asarray(evals), first_model


def run_gd():
    xs, x = [START], START
    for _ in range(STEPS):
        x = x - LR * jax.grad(loss)(x)
        xs.append(x)
    return np.asarray(xs)


def learned_velocity(model, points):
    """The fitted flow at `points` (shape (m, 2)), in parameter coordinates."""
    flow = lgfjax.PolynomialFlow(model.coefficients, 1, True)  # poly_order 1, bias
    basis = np.asarray(model.basis)  # (rank, 2): the POD modes as rows
    origin = np.asarray(model.origin)  # the centred POD's zero
    z = (points - origin) @ basis.T
    dz = jax.vmap(lambda zz: flow(0.0, zz))(jnp.asarray(z))
    return np.asarray(dz) @ basis


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "images", "lgf_flow.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, true, evals, model = run_lgf()
    gd = run_gd()
    losses = np.array([float(loss(jnp.asarray(x))) for x in xs])
    gd_losses = np.array([float(loss(jnp.asarray(x))) for x in gd])

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.6))
    g0, g1 = np.meshgrid(np.linspace(-2.2, 2.2, 161), np.linspace(-1.2, 2.2, 121))
    grid = np.stack([g0.ravel(), g1.ravel()], axis=1)
    f = np.array(jax.vmap(loss)(jnp.asarray(grid, jnp.float32))).reshape(g0.shape)
    ax.contour(g0, g1, f, levels=np.geomspace(1e-3, f.max(), 14), colors="0.85", linewidths=0.8)
    v = learned_velocity(model, grid).reshape(g0.shape + (2,))
    ax.streamplot(
        g0, g1, v[..., 0], v[..., 1], color="tab:green", density=0.9, linewidth=0.7, arrowsize=0.8
    )
    ax.plot(gd[:, 0], gd[:, 1], "-", color="0.55", lw=1.0, label="gradient descent")
    ax.plot(xs[:, 0], xs[:, 1], "-", color="0.2", lw=0.6)
    start_of_step = xs[:-1]
    ax.plot(
        *start_of_step[true].T,
        "o",
        color="tab:blue",
        ms=5,
        label=f"LGF true step ({true.sum()}, one gradient each)",
    )
    ax.plot(
        *start_of_step[~true].T,
        "x",
        color="tab:orange",
        ms=5,
        label=f"LGF surrogate step ({(~true).sum()}, no gradient)",
    )
    ax.plot(*CENTRE, "*", color="k", ms=10)
    ax.set_xlim(-2.2, 2.2)
    ax.set_ylim(-1.2, 2.2)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_0$")
    ax.set_ylabel("$x_1$")
    ax.set_title("iterates, and the flow fitted to the first 10 true steps (green)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)

    steps = np.arange(STEPS + 1)
    bx.semilogy(steps, gd_losses, "-", color="0.55", label="gradient descent")
    bx.semilogy(steps, losses, "-", color="0.2", lw=0.6)
    bx.semilogy(
        steps[:-1][true],
        losses[:-1][true],
        "o",
        color="tab:blue",
        ms=4,
        label="LGF, before a true step",
    )
    bx.semilogy(
        steps[:-1][~true],
        losses[:-1][~true],
        "x",
        color="tab:orange",
        ms=4,
        label="LGF, before a surrogate step",
    )
    bx.set_xlabel("step")
    bx.set_ylabel("loss")
    tx = bx.twinx()
    tx.plot(steps, steps, ":", color="0.55", label="gradients spent, gradient descent")
    tx.plot(steps, evals, ":", color="tab:blue", label="gradients spent, LGF")
    tx.set_ylabel("true gradients spent")
    h1, l1 = bx.get_legend_handles_labels()
    h2, l2 = tx.get_legend_handles_labels()
    bx.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
    bx.set_title(
        f"{STEPS} steps: LGF spends {evals[-1]} gradients, gradient descent {STEPS}", fontsize=9
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
