"""Run lgfjax on parameters sharded over a mesh with *explicit* axes (4 CPU devices).

`jax.make_mesh` gives `AxisType.Explicit` axes by default, under which JAX refuses to
guess the layout of a contraction over a sharded axis and diffrax cannot store
sharded states. Run as a script by ``tests/test_sharding.py``; prints one JSON object:
for each configuration, the largest difference from the unsharded run, the gradient
evaluations of both runs, and whether params, updates and buffers kept their layout.
Configuration names given as arguments restrict the run to those configurations.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402

if "--x64" in sys.argv:
    jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import lgfjax  # noqa: E402

CONFIGS = {
    "full": lambda: lgfjax.lgf(
        optax.sgd(0.04), dt=0.04, schedule=lgfjax.Fixed(history_size=8, retrain_interval=20)
    ),
    "rank_deg2": lambda: lgfjax.lgf(
        optax.sgd(0.04),
        dt=0.04,
        schedule=lgfjax.Fixed(history_size=8, retrain_interval=20),
        fit=lgfjax.Fit(rank=4, poly_order=2),
    ),
    "center": lambda: lgfjax.lgf(
        optax.sgd(0.04),
        dt=0.04,
        schedule=lgfjax.Fixed(history_size=8, retrain_interval=20),
        fit=lgfjax.Fit(rank=4, center=True),
    ),
    "check_every": lambda: lgfjax.lgf(
        optax.sgd(0.04),
        dt=0.04,
        schedule=lgfjax.Fixed(history_size=8, retrain_interval=20, check_every=4),
        fit=lgfjax.Fit(rank=4),
    ),
    "adam": lambda: lgfjax.lgf_adam(
        0.05, schedule=lgfjax.Fixed(history_size=8, retrain_interval=20), fit=lgfjax.Fit(rank=4)
    ),
}


def main():
    rng = np.random.default_rng(0)
    params0 = {"w": jnp.asarray(rng.normal(size=(16, 8))), "b": jnp.asarray(rng.normal(size=8))}
    ulp = 1 + 4 * float(jnp.finfo(params0["w"].dtype).eps)
    if os.environ.get("LGFJAX_TEST_PERTURB") == "1":  # pytest --perturb
        params0 = {k: v * ulp for k, v in params0.items()}
    scales = {k: jnp.asarray(rng.uniform(1.0, 5.0, size=v.shape)) for k, v in params0.items()}

    def loss(p):
        return sum(jnp.sum(0.5 * scales[k] * p[k] ** 2 + 0.01 * p[k] ** 4) for k in p)

    def stepper(opt):
        @jax.jit
        def step(p, s):
            _, grads = lgfjax.value_and_grad(loss)(p, s)
            updates, s = opt.update(grads, s, p, value_fn=loss)
            return optax.apply_updates(p, updates), s, updates

        return opt, step

    def run(opt_step, params, steps=40):
        # One jitted step per configuration: the unsharded and nudged runs share its
        # compiled program (same shapes and placement); the sharded run compiles its own.
        opt, step = opt_step
        state = opt.init(params)
        for _ in range(steps):
            params, state, updates = step(params, state)
        return params, state, updates

    mesh = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Explicit,))
    specs = {"w": P("x", None), "b": P()}
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    out = {"devices": jax.device_count(), "axis_types": str(mesh.axis_types)}
    # Configuration names on the command line pick a subset (default: all of them).
    names = [a for a in sys.argv[1:] if a in CONFIGS] or list(CONFIGS)
    for name in names:
        make = CONFIGS[name]
        opt_step = stepper(make())
        reference, ref_state, _ = run(opt_step, params0)
        # The same unsharded run from a start 4 ulps away: how far this configuration's
        # fits amplify a rounding-sized change, measured rather than assumed.
        nudged, _, _ = run(opt_step, {k: v * ulp for k, v in params0.items()})
        params, state, updates = run(opt_step, jax.device_put(params0, shardings))
        scale = max(float(jnp.max(jnp.abs(reference[k]))) for k in params)

        def rel(a, reference=reference, scale=scale):
            return max(float(jnp.max(jnp.abs(a[k] - reference[k]))) for k in a) / scale

        out[name] = {
            "rel_diff": rel(params),
            "rounding_rel_diff": rel(nudged),
            "evaluations": int(lgfjax.gradient_evaluations(state)),
            "reference_evaluations": int(lgfjax.gradient_evaluations(ref_state)),
            "params_spec": {k: str(jax.typeof(v).sharding.spec) for k, v in params.items()},
            "updates_spec": {k: str(jax.typeof(v).sharding.spec) for k, v in updates.items()},
            "trajectory_spec": {
                k: str(jax.typeof(v).sharding.spec) for k, v in state.window.trajectory.items()
            },
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
