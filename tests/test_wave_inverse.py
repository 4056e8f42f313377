"""The wave inverse example: the solver against a standing mode, energy, the gradient
against finite differences, and the quick run (LGF-Adam reaches Adam's final error with
fewer true gradients)."""

import contextlib
import io
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lgfjax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
import wave_inverse as wi  # noqa: E402

from .problems import perturb  # noqa: E402

EPS64 = 2.0**-52
STEPS, T = 300, 1.0  # the example's time grid
DT = T / STEPS


def generalised_eigen(stiffness, mass):
    """Eigenvalues (ascending) and M-orthonormal eigenvectors of ``K v = lambda M v``."""
    lower = np.linalg.cholesky(np.asarray(mass))
    c = np.linalg.solve(lower, np.linalg.solve(lower, np.asarray(stiffness)).T)
    lam, y = np.linalg.eigh(0.5 * (c + c.T))
    return lam, np.linalg.solve(lower.T, y)


def rounding_per_step(mass, lam_min):
    """Bound on the relative error one time step adds, in units of the solution's size.

    A step rounds u_{n+1} = 2 u_n - u_{n-1} + dt^2 (f w - A u_n) (three terms, |dt^2 A|
    <= 4 by the CFL condition) and uses A = M^-1 K from a Cholesky solve, accurate to
    kappa(M) eps: about (4 + 4 kappa(M)) eps |u|. An error delta in one step is a kick
    delta / dt to the velocity, which the undamped scheme carries as an oscillation of
    amplitude delta / (dt omega) <= delta / (dt sqrt(lambda_min)).
    """
    kappa = float(np.linalg.cond(np.asarray(mass)))
    return (4 + 4 * kappa) * EPS64 * (1 + 1 / (DT * np.sqrt(lam_min)))


@pytest.mark.numerics
def test_mesh_and_assembly():
    mesh = wi.make_mesh(10)
    assert mesh.nodes.shape == (121, 2) and mesh.elements.shape == (200, 3)
    # Free: 9 x 9 interior nodes and the 9 top nodes between the clamped corners.
    assert mesh.free.size == 90
    area, _ = wi.element_geometry(mesh)
    # Every element is counter-clockwise with area h^2 / 2 = 0.005. Coordinates up to 1
    # are rounded to eps64, so their differences (0.1) carry 10 eps64 relative and the 2 x 2
    # determinant twice that, plus its own roundings: <= 24 eps64, bound 32.
    np.testing.assert_allclose(area, 0.005, rtol=32 * EPS64)
    # The Laplacian kills constants, so the full stiffness rows sum to zero, and the mass
    # integrates m: 1^T M(m) 1 = sum m_e |e| on the whole mesh (every node free here).
    everything = mesh._replace(free=np.arange(121))
    k = wi.stiffness_matrix(everything)
    m = perturb(jnp.asarray(wi.centroids(mesh)[:, 0] + 1.0))
    full_mass = wi.mass_matrix(everything, m)
    # A row is the 5-point stencil (4 on the diagonal, -1 or -1/2 off it), each entry a sum
    # of <= 6 element terms of size <= 1, and the hat gradients sum to zero to ~eps64 per
    # element: a row sum is ~(7 entries x 4 + 6) eps64 <= 34 eps64, bound 64 (measured 4).
    # The total mass is a sum of 1,800 positive terms: <= 1,800 eps64 relative.
    np.testing.assert_allclose(k.sum(axis=1), 0.0, atol=64 * EPS64)
    np.testing.assert_allclose(full_mass.sum(), jnp.sum(m * area), rtol=2000 * EPS64)
    # Symmetric exactly (each entry is assembled from the same symmetric element terms
    # in the same order).
    np.testing.assert_array_equal(k, k.T)
    np.testing.assert_array_equal(full_mass, full_mass.T)


@pytest.mark.numerics
@pytest.mark.parametrize("n", [10, 20])
def test_standing_mode(n):
    """Constant m0: the mode sin(pi x) sin(pi y / 2) (clamped left, right and bottom, free
    top) oscillates as cos(omega t) with omega^2 = (pi^2 + pi^2 / 4) / m0."""
    mesh = wi.make_mesh(n)
    m0 = float(perturb(jnp.asarray(2.0)))
    stiffness = wi.stiffness_matrix(mesh)
    mass = wi.mass_matrix(mesh, jnp.full(len(mesh.elements), m0))
    lam, vecs = generalised_eigen(stiffness, mass)
    x, y = mesh.nodes[mesh.free].T
    mode = np.sin(np.pi * x) * np.sin(0.5 * np.pi * y)  # its P1 interpolant I phi
    omega = np.sqrt((np.pi**2 + 0.25 * np.pi**2) / m0)
    zeros = jnp.zeros(mesh.free.size)
    u = np.asarray(
        jax.jit(wi.simulate, static_argnums=2)(
            stiffness, mass, DT, zeros, jnp.zeros(STEPS + 1), jnp.asarray(mode)
        )
    )
    mass_np = np.asarray(mass)
    norm = np.sqrt(mode @ mass_np @ mode)
    # The scheme's known error. Conforming P1 (consistent mass, exact integrals):
    # min-max gives lambda_h1 >= omega^2 and the Rayleigh quotient R of I phi bounds it
    # from above; central differences give omega_h = (2 / dt) arcsin(dt sqrt(lambda_h1)
    # / 2) in [sqrt(lambda_h1), sqrt(lambda_h1) / sqrt(1 - dt^2 lambda_h1 / 4)].
    rayleigh = (mode @ np.asarray(stiffness) @ mode) / norm**2
    eig_slack = 10 * mesh.free.size * EPS64 * lam[-1]  # eigh is backward stable
    assert omega**2 - eig_slack <= lam[0] <= rayleigh + eig_slack
    omega_hi = np.sqrt(rayleigh / (1 - DT**2 * rayleigh / 4))
    # Rayleigh's quotient is within O(h^2) of omega^2: for any v vanishing on the clamped
    # edges, R(v) - omega^2 <= |phi - v|_1^2 / |v|_M^2, and P1 interpolation on right
    # isosceles triangles with legs h has |phi - I phi|_1 <= C h |phi|_2 with C = 0.4889
    # (Liu and Kikuchi 2010; 0.5 used); here |phi|_2^2 = (pi^2 + pi^2 / 4)^2 / 4.
    xi2 = np.pi**2 + 0.25 * np.pi**2
    assert rayleigh - omega**2 <= (0.5 / n) ** 2 * xi2**2 / 4 / norm**2 + eig_slack
    # The fundamental's share of I phi, and what is left (M-orthogonal), by Rayleigh:
    # |r|_M^2 <= (R - lambda_1) / (lambda_2 - lambda_1) |I phi|_M^2.
    first = vecs[:, 0] * np.sign(vecs[:, 0] @ mass_np @ mode)
    coeff = (u @ mass_np @ first) / norm  # c_n / |I phi|_M = a cos(omega_h t_n) exactly
    rho = (rayleigh - lam[0]) / (lam[1] - lam[0])
    per_step = rounding_per_step(mass, lam[0])
    rounding = STEPS * per_step  # linear accumulation over the steps
    # Frequency: c_{n+1} + c_{n-1} = 2 cos(omega_h dt) c_n, fitted by least squares. Its
    # residuals are the local rounding (per_step), divided by sin(omega_h dt) dt ~ (omega
    # dt)^2 in the arccos.
    gamma = np.sum((coeff[2:] + coeff[:-2]) * coeff[1:-1]) / (2 * np.sum(coeff[1:-1] ** 2))
    omega_measured = np.arccos(gamma) / DT
    freq_slack = 10 * per_step / (omega * DT) ** 2
    assert omega * (1 - freq_slack) <= omega_measured <= omega_hi * (1 + freq_slack)
    # ... and it is exactly the leapfrog frequency of the first discrete mode.
    omega_h = 2 / DT * np.arcsin(DT * np.sqrt(lam[0]) / 2)
    assert abs(omega_measured / omega_h - 1) <= freq_slack + eig_slack / lam[0]
    # Amplitude: no numerical damping or growth (the discrete invariant of the fundamental,
    # c_n^2 + ((c_{n+1} - c_{n-1}) / (2 sin(omega_h dt)))^2, stays at c_0^2), and c_0 is
    # within Rayleigh's bound of |I phi|_M = 1.
    s = np.sin(omega_measured * DT)
    amplitude = np.sqrt(coeff[1:-1] ** 2 + ((coeff[2:] - coeff[:-2]) / (2 * s)) ** 2)
    np.testing.assert_allclose(amplitude, coeff[0], rtol=rounding + freq_slack)
    assert np.sqrt(1 - rho) - rounding <= coeff[0] <= 1 + rounding
    # The whole field against the analytic solution cos(omega t) I phi, in the M-norm:
    # phase drift t |omega_h - omega| of the fundamental plus twice the remainder r.
    t = DT * np.arange(STEPS + 1)
    error = u - np.cos(omega * t)[:, None] * mode
    error_norm = np.sqrt(np.einsum("ti,ij,tj->t", error, mass_np, error)) / norm
    bound = t * (omega_hi - omega) + 2 * np.sqrt(rho) + rounding
    assert np.all(error_norm <= bound)


@pytest.mark.numerics
def test_energy_conservation():
    """Undamped and unforced, with the true (variable) slowness and random data."""
    mesh = wi.make_mesh(10)
    m = perturb(jnp.asarray(1.0 + 2.0 * wi.centroids(mesh)[:, 1]))
    stiffness = wi.stiffness_matrix(mesh)
    mass = wi.mass_matrix(mesh, m)
    rng = np.random.default_rng(0)
    u0 = perturb(jnp.asarray(rng.normal(size=mesh.free.size)))
    v0 = perturb(jnp.asarray(10.0 * rng.normal(size=mesh.free.size)))
    zeros = jnp.zeros(mesh.free.size)
    u = np.asarray(
        jax.jit(wi.simulate, static_argnums=2)(
            stiffness, mass, DT, zeros, jnp.zeros(STEPS + 1), u0, v0
        )
    )
    k, mm = np.asarray(stiffness), np.asarray(mass)
    lam = generalised_eigen(stiffness, mass)[0]
    # Central differences conserve E_{n+1/2} = 1/2 |w|_M^2 + 1/2 u_{n+1}^T K u_n with
    # w = (u_{n+1} - u_n) / dt exactly (multiply the scheme by u_{n+1} - u_{n-1}).
    w = np.diff(u, axis=0) / DT
    staggered = 0.5 * np.einsum("ti,ij,tj->t", w, mm, w)
    staggered += 0.5 * np.einsum("ti,ij,tj->t", u[1:], k, u[:-1])
    # Rounding: each step's error (rounding_per_step, relative to |u|) changes the energy
    # by ~2 |M w| delta / dt, relatively <= 2 x that / sqrt(1 - dt^2 lambda_max / 4).
    # Linear in the steps; kappa(M)^(1/2) converts between the Euclidean and M-norms.
    kappa = float(np.linalg.cond(mm))
    drift = 2 * STEPS * rounding_per_step(mass, lam[0]) * np.sqrt(kappa)
    drift /= np.sqrt(1 - DT**2 * lam[-1] / 4)
    np.testing.assert_allclose(staggered, staggered[0], rtol=drift)
    # The usual energy 1/2 |v_n|_M^2 + 1/2 u_n^T K u_n (v_n centred) is not conserved: in
    # every discrete mode it oscillates between E_{n+1/2} and E_{n+1/2} / cos^2(omega_h
    # dt / 2), so E_{n+1/2} <= E_n <= E_{n+1/2} / (1 - dt^2 lambda_max / 4).
    v = (u[2:] - u[:-2]) / (2 * DT)
    centred = 0.5 * np.einsum("ti,ij,tj->t", v, mm, v)
    centred += 0.5 * np.einsum("ti,ij,tj->t", u[1:-1], k, u[1:-1])
    e = staggered[0]
    assert np.all(centred >= e * (1 - drift))
    assert np.all(centred <= e / (1 - DT**2 * lam[-1] / 4) * (1 + drift))
    # Not vacuous: the random data fill the high modes (dt^2 lambda / 4 up to 5e-3), so
    # the centred energy really oscillates, far above rounding.
    assert np.ptp(centred) > 100 * drift * e


@pytest.mark.numerics
def test_gradient_matches_finite_differences():
    problem = wi.make_problem()
    rng = np.random.default_rng(1)
    # A point between the start and the truth, away from the kink of |a| at 0.
    a = perturb(jnp.asarray(1.0 + 0.5 * rng.uniform(size=200)))
    d = jnp.asarray(rng.normal(size=200))
    d = d / jnp.abs(d).max()
    loss = jax.jit(problem.loss)
    ad = float(jnp.vdot(jax.jit(jax.grad(problem.loss))(a), d))

    def central(h):
        return float((loss(a + h * d) - loss(a - h * d)) / (2 * h))

    h = 4e-3  # large enough that the rounding bound (below) stays near 1e-5 of |g . d|
    coarse, fine = central(h), central(h / 2)
    # Central differences err by c h^2 + O(h^4): the fine one's error is (coarse - fine) / 3
    # (Richardson); 2x that covers the O(h^4) term. Rounding: the loss is accurate to
    # STEPS x rounding_per_step relative (each step's error carried to the end), which
    # the difference quotient divides by h.
    mass = wi.mass_matrix(problem.mesh, wi.slowness(a))
    lam_min = generalised_eigen(problem.stiffness, mass)[0][0]
    rounding = STEPS * rounding_per_step(mass, lam_min) * float(loss(a)) / (h / 2)
    tol = 2 * abs(coarse - fine) / 3 + 2 * rounding
    assert abs(fine - ad) <= tol
    # Sharp enough to catch a wrong gradient: the bound is a tiny fraction of |g . d|.
    assert tol < 1e-4 * abs(ad)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    # The script's quick run; under --perturb the start moves by 4 ulps.
    make_problem = wi.make_problem

    def perturbed(*args, **kwargs):
        problem = make_problem(*args, **kwargs)
        return problem._replace(a0=perturb(problem.a0))

    wi.make_problem = perturbed
    outdir = tmp_path_factory.mktemp("wave")
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            runs, summary = wi.main(["--quick", "--outdir", str(outdir)])
    finally:
        wi.make_problem = make_problem
    return runs, summary, outdir, printed.getvalue()


@pytest.mark.numerics
def test_quick_run_lgf_needs_fewer_gradients(quick):
    runs, s, _, _ = quick
    adam, lgf = runs["Adam"], runs["LGF-Adam"]
    steps = wi.QUICK_STEPS
    assert adam.evaluations[-1] == steps and lgf.error.size == wi.LGF_STEP_FACTOR * steps + 1
    # Exact: with no fallback the fixed schedule takes K true steps in every cycle of M.
    # No guard fires (measured, also under --perturb): the full-space fit keeps terms
    # (gradients of 1e-3 and more against the 1e-8 threshold) and its flow stays finite.
    assert int(lgfjax.diagnostics(lgf.state).fallbacks) == 0
    cycles = (lgf.error.size - 1) // wi.M
    assert lgf.evaluations[-1] == cycles * wi.K
    # The claim: the same final error as Adam's with fewer true gradients. Measured 216
    # against 400 (and 400 steps' error within 6 % of Adam's); --perturb moves the errors
    # ~1e-12 relative, and one more cycle would still leave LGF 160 gradients ahead.
    assert s["target"] == adam.error[-1]
    assert s["LGF-Adam"]["to_target"] is not None
    assert s["LGF-Adam"]["to_target"] < s["Adam"]["to_target"] == steps
    # Progress, not rounding: Adam's error falls from 0.30 to 7e-3 (bound: 10x).
    assert adam.error[-1] < 0.1 * adam.error[0]


def test_quick_run_prints_and_plots(quick):
    runs, s, outdir, printed = quick
    last = printed.strip().splitlines()[-1]
    ratio = s[s["best"]]["ratio"]  # the better of the two LGF-Adams
    assert last == f"wave_inverse: evaluations to Adam's final error, lgf_adam / adam = {ratio:.3f}"
    assert set(runs) == {"Adam", "LGF-Adam", "LGF-Adam default"}
    for name in ("wave_inverse_convergence.png", "wave_inverse_fields.png"):
        assert (outdir / name).stat().st_size > 0
    # Every run counts its gradients monotonically from 0, one per step at most.
    for r in runs.values():
        steps = np.diff(r.evaluations)
        assert r.evaluations[0] == 0 and np.all((steps == 0) | (steps == 1))
        assert np.all(np.isfinite(r.error))


def test_lgf_factor_sets_the_lgf_runs_length(monkeypatch):
    class Stop(Exception):
        pass

    def capture(problem, steps, lgf_steps):
        raise Stop(steps, lgf_steps)

    monkeypatch.setattr(wi, "compare", capture)
    with pytest.raises(Stop) as stopped:
        wi.main(["--steps", "40", "--lgf-factor", "3", "--no-plot"])
    assert stopped.value.args == (40, 120)
    with pytest.raises(SystemExit):
        wi.main(["--lgf-factor", "0"])
