import os

# Tests run on the CPU; keep XLA from grabbing every core per test process.
# Small LAPACK calls are far slower with multithreaded OpenBLAS on a busy machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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
