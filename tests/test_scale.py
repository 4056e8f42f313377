"""Per-update cost at scale, without a timer: what the compiled training step copies.

A surrogate step should cost O(rank n) and a true step the base's step plus O(n) to
record it; only a fit may read all K rows of the trajectory buffers. The buffers are
updated in place in loops taken once or never, and XLA keeps that in-place update only
if no other operation reads the buffer first: otherwise it copies all K rows on every
update (a regression measured at 50-100x an sgd step at n = 1e6, issue 31). So the
compiled step of a real training loop (parameters and state donated) must hold no copy
of a buffer-sized array, in any of its computations. Counting copies in the optimised
HLO is exact (it is the program XLA runs) and independent of the machine's speed.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import lgfjax

N, K = 1009, 6  # a prime n, so that no other array shares the buffers' shapes


def _copies(text: str, min_elements: int) -> list[str]:
    """The copy instructions of an HLO module whose result has >= `min_elements`."""
    found = []
    for line in text.splitlines():
        m = re.match(r"\s+(?:ROOT )?%(\S+) = \w+\[([0-9,]*)\]\S* copy\(", line)
        if m and m.group(2):
            size = math.prod(int(d) for d in m.group(2).split(","))
            if size >= min_elements:
                found.append(line.strip()[:120])
    return found


def _compiled_step(opt, dtype=jnp.float32) -> str:
    d = jnp.linspace(0.5, 2.0, N, dtype=dtype)

    def loss(x):
        return 0.5 * jnp.sum(d * x * x)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state):
        value, grads = lgfjax.value_and_grad(loss)(params, state)
        updates, state = opt.update(grads, state, params, value=value)
        return optax.apply_updates(params, updates), state

    params = jnp.ones(N, dtype)
    return step.lower(params, opt.init(params)).compile().as_text()


OPTIMISERS = {
    "lgf-verified": lambda: lgfjax.lgf(
        optax.sgd(1e-2), dt=1e-2, schedule=lgfjax.Verified(history_size=K)
    ),
    "lgf-fixed-pod": lambda: lgfjax.lgf(
        optax.sgd(1e-2),
        dt=1e-2,
        schedule=lgfjax.Fixed(history_size=K, retrain_interval=4 * K),
        fit=lgfjax.Fit(rank=4, poly_order=2),
    ),
    "lgf-adam-base": lambda: lgfjax.lgf(
        optax.adam(1e-2), dt=1e-2, schedule=lgfjax.Verified(history_size=K)
    ),
    "lgf_adam": lambda: lgfjax.lgf_adam(1e-2, schedule=lgfjax.Verified(history_size=K)),
    "lgf_adam-fixed-pod": lambda: lgfjax.lgf_adam(
        1e-2,
        schedule=lgfjax.Fixed(history_size=K, retrain_interval=4 * K),
        fit=lgfjax.Fit(rank=4, poly_order=2),
    ),
}


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_no_update_copies_the_trajectory_buffers(name):
    # Any copy with K rows of n (or more) would be paid on every update, true or
    # surrogate; the fixed schedule's window holds K + 1 rows, so K n catches both.
    copies = _copies(_compiled_step(OPTIMISERS[name]()), K * N)
    assert copies == [], f"{name}: buffer-sized copies on every update:\n" + "\n".join(copies)


def test_copy_counter_sees_a_copy():
    # The check above can fail: a read of the buffer outside the in-place loop makes XLA
    # copy it (the pattern that caused the regression).
    from lgfjax._engine import once_or_never

    def f(buf, x, when):
        last = buf[0] * 2.0  # read before the in-place write below
        return once_or_never(when, lambda b: b.at[1].set(x), buf), last

    buf = jnp.zeros((K, N), jnp.float32)
    text = (
        jax.jit(f, donate_argnums=0)
        .lower(buf, jnp.ones(N, jnp.float32), jnp.asarray(True))
        .compile()
        .as_text()
    )
    assert _copies(text, K * N)


@pytest.mark.parametrize("name", ["lgf-verified", "lgf_adam"])
def test_no_temporary_grows_with_the_history(name):
    # A fit may read all K rows, but must not form a (K, n) temporary (the centred
    # points, before a fit centred them block by block): XLA's CPU runtime allocates a
    # step's temporaries on every call, so their size is paid by every update, and
    # above malloc's mmap threshold each update page-faults them afresh. Between K = 4
    # and K = 8 the temporaries may grow by the fit's (K, BLOCK) blocks (two of them,
    # 8 BLOCK floats), not by a (4, n) array (32 BLOCK floats here).
    from lgfjax._pod import BLOCK

    n = 8 * BLOCK + 3  # so that the points are centred in blocks
    d = jnp.linspace(0.5, 2.0, n, dtype=jnp.float32)

    def temporaries(k):
        opt = (
            lgfjax.lgf(optax.sgd(1e-2), dt=1e-2, schedule=lgfjax.Verified(history_size=k))
            if name == "lgf-verified"
            else lgfjax.lgf_adam(1e-2, schedule=lgfjax.Verified(history_size=k))
        )

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(params, state):
            value, grads = lgfjax.value_and_grad(lambda x: 0.5 * jnp.sum(d * x * x))(params, state)
            updates, state = opt.update(grads, state, params, value=value)
            return optax.apply_updates(params, updates), state

        params = jnp.ones(n, jnp.float32)
        compiled = step.lower(params, opt.init(params)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    grown = temporaries(8) - temporaries(4)
    assert grown < 2 * n * 4, f"{name}: temporaries grew by {grown} bytes from K = 4 to 8"


@pytest.mark.parametrize("name", ["lgf_adam", "lgf_adam-fixed-pod"])
def test_the_adam_ode_keeps_no_stage_buffer(name):
    # lgf_adam integrates its ODE in the full space (moments per parameter). diffrax's
    # stage loop keeps a (stages, n) buffer per state and writes and contracts it on
    # every stage (2.4x the whole surrogate step at n = 1e6, K = 10); `erk_step` writes
    # RK4's stages out instead. So no 4-row array of n is written in place anywhere in
    # the compiled step (the fixed schedule's (4, n) POD basis is never updated so).
    hlo = _compiled_step(OPTIMISERS[name]())
    stage_buffers = [
        line.strip()[:120]
        for line in hlo.splitlines()
        if re.search(rf"= f32\[4,(1,)?{N}\]", line) and "dynamic-update-slice" in line
    ]
    assert not stage_buffers, stage_buffers


@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_no_update_copies_its_donated_inputs(name):
    # The parameters and the base's state are donated and updated in place; a read of
    # their old values after the in-place write (the best point kept after the step
    # had run) makes XLA copy them first, on every update: with optax's Adam as the
    # base, the parameters and both moments, three passes over n per update.
    hlo = _compiled_step(OPTIMISERS[name]())
    entry = hlo[hlo.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    inputs = set(re.findall(r"%(\S+) = \S+ parameter\(", entry))
    copied = [
        source
        for shape, source in re.findall(r"= (\S+) copy\(%([^)]+)\)", entry)
        if source in inputs and str(N) in shape
    ]
    assert not copied, copied
