"""bench/train.py: the cpu-tiny preset, shrunk to a few steps, end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import merge_records  # noqa: E402

REQUIRED = ("preset", "params", "tokens_per_s", "mfu", "heldout_loss", "acceptance_before",
            "acceptance_after", "device", "jax_version", "date")


def test_cpu_tiny_shrunk(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    # A record of another preset already there survives (runs accumulate per device).
    (out / "train-cpu.json").write_text(json.dumps([{"preset": "gpu-small", "params": 1}]))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "train.py"), "--preset", "cpu-tiny", "--steps", "3",
         "--draft-steps", "3", "--max-train-bytes", "100000", "--eval-tokens", "4096",
         "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((out / "train-cpu.json").read_text())
    assert [r["preset"] for r in records] == ["gpu-small", "cpu-tiny"]
    record = records[1]
    assert all(record.get(k) is not None for k in REQUIRED), record
    assert record["device"] == "cpu" and record["jax_version"] == jax.__version__
    assert record["params"] > 1e6 and record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1.5
    assert 0 < record["acceptance_before"] < 1 and 0 < record["acceptance_after"] < 1
    assert "| cpu-tiny |" in (out / "train-cpu.md").read_text()


def test_merge_records(tmp_path):
    path = tmp_path / "r.json"
    assert merge_records(path, [{"k": "a", "v": 1}], key="k") == [{"k": "a", "v": 1}]
    path.write_text(json.dumps([{"k": "a", "v": 1}, {"k": "b", "v": 2}]))
    assert merge_records(path, [{"k": "a", "v": 3}], key="k") == [{"k": "b", "v": 2},
                                                                   {"k": "a", "v": 3}]
    path.write_text(json.dumps([{"k": "a", "j": 1}, {"k": "a", "j": 2}]))
    assert merge_records(path, [{"k": "a", "j": 2, "v": 0}], key=("k", "j")) == [
        {"k": "a", "j": 1}, {"k": "a", "j": 2, "v": 0}]
