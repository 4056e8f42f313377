"""Where a first run's time goes before the first step: LGF against its base, by phase.

For the deep energy example (Adam, 16^3 grid, float64) and the topology example
(gradient descent, MBB beam 60 x 20), each optimiser's whole training loop (a
`lax.scan` over `--steps` updates, as the examples run it) is built in a fresh Python
process and timed phase by phase:

- ``init``: the eager ``opt.init(params)``;
- ``lapack``: ``import scipy.linalg``, which jaxlib does on the first LAPACK call it
  lowers (POD's eigensolver, STLSQ's SVD) to find LAPACK; once per process, so it is
  timed on its own (0 when the program has no LAPACK call);
- ``trace``, ``lower``: ``jax.jit(loop).trace(...)`` and ``.lower()`` (Python);
- ``compile``: XLA.

The run itself is `bench_wall.py`'s. Kinds are interleaved over `--rounds` and the
minimum of each phase is reported. Read the differences, not the seconds.

    python benchmarks/bench_phases.py [--rounds 2] [--steps 100]
"""

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import lgfjax  # noqa: E402

PHASES = ("init", "lapack", "trace", "lower", "compile")


def deep_energy_case(name):
    import deep_energy as de

    jax.config.update("jax_enable_x64", True)  # as the example
    params, static = de.make_model(jax.random.PRNGKey(0))
    points, weight = de.grid(16)
    loss = de.make_loss(static, points, weight)
    opt = {"Adam": lambda: optax.adam(de.LR), "LGF-Adam default": lambda: lgfjax.lgf_adam(de.LR)}
    return params, loss, opt[name]


def topology_case(name):
    import topology_optimization as ex

    problem = ex.mbb_beam(60, 20)
    settings = ex.Settings()
    loss = functools.partial(ex.objective, problem)
    params = jnp.zeros((problem.nely, problem.nelx))
    opt = {
        "gradient descent": lambda: ex.make_optimisers(problem, settings)[0],
        "LGF(GD) default": lambda: ex.make_default(problem, settings),
    }
    return params, loss, opt[name]


CASES = {
    "deep_energy": (deep_energy_case, ("Adam", "LGF-Adam default")),
    "topology": (topology_case, ("gradient descent", "LGF(GD) default")),
}


def child(case: str, name: str, steps: int) -> None:
    """In a fresh process: build `name`'s training loop and time each phase."""
    params, loss, make = CASES[case][0](name)
    jnp.zeros(()).block_until_ready()  # the backend is up before timing
    times = {}
    t = time.perf_counter()
    opt = make()
    state = jax.block_until_ready(opt.init(params))
    times["init"] = time.perf_counter() - t
    learned = isinstance(state, lgfjax.LGFState | lgfjax.VerifiedState)

    def step(carry, _):
        p, s = carry
        if learned:
            value, g = lgfjax.value_and_grad(loss)(p, s)
            u, s = opt.update(g, s, p, value=value)
        else:
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    def loop(p, s):
        return jax.lax.scan(step, (p, s), length=steps)[0]

    t = time.perf_counter()
    traced = jax.jit(loop).trace(params, state)
    times["trace"] = time.perf_counter() - t
    times["lapack"] = 0.0
    if re.search(r"\b(eigh|svd|cholesky|lu|qr|triangular_solve|eig|schur)\[", str(traced.jaxpr)):
        # jaxlib imports scipy.linalg on the first LAPACK lowering; time it apart.
        t = time.perf_counter()
        import scipy.linalg  # noqa: F401

        times["lapack"] = time.perf_counter() - t
    t = time.perf_counter()
    lowered = traced.lower()
    times["lower"] = time.perf_counter() - t
    t = time.perf_counter()
    lowered.compile()
    times["compile"] = time.perf_counter() - t
    print(json.dumps(times))


def in_fresh_process(case: str, name: str, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, name, str(steps)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    print(
        f"{'case':12s} {'optimiser':18s}" + "".join(f"{p:>9s}" for p in PHASES) + f"{'total':>9s}"
    )
    for case, (_, names) in CASES.items():
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for name in names:
                out = in_fresh_process(case, name, args.steps)
                prev = best.get(name, out)
                best[name] = {p: min(prev[p], out[p]) for p in PHASES}
        for name in names:
            row = best[name]
            cells = "".join(f"{row[p]:9.2f}" for p in PHASES)
            print(f"{case:12s} {name:18s}{cells}{sum(row.values()):9.2f}")
        base, lgf = (best[n] for n in names)
        diff = "".join(f"{lgf[p] - base[p]:+9.2f}" for p in PHASES)
        print(f"{case:12s} {'LGF - base':18s}{diff}{sum(lgf.values()) - sum(base.values()):+9.2f}")


if __name__ == "__main__":
    main()
