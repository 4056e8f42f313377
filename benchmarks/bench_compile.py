"""Compile time of a jitted training step: LGF against its base and against its parts.

A tanh MLP (1,249 weights, float32 as a network would be) trained on a fixed batch.
For each optimiser the whole training step (gated objective + gradient, `update`,
`apply_updates`) is jitted and timed as ``lower`` (tracing + lowering to StableHLO)
and ``compile`` (XLA), with the size of the optimised HLO module. The parts of an
LGF step are compiled on their own at the same sizes:

- the fit: `lgfjax._fit.fit_pairs` on (K, n) buffers (POD, library, STLSQ);
- one surrogate step: the diffrax solve of the learned flow, lifted to parameters;
- the base step: the plain optax step (objective, gradient, update).

"sum of parts" is base + fit + surrogate; the ratio LGF / sum says how much the
engine adds by itself (conditionals, guards, recompiled pieces). Kinds are
interleaved over `--repeats` rounds and the minimum is reported, so that load on a
shared machine inflates the numbers as little as possible. Read ratios, not seconds.

`--compiler-option KEY=VALUE` (repeatable) compiles every program, base and LGF alike,
with that XLA option (`jax.jit(..., compiler_options={KEY: VALUE})`), for example
``xla_cpu_use_fusion_emitters=false``. With `--compare`, the whole steps are also
compiled with XLA's defaults in the same interleaved rounds, and a second table sets
the two side by side (the parts are compiled with the option only).

`--packed` adds the default `lgf(sgd)` step with every scalar of its state packed
into one vector per dtype at the state's boundary (an experiment: does it save
kernels?).

    python benchmarks/bench_compile.py [--repeats 2] [--breakdown] [--packed]
                                       [--compiler-option KEY=VALUE ...] [--compare]
"""

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lgfjax
from lgfjax._fit import fit_pairs
from lgfjax._flow import RK4, PolynomialFlow
from lgfjax._library import library_size


def mlp(seed=0, width=32, depth=2, samples=64):
    key = jax.random.PRNGKey(seed)
    sizes = [4] + [width] * depth + [1]
    params = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        key, k = jax.random.split(key)
        params.append({"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)})
    key, kx = jax.random.split(key)
    x = jax.random.normal(kx, (samples, 4))
    y = jnp.sin(x.sum(axis=1, keepdims=True))

    def loss(p):
        h = x
        for layer in p[:-1]:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        out = h @ p[-1]["w"] + p[-1]["b"]
        return jnp.mean((out - y) ** 2)

    return params, loss


def hlo_ops(compiled) -> int:
    """Instructions in the optimised HLO module (a proxy for program size)."""
    return len(re.findall(r"^\s+\S+ = ", compiled.as_text(), flags=re.M))


def kernels(compiled) -> tuple[int, int, int]:
    """``(fusions, distinct fusions, scalar fusions)`` in the optimised HLO module.

    XLA's CPU backend emits and compiles every fusion as its own kernel module (MLIR,
    then LLVM), a few milliseconds each whatever its size: a fusion that computes one
    scalar counter costs about as much to compile as one over all the weights. With
    its fusion emitters (the default) it compiles fusions that are the same
    computation once (`upstream.py`), so the *distinct* count, not the number of HLO
    ops, is what compile time follows. Two fusions are the same when their bodies
    match with instruction names and metadata removed.
    """
    text = compiled.as_text()
    bodies: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            bodies[current] = []
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            line = re.sub(r",? metadata=\{[^}]*\}", "", line)
            bodies[current].append(re.sub(r"%[\w.\-]+", "%v", line).strip())
    calls = re.findall(r"^\s+(?:ROOT )?\S+ = (\S+) fusion\(.*?calls=%?([\w.\-]+)", text, flags=re.M)
    distinct = {"\n".join(bodies.get(name, [name])) for _, name in calls}
    scalar = sum(1 for shape, _ in calls if re.fullmatch(r"\w+\[\]", shape))
    return len(calls), len(distinct), scalar


# Options for every compile (`--compiler-option`): base and LGF alike.
COMPILER_OPTIONS: dict[str, bool | int | str] = {}


def _option_value(text: str) -> bool | int | str:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return text


def timed_compile(fn, *args, options=None):
    """``(lower s, compile s, HLO ops, kernels, distinct kernels, scalar kernels)``;
    `options` (default: `COMPILER_OPTIONS`) are the XLA compiler options."""
    # JAX keeps compiled executables in memory keyed by the program: clear them, or a
    # repeat would measure a cache hit.
    jax.clear_caches()
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    options = COMPILER_OPTIONS if options is None else options
    compiled = lowered.compile(compiler_options=options or None)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, hlo_ops(compiled), *kernels(compiled)


def step_for(opt, loss, lgf: bool):
    if not lgf:

        def step(p, s):
            v, g = jax.value_and_grad(loss)(p)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s, v

        return step

    def step(p, s):
        v, g = lgfjax.value_and_grad(loss)(p, s)
        u, s = opt.update(g, s, p, value=v)
        return optax.apply_updates(p, u), s, v

    return step


def packed_step(opt, loss, params):
    """The default step with every scalar of the LGF state packed at the state's
    boundary, one vector per dtype (`--packed`): ``(step, packed initial state)``.

    An experiment, not an offer: would one array per dtype, instead of one per
    counter and flag, let XLA compute the scalar updates in fewer kernels? The step
    unpacks the vectors (slices), runs the unchanged `update`, and stacks the new
    scalars back.
    """
    leaves, treedef = jax.tree_util.tree_flatten(jax.eval_shape(opt.init, params))
    groups: dict[str, list[int]] = {}
    for i, leaf in enumerate(leaves):
        if leaf.ndim == 0:
            groups.setdefault(np.dtype(leaf.dtype).name, []).append(i)
    scalar = {i for idx in groups.values() for i in idx}

    def pack(state):
        flat = jax.tree_util.tree_leaves(state)
        vectors = {k: jnp.stack([flat[i] for i in idx]) for k, idx in groups.items()}
        return vectors, [leaf for i, leaf in enumerate(flat) if i not in scalar]

    def unpack(packed):
        vectors, rest = packed
        out, others = [], iter(rest)
        position = {i: (k, j) for k, idx in groups.items() for j, i in enumerate(idx)}
        for i in range(len(leaves)):
            out.append(vectors[position[i][0]][position[i][1]] if i in scalar else next(others))
        return jax.tree_util.tree_unflatten(treedef, out)

    def step(p, packed):
        state = unpack(packed)
        v, g = lgfjax.value_and_grad(loss)(p, state)
        u, state = opt.update(g, state, p, value=v)
        return optax.apply_updates(p, u), pack(state), v

    return step, pack(opt.init(params))


def parts(params, K, rank, degree, dtype, adam=False, flat=False):
    """Standalone fit and surrogate step at the sizes of an LGF step.

    The surrogate part is the front-end's own step (`velocity_surrogate` for `lgf`,
    the Adam ODE's `adam_surrogate` for `lgf_adam`) on a POD model of the same rank,
    called as the engine calls it, without the engine around it. With `flat`, both
    work on the parameters raveled into one vector, the layout the engine itself uses
    for a pytree of one dtype (`lgfjax._layout`), Adam's moments included.
    """
    from jax.flatten_util import ravel_pytree

    if flat:
        params = ravel_pytree(params)[0]
    import dataclasses

    import diffrax

    from lgfjax._adam import adam_base, adam_surrogate
    from lgfjax._engine import SurrogateModel
    from lgfjax._fit import FitConfig
    from lgfjax._lgf import velocity_surrogate

    cfg = FitConfig(
        history_size=K,
        degree=degree,
        include_bias=True,
        rank=rank,
        center=True,
        derivative="tracked",
        fd_order=2,
        weak_width=None,
        weak_power=4,
        threshold=1e-8,
        relative_threshold=True,
        alpha=1e-6,
        max_iter=20,
        normalize_columns=True,
        unbias=True,
    )
    rows = jax.tree_util.tree_map(lambda p: jnp.zeros((K, *p.shape), p.dtype), params)

    def fit(points, targets, origin):
        f = fit_pairs(dataclasses.replace(cfg), points, targets, origin, dtype)
        return f.coefficients, f.basis

    P = library_size(rank, degree, True)
    basis = jax.tree_util.tree_map(lambda p: jnp.zeros((rank, *p.shape), p.dtype), params)
    coef = jnp.zeros((P, rank), dtype)
    options = dict(
        solver=RK4(), substeps=1, stepsize_controller=diffrax.ConstantStepSize(), max_steps=16
    )
    if adam:
        step_fn = adam_surrogate(1e-2, 0.9, 0.999, 1e-8, False, None, **options)
        base_state = adam_base(1e-2, 0.9, 0.999, 1e-8, False)[0](params)
    else:
        step_fn = velocity_surrogate(0.1, **options)
        base_state = optax.EmptyState()

    def surrogate(coef, basis, p, origin, base_state):
        model = SurrogateModel(PolynomialFlow(coef, degree, True), basis, None, origin)
        step, new_base, ok = step_fn(model, p, base_state, dtype)
        return step, new_base, ok

    return (fit, (rows, rows, params)), (surrogate, (coef, basis, params, params, base_state))


def breakdown(params, loss, repeats):
    """What each step of the verified engine adds to the compile of a default `lgf` step.

    Each row replaces one module-level step of `lgfjax._verified` by a no-op of the same
    signature (the program is then wrong, but the same shape) and reports the seconds
    and HLO ops saved against the whole step. The rows do not add up exactly: XLA
    fuses across steps.
    """
    from lgfjax import _verified as V

    def no_judge(judging, model, params, measured, value, anchor, cfg):
        zero, false = jnp.zeros((), model.coefficients.dtype), jnp.asarray(False)
        return zero, false, false

    def true_only(updates, state, params, base_update, surrogate_fn, cfg, extra_args, *_):
        step, base_state = base_update(updates, state.base_state, params)
        return step, base_state, jnp.asarray(0, jnp.int32), jnp.asarray(False)

    false = jnp.asarray(False)
    no_ops = {
        "take_step: surrogate branch": {"take_step": true_only},
        "judge (free verification)": {"judge": no_judge},
        "retreat": {"retreat": lambda _s, _v, _b, _p, step: (step, false)},
        "record (ring buffer)": {"record": lambda buf, when, params, measured: buf},
        "fit_model (fit, once or never)": {"fit_model": lambda w, m, i, *a: (m, i)},
    }
    originals = {k: getattr(V, k) for patch in no_ops.values() for k in patch}
    best: dict[str, tuple] = {}
    for _ in range(repeats):
        for name, patch in {"whole default step": {}, **no_ops}.items():
            for key, fn in originals.items():
                setattr(V, key, fn)
            for key, fn in patch.items():
                setattr(V, key, fn)
            opt = lgfjax.lgf(optax.sgd(0.1), dt=0.1)
            out = timed_compile(step_for(opt, loss, True), params, opt.init(params))
            best[name] = min(best.get(name, out), out, key=lambda t: t[0] + t[1])
    for key, fn in originals.items():
        setattr(V, key, fn)
    whole = best.pop("whole default step")
    print(
        f"\nbreakdown of the default lgf(sgd) step: {sum(whole[:2]):.2f} s, {whole[2]} HLO "
        f"ops, {whole[4]} distinct kernels"
    )
    print(f"{'without':40s} {'saves [s]':>10s} {'saves ops':>10s} {'saves distinct':>15s}")
    for name, (lo, co, ops, _, distinct, _) in best.items():
        print(
            f"{name:40s} {sum(whole[:2]) - lo - co:10.2f} {whole[2] - ops:10d} "
            f"{whole[4] - distinct:15d}"
        )


def compare(best: dict[str, tuple], defaults: dict[str, tuple]) -> None:
    """The whole steps with `COMPILER_OPTIONS` against XLA's defaults, measured in the
    same interleaved rounds (seconds = lowering + compile)."""
    print(f"\nthe steps with XLA's defaults against compiler_options={COMPILER_OPTIONS}")
    print(
        f"{'step':32s} {'defaults [s]':>13s} {'x sgd':>6s} {'kernels (distinct)':>19s} "
        f"{'option [s]':>11s} {'x sgd':>6s} {'kernels (distinct)':>19s} "
        f"{'option / defaults':>18s}"
    )
    sgd_d, sgd_o = sum(defaults["optax.sgd"][:2]), sum(best["optax.sgd"][:2])
    for name, out in defaults.items():
        d, o = sum(out[:2]), sum(best[name][:2])
        print(
            f"{name:32s} {d:13.2f} {d / sgd_d:6.1f} {out[3]:12d} ({out[4]:4d}) {o:11.2f} "
            f"{o / sgd_o:6.1f} {best[name][3]:12d} ({best[name][4]:4d}) {o / d:18.2f}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also: what each step of the verified engine adds to the default step's compile",
    )
    parser.add_argument(
        "--compiler-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="compile every program (base and LGF alike) with this XLA option",
    )
    parser.add_argument(
        "--packed",
        action="store_true",
        help="also: the default lgf(sgd) step with its state's scalars packed into one "
        "vector per dtype (an experiment)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="with --compiler-option: also compile the whole steps with XLA's defaults, "
        "interleaved in the same rounds, and compare the two",
    )
    args = parser.parse_args(argv)
    if args.compare and not args.compiler_option:
        parser.error("--compare needs at least one --compiler-option")
    for option in args.compiler_option:
        key, _, text = option.partition("=")
        COMPILER_OPTIONS[key] = _option_value(text)
    params, loss = mlp()
    n = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    dtype = jnp.float32
    K = 10
    kinds = {
        "optax.sgd": (optax.sgd(0.1), False),
        "optax.adam": (optax.adam(1e-2), False),
        "lgf(sgd) default": (lgfjax.lgf(optax.sgd(0.1), dt=0.1), True),
        "lgf(sgd) fixed K=20 M=60": (
            lgfjax.lgf(
                optax.sgd(0.1), dt=0.1, schedule=lgfjax.Fixed(history_size=20, retrain_interval=60)
            ),
            True,
        ),
        "lgf(sgd) default rank 4 deg 2": (
            lgfjax.lgf(optax.sgd(0.1), dt=0.1, fit=lgfjax.Fit(rank=4, poly_order=2)),
            True,
        ),
        "lgf_adam default": (lgfjax.lgf_adam(1e-2), True),
    }
    part_fns = {}
    for layout in ("flat", "tree"):
        for label, rank, degree, adam in (
            ("rank 5, deg 1", K // 2, 1, False),
            ("rank 4, deg 2", 4, 2, False),
            ("rank 5, deg 1, Adam ODE", K // 2, 1, True),
        ):
            (fit, fit_args), (sur, sur_args) = parts(
                params, K, rank, degree, dtype, adam=adam, flat=layout == "flat"
            )
            if not adam:
                part_fns[f"{layout} part: fit ({label})"] = (fit, fit_args)
            part_fns[f"{layout} part: surrogate ({label})"] = (sur, sur_args)
    best: dict[str, tuple] = {}
    defaults: dict[str, tuple] = {}  # with --compare: the steps with XLA's defaults
    for _ in range(args.repeats):
        for name, (opt, lgf) in kinds.items():
            state = opt.init(params)
            out = timed_compile(step_for(opt, loss, lgf), params, state)
            best[name] = min(best.get(name, out), out, key=lambda t: t[0] + t[1])
            if args.compare:
                out = timed_compile(step_for(opt, loss, lgf), params, state, options={})
                defaults[name] = min(defaults.get(name, out), out, key=lambda t: t[0] + t[1])
        for name, (fn, a) in part_fns.items():
            out = timed_compile(fn, *a)
            best[name] = min(best.get(name, out), out, key=lambda t: t[0] + t[1])
        if args.packed:
            name = "lgf(sgd) default, scalars packed"
            fn, packed = packed_step(kinds["lgf(sgd) default"][0], loss, params)
            out = timed_compile(fn, params, packed)
            best[name] = min(best.get(name, out), out, key=lambda t: t[0] + t[1])

    def total(name):
        return best[name][0] + best[name][1]

    print(f"tanh MLP, n = {n} weights, float32, K = {K}; best of {args.repeats}, interleaved")
    if COMPILER_OPTIONS:
        print(f"every program compiled with compiler_options={COMPILER_OPTIONS}")
    print(
        f"{'step':42s} {'lower [s]':>10s} {'compile [s]':>12s} {'HLO ops':>8s} "
        f"{'kernels (distinct, scalar)':>27s} {'x sgd':>6s}"
    )
    for name, (lo, co, ops, kern, distinct, scalar) in best.items():
        ratio = total(name) / total("optax.sgd")
        print(
            f"{name:42s} {lo:10.2f} {co:12.2f} {ops:8d} {kern:14d} ({distinct:4d}, {scalar:3d}) "
            f"{ratio:6.1f}"
        )
    print(
        "(parts: 'flat' on the parameters raveled into one vector, the layout the engine "
        "runs in for a pytree of one dtype; 'tree' on the MLP's own pytree)"
    )
    for lgf_name, base, label in (
        ("lgf(sgd) default", "optax.sgd", "rank 5, deg 1"),
        ("lgf(sgd) default rank 4 deg 2", "optax.sgd", "rank 4, deg 2"),
        ("lgf_adam default", "optax.adam", "rank 5, deg 1, Adam ODE"),
    ):
        fit_label = label.replace(", Adam ODE", "")
        for layout in ("flat", "tree"):
            parts_sum = (
                total(base)
                + total(f"{layout} part: fit ({fit_label})")
                + total(f"{layout} part: surrogate ({label})")
            )
            part_names = (
                base,
                f"{layout} part: fit ({fit_label})",
                f"{layout} part: surrogate ({label})",
            )
            parts_distinct = sum(best[name][4] for name in part_names)
            print(
                f"{lgf_name}: {total(lgf_name) / parts_sum:.2f}x the sum of its {layout} parts "
                f"({total(lgf_name):.2f} s vs {parts_sum:.2f} s = base + fit + surrogate step;"
                f" distinct kernels {best[lgf_name][4]} vs {parts_distinct})"
            )
    if args.compare:
        compare(best, defaults)
    if args.breakdown:
        breakdown(params, loss, args.repeats)


if __name__ == "__main__":
    main()
