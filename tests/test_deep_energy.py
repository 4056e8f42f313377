"""The deep energy example on a tiny grid: shapes, physics, counts, progress."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from .problems import perturb

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "deep_energy.py")
_spec = importlib.util.spec_from_file_location("deep_energy", _PATH)
de = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(de)


def test_model_and_energy():
    params, static = de.make_model()
    assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)) == 560
    # Constants computed from E = 1, nu = 0.25: a few roundings, within isclose's 1e-5.
    assert np.isclose(de.LAME, 0.4) and np.isclose(de.SHEAR, 0.4)
    points, weight = de.grid(4)
    # (1 / 4)^3 is a power of two: weight * 64 == 1 exactly.
    assert points.shape == (64, 3) and weight * 64 == 1.0
    # Clamped face: u = z NN(x) = 0 * (finite) at z = 0, exactly, whatever the network.
    on_face = jnp.array([0.3, 0.7, 0.0])
    u = jax.jit(de.displacement, static_argnums=1)(params, static, on_face)
    np.testing.assert_array_equal(u, 0.0)
    # Zero weights: u = 0, so the energy density and the loss are zero (exactly: tanh(0)
    # = 0 and every product has a zero factor).
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    assert float(jax.jit(de.make_loss(static, points, weight))(zero)) == 0.0
    # The body force is a torsion about the cube's axis: no net force. Exactly: the
    # midpoints are dyadic (x - 0.5 in {+-1/8, +-3/8}, times 10 still exact), so the
    # terms and all their partial sums are representable, in any summation order.
    np.testing.assert_array_equal(jnp.sum(jax.vmap(de.body_force)(points), axis=0), 0.0)


@pytest.fixture(scope="module")
def tiny():
    # compare() builds the network itself: under --perturb its weights move by 4 ulps.
    make_model = de.make_model
    de.make_model = lambda key=None: (lambda ps: (perturb(ps[0]), ps[1]))(make_model(key))
    try:
        return de.compare(steps=150, n=6)
    finally:
        de.make_model = make_model


@pytest.mark.numerics
def test_tiny_run(tiny, tmp_path):
    a, b = tiny["Adam"], tiny["LGF-Adam"]
    assert a["evaluations"] == 150
    # Three cycles of K = 35 true steps and 15 surrogate steps in 150 updates. Exact: no
    # guard fires, the surrogate steps stay below 0.15 of the trust-region bound
    # (measured per cycle: 0.12, 0.11, 0.15; a 6x margin) and the POD fit keeps its terms.
    assert b["evaluations"] == 3 * de.K
    assert np.sum(np.isfinite(b["values"])) == b["evaluations"]
    assert np.sum(np.isfinite(a["values"])) == 150
    # Progress, not rounding: the loss goes from -0.08 to -5.6 (Adam) and -5.0 (LGF), and
    # the fields differ by 0.14 relative (bound 0.5); --perturb moves them ~1e-12.
    for r in (a, b):
        seen = r["values"][np.isfinite(r["values"])]
        assert np.isfinite(r["final_loss"]) and r["final_loss"] < seen[0] < 0.1
    assert int(b["state"].info.fallbacks) == 0 and int(b["state"].info.accepted) == 3 * (
        de.M - de.K
    )
    assert np.isfinite(tiny["relative_error"]) and tiny["relative_error"] < 0.5
    assert b["to_target"] is not None and a["to_target"] is not None
    text = de.table(tiny)
    assert "evaluation ratio" in text and str(b["evaluations"]) in text
    de.plot(tiny, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_evaluations_to_reach():
    values = np.array([3.0, np.nan, 2.0, np.nan, 1.0])
    assert de.evaluations_to_reach(values, 0.5, 3, 2.5) == 1
    assert de.evaluations_to_reach(values, 0.5, 3, 1.0) == 2
    assert de.evaluations_to_reach(values, 0.5, 3, 0.7) == 3  # the final point
    assert de.evaluations_to_reach(values, 0.9, 3, 0.7) is None
