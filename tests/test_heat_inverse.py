"""Smoke test of examples/heat_inverse.py in a reduced configuration (200 steps)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lgfjax

from .problems import perturb

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
import heat_inverse as hi  # noqa: E402

STEPS = 200
K, M = 25, 50  # history_size, retrain_interval of the example's LGF


@pytest.fixture(scope="module")
def problem():
    return hi.make_problem()


@pytest.fixture(scope="module")
def runs(problem):
    """Both methods on a counted objective: name -> (Run, objective executions, misfits)."""
    calls = [0]

    def counter():
        calls[0] += 1

    objective = hi.counted(problem.objective, counter)
    # Under --perturb the example's start moves by 4 ulps.
    start = perturb(jnp.asarray(hi.START, jnp.float64))
    out = {}
    for name, optimiser in hi.make_optimisers().items():
        before = calls[0]
        result = hi.run(objective, optimiser, start, STEPS)
        jax.effects_barrier()
        out[name] = (result, calls[0] - before, hi.misfit_along(problem, result.iterates))
    return out


@pytest.mark.numerics
def test_misfit_is_the_space_time_field_misfit(problem):
    # The modal form e^T M e must equal the quadrature over the (t, x) grid exactly.
    a = jnp.asarray(hi.START)
    n_time, n_space = problem.data.shape
    dt = 2.0 / (n_time - 1)
    field = jax.jit(problem.temperature)(a)
    direct = (1.0 / n_space) * dt * jnp.sum((field - problem.data) ** 2)
    both = problem.batch_misfit(jnp.stack([a, jnp.asarray(hi.TRUE_CONDUCTIVITY)]))
    # Equal in exact arithmetic; in float64 both are sums of nonnegative terms whose
    # differences e (rms 0.12) are not cancellations of the field (|u| <= 0.2), each
    # entry a 30-mode sum: relative error ~30 eps64 ~ 1e-14 (measured 6e-16); 1e-10 is
    # 1e4 above rounding, while a wrong weight (dx, dt, mass) would be off by O(1).
    np.testing.assert_allclose(both[0], direct, rtol=1e-10)
    # At the truth only rounding is left: the modes differ by ~kappa eps64 |theta| with
    # |theta| = 0.15, so the misfit is ~(kappa 3e-17)^2 x 30 modes, below 1e-20 for any
    # kappa of the Euler system up to ~1e3 (measured exactly 0: the same arithmetic).
    assert float(both[1]) < 1e-20
    assert float(direct) > 1e-3


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["SGD", "LGF"])
def test_finite_and_decreasing(runs, name):
    result, _, misfits = runs[name]
    assert result.iterates.shape == (STEPS + 1, 2)
    assert np.all(np.isfinite(result.iterates)) and np.all(np.isfinite(misfits))
    # Progress, not rounding: measured ratios 0.202 (misfit) and 0.81-0.82 (distance to
    # the truth) for both, moved ~1e-15 by --perturb; the bounds keep 1.5x and 10%.
    assert misfits[-1] < 0.3 * misfits[0]
    # The parameters head for the truth (2, 1) from (0.5, 4.05).
    start_error = np.linalg.norm(np.subtract(hi.START, hi.TRUE_CONDUCTIVITY))
    end_error = np.linalg.norm(result.iterates[-1] - np.asarray(hi.TRUE_CONDUCTIVITY))
    assert end_error < 0.9 * start_error


def test_sgd_evaluates_every_step(runs):
    result, executed, _ = runs["SGD"]
    assert executed == STEPS
    np.testing.assert_array_equal(result.evaluations, np.arange(STEPS + 1))


@pytest.mark.numerics
def test_lgf_uses_k_true_evaluations_per_cycle(runs):
    # Exact counts: the schedule takes the first K updates of each cycle as true steps,
    # and no guard fires. The fit keeps 4 terms (velocities ~1e-3, far above the 1e-8
    # threshold) and the longest surrogate step is <= 0.995 of the last true step
    # (measured), a 3x margin inside the trust region (max_step_ratio 3).
    result, executed, _ = runs["LGF"]
    cycles = STEPS // M
    state = result.state
    assert int(lgfjax.gradient_evaluations(state)) == cycles * K
    # The objective really was skipped in surrogate steps, not just not counted.
    assert executed == cycles * K
    # Exactly the first K updates of each cycle consumed a gradient.
    used = np.diff(result.evaluations).reshape(cycles, M)
    np.testing.assert_array_equal(used[:, :K], 1)
    np.testing.assert_array_equal(used[:, K:], 0)
    d = lgfjax.diagnostics(state)
    assert int(d.fallbacks) == 0, lgfjax.status_message(int(d.status))
    assert int(d.accepted) == cycles * (M - K)


@pytest.mark.numerics
def test_lgf_matches_sgd_per_step_and_beats_it_per_evaluation(runs):
    # Measured: lgf[-1] / sgd[-1] = 1.004 and lgf[-1] / sgd[STEPS // 2] = 0.93, both moved
    # ~1e-15 relative by --perturb; the bounds are properties of the learned flow (it
    # tracks GD to within 10%; 100 free steps beat 100 true ones), not of rounding.
    _, _, sgd = runs["SGD"]
    _, _, lgf = runs["LGF"]
    # Same number of steps: comparable misfit (the learned flow tracks GD closely).
    assert lgf[-1] < 1.1 * sgd[-1]
    assert sgd[-1] < 1.1 * lgf[-1]
    # Same number of true gradients (STEPS // 2): LGF is further along.
    assert lgf[-1] < sgd[STEPS // 2]


def test_figure(problem, runs, tmp_path):
    path = hi.plot(
        problem,
        {k: v[0] for k, v in runs.items()},
        {k: v[2] for k, v in runs.items()},
        str(tmp_path),
    )
    assert path == str(tmp_path / "heat_inverse.png") and os.path.getsize(path) > 10_000


@pytest.mark.slow
def test_cli_writes_table_and_figure(tmp_path, capsys):
    # The README's command, shortened: recompiles both runs, hence slow.
    hi.main(["--steps", str(M), "--outdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "true evals to misfit" in out and "LGF" in out
    assert (tmp_path / "heat_inverse.png").stat().st_size > 0
