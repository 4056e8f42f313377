"""Issue-level check on the safeguard problem set (reduced sizes of
benchmarks/bench_problems.py): safeguarded LGF reaches gradient descent's target with
no more true gradients than gradient descent, and never emits a non-finite iterate."""

import numpy as np
import optax
import pytest
from problems import evaluations_to_reach, safeguard_set, trace, trace_base

import lgfjax

# Gradient-descent steps per problem of the shared set (the benchmark's are larger).
CASES = list(zip(safeguard_set(), (600, 600, 600, 200, 200)))


@pytest.mark.numerics
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
