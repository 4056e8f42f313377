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
  recording), as a profile ladder that adds one piece of the true step at a time,
  and again for objectives that cost more than one pass over ``n``;
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

    # A long surrogate phase, so that chained surrogate steps stay in it. (The flat
    # keywords, deprecated, so that an earlier release's `lgf` can be timed too.)
    opt = lgf(
        optax.sgd(lr),
        dt=lr,
        buffer_dtype=None if buffer_dtype is None else jnp.dtype(buffer_dtype),
        history_size=K,
        retrain_interval=K + 100_000,
        rank=RANK,
        poly_order=DEGREE,
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
    assert int(state.schedule.cycle_step) == K and int(state.phase) == 1

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
    status_after_fit = int(s.info.status)

    box = {"s": s}

    def surrogate():
        u, box["s"] = compiled(zeros, box["s"], p)
        jax.block_until_ready(u)

    surrogate()
    surrogate_time = _median_time(surrogate, repeats)
    final = box["s"]
    surrogate_ok = int(final.phase) == 1 and int(final.info.status) == 0

    # Floor: one projection onto the rank-r basis and back, basis stored (r, n).
    basis = final.model.basis
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
        "pod_energy": float(final.info.pod_energy),
        "peak_rss_mib": _peak_mib(),
    }


def _profile_true_steps(step, state, steps=15):
    """Per-operation time of `steps` true steps, from a `jax.profiler` trace.

    Returns ``{name: microseconds per step}`` for the XLA operations (fusions,
    conditionals, loops) of the compiled step, or ``{}`` if no trace was written.
    """
    import glob
    import gzip
    import shutil
    import tempfile
    from collections import defaultdict

    import jax

    step = jax.jit(step, donate_argnums=(0, 1))
    state = jax.block_until_ready(step(*state))  # compile outside the trace
    folder = tempfile.mkdtemp()
    try:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            for _ in range(steps):
                state = jax.block_until_ready(step(*state))
        files = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
        if not files:
            return {}
        with gzip.open(files[0]) as f:
            trace = json.load(f)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = defaultdict(float)
    for e in events:
        name = e.get("name", "")
        # XLA's own operations; the rest are Python and runtime frames.
        if e.get("ph") == "X" and re.match(r"^[a-z][\w.\-]*\.?\d*$", name) and "$" not in name:
            totals[name] += e["dur"] / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def overhead_worker(n: int, repeats: int):
    """True steps of `lgf(optax.sgd)` against plain sgd, with a profile ladder.

    Every variant is a whole jitted training step (gradient, update, apply) with
    params and state donated. The variants run round-robin, one step each, so they
    see the same machine load and the same (cold) caches. The ladder adds one piece
    of LGF's true step at a time:

    - ``sgd``: the plain step, which XLA fuses into one pass over the arrays;
    - ``gate``: the gradient inside `lax.cond` (what `lgfjax.value_and_grad` does so
      that surrogate steps skip it), which materialises the gradient;
    - ``record``: plus the row write of the iterate into the ``(K + 1, n)`` buffer
      (a loop taken once or never, as in `lgfjax`);
    - ``switch``: plus the base update inside a `lax.switch` over the phases;
    - ``lgf``: the real `lgfjax.lgf` true step (bookkeeping, the fit loop not taken).

    Then the same sgd vs lgf comparison for objectives that cost more:
    ``0.5 |A x|^2`` with a block-diagonal ``A`` of 16 x 16 and 64 x 64 blocks.
    """
    import jax
    import jax.numpy as jnp
    import optax

    import lgfjax

    lr = 0.1
    d = jnp.linspace(0.5, 1.5, n, dtype=jnp.float32)
    sgd = optax.sgd(lr)
    sgd_state = sgd.init(jnp.zeros(1, jnp.float32))

    def make_loss(block):
        if block == 0:
            return lambda x: 0.5 * jnp.sum(d * x * x)
        # 0.5 |A x|^2 with A block diagonal (block x block): ~4 n block flops per
        # gradient, a stand-in for an objective that does real work per parameter.
        a = jnp.eye(block, dtype=jnp.float32) + 0.01 * jnp.ones((block, block), jnp.float32)

        def loss(x):
            y = x.reshape(-1, block) @ a
            return 0.5 * jnp.sum(y * y)

        return loss

    def variants(loss):
        def gated(p, flag):
            def skip(p):
                return jnp.full((), jnp.nan, p.dtype), jnp.zeros_like(p)

            return jax.lax.cond(flag, jax.value_and_grad(loss), skip, p)

        def record(buf, x, row, when):
            def body(carry):
                return jnp.asarray(True), carry[1].at[row].set(x)

            return jax.lax.while_loop(lambda c: ~c[0], body, (~when, buf))[1]

        def base(g, p):
            return sgd.update(g, sgd_state, p)[0]

        def v_sgd(p, s):
            return p + base(jax.grad(loss)(p), p), s

        def v_gate(p, s):
            buf, c = s
            _, g = gated(p, c < K)
            return p + base(g, p), (buf, (c + 1) % K)

        def v_record(p, s):
            buf, c = s
            _, g = gated(p, c < K)
            buf = record(buf, p, c, c < K)
            return p + base(g, p), (buf, (c + 1) % K)

        def v_switch(p, s):
            buf, c = s
            _, g = gated(p, c < K)
            buf = record(buf, p, c, c < K)
            u = jax.lax.switch(
                jnp.where(c < K, 0, 1), (lambda g: base(g, p), lambda g: 0.1 * buf[0]), g
            )
            return p + u, (buf, (c + 1) % K)

        opt = _lgf_factory()(
            sgd, history_size=K, retrain_interval=2 * K, dt=lr, rank=RANK, poly_order=DEGREE
        )
        vg = lgfjax.value_and_grad(loss)

        def v_lgf(p, s):
            _, g = vg(p, s)
            u, s = opt.update(g, s, p)
            return p + u, s

        def fresh(name):
            p = jnp.ones(n, jnp.float32)
            if name == "lgf":
                # A fresh state every K steps keeps the lgf step a true step.
                return p, opt.init(p)
            return p, (jnp.zeros((K + 1, n), jnp.float32), jnp.zeros((), jnp.int32))

        fns = {"sgd": v_sgd, "gate": v_gate, "record": v_record, "switch": v_switch}
        fns["lgf"] = v_lgf
        return fns, fresh

    def race(fns, fresh, steps):
        jitted = {k: jax.jit(f, donate_argnums=(0, 1)) for k, f in fns.items()}
        states = {k: fresh(k) for k in fns}
        times = {k: [] for k in fns}
        for i in range(steps + K):
            for k, f in jitted.items():
                if k == "lgf" and i % K == 0:
                    states[k] = fresh(k)
                jax.block_until_ready(states[k])
                t0 = time.perf_counter()
                states[k] = jax.block_until_ready(f(*states[k]))
                times[k].append(time.perf_counter() - t0)
        # The first K rounds include compilation.
        return {k: statistics.median(v[K:]) for k, v in times.items()}

    ladder = race(*variants(make_loss(0)), repeats)
    fns, fresh = variants(make_loss(0))
    profile = {k: _profile_true_steps(fns[k], fresh(k)) for k in ("sgd", "lgf")}
    costly = {}
    for m in (16, 64):
        fns, fresh = variants(make_loss(m))
        t = race({k: fns[k] for k in ("sgd", "lgf")}, fresh, max(K, repeats // 2))
        costly[m] = {"sgd_s": t["sgd"], "lgf_s": t["lgf"]}
    return {
        "n": n,
        "ladder_s": ladder,
        "sgd_full_s": ladder["sgd"],
        "lgf_true_full_s": ladder["lgf"],
        "block_objective": costly,
        "profile_us": profile,
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
        out["lgf_adam_s"] = compile_seconds(
            lgf_adam(1e-2, schedule=lgfjax.Fixed(history_size=K, retrain_interval=2 * K))
        )
    return out


VARIANTS = ("verified", "fixed", "adam")


def update_worker(variant: str, n: int, K: int, updates: int):
    """Per-update cost of one optimiser at (n, K): surrogate, true and fit updates.

    A real training loop's step (parameters and state donated) runs `updates` times on
    a diagonal quadratic; each update is timed alone and classified by the schedule
    (a true step that does not fit, the update that fits, a surrogate step). In the
    same process: the floor ``x + U (U^T x)`` at the model's POD rank, the base's own
    step (its update and apply, donated), and one copy of the parameters.
    """
    import jax
    import jax.numpy as jnp
    import optax

    import lgfjax

    d = jnp.linspace(0.5, 2.0, n, dtype=jnp.float32)

    def loss(x):
        return 0.5 * jnp.sum(d * x * x)

    lr = 1e-2
    if variant == "verified":
        opt, base, rank = (
            lgfjax.lgf(optax.sgd(lr), dt=lr, schedule=lgfjax.Verified(history_size=K)),
            optax.sgd(lr),
            K // 2,
        )
    elif variant == "fixed":
        rank = min(RANK, K)
        opt = lgfjax.lgf(
            optax.sgd(lr),
            dt=lr,
            schedule=lgfjax.Fixed(history_size=K, retrain_interval=4 * K),
            fit=lgfjax.Fit(rank=rank, poly_order=DEGREE),
        )
        base = optax.sgd(lr)
    else:
        opt, base, rank = (
            lgfjax.lgf_adam(lr, schedule=lgfjax.Verified(history_size=K)),
            optax.adam(lr),
            K // 2,
        )

    def timed(fn, *args):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        return out, time.perf_counter() - t0

    step = jax.jit(
        lambda x, s, g, v: (lambda u, s: (optax.apply_updates(x, u), s))(
            *opt.update(g, s, x, value=v)
        ),
        donate_argnums=(0, 1),
    )
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    x = jnp.ones(n, jnp.float32)
    state = opt.init(x)
    zeros = jnp.zeros_like(x)
    nan = jnp.asarray(jnp.nan, jnp.float32)
    t0 = time.perf_counter()
    compiled = step.lower(x, state, zeros, nan).compile()
    compile_s = time.perf_counter() - t0
    times = {"true": [], "fit": [], "surrogate": []}
    for i in range(updates):
        phase = int(state.phase)
        if variant == "fixed":
            fits = int(state.schedule.cycle_step) == K
        if phase == 0:
            v, g = value_and_grad(x)
        else:
            v, g = nan, zeros
        (x, state), t = timed(compiled, x, state, g, v)
        if variant != "fixed":
            fits = phase == 0 and int(state.phase) == 1
        if i >= 2:  # the first updates warm caches and allocators
            times["fit" if fits else ("true" if phase == 0 else "surrogate")].append(t)
    med = {k: statistics.median(v) if v else None for k, v in times.items()}

    base_step = jax.jit(
        lambda x, s, g: (lambda u, s: (optax.apply_updates(x, u), s))(*base.update(g, s, x)),
        donate_argnums=(0, 1),
    )
    y, bs = jnp.ones(n, jnp.float32), None
    bs = base.init(y)
    g = value_and_grad(y)[1]
    (y, bs), _ = timed(base_step, y, bs, g)
    base_times = []
    for _ in range(30):
        (y, bs), t = timed(base_step, y, bs, g)
        base_times.append(t)
    basis = jax.random.normal(jax.random.key(0), (rank, n), jnp.float32)
    floor = jax.jit(lambda x, u: x + (u @ x) @ u * 1e-9, donate_argnums=0)
    z, _ = timed(floor, jnp.ones(n, jnp.float32), basis)
    floor_times = []
    for _ in range(30):
        z, t = timed(floor, z, basis)
        floor_times.append(t)
    copy = jax.jit(jnp.copy)
    timed(copy, z)
    copy_s = statistics.median(timed(copy, z)[1] for _ in range(30))
    return {
        "variant": variant,
        "n": n,
        "K": K,
        "rank": rank,
        "counts": {k: len(v) for k, v in times.items()},
        "surrogate_s": med["surrogate"],
        "true_s": med["true"],
        "fit_s": med["fit"],
        "floor_s": statistics.median(floor_times),
        "base_s": statistics.median(base_times),
        "copy_s": copy_s,
        "compile_s": compile_s,
        "peak_rss_mib": _peak_mib(),
    }


def _update_table(sizes, ks, quick):
    """The per-update cost table: every variant at every (n, K), each in its own process."""
    print(
        "\nper-update cost (diagonal quadratic, float32, training step donated; medians):\n"
        f"{'variant':>9} {'n':>6} {'K':>3} {'surr ms':>8} {'floor ms':>8} {'surr/floor':>10} "
        f"{'true ms':>8} {'base ms':>8} {'copy ms':>8} {'true/(1.5 base+copy)':>20} "
        f"{'fit ms':>8} {'peak MiB':>8}"
    )
    rows = []
    for n in sizes:
        for k in ks:
            for variant in VARIANTS:
                updates = 60 if quick else (max(120, 4 * k + 80) if n < 1e7 else 4 * k + 40)
                r = _run(["updates", variant, str(int(n)), str(k), str(updates)])
                if r is None:
                    print(f"{variant:>9} {n:>6.0e} {k:>3} failed")
                    continue
                rows.append(r)
                ms = lambda t: float("nan") if t is None else 1e3 * t  # noqa: E731
                surr = ms(r["surrogate_s"]) / ms(r["floor_s"])
                true = ms(r["true_s"]) / (1.5 * ms(r["base_s"]) + ms(r["copy_s"]))
                print(
                    f"{variant:>9} {n:>6.0e} {k:>3} {ms(r['surrogate_s']):>8.2f} "
                    f"{ms(r['floor_s']):>8.2f} {surr:>10.2f} {ms(r['true_s']):>8.2f} "
                    f"{ms(r['base_s']):>8.2f} {ms(r['copy_s']):>8.2f} {true:>20.2f} "
                    f"{ms(r['fit_s']):>8.1f} {r['peak_rss_mib']:>8.0f}"
                )
    return rows


# glibc's malloc serves an allocation above 32 MiB with a fresh mmap, and XLA's CPU
# runtime allocates an executable's temporaries anew on every call: once they pass
# 32 MiB (the fit's K x n temporaries do at n = 1e6), every n-sized temporary that a
# step writes is page-faulted again on every update. `--no-mmap` runs the workers with
# mmap switched off in malloc, as a caching allocator (jemalloc, tcmalloc, a GPU's
# BFC allocator) should behave (not measured here), to show what the step itself costs.
NO_MMAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}
_ENV = dict(os.environ)


def _run(args):
    cmd = [sys.executable, __file__, "--worker", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_ENV)
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
    parser.add_argument(
        "--update-sizes", nargs="+", type=float, default=[1e5, 1e6], help="n of the update table"
    )
    parser.add_argument(
        "--ks", nargs="+", type=int, default=[5, 10, 20], help="history sizes of the update table"
    )
    parser.add_argument(
        "--updates-only", action="store_true", help="only the per-update cost table"
    )
    parser.add_argument("--json", help="write the per-update table's rows to this file")
    parser.add_argument(
        "--no-mmap",
        action="store_true",
        help="workers run with malloc's mmap off (MALLOC_MMAP_MAX_=0): no page faults on "
        "temporaries, as with a caching allocator (see NO_MMAP_ENV)",
    )
    args = parser.parse_args()
    if args.no_mmap:
        _ENV.update(NO_MMAP_ENV)

    if args.worker:
        kind, *rest = args.worker
        if kind == "scale":
            n, repeats, bdt = int(float(rest[0])), int(rest[1]), rest[2]
            result = scale_worker(n, repeats, None if bdt == "none" else bdt)
        elif kind == "updates":
            variant, n, k, updates = rest[0], int(float(rest[1])), int(rest[2]), int(rest[3])
            result = update_worker(variant, n, k, updates)
        elif kind == "overhead":
            result = overhead_worker(int(float(rest[0])), int(rest[1]))
        else:
            result = compile_worker()
        print(json.dumps(result))
        return

    sizes = [1e4, 1e5] if args.quick else args.sizes
    print(f"machine: {_machine()} (shared; timings are noisy, ratios within a run count)")
    if args.no_mmap:
        print("workers run with " + " ".join(f"{k}={v}" for k, v in NO_MMAP_ENV.items()))
    rows = _update_table([1e4] if args.quick else args.update_sizes, args.ks, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": _machine(), "no_mmap": args.no_mmap, "rows": rows}, f, indent=1)
    if args.updates_only:
        return
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
        print(f"recording overhead at n={n_over:.0e} (true steps, whole training step, median):")
        sgd_s = o["ladder_s"]["sgd"]
        print("  profile ladder (each row adds one piece of the true step):")
        for name, t in o["ladder_s"].items():
            print(f"    {name:<7} {1e3 * t:8.3f} ms  {t / sgd_s:5.2f}x sgd")
        for kind, ops in o["profile_us"].items():
            if ops:
                print(f"  profile of a {kind} step (jax.profiler; us per step; nested ops repeat):")
                for name, us in list(ops.items())[:7]:
                    print(f"    {us:8.1f}  {name}")
        for m, t in o["block_objective"].items():
            print(
                f"  objective 0.5|Ax|^2, {m}x{m} blocks: sgd {1e3 * t['sgd_s']:.3f} ms, "
                f"lgf {1e3 * t['lgf_s']:.3f} ms, ratio {t['lgf_s'] / t['sgd_s']:.2f}"
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
