"""bench/train.py: a small preset, shrunk to a few steps, end to end; merging records."""

import json
import sys
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import merge_records, write_merged  # noqa: E402
from train_presets import MICRO  # noqa: E402

REQUIRED = ("preset", "params", "tokens_per_s", "mfu", "heldout_loss", "acceptance_before",
            "acceptance_after", "device", "jax_version", "date")


def test_micro_preset_end_to_end(tmp_path, monkeypatch):
    """bench/train.py's main on the test preset (in process: the cpu-tiny preset trains in the
    speculative benchmark's test, through the same `run` and writer)."""
    from jaxdec.train import presets

    from bench import train as bench_train

    monkeypatch.setitem(presets.PRESETS, MICRO.name, MICRO)
    out = tmp_path / "results"
    out.mkdir()
    # A record of another preset already there survives (runs accumulate per device).
    (out / "train-cpu.json").write_text(json.dumps([{"preset": "gpu-small", "params": 1}]))
    assert bench_train.main(["--preset", MICRO.name, "--steps", "3", "--draft-steps", "3",
                             "--eval-tokens", "1024", "--out", str(out)]) == 0
    records = json.loads((out / "train-cpu.json").read_text())
    assert [r["preset"] for r in records] == ["gpu-small", MICRO.name]
    record = records[1]
    assert all(record.get(k) is not None for k in REQUIRED), record
    assert record["error"] is None
    assert record["device"] == "cpu" and record["jax_version"] == jax.__version__
    assert record["steps"] == 3 and record["params"] > 5e4
    assert record["tokens_per_s"] > 0 and 0 < record["mfu"] < 1.5
    assert 0 < record["acceptance_before"] < 1 and 0 < record["acceptance_after"] < 1
    assert record["compile_ahead_workers"] == 0  # trained alone
    phases = record["target_phase_seconds"]
    assert {"corpus", "tokenizer", "encode", "init", "eval", "train", "export"} <= set(phases)
    assert all(s >= 0 for s in phases.values()) and record["target_compile_seconds"] > 0
    assert {"load target", "train", "eval"} <= set(record["draft_phase_seconds"])
    table = (out / "train-cpu.md").read_text()
    assert f"| {MICRO.name} |" in table and f"- {MICRO.name}: target corpus " in table
    # A training beside a benchmark's compiles is kept apart from the one alone.
    bench_train.write_outputs(out / "train-cpu.json", dict(record, compile_ahead_workers=8))
    records = json.loads((out / "train-cpu.json").read_text())
    assert [(r["preset"], r.get("compile_ahead_workers")) for r in records] == [
        ("gpu-small", None), (MICRO.name, 0), (MICRO.name, 8)]


def test_a_run_stopped_during_the_draft_keeps_the_targets_figures(tmp_path, monkeypatch):
    import jaxdec.train
    from jaxdec.train import presets

    from bench import train as bench_train

    monkeypatch.setitem(presets.PRESETS, MICRO.name, MICRO)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # the device step's time limit, say

    monkeypatch.setattr(jaxdec.train, "train_draft", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench_train.main(["--preset", MICRO.name, "--steps", "3", "--eval-tokens", "1024",
                          "--out", str(tmp_path)])
    (record,) = json.loads((tmp_path / "train-cpu.json").read_text())
    assert record["tokens_per_s"] > 0 and record["mfu"] > 0 and record["heldout_loss"] > 0
    assert record["matmul_peak_tflops"] > 0 and "draft_params" not in record
    assert record["error"].startswith("unfinished: the draft was not trained")
    assert "the draft was not trained" in (tmp_path / "train-cpu.md").read_text()
    # A complete record measured before is kept (the stopped run's attempt named beside it).
    complete = dict(record, acceptance_after=0.37, draft_seconds=34.0, error=None,
                    date="2026-11-27T00:00:00+00:00")
    (tmp_path / "train-cpu.json").write_text(json.dumps([complete]))
    with pytest.raises(KeyboardInterrupt):
        bench_train.main(["--preset", MICRO.name, "--steps", "3", "--eval-tokens", "1024",
                          "--out", str(tmp_path)])
    (kept,) = json.loads((tmp_path / "train-cpu.json").read_text())
    assert kept == dict(complete, last_attempt_error=record["error"],
                        last_attempt_date=kept["last_attempt_date"])
    assert kept["last_attempt_date"] > complete["date"]


def test_merge_records(tmp_path):
    path = tmp_path / "r.json"
    assert merge_records(path, [{"k": "a", "v": 1}], key="k") == [{"k": "a", "v": 1}]
    path.write_text(json.dumps([{"k": "a", "v": 1}, {"k": "b", "v": 2}]))
    assert merge_records(path, [{"k": "a", "v": 3}], key="k") == [{"k": "b", "v": 2},
                                                                   {"k": "a", "v": 3}]
    path.write_text(json.dumps([{"k": "a", "j": 1}, {"k": "a", "j": 2}]))
    assert merge_records(path, [{"k": "a", "j": 2, "v": 0}], key=("k", "j")) == [
        {"k": "a", "j": 1}, {"k": "a", "j": 2, "v": 0}]



def test_write_merged_replaces_both_files_whole(tmp_path, monkeypatch):
    """The JSON and its table are written beside and renamed: a write that fails (a step
    killed at its time limit) leaves the previous files as they were."""
    path = tmp_path / "r.json"
    render = lambda rs: "".join(f"| {r['k']} | {r['v']} |\n" for r in rs)  # noqa: E731
    assert write_merged(path, [{"k": "a", "v": 1}], "k", render) == [{"k": "a", "v": 1}]
    write_merged(path, [{"k": "b", "v": 2}], "k", render, indent=1)
    assert json.loads(path.read_text()) == [{"k": "a", "v": 1}, {"k": "b", "v": 2}]
    assert path.with_suffix(".md").read_text() == "| a | 1 |\n| b | 2 |\n"
    before = path.read_bytes()

    def cut(self, text):
        self.open("w").write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", cut)
    with pytest.raises(KeyboardInterrupt):
        write_merged(path, [{"k": "a", "v": 3}], "k", render)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.json.partial", "r.md"]