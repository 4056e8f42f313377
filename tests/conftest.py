import os

# Tests run on the CPU; keep XLA from grabbing every core per test process.
# Small LAPACK calls are far slower with multithreaded OpenBLAS on a busy machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Compile time is most of the suite's time, so the suite compiles for speed:
# 1. XLA's CPU backend without its fusion emitters and without LLVM's optimisations
#    (--xla_backend_optimization_level=0): together about 0.6x the suite's time. The
#    programs compute the same IEEE operations; only instruction choices differ (no
#    fused multiply-adds, other kernels), as on a CPU without FMA. `.ci/perturbed`
#    runs every `numerics` test again as users' programs are compiled (fusion emitters,
#    optimisations and FMA on; AVX2 code, moved inputs), so each result that rests on
#    rounding is checked under both. XLA_FLAGS that name either option are kept.
# 2. One persistent compilation cache per session, shared by the xdist workers and
#    the subprocesses tests start (JAX reads these variables at import): tests that
#    build the same optimiser on the same problem compile it once. A cached
#    executable is the one XLA would build again. LGFJAX_TEST_JAX_CACHE=DIR keeps
#    the cache between sessions (a rerun after a change to the tests alone is faster).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_cpu_use_fusion_emitters" not in _flags and "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = (
        f"{_flags} --xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0"
    ).strip()
_CREATED_CACHE = None
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _cache = os.environ.get("LGFJAX_TEST_JAX_CACHE")
    if not _cache:
        _cache = _CREATED_CACHE = tempfile.mkdtemp(prefix="lgfjax-jit-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# Let test modules import the shared problems as `problems` or `tests.problems`.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_addoption(parser):
    parser.addoption(
        "--perturb",
        action="store_true",
        help="rerun with the shared problems' inputs scaled by (1 + 4 eps) of their dtype "
        "(tests/problems.perturb); a machine-independence check for -m numerics tests",
    )


def pytest_configure(config):
    if config.getoption("--perturb"):
        import problems

        problems.PERTURB = True
        # Subprocess scripts (tests/_sharded_run.py, _explicit_run.py) read this.
        os.environ["LGFJAX_TEST_PERTURB"] = "1"


def pytest_unconfigure(config):
    if _CREATED_CACHE is not None:
        import shutil

        shutil.rmtree(_CREATED_CACHE, ignore_errors=True)
