"""The README stays true: its Python blocks run (with a local checkpoint standing in for
"path/to/..." model paths), its demo commands exist and run, and CI runs its test command."""

import os
import re
import subprocess
import sys

import pytest
from runenv import FAST_CPU_COMPILES


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(REPO, "README.md")).read()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
# 8 CPU devices (the README's tensor-parallel examples) and XLA's quick CPU compiles (the
# blocks compile far more than they compute; see conftest.py).
ENV = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_CPU_COMPILES}",
           JAX_PLATFORMS="cpu")


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs(index, tokenized, tmp_path):
    # (the attention kernel's block needs heads the kernel takes: head dim 16, not 8)
    checkpoint = tokenized("mistral-window" if "pallas_interpret" in BLOCKS[index]
                           else "llama-gqa")
    code = re.sub(r'"path/to/[^"]+"', repr(checkpoint), BLOCKS[index])
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, check=True,
                   capture_output=True, text=True, timeout=300)


def test_demo_command():
    """The demo itself runs end to end in tests/test_demo.py (with a micro preset)."""
    demo_section = README.split("## Run the demo")[1].split("##")[0]
    assert "```bash\njaxdec demo\n```" in demo_section


def test_quickstart_example_runs(tmp_path):
    assert "python examples/quickstart.py" in README
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "quickstart.py"), "--layers", "1",
         "--width", "64", "--new-tokens", "4", "--tp", "2"],
        cwd=tmp_path, env=ENV, check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    assert "same tokens as generate(): True" in out


def test_custom_drafter_example_runs(tmp_path):
    """The example asserts its speculative tokens equal generate's; remembered answers are
    drafted several tokens a step."""
    assert "examples/custom_drafter.py" in README
    out = subprocess.run([sys.executable, os.path.join(REPO, "examples", "custom_drafter.py")],
                         cwd=tmp_path, env=ENV, check=True, capture_output=True, text=True,
                         timeout=300).stdout
    tau = float(re.search(r"asked again: ([0-9.]+) tokens per target forward", out).group(1))
    assert tau > 3 and "a new prompt: " in out


def test_ci_runs_the_readme_test_command():
    command = re.search(r"```bash\n(?:.*\n)*?(python -m pytest[^\n]*)\n", README.split(
        "## Run the tests")[1]).group(1)
    assert command in open(os.path.join(REPO, ".ci", "run")).read()
