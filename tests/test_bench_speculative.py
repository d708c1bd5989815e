"""bench/speculative.py: the synthetic regime and the trained-model path on CPU presets."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("method", "tree", "batch", "temperature", "tau", "tokens_per_s", "speedup_vs_ar",
            "device", "jax_version", "date")


def _run(args, out):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "speculative.py"), *args,
                           "--repeats", "1", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "speculative-cpu.json").read_text())


def test_synthetic_tiny(tmp_path):
    records = _run(["--preset", "synthetic-tiny", "--batches", "1"], tmp_path)
    oracle = [r for r in records if r["method"].startswith("oracle")]
    assert len(oracle) == 3
    for r in records:
        assert all(r.get(k) is not None for k in REQUIRED if not (r["method"] == "plain" and k == "tree"))
    for r in oracle:
        assert r["same_tokens_as_ar"] is True and r["speedup_vs_ar"] > 0
    taus = [r["tau"] for r in sorted(oracle, key=lambda r: r["method"])]
    assert taus[0] < taus[2]  # a better draft is accepted more (0.6 vs 0.9)
    assert "Goal (>= 2x" in (tmp_path / "speculative-cpu.md").read_text()


def test_trained_models_path(tokenized_checkpoint, tmp_path):
    records = _run(["--preset", "cpu-tiny", "--target", tokenized_checkpoint, "--draft",
                    tokenized_checkpoint, "--methods", "draft:chain:4,lookup", "--batches", "2",
                    "--temperatures", "0,1", "--max-new-tokens", "8"], tmp_path)
    keys = {(r["method"], r["temperature"]) for r in records}
    assert keys == {(m, t) for m in ("plain", "draft", "lookup") for t in (0.0, 1.0)}
    greedy_self = next(r for r in records if r["method"] == "draft" and r["temperature"] == 0)
    assert greedy_self["same_tokens_as_ar"] is True and greedy_self["tau"] == 5.0
