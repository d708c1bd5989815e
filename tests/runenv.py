"""The environment for scripts the tests run in subprocesses: one CPU device, as a user would
have (not the suite's 8 fake devices), and XLA's quick CPU compiles (see conftest.py)."""

import os
from importlib.metadata import PackageNotFoundError, version


def _quick_compile_flags() -> str:
    """XLA's CPU backend without LLVM's optimizations and, where this XLA still has them
    (jaxlib 0.10; 0.11 removed the flag, and an unknown flag aborts the process), with its
    older elemental fusion emitters. Each compiles a program in less time and runs it slower,
    which the suite's tiny models barely feel (jaxlib 0.10.2: a speculative-decoding program
    2.2 s instead of 3.5 s, the demo test 44 s instead of 64 s, the suite on 2 cores 10 instead
    of 16 minutes). Semantics are unchanged."""
    flags = ["--xla_backend_optimization_level=0"]
    try:
        jaxlib = tuple(int(part) for part in version("jaxlib").split(".")[:2])
    except (PackageNotFoundError, ValueError):  # a jaxlib we cannot place: leave the flag out
        jaxlib = None
    if jaxlib is not None and jaxlib < (0, 11):
        flags.append("--xla_cpu_use_fusion_emitters=false")
    return " ".join(flags)


FAST_CPU_COMPILES = _quick_compile_flags()


def user_env() -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
            "XLA_FLAGS": FAST_CPU_COMPILES}
