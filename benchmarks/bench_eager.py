"""Eager (un-jitted) steps: LGF against optax.sgd on the README's quickstart problem.

Without a user's `jax.jit`, every call of a step runs op by op. lgfjax compiles its
`update` and its gated `value_and_grad` once per optimiser and objective and caches
them, so an eager step after the first costs about what an un-jitted `optax.sgd` step
does (which itself runs `jax.value_and_grad` and the update eagerly). Both loops are
interleaved over `--rounds` and the medians are compared within the run.

    python benchmarks/bench_eager.py [--steps 60] [--rounds 3]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import lgfjax


def loss(params):
    return 0.5 * jnp.sum(jnp.array([1.0, 4.0]) * params**2)


def eager_times(kind: str, steps: int) -> tuple[float, list[float]]:
    """(first step, later steps) in seconds, each step blocked until ready."""
    opt = optax.sgd(0.1) if kind == "sgd" else lgfjax.lgf(optax.sgd(0.1), dt=0.1)
    params = jnp.array([1.0, 1.0])
    state = opt.init(params)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        if kind == "sgd":
            _, grads = jax.value_and_grad(loss)(params)
            updates, state = opt.update(grads, state, params)
        else:
            # Built afresh each step, as an eager loop would: the cache is per objective.
            value, grads = lgfjax.value_and_grad(loss)(params, state)
            updates, state = opt.update(grads, state, params, value=value)
        params = jax.block_until_ready(optax.apply_updates(params, updates))
        times.append(time.perf_counter() - t0)
    return times[0], times[1:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    first, later = {"sgd": [], "lgf": []}, {"sgd": [], "lgf": []}
    for _ in range(args.rounds):
        for kind in ("sgd", "lgf"):
            f, rest = eager_times(kind, args.steps)
            first[kind].append(f)
            later[kind] += rest
    med = {k: statistics.median(v) for k, v in later.items()}
    print(f"{'eager step':<28}{'first [s]':>10}{'median later [ms]':>19}")
    for kind, name in (("sgd", "optax.sgd"), ("lgf", "lgfjax.lgf(sgd) default")):
        print(f"{name:<28}{min(first[kind]):>10.2f}{1e3 * med[kind]:>19.2f}")
    print(f"eager step after the first, lgf / sgd = {med['lgf'] / med['sgd']:.2f}")


if __name__ == "__main__":
    main()
