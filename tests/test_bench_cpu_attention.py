"""bench/cpu_attention.py: the cpu-tiny preset end to end and its table."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import cpu_attention as bench  # noqa: E402


def test_cpu_tiny_run(tmp_path):
    """Every (dtype, slots, batch) timed both ways, fp32 with the same tokens; the cache of 1024 slots
    ran blocked under AUTO, the one of 64 the reference; the table pairs them."""
    assert bench.main(["--preset", "cpu-tiny", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "cpu-attention-cpu.json").read_text())
    spec = bench.PRESETS["cpu-tiny"]
    assert {(r["dtype"], r["slots"], r["batch"], r["impl"]) for r in records} == {
        (d, s, b, i) for d in spec.dtypes for s in spec.slots for b in spec.batch_sizes
        for i in bench.IMPLS}
    for r in records:
        assert r["tokens_per_s"] > 0 and r["jax_version"]
        assert r["same_tokens"] == (r["first_difference"] is None)
        if r["dtype"] == "float32":
            assert r["same_tokens"]
        want = "blocked" if r["impl"] == "auto" and r["slots"] == 1024 else "reference"
        assert r["attention"] == want
    table = (tmp_path / "cpu-attention-cpu.md").read_text()
    assert "| cpu-tiny | bfloat16 | 1024 | 1 |" in table and "| blocked |" in table
