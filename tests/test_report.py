"""The pure helpers of benchmarks/report.py (no example is run here)."""

import importlib.util
import math
import os

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "report.py")
_spec = importlib.util.spec_from_file_location("benchmark_report", _PATH)
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


@pytest.mark.parametrize(
    "values, target, strict, expected",
    [
        ([3.0, math.nan, 1.0, 0.5], 1.0, False, 2),
        ([3.0, math.nan, 1.0, 0.5], 1.0, True, 3),
        ([math.nan, math.inf, 2.0], 1.0, False, None),
        ([-7.0, -7.5, -7.6], -7.55, False, 2),  # negative losses
    ],
)
def test_first_reach(values, target, strict, expected):
    assert report.first_reach(values, target, strict) == expected


def test_saving_ratio_and_percent():
    # Integer inputs (not measured counts); approx only absorbs the order of the division
    # and subtraction, a few ulps.
    ratio, saved = report.saving(733, 375)
    assert ratio == pytest.approx(375 / 733)
    assert saved == pytest.approx(100 * (1 - 375 / 733))
    assert report.saving(664, 700)[1] < 0  # LGF losing shows as negative saving
    assert report.saving(None, 10) == (None, None)


def test_deepest_common_target():
    candidates = (1e-4, 1e-6, 1e-8, 1e-10, 1e-12)
    assert report.deepest_common_target([9e-21, 1.6e-20], candidates) == 1e-12
    assert report.deepest_common_target([1.2e-7, 1.4e-7], candidates) == 1e-6
    with pytest.raises(ValueError):
        report.deepest_common_target([1e-3], candidates)


@pytest.mark.parametrize(
    "step, evals, k, m, expected",
    [(0, 0, 25, 50, 0), (745, 375, 25, 50, 0), (113, 87, 20, 70, 47), (20, 20, 20, 70, 0)],
)
def test_excess_true_steps(step, evals, k, m, expected):
    assert report.excess_true_steps(step, evals, k, m) == expected


def test_markdown_table_and_rounding():
    text = report.markdown_table(["a", "b|c"], [[None, 0.123456], [True, "x|y"]])
    lines = text.splitlines()
    assert lines[0] == "| a | b\\|c |"
    assert lines[1] == "|---|---|"
    assert lines[2] == "| - | 0.1235 |"
    assert lines[3] == "| yes | x\\|y |"
    with pytest.raises(ValueError):
        report.markdown_table(["a"], [[1, 2]])
    # Exact: float("1.23457") is the double nearest that decimal, as is the literal.
    assert report.rounded(np.array([1.23456789, math.nan])) == [1.23457, None]


def test_milestones_count_evaluations_not_steps():
    # Base: one evaluation per step. LGF: every other step is free.
    base = {
        "evaluations": np.arange(5),
        "objective": np.array([4.0, 3.0, 2.0, 1.0, 0.5]),
        "total_evaluations": 4,
    }
    lgf = {"evaluations": np.array([0, 1, 1, 2, 2]), "objective": base["objective"].copy()}
    rows = report.milestones(base, lgf, strict=False)
    assert [r["base"] for r in rows] == [1, 2, 3, 4]
    assert [r["lgf"] for r in rows] == [1, 1, 2, 2]
    assert rows[-1]["ratio"] == pytest.approx(0.5)  # 2 / 4: exact, approx is harmless


@pytest.mark.parametrize(
    "lgf, kmm, expected, absent",
    [
        # K/M = 0.75 caps the saving; 4 extra true steps (fallbacks).
        (
            dict(ratio=0.79, evals_to_target=139, steps_to_target=177),
            (15, 20),
            ["unreachable by construction", "4 true steps beyond"],
            ["less progress"],
        ),
        # No fallbacks, but 1.54x the steps: the surrogate is the reason.
        (
            dict(ratio=1.08, evals_to_target=1213, steps_to_target=1723),
            (35, 50),
            ["does not win", "less progress"],
            ["beyond the planned"],
        ),
        (
            dict(ratio=0.51, evals_to_target=375, steps_to_target=745),
            (25, 50),
            ["meets the 0.6x goal"],
            ["unreachable", "less progress"],
        ),
    ],
)
def test_note_gives_the_reason(lgf, kmm, expected, absent):
    base = {"steps_to_target": {15: 176, 35: 1120, 25: 733}[kmm[0]]}
    note = report._note(lgf, base, kmm)
    assert all(e in note for e in expected), note
    assert not any(a in note for a in absent), note


def test_readme_table_is_the_committed_report():
    # The README's results table is written by `report.py --publish`; it must be the
    # table of the committed results.json, so the two cannot drift apart.
    import json

    with open(os.path.join(os.path.dirname(_PATH), "results.json")) as f:
        results = json.load(f)
    with open(report.README) as f:
        readme = f.read()
    start = readme.index(report.README_BEGIN) + len(report.README_BEGIN)
    assert readme[start : readme.index(report.README_END)].strip() == report.readme_table(results)


def test_default_output_is_untracked():
    # Regenerating the report must not dirty the tree unless --publish is asked.
    root = os.path.dirname(os.path.dirname(os.path.abspath(_PATH)))
    outdir = os.path.relpath(report.parse_args([]).outdir, root)
    with open(os.path.join(root, ".gitignore")) as f:
        assert outdir.replace(os.sep, "/") + "/" in f.read().split()
    assert report.parse_args(["--publish"]).outdir == report.HERE
