"""bench/matvec.py: the cpu-tiny preset end to end (kernel interpreted), its arithmetic and its
table."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import matvec as bench  # noqa: E402


def test_weight_copies_outgrow_the_l2():
    spec = bench.PRESETS["h100"]
    assert bench.copies(4096, 4096, spec) == 4  # o: 33.5 MB a copy; 100 MiB takes four
    assert bench.copies(4096, 2 * 14336, spec) == 1  # gate|up: 235 MB


def test_swept_split_factor_keeps_whole_steps():
    sizes = bench.block_sizes(dict(split_factor=2), 4096, 6144)
    assert sizes.num_splits == 16  # the default 8, doubled; 4096 = 16 x 4 x 64
    sizes = bench.block_sizes(dict(split_factor=2), 192, 128)
    assert sizes.num_splits == 1  # 192 rows: 2 splits would not divide into 64-row steps


def test_cpu_tiny_run(tmp_path):
    assert bench.main(["--preset", "cpu-tiny", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "matvec-cpu.json").read_text())
    spec = bench.PRESETS["cpu-tiny"]
    cases = {(p, r) for p in spec["projections"] for r in spec["rows"]}
    assert {(r["projection"], r["rows"]) for r in records} == cases
    assert {r["impl"] for r in records} == {"pallas", "xla"}  # no cuBLAS on a CPU preset
    digest = bench.sources_digest(bench.KERNEL_SOURCES)
    for r in records:
        assert r["error"] is None and r["time_us"] > 0
        assert r["kernel_sources"] == digest  # the device plan reruns a changed kernel
        K, N, *groups = spec["projections"][r["projection"]]
        assert r["groups"] == (groups[0] if groups else 1)
        assert r["bytes"] == r["groups"] * K * N * 4  # fp32 weights
        assert r["roofline_us"] == pytest.approx(1e6 * r["bytes"] / (r["hbm_gbps"] * 1e9))
        assert r["hbm_fraction"] == pytest.approx(r["roofline_us"] / r["time_us"])
        if r["impl"] == "pallas":
            assert r["speedup_vs_xla"] > 0 and r["num_splits"] >= 1
    (qkv,) = [r for r in records if r.get("sweep")]
    assert (qkv["projection"], qkv["rows"]) == ("qkv", 1)
    assert [e.get("block_n") for e in qkv["sweep"]] == [64, None]
    assert all(e["error"] is None and e["time_us"] > 0 for e in qkv["sweep"])
    table = (tmp_path / "matvec-cpu.md").read_text()
    assert "| qkv | 1 | 256 x 384 |" in table and "Other tilings" in table
    assert "| gate_up | 4 | 2 x 256 x 128 |" in table
