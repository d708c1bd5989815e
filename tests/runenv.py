"""The environment for scripts the tests run in subprocesses: one CPU device, as a user would
have (not the suite's 8 fake devices), and XLA's quick CPU compiles (see conftest.py)."""

import os

FAST_CPU_COMPILES = "--xla_backend_optimization_level=0"


def user_env() -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
            "XLA_FLAGS": FAST_CPU_COMPILES}
