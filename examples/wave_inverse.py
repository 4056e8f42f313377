"""Wave (scattering) inverse problem: Adam against LGF-Adam, in pure JAX.

The unit square is meshed with linear (P1) triangles on a structured grid (each of the
``n x n`` squares cut by its rising diagonal; n = 10 gives 200 elements and 121 nodes,
the order of a Gmsh mesh of size factor 0.09). The scalar wave equation

    M(m) u'' + K u = F

has an element-wise mass (slowness) field ``m`` and the Laplace stiffness ``K``, both
assembled in JAX by scatter-add. The mass matrix is **consistent** (element e adds
``m_e |e| (1 + delta_ab) / 12``), not lumped: with row-sum lumping the data would see
m only through the 90 free nodal masses, so 110 of the 200 element values would be
invisible to the loss (the Jacobian of the data at m_true has rank 90 lumped, 196
consistent) and the parameter error would measure the optimiser's drift in that null
space. The explicit central-difference scheme

    u_{n+1} = 2 u_n - u_{n-1} + dt^2 M^{-1} (F_n - K u_n)

factorises M(m) once per simulation (Cholesky, then ``M^-1 K`` dense) and runs to
T = 1 in 300 steps as one `lax.scan`; the loss and its gradient (reverse mode through
the scan) cost about 2 ms on a shared 2-core CPU. The left, bottom and right edges
are clamped (u = 0), the top edge is free, a point force ``10 sin(4 pi t)`` acts at the
midpoint of the top edge, and u is measured at all 90 free nodes at every step.

Data come from the true slowness ``m = 1 + 2 y`` (at the element centroids). The
optimisers start at ``a = 1`` in every element with the model ``m = |a| + 1e-2`` and
minimise ``0.5 dt sum_n ||u_n - v_n||^2``. Progress is measured by the relative
parameter error of the *modelled field*, ``||m(a) - m_true||^2 / ||m_true||^2`` (m,
not a: the sign of a is invisible to the model), computed for every iterate inside
the run but never counted as an evaluation.

Optimisers (the authors' settings): Adam with learning rate 2e-2 for 2,200 steps;
``lgf_adam`` with K = 20 true steps in every cycle of M = 40, a linear library with
bias in the full space (201 terms from 21 iterates: the dual STLSQ), threshold 1e-8
and alpha 0; and ``lgf_adam(2e-2)`` with nothing else (the verified default). The LGF
runs may take up to twice Adam's steps (their surrogate steps cost no gradient);
"true gradients to Adam's final error" counts the gradients spent before the first
iterate at least as accurate as Adam's last one.

CFL: the scheme is stable for ``dt < 2 / sqrt(lambda_max(M(m)^-1 K))``. Since
``M(m) - min(m) M(1)`` is a sum of positive semi-definite element masses,
``lambda_max(M(m)^-1 K) <= lambda_max(M(1)^-1 K) / min(m)``; on the default mesh
``lambda_max(M(1)^-1 K) = 2494``, so dt = 1/300 = 3.33e-3 is 12x below the limit
4.0e-2 for the true field and the start (m >= 1), and still below the limit 4.0e-3
for the smallest slowness the model allows (m = 1e-2): the scheme is stable for every
``a`` (`make_problem` checks this for the mesh and step it builds).

Measured (default size): the authors' ``lgf_adam`` reaches Adam's final error with
1,100 true gradients against Adam's 2,200 (0.50x; its surrogate steps track Adam's
almost exactly, so K/M = 0.5 is what it saves). The untuned default does not reach it
in 4,400 steps: it lowers the *loss* much faster than Adam, but the parameter error
slowly (see ``benchmarks/report.py``'s note). Allowed 3x Adam's steps
(``--lgf-factor 3``) it reaches Adam's final error at step 5,495 with 362 true
gradients, 0.16x Adam's (measured 2026-12-04).

    python examples/wave_inverse.py                 # 2,200 Adam steps, about 30 s on 2 cores
    python examples/wave_inverse.py --quick         # 400 steps, for a smoke run
    python examples/wave_inverse.py --lgf-factor 3  # the LGF runs up to 3x Adam's steps
"""

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

# Each simulation factorises a 90 x 90 mass matrix and the LGF fits make small LAPACK
# calls: a multithreaded OpenBLAS spins on them (a gradient took 84 ms instead of 2 ms
# on a loaded 2-core machine). Set before numpy or scipy load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jaxtyping import Array, Float, Int  # noqa: E402

import lgfjax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import new_figure, plot_convergence, print_table, save_figure  # noqa: E402

LR = 2e-2
K, M = 20, 40  # history_size, retrain_interval of the authors' lgf_adam
STEPS, QUICK_STEPS = 2200, 400
LGF_STEP_FACTOR = 2  # the LGF runs may take this many times Adam's steps
M_FLOOR = 1e-2  # m = |a| + M_FLOOR
FORCE_AMPLITUDE, FORCE_FREQUENCY = 10.0, 2.0  # 10 sin(2 pi 2 t) = 10 sin(4 pi t)

# ----------------------------------------------------------------------------------
# Mesh and finite elements
# ----------------------------------------------------------------------------------


class Mesh(NamedTuple):
    """A structured P1 triangulation of the unit square."""

    n: int  # squares per side
    nodes: Float[np.ndarray, "N 2"]  # node (i, j) at (i h, j h) has index j (n + 1) + i
    elements: Int[np.ndarray, "E 3"]  # counter-clockwise node triples
    free: Int[np.ndarray, " F"]  # nodes off the clamped left, bottom and right edges


def make_mesh(n: int = 10) -> Mesh:
    """``n x n`` squares, each cut by its rising diagonal into two right triangles.

    With every diagonal opposite two right angles, P1 stiffness couples no node to its
    diagonal neighbour: it is the 5-point Laplacian (half stencils on the free edge).

    ```python
    mesh = make_mesh(10)
    assert mesh.elements.shape == (200, 3) and mesh.free.size == 90
    ```
    """
    h = 1.0 / n
    j, i = np.divmod(np.arange((n + 1) ** 2), n + 1)
    nodes = np.stack([i * h, j * h], axis=1)
    cj, ci = np.divmod(np.arange(n * n), n)
    p00 = cj * (n + 1) + ci
    p10, p01, p11 = p00 + 1, p00 + n + 1, p00 + n + 2
    lower = np.stack([p00, p10, p11], axis=1)
    upper = np.stack([p00, p11, p01], axis=1)
    elements = np.stack([lower, upper], axis=1).reshape(-1, 3)
    clamped = (i == 0) | (i == n) | (j == 0)
    return Mesh(n, nodes, elements, np.flatnonzero(~clamped))


def element_geometry(mesh: Mesh):
    """Areas ``(E,)`` and gradients of the three hat functions ``(E, 3, 2)``, in JAX."""
    p = jnp.asarray(mesh.nodes)[mesh.elements]
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    # Rows of the inverse Jacobian: the gradients of barycentric coordinates 1 and 2.
    g1 = jnp.stack([e2[:, 1], -e2[:, 0]], axis=-1) / det[:, None]
    g2 = jnp.stack([-e1[:, 1], e1[:, 0]], axis=-1) / det[:, None]
    return det / 2, jnp.stack([-g1 - g2, g1, g2], axis=1)


def stiffness_matrix(mesh: Mesh) -> Float[Array, "F F"]:
    """The P1 Laplace stiffness, assembled by scatter-add, restricted to the free nodes.

    Dense: at a couple of hundred elements a dense matrix-vector product is the
    fastest time step on a CPU.
    """
    area, grads = element_geometry(mesh)
    local = area[:, None, None] * jnp.einsum("eak,ebk->eab", grads, grads)
    n_nodes = mesh.nodes.shape[0]
    rows, cols = mesh.elements[:, :, None], mesh.elements[:, None, :]
    full = jnp.zeros((n_nodes, n_nodes)).at[rows, cols].add(local)
    return full[np.ix_(mesh.free, mesh.free)]


def mass_matrix(mesh: Mesh, m: Float[Array, " E"]) -> Float[Array, "F F"]:
    """The consistent P1 mass of the slowness field m (free nodes, dense).

    Element e contributes ``m_e |e| (1 + delta_ab) / 12`` to its nodes a, b: the exact
    integral of ``m_e phi_a phi_b``.
    """
    area, _ = element_geometry(mesh)
    reference = (jnp.ones((3, 3)) + jnp.eye(3)) / 12.0
    local = (m * area)[:, None, None] * reference
    n_nodes = mesh.nodes.shape[0]
    rows, cols = mesh.elements[:, :, None], mesh.elements[:, None, :]
    full = jnp.zeros((n_nodes, n_nodes), local.dtype).at[rows, cols].add(local)
    return full[np.ix_(mesh.free, mesh.free)]


def centroids(mesh: Mesh) -> Float[np.ndarray, "E 2"]:
    return mesh.nodes[mesh.elements].mean(axis=1)


def simulate(
    stiffness: Float[Array, "F F"],
    mass: Float[Array, "F F"],
    dt: float,
    load_vector: Float[Array, " F"],
    load_series: Float[Array, " S+1"],
    u0: Float[Array, " F"] | None = None,
    v0: Float[Array, " F"] | None = None,
) -> Float[Array, "S+1 F"]:
    """Central differences for ``M u'' + K u = f(t) b``: the displacements u_0 ... u_S.

    One Cholesky factorisation of M gives ``A = M^-1 K`` and ``w = M^-1 b``; then the
    Taylor start ``u_1 = u_0 + dt v_0 + dt^2/2 (f_0 w - A u_0)`` (second order; it
    makes a discrete standing mode exactly ``cos(omega_h t_n)``) and
    ``u_{n+1} = 2 u_n - u_{n-1} + dt^2 (f_n w - A u_n)`` as one `lax.scan`.
    """
    u0 = jnp.zeros_like(load_vector) if u0 is None else u0
    v0 = jnp.zeros_like(load_vector) if v0 is None else v0
    factor = jax.scipy.linalg.cho_factor(mass)
    solved = jax.scipy.linalg.cho_solve(
        factor, jnp.concatenate([stiffness, load_vector[:, None]], 1)
    )
    operator, response = dt**2 * solved[:, :-1], dt**2 * solved[:, -1]
    u1 = u0 + dt * v0 + 0.5 * (load_series[0] * response - operator @ u0)

    def step(carry, load):
        previous, current = carry
        following = 2 * current - previous + (load * response - operator @ current)
        return (current, following), following

    _, rest = jax.lax.scan(step, (u0, u1), load_series[1:-1])
    return jnp.concatenate([u0[None], u1[None], rest])


# ----------------------------------------------------------------------------------
# The inverse problem
# ----------------------------------------------------------------------------------


class WaveProblem(NamedTuple):
    mesh: Mesh
    stiffness: Float[Array, "F F"]
    dt: float
    load_vector: Float[Array, " F"]  # b: the unit point load at the forced node
    load_series: Float[Array, " S+1"]  # f(t_n) = 10 sin(4 pi t_n), n = 0 ... S
    source: int  # index (among the free nodes) of the forced node
    m_true: Float[Array, " E"]
    data: Float[Array, "S+1 F"]  # v: u of the true field at the free nodes
    lambda_max: float  # largest eigenvalue of M(1)^-1 K (the CFL check)
    forward: Callable  # m -> u_0 ... u_S at the free nodes
    a0: Float[Array, " E"]  # the start, a = 1
    loss: Callable  # a -> 0.5 dt sum_n ||u_n(m(a)) - v_n||^2
    error: Callable  # a -> ||m(a) - m_true||^2 / ||m_true||^2


def slowness(a):
    """The modelled field ``m = |a| + 1e-2``: positive for every a."""
    return jnp.abs(a) + M_FLOOR


def relative_error(m, m_true):
    """``||m - m_true||^2 / ||m_true||^2`` (element values, all of equal area)."""
    return jnp.sum((m - m_true) ** 2) / jnp.sum(m_true**2)


def make_problem(n: int = 10, steps: int = 300, final_time: float = 1.0) -> WaveProblem:
    """The mesh, the point force, the data of ``m = 1 + 2 y`` and the objective.

    Raises if ``dt`` violates the CFL condition for the smallest slowness the model
    allows (``m = 1e-2``), so every parameter value gives a stable simulation.
    """
    mesh = make_mesh(n)
    stiffness = stiffness_matrix(mesh)
    dt = final_time / steps
    # lambda_max(M(1)^-1 K): the generalised symmetric eigenproblem, via M = L L^T.
    lower = np.linalg.cholesky(np.asarray(mass_matrix(mesh, jnp.ones(len(mesh.elements)))))
    scaled = np.linalg.solve(lower, np.linalg.solve(lower, np.asarray(stiffness)).T)
    lambda_max = float(np.linalg.eigvalsh(scaled)[-1])
    if dt >= 2.0 * np.sqrt(M_FLOOR / lambda_max):
        limit = 2.0 * np.sqrt(M_FLOOR / lambda_max)
        raise ValueError(
            f"dt = {dt:g} violates the CFL condition at m = {M_FLOOR:g} (dt < {limit:g}); "
            "take more time steps"
        )
    # The forced node: midpoint of the free top edge (among the free nodes).
    top_middle = n * (n + 1) + n // 2
    source = int(np.flatnonzero(mesh.free == top_middle)[0])
    t = dt * jnp.arange(steps + 1)
    force = FORCE_AMPLITUDE * jnp.sin(2 * jnp.pi * FORCE_FREQUENCY * t)
    load_vector = jnp.zeros(mesh.free.size).at[source].set(1.0)
    m_true = jnp.asarray(1.0 + 2.0 * centroids(mesh)[:, 1])

    def forward(m):
        return simulate(stiffness, mass_matrix(mesh, m), dt, load_vector, force)

    data = jax.jit(forward)(m_true)

    def loss(a):
        # u_0 = 0 whatever m: the sum starts at n = 1.
        return 0.5 * dt * jnp.sum((forward(slowness(a))[1:] - data[1:]) ** 2)

    def error(a):
        return relative_error(slowness(a), m_true)

    return WaveProblem(
        mesh=mesh,
        stiffness=stiffness,
        dt=dt,
        load_vector=load_vector,
        load_series=force,
        source=source,
        m_true=m_true,
        data=data,
        lambda_max=lambda_max,
        forward=forward,
        a0=jnp.ones(len(mesh.elements)),
        loss=loss,
        error=error,
    )


def cfl_text(problem: WaveProblem) -> str:
    limit = 2.0 / np.sqrt(problem.lambda_max)
    return (
        f"CFL: dt = {problem.dt:.3e}; lambda_max(M(1)^-1 K) = {problem.lambda_max:.1f}, so "
        f"dt must be < 2 sqrt(min m / lambda_max) = {limit:.3e} for m >= 1 (true field, "
        f"start) and {limit * np.sqrt(M_FLOOR):.3e} for m = {M_FLOOR:g} (any a): stable"
    )


# ----------------------------------------------------------------------------------
# Optimisers and runs
# ----------------------------------------------------------------------------------


def make_optimisers(lr: float = LR) -> dict[str, optax.GradientTransformation]:
    """Adam, the authors' lgf_adam (fixed schedule) and the untuned default."""
    return {
        "Adam": optax.adam(lr),
        "LGF-Adam": lgfjax.lgf_adam(
            lr,
            schedule=lgfjax.Fixed(history_size=K, retrain_interval=M),
            fit=lgfjax.Fit(
                poly_order=1,
                include_bias=True,
                rank=None,  # the full space: 201 terms for 21 iterates, the dual STLSQ
                threshold=1e-8,
                alpha=0.0,
            ),
        ),
        "LGF-Adam default": lgfjax.lgf_adam(lr),
    }


class Run(NamedTuple):
    name: str
    params: np.ndarray  # final a
    state: object  # final optimiser state
    evaluations: np.ndarray  # (steps + 1,) true gradients used to reach each iterate
    error: np.ndarray  # (steps + 1,) relative parameter error of each iterate
    values: np.ndarray  # (steps,) loss at each step's start, NaN where not evaluated
    final_loss: float  # loss of the final parameters (evaluated after the run)
    compile_seconds: float  # lowering + XLA compilation
    seconds: float  # the compiled run


def _is_lgf(state) -> bool:
    return isinstance(state, lgfjax.LGFState | lgfjax.VerifiedState)


def run(problem: WaveProblem, opt, steps: int, name: str = "") -> Run:
    """`steps` updates in one compiled scan; records each iterate's parameter error."""
    a0 = problem.a0
    state0 = opt.init(a0)
    lgf = _is_lgf(state0)
    loss = problem.loss
    gated = lgfjax.value_and_grad(loss)

    def body(carry, _):
        a, state = carry
        if lgf:
            # Evaluates the loss and its gradient only when a true step is due (NaN and
            # zeros otherwise); the loss judges the verified schedule's phases.
            value, grads = gated(a, state)
            updates, state = opt.update(grads, state, a, value=value)
            used = lgfjax.gradient_evaluations(state)
        else:
            value, grads = jax.value_and_grad(loss)(a)
            updates, state = opt.update(grads, state, a)
            used = jnp.zeros((), jnp.int32)  # replaced below: one gradient per step
        a = optax.apply_updates(a, updates)
        # Reporting only: the error of the new iterate needs no simulation.
        return (a, state), (problem.error(a), used, value)

    def all_steps(a, state):
        return jax.lax.scan(body, (a, state), None, length=steps)

    start = time.perf_counter()
    compiled = jax.jit(all_steps).lower(a0, state0).compile()
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    (a, state), (errors, used, values) = compiled(a0, state0)
    jax.block_until_ready((a, errors))
    seconds = time.perf_counter() - start
    evaluations = np.arange(steps + 1) if not lgf else np.concatenate([[0], np.asarray(used)])
    return Run(
        name,
        np.asarray(a),
        state,
        evaluations,
        np.concatenate([[float(problem.error(a0))], np.asarray(errors)]),
        np.asarray(values),
        float(jax.jit(loss)(a)),
        compile_seconds,
        seconds,
    )


def evaluations_to_error(r: Run, target: float) -> int | None:
    """True gradients spent before the first iterate with error <= `target` (None: never).

    ```python
    r = Run("", None, None, np.array([0, 1, 1, 2]), np.array([3.0, 2.0, 1.0, 0.5]),
            None, 0.0, 0.0, 0.0)
    assert evaluations_to_error(r, 1.0) == 1 and evaluations_to_error(r, 0.1) is None
    ```
    """
    hit = np.flatnonzero(r.error <= target)
    return None if hit.size == 0 else int(r.evaluations[hit[0]])


def steps_to_error(r: Run, target: float) -> int | None:
    hit = np.flatnonzero(r.error <= target)
    return None if hit.size == 0 else int(hit[0])


def error_after(r: Run, evaluations: int) -> float:
    """Error of the last iterate reached with at most `evaluations` true gradients."""
    return float(r.error[np.searchsorted(r.evaluations, evaluations, side="right") - 1])


def evaluations_to_loss(r: Run, target: float) -> int | None:
    """True gradients spent before a point of loss <= `target` (None: never).

    The loss is known where a gradient was taken (the j-th evaluated loss is that of a
    point reached with j gradients) and at the final parameters (all gradients).
    """
    evaluated = r.values[np.isfinite(r.values)]
    hit = np.flatnonzero(evaluated <= target)
    if hit.size:
        return int(hit[0])
    return int(r.evaluations[-1]) if r.final_loss <= target else None


def compare(
    problem: WaveProblem | None = None, steps: int = STEPS, lgf_steps: int | None = None
) -> dict[str, Run]:
    """Adam for `steps`, both LGF-Adams for `lgf_steps` (default 2x), from a = 1."""
    problem = make_problem() if problem is None else problem
    lgf_steps = LGF_STEP_FACTOR * steps if lgf_steps is None else lgf_steps
    return {
        name: run(problem, opt, steps if name == "Adam" else lgf_steps, name)
        for name, opt in make_optimisers().items()
    }


def summary(runs: dict[str, Run]) -> dict:
    """Adam's final error as the target, and per run what it took to reach it."""
    adam = runs["Adam"]
    target = float(adam.error[-1])
    out = {"target": target, "adam_final_loss": adam.final_loss}
    fewest = min(int(r.evaluations[-1]) for r in runs.values())
    out["equal_evaluations"] = fewest
    out["adam_steps"] = adam.error.size - 1
    for name, r in runs.items():
        to = evaluations_to_error(r, target)
        out[name] = dict(
            evaluations=int(r.evaluations[-1]),
            steps=r.error.size - 1,
            final_error=float(r.error[-1]),
            error_at_equal=error_after(r, fewest),
            error_at_adam_steps=float(r.error[min(out["adam_steps"], r.error.size - 1)]),
            to_target=to,
            steps_to_target=steps_to_error(r, target),
            ratio=None if to is None else to / evaluations_to_error(adam, target),
            to_adam_loss=evaluations_to_loss(r, adam.final_loss),
        )
    lgf = [n for n in runs if n != "Adam" and out[n]["ratio"] is not None]
    out["best"] = min(lgf, key=lambda n: out[n]["ratio"]) if lgf else None
    return out


def table(runs: dict[str, Run], s: dict) -> str:
    def cell(v, fmt="{:.4g}"):
        return "never" if v is None else (fmt.format(v) if isinstance(v, float) else str(v))

    columns = {}
    for name, r in runs.items():
        x = s[name]
        lgf = name != "Adam"
        info = lgfjax.diagnostics(r.state) if lgf else None
        phases = "-"
        if lgf and isinstance(r.state, lgfjax.VerifiedState):
            phases = f"{int(r.state.info.verified)} / {int(r.state.info.verifications)}"
        columns[name] = [
            x["evaluations"],
            x["steps"],
            cell(x["final_error"], "{:.4e}"),
            cell(x["error_at_equal"], "{:.4e}"),
            cell(x["error_at_adam_steps"], "{:.4e}"),
            cell(x["to_target"]),
            cell(x["steps_to_target"]),
            cell(x["ratio"], "{:.3f}"),
            cell(r.final_loss, "{:.3e}"),
            cell(x["to_adam_loss"]),
            int(info.fallbacks) if lgf else "-",
            phases,
            f"{r.seconds:.2f}",
            f"{r.seconds + r.compile_seconds:.2f}",
        ]
    rows = [
        "true gradient evaluations",
        "steps",
        "final error ||m - m_true||^2 / ||m_true||^2",
        f"error after {s['equal_evaluations']} true gradients",
        f"error after {s['adam_steps']} steps",
        "true gradients to Adam's final error",
        "steps to Adam's final error",
        "  ratio to Adam's gradients",
        "final loss",
        "true gradients to Adam's final loss",
        "fallbacks",
        "phases confirmed / judged (verified)",
        "wall time, run only [s]",
        "wall time with compile [s]",
    ]
    return print_table(columns, rows)


def plot(problem: WaveProblem, runs: dict[str, Run], s: dict, outdir: str | None = None):
    fig, axes = new_figure(2)
    plot_convergence(
        axes[0],
        {n: (r.evaluations, r.error) for n, r in runs.items()},
        xlabel="true gradient evaluations",
        ylabel="||m - m_true||^2 / ||m_true||^2",
        threshold=s["target"],
    )
    axes[0].set_title("wave inverse problem: error against true gradients")
    plot_convergence(
        axes[1],
        {n: (np.arange(r.error.size), r.error) for n, r in runs.items()},
        xlabel="steps",
        ylabel="||m - m_true||^2 / ||m_true||^2",
        threshold=s["target"],
    )
    axes[1].set_title("... against steps")
    paths = [save_figure(fig, "wave_inverse_convergence.png", outdir)]

    fields = {"true m = 1 + 2y": np.asarray(problem.m_true)}
    fields |= {f"{n} ({r.evaluations[-1]} gradients)": slowness(r.params) for n, r in runs.items()}
    fig, axes = new_figure(len(fields), width=3.6, height=3.4)
    nodes, elements = problem.mesh.nodes, problem.mesh.elements
    lo, hi = float(np.min(problem.m_true)), float(np.max(problem.m_true))
    for ax, (title, m) in zip(axes, fields.items(), strict=True):
        image = ax.tripcolor(
            nodes[:, 0], nodes[:, 1], elements, facecolors=np.asarray(m), vmin=lo, vmax=hi
        )
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    # An inset colour bar: taking space from the last panel would shrink its field.
    fig.colorbar(image, cax=axes[-1].inset_axes([1.04, 0.0, 0.05, 1.0]), label="slowness m")
    paths.append(save_figure(fig, "wave_inverse_fields.png", outdir))
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help=f"Adam's steps ({STEPS})")
    parser.add_argument("--grid", type=int, default=10, help="squares per side (10: 200 P1)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} Adam steps")
    parser.add_argument("--outdir", default=None, help="default examples/outputs/")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--lgf-factor",
        type=int,
        default=LGF_STEP_FACTOR,
        help=f"the LGF runs' steps as a multiple of Adam's ({LGF_STEP_FACTOR})",
    )
    args = parser.parse_args(argv)
    if args.lgf_factor < 1:
        parser.error(f"--lgf-factor must be at least 1, got {args.lgf_factor}")
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    problem = make_problem(args.grid)
    print(
        f"Wave inverse problem: {len(problem.mesh.elements)} P1 elements, "
        f"{problem.mesh.free.size} free nodes, consistent mass, central "
        f"differences, T = 1 in {problem.load_series.size - 1} steps; Adam lr {LR:g} for "
        f"{steps} steps, "
        f"LGF-Adam (K = {K}, M = {M}, linear + bias, full space, threshold 1e-8, "
        f"alpha 0) and LGF-Adam default for up to {args.lgf_factor * steps} steps"
    )
    print(cfl_text(problem))
    runs = compare(problem, steps, args.lgf_factor * steps)
    s = summary(runs)
    print(f"target: Adam's final error {s['target']:.4e} (times on a shared machine)")
    table(runs, s)
    if not args.no_plot:
        for path in plot(problem, runs, s, args.outdir):
            print(f"plot: {path}")
    best = s["best"]
    ratio = "never reached" if best is None else f"{s[best]['ratio']:.3f}"
    print(f"wave_inverse: evaluations to Adam's final error, lgf_adam / adam = {ratio}")
    return runs, s


if __name__ == "__main__":
    main()
