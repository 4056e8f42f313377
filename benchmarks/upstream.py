"""Minimal cases of two upstream costs in an LGF step's compile, for reports upstream.

Neither case uses lgfjax: each shows the cost in the library that has it.

1. **XLA's CPU backend: compile time per distinct kernel** (`--case xla`). A jitted
   function returns N scalars, each a different `jnp.where` expression, so XLA makes N
   distinct fusions. Compile time is timed for N = 1, 25, 100 with the defaults and
   with ``compiler_options={"xla_cpu_use_fusion_emitters": False}``; for 25 scalars
   each the same expression of its own input (25 fusions, all alike: XLA compiles
   such kernels once, so the cost is per *distinct* kernel); and for the same 25
   values written as one vector expression (one fusion) and stacked with `jnp.stack`
   (still one fusion per value). A default LGF step holds about 130 distinct
   fusions, 52 of them scalars (counters, flags, loop conditions); its compile time
   follows their number.
2. **diffrax: XLA compiles while a solver step is traced** (`--case diffrax`). Tracing
   one `diffrax.Tsit5` step under `jax.jit(...).trace` runs small programs eagerly
   (the step compares a concrete `RESULTS` value, ``is_okay(result)``), and each is
   an XLA compile, counted with `jax.monitoring`'s backend-compile event. After
   `jax.clear_caches()` they are compiled again; in a process they are paid once.

    python benchmarks/upstream.py [--case xla|diffrax] [--repeats 3]
"""

import argparse
import time

import jax
import jax.numpy as jnp

OPTION = {"xla_cpu_use_fusion_emitters": False}


def _separate(xs, c):
    return [jnp.where(c > i, x * (i + 1) + c, x - i) for i, x in enumerate(xs)]


def _identical(xs, c):
    return [jnp.where(c > x, x + 1, x) for x in xs]


def _stacked(xs, c):
    return jnp.stack(_separate(xs, c))


def _vector(v, c):
    i = jnp.arange(v.shape[0])
    return jnp.where(c > i, v * (i + 1) + c, v - i)


def _compile_ms(fn, args, options, repeats):
    best, fusions = float("inf"), 0
    for _ in range(repeats):
        jax.clear_caches()
        lowered = jax.jit(fn).lower(*args)
        t = time.perf_counter()
        compiled = lowered.compile(compiler_options=options or None)
        best = min(best, time.perf_counter() - t)
        fusions = compiled.as_text().count(" fusion(")
    return 1e3 * best, fusions


def xla_case(repeats):
    print(f"jax {jax.__version__}, backend {jax.default_backend()}; best of {repeats}")
    print(f"{'program':36s} {'fusions':>8s} {'defaults [ms]':>14s} {'option [ms]':>12s}")
    c = jnp.float32(3)
    rows = [
        (f"{n} scalar where's", _separate, ([jnp.float32(i) for i in range(n)], c))
        for n in (1, 25, 100)
    ]
    rows += [
        ("25 identical scalar where's", _identical, ([jnp.float32(i) for i in range(25)], c)),
        ("25 scalar where's, jnp.stack", _stacked, ([jnp.float32(i) for i in range(25)], c)),
        ("25 values as one vector where", _vector, (jnp.arange(25, dtype=jnp.float32), c)),
    ]
    for label, fn, args in rows:
        default_ms, fusions = _compile_ms(fn, args, {}, repeats)
        option_ms, _ = _compile_ms(fn, args, OPTION, repeats)
        print(f"{label:36s} {fusions:8d} {default_ms:14.0f} {option_ms:12.0f}")


def diffrax_case(repeats):
    import diffrax

    compiles: list[float] = []

    def listener(event, secs, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listener)

    def one_step(y):
        term = diffrax.ODETerm(lambda t, y, args: -y)
        solver = diffrax.Tsit5()
        state = solver.init(term, 0.0, 0.1, y, None)
        return solver.step(term, 0.0, 0.1, y, None, state, False)[0]

    print(f"diffrax {diffrax.__version__}, jax {jax.__version__}")
    for k in range(repeats):
        jax.clear_caches()
        compiles.clear()
        t = time.perf_counter()
        jax.jit(one_step).trace(jnp.ones(3))
        total = time.perf_counter() - t
        print(
            f"trace {k + 1}: {1e3 * total:.0f} ms, of which {len(compiles)} XLA compiles "
            f"took {1e3 * sum(compiles):.0f} ms"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["xla", "diffrax"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.case in (None, "xla"):
        xla_case(args.repeats)
    if args.case in (None, "diffrax"):
        diffrax_case(args.repeats)


if __name__ == "__main__":
    main()
