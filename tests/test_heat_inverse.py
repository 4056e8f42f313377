"""Smoke test of examples/heat_inverse.py in a reduced configuration (200 steps)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lgfjax

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
    out = {}
    for name, optimiser in hi.make_optimisers().items():
        before = calls[0]
        result = hi.run(objective, optimiser, hi.START, STEPS)
        jax.effects_barrier()
        out[name] = (result, calls[0] - before, hi.misfit_along(problem, result.iterates))
    return out


def test_misfit_is_the_space_time_field_misfit(problem):
    # The modal form e^T M e must equal the quadrature over the (t, x) grid exactly.
    a = jnp.asarray(hi.START)
    n_time, n_space = problem.data.shape
    dt = 2.0 / (n_time - 1)
    field = jax.jit(problem.temperature)(a)
    direct = (1.0 / n_space) * dt * jnp.sum((field - problem.data) ** 2)
    both = problem.batch_misfit(jnp.stack([a, jnp.asarray(hi.TRUE_CONDUCTIVITY)]))
    np.testing.assert_allclose(both[0], direct, rtol=1e-10)
    assert float(both[1]) < 1e-20
    assert float(direct) > 1e-3


@pytest.mark.parametrize("name", ["SGD", "LGF"])
def test_finite_and_decreasing(runs, name):
    result, _, misfits = runs[name]
    assert result.iterates.shape == (STEPS + 1, 2)
    assert np.all(np.isfinite(result.iterates)) and np.all(np.isfinite(misfits))
    assert misfits[-1] < 0.3 * misfits[0]
    # The parameters head for the truth (2, 1) from (0.5, 4.05).
    start_error = np.linalg.norm(np.subtract(hi.START, hi.TRUE_CONDUCTIVITY))
    end_error = np.linalg.norm(result.iterates[-1] - np.asarray(hi.TRUE_CONDUCTIVITY))
    assert end_error < 0.9 * start_error


def test_sgd_evaluates_every_step(runs):
    result, executed, _ = runs["SGD"]
    assert executed == STEPS
    np.testing.assert_array_equal(result.evaluations, np.arange(STEPS + 1))


def test_lgf_uses_k_true_evaluations_per_cycle(runs):
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


def test_lgf_matches_sgd_per_step_and_beats_it_per_evaluation(runs):
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
