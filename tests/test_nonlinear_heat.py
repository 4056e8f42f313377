import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lgfjax

from .problems import perturb

EPS64 = 2.0**-52

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "nonlinear_heat_newton.py"
_spec = importlib.util.spec_from_file_location("nonlinear_heat_newton", _PATH)
heat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(heat)

STEPS, K, M = 60, 15, 20


def _perturbed(problem):
    # Under --perturb the example's start moves by 4 ulps.
    return problem._replace(a0=perturb(problem.a0))


@pytest.fixture(scope="module")
def problem():
    return _perturbed(heat.make_problem(modes=4, grid=16))


@pytest.fixture(scope="module")
def runs(problem):
    return heat.run_newton(problem, STEPS), heat.run_lgf(problem, STEPS)


def test_energy_quadrature():
    # One mode a_11: the source's y-factor int sin(3 pi y) sin(pi y) dy is 0 and the
    # midpoint rule keeps it 0 (even frequencies only), so z = int kappa |grad u|^4,
    # whose kappa = 20 part on the central square is integrated to second order.
    a = jnp.full((1, 1), 0.7)

    def z(grid):
        return float(heat.make_problem(modes=1, grid=grid, sigma=0.0).energy(a))

    exact = z(960)
    assert exact > 0.0
    # Second-order convergence: measured 4.02. The differences (0.19, 0.047) are
    # quadrature errors, far above rounding; the reference's own error (~1e-4) moves the
    # ratio by < 1%.
    ratio = (z(20) - exact) / (z(40) - exact)
    assert 3.5 < ratio < 4.5
    # With kappa = 1 everywhere the integrand is a trigonometric polynomial, which the
    # midpoint rule integrates exactly: int (cx^2 sy^2 + sx^2 cy^2)^2 = 9/64 + 2/64 +
    # 9/64, so z = 5/16 c^4 pi^4 already on an 8 x 8 grid.
    # Exact up to rounding, which is dominated by the source term: its 64 terms cancel to
    # 0 by symmetry, but they are ~1e7 in size (sum |source u| / 64 = 6.5e5), so a 64-term
    # sum leaves up to 64 eps64 6.5e5 = 9e-9, 1.3e-9 of z = 7.3 (measured 7e-13; a rel of
    # 1e-12 held by luck of the summation order). A wrong rule is off by O(h^2) ~ 1e-2.
    uniform = heat.make_problem(modes=1, grid=8, sigma=0.0, kappa_centre=1.0)
    assert float(uniform.energy(a)) == pytest.approx(5 / 16 * 0.7**4 * np.pi**4, rel=2e-9)


@pytest.mark.numerics
def test_scaling_leaves_newton_unchanged(problem):
    scaled = _perturbed(heat.make_problem(modes=4, grid=16, scale=10.0))
    a = heat.run_newton(problem, 10).params
    b = heat.run_newton(scaled, 10).params
    # Equal in exact arithmetic (Newton is affine invariant). Each direction is a solve
    # with the Hessian (condition ~300 at the start, less later), off by ~kappa eps64
    # relative; 10 steps add at most 10 of those, margin 10x (measured 5e-15 normwise).
    # A scaling bug changes the iterates by O(1).
    n = a.size
    kappa = float(np.linalg.cond(np.reshape(jax.hessian(problem.energy)(problem.a0), (n, n))))
    tol = 10 * 10 * kappa * EPS64
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.max(np.abs(a)))


@pytest.mark.numerics
def test_newton_and_lgf_converge(runs):
    # Convergence, not rounding (each moved < 1e-9 relative by --perturb): measured
    # residual ratios 1.6e-4 and 1.9e-4, LGF-Newton distance 7e-5, residual ratio 1.17.
    newton_run, lgf_run = runs
    for run in runs:
        assert np.all(np.isfinite(run.residual)) and np.all(np.isfinite(run.params))
        assert run.residual[-1] < 1e-3 * run.residual[0]
        assert run.energy[-1] < run.energy[0]
    rel = np.linalg.norm(lgf_run.params - newton_run.params) / np.linalg.norm(newton_run.params)
    assert rel < 1e-3
    # The learned steps must still make progress during each surrogate phase.
    assert lgf_run.residual[-1] < 10 * newton_run.residual[-1]


@pytest.mark.numerics
def test_evaluation_counts(runs):
    # Counts rounding cannot break: every update is accounted for, and the schedule's
    # true steps. Which cycles fall back rests on the trust region: measured, the first
    # cycle does (status 6, its learned flow is poor far from the solution) and the
    # other two keep their surrogate steps below 0.29 of the bound, a 3.5x margin.
    newton_run, lgf_run = runs
    assert newton_run.evaluations[-1] == STEPS
    d = lgfjax.diagnostics(lgf_run.state)
    evals = int(lgfjax.gradient_evaluations(lgf_run.state))
    # Every update is either a true step or a (kept or refused) surrogate step.
    assert evals + int(d.accepted) + int(d.rejected) == STEPS
    assert K * STEPS // M <= evals < STEPS
    # The first K updates of each cycle of M are true steps; the rest are surrogate
    # steps (no evaluation) unless that cycle fell back to true steps.
    increments = np.diff(lgf_run.evaluations).reshape(STEPS // M, M)
    fell_back = np.diff(lgf_run.fallbacks[::M]) > 0
    assert np.all(increments[:, :K] == 1)
    assert np.all(increments[~fell_back, K:] == 0)
    assert np.sum(~fell_back) >= 1


def test_evaluations_to_reach(runs):
    newton_run, lgf_run = runs
    target = 1e-2 * newton_run.residual[0]
    n_newton = heat.evaluations_to_reach(newton_run, target)
    n_lgf = heat.evaluations_to_reach(lgf_run, target)
    assert n_newton is not None and n_lgf is not None
    assert newton_run.residual[n_newton] <= target < newton_run.residual[n_newton - 1]
    assert heat.evaluations_to_reach(newton_run, 0.0) is None
