"""The environment for scripts the tests run in subprocesses: one CPU device, as a user would
have (not the suite's 8 fake devices), and XLA's quick CPU compiles (see conftest.py)."""

import os

# XLA's CPU backend without LLVM's optimizations, and with its older (elemental) fusion
# emitters: each compiles a program in about a third less time (a speculative-decoding program:
# 2.2 s instead of 3.5 s; the demo test: 44 s instead of 64 s) and runs it slower, which the
# suite's tiny models barely feel. Semantics are unchanged.
FAST_CPU_COMPILES = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def user_env() -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
            "XLA_FLAGS": FAST_CPU_COMPILES}
