"""bench/decode.py: the cpu-tiny preset end to end (as a user runs it), and its byte arithmetic."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from runenv import user_env

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
REQUIRED = ("impl", "batch", "context", "new_tokens", "tokens_per_s", "step_ms", "prefill_s",
            "bytes_per_step", "achieved_gbps", "hbm_gbps", "hbm_fraction",
            "roofline_tokens_per_s", "device", "jax_version", "date", "preset", "error")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
sys.path.insert(0, str(SCRIPT.parents[1]))
from bench import common as bench_common  # noqa: E402


@pytest.fixture(scope="module")
def cpu_tiny_run(tmp_path_factory):
    """Runs `bench/decode.py --preset cpu-tiny` once (jaxdec and hf-eager, batch 1 and 2)."""
    out = tmp_path_factory.mktemp("bench")
    env = user_env()  # not the suite's 8 fake CPU devices: run as a user would
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "cpu-tiny", "--repeats", "2", "--out", str(out),
         "--compile-ahead", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_cpu_tiny_records(cpu_tiny_run):
    records = json.loads((cpu_tiny_run / "decode-cpu.json").read_text())
    assert {(r["impl"], r["batch"]) for r in records} == {
        (impl, batch) for impl in ("jaxdec", "hf-eager") for batch in (1, 2)
    }
    for r in records:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert r["error"] is None
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["prefill_s"] > 0
        assert r["hbm_gbps"] > 0 and r["hbm_fraction"] > 0 and r["roofline_tokens_per_s"] > 0
        assert r["hbm_fraction"] == pytest.approx(r["tokens_per_s"] / r["roofline_tokens_per_s"])
        assert (r["context"], r["new_tokens"], r["preset"]) == (64, 8, "cpu-tiny")
        assert r["device"] == "cpu" and r["jax_version"] == jax.__version__ and r["date"]
        # Each impl counted its own model's bytes: the same model, matching the formula.
        assert r["param_bytes"] == 2 * bench.param_count(bench.TINY)
        if r["impl"] == "jaxdec":  # compiled while the weights were drawn
            assert r["compile_ahead_s"] > 0 and r["first_call_compiles"] == 0
            # A traced run followed the timed ones; a CPU trace has no device kernels.
            assert r["profile"]["run_s"] > 0
            assert r["profile"]["error"] == "no device events in the trace"


def test_trace_summary_hand_computed():
    """Kernel time by name, from the device's processes only (a GPU trace's layout)."""
    trace = {"traceEvents": [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 1, "name": "PjitFunction", "dur": 5000.0},
        {"ph": "X", "pid": 7, "name": "tree_attention", "dur": 20.0},
        {"ph": "X", "pid": 7, "name": "gemm_fusion", "dur": 300.0},
        {"ph": "X", "pid": 7, "name": "tree_attention", "dur": 30.0},
        {"ph": "X", "pid": 7, "name": "add_fusion", "dur": 3.0},
        {"ph": "i", "pid": 7, "name": "marker"},
    ]}
    summary = bench_common.summarize_trace(trace, top=1)
    assert summary == dict(kernel_s=0.000353, events=4, short_events=1, short_s=3e-6,
                           kernels=[dict(name="gemm_fusion", ms=0.3, calls=1)])
    assert bench_common.summarize_trace(trace)["kernels"][1] == dict(
        name="tree_attention", ms=0.05, calls=2)
    assert "error" in bench_common.summarize_trace(trace["traceEvents"][:3])
    text = bench._profile_text(dict(summary, run_s=0.001))
    assert "4 kernels ran, 1 of them shorter than 5 us (0.000 s in all)" in text
    assert "of the call's 0.001 s wall" in text
    # Older records timed the profiler's start and stop too: their wall time is not compared.
    assert "wall" not in bench._profile_text(dict(summary, wall_s=4.6))


def test_trace_summary_of_a_tpu_layout_counts_its_ops_line_only():
    """A TPU's trace has an "XLA Modules" line spanning the ops of its "XLA Ops" line (and
    "Steps"): summed together every kernel counted twice (or more)."""
    trace = {"traceEvents": [
        {"ph": "M", "pid": 3, "name": "process_name", "args": {"name": "/device:TPU:0"}},
        {"ph": "M", "pid": 3, "tid": 1, "name": "thread_name", "args": {"name": "Steps"}},
        {"ph": "M", "pid": 3, "tid": 2, "name": "thread_name", "args": {"name": "XLA Modules"}},
        {"ph": "M", "pid": 3, "tid": 3, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "X", "pid": 3, "tid": 1, "name": "0", "dur": 400.0},
        {"ph": "X", "pid": 3, "tid": 2, "name": "jit_generate(123)", "dur": 380.0},
        {"ph": "X", "pid": 3, "tid": 3, "name": "fusion.1", "dur": 300.0},
        {"ph": "X", "pid": 3, "tid": 3, "name": "tree_attention", "dur": 70.0},
    ]}
    summary = bench_common.summarize_trace(trace)
    assert summary["kernel_s"] == 0.00037 and summary["events"] == 2
    assert [k["name"] for k in summary["kernels"]] == ["fusion.1", "tree_attention"]
    # A device without an ops line (a GPU's streams): every line but the spanning ones.
    gpu = {"traceEvents": [
        {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 7, "tid": 1, "name": "thread_name", "args": {"name": "Stream #13"}},
        {"ph": "M", "pid": 7, "tid": 2, "name": "thread_name", "args": {"name": "XLA Modules"}},
        {"ph": "X", "pid": 7, "tid": 1, "name": "gemm_fusion", "dur": 30.0},
        {"ph": "X", "pid": 7, "tid": 2, "name": "jit_generate(1)", "dur": 35.0},
    ]}
    assert bench_common.summarize_trace(gpu)["kernel_s"] == 0.00003


def test_profile_times_the_call_not_the_profiler():
    """`run_s` is the traced call's time: starting and stopping the profiler (which writes
    the trace) are outside it."""
    import time

    step = jax.jit(lambda x: x + 1)
    x = jax.numpy.zeros(4)
    step(x).block_until_ready()  # compiled before the traced call
    start = time.perf_counter()
    profile = bench_common.profile_kernels(lambda: step(x))
    total = time.perf_counter() - start
    assert 0 < profile["run_s"] < total / 4


def test_resume_runs_only_the_missing_impls(cpu_tiny_run, tmp_path):
    """--resume keeps hf-eager (finished for both batch sizes) and runs jaxdec (whose records
    say it failed) and jaxdec-reference (never run), the two in one worker."""
    before = json.loads((cpu_tiny_run / "decode-cpu.json").read_text())
    kept = [r for r in before if r["impl"] == "hf-eager"]
    failed = [dict(r, tokens_per_s=None, error="timed out") for r in before
              if r["impl"] == "jaxdec"]
    (tmp_path / "decode-cpu.json").write_text(json.dumps(kept + failed))
    env = user_env()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "cpu-tiny", "--repeats", "1", "--resume",
         "--impls", "jaxdec,jaxdec-reference,hf-eager", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "hf-eager: already measured" in proc.stdout
    assert "[decode bench] jaxdec,jaxdec-reference: finished" in proc.stdout
    after = {(r["impl"], r["batch"]): r for r in
             json.loads((tmp_path / "decode-cpu.json").read_text())}
    assert set(after) == {(i, b) for i in ("jaxdec", "jaxdec-reference", "hf-eager")
                          for b in (1, 2)}
    for r in kept:  # kept as measured (the ceiling is the best of both calls)
        assert after[r["impl"], r["batch"]]["decode_s"] == r["decode_s"]
        assert after[r["impl"], r["batch"]]["hbm_gbps"] >= r["hbm_gbps"]
    assert all(r["error"] is None for r in after.values())
    assert after["jaxdec-reference", 1]["notes"] == "jaxdec.generate, attention=reference"
    assert after["jaxdec", 1]["notes"] == "jaxdec.generate, attention=auto"
    current = bench_common.sources_digest(bench_common.MODEL_SOURCES)
    assert after["jaxdec", 2]["model_sources"] == current
    assert "model_sources" not in after["hf-eager", 2]


def test_resume_drops_jaxdec_rows_of_other_model_code(tmp_path, monkeypatch):
    """jaxdec's rows measured another version of the code a decode step runs (another
    `model_sources`, or none: before records carried it) are not kept; transformers' are."""
    spec = bench.make_spec(bench.parse_args(["--preset", "cpu-tiny"])[1], bench.PRESETS["cpu-tiny"])
    current = bench_common.sources_digest(bench_common.MODEL_SOURCES)
    row = dict(preset="cpu-tiny", context=spec["context"], new_tokens=spec["new_tokens"],
               error=None, hbm_gbps=1.0)
    rows = [dict(row, impl=impl, batch=b, **extra) for b in spec["batch_sizes"]
            for impl, extra in (("hf-eager", {}), ("jaxdec", dict(model_sources=current)),
                                ("jaxdec-reference", dict(model_sources="0" * 16)))]
    rows += [dict(row, impl="jaxdec-reference", batch=b) for b in spec["batch_sizes"]]
    (tmp_path / "decode-cpu.json").write_text(json.dumps(rows))
    impls = ("hf-eager", "jaxdec", "jaxdec-reference")
    kept, _ = bench.kept_records(tmp_path, "cpu-tiny", spec, impls, resume=True, device="cpu")
    assert sorted({r["impl"] for r in kept}) == ["hf-eager", "jaxdec"]
    # Without --resume the impls asked for run again; the others' rows stay.
    kept, _ = bench.kept_records(tmp_path, "cpu-tiny", spec, ("jaxdec",), resume=False,
                                 device="cpu")
    assert sorted({r["impl"] for r in kept}) == ["hf-eager", "jaxdec-reference"]


def test_a_call_keeps_the_other_configurations_rows(cpu_tiny_run, tmp_path):
    """A call with another context replaces its own configuration's rows only: the others
    stay in the JSON file and get a table of their own."""
    before = json.loads((cpu_tiny_run / "decode-cpu.json").read_text())
    (tmp_path / "decode-cpu.json").write_text(json.dumps(before))
    spec = bench.make_spec(bench.parse_args(["--preset", "cpu-tiny", "--context", "32"])[1],
                           bench.PRESETS["cpu-tiny"])
    meta = dict(spec, preset="cpu-tiny", description="tiny")
    mine = [dict(r, context=32, prompt_len=spec["prompt_len"]) for r in before]
    bench.write_outputs(tmp_path, mine, {"probe": 10.0}, meta)
    after = json.loads((tmp_path / "decode-cpu.json").read_text())
    assert sorted(r["context"] for r in after) == sorted([32] * len(mine) + [64] * len(before))
    text = (tmp_path / "decode-cpu.md").read_text()
    assert text.index("context 32 (prompt") < text.index("## Greedy decode") < text.index(
        "context 64 (prompt")
    assert "Memory bandwidth these rows were judged by: their ceiling" in text
    bench.write_outputs(tmp_path, mine, {"probe": 10.0}, meta)  # its own rows replaced
    assert len(json.loads((tmp_path / "decode-cpu.json").read_text())) == len(after)


def test_a_timed_out_row_keeps_the_figures_it_would_replace(cpu_tiny_run, tmp_path):
    """A call whose budget cut a run (stale rows due again, then timed out) keeps the
    earlier figures in the file, marked with the attempt: it replaced them with the error
    (the README's headline numbers lost from bench/results/ by one short device call)."""
    before = json.loads((cpu_tiny_run / "decode-cpu.json").read_text())
    (tmp_path / "decode-cpu.json").write_text(json.dumps(before))
    meta = dict(bench.make_spec(bench.parse_args(["--preset", "cpu-tiny"])[1],
                                bench.PRESETS["cpu-tiny"]), preset="cpu-tiny", description="tiny")
    cut = [dict(r, tokens_per_s=None, error="timed out after 1 s") if r["impl"] == "jaxdec"
           else r for r in before]
    bench.write_outputs(tmp_path, cut, {"probe": 10.0}, meta)
    after = json.loads((tmp_path / "decode-cpu.json").read_text())
    assert len(after) == len(before)
    for old, new in zip(before, after):
        if old["impl"] == "jaxdec":
            assert new["tokens_per_s"] == old["tokens_per_s"] and new["error"] is None
            assert new["last_attempt_error"] == "timed out after 1 s"
        else:
            assert new == old
    assert "Kept from earlier calls" in (tmp_path / "decode-cpu.md").read_text()
    assert "jaxdec batch 1 (measured at" in (tmp_path / "decode-cpu.md").read_text()
    # A failure that is not one of time is the finding: it replaces the row.
    failed = [dict(r, error="RuntimeError('boom')") for r in before]
    bench.write_outputs(tmp_path, failed, {"probe": 10.0}, meta)
    assert all(r["error"] == "RuntimeError('boom')"
               for r in json.loads((tmp_path / "decode-cpu.json").read_text()))


def test_a_call_whose_workers_never_ran_writes_its_devices_file(cpu_tiny_run, tmp_path):
    """With no worker's word of its device (the budget used up before any started), the
    skipped rows go to the device's file, keeping its figures (they went to
    decode-unknown.json, headed "an unknown device"), those of every impl (the write after
    the first worker dropped the rows of the impls still to run: their figures were lost)."""
    before = json.loads((cpu_tiny_run / "decode-cpu.json").read_text())
    (tmp_path / "decode-cpu.json").write_text(json.dumps(before))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "cpu-tiny", "--budget-s", "0",
                           "--out", str(tmp_path)],
                          env=user_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode-cpu.json", "decode-cpu.md"]
    after = json.loads((tmp_path / "decode-cpu.json").read_text())
    assert [r["tokens_per_s"] for r in after] == [r["tokens_per_s"] for r in before]
    assert {r["last_attempt_error"] for r in after} == {
        "skipped: the time budget (--budget-s) was used up"}
    assert "on cpu" in (tmp_path / "decode-cpu.md").read_text()


def test_cpu_tiny_markdown(cpu_tiny_run):
    text = (cpu_tiny_run / "decode-cpu.md").read_text()
    assert "| impl | batch | tokens/s |" in text
    assert "| jaxdec | 1 |" in text and "| hf-eager | 2 |" in text
    assert "GB/s" in text and "Goal: jaxdec at batch 1" in text


def test_llama3_8b_bytes_per_step():
    assert bench.param_count(bench.LLAMA3_8B) == 8_030_261_248  # Llama-3-8B's parameter count
    embed = 128256 * 4096 * 2
    b1 = bench.bytes_per_step(bench.LLAMA3_8B, batch=1, context=2048)
    assert b1["weight_bytes"] == 8_030_261_248 * 2 - embed + 4096 * 2
    assert b1["kv_bytes"] == 2 * 32 * 2048 * 8 * 128 * 2
    b16 = bench.bytes_per_step(bench.LLAMA3_8B, batch=16, context=2048)
    assert b16["kv_bytes"] == 16 * b1["kv_bytes"]
    # 15.3 GB per step: about 196 tokens/s at batch 1 on 3 TB/s (an H100's copy bandwidth).
    record = bench.add_roofline(dict(batch=1, context=2048, step_ms=None), bench.LLAMA3_8B, 3000.0)
    assert 195 < record["roofline_tokens_per_s"] < 197 and record["hbm_fraction"] is None


def test_roofline_fields():
    r = bench.add_roofline(dict(batch=2, context=64, step_ms=0.5), bench.TINY, 100.0)
    assert r["achieved_gbps"] == pytest.approx(r["bytes_per_step"] / 0.5e-3 / 1e9)
    assert r["hbm_fraction"] == pytest.approx(r["achieved_gbps"] / 100.0)
    tokens_per_s = 2 / 0.5e-3
    assert r["hbm_fraction"] == pytest.approx(tokens_per_s / r["roofline_tokens_per_s"])


def test_a_step_faster_than_the_ceiling_is_an_error():
    """The first H200 run timed jaxdec's steps at 0.02 ms (a clock read after the loop): such
    a record is flagged, is no goal, and is measured again by a resumed run."""
    fast = bench.add_roofline(dict(batch=1, context=2048, step_ms=0.02, impl="jaxdec",
                                   tokens_per_s=5e4), bench.LLAMA3_8B, 4000.0)
    assert fast["error"].startswith("implausible: ") and fast["hbm_fraction"] > 100
    assert "no valid measurement" in bench._goal_line(fast)
    fine = bench.add_roofline(dict(batch=1, context=2048, step_ms=4.0, error=None),
                              bench.LLAMA3_8B, 4000.0)
    assert fine["error"] is None and 0.9 < fine["hbm_fraction"] < 1


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("cpu", "cpu"),
    ("NVIDIA A100-SXM4-80GB", "a100"), (None, "unknown"), ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"), ("TPU v5 lite", "v5e"), ("TPU v5", "v5"),
    ("TPU v6 lite", "v6e"), ("TPU v4", "v4"),
])
def test_device_slug(name, slug):
    assert bench.device_slug(name) == slug


def test_worker_units_share_one_jaxdec_process():
    assert bench.worker_units(bench.IMPLS) == [["jaxdec", "jaxdec-reference", "jaxdec-matvec"],
                                              ["jaxdec-cublas"], ["jaxdec-graphs"], ["hf-eager"],
                                              ["hf-compile"]]
    # XLA reads its flags once per process: an impl with flags gets a worker of its own.
    assert "--xla_gpu_enable_triton_gemm=false" in bench._worker_env(["jaxdec-cublas"])[
        "XLA_FLAGS"]
    assert "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" in bench._worker_env(
        ["jaxdec-graphs"])["XLA_FLAGS"]
    assert "triton_gemm" not in bench._worker_env(["jaxdec"]).get("XLA_FLAGS", "")
    assert bench.worker_units(["hf-eager", "jaxdec-reference", "hf-compile", "jaxdec"]) == [
        ["hf-eager"], ["jaxdec-reference"], ["hf-compile"], ["jaxdec"]]
    # A worker's events name their impl; the worker's own (device, bandwidth) name none.
    events = [dict(event="env", device="d"),
              dict(event="result", impl="jaxdec", batch=1, decode_s=1.0, decode_s_runs=[1.0],
                   prefill_s=0.1, param_bytes=10, notes="n"),
              dict(event="error", impl="jaxdec-reference", batch=1, error="boom")]
    spec = dict(new_tokens=3, batch_sizes=[1])
    (kernel,) = bench.impl_records("jaxdec", events, None, spec, {})
    (reference,) = bench.impl_records("jaxdec-reference", events, None, spec, {})
    assert kernel["error"] is None and kernel["tokens_per_s"] == 2.0 and kernel["device"] == "d"
    assert reference["error"] == "boom" and reference["device"] == "d"


@pytest.mark.parametrize("flags, message", [
    (["--new-tokens", "0"], "--new-tokens must be >= 2"),
    (["--context", "0"], "--context 0 is too short"),
])
def test_zero_overrides_are_refused_not_replaced(flags, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--preset", "cpu-tiny", *flags])
    assert message in capsys.readouterr().err
