"""Issue-level check on the safeguard problem set (reduced sizes of
benchmarks/bench_problems.py): safeguarded LGF reaches gradient descent's target with
no more true gradients than gradient descent, and never emits a non-finite iterate."""

import numpy as np
import optax
import pytest
from problems import (
    evaluations_to_reach,
    logistic_regression,
    mlp_regression,
    oscillatory,
    rosenbrock,
    rotated_quadratic,
    trace,
    trace_base,
)

import lgfjax

CASES = [
    (rotated_quadratic(n=6, condition=1e4, seed=0), 600),
    (rosenbrock(), 600),
    (mlp_regression(), 600),
    (logistic_regression(), 200),
    (oscillatory(), 200),  # the learned flow is known to be poor here
]


@pytest.mark.parametrize("problem, steps", CASES, ids=[c[0].name.split("(")[0] for c in CASES])
def test_safeguarded_lgf_needs_no_more_gradients_than_gradient_descent(problem, steps):
    base = optax.sgd(problem.lr)
    _, base_losses, base_evals = trace_base(base, problem, steps)
    target = float(base_losses[-1]) * (1 + 1e-9)
    base_needs = evaluations_to_reach(base_losses, base_evals, target)
    opt = lgfjax.lgf(base, history_size=20, retrain_interval=60, dt=problem.lr, check_every=10)
    _, state, losses, evals = trace(opt, problem, 3 * steps, value_fn=True)
    assert np.all(np.isfinite(losses))
    needs = evaluations_to_reach(losses, evals, target)
    assert needs is not None and needs <= base_needs, (needs, base_needs)
