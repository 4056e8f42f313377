"""Scale and speed of `lgfjax.lgf` on the large-n (POD) path.

Run ``python benchmarks/bench_scale.py`` (about two minutes on 2 cores). Each
measurement runs in its own subprocess so that its peak resident memory
(``resource.getrusage(...).ru_maxrss``) is its own. Every jitted function is
compiled first and then timed with ``block_until_ready`` (median of repeats); the
state argument is donated, as in a real training loop, so that XLA may update the
trajectory buffer in place. Only ratios measured in the same process count: the
machine is shared, absolute times are noisy.

What is printed:

- surrogate step / floor, where the floor is one POD projection ``U (U^T x)`` at the
  same ``n`` and rank (a surrogate step cannot do less: it projects and lifts);
- the time of the update that performs the fit (Gram matrix, eigh, basis, library,
  STLSQ, first surrogate step) against ``n``;
- the largest array in the compiled update's HLO, to show that nothing ``n x n`` (or
  ``n x K`` beyond the buffer itself) is formed;
- a true step of ``lgf(optax.sgd)`` against a plain ``optax.sgd`` step (the cost of
  recording), for the update alone and for the whole training step;
- compile times of the training step for the default `lgf` and for `lgf_adam`.

Options: ``--sizes 1e5 1e6 1e7`` (default), ``--quick`` (sizes 1e4 1e5, few repeats).
"""

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

K, RANK, DEGREE = 20, 8, 2
TARGETS = {
    "surrogate_over_floor_1e6": 2.0,
    "fit_seconds_1e6": 1.0,
    "recording_overhead": 1.5,
    "compile_seconds_default": 10.0,
}


def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _largest_hlo_array(hlo: str):
    """(elements, shape string) of the largest array shape mentioned in an HLO text."""
    best = (0, "")
    for dtype, dims in re.findall(r"\b(f64|f32|bf16|f16|s32|pred)\[([0-9,]*)\]", hlo):
        if not dims:
            continue
        size = 1
        for d in dims.split(","):
            size *= int(d)
        if size > best[0]:
            best = (size, f"{dtype}[{dims}]")
    return best


def _lgf_factory():
    """`lgfjax.lgf`, or the factory named by $LGFJAX_BENCH_IMPL ("module:attr"), so
    that a prototype of a core change can be measured with the same script."""
    impl = os.environ.get("LGFJAX_BENCH_IMPL")
    if not impl:
        import lgfjax

        return lgfjax.lgf
    import importlib

    module, attr = impl.split(":")
    return getattr(importlib.import_module(module), attr)


def scale_worker(n: int, repeats: int, buffer_dtype: str | None):
    import jax
    import jax.numpy as jnp
    import optax

    lgf = _lgf_factory()

    lr = 0.1
    d = jnp.linspace(0.5, 1.5, n, dtype=jnp.float32)

    def loss(x):
        return 0.5 * jnp.sum(d * x * x)

    # A long surrogate phase, so that chained surrogate steps stay in it.
    opt = lgf(
        optax.sgd(lr),
        history_size=K,
        retrain_interval=K + 100_000,
        dt=lr,
        rank=RANK,
        poly_order=DEGREE,
        buffer_dtype=None if buffer_dtype is None else jnp.dtype(buffer_dtype),
    )
    params = jnp.ones(n, jnp.float32)
    state = opt.init(params)

    @jax.jit
    def true_step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(K):
        params, state = true_step(params, state)
    assert int(state.cycle_step) == K and int(state.phase) == 1

    update = jax.jit(lambda g, s, p: opt.update(g, s, p), donate_argnums=1)
    zeros = jnp.zeros_like(params)
    lowered = update.lower(zeros, state, params)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_update = time.perf_counter() - t0
    largest = _largest_hlo_array(compiled.as_text())

    def copy(tree):
        return jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, tree))

    # Fit: the update at cycle_step == K. The donated state is consumed, so each
    # repeat gets a fresh copy (made outside the timed region).
    fit_times = []
    for _ in range(max(3, repeats // 3)):
        s = copy(state)
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(zeros, s, params))
        fit_times.append(time.perf_counter() - t0)
    fit_time = statistics.median(fit_times)

    upd, s = compiled(zeros, copy(state), params)
    p = optax.apply_updates(params, upd)
    jax.block_until_ready(s)
    status_after_fit = int(s.status)

    box = {"s": s}

    def surrogate():
        u, box["s"] = compiled(zeros, box["s"], p)
        jax.block_until_ready(u)

    surrogate()
    surrogate_time = _median_time(surrogate, repeats)
    final = box["s"]
    surrogate_ok = int(final.phase) == 1 and int(final.status) == 0

    # Floor: one projection onto the rank-r basis and back, basis stored (r, n).
    basis = final.basis
    floor_fn = jax.jit(lambda u, x: (u @ x) @ u)
    jax.block_until_ready(floor_fn(basis, p))
    floor_time = _median_time(lambda: jax.block_until_ready(floor_fn(basis, p)), repeats)

    # The same surrogate step without donation, to show what a buffer copy costs.
    nodonate = jax.jit(lambda g, s, p: opt.update(g, s, p))
    jax.block_until_ready(nodonate(zeros, final, p))
    nodonate_time = _median_time(lambda: jax.block_until_ready(nodonate(zeros, final, p)), repeats)

    return {
        "n": n,
        "buffer_dtype": buffer_dtype or "float32",
        "surrogate_s": surrogate_time,
        "surrogate_nodonate_s": nodonate_time,
        "floor_s": floor_time,
        "fit_s": fit_time,
        "compile_update_s": compile_update,
        "largest_hlo_array": largest[1],
        "largest_hlo_elements": largest[0],
        "status_after_fit": status_after_fit,
        "surrogate_phase_ok": surrogate_ok,
        "pod_energy": float(final.pod_energy),
        "peak_rss_mib": _peak_mib(),
    }


def overhead_worker(n: int, repeats: int):
    import jax
    import jax.numpy as jnp
    import optax

    import lgfjax

    lr = 0.1
    d = jnp.linspace(0.5, 1.5, n, dtype=jnp.float32)

    def loss(x):
        return 0.5 * jnp.sum(d * x * x)

    def timings(opt, use_lgf):
        grad_fn = lgfjax.value_and_grad(loss) if use_lgf else jax.value_and_grad(loss)

        def full(params, state):
            _, grads = grad_fn(params, state) if use_lgf else grad_fn(params)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        full = jax.jit(full, donate_argnums=(0, 1))
        upd = jax.jit(lambda g, s, p: opt.update(g, s, p), donate_argnums=1)
        grads = jax.grad(loss)(jnp.ones(n, jnp.float32))
        # Warm up both, then time true steps only: a fresh state every K steps.
        out = {"full": [], "update": []}
        for _ in range(max(2, repeats // K)):
            # `LGFState` from `init` shares one zero array between its counters, which
            # cannot be donated twice in one call: give every leaf its own buffer.
            fresh = lambda: jax.tree_util.tree_map(jnp.copy, opt.init(jnp.ones(n, jnp.float32)))
            params, state, ustate = jnp.ones(n, jnp.float32), fresh(), fresh()
            p_fixed = jnp.ones(n, jnp.float32)
            jax.block_until_ready((params, state, ustate))
            for _ in range(K):
                t0 = time.perf_counter()
                params, state = jax.block_until_ready(full(params, state))
                out["full"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                u, ustate = jax.block_until_ready(upd(grads, ustate, p_fixed))
                out["update"].append(time.perf_counter() - t0)
        # Drop the first round (compilation) and take medians.
        return {k: statistics.median(v[K:]) for k, v in out.items()}

    base = timings(optax.sgd(lr), use_lgf=False)
    rec = timings(
        _lgf_factory()(
            optax.sgd(lr),
            history_size=K,
            retrain_interval=2 * K,
            dt=lr,
            rank=RANK,
            poly_order=DEGREE,
        ),
        use_lgf=True,
    )
    return {
        "n": n,
        "sgd_full_s": base["full"],
        "lgf_true_full_s": rec["full"],
        "sgd_update_s": base["update"],
        "lgf_true_update_s": rec["update"],
        "peak_rss_mib": _peak_mib(),
    }


def compile_worker():
    import jax
    import jax.numpy as jnp
    import optax

    import lgfjax

    # A small MLP's parameters (4 leaves, 1 + 32 + 32 + 32*32... parameters).
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "w1": jax.random.normal(k1, (1, 32)),
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, 32)) / 6,
        "b2": jnp.zeros(32),
        "w3": jax.random.normal(k3, (32, 1)) / 6,
    }
    xs = jnp.linspace(-1, 1, 64)[:, None]

    def loss(p):
        h = jnp.tanh(xs @ p["w1"] + p["b1"])
        h = jnp.tanh(h @ p["w2"] + p["b2"])
        return jnp.mean((h @ p["w3"] - jnp.sin(3 * xs)) ** 2)

    def compile_seconds(opt, use_lgf=True):
        grad_fn = lgfjax.value_and_grad(loss) if use_lgf else None

        def step(params, state):
            if use_lgf:
                _, grads = grad_fn(params, state)
            else:
                grads = jax.grad(loss)(params)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        state = opt.init(params)
        t0 = time.perf_counter()
        jax.jit(step).lower(params, state).compile()
        return time.perf_counter() - t0

    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    out = {"n": int(n)}
    out["sgd_s"] = compile_seconds(optax.sgd(0.1), use_lgf=False)
    out["lgf_default_s"] = compile_seconds(
        _lgf_factory()(optax.sgd(0.1), history_size=K, retrain_interval=2 * K, dt=0.1)
    )
    out["lgf_rank8_deg2_s"] = compile_seconds(
        _lgf_factory()(
            optax.sgd(0.1),
            history_size=K,
            retrain_interval=2 * K,
            dt=0.1,
            rank=RANK,
            poly_order=DEGREE,
        )
    )
    try:
        from lgfjax._adam import lgf_adam
    except ImportError as e:
        out["lgf_adam_s"] = None
        out["lgf_adam_missing"] = str(e)
    else:
        out["lgf_adam_s"] = compile_seconds(lgf_adam(1e-2, history_size=K, retrain_interval=2 * K))
    return out


def _run(args):
    cmd = [sys.executable, __file__, "--worker", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import jax

    return f"{os.cpu_count()} cpus ({model}), {platform.python_version()}, jax {jax.__version__}"


def _verdict(ok):
    return "met" if ok else "NOT MET"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs="+")
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--bf16", action="store_true", help="also run the largest n with a bfloat16 buffer"
    )
    args = parser.parse_args()

    if args.worker:
        kind, *rest = args.worker
        if kind == "scale":
            n, repeats, bdt = int(float(rest[0])), int(rest[1]), rest[2]
            result = scale_worker(n, repeats, None if bdt == "none" else bdt)
        elif kind == "overhead":
            result = overhead_worker(int(float(rest[0])), int(rest[1]))
        else:
            result = compile_worker()
        print(json.dumps(result))
        return

    sizes = [1e4, 1e5] if args.quick else args.sizes
    print(f"machine: {_machine()} (shared; timings are noisy, ratios within a run count)")
    print(f"lgf(optax.sgd), K={K}, rank={RANK}, degree={DEGREE}, float32 parameters\n")
    header = (
        f"{'n':>9} {'buffer':>8} {'floor ms':>9} {'surr ms':>9} {'surr/floor':>10} "
        f"{'no-donate ms':>12} {'fit ms':>9} {'compile s':>9} {'peak MiB':>9}  largest HLO array"
    )
    print(header)
    results = {}
    runs = [(int(n), "none") for n in sizes]
    if args.bf16:
        runs.append((int(max(sizes)), "bfloat16"))
    for n, bdt in runs:
        repeats = 5 if args.quick else (7 if n >= 10_000_000 else 21)
        r = _run(["scale", str(n), str(repeats), bdt])
        if r is None:
            print(f"{n:>9} failed")
            continue
        results[(n, bdt)] = r
        ratio = r["surrogate_s"] / r["floor_s"]
        print(
            f"{n:>9.0e} {r['buffer_dtype']:>8} {1e3 * r['floor_s']:>9.3f} "
            f"{1e3 * r['surrogate_s']:>9.3f} {ratio:>10.2f} "
            f"{1e3 * r['surrogate_nodonate_s']:>12.3f} {1e3 * r['fit_s']:>9.1f} "
            f"{r['compile_update_s']:>9.2f} {r['peak_rss_mib']:>9.0f}  "
            f"{r['largest_hlo_array']} ({r['largest_hlo_elements'] / n:.0f} n)"
        )
        if not r["surrogate_phase_ok"] or r["status_after_fit"] != 0:
            print(f"          warning: surrogate phase not clean (status {r['status_after_fit']})")

    n_over = 1e4 if args.quick else 1e6
    o = _run(["overhead", str(n_over), "5" if args.quick else "100"])
    c = _run(["compile"])
    print()
    if o:
        print(f"recording overhead at n={n_over:.0e} (true steps, median):")
        print(
            f"  update only : sgd {1e3 * o['sgd_update_s']:.3f} ms, "
            f"lgf {1e3 * o['lgf_true_update_s']:.3f} ms, "
            f"ratio {o['lgf_true_update_s'] / o['sgd_update_s']:.2f}"
        )
        print(
            f"  whole step  : sgd {1e3 * o['sgd_full_s']:.3f} ms, "
            f"lgf {1e3 * o['lgf_true_full_s']:.3f} ms, "
            f"ratio {o['lgf_true_full_s'] / o['sgd_full_s']:.2f}"
        )
    if c:
        adam = (
            "skipped (" + c.get("lgf_adam_missing", "") + ")"
            if c["lgf_adam_s"] is None
            else f"{c['lgf_adam_s']:.2f} s"
        )
        print(
            f"compile time of a training step (MLP, n={c['n']}): sgd {c['sgd_s']:.2f} s, "
            f"lgf default {c['lgf_default_s']:.2f} s, lgf rank 8 degree 2 "
            f"{c['lgf_rank8_deg2_s']:.2f} s, lgf_adam {adam}"
        )

    print("\ntargets:")
    mid = results.get((1_000_000, "none"))
    if mid:
        ratio = mid["surrogate_s"] / mid["floor_s"]
        print(f"  surrogate step <= 2x floor at n=1e6: {ratio:.2f}x -> {_verdict(ratio <= 2)}")
        print(f"  fit <= 1 s at n=1e6: {mid['fit_s']:.3f} s -> {_verdict(mid['fit_s'] <= 1)}")
    if o:
        ratio = o["lgf_true_full_s"] / o["sgd_full_s"]
        print(
            f"  recording overhead <= 1.5x (whole step): {ratio:.2f}x -> {_verdict(ratio <= 1.5)}"
        )
    if c:
        print(
            f"  compile <= 10 s (default lgf): {c['lgf_default_s']:.2f} s -> "
            f"{_verdict(c['lgf_default_s'] <= 10)}"
        )
    big = results.get((10_000_000, "none"))
    if big:
        print(
            f"  n=1e7 full cycle ran, peak RSS {big['peak_rss_mib'] / 1024:.2f} GiB "
            f"(buffer alone {(K + 1) * 1e7 * 4 / 2**30:.2f} GiB)"
        )


if __name__ == "__main__":
    main()
