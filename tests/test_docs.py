"""The documentation's code runs: every ```python block in docs/**/*.md and every
```python example in the docstrings of lgfjax's public names, so the docs cannot rot.

The code runs as a user runs it: in a fresh Python process (float32, jax's default;
this test process has float64 enabled by conftest.py), each block in a namespace of its
own, with its own asserts. The blocks of one test class share a process, so that jax
is imported once per class. A block that asks for several devices
(``<!-- docs-test: devices=N -->`` on a line before it) runs in a process of its own
with N simulated CPU devices. ``<!-- no-test: why -->`` before a block skips it, and
says why (no block needs it today).

No marker: these tests belong to the default suite (the docs' code must run in CI),
and they are not `numerics` tests, because the shared problems that ``--perturb``
moves are not used here. About 100 s of CPU, mostly compiling; pytest-xdist's
``--dist loadscope`` runs the three classes side by side (about 60 s on 2 cores).

The site itself (`mkdocs build --strict`) is built by `.ci/run`, not here.
"""

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lgfjax

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<code>.*?)^(?P=indent)```", re.M | re.S)
DIRECTIVE = re.compile(r"<!--\s*(no-test|docs-test):?\s*(.*?)\s*-->")

# Runs the blocks given as JSON on stdin, each in a fresh namespace, and prints
# {id: traceback or None} as JSON on the last line of stdout.
RUNNER = r"""
import contextlib, io, json, sys, traceback
blocks = json.load(sys.stdin)
results = {}
for block in blocks:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(block["code"], block["id"], "exec"), {"__name__": "__docs__"})
        results[block["id"]] = None
    except BaseException:  # an assert, an exception, or a SystemExit from the block
        results[block["id"]] = traceback.format_exc(limit=-8) + out.getvalue()[-2000:]
print(json.dumps(results))
"""


def doc_blocks():
    """``[(id, code, options)]`` for every ```python block under docs/."""
    blocks = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        rel = page.relative_to(ROOT).as_posix()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            # Directives: HTML comments in the lines just before the fence.
            before = text[: m.start()].rstrip("\n").splitlines()[-2:]
            options = dict(DIRECTIVE.findall("\n".join(before)))
            code = textwrap.dedent(m.group("code"))
            blocks.append((f"{rel}:{line}", code, options))
    return blocks


def public_objects():
    """``{name: object}`` for the public functions and classes of lgfjax."""
    names = [n for n in dir(lgfjax) if not n.startswith("_")] + ["LGFMinimiser"]
    objects = {n: getattr(lgfjax, n) for n in names}
    return {
        n: o
        for n, o in objects.items()
        if (inspect.isfunction(o) or inspect.isclass(o)) and o.__module__.startswith("lgfjax")
    }


def docstring_blocks():
    blocks = []
    for name, obj in sorted(public_objects().items()):
        for i, m in enumerate(FENCE.finditer(inspect.getdoc(obj) or "")):
            blocks.append((f"lgfjax.{name}#{i}", textwrap.dedent(m.group("code"))))
    return blocks


DOC_BLOCKS = doc_blocks()
DOCSTRING_BLOCKS = docstring_blocks()


def run_blocks(blocks, cwd, devices=None):
    env = {**os.environ, "JAX_ENABLE_X64": "0"}
    if devices:
        flag = f"--xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    payload = json.dumps([{"id": i, "code": c} for i, c in blocks])
    out = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=payload,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def page_results(blocks, tmp_path_factory):
    """Run `blocks`: the plain ones in one process, each multi-device one on its own."""
    cwd = tmp_path_factory.mktemp("docs")
    results = run_blocks([(i, c) for i, c, o in blocks if not o], cwd)
    for i, c, o in blocks:
        if "docs-test" in o:
            devices = int(re.fullmatch(r"devices=(\d+)", o["docs-test"]).group(1))
            results.update(run_blocks([(i, c)], cwd, devices=devices))
    return results


def check_block(block, results):
    options = next(o for i, _, o in DOC_BLOCKS if i == block)
    if "no-test" in options:
        assert options["no-test"], f"{block}: <!-- no-test --> needs a reason"
        pytest.skip(options["no-test"])
    assert results[block] is None, results[block]


# Two groups of pages, so that pytest-xdist (--dist loadscope: one worker per class)
# can run them side by side; each group costs about 35 s of CPU.
FIRST_PAGES = (
    "docs/index.md",
    "docs/getting-started.md",
    "docs/examples/",
    "docs/guide/how-it-works.md",
    "docs/guide/sindy.md",
    "docs/guide/optimistix.md",
)
FIRST = [b for b in DOC_BLOCKS if b[0].startswith(FIRST_PAGES)]
SECOND = [b for b in DOC_BLOCKS if not b[0].startswith(FIRST_PAGES)]


class TestStartAndExamples:
    """The ```python blocks of the home page, getting started, examples and some guides."""

    @pytest.fixture(scope="class")
    def results(self, tmp_path_factory):
        return page_results(FIRST, tmp_path_factory)

    @pytest.mark.parametrize("block", [i for i, _, _ in FIRST])
    def test_block_runs(self, block, results):
        check_block(block, results)


class TestGuide:
    """The ```python blocks of the rest of the user guide."""

    @pytest.fixture(scope="class")
    def results(self, tmp_path_factory):
        return page_results(SECOND, tmp_path_factory)

    @pytest.mark.parametrize("block", [i for i, _, _ in SECOND])
    def test_block_runs(self, block, results):
        check_block(block, results)


def test_pages_have_code():
    # The guide teaches by example; a parser that found nothing is broken.
    pages = {i.split(":")[0] for i, _, _ in DOC_BLOCKS}
    assert "docs/getting-started.md" in pages and "docs/guide/diagnostics.md" in pages
    assert len(DOC_BLOCKS) >= 15


class TestDocstrings:
    """The ```python examples in the public docstrings."""

    @pytest.fixture(scope="class")
    def results(self, tmp_path_factory):
        return run_blocks(DOCSTRING_BLOCKS, tmp_path_factory.mktemp("docstrings"))

    @pytest.mark.parametrize("block", [i for i, _ in DOCSTRING_BLOCKS])
    def test_example_runs(self, block, results):
        assert results[block] is None, results[block]

    def test_examples_found(self):
        names = {i.split("#")[0] for i, _ in DOCSTRING_BLOCKS}
        assert {"lgfjax.lgf", "lgfjax.lgf_adam", "lgfjax.stlsq"} <= names


def test_api_reference_lists_every_public_name():
    # Every public function and class is rendered by mkdocstrings somewhere under
    # docs/api/ (`::: lgfjax.NAME`; the lazily imported minimiser by its module).
    text = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    rendered = set(re.findall(r"^::: lgfjax\.(?:_\w+\.)?(\w+)", text, re.M))
    names = set(public_objects()) | {"STATUS_MESSAGES"}
    assert names <= rendered, sorted(names - rendered)


def test_lgf_and_lgf_adam_document_their_arguments():
    # The API reference shows each argument of the two front-ends: their docstrings'
    # **Arguments:** blocks name every parameter of the signature.
    for fn in (lgfjax.lgf, lgfjax.lgf_adam):
        doc = inspect.getdoc(fn)
        args = doc.split("**Arguments:**")[1].split("**Returns:**")[0]
        missing = [p for p in inspect.signature(fn).parameters if f"`{p}`" not in args]
        assert not missing, (fn.__name__, missing)
