"""The topology-optimisation example: finite elements, volume constraint, and LGF
reaching gradient descent's compliance with fewer true gradients."""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import topology_optimization as topo  # noqa: E402


@pytest.mark.parametrize("nu", [0.0, 0.3, 0.45])
def test_element_stiffness(nu):
    ke = topo.element_stiffness(nu)
    assert np.allclose(ke, ke.T)
    # Closed-form diagonal and direct coupling of the unit square Q4 element.
    assert np.isclose(ke[0, 0], (0.5 - nu / 6) / (1 - nu**2))
    assert np.isclose(ke[0, 1], (1 + nu) / 8 / (1 - nu**2))
    # Exactly three rigid-body modes (two translations, one rotation), the rest positive.
    eig = np.linalg.eigvalsh(ke)
    assert np.all(np.abs(eig[:3]) < 1e-12) and np.all(eig[3:] > 1e-3)
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    rotation = np.stack([-xy[:, 1], xy[:, 0]], axis=1).reshape(-1)
    assert np.allclose(ke @ rotation, 0.0, atol=1e-12)


@pytest.fixture(scope="module")
def small():
    return topo.mbb_beam(12, 4)


def test_block_solver_matches_dense(small):
    rho = topo.physical_density(small, jax.random.normal(jax.random.PRNGKey(0), (4, 12)))
    u = jax.jit(functools.partial(topo.displacements, small))(rho)
    k = jax.jit(functools.partial(topo.stiffness_matrix, small))(rho)
    dense = jnp.linalg.solve(k, jnp.asarray(small.force))
    assert jnp.allclose(u[small.free], dense, rtol=1e-10, atol=1e-12 * jnp.abs(dense).max())
    fixed = np.setdiff1d(np.arange(u.size), small.free)
    assert jnp.all(u[fixed] == 0.0)

    def dense_compliance(r):
        return jnp.dot(
            jnp.asarray(small.force),
            jnp.linalg.solve(topo.stiffness_matrix(small, r), jnp.asarray(small.force)),
        )

    g_block = jax.jit(jax.grad(functools.partial(topo.compliance_of_density, small)))(rho)
    g_dense = jax.jit(jax.grad(dense_compliance))(rho)
    assert jnp.allclose(g_block, g_dense, rtol=1e-9, atol=1e-12 * jnp.abs(g_dense).max())
    # Compliance sensitivities of SIMP are never positive.
    assert jnp.all(g_block <= 0.0)


def test_gradient_matches_finite_differences(small):
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 12))
    d = jax.random.normal(jax.random.PRNGKey(2), (4, 12))
    f = jax.jit(functools.partial(topo.objective, small))
    h = 1e-5
    fd = (f(x + h * d) - f(x - h * d)) / (2 * h)
    ad = jnp.vdot(jax.grad(f)(x), d)
    assert jnp.isclose(fd, ad, rtol=1e-6)


@pytest.mark.parametrize("volfrac", [0.4, 0.5])
def test_physical_density_volume(volfrac):
    problem = topo.mbb_beam(12, 4, volfrac=volfrac)
    x = 5.0 * jax.random.normal(jax.random.PRNGKey(3), (4, 12))
    rho = topo.physical_density(problem, x)
    assert jnp.all((rho >= 0.0) & (rho <= 1.0))
    assert jnp.isclose(rho.mean(), volfrac, atol=1e-10)
    # The shift is differentiated implicitly: no perturbation changes the volume.
    jac = jax.jacobian(lambda x: topo.physical_density(problem, x).mean())(x)
    assert jnp.max(jnp.abs(jac)) < 1e-10


@pytest.fixture(scope="module")
def runs():
    problem = topo.mbb_beam(30, 10)
    return problem, *topo.compare(problem, steps=280)


def test_lgf_reaches_gradient_descent_with_fewer_gradients(runs):
    _, base, learned, target = runs
    assert target == pytest.approx(1.01 * base.compliance[-1])
    base_reach = topo.evaluations_to_reach(base, target)
    lgf_reach = topo.evaluations_to_reach(learned, target)
    assert base_reach is not None and lgf_reach is not None
    assert lgf_reach < base_reach
    assert learned.evaluations[-1] < base.evaluations[-1] == 280
    # The optimisation did something: compliance fell far from the uniform design.
    assert base.compliance[-1] < 0.4 * base.compliance[0]
    assert learned.compliance[-1] <= target


def test_final_designs_are_feasible(runs):
    problem, base, learned, _ = runs
    for r in (base, learned):
        assert r.density.shape == (problem.nely, problem.nelx)
        assert np.all(np.isfinite(r.density))
        assert np.all((r.density >= 0.0) & (r.density <= 1.0))
        assert abs(r.density.mean() - problem.volfrac) < 1e-8
        assert np.all(np.isfinite(r.compliance))
        # Far from the uniform grey start (grayness 1); the filter keeps some grey edges.
        assert 4.0 * np.mean(r.density * (1.0 - r.density)) < 0.6
    # Both found the same kind of structure.
    assert np.mean(np.abs(base.density - learned.density)) < 0.1


@pytest.mark.slow
def test_script_quick_runs(tmp_path, capsys):
    topo.main(["--nelx", "12", "--nely", "4", "--steps", "80", "--outdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "LGF (POD)" in out and "gradient descent" in out
    assert (tmp_path / "topology_densities.png").exists()
    assert (tmp_path / "topology_convergence.png").exists()
