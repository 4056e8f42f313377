"""Small helpers shared by the example scripts: a side-by-side table and a plot.

matplotlib is imported lazily (with the Agg backend), so a script run with
``--no-plot`` or imported by a test never loads it.
"""

import os
from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_OUTDIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "outputs")


def first_below(values: Sequence[float], threshold: float) -> int | None:
    """Index of the first entry strictly below `threshold`, or None if there is none.

    Non-finite entries never count as below.

    ```python
    assert first_below([3.0, float("nan"), 0.5, 0.1], 1.0) == 2
    assert first_below([3.0, 2.0], 1.0) is None
    ```
    """
    below = np.flatnonzero(np.isfinite(values) & (np.asarray(values) < threshold))
    return int(below[0]) if below.size else None


def format_value(value) -> str:
    """Compact text for a table cell: None as "-", floats in 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def print_table(columns: Mapping[str, Sequence], rows: Sequence[str], title: str = "") -> str:
    """Print (and return) a table with one column per method and one row per quantity.

    - `columns`: method name -> its cells, one per entry of `rows` (any value;
      None prints as "-", floats with 4 significant digits).
    - `rows`: the label of each row.
    - `title`: an optional line printed above the table.

    ```python
    print_table({"SGD": [750, 1e-4], "LGF": [375, None]}, ["evaluations", "misfit"])
    ```
    """
    cells = {name: [format_value(v) for v in values] for name, values in columns.items()}
    for name, values in cells.items():
        if len(values) != len(rows):
            raise ValueError(f"column {name!r} has {len(values)} cells for {len(rows)} rows")
    label_width = max(len(r) for r in rows)
    widths = {name: max(len(name), *(len(v) for v in values)) for name, values in cells.items()}
    lines = []
    if title:
        lines.append(title)
    header = " " * label_width + "".join(f"  {name:>{widths[name]}}" for name in cells)
    lines += [header, "-" * len(header)]
    for i, label in enumerate(rows):
        lines.append(
            f"{label:<{label_width}}"
            + "".join(f"  {cells[name][i]:>{widths[name]}}" for name in cells)
        )
    text = "\n".join(lines)
    print(text)
    return text


def plot_convergence(
    ax,
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    threshold: float | None = None,
    logy: bool = True,
):
    """Draw one curve per method on a matplotlib axis, with an optional target line.

    - `curves`: method name -> (x values, y values).
    - `threshold`: if given, a dashed horizontal line (e.g. the target loss).
    """
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name, lw=1.3)
    if threshold is not None:
        ax.axhline(threshold, color="k", ls="--", lw=0.8, label=f"target {threshold:g}")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def new_figure(ncols: int, width: float = 4.8, height: float = 4.0):
    """A figure with `ncols` axes in one row, using the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, filename: str, outdir: str | None = None) -> str:
    """Save `fig` as `outdir`/`filename` (default examples/outputs/), close it, return the path."""
    import matplotlib.pyplot as plt

    outdir = DEFAULT_OUTDIR if outdir is None else outdir
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
