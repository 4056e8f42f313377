"""Run `lgfjax.lgf` on parameters sharded over 8 simulated CPU devices.

Run as a script (``python tests/_sharded_run.py``) by ``tests/test_sharding.py``:
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` has to be set before jax is
imported, which the test process already did. Prints one JSON object on the last
line of stdout with what the test checks.

``opt.init`` places the trajectory buffer and POD basis like the parameters: leaves
of shape ``(rows, *shape)`` get the parameter's `PartitionSpec` with a leading
``None``. The JSON records the shardings ``init`` produced, and the run uses that
state as it is.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import json  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import lgfjax  # noqa: E402

# Leaves large enough that any gather of an n-sized array shows up with a dimension
# of 128 or 256 (the sharded axes); every small LGF quantity (Gram 9 x 9,
# coefficients 15 x 4, coordinates) has dimensions below 32.
SHARDED_DIMS = (128, 256)
STEPS = 48  # two full cycles and part of a third
ULP = 1 + 4 * float(np.finfo(np.float64).eps)


def problem():
    rng = np.random.default_rng(0)
    # Four well-separated curvatures: the trajectory has four clear POD modes, so the
    # rank-4 basis is well conditioned and the comparison is one of rounding only.
    levels = np.array([1.0, 4.0, 10.0, 20.0])
    scales = {
        "w": jnp.asarray(rng.choice(levels, (128, 16))),
        "b": jnp.asarray(rng.choice(levels, (256,))),
    }
    params = {
        "w": jnp.asarray(rng.normal(size=(128, 16))),
        "b": jnp.asarray(rng.normal(size=(256,))),
    }
    if os.environ.get("LGFJAX_TEST_PERTURB") == "1":  # pytest --perturb
        params = {k: v * ULP for k, v in params.items()}

    def loss(p):
        # Separable quadratic plus a quartic, so the fitted flow is not trivial.
        return sum(jnp.sum(0.5 * scales[k] * p[k] ** 2 + 0.01 * p[k] ** 4) for k in ("w", "b"))

    return loss, params


def make_opt():
    return lgfjax.lgf(
        optax.sgd(0.04),
        dt=0.04,
        schedule=lgfjax.Fixed(history_size=8, retrain_interval=20),
        fit=lgfjax.Fit(rank=4, poly_order=2),
    )


def spec(x):
    s = x.sharding
    return str(s.spec) if isinstance(s, NamedSharding) else type(s).__name__


def same_sharding(x, like):
    """Whether `x` is laid out like the sharding `like` (trailing Nones don't matter)."""
    return bool(x.sharding.is_equivalent_to(like, x.ndim))


def main():
    loss, params0 = problem()
    opt = make_opt()

    def step(params, state):
        _, grads = lgfjax.value_and_grad(loss)(params, state)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    # Reference: one device.
    params, state = params0, opt.init(params0)
    jstep = jax.jit(step)
    for i in range(STEPS):
        params, state, _ = jstep(params, state)
        if i == 6:
            true_phase = params
    reference = params
    ref_evals = int(state.gradient_evaluations)
    # The same unsharded run from a start 4 ulps away: how far the fits amplify a
    # rounding-sized change (the yardstick for the sharded run's different sums).
    nudged = jax.tree_util.tree_map(lambda v: v * ULP, params0)
    nstate = opt.init(nudged)
    for _ in range(STEPS):
        nudged, nstate, _ = jstep(nudged, nstate)
    rounding_diff = max(float(jnp.max(jnp.abs(nudged[k] - reference[k]))) for k in nudged)

    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    shardings = {"w": NamedSharding(mesh, P("x", None)), "b": NamedSharding(mesh, P("x"))}
    params = jax.device_put(params0, shardings)
    raw_state = opt.init(params)
    init_specs = {k: spec(v) for k, v in raw_state.window.trajectory.items()}
    # init follows the parameters' sharding itself; no manual placement.
    state = raw_state
    in_specs = {
        "params": {k: spec(v) for k, v in params.items()},
        "trajectory": {k: spec(v) for k, v in state.window.trajectory.items()},
        "basis": {k: spec(v) for k, v in state.model.basis.items()},
    }

    # The compiled update alone, for the collectives LGF itself introduces: one
    # executable per phase is not needed, the switch holds all three branches.
    grads = jax.grad(loss)(params)
    update = jax.jit(lambda g, s, p: opt.update(g, s, p))
    hlo = update.lower(grads, state, params).compile().as_text()
    gathers = []
    for line in hlo.splitlines():
        if re.search(r"\ball-gather(-start)?\(", line):
            shape = re.search(r"=\s*\(?([a-z0-9]+\[[0-9,]*\])", line)
            gathers.append(shape.group(1) if shape else line.strip()[:120])
    big_gathers = [
        g
        for g in gathers
        if any(int(d) in SHARDED_DIMS for d in re.findall(r"\d+", g.split("[")[1]))
    ]
    reductions = len(re.findall(r"\ball-reduce(-start)?\(", hlo))

    rows = {k: NamedSharding(mesh, P(None, *v.spec)) for k, v in shardings.items()}
    jstep = jax.jit(step)
    out_specs = {"params": [], "updates": [], "trajectory": [], "basis": []}
    kept = []
    for i in range(STEPS):
        params, state, updates = jstep(params, state)
        if i == 6:  # still in the first true phase: nothing fitted yet
            first_phase_diff = float(jnp.max(jnp.abs(params["w"] - true_phase["w"])))
        if i in (3, 8, 12, STEPS - 1):  # true, fit, surrogate, last step
            out_specs["params"].append({k: spec(v) for k, v in params.items()})
            out_specs["updates"].append({k: spec(v) for k, v in updates.items()})
            out_specs["trajectory"].append({k: spec(v) for k, v in state.window.trajectory.items()})
            out_specs["basis"].append({k: spec(v) for k, v in state.model.basis.items()})
            kept.append(
                all(same_sharding(params[k], shardings[k]) for k in params)
                and all(same_sharding(updates[k], shardings[k]) for k in params)
                and all(same_sharding(state.window.trajectory[k], rows[k]) for k in params)
                and all(same_sharding(state.model.basis[k], rows[k]) for k in params)
            )

    diff = max(float(jnp.max(jnp.abs(params[k] - reference[k]))) for k in params)
    scale = max(float(jnp.max(jnp.abs(reference[k]))) for k in params)
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "init_trajectory_specs": init_specs,
                "in_specs": in_specs,
                "out_specs": out_specs,
                "shardings_kept": kept,
                "first_phase_diff": first_phase_diff,
                "max_abs_diff": diff,
                "rounding_diff": rounding_diff,
                "scale": scale,
                "gradient_evaluations": int(state.gradient_evaluations),
                "reference_gradient_evaluations": ref_evals,
                "fallbacks": int(state.info.fallbacks),
                "all_gathers": gathers,
                "n_sized_all_gathers": big_gathers,
                "all_reduces": reductions,
                "initial_loss": float(loss(params0)),
                "final_loss": float(loss(params)),
            }
        )
    )


if __name__ == "__main__":
    main()
