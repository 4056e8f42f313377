import os

# Tests run on the CPU; keep XLA from grabbing every core per test process.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# Let test modules import the shared problems as `problems` or `tests.problems`.
sys.path.insert(0, str(Path(__file__).parent))
