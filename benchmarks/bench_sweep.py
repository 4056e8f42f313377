"""Where does LGF pay off? The five paper examples swept against the cost of a gradient.

For one example at one size (``--example NAME --size SIZE --json FILE``):

1. Discovery (this process, not timed): the base runs its budget of N updates and the
   verified default (``lgfjax.lgf(base, dt=lr)``, ``lgfjax.lgf_adam(lr)``, as in
   ``report.py``) up to ``factor x N``; from their histories come the target (the
   report's logic, below), the updates S each needs to first reach it and the true
   gradients G it spent on the way. The gradient ratio is G_lgf / G_base.
2. Per-update costs (this process): one gradient (the base's direction: a gradient, or
   for Newton the gradient, the dense Hessian and the solve), median of repeated calls
   of the jitted function; one surrogate step, one fit and one true update of the
   default, each the median of single jitted, donated `update` calls classified by
   the schedule's phase before and after (as ``bench_scale.py`` does). Every call is
   timed alone with ``block_until_ready``, so each includes one dispatch.
3. Wall time (fresh Python processes, as ``bench_wall.py``): a run of exactly S_base
   updates of the base and one of exactly S_lgf updates of the default, each timed
   from building the optimiser to the last result (eager ``init``, tracing, XLA
   compilation and the compiled run; the imports and the problem's setup are not
   timed), base and LGF interleaved over ``--rounds`` (minimum of each). Compile time
   (optimiser built to executable) is part of the wall time and is reported too. The
   wall ratio is LGF / base of these totals.

Budgets N (the default's up to factor x N): heat 750 (2x), Newton heat 300 (2x), deep
energy 1,000 (2x; ``bench_wall.py`` uses 2,000), topology 490 (2x), wave 1,100 (8x:
at 22 x 22 the default did not reach Adam's final error within 4x).

The issue's rule: at each example's largest size the default's whole-run wall time is
at most 1.25 x (gradient ratio) x (the base's), both from one run of this script.

Targets (``report.py``'s where it is cheap): heat, misfit < 5e-5 (the paper's);
Newton heat, the deepest |grad z| / |grad z0| in 1e-4 ... 1e-12 that both runs reach;
deep energy, the base's final loss after N updates (``bench_wall.py``'s second
target); topology, 1.01 x gradient descent's final compliance after N updates; wave,
Adam's final relative parameter error after N updates. Where the measure is the loss
the optimisers minimise (heat: log misfit; deep energy; topology: log compliance)
it is read from the loss that comes free with each true gradient: every iterate of
the base, and the iterates where the default took a true step (a surrogate iterate's
loss is never computed, so the default counts as there when a true step finds it
there). Newton heat's residual and wave's parameter error are computed for every
iterate inside the discovery runs (never in timed runs).

The runs are this script's own compiled loops (one ``lax.scan`` of update steps, the
example's problem, optimisers and learning rates), so that base and default run the
same code around their update; counts may differ slightly from ``report.py``'s, whose
loops differ per example (other generated code rounds differently).

    python benchmarks/bench_sweep.py --list
    python benchmarks/bench_sweep.py --example topology --size 120x40 --json out.json
    python benchmarks/bench_sweep.py --sweep [--largest-first] [--only heat wave]
    python benchmarks/bench_sweep.py --summarise   # sweep.md table + docs/images/sweep.png

``--steps N`` replaces the base's budget (smoke tests). On a GPU, run it unchanged with
``JAX_PLATFORMS=cuda`` (see ``benchmarks/README.md``).
"""

import os

# Set before numpy loads OpenBLAS (see report.py): the examples make small LAPACK calls.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLES = os.path.join(ROOT, "examples")
OUTDIR = os.path.join(HERE, "outputs", "sweep")
SWEEP_MD = os.path.join(HERE, "sweep.md")
PLOT = os.path.join(ROOT, "docs", "images", "sweep.png")
RULE = 1.25  # LGF wall <= RULE x gradient ratio x base wall, at the largest size

# The published sizes, smallest first (largest last). The size strings are parsed by
# each example's `build`.
SIZES = {
    "heat_inverse": ["30x500", "120x4000", "240x12000"],
    "nonlinear_heat_newton": ["10x40", "15x60", "30x120"],
    "deep_energy": ["8", "16", "24"],
    "topology_optimization": ["60x20", "120x40", "200x66"],
    "wave_inverse": ["10", "14", "22"],
}
ALIASES = {
    "heat": "heat_inverse",
    "newton": "nonlinear_heat_newton",
    "newton_heat": "nonlinear_heat_newton",
    "deep": "deep_energy",
    "topology": "topology_optimization",
    "wave": "wave_inverse",
}
SHORT = {
    "heat_inverse": "heat",
    "nonlinear_heat_newton": "Newton heat",
    "deep_energy": "deep energy",
    "topology_optimization": "topology",
    "wave_inverse": "wave",
}


def canonical(name: str) -> str:
    """The example's module name for `name` (a module name or an alias).

    ```python
    assert canonical("topology") == canonical("topology_optimization")
    ```
    """
    name = ALIASES.get(name, name)
    if name not in SIZES:
        raise ValueError(f"unknown example {name!r}; one of {sorted(SIZES)} or {sorted(ALIASES)}")
    return name


def published() -> list[tuple[str, str]]:
    """The published (example, size) pairs, each example's largest size last."""
    return [(ex, size) for ex, sizes in SIZES.items() for size in sizes]


# ----------------------------------------------------------------------------------
# Pure helpers (tested in tests/test_sweep.py)
# ----------------------------------------------------------------------------------


def first_hit(values, target: float, strict: bool = False) -> int | None:
    """Index of the first finite entry <= `target` (< if `strict`), or None.

    ```python
    assert first_hit([3.0, float("nan"), 1.0], 1.0) == 2
    assert first_hit([3.0, float("nan"), 1.0], 1.0, strict=True) is None
    ```
    """
    v = np.asarray(values, dtype=float)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(v) & ((v < target) if strict else (v <= target))
    idx = np.flatnonzero(ok)
    return int(idx[0]) if idx.size else None


def deepest_common(finals, candidates=(1e-4, 1e-6, 1e-8, 1e-10, 1e-12)) -> float | None:
    """The smallest candidate >= every final value (None if none is).

    ```python
    assert deepest_common([2e-9, 5e-8]) == 1e-6
    assert deepest_common([1.0]) is None
    ```
    """
    ok = [c for c in candidates if c >= max(finals)]
    return min(ok) if ok else None


def rule_holds(lgf_total, base_total, gradient_ratio, factor: float = RULE) -> bool | None:
    """The issue's rule: LGF's wall time <= factor x gradient ratio x the base's.

    ```python
    assert rule_holds(2.0, 10.0, 0.2) and not rule_holds(2.6, 10.0, 0.2)
    assert rule_holds(None, 10.0, 0.2) is None
    ```
    """
    if lgf_total is None or base_total is None or gradient_ratio is None:
        return None
    return bool(lgf_total <= factor * gradient_ratio * base_total)


def _median_time(fn, min_repeats=3, max_repeats=25, budget=1.5) -> float:
    """Median wall time of `fn()` over repeats (at least `min_repeats`, then until
    `budget` seconds are spent or `max_repeats` calls are made)."""
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or (
        len(times) < max_repeats and time.perf_counter() - start < budget
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------------
# The examples at a size: problem, base, default, budget, target logic
# ----------------------------------------------------------------------------------


class Case(NamedTuple):
    example: str
    size: str
    label: str  # what the size means, in words
    params: Any  # the start (a pytree)
    objective: Callable  # params -> the loss the optimisers minimise
    base: Callable[[], Any]  # -> the base optimiser (optax)
    lgf: Callable[[], Any]  # -> the verified default around the same base
    base_direction: Callable  # params -> (value, direction)
    lgf_direction: Callable  # (params, state) -> (value, direction), gated
    steps: int  # the base's budget N
    factor: int  # the default may take up to factor x N updates
    measure: Callable | None  # params -> progress measure (in discovery); None: the loss
    target: Callable  # (base history, lgf history) -> (target, description)
    strict: bool = False  # "< target" instead of "<= target"
    update_extra: Callable | None = None  # () -> extra keyword arguments of the update


def _import_example(name: str):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import importlib

    return importlib.import_module(name)


def _pair(size: str) -> tuple[int, int]:
    a, b = size.lower().split("x")
    return int(a), int(b)


def heat_case(size: str) -> Case:
    """Two-parameter inverse heat: SGD vs ``lgf(sgd(lr), dt=lr)``; size MODESxTIME
    (sine modes x time grid points; 30x500 is the example's)."""
    import jax
    import optax

    import lgfjax

    ex = _import_example("heat_inverse")
    modes, n_time = _pair(size)
    # Midpoint quadrature with at least 4 points per wavelength of the highest mode
    # (the example's 250 for its 30 modes).
    problem = ex.make_problem(n_modes=modes, n_space=max(250, 4 * modes), n_time=n_time)
    lr = ex.LEARNING_RATE
    objective = problem.objective

    def target(base, lgf):
        return math.log(ex.TARGET_MISFIT), f"misfit < {ex.TARGET_MISFIT:g} (paper)"

    return Case(
        "heat_inverse",
        size,
        f"{modes} modes, {n_time} time points",
        jax.numpy.asarray(ex.START, jax.numpy.float64),
        objective,
        lambda: optax.sgd(lr),
        lambda: lgfjax.lgf(optax.sgd(lr), dt=lr),
        jax.value_and_grad(objective),
        lgfjax.value_and_grad(objective),
        750,
        2,
        None,
        target,
        strict=True,
    )


def newton_case(size: str) -> Case:
    """Nonlinear heat: damped Newton vs ``lgf(newton(eta), dt=eta)``; size MODESxGRID
    (n = MODES^2 unknowns; 15x60 is the example's)."""
    import jax
    import jax.numpy as jnp

    import lgfjax
    from lgfjax._newton import newton, newton_direction, value_and_newton_direction

    ex = _import_example("nonlinear_heat_newton")
    modes, grid = _pair(size)
    problem = ex.make_problem(modes, grid)
    eta = 0.15
    grad = jax.grad(problem.energy)
    r0 = float(jnp.linalg.norm(jax.jit(grad)(problem.a0)))

    def residual(params):
        return jnp.linalg.norm(grad(params)) / r0

    def target(base, lgf):
        t = deepest_common([base[-1], lgf[-1]])
        if t is None:
            return None, "no level in 1e-4 ... 1e-12 reached by both"
        return t, f"|grad z| <= {t:.0e} |grad z0| (deepest common)"

    return Case(
        "nonlinear_heat_newton",
        size,
        f"{modes}x{modes} modes (n = {modes**2}), grid {grid}",
        problem.a0,
        problem.energy,
        lambda: newton(eta),
        lambda: lgfjax.lgf(newton(eta), dt=eta),
        newton_direction(problem.energy),
        value_and_newton_direction(problem.energy),
        300,
        2,
        residual,
        target,
    )


def deep_energy_case(size: str) -> Case:
    """Deep energy method: Adam vs ``lgf_adam(lr)``; size GRID (GRID^3 points; 16 is
    the example's)."""
    import jax
    import optax

    import lgfjax

    jax.config.update("jax_enable_x64", True)  # as the example
    de = _import_example("deep_energy")
    n = int(size)
    params, static = de.make_model(jax.random.PRNGKey(0))
    points, weight = de.grid(n)
    loss = de.make_loss(static, points, weight)

    def target(base, lgf):
        return float(base[-1]), "the base's final loss"

    return Case(
        "deep_energy",
        size,
        f"{n}^3 grid, MLP 3-20-20-3 (560 weights)",
        params,
        loss,
        lambda: optax.adam(de.LR),
        lambda: lgfjax.lgf_adam(de.LR),
        jax.value_and_grad(loss),
        lgfjax.value_and_grad(loss),
        1000,
        2,
        None,
        target,
    )


def topology_case(size: str) -> Case:
    """MBB beam: gradient descent vs ``lgf(sgd(lr), dt=lr)``; size NELXxNELY (60x20 is
    the example's). The default gets the loss as `value_fn`, as in the example."""
    import jax
    import jax.numpy as jnp

    ex = _import_example("topology_optimization")
    nelx, nely = _pair(size)
    problem = ex.mbb_beam(nelx, nely)
    settings = ex.Settings()
    loss = functools.partial(ex.objective, problem)

    def target(base, lgf):
        # 1.01 x the final compliance, on the log scale the optimisers see.
        return float(base[-1]) + math.log(1.01), "1.01 x the base's final compliance"

    import lgfjax

    return Case(
        "topology_optimization",
        size,
        f"{nelx} x {nely} Q4 mesh",
        jnp.zeros((nely, nelx)),
        loss,
        lambda: ex.make_optimisers(problem, settings)[0],
        lambda: ex.make_default(problem, settings),
        jax.value_and_grad(loss),
        lgfjax.value_and_grad(loss),
        490,
        2,
        None,
        target,
        update_extra=lambda: {"value_fn": loss},
    )


def wave_case(size: str) -> Case:
    """Wave inverse: Adam vs ``lgf_adam(lr)``; size N (N x N squares, 2 N^2 P1
    elements; 10 is the example's). Time steps 300 x N / 10 (rounded up), which keeps
    the CFL margin of the example's mesh."""
    import jax

    import lgfjax

    ex = _import_example("wave_inverse")
    n = int(size)
    steps = max(300, math.ceil(300 * n / 10))
    problem = ex.make_problem(n, steps=steps)
    import optax

    def target(base, lgf):
        return float(base[-1]), "the base's final parameter error"

    return Case(
        "wave_inverse",
        size,
        f"{len(problem.mesh.elements)} P1 elements, {steps} time steps",
        problem.a0,
        problem.loss,
        lambda: optax.adam(ex.LR),
        lambda: lgfjax.lgf_adam(ex.LR),
        jax.value_and_grad(problem.loss),
        lgfjax.value_and_grad(problem.loss),
        ex.STEPS // 2,
        8,
        problem.error,
        target,
    )


BUILDERS = {
    "heat_inverse": heat_case,
    "nonlinear_heat_newton": newton_case,
    "deep_energy": deep_energy_case,
    "topology_optimization": topology_case,
    "wave_inverse": wave_case,
}


def build(example: str, size: str) -> Case:
    import jax

    jax.config.update("jax_enable_x64", True)  # every example runs in float64
    return BUILDERS[canonical(example)](size)


# ----------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------


def _step_fn(case: Case, opt, lgf: bool, record: bool):
    """One update as a scan body; with `record`, it also returns (value, gradients
    used, measure of the new iterate)."""
    import jax.numpy as jnp
    import optax

    import lgfjax

    extra = case.update_extra() if (lgf and case.update_extra) else {}

    def body(carry, _):
        p, s = carry
        if lgf:
            value, d = case.lgf_direction(p, s)
            u, s = opt.update(d, s, p, value=value, **extra)
            used = lgfjax.gradient_evaluations(s)
        else:
            value, d = case.base_direction(p)
            u, s = opt.update(d, s, p)
            used = jnp.zeros((), jnp.int32)
        p = optax.apply_updates(p, u)
        if not record:
            return (p, s), None
        m = case.measure(p) if case.measure is not None else jnp.zeros(())
        return (p, s), (value, used, m)

    return body


class History(NamedTuple):
    measure: np.ndarray  # (T + 1,) progress measure of iterates 0..T (NaN: unknown)
    evaluations: np.ndarray  # (T + 1,) true gradients spent to reach each iterate
    steps: int  # T, updates run
    gradients: int  # true gradients in all
    state: Any


def discover(case: Case, which: str, budget: int, chunk: int, stop=None) -> History:
    """Run `which` ("base" or "lgf") for up to `budget` updates in chunks of `chunk`
    (one compiled scan, reused), recording its history; stop after the chunk in which
    `stop(history)` first holds."""
    import jax

    lgf = which == "lgf"
    opt = case.lgf() if lgf else case.base()
    params = case.params
    state = opt.init(params)
    body = _step_fn(case, opt, lgf, record=True)
    n = min(chunk, budget)

    @jax.jit
    def run_chunk(p, s):
        return jax.lax.scan(body, (p, s), None, length=n)

    values, used, measures = [], [], []
    done = 0
    while done < budget:
        (params, state), (v, u, m) = run_chunk(params, state)
        values.append(np.asarray(v))
        used.append(np.asarray(u))
        measures.append(np.asarray(m))
        done += n
        if stop is not None and stop(_history(case, lgf, values, used, measures, params, state)):
            break
    return _history(case, lgf, values, used, measures, params, state)


def _history(case, lgf, values, used, measures, params, state) -> History:
    import jax

    values, used, measures = (np.concatenate(x) for x in (values, used, measures))
    steps = values.size
    evals = np.concatenate([[0], used]) if lgf else np.arange(steps + 1)
    if case.measure is None:
        # The loss at iterate k comes with the gradient taken there (NaN in surrogate
        # steps); the last iterate's is computed here (not counted).
        final = float(jax.jit(case.objective)(params))
        measure = np.concatenate([values.astype(float), [final]])
    else:
        first = float(jax.jit(case.measure)(case.params))
        measure = np.concatenate([[first], measures.astype(float)])
    return History(measure, evals.astype(int), steps, int(evals[-1]), state)


def timed_run(case: Case, which: str, steps: int) -> dict:
    """One run of exactly `steps` updates, timed from building the optimiser (eager
    init, tracing, compilation, the compiled run) to the last result."""
    import jax

    import lgfjax

    lgf = which == "lgf"
    start = time.perf_counter()
    opt = case.lgf() if lgf else case.base()
    state = opt.init(case.params)
    body = _step_fn(case, opt, lgf, record=False)

    def run_all(p, s):
        return jax.lax.scan(body, (p, s), None, length=steps)[0]

    compiled = jax.jit(run_all).lower(case.params, state).compile()
    compiled_at = time.perf_counter()
    params, state = jax.block_until_ready(compiled(case.params, state))
    end = time.perf_counter()
    evals = int(lgfjax.gradient_evaluations(state)) if lgf else steps
    # Not timed: the measure of the last iterate, to check that the run got there.
    final = jax.jit(case.objective if case.measure is None else case.measure)(params)
    return {
        "total_s": end - start,
        "compile_s": compiled_at - start,
        "run_s": end - compiled_at,
        "gradients": evals,
        "final_measure": float(final),
    }


def update_costs(case: Case, max_updates: int = 400, budget_s: float = 25.0) -> dict:
    """Per-update costs of the default and the cost of one gradient (see the module
    docstring); each call timed alone with `block_until_ready`."""
    import jax
    import jax.numpy as jnp
    import optax

    import lgfjax

    direction = jax.jit(case.base_direction)
    jax.block_until_ready(direction(case.params))
    gradient_s = _median_time(lambda: jax.block_until_ready(direction(case.params)))

    opt = case.lgf()
    extra = case.update_extra() if case.update_extra else {}

    def step(p, s, d, v):
        u, s = opt.update(d, s, p, value=v, **extra)
        return optax.apply_updates(p, u), s

    p = jax.tree_util.tree_map(jnp.copy, case.params)
    s = opt.init(p)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, p)
    nan = jnp.asarray(jnp.nan, jnp.result_type(float))
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(p, s, zeros, nan).compile()
    times = {"true": [], "fit": [], "surrogate": []}
    start = time.perf_counter()
    for i in range(max_updates):
        true = bool(lgfjax.needs_gradient(s))
        if true:
            v, d = direction(p)
        else:
            v, d = nan, zeros
        jax.block_until_ready((p, s, d, v))
        t0 = time.perf_counter()
        p, s = jax.block_until_ready(compiled(p, s, d, v))
        t = time.perf_counter() - t0
        fits = true and not bool(lgfjax.needs_gradient(s))
        if i >= 2:  # the first updates warm caches and allocators
            times["fit" if fits else ("true" if true else "surrogate")].append(t)
        enough = len(times["fit"]) >= 3 and len(times["surrogate"]) >= 20
        if enough or time.perf_counter() - start > budget_s:
            break
    med = {k: (statistics.median(v) if v else None) for k, v in times.items()}
    return {
        "gradient_seconds": gradient_s,
        "surrogate_step_seconds": med["surrogate"],
        "fit_seconds": med["fit"],
        "true_update_seconds": med["true"],
        "update_counts": {k: len(v) for k, v in times.items()},
    }


# ----------------------------------------------------------------------------------
# One (example, size): discovery, costs, timed runs in fresh processes
# ----------------------------------------------------------------------------------


def _child_env() -> dict:
    return dict(os.environ)


def in_fresh_process(example, size, which, steps) -> dict:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", example, size, which, str(steps)],
        check=True,
        capture_output=True,
        text=True,
        env=_child_env(),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _git(*args) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def machine() -> str:
    import jax

    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (
        f"{os.cpu_count()} CPUs ({model}), jax {jax.__version__} on {jax.default_backend()} "
        f"({devices}), Python {platform.python_version()}"
    )


def measure_one(
    example: str, size: str, rounds: int = 1, steps: int | None = None, factor: int | None = None
) -> dict:
    """Everything for one (example, size); see the module docstring. `factor`
    replaces the example's budget of the default (a multiple of the base's)."""
    t_start = time.perf_counter()
    example = canonical(example)
    case = build(example, size)
    load_start = _load()
    n_base = steps or case.steps
    chunk = max(1, n_base // 2)
    base = discover(case, "base", n_base, n_base)
    # The target may need the default's final value (Newton); else the default stops
    # after the chunk in which it first reaches it.
    pre_target, _ = case.target(base.measure, base.measure)
    stop, strict = None, case.strict
    if example != "nonlinear_heat_newton" and pre_target is not None:

        def stop(h):
            return first_hit(h.measure, pre_target, strict) is not None

    factor = factor or case.factor
    lgf = discover(case, "lgf", factor * n_base, chunk, stop)
    target, target_text = case.target(base.measure, lgf.measure)
    hits = {}
    for name, h in (("base", base), ("lgf", lgf)):
        hit = None if target is None else first_hit(h.measure, target, case.strict)
        hits[name] = (hit, None if hit is None else int(h.evaluations[hit]))
    discovery_s = time.perf_counter() - t_start
    costs = update_costs(case)
    label = case.label
    del case, base, lgf  # free the problem's arrays before the timed processes run
    (s_base, g_base), (s_lgf, g_lgf) = hits["base"], hits["lgf"]
    gradient_ratio = g_lgf / g_base if (g_base and g_lgf is not None) else None
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, s in (("base", s_base), ("lgf", s_lgf)):
            if not (s_base and s_lgf):
                break  # no ratio without both: neither is timed
            r = in_fresh_process(example, size, name, s)
            if name not in best or r["total_s"] < best[name]["total_s"]:
                best[name] = r
    b, g = best.get("base"), best.get("lgf")

    def reached(r):
        if r is None or target is None:
            return None
        v = r["final_measure"]
        return bool(v < target if strict else v <= target)

    def get(r, key):
        return None if r is None else r[key]

    base_total, lgf_total = get(b, "total_s"), get(g, "total_s")
    surrogate, gradient_s = costs["surrogate_step_seconds"], costs["gradient_seconds"]
    return {
        "example": example,
        "size": size,
        "size_label": label,
        "largest": size == SIZES[example][-1] if size in SIZES[example] else None,
        "base_budget": n_base,
        "lgf_budget": factor * n_base,
        "target": target,
        "target_text": target_text,
        "base_steps": s_base,
        "lgf_steps": s_lgf,
        "base_gradients": g_base,
        "lgf_gradients": g_lgf,
        **costs,
        "gradient_over_surrogate": gradient_s / surrogate if surrogate else None,
        "base_total_seconds": base_total,
        "lgf_total_seconds": lgf_total,
        "base_compile_seconds": get(b, "compile_s"),
        "lgf_compile_seconds": get(g, "compile_s"),
        "base_run_seconds": get(b, "run_s"),
        "lgf_run_seconds": get(g, "run_s"),
        "base_timed_gradients": get(b, "gradients"),
        "lgf_timed_gradients": get(g, "gradients"),
        "base_timed_reached": reached(b),
        "lgf_timed_reached": reached(g),
        "base_timed_final": get(b, "final_measure"),
        "lgf_timed_final": get(g, "final_measure"),
        "gradient_ratio": gradient_ratio,
        "wall_ratio": None if (b is None or g is None) else lgf_total / base_total,
        "rule_bound": None if gradient_ratio is None else RULE * gradient_ratio,
        "rule_holds": rule_holds(lgf_total, base_total, gradient_ratio),
        "rounds": rounds,
        "discovery_seconds": discovery_s,
        "seconds": time.perf_counter() - t_start,
        "machine": machine(),
        "load_start": load_start,
        "load_end": _load(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "persistent_cache": os.environ.get("JAX_COMPILATION_CACHE_DIR"),
    }


# ----------------------------------------------------------------------------------
# The sweep, its table and its plot
# ----------------------------------------------------------------------------------

TABLE_BEGIN = "<!-- sweep:table begin (written by benchmarks/bench_sweep.py --summarise) -->"
TABLE_END = "<!-- sweep:table end -->"
RECORDS_BEGIN = "<!-- sweep:records begin (written by benchmarks/bench_sweep.py --summarise) -->"
RECORDS_END = "<!-- sweep:records end -->"


def json_path(outdir: str, example: str, size: str) -> str:
    return os.path.join(outdir, f"{example}_{size}.json")


def sweep(outdir: str, only=None, largest_first: bool = False, rounds: int = 1) -> None:
    """Every published (example, size), each in its own process (`--example`)."""
    os.makedirs(outdir, exist_ok=True)
    pairs = [(e, s) for e, s in published() if not only or e in only]
    if largest_first:
        # Each example's largest size first, then the next largest, and so on.
        depth = {e: len(SIZES[e]) for e, _ in pairs}
        pairs.sort(key=lambda p: depth[p[0]] - 1 - SIZES[p[0]].index(p[1]))
    for example, size in pairs:
        path = json_path(outdir, example, size)
        cmd = [sys.executable, os.path.abspath(__file__), "--example", example, "--size", size]
        cmd += ["--json", path, "--rounds", str(rounds)]
        print(f"{datetime.datetime.now(datetime.UTC):%H:%M:%S} {example} {size}", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=_child_env())
        status = "ok" if done.returncode == 0 else f"failed ({done.returncode})"
        print(f"  {status} in {time.perf_counter() - t0:.0f} s", flush=True)


DROPPED = ("base_other_seconds", "lgf_other_seconds")  # early records' per-call estimates


def load_results(outdir: str) -> list[dict]:
    rows = []
    for example, size in published():
        path = json_path(outdir, example, size)
        if os.path.exists(path):
            with open(path) as f:
                rows.append({k: v for k, v in json.load(f).items() if k not in DROPPED})
    return rows


def _cell(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _ms(v):
    return "-" if v is None else f"{1e3 * v:.3g}"


def table(rows: list[dict]) -> str:
    """The sweep's Markdown table, one row per (example, size) that ran."""
    header = [
        "example",
        "size",
        "gradient [ms]",
        "base step in its run [ms]",
        "surrogate step [ms]",
        "gradient / surrogate",
        "fit [ms]",
        "compile base / LGF [s]",
        "base wall [s] (updates, gradients)",
        "LGF wall [s] (updates, gradients)",
        "gradient ratio",
        "wall ratio",
        f"rule: wall <= {RULE} x gradient ratio",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        compile_ = f"{_cell(r['base_compile_seconds'])} / {_cell(r['lgf_compile_seconds'])}"
        base = f"{_cell(r['base_total_seconds'])} ({r['base_steps']}, {r['base_gradients']})"
        lgf = f"{_cell(r['lgf_total_seconds'])} ({r['lgf_steps']}, {r['lgf_gradients']})"
        if r["lgf_steps"] is None:
            lgf = f"not reached in {r['lgf_budget']} updates"
        rule = _cell(r["rule_holds"])
        if r["rule_holds"] is not None:
            rule = f"{rule} (bound {r['rule_bound']:.3g})"
        size = f"{r['size']}: {r['size_label']}" + (" (largest)" if r.get("largest") else "")
        g_over_s = r["gradient_over_surrogate"]
        cells = [
            SHORT[r["example"]],
            size,
            _ms(r["gradient_seconds"]),
            _ms(_base_step(r)) if r["base_run_seconds"] else "-",
            _ms(r["surrogate_step_seconds"]),
            "-" if g_over_s is None else f"{g_over_s:.{0 if g_over_s >= 10 else 1}f}",
            _ms(r["fit_seconds"]),
            compile_,
            base,
            lgf,
            _cell(r["gradient_ratio"]),
            _cell(r["wall_ratio"]),
            rule,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _base_step(r: dict) -> float:
    """Seconds per update of the base in its timed run (one gradient each)."""
    return r["base_run_seconds"] / r["base_steps"]


def plot(rows: list[dict], path: str) -> str:
    """Wall ratio against the cost of one gradient, one line per example; triangles
    on a dotted line, in the same colour, the rule's bound (1.25 x the gradient ratio).

    The cost of a gradient on the x-axis is the base's update in its timed run (run
    time / updates: one gradient and the base's own cheap step, compiled in the scan),
    which is what the runs paid; a lone jitted gradient call (the table's "gradient"
    column) measured up to 2.3x more on the loaded machine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for example in SIZES:
        mine = [r for r in rows if r["example"] == example and r["wall_ratio"] is not None]
        if not mine:
            continue
        mine.sort(key=_base_step)
        x = [1e3 * _base_step(r) for r in mine]
        (line,) = ax.plot(x, [r["wall_ratio"] for r in mine], "o-", label=SHORT[example])
        bound = [r["rule_bound"] for r in mine]
        ax.plot(x, bound, "v:", color=line.get_color(), lw=1, ms=4, mfc="none")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.text(0.01, 1.02, "break-even", fontsize=8, va="bottom", transform=ax.get_yaxis_transform())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(
        "cost of one gradient [ms]: the base's update in its run\n"
        "(Newton heat: gradient, Hessian and solve)"
    )
    ax.set_ylabel("wall time to the target, LGF default / base")
    ax.set_title(
        "Where LGF pays off: whole-run wall time with compilation\n"
        f"(triangles, dotted: the rule's bound, {RULE} x gradient ratio; below 1: LGF "
        "is faster)",
        fontsize=9,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summarise(outdir: str, md_path: str = SWEEP_MD, plot_path: str = PLOT) -> str:
    """Write the table and the raw records into `md_path` (between its markers; a
    new file if there is none) and the plot; return the table."""
    rows = load_results(outdir)
    text = table(rows)
    records = "```json\n" + "\n".join(json.dumps(r) for r in rows) + "\n```"
    doc = f"# bench_sweep.py\n\n{TABLE_BEGIN}\n{TABLE_END}\n\n{RECORDS_BEGIN}\n{RECORDS_END}\n"
    if os.path.exists(md_path):
        with open(md_path) as f:
            doc = f.read()
    for begin, end_marker, body in (
        (TABLE_BEGIN, TABLE_END, text),
        (RECORDS_BEGIN, RECORDS_END, records),
    ):
        if begin in doc and end_marker in doc:
            start, end = doc.index(begin), doc.index(end_marker)
            doc = doc[: start + len(begin)] + "\n" + body + "\n" + doc[end:]
    os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
    with open(md_path, "w") as f:
        f.write(doc)
    if rows:
        plot(rows, plot_path)
    missing = [f"{e} {s}" for e, s in published() if not os.path.exists(json_path(outdir, e, s))]
    if missing:
        print("not run:", ", ".join(missing))
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the published pairs")
    parser.add_argument("--example", help="an example (module name or alias)")
    parser.add_argument("--size", help="its size (see --list)")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--rounds", type=int, default=1, help="timed runs of each (minimum)")
    parser.add_argument("--steps", type=int, help="the base's budget N (smoke tests)")
    parser.add_argument(
        "--factor", type=int, help="the default's budget as a multiple of N (else the example's)"
    )
    parser.add_argument("--sweep", action="store_true", help="run every published pair")
    parser.add_argument("--only", nargs="+", help="with --sweep: these examples")
    parser.add_argument(
        "--largest-first", action="store_true", help="with --sweep: largest sizes first"
    )
    parser.add_argument("--outdir", default=OUTDIR, help="the sweep's JSON files")
    parser.add_argument(
        "--summarise", action="store_true", help="sweep.md's table and the plot from --outdir"
    )
    parser.add_argument(
        "--md", default=SWEEP_MD, help="with --summarise: the Markdown file to rewrite"
    )
    parser.add_argument("--plot", default=PLOT, help="with --summarise: where the plot goes")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        example, size, which, steps = args.child
        print(json.dumps(timed_run(build(example, size), which, int(steps))))
        return None
    if args.list:
        for example, size in published():
            print(example, size)
        return None
    if args.sweep:
        only = [canonical(e) for e in args.only] if args.only else None
        sweep(args.outdir, only, args.largest_first, args.rounds)
        print(summarise(args.outdir, args.md, args.plot))
        return None
    if args.summarise:
        print(summarise(args.outdir, args.md, args.plot))
        return None
    if not (args.example and args.size):
        parser.error("give --example and --size (or --list, --sweep, --summarise)")
    result = measure_one(args.example, args.size, args.rounds, args.steps, args.factor)
    text = json.dumps(result, indent=1)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
