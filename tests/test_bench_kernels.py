"""bench/kernels.py: the cpu-tiny preset end to end (kernel interpreted), its cost arithmetic
and its table."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import kernels as bench  # noqa: E402
from bench.common import HBM_METHOD  # noqa: E402

REQUIRED = ("kernel", "impl", "batch", "context", "T", "time_us", "roofline_us", "hbm_fraction",
            "bytes", "flops", "hbm_gbps", "matmul_peak_tflops", "device", "jax_version", "date",
            "preset", "error")


def test_case_cost_hand_computed():
    spec = dict(heads=32, kv_heads=8, head_dim=128, dtype="bfloat16")
    nbytes, flops = bench.case_cost(1, 1024, 16, spec)
    slots = 1024 + 16
    assert nbytes == 2 * slots * 8 * 128 * 2 + 2 * 16 * 32 * 128 * 2
    assert flops == 4 * 16 * 32 * slots * 128


def test_kv_copies_outgrow_the_l2():
    spec = bench.PRESETS["h100"]
    assert bench.kv_copies(1, 1024, 1, spec) == 8  # 4.2 MB a copy: capped
    assert bench.kv_copies(1, 16384, 1, spec) == 2  # 67 MB: two make 134 MB
    assert bench.kv_copies(8, 65536, 64, spec) == 1


def test_cpu_tiny_run(tmp_path):
    assert bench.main(["--preset", "cpu-tiny", "--out", str(tmp_path), "--compile-ahead", "2"]) == 0
    records = json.loads((tmp_path / "kernels-cpu.json").read_text())
    # Every program compiled ahead, side by side: the timed loops compiled nothing.
    assert all(r["compile_ahead_s"] > 0 and r["first_call_compiles"] == 0 for r in records)
    spec = bench.PRESETS["cpu-tiny"]
    cases = {(b, c, t) for b in spec["batches"] for c in spec["contexts"] for t in spec["queries"]}
    assert {(r["impl"], r["batch"], r["context"], r["T"]) for r in records} == {
        (impl, *case) for impl in ("pallas", "reference") for case in cases}
    for r in records:
        assert not [k for k in REQUIRED if k not in r]
        assert r["error"] is None and r["time_us"] > 0 and r["roofline_us"] > 0
        assert r["kv_copies"] == 2  # the preset rotates two caches in every case
        # The ceiling is the better of the two loop probes (copy traffic, read only).
        assert r["hbm_method"] == HBM_METHOD and sorted(r["hbm_probes"]) == ["jax sum",
                                                                             "jax x + 1"]
        assert r["hbm_gbps"] == max(r["hbm_probes"].values()) > 0
        # What a call that does almost nothing costs in the same loop, measured once a run.
        assert sorted(r["call_floor_us"]) == ["pallas", "xla"]
        assert r["call_floor_us"] == records[0]["call_floor_us"]
        assert all(t > 0 for t in r["call_floor_us"].values())
        nbytes, flops = bench.case_cost(r["batch"], r["context"], r["T"], spec)
        assert r["roofline_us"] == pytest.approx(1e6 * max(
            nbytes / (r["hbm_gbps"] * 1e9), flops / (r["matmul_peak_tflops"] * 1e12)))
        assert r["hbm_fraction"] == pytest.approx(nbytes / (r["time_us"] * 1e-6)
                                                  / (r["hbm_gbps"] * 1e9))
        if r["impl"] == "pallas":
            assert r["interpret"] and r["speedup_vs_reference"] > 0
            # The preset's other tilings ran beside the default: bigger key blocks at T = 4,
            # twice the splits at T = 1 (65 slots: 2 key blocks, the default already 2
            # splits, so twice that is capped at one block per split).
            (swept,) = r["sweep"]
            assert swept["error"] is None and swept["time_us"] > 0
            if r["T"] == 4:
                assert swept["block_k"] == 32
            else:
                assert swept["split_factor"] == 2 and swept["num_splits"] == 2
        # One profiled run for the preset's profiled case (a CPU trace has no device events).
        if (r["batch"], r["context"], r["T"]) in spec["profile_cases"]:
            assert r["profile"]["calls"] == spec["inner"] * r["kv_copies"]
            assert r["profile"]["run_s"] > 0
        else:
            assert "profile" not in r
    table = (tmp_path / "kernels-cpu.md").read_text()
    assert "Where a call's time goes" in table
    assert "| batch | context | T | pallas us" in table and "(best of jax x + 1 " in table
    assert "Call floors in the same timed loop" in table and "a one-block Pallas kernel" in table
    assert "| batch | context | T | default | block_k=32 |" in table
    assert "| batch | context | T | default | splits x2 |" in table and " [2] |" in table
    assert table.count("\n| 1 | 64 |") == 4  # T = 1 and 4, and a tiling row for each
    # A second run (e.g. another call on the device) replaces its own records only.
    assert bench.main(["--preset", "cpu-tiny", "--out", str(tmp_path), "--inner", "1"]) == 0
    again = json.loads((tmp_path / "kernels-cpu.json").read_text())
    assert len(again) == len(records)
    # The CPU default compiles inline: each first call compiles its own program.
    assert all(r["compile_ahead_s"] is None and r["first_call_compiles"] > 0 for r in again)


def test_a_budget_records_the_cases_it_leaves_out_and_keeps_what_was_measured(tmp_path):
    """With --budget-s the cases past it are recorded as skipped (it wrote nothing until
    every program had compiled, and a device step stopped then kept nothing); a skipped case
    never replaces the measured record of an earlier call."""
    assert bench.main(["--preset", "cpu-tiny", "--out", str(tmp_path), "--inner", "1"]) == 0
    measured = json.loads((tmp_path / "kernels-cpu.json").read_text())
    assert bench.main(["--preset", "cpu-tiny", "--out", str(tmp_path), "--inner", "1",
                       "--budget-s", "1e-9"]) == 1
    after = json.loads((tmp_path / "kernels-cpu.json").read_text())
    assert len(after) == len(measured)
    by_key = {tuple(r[k] for k in bench.KEY): r for r in after}
    for r in measured:
        kept = by_key[tuple(r[k] for k in bench.KEY)]
        assert kept["time_us"] == r["time_us"] and kept["error"] is None
        assert kept["last_attempt_error"] == "skipped: time budget used up"
    note = (tmp_path / "kernels-cpu.md").read_text()
    assert "Kept from earlier calls" in note and "impl=pallas, batch=1" in note
    (tmp_path / "kernels-cpu.json").unlink()
    assert bench.main(["--preset", "cpu-tiny", "--out", str(tmp_path), "--inner", "1",
                       "--budget-s", "1e-9"]) == 1
    skipped = json.loads((tmp_path / "kernels-cpu.json").read_text())
    assert len(skipped) == len(measured) and all(
        r["error"] == "skipped: time budget used up" and r["time_us"] is None for r in skipped)


def test_profile_lines_per_call():
    record = dict(batch=1, context=4096, T=64, impl="pallas", time_us=300.0, profile=dict(
        run_s=0.01, kernel_s=0.001, calls=4,
        kernels=[dict(name="tree_attention", ms=0.8, calls=4),
                 dict(name="fusion_combine", ms=0.12, calls=8)]))
    (line,) = bench._profile_lines([record])[3:]
    assert "250.0 us of kernels per call (timed: 300.0 us)" in line
    assert "`tree_attention` 200.0 us (1 per call)" in line
    assert "`fusion_combine` 30.0 us (2 per call)" in line


def test_hopper_rows_and_goals_over_the_faster_kernel(monkeypatch):
    """Where the Hopper kernel ran, the table gains its columns and the goal lines judge each
    case by its faster kernel; it is timed only on a Hopper, for the cases it takes."""
    spec = bench.PRESETS["h100"]
    assert bench.case_impls(1, 4096, 64, spec) == ("pallas", "reference")  # no Hopper here
    monkeypatch.setattr(bench, "hopper_device", lambda: True)
    assert bench.case_impls(1, 4096, 64, spec)[-1] == "hopper"
    assert bench.case_impls(1, 4096, 16, spec)[-1] == "hopper"  # 16 x 4 heads: 64 rows
    assert "hopper" not in bench.case_impls(1, 4096, 1, spec)  # decode: the Triton kernel's
    # Its sweep: a shallower ring, twice the default splits (7 at 4K, T = 64: 14), the
    # probabilities in registers, the compute warpgroups in ping-pong.
    assert bench.swept(1, 4096, 64, spec, "hopper") == [
        dict(num_stages=2), dict(split_factor=2), dict(probs_in_registers=True),
        dict(pingpong=True), dict(pingpong=True, probs_in_registers=True)]
    sizes = bench.block_sizes(dict(split_factor=2), 1, 4096, 64, spec, "hopper")
    assert type(sizes).__name__ == "HopperBlockSizes" and sizes.num_splits == 14
    base = dict(kernel="tree_attention", batch=1, context=4096, T=64, device="NVIDIA H100",
                jax_version="0.11.2", date="2026-11-26", preset="h100", heads=32, kv_heads=8,
                head_dim=128, dtype="bfloat16", hbm_gbps=3000.0, matmul_peak_tflops=800.0,
                roofline_us=10.0, kv_copies=2, error=None)
    records = [dict(base, impl="pallas", time_us=100.0, vs_roofline=10.0, hbm_fraction=0.1,
                    speedup_vs_reference=2.0),
               dict(base, impl="reference", time_us=200.0, vs_roofline=20.0, hbm_fraction=0.05),
               dict(base, impl="hopper", time_us=12.0, vs_roofline=1.2, hbm_fraction=0.8,
                    speedup_vs_reference=200.0 / 12.0)]
    records[2]["sweep"] = [dict(num_stages=2, time_us=15.0, error=None),
                           dict(split_factor=2, num_splits=14, time_us=11.0, error=None)]
    table = bench.render_markdown(records)
    assert "`hopper`:\n\n| batch | context | T | default | num_stages=2 | splits x2 |" in table
    assert "| 1 | 4096 | 64 | 12.0 | 15.0 | **11.0** [14] |" in table
    assert "| pallas us | hopper us | reference us |" in table
    assert "| 1 | 4096 | 64 | 100.0 | 12.0 | 200.0 | 10.0 | 10.00 | 2.00 |" in table
    assert table.rstrip().count("| 1.20 | 16.67 |") == 1
    assert ("worst case 1.20x (batch 1, context 4096, T 64, hopper) -> met" in table)
    assert "smallest speedup 16.67x (hopper) -> met" in table
    # Without Hopper rows: the Triton kernel alone, the columns as before.
    table = bench.render_markdown(records[:2])
    assert "hopper" not in table and "worst case 10.00x" in table
    # With the call floors measured (records since 2026-11-28): the worst case names its
    # roofline beside a Pallas call's floor, and the header gives both floors.
    floors = dict(pallas=4.25, xla=2.5)
    table = bench.render_markdown([dict(r, call_floor_us=floors) for r in records[:2]])
    assert ("worst case 10.00x (batch 1, context 4096, T 64, pallas; its roofline 10.0 us, "
            "a Pallas call's floor here 4.2 us) -> not met") in table
    assert "a one-block Pallas kernel 4.2 us, one XLA fusion 2.5 us." in table
