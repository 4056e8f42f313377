"""Wall time to the same answer, compilation included: LGF's default against its base.

For the deep energy example (Adam, 16^3 grid) and the topology example (gradient
descent, MBB beam 60 x 20), at their default sizes: each optimiser is first run long
enough to find the number of updates S after which it first reaches the target;
then a run of exactly S updates is timed in a fresh Python process, from building
the optimiser to the last result (its eager `init`, tracing, XLA compilation and the
run: what a user waits for; the imports and the problem's setup are not timed). The
kinds are interleaved over `--rounds` and the minimum of each is compared, so that
load on a shared machine inflates them alike.

Targets: deep energy, the report's (the worse final loss of Adam and the paper's
fixed schedule after the example's 2,000 updates) and Adam's own final loss;
topology, 1.01 x gradient descent's final compliance after 490 updates (the
report's).

With `--persistent-cache`, the timed runs are reruns with JAX's persistent compilation
cache (`jax_compilation_cache_dir`) warm, as when a script is run again unchanged:
XLA compilation is then loaded from disk, tracing is still paid.

With `--fast-compile`, every timed process (base and LGF alike) runs with
``XLA_FLAGS=--xla_backend_optimization_level=0``: XLA's CPU backend then spends less
time optimising the generated code, which trades run time for compile time.

With `--topology-size NELXxNELY`, the topology case runs on that mesh instead of the
example's 60 x 20 (each gradient is a block-tridiagonal Cholesky solve, whose cost
grows about as nelx x nely^3).

With `--xla-flags FLAGS`, every timed process (base and LGF alike) runs with `FLAGS`
added to ``XLA_FLAGS``, for example ``--xla_cpu_use_fusion_emitters=false`` (XLA's
CPU backend then emits its kernels straight to LLVM rather than through one MLIR
module per kernel; see the FAQ on compile time).

    python benchmarks/bench_wall.py [--rounds 2] [--only deep_energy|topology]
                                    [--persistent-cache] [--fast-compile]
                                    [--xla-flags FLAGS] [--topology-size 60x20]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


def first_update(values, target) -> int | None:
    """Updates after which the iterate's objective first is <= `target` (values[i] is
    the objective after i updates; NaN where it was not evaluated)."""
    hit = np.flatnonzero(np.asarray(values) <= target)
    return None if hit.size == 0 else int(hit[0])


def deep_energy_cases(discover: bool):
    import deep_energy as de
    import optax

    import lgfjax
    from lgfjax._adam import lgf_adam

    jax.config.update("jax_enable_x64", True)  # as the example
    params, static = de.make_model(jax.random.PRNGKey(0))
    points, weight = de.grid(16)
    loss = de.make_loss(static, points, weight)
    steps = 2000
    makers = {
        "Adam": lambda: optax.adam(de.LR),
        "LGF-Adam default": lambda: lgf_adam(de.LR),
    }
    targets = {}
    if discover:
        fixed = lgf_adam(
            de.LR,
            schedule=lgfjax.Fixed(history_size=de.K, retrain_interval=de.M),
            fit=lgfjax.Fit(rank=de.RANK),
        )
        finals = {}
        for name, opt in (("Adam", makers["Adam"]()), ("fixed", fixed)):
            final, _, _, _ = de.run(opt, loss, params, steps)
            finals[name] = float(loss(final))
        targets = {
            "report's target": max(finals.values()),
            "Adam's final loss": finals["Adam"],
        }

    def history(name):
        # The loss after every update (de.run records it before each update).
        _, state, values, _ = de.run(makers[name](), loss, params, 3 * steps)
        return np.concatenate([values[1:], [np.nan]])

    def timed(name, n):
        start = time.perf_counter()
        _, state, _, run_s = de.run(makers[name](), loss, params, n)
        total = time.perf_counter() - start
        evals = n if name == "Adam" else int(lgfjax.gradient_evaluations(state))
        return total, run_s, evals

    return "deep energy (Adam, 16^3 grid)", makers, targets, history, timed


def topology_cases(discover: bool, size: str = "60x20"):
    import jax.numpy as jnp
    import topology_optimization as ex

    nelx, nely = (int(v) for v in size.split("x"))  # `--topology-size`
    problem = ex.mbb_beam(nelx, nely)
    settings = ex.Settings()
    base_opt, _ = ex.make_optimisers(problem, settings)
    makers = {
        "gradient descent": lambda: ex.make_optimisers(problem, settings)[0],
        "LGF(GD) default": lambda: ex.make_default(problem, settings),
    }
    targets = {}
    if discover:
        r = ex.run(problem, base_opt, 490, "gradient descent", learned=False)
        targets = {"report's target": 1.01 * float(r.compliance[-1])}

    def history(name):
        learned = name != "gradient descent"
        return ex.run(problem, makers[name](), 2 * 490, name, learned=learned).compliance

    def timed(name, n):
        learned = name != "gradient descent"
        start = time.perf_counter()
        # No post-hoc compliance history: only the optimisation is timed.
        out = ex.run(
            problem,
            makers[name](),
            n,
            name,
            learned=learned,
            evaluate=lambda xs: jnp.zeros(xs.shape[0]),
        )
        total = time.perf_counter() - start
        return total, out.seconds, int(out.evaluations[-1])

    return f"topology (gradient descent, {nelx} x {nely})", makers, targets, history, timed


def child(case: str, name: str, n: int, size: str) -> None:
    """In a fresh process: set the case up, then time one run of `n` updates."""
    _, _, _, _, timed = _setup(case, size, discover=False)
    print(json.dumps(timed(name, n)))


def in_fresh_process(
    case: str, name: str, n: int, size: str, cache: str | None = None, xla_flags: str = ""
) -> tuple:
    env = dict(os.environ)
    if xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    if cache:
        # JAX's persistent compilation cache: a rerun loads the compiled step from disk.
        env["JAX_COMPILATION_CACHE_DIR"] = cache
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, name, str(n), "--topology-size", size],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def _setup(case: str, size: str, discover: bool):
    if case == "topology":
        return topology_cases(discover, size)
    return deep_energy_cases(discover)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=["deep_energy", "topology"])
    parser.add_argument(
        "--persistent-cache",
        action="store_true",
        help="time reruns with JAX's persistent compilation cache warm (a first, untimed "
        "run of each fills a fresh cache directory)",
    )
    parser.add_argument(
        "--fast-compile",
        action="store_true",
        help="run every timed process with XLA_FLAGS=--xla_backend_optimization_level=0",
    )
    parser.add_argument(
        "--xla-flags",
        default="",
        help="add these flags to XLA_FLAGS in every timed process (base and LGF alike)",
    )
    parser.add_argument(
        "--topology-size",
        default="60x20",
        metavar="NELXxNELY",
        help="the topology example's mesh (default 60x20, the example's own); larger "
        "meshes make each gradient (a block-tridiagonal Cholesky solve) dearer",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.topology_size)
        return
    flags = args.xla_flags
    if args.fast_compile:
        flags = f"{flags} --xla_backend_optimization_level=0".strip()
    if flags:
        print(f"every timed process: XLA_FLAGS += {flags}")
    cases = {"deep_energy": None, "topology": None}
    for key in cases:
        if args.only and key != args.only:
            continue
        title, makers, targets, history, _ = _setup(key, args.topology_size, discover=True)
        histories = {name: history(name) for name in makers}
        print(f"\n{title}")
        header = f"{'target':20s} {'optimiser':18s} {'updates':>8s} {'gradients':>9s}"
        # "other": everything but the run (eager init, tracing, compilation and the
        # example's own post-processing); `bench_phases.py` splits it by phase.
        print(f"{header} {'total [s]':>10s} {'run [s]':>8s} {'other [s]':>18s}")
        for label, target in targets.items():
            need = {name: first_update(h, target) for name, h in histories.items()}
            best: dict[str, tuple] = {}
            cache = tempfile.mkdtemp(prefix="lgfjax-cache-") if args.persistent_cache else None
            if cache:
                for name, n in need.items():
                    if n is not None:
                        in_fresh_process(key, name, n, args.topology_size, cache, flags)
            for _ in range(args.rounds):
                for name, n in need.items():
                    if n is None:
                        continue
                    out = in_fresh_process(key, name, n, args.topology_size, cache, flags)
                    best[name] = min(best.get(name, out), out)
            for name, n in need.items():
                if n is None:
                    print(f"{label:20s} {name:18s} not reached")
                    continue
                total, run_s, evals = best[name]
                print(
                    f"{label:20s} {name:18s} {n:8d} {evals:9d} {total:10.2f} {run_s:8.2f} "
                    f"{total - run_s:18.2f}"
                )
            base, lgf = list(makers)
            if base in best and lgf in best:
                print(
                    f"{label:20s} total wall time, LGF / base: {best[lgf][0] / best[base][0]:.2f}x"
                )


if __name__ == "__main__":
    main()
