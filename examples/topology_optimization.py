"""Topology optimisation of the MBB half-beam: gradient descent against LGF.

Compliance minimisation with SIMP (p = 3) on a mesh of bilinear Q4 plane-stress
elements, written in JAX with no finite-element package. The design variables ``x``
(one per element) give densities ``rho = sigmoid(x + eta(x))`` that pass through a
density filter; the shift ``eta`` is found by bisection so that the filtered
densities have mean exactly `volfrac`, which turns the constrained problem into an
unconstrained one for a first-order optimiser. The stiffness solve is a Cholesky
factorisation of the block-tridiagonal stiffness (dense 2 (nely + 1) blocks, one per
node column; `stiffness_matrix` assembles the full dense matrix by scatter-add for
checking). Gradients come from `jax.grad`; the adjoint solve reuses the factors
through `lax.custom_linear_solve`. The optimisers minimise log(compliance).

Both optimisers are plain gradient descent (`optax.sgd`); LGF wraps it with a
POD-reduced learned flow, so that most of its steps skip the finite-element solve.
Compliance is evaluated for every iterate after the runs, outside the timed loops,
only to draw the convergence curves.

Geometry (MBB half-beam): the left edge is a symmetry line (horizontal displacement
fixed), the bottom-right corner rests on a roller (vertical displacement fixed) and a
unit downward load acts at the top-left corner.

    python examples/topology_optimization.py            # 60 x 20 mesh
    python examples/topology_optimization.py --quick    # 30 x 10, fewer steps
"""

import argparse
import functools
import os
import time
from typing import NamedTuple

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
# The block solver makes many small LAPACK calls; a multithreaded OpenBLAS spins on
# them (25 ms instead of 25 us for a 42 x 42 triangular solve on a loaded machine).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jaxtyping import Array, Float  # noqa: E402

import lgfjax  # noqa: E402

E0 = 1.0
EMIN = 1e-9
NU = 0.3
PENAL = 3.0


# ----------------------------------------------------------------------------------
# Finite elements
# ----------------------------------------------------------------------------------


def element_stiffness(nu: float = NU) -> np.ndarray:
    """The 8 x 8 stiffness of a unit-square Q4 plane-stress element with E = 1.

    Dofs are ``(u, v)`` of the corners in counter-clockwise order from the lower left:
    ``(0, 0), (1, 0), (1, 1), (0, 1)``. Integrated with 2 x 2 Gauss points, which is
    exact for the bilinear element on a rectangle.

    ```python
    ke = element_stiffness(0.3)
    assert np.allclose(ke, ke.T) and np.isclose(ke[0, 0], (0.5 - 0.3 / 6) / (1 - 0.09))
    ```
    """
    d = np.array([[1.0, nu, 0.0], [nu, 1.0, 0.0], [0.0, 0.0, (1.0 - nu) / 2.0]]) / (1.0 - nu**2)
    corners = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    g = 1.0 / np.sqrt(3.0)
    ke = np.zeros((8, 8))
    for xi in (-g, g):
        for eta in (-g, g):
            # dN/dxi and dN/deta of N_a = (1 + xi xi_a)(1 + eta eta_a) / 4; the map
            # x = (xi + 1) / 2 has Jacobian 1/2 per axis, so dN/dx = 2 dN/dxi.
            dn_dxi = corners[:, 0] * (1.0 + eta * corners[:, 1]) / 4.0
            dn_deta = corners[:, 1] * (1.0 + xi * corners[:, 0]) / 4.0
            dn_dx, dn_dy = 2.0 * dn_dxi, 2.0 * dn_deta
            b = np.zeros((3, 8))
            b[0, 0::2] = dn_dx
            b[1, 1::2] = dn_dy
            b[2, 0::2] = dn_dy
            b[2, 1::2] = dn_dx
            ke += b.T @ d @ b * 0.25  # weight 1, det J = 1/4
    return ke


class Problem(NamedTuple):
    """A discretised MBB half-beam; all arrays are NumPy (static for JIT)."""

    nelx: int
    nely: int
    volfrac: float
    ke: np.ndarray  # (8, 8) element stiffness for E = 1
    edofs: np.ndarray  # (nely * nelx, 8) int: global dofs of each element, row-major
    free: np.ndarray  # (n_free,) int: dofs not fixed by supports
    force: np.ndarray  # (n_free,) load on the free dofs
    filter_kernel: np.ndarray  # (2 k + 1, 2 k + 1) cone weights
    filter_norm: np.ndarray  # (nely, nelx) sum of kernel weights inside the domain


def mbb_beam(nelx: int = 60, nely: int = 20, volfrac: float = 0.5, rmin: float = 2.0) -> Problem:
    """Mesh, supports, load and filter of the MBB half-beam (``nelx`` x ``nely``)."""
    # Node (i, j) sits at x = i, y = -j (j counts rows from the top).
    node = lambda i, j: i * (nely + 1) + j  # noqa: E731
    ex, ey = np.meshgrid(np.arange(nelx), np.arange(nely))  # (nely, nelx)
    corners = [node(ex, ey + 1), node(ex + 1, ey + 1), node(ex + 1, ey), node(ex, ey)]
    nodes = np.stack(corners, axis=-1).reshape(-1, 4)
    edofs = np.stack([2 * nodes, 2 * nodes + 1], axis=-1).reshape(-1, 8)

    ndof = 2 * (nelx + 1) * (nely + 1)
    fixed = np.union1d(2 * node(0, np.arange(nely + 1)), [2 * node(nelx, nely) + 1])
    free = np.setdiff1d(np.arange(ndof), fixed)
    f = np.zeros(ndof)
    f[2 * node(0, 0) + 1] = -1.0

    k = int(np.ceil(rmin)) - 1
    off = np.arange(-k, k + 1)
    kernel = np.maximum(0.0, rmin - np.hypot(*np.meshgrid(off, off)))
    norm = _convolve(np.ones((nely, nelx)), kernel)
    return Problem(nelx, nely, volfrac, element_stiffness(), edofs, free, f[free], kernel, norm)


def _convolve(a, kernel):
    # The cone kernel is symmetric, so convolution and correlation agree.
    return jax.scipy.signal.convolve2d(jnp.asarray(a), jnp.asarray(kernel), mode="same")


def density_filter(problem: Problem, rho: Float[Array, "nely nelx"]) -> Float[Array, "nely nelx"]:
    """Weighted average of the densities within `rmin` (weights ``rmin - distance``)."""
    return _convolve(rho, problem.filter_kernel) / problem.filter_norm


def physical_density(problem: Problem, x: Float[Array, "nely nelx"]) -> Float[Array, "nely nelx"]:
    """Filtered densities ``H sigmoid(x + eta)`` with ``mean = volfrac`` exactly.

    The shift `eta` solves ``g(x, eta) = mean(H sigmoid(x + eta)) - volfrac = 0``,
    which is monotone in `eta`; bisection finds it without gradients and one Newton
    step with a frozen slope restores the implicit-function derivative
    ``d eta / dx = -(dg/dx) / (dg/deta)``.
    """

    def excess(eta):
        return jnp.mean(density_filter(problem, jax.nn.sigmoid(x + eta))) - problem.volfrac

    xs = jax.lax.stop_gradient(x)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = jax.lax.stop_gradient(excess(mid)) > 0
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    # Every sigmoid is below 1e-9 at the lower end and above 1 - 1e-9 at the upper.
    lo, hi = jax.lax.fori_loop(0, 80, bisect, (-jnp.max(xs) - 21.0, -jnp.min(xs) + 21.0))
    eta0 = 0.5 * (lo + hi)
    slope = jax.lax.stop_gradient(jax.grad(excess)(eta0))
    eta = eta0 - excess(eta0) / slope
    return density_filter(problem, jax.nn.sigmoid(x + eta))


def stiffness_matrix(problem: Problem, rho: Float[Array, "nely nelx"]) -> Float[Array, "n n"]:
    """The dense stiffness on the free dofs (supports eliminated), by scatter-add.

    The optimiser uses the block-tridiagonal solver below instead; this dense form
    is what it must agree with.
    """
    young = _young(rho)
    ndof = 2 * (problem.nelx + 1) * (problem.nely + 1)
    values = young[:, None, None] * jnp.asarray(problem.ke)  # (nel, 8, 8)
    rows = np.repeat(problem.edofs, 8, axis=1)
    cols = np.tile(problem.edofs, (1, 8))
    full = jnp.zeros((ndof, ndof), values.dtype).at[rows, cols].add(values.reshape(-1, 64))
    return full[np.ix_(problem.free, problem.free)]


def _young(rho):
    return EMIN + rho.reshape(-1) ** PENAL * (E0 - EMIN)


# Nodes are numbered column by column, so an element couples only two neighbouring
# node columns and the stiffness is block tridiagonal with nelx + 1 blocks of size
# 2 (nely + 1). A block Cholesky costs O(nelx nely^3) instead of the dense
# O((nelx nely)^3): at 60 x 20 it is ~1000x fewer flops than the dense factor.


def _block_pattern(problem: Problem):
    """Where each lower-triangle entry of every element matrix goes among the blocks."""
    b = 2 * (problem.nely + 1)
    nb = problem.nelx + 1
    col = problem.edofs // b  # node column of each element dof
    local = problem.edofs % b
    a, c = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    ca, cc = col[:, a], col[:, c]  # (nel, 8, 8)
    # Entries (right column, left column) go to the sub-diagonal block of the left
    # column; (left, right) entries are their transposes and are dropped.
    keep = ~((ca < cc)[0])
    slot = np.where(ca == cc, ca, nb + cc)[:, keep]
    rows, cols = local[:, a][:, keep], local[:, c][:, keep]
    return keep, slot, rows, cols


def _blocks(problem: Problem, rho):
    """Diagonal blocks (nb, b, b) and sub-diagonal blocks (nb - 1, b, b), supports
    replaced by identity rows and columns (elimination that keeps the shapes)."""
    b = 2 * (problem.nely + 1)
    nb = problem.nelx + 1
    keep, slot, rows, cols = _block_pattern(problem)
    values = (_young(rho)[:, None, None] * jnp.asarray(problem.ke))[:, keep]
    blocks = jnp.zeros((2 * nb - 1, b, b), values.dtype).at[slot, rows, cols].add(values)
    mask = jnp.asarray(_free_mask(problem).reshape(nb, b))
    diag = blocks[:nb] * mask[:, :, None] * mask[:, None, :] + jax.vmap(jnp.diag)(1.0 - mask)
    sub = blocks[nb:] * mask[1:, :, None] * mask[:-1, None, :]
    return diag, sub


def _free_mask(problem: Problem) -> np.ndarray:
    mask = np.zeros(2 * (problem.nelx + 1) * (problem.nely + 1))
    mask[problem.free] = 1.0
    return mask


def _block_cholesky(diag, sub):
    """Factors ``L_ii`` (nb, b, b) and ``C_i = L_{i,i-1}`` (nb - 1, b, b)."""
    tri = jax.scipy.linalg.solve_triangular

    def body(prev, blocks):
        d, s = blocks
        c = tri(prev, s.T, lower=True).T  # s L_prev^{-T}
        factor = jnp.linalg.cholesky(d - c @ c.T)
        return factor, (factor, c)

    first = jnp.linalg.cholesky(diag[0])
    _, (factors, coupling) = jax.lax.scan(body, first, (diag[1:], sub))
    return jnp.concatenate([first[None], factors]), coupling


def _block_cho_solve(factors, coupling, rhs):
    tri = jax.scipy.linalg.solve_triangular

    def forward(y_prev, blocks):
        factor, c, f = blocks
        y = tri(factor, f - c @ y_prev, lower=True)
        return y, y

    def backward(x_next, blocks):
        factor, c_next, y = blocks
        x = tri(factor, y - c_next.T @ x_next, lower=True, trans=1)
        return x, x

    y0 = tri(factors[0], rhs[0], lower=True)
    _, ys = jax.lax.scan(forward, y0, (factors[1:], coupling, rhs[1:]))
    ys = jnp.concatenate([y0[None], ys])
    xn = tri(factors[-1], ys[-1], lower=True, trans=1)
    _, xs = jax.lax.scan(backward, xn, (factors[:-1], coupling, ys[:-1]), reverse=True)
    return jnp.concatenate([xs, xn[None]])


def displacements(problem: Problem, rho: Float[Array, "nely nelx"]) -> Float[Array, " ndof"]:
    """Displacements of every dof (zero at supports) for physical densities `rho`.

    The factorisation sees stopped gradients; `lax.custom_linear_solve` differentiates
    through the matrix-free product ``K(rho) v`` instead, so `jax.grad` makes one
    adjoint solve with the same factors.
    """
    b = 2 * (problem.nely + 1)
    nb = problem.nelx + 1
    young = _young(rho)
    mask = jnp.asarray(_free_mask(problem))
    ke = jnp.asarray(problem.ke)
    edofs = problem.edofs

    def matvec(v):
        ue = (mask * v)[edofs]  # (nel, 8)
        ku = jnp.zeros_like(v).at[edofs].add(young[:, None] * (ue @ ke))
        return mask * ku + (1.0 - mask) * v

    factors, coupling = _block_cholesky(*_blocks(problem, jax.lax.stop_gradient(rho)))

    def solve(_, r):
        return _block_cho_solve(factors, coupling, r.reshape(nb, b)).reshape(-1)

    force = np.zeros(mask.shape[0])
    force[problem.free] = problem.force
    return jax.lax.custom_linear_solve(matvec, jnp.asarray(force), solve=solve, symmetric=True)


def compliance_of_density(problem: Problem, rho: Float[Array, "nely nelx"]) -> Float[Array, ""]:
    """``f^T u`` for physical densities `rho`."""
    return jnp.dot(jnp.asarray(problem.force), displacements(problem, rho)[problem.free])


def compliance(problem: Problem, x: Float[Array, "nely nelx"]) -> Float[Array, ""]:
    """Compliance of the design variables `x`."""
    return compliance_of_density(problem, physical_density(problem, x))


def objective(problem: Problem, x: Float[Array, "nely nelx"]) -> Float[Array, ""]:
    """What the optimisers minimise: ``log(compliance)``.

    Compliance falls by an order of magnitude from the uniform start; its logarithm
    keeps one gradient-descent step size stable from start to finish.
    """
    return jnp.log(compliance(problem, x))


# ----------------------------------------------------------------------------------
# Optimisers and runs
# ----------------------------------------------------------------------------------


class Settings(NamedTuple):
    # Gradient-descent step on log(compliance) per element: that gradient sums to
    # about -p over the densities, so each entry shrinks like 1 / (nelx nely). 0.8 is
    # close to the largest step that stays stable at 60 x 20 (2.5 diverges).
    lr_per_element: float = 0.8
    history_size: int = 20  # K
    retrain_interval: int = 70  # M
    rank: int = 4  # r
    poly_order: int = 1
    check_every: int | None = None  # value_fn acceptance check (forward solves)

    def lr(self, problem: "Problem") -> float:
        return self.lr_per_element * problem.nelx * problem.nely


def make_optimisers(problem: Problem, s: Settings):
    """``(gradient descent, LGF around the same gradient descent)``."""
    lr = s.lr(problem)
    learned = lgfjax.lgf(
        optax.sgd(lr),
        dt=lr,
        schedule=lgfjax.Fixed(
            history_size=s.history_size,
            retrain_interval=s.retrain_interval,
            check_every=s.check_every,
        ),
        fit=lgfjax.Fit(rank=s.rank, poly_order=s.poly_order),
    )
    return optax.sgd(lr), learned


def make_default(problem: Problem, s: Settings):
    """``lgfjax.lgf(optax.sgd(lr), dt=lr)`` with nothing else: the verified schedule."""
    lr = s.lr(problem)
    return lgfjax.lgf(optax.sgd(lr), dt=lr)


class Run(NamedTuple):
    name: str
    x: np.ndarray  # final design variables (nely, nelx)
    density: np.ndarray  # final physical densities (nely, nelx)
    evaluations: np.ndarray  # (steps + 1,) true gradients used before each iterate
    compliance: np.ndarray  # (steps + 1,) compliance of each iterate (post hoc)
    seconds: float  # optimisation loop only, after compilation
    value_evaluations: int  # value_fn calls by LGF's acceptance check (forward solves)
    state: object = None  # the optimiser's final state (LGF runs), for lgfjax.diagnostics


def history_compliance(problem: Problem):
    """A jitted map from iterates ``(T, nely, nelx)`` to their compliances."""
    return jax.jit(lambda xs: jax.lax.map(functools.partial(compliance, problem), xs))


def run(problem: Problem, opt, steps: int, name: str, *, learned: bool, evaluate=None) -> Run:
    """Run `steps` updates in one compiled scan; then evaluate each iterate's compliance
    with `evaluate` (from `history_compliance`, made here if None)."""
    loss = functools.partial(objective, problem)
    x0 = jnp.zeros((problem.nely, problem.nelx))

    def step(carry, _):
        x, state = carry
        if learned:
            # `value` (free with the gradient) judges the verified schedule's phases;
            # `value_fn` is the fixed schedule's optional acceptance check.
            value, g = lgfjax.value_and_grad(loss)(x, state)
            updates, state = opt.update(g, state, x, value=value, value_fn=loss)
            evals = lgfjax.gradient_evaluations(state)
        else:
            g = jax.grad(loss)(x)
            updates, state = opt.update(g, state, x)
            evals = jnp.zeros((), jnp.int32)  # replaced below: one gradient per step
        x = optax.apply_updates(x, updates)
        return (x, state), (x, evals)

    @jax.jit
    def loop(x0):
        state = opt.init(x0)
        (x, state), (xs, evals) = jax.lax.scan(step, (x0, state), length=steps)
        # The final design's densities, compiled with the loop: op by op, the 80-step
        # bisection would take longer than the whole run.
        return x, physical_density(problem, x), state, xs, evals

    compiled = loop.lower(x0).compile()
    start = time.perf_counter()
    x, density, state, xs, evals = jax.block_until_ready(compiled(x0))
    seconds = time.perf_counter() - start
    if not learned:
        evals = jnp.arange(1, steps + 1)
    evaluate = evaluate or history_compliance(problem)
    values = evaluate(jnp.concatenate([x0[None], xs]))
    return Run(
        name,
        np.asarray(x),
        np.asarray(density),
        np.concatenate([[0], np.asarray(evals)]),
        np.asarray(values),
        seconds,
        int(lgfjax.diagnostics(state).value_evaluations) if learned else 0,
        state if learned else None,
    )


def evaluations_to_reach(r: Run, target: float) -> int | None:
    """True gradients used before the first iterate with compliance <= `target`."""
    hit = np.nonzero(r.compliance <= target)[0]
    return None if hit.size == 0 else int(r.evaluations[hit[0]])


def compare(problem: Problem, steps: int, settings: Settings | None = None):
    """Run both optimisers; returns ``(base_run, lgf_run, target)`` with the 1 % target."""
    settings = Settings() if settings is None else settings
    base, learned = make_optimisers(problem, settings)
    evaluate = history_compliance(problem)
    a = run(problem, base, steps, "gradient descent", learned=False, evaluate=evaluate)
    b = run(problem, learned, steps, "LGF (POD)", learned=True, evaluate=evaluate)
    return a, b, 1.01 * float(a.compliance[-1])


# ----------------------------------------------------------------------------------
# Script
# ----------------------------------------------------------------------------------


def _plot(problem, runs, target, outdir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.4 * len(runs) * problem.nely / 20 + 0.6))
    for ax, r in zip(np.atleast_1d(axes), runs, strict=True):
        ax.imshow(1.0 - r.density, cmap="gray", vmin=0.0, vmax=1.0, interpolation="none")
        ax.set_title(f"{r.name}: c = {r.compliance[-1]:.2f}, {r.evaluations[-1]} gradients")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, "topology_densities.png"), dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    best = min(float(r.compliance.min()) for r in runs)
    for ax, zoom in zip(axes, (False, True), strict=True):
        for r in runs:
            ax.plot(r.evaluations, r.compliance, label=r.name)
        ax.axhline(target, color="k", ls=":", lw=1, label="1 % above gradient descent")
        ax.set_xlabel("true gradient evaluations")
        ax.set_ylabel("compliance")
        if zoom:
            ax.set_ylim(0.99 * best, 1.15 * best)
            ax.set_title("tail")
        else:
            ax.set_yscale("log")
            ax.set_title(f"MBB half-beam {problem.nelx} x {problem.nely}")
            ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, "topology_convergence.png"), dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nelx", type=int, default=60)
    parser.add_argument("--nely", type=int, default=20)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--outdir", default=os.path.join(os.path.dirname(__file__), "outputs"))
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--rank", type=int, default=Settings._field_defaults["rank"])
    parser.add_argument("--check-every", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="30 x 10 mesh, 280 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.nelx, args.nely = 30, 10
    steps = args.steps or (280 if args.quick else 490)

    problem = mbb_beam(args.nelx, args.nely)
    settings = Settings(rank=args.rank, check_every=args.check_every)
    print(
        f"MBB half-beam {problem.nelx} x {problem.nely}, {problem.free.size} free dofs, "
        f"volfrac {problem.volfrac}, SIMP p = {PENAL:g}; sgd lr {settings.lr(problem):g}; LGF K = "
        f"{settings.history_size}, M = {settings.retrain_interval}, rank {settings.rank}, "
        f"poly_order {settings.poly_order}, check_every {settings.check_every}; {steps} steps"
    )
    a, b, target = compare(problem, steps, settings)
    header = (
        f"{'optimiser':<18}{'gradients':>10}{'value evals':>12}{'compliance':>12}"
        f"{'to 1 %':>8}{'time [s]':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in (a, b):
        reach = evaluations_to_reach(r, target)
        print(
            f"{r.name:<18}{r.evaluations[-1]:>10d}{r.value_evaluations:>12d}"
            f"{r.compliance[-1]:>12.4f}{'-' if reach is None else reach:>8}{r.seconds:>10.2f}"
        )
    ra, rb = evaluations_to_reach(a, target), evaluations_to_reach(b, target)
    if ra and rb:
        print(f"gradients to reach {target:.4f}: LGF / gradient descent = {rb / ra:.2f}")
    ratio = b.compliance[-1] / a.compliance[-1]
    print(f"LGF final compliance / gradient descent final = {ratio:.4f}")
    print(
        "volume: "
        + ", ".join(f"{r.name} {r.density.mean():.6f}" for r in (a, b))
        + "; time is wall time under shared load, excluding compilation"
    )
    if not args.no_plot:
        os.makedirs(args.outdir, exist_ok=True)
        _plot(problem, (a, b), target, args.outdir)
        print(f"saved topology_densities.png and topology_convergence.png in {args.outdir}")


if __name__ == "__main__":
    main()
