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
    # Gradient descent's final loss, to 1e-9 relative: on logistic regression and the
    # rippled bowl GD has stalled at its rounding floor (its last two losses are equal),
    # and LGF's run converges to the same minimiser by another rounding path, landing
    # 2e-13 and 1e-11 relative above GD's value (measured); 1e-9 accepts any such
    # floor (>= 90x margin) and nothing worse than that.
    target = float(base_losses[-1]) * (1 + 1e-9)
    base_needs = evaluations_to_reach(base_losses, base_evals, target)
    opt = lgfjax.lgf(
        base,
        dt=problem.lr,
        schedule=lgfjax.Fixed(history_size=20, retrain_interval=60, check_every=10),
    )
    _, state, losses, evals = trace(opt, problem, 3 * steps, value_fn=True)
    assert np.all(np.isfinite(losses))
    needs = evaluations_to_reach(losses, evals, target)
    # Measured (needs, base_needs): (200, 600), (241, 600), (200, 600), (25, 43), (56, 60);
    # the same under --perturb. A bound, not a count: fallbacks (1 and 9 on two problems)
    # may add true steps on another machine without breaking it unless LGF stops winning.
    assert needs is not None and needs <= base_needs, (needs, base_needs)
