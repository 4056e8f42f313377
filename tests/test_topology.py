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

from .problems import perturb  # noqa: E402

EPS64 = 2.0**-52


@pytest.mark.numerics
@pytest.mark.parametrize("nu", [0.0, 0.3, 0.45])
def test_element_stiffness(nu):
    ke = topo.element_stiffness(nu)
    # Symmetric and equal to the closed forms up to rounding of an 8 x 8 quadrature
    # (measured <= 2e-16); isclose's rtol 1e-5 only has to reject a wrong formula.
    assert np.allclose(ke, ke.T)
    # Closed-form diagonal and direct coupling of the unit square Q4 element.
    assert np.isclose(ke[0, 0], (0.5 - nu / 6) / (1 - nu**2))
    assert np.isclose(ke[0, 1], (1 + nu) / 8 / (1 - nu**2))
    # Exactly three rigid-body modes (two translations, one rotation), the rest positive.
    # eigvalsh is backward stable: the zero eigenvalues come out as ~8 eps64 |ke| ~ 2e-15
    # (|ke| <= 1; measured 3e-16), 1e-12 is 500x that; the smallest nonzero one is ~0.5.
    eig = np.linalg.eigvalsh(ke)
    assert np.all(np.abs(eig[:3]) < 1e-12) and np.all(eig[3:] > 1e-3)
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    rotation = np.stack([-xy[:, 1], xy[:, 0]], axis=1).reshape(-1)
    # Rows of 8 terms of size <= 1 times coordinates <= 1: rounding ~8 eps64 = 2e-15.
    assert np.allclose(ke @ rotation, 0.0, atol=1e-12)


@pytest.fixture(scope="module")
def small():
    return topo.mbb_beam(12, 4)


@pytest.mark.numerics
def test_block_solver_matches_dense(small):
    rho = topo.physical_density(small, jax.random.normal(jax.random.PRNGKey(0), (4, 12)))
    u = jax.jit(functools.partial(topo.displacements, small))(rho)
    k = jax.jit(functools.partial(topo.stiffness_matrix, small))(rho)
    dense = jnp.linalg.solve(k, jnp.asarray(small.force))
    # Two backward-stable solves (block Cholesky, dense LU) of one system agree to
    # ~kappa(K) eps64 of the solution's size (kappa ~2.4e4 here: 5e-12; measured 2.6e-13);
    # margin 100x. A wrong block or a missed coupling is off by O(1).
    tol = 100 * float(np.linalg.cond(k)) * EPS64
    np.testing.assert_allclose(u[small.free], dense, rtol=0, atol=tol * jnp.abs(dense).max())
    fixed = np.setdiff1d(np.arange(u.size), small.free)
    assert jnp.all(u[fixed] == 0.0)

    def dense_compliance(r):
        return jnp.dot(
            jnp.asarray(small.force),
            jnp.linalg.solve(topo.stiffness_matrix(small, r), jnp.asarray(small.force)),
        )

    g_block = jax.jit(jax.grad(functools.partial(topo.compliance_of_density, small)))(rho)
    g_dense = jax.jit(jax.grad(dense_compliance))(rho)
    # The sensitivities -p rho^(p-1) u_e^T k_e u_e inherit the displacements' kappa eps64
    # (measured 5e-13 of the largest); same bound.
    np.testing.assert_allclose(g_block, g_dense, rtol=0, atol=tol * jnp.abs(g_dense).max())
    # Compliance sensitivities of SIMP are never positive (here all <= -1.5: not a sign
    # that rounding could flip).
    assert jnp.all(g_block <= 0.0)


@pytest.mark.numerics
def test_gradient_matches_finite_differences(small):
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 12))
    d = jax.random.normal(jax.random.PRNGKey(2), (4, 12))
    f = jax.jit(functools.partial(topo.objective, small))
    h = 1e-5
    fd = (f(x + h * d) - f(x - h * d)) / (2 * h)
    ad = jnp.vdot(jax.grad(f)(x), d)
    # Central differences: truncation h^2 f''' / 6 (measured 1.5e-8 relative) plus
    # rounding eps64 |f| / h = 2e-16 * 7 / 1e-5 = 1.5e-10 absolute, 8e-10 of |ad| = 0.19;
    # rtol 1e-6 is 60x the truncation, and a wrong adjoint is off by O(1).
    assert jnp.isclose(fd, ad, rtol=1e-6)


@pytest.mark.numerics
@pytest.mark.parametrize("volfrac", [0.4, 0.5])
def test_physical_density_volume(volfrac):
    problem = topo.mbb_beam(12, 4, volfrac=volfrac)
    x = 5.0 * jax.random.normal(jax.random.PRNGKey(3), (4, 12))
    rho = topo.physical_density(problem, x)
    assert jnp.all((rho >= 0.0) & (rho <= 1.0))
    # 80 bisections and a Newton step solve mean(rho) = volfrac to rounding, ~48 eps64
    # (a 48-term mean; measured 0); 1e-10 is 1e4 above that.
    assert jnp.isclose(rho.mean(), volfrac, atol=1e-10)
    # The shift is differentiated implicitly: no perturbation changes the volume. The
    # Jacobian is a cancellation of terms <= 1 / 48: rounding ~eps64 (measured 1e-17).
    jac = jax.jacobian(lambda x: topo.physical_density(problem, x).mean())(x)
    assert jnp.max(jnp.abs(jac)) < 1e-10


@pytest.fixture(scope="module")
def runs():
    problem = topo.mbb_beam(30, 10)
    # The start is zero, which scaling cannot move: under --perturb the filter weights
    # (data) move by 4 ulps instead. (Scaling the force or the stiffness would only
    # shift log(compliance) by a constant.)
    problem = problem._replace(filter_kernel=perturb(jnp.asarray(problem.filter_kernel)))
    return problem, *topo.compare(problem, steps=280)


@pytest.mark.numerics
def test_lgf_reaches_gradient_descent_with_fewer_gradients(runs):
    _, base, learned, target = runs
    # Bitwise: the same product 1.01 * c of the same float64 inputs as compare().
    assert target == 1.01 * float(base.compliance[-1])
    base_reach = topo.evaluations_to_reach(base, target)
    lgf_reach = topo.evaluations_to_reach(learned, target)
    assert base_reach is not None and lgf_reach is not None
    # Measured 87 against 108 evaluations. The crossings clear the target by >= 1.6e-5
    # relative, while --perturb moves the compliances by ~1e-12; even a crossing one step
    # later would leave LGF 20 evaluations ahead.
    assert lgf_reach < base_reach
    assert learned.evaluations[-1] < base.evaluations[-1] == 280
    # The optimisation did something: compliance fell far from the uniform design.
    assert base.compliance[-1] < 0.4 * base.compliance[0]  # measured 0.28
    assert learned.compliance[-1] <= target  # measured 0.990 of the target


@pytest.mark.numerics
def test_final_designs_are_feasible(runs):
    problem, base, learned, _ = runs
    for r in (base, learned):
        assert r.density.shape == (problem.nely, problem.nelx)
        assert np.all(np.isfinite(r.density))
        assert np.all((r.density >= 0.0) & (r.density <= 1.0))
        # The volume is solved to rounding (see test_physical_density_volume; measured
        # 3e-16 on 300 elements, the filter kernel perturbed or not).
        assert abs(r.density.mean() - problem.volfrac) < 1e-8
        assert np.all(np.isfinite(r.compliance))
        # Far from the uniform grey start (grayness 1); the filter keeps some grey edges.
        assert 4.0 * np.mean(r.density * (1.0 - r.density)) < 0.6  # measured 0.51
    # Both found the same kind of structure (measured 0.0017).
    assert np.mean(np.abs(base.density - learned.density)) < 0.1


@pytest.mark.slow
def test_script_quick_runs(tmp_path, capsys):
    topo.main(["--nelx", "12", "--nely", "4", "--steps", "80", "--outdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "LGF (POD)" in out and "gradient descent" in out
    assert (tmp_path / "topology_densities.png").exists()
    assert (tmp_path / "topology_convergence.png").exists()
