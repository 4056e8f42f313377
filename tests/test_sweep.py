"""benchmarks/bench_sweep.py: its list of sizes, its helpers and its JSON record.

No wall-clock assertions: only the structure of what it writes and its pure helpers.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "benchmarks", "bench_sweep.py")
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))

import bench_sweep  # noqa: E402

EXAMPLES = (
    "heat_inverse",
    "nonlinear_heat_newton",
    "deep_energy",
    "topology_optimization",
    "wave_inverse",
)


def test_list_prints_every_example_at_three_sizes_or_more_largest_last():
    out = subprocess.run(
        [sys.executable, SCRIPT, "--list"], capture_output=True, text=True, check=True
    ).stdout
    pairs = [tuple(line.split()) for line in out.splitlines() if line.strip()]
    assert {e for e, _ in pairs} == set(EXAMPLES)
    for example in EXAMPLES:
        sizes = [s for e, s in pairs if e == example]
        assert len(sizes) >= 3
        assert sizes == bench_sweep.SIZES[example]
        assert sizes[-1] == bench_sweep.SIZES[example][-1]


def test_sizes_grow_and_the_defaults_are_published():
    # The example's own default size is one of the published ones, and every later size
    # is larger in every dimension.
    defaults = {
        "heat_inverse": "30x500",
        "nonlinear_heat_newton": "15x60",
        "deep_energy": "16",
        "topology_optimization": "60x20",
        "wave_inverse": "10",
    }
    for example, sizes in bench_sweep.SIZES.items():
        assert defaults[example] in sizes
        dims = [tuple(int(v) for v in s.split("x")) for s in sizes]
        for a, b in zip(dims, dims[1:], strict=False):
            assert all(y > x for x, y in zip(a, b, strict=True))


def test_aliases():
    assert bench_sweep.canonical("heat") == "heat_inverse"
    assert bench_sweep.canonical("newton_heat") == "nonlinear_heat_newton"
    assert bench_sweep.canonical("wave_inverse") == "wave_inverse"
    with pytest.raises(ValueError):
        bench_sweep.canonical("nope")


def test_helpers():
    nan = float("nan")
    assert bench_sweep.first_hit([3.0, nan, 1.0, 0.5], 1.0) == 2
    assert bench_sweep.first_hit([3.0, nan, 1.0, 0.5], 1.0, strict=True) == 3
    assert bench_sweep.first_hit([nan, 2.0], 1.0) is None
    assert bench_sweep.deepest_common([2e-9, 5e-8]) == 1e-6
    assert bench_sweep.deepest_common([1e-13, 1e-14]) == 1e-12
    assert bench_sweep.deepest_common([0.5]) is None
    assert bench_sweep.rule_holds(2.5, 10.0, 0.2) is True  # 2.5 <= 1.25 x 0.2 x 10
    assert bench_sweep.rule_holds(2.6, 10.0, 0.2) is False
    assert bench_sweep.rule_holds(None, 10.0, 0.2) is None


def _row(example, size, **kw):
    row = dict.fromkeys(
        [
            "gradient_seconds",
            "surrogate_step_seconds",
            "fit_seconds",
            "base_compile_seconds",
            "lgf_compile_seconds",
            "base_run_seconds",
            "base_total_seconds",
            "lgf_total_seconds",
            "base_steps",
            "base_gradients",
            "lgf_steps",
            "lgf_gradients",
            "gradient_ratio",
            "wall_ratio",
            "rule_bound",
            "rule_holds",
            "gradient_over_surrogate",
        ]
    )
    row.update(example=example, size=size, size_label="", largest=False, lgf_budget=10)
    row.update(kw)
    return row


def test_table_and_plot(tmp_path):
    rows = [
        _row("heat_inverse", "30x500"),
        _row(
            "topology_optimization",
            "60x20",
            gradient_seconds=0.01,
            surrogate_step_seconds=1e-4,
            gradient_over_surrogate=100.0,
            fit_seconds=2e-3,
            base_compile_seconds=1.0,
            lgf_compile_seconds=3.0,
            base_run_seconds=3.0,
            base_total_seconds=4.0,
            lgf_total_seconds=3.0,
            base_steps=300,
            base_gradients=300,
            lgf_steps=600,
            lgf_gradients=90,
            gradient_ratio=0.3,
            wall_ratio=0.75,
            rule_bound=0.375,
            rule_holds=False,
            largest=True,
        ),
    ]
    text = bench_sweep.table(rows)
    lines = text.splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "not reached in 10 updates" in lines[2]
    assert "**no** (bound 0.375)" in lines[3] and "(largest)" in lines[3]
    path = bench_sweep.plot(rows, str(tmp_path / "sweep.png"))
    assert os.path.getsize(path) > 0


@pytest.mark.slow  # about 20 s on a loaded 2-core machine (four compiles, two processes)
def test_json_record_on_a_tiny_size(tmp_path):
    """The whole pipeline on a tiny Newton problem (5 x 5 modes, 80 updates): the JSON
    holds the issue's keys and the counts are consistent. No timing is asserted."""
    path = tmp_path / "out.json"
    subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--example",
            "newton",
            "--size",
            "5x20",
            "--steps",
            "80",
            "--json",
            str(path),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    r = json.loads(path.read_text())
    for key in (
        "example",
        "size",
        "gradient_seconds",
        "surrogate_step_seconds",
        "fit_seconds",
        "base_compile_seconds",
        "lgf_compile_seconds",
        "base_total_seconds",
        "lgf_total_seconds",
        "gradient_ratio",
        "wall_ratio",
        "rule_holds",
    ):
        assert key in r
    assert r["example"] == "nonlinear_heat_newton" and r["size"] == "5x20"
    assert r["target"] is not None
    assert r["base_gradients"] == r["base_steps"]  # every base step is a true step
    assert 0 < r["lgf_gradients"] <= r["lgf_steps"]
    assert r["gradient_ratio"] == pytest.approx(r["lgf_gradients"] / r["base_gradients"])
    # The timed runs (fresh processes) took the same gradients as the discovery runs.
    assert r["base_timed_gradients"] == r["base_gradients"]
    assert r["lgf_timed_gradients"] == r["lgf_gradients"]
    for key in ("base_total_seconds", "lgf_total_seconds", "gradient_seconds"):
        assert r[key] > 0
    assert r["wall_ratio"] == pytest.approx(r["lgf_total_seconds"] / r["base_total_seconds"])
    assert r["base_compile_seconds"] <= r["base_total_seconds"]
