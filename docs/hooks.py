"""MkDocs hooks: the site shows the repository's own outputs, never hand-copied numbers.

- Images outside ``docs/`` are published under ``repo/``: the committed
  ``benchmarks/convergence.png`` and ``examples/heat_inverse.png``, and every
  ``examples/outputs/*.png`` that exists when the site is built (the example scripts
  write them; they are not committed).
- ``pymdownx.snippets`` reads from the repository root wherever mkdocs is started.
- Directives in a page (HTML comments, replaced before rendering):

  - ``<!-- docstring: examples/NAME.py -->``: the script's module docstring;
  - ``<!-- example-report: KEY [required] -->``: the rows of ``benchmarks/results.md``'s table
    whose first cell is KEY, with that example's notes and goal lines; without
    ``required`` a missing KEY renders a sentence saying so;
  - ``<!-- rows: FILE KEY [col=N] -->``: the header and the rows of FILE's first table
    whose N-th cell (default the first) is KEY, or one of ``KEY|KEY2|...`` (an error if
    there are none); quote a KEY with spaces;
  - ``<!-- columns: FILE "HEADER" "HEADER" ... -->``: those columns of FILE's first
    table, every row;
  - ``<!-- outputs: NAME.png ... -->``: those plots from ``examples/outputs/`` if they
    exist, else a sentence naming the command's output files;
  - ``<!-- examples-index -->``: a table of every ``examples/*.py`` script;
  - ``<!-- readme-table -->``: the README's results table, which
    ``benchmarks/report.py --publish`` writes between its markers.
"""

import ast
import posixpath
import re
import shlex
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = ROOT / "examples" / "outputs"
RESULTS = "benchmarks/results.md"
COMMITTED_IMAGES = ("benchmarks/convergence.png", "examples/heat_inverse.png")
DIRECTIVE = re.compile(
    r"<!--\s*(docstring|example-report|rows|columns|outputs|examples-index|readme-table):?\s*(.*?)\s*-->"
)
README_BEGIN = "<!-- report:table begin"
README_END = "<!-- report:table end -->"


def on_config(config):
    snippets = config["mdx_configs"].setdefault("pymdownx.snippets", {})
    snippets["base_path"] = [str(ROOT)]
    return config


def on_files(files, config):
    for rel in COMMITTED_IMAGES:
        files.append(File.generated(config, f"repo/{rel}", abs_src_path=str(ROOT / rel)))
    if OUTPUTS.is_dir():
        for png in sorted(OUTPUTS.glob("*.png")):
            uri = f"repo/examples/outputs/{png.name}"
            files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    here = posixpath.dirname(page.file.src_uri)

    def link(uri):
        return posixpath.relpath(uri, here or ".")

    def replace(match):
        kind, arg = match.group(1), shlex.split(match.group(2))
        try:
            if kind == "docstring":
                return module_docstring(arg[0])
            if kind == "example-report":
                return report_section(arg[0], "required" in arg[1:], link)
            if kind == "rows":
                col = int(arg[2].removeprefix("col=")) if len(arg) > 2 else 1
                return table_rows(arg[0], arg[1], required=True, col=col)
            if kind == "columns":
                return table_columns(arg[0], arg[1:])
            if kind == "outputs":
                return outputs(arg, link)
            if kind == "readme-table":
                return readme_table()
            return examples_index(files, link)
        except (OSError, ValueError, IndexError) as e:
            raise PluginError(f"{page.file.src_uri}: {match.group(0)}: {e}") from e

    return DIRECTIVE.sub(replace, markdown)


def module_docstring(rel):
    doc = ast.get_docstring(ast.parse((ROOT / rel).read_text()))
    if not doc:
        raise ValueError(f"{rel} has no module docstring")
    return doc


def table(lines):
    """The first markdown table in `lines`: (header lines, body lines)."""
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[start : start + 2], lines[start + 2 : end]


def cells(row):
    """The cells of a markdown table row (``\\|`` is a pipe inside a cell)."""
    parts = re.split(r"(?<!\\)\|", row.strip().strip("|"))
    return [p.strip() for p in parts]


def table_rows(rel, key, required, col=1):
    header, body = table((ROOT / rel).read_text().splitlines())
    keys = key.split("|")
    rows = [row for row in body if cells(row)[col - 1].strip("`") in keys]
    if not rows:
        if required:
            raise ValueError(f"no row of {rel} starts with {key!r}")
        return None
    return "\n".join(header + rows)


def table_columns(rel, headers):
    header, body = table((ROOT / rel).read_text().splitlines())
    names = cells(header[0])
    missing = [h for h in headers if h not in names]
    if missing:
        raise ValueError(f"{rel} has no column {missing}; it has {names}")
    index = [names.index(h) for h in headers]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in body:
        c = cells(row)
        lines.append("| " + " | ".join(c[i] for i in index) + " |")
    return "\n".join(lines)


def report_section(key, required, link):
    rows = table_rows(RESULTS, key, required)
    if rows is None:
        return (
            f"*`{key}` is not in the committed report (`{RESULTS}`) yet: "
            "`python benchmarks/report.py` measures the examples it knows.*"
        )
    lines = (ROOT / RESULTS).read_text().splitlines()
    notes, inside = [], False
    for line in lines:
        if line.startswith(f"**{key}**"):
            inside = True
        elif inside and (line.startswith("**") or line.startswith("## ")):
            break
        if inside:
            notes.append(line)
    goals = [line for line in lines if line.startswith(f"- {key},")]
    out = [
        f"From `{RESULTS}`, written by `python benchmarks/report.py --full --publish` "
        "(the whole report, with the machine and the date, is on the "
        f"[Results]({link('results.md')}) page):",
        "",
        rows,
        "",
        "\n".join(notes).strip(),
    ]
    if goals:
        out += ["", "Against the goals:", "", *goals]
    return "\n".join(out)


def outputs(names, link):
    found = [n for n in names if (OUTPUTS / n).is_file()]
    missing = [n for n in names if n not in found]
    parts = [f"![{n}]({link('repo/examples/outputs/' + n)})" for n in found]
    if missing:
        listed = ", ".join(f"`examples/outputs/{n}`" for n in missing)
        parts.append(
            f"*The command above saves {listed}; a site built after running it shows "
            "the plot here (the outputs are not committed). Meanwhile, the committed "
            "report's convergence of every example (this one's panel included):*"
        )
        if not found:
            parts.append(f"![convergence]({link('repo/benchmarks/convergence.png')})")
    return "\n\n".join(parts)


def examples_index(files, link):
    rows = ["| script | what it shows |", "|---|---|"]
    for script in sorted((ROOT / "examples").glob("[!_]*.py")):
        doc = ast.get_docstring(ast.parse(script.read_text())) or ""
        summary = doc.strip().splitlines()[0] if doc.strip() else ""
        page = f"examples/{script.stem}.md"
        name = f"`{script.name}`"
        if files.get_file_from_path(page) is not None:
            name = f"[{name}]({link(page)})"
        summary = summary.replace("|", "\\|")
        rows.append(f"| {name} | {summary} |")
    return "\n".join(rows)


def readme_table():
    text = (ROOT / "README.md").read_text()
    start = text.index("\n", text.index(README_BEGIN)) + 1
    return text[start : text.index(README_END)].strip()
