"""bench/tpu_compile.py: the cpu-tiny preset end to end (the report's files and figures), a
program that does not compile recorded as such, and with libtpu a tiny model compiled for
TPU v5e chips at tp 2."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import tpu_compile  # noqa: E402


def test_cpu_tiny_preset_writes_its_report(tmp_path):
    assert tpu_compile.main(["--preset", "cpu-tiny", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "tpu-compile.json").read_text())
    assert [(r["generation"], r["tp"], r["batch"]) for r in records] == [("cpu", 1, 1),
                                                                          ("cpu", 1, 2)]
    for r in records:
        assert r["preset"] == "cpu-tiny" and r["prompt_len"] == 40 and r["new_tokens"] == 8
        assert 0 < r["arguments_bytes"] <= r["total_bytes"] and r["ops_per_step"] > 0
        assert r["code_bytes"] >= 0 and r["temporaries_bytes"] >= 0  # a CPU program: no code size
        assert r["fits"] is None and r["hbm_gib"] is None  # no published HBM for a CPU
        assert r["mosaic_kernels_per_step"] == 0 and "error" not in r
        assert r["hosts"] == 1 and r["model"] == "tiny"
        assert r["jax_version"] and r["date"]
    table = (tmp_path / "tpu-compile.md").read_text()
    assert table.count("| cpu-tiny | tiny | cpu | 1 | 1 |") == 2 and "Nothing was run" in table


def test_a_program_that_does_not_compile_is_recorded(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM\nmore")

    monkeypatch.setattr("jaxdec.generate", fail)
    record = tpu_compile.compile_case(tpu_compile.PRESETS["cpu-tiny"], None, 1, 1)
    assert record["error"] == "RuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM"
    line = tpu_compile.render_markdown([dict(record, preset="cpu-tiny", commit="abc")])
    assert "| cpu-tiny | tiny | cpu | 1 | 1 | 1 | 48 | RuntimeError: RESOURCE_EXHAUSTED" in line


def test_tiny_model_on_tpu_v5e_chips():
    pytest.importorskip("libtpu", reason="compiling for a TPU without one needs libtpu")
    preset = dataclasses.replace(tpu_compile.PRESETS["cpu-tiny"], generations=("v5e",))
    record = tpu_compile.compile_case(preset, "v5e", 2, 2)
    assert record["device"] == "TPU v5 lite" and record["hbm_gib"] == 16 and record["fits"]
    # The tiny model's head dim (16) is not the kernel's: the reference runs.
    assert record["mosaic_kernels_per_step"] == 0 and record["ops_per_step"] > 0
