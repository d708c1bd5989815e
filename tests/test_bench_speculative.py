"""bench/speculative.py: the synthetic regime and the trained-model path on CPU presets."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from runenv import user_env

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("method", "tree", "batch", "temperature", "tau", "tokens_per_s", "speedup_vs_ar",
            "device", "jax_version", "date")


def _run(args, out, returncode=0):
    env = user_env()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "speculative.py"), *args,
                           "--repeats", "1", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == returncode, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "speculative-cpu.json").read_text())


def test_synthetic_tiny(tmp_path):
    records = _run(["--preset", "synthetic-tiny", "--batches", "1", "--compile-ahead", "2"],
                   tmp_path)
    oracle = [r for r in records if r["method"].startswith("oracle")]
    assert len(oracle) == 3
    for r in records:  # compiled ahead, side by side: the timed calls compiled nothing
        assert r["compile_ahead_s"] > 0 and r["first_call_compiles"] == 0
    for r in records:
        assert all(r.get(k) is not None for k in REQUIRED if not (r["method"] == "plain" and k == "tree"))
    for r in oracle:
        assert r["same_tokens_as_ar"] is True and r["speedup_vs_ar"] > 0
        assert r["step_ms"] > 0 and r["step_vs_plain"] > 0  # a speculative step vs a plain one
    (plain,) = [r for r in records if r["method"] == "plain"]
    assert plain["step_ms"] > 0 and "step_vs_plain" not in plain
    # The target's greedy tokens step through its permutation, so the oracle's rate holds: a
    # chain(4) at 0.9 accepts ~4.1 tokens per step in expectation (1 + 0.9 + ... + 0.9^4).
    assert all(r["oracle_target"] == "permutation" and r["target_follows_permutation"]
               for r in oracle)
    taus = [r["tau"] for r in sorted(oracle, key=lambda r: r["method"])]
    assert taus[0] < taus[2] and taus[2] > 2.5  # a better draft is accepted more (0.6 vs 0.9)
    table = (tmp_path / "speculative-cpu.md").read_text()
    assert "Goal (>= 2x" in table and "| ms/step | step cost |" in table


def test_trained_models_path(tokenized_checkpoint, tmp_path):
    records = _run(["--preset", "cpu-tiny", "--target", tokenized_checkpoint, "--draft",
                    tokenized_checkpoint, "--methods", "draft:chain:4,lookup", "--batches", "2",
                    "--temperatures", "0,1", "--max-new-tokens", "10"], tmp_path)
    keys = {(r["method"], r["temperature"]) for r in records}
    assert keys == {(m, t) for m in ("plain", "draft", "lookup") for t in (0.0, 1.0)}
    greedy_self = next(r for r in records if r["method"] == "draft" and r["temperature"] == 0)
    # Drafting for itself: every step emits 4 drafts + 1 (10 tokens in 2 steps).
    assert greedy_self["same_tokens_as_ar"] is True and greedy_self["tau"] == 5.0


def test_training_inside_the_call_and_both_attention_paths(tmp_path):
    """A trained preset with no --target/--draft trains both (shrunk here), writes the
    training record beside its own, and `--attention auto,reference` records both paths."""
    records = _run(["--preset", "cpu-tiny", "--steps", "3", "--draft-steps", "3",
                    "--max-train-bytes", "100000", "--eval-tokens", "2048",
                    "--methods", "draft:chain:4,retrieval", "--batches", "1",
                    "--temperatures", "0", "--max-new-tokens", "6", "--attention",
                    "auto,reference", "--compile-ahead", "2"], tmp_path)
    assert {(r["attention"], r["method"]) for r in records} == {
        (a, m) for a in ("auto", "reference") for m in ("plain", "draft", "retrieval")}
    # Every program compiled beside the training, from the configs the models would export
    # with (retrieval's once its datastore was built, before any timed run): the timed calls
    # on the trained models compiled nothing.
    assert all(r["compile_ahead_s"] > 0 and r["first_call_compiles"] == 0 for r in records)
    assert all(r["same_tokens_as_ar"] for r in records if r["method"] == "draft")
    train = json.loads((tmp_path / "train-cpu.json").read_text())
    assert [r["preset"] for r in train] == ["cpu-tiny"] and train[0]["steps"] == 3
    assert train[0]["compile_ahead_workers"] == 2
    assert 0 < train[0]["acceptance_after"] < 1
    assert "| cpu-tiny |" in (tmp_path / "train-cpu.md").read_text()


def test_resume_finishes_what_the_budget_left_out(tmp_path):
    """Runs skipped for time are recorded under the key their finished run will have, and
    `--resume` runs exactly those."""
    sys.path.insert(0, str(REPO))
    from bench.speculative import RECORD_KEY, method_label

    assert method_label("draft:kary:3:2") == ("draft", "kary(3, 2)")
    assert method_label("lookup")[0] == "lookup"
    args = ["--preset", "synthetic-tiny", "--batches", "1", "--resume"]
    skipped = _run(args + ["--budget-s", "0"], tmp_path, returncode=1)  # incomplete: says so
    assert len(skipped) == 3 and all(r["error"].startswith("skipped") for r in skipped)
    done = _run(args, tmp_path)
    assert len(done) == 4 and not any(r.get("error") for r in done)  # plain + 3 rates
    assert {tuple(r.get(k) for k in RECORD_KEY) for r in done} >= {
        tuple(r.get(k) for k in RECORD_KEY) for r in skipped}
    assert _run(args, tmp_path) == done  # nothing left to run
    (tmp_path / "speculative-cpu.md").unlink()  # only the JSON copied in (the device call's)
    assert _run(args, tmp_path) == done
    assert "| oracle@" in (tmp_path / "speculative-cpu.md").read_text()
    # Rows of older code are due again; a call out of time keeps their figures (it replaced
    # them with its skip rows).
    path = tmp_path / "speculative-cpu.json"
    older = [dict(r, spec_sources="older code") for r in done]
    path.write_text(json.dumps(older))
    cut = _run(args + ["--budget-s", "0"], tmp_path, returncode=1)
    assert [dict(r, last_attempt_error=None, last_attempt_date=None) for r in cut] == [
        dict(r, last_attempt_error=None, last_attempt_date=None) for r in older]
    assert {r["last_attempt_error"] for r in cut if r["method"] != "plain"} == {
        "skipped: time budget used up"}
    path.write_text(json.dumps(done))
    # Oracle rows from before the permutation target, and rows measured with other code (the
    # plain row here), are measured again.
    path = tmp_path / "speculative-cpu.json"
    sources = {r["spec_sources"] for r in done}
    assert len(sources) == 1 and None not in sources
    path.write_text(json.dumps([{k: v for k, v in r.items() if k != "oracle_target"}
                                | ({"spec_sources": "older code"} if r["method"] == "plain" else {})
                                for r in done]))
    again = _run(args, tmp_path)
    assert all(r["oracle_target"] == "permutation" for r in again if r["method"] != "plain")
    assert {r["spec_sources"] for r in again} == sources
    plain_date = [r["date"] for r in done if r["method"] == "plain"]
    assert [r["date"] for r in again if r["method"] == "plain"] != plain_date  # measured again
    assert "drafted plain decoding's continuation" not in (tmp_path /
                                                          "speculative-cpu.md").read_text()
    # One run missing: the whole group runs again, plain decoding beside it (a kept row's
    # speedup would divide by another call's plain run), and the table names both calls.
    path.write_text(json.dumps(again[:-1]))
    whole = _run(args, tmp_path)
    assert len(whole) == 4 and not {r["date"] for r in whole} & {r["date"] for r in again}
    # Rows of another --max-new-tokens are not this call's runs.
    shorter = _run(args + ["--max-new-tokens", "12"], tmp_path)
    assert sorted(r["max_new_tokens"] for r in shorter) == [12] * 4


def test_tables_of_merged_runs_name_each_run():
    sys.path.insert(0, str(REPO))
    from bench import kernels, matvec, speculative
    from bench.common import runs_note

    old = dict(date="2026-01-01T00:00:00+00:00", commit="aaa", jax_version="0.9.0")
    new = dict(date="2026-11-29T00:00:00+00:00", commit="bbb", jax_version="0.10.2")
    assert runs_note([old, old], lambda r: r["commit"]) == ""
    note = runs_note([old, new, new], lambda r: r["commit"])
    assert note.index("bbb (2 rows)") < note.index("aaa (1 rows)")
    rows = [dict(r, preset="p", attention="auto", method="plain", tree=None, batch=1,
                 temperature=0.0, tau=1.0, tokens_per_s=1.0, speedup_vs_ar=1.0,
                 max_new_tokens=24, device="cpu") for r in (old, new)]
    table = speculative.render_markdown(rows)
    assert "## p, attention auto (2026-11-29T00:00:00+00:00, jax 0.10.2, 24 new tokens)" in table
    assert "2 runs" in table
    base = dict(device="cpu", preset="p", dtype="bfloat16", hbm_gbps=1000.0, time_us=2.0,
                roofline_us=1.0, hbm_fraction=0.5)
    kernel_rows = [dict(base, **run, hbm_gbps=gbps, impl="pallas", batch=1, context=64, T=t,
                        heads=4, kv_heads=2, head_dim=16, matmul_peak_tflops=1.0,
                        vs_roofline=2.0, speedup_vs_reference=1.0)
                   for run, gbps, t in ((old, 900.0, 1), (new, 1000.0, 4))]
    table = kernels.render_markdown(kernel_rows)
    assert "jax 0.10.2" in table.splitlines()[2] and "HBM 1000 GB/s" in table.splitlines()[2]
    assert "HBM 900 GB/s" in table  # the older run's own ceiling, named
    matvec_rows = [dict(base, **run, hbm_gbps=gbps, impl="pallas", projection=proj, rows=1,
                        K=8, N=8, hbm_method="m")
                   for run, gbps, proj in ((old, 900.0, "qkv"), (new, 1000.0, "o"))]
    table = matvec.render_markdown(matvec_rows)
    assert "commit bbb" in table.splitlines()[2] and "HBM 900 GB/s" in table


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_permutation_target_greedy_tokens_step_through_its_permutation(dtype):
    """The synthetic target's greedy continuation is the permutation's, also in bf16 (where
    random weights' near-ties round apart between a verification and a one-token step)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(REPO))
    import jaxdec
    from bench.speculative import _synthetic_config, follows_permutation, permutation_target

    config = _synthetic_config("synthetic-tiny")
    model, perm = permutation_target(
        jaxdec.init_model(config, jax.random.PRNGKey(0), dtype=jnp.dtype(dtype)),
        jax.random.PRNGKey(1))
    assert sorted(perm) == list(range(config.vocab_size))
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    tokens = jaxdec.generate(model, prompts, max_new_tokens=12).tokens
    assert follows_permutation(prompts, tokens, perm)
    assert not follows_permutation(prompts, np.roll(tokens, 1, axis=1), perm)
    tied = jaxdec.abstract_model(dataclasses.replace(config, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="lm_head"):
        permutation_target(tied, jax.random.PRNGKey(1))


def test_compile_ahead_reports_failures_and_drops_what_the_deadline_leaves():
    import threading
    import time

    sys.path.insert(0, str(REPO))
    from bench.common import CompileAhead

    release = threading.Event()
    lines = []
    interval = sys.getswitchinterval()
    ahead = CompileAhead(1, log=lines.append)
    assert sys.getswitchinterval() == CompileAhead.SWITCH_INTERVAL_S  # while jobs run
    ahead.submit("slow", release.wait)
    ahead.submit("never started", lambda: None)
    ahead.wait(deadline=time.monotonic() + 0.2)  # one worker, busy: the second is dropped
    release.set()
    assert sys.getswitchinterval() == interval  # wait restored it
    assert ahead.seconds("never started") is None and ahead.jobs["never started"].cancelled()
    ahead.close()
    assert ("0 of 2 programs compiled (0 failed, 2 left to the timed calls, 1 of them still "
            "compiling beside the first timed runs)") in lines[-1]

    def broken():
        raise ValueError("no such shape")

    ahead = CompileAhead(2, log=lines.append)
    ahead.submit("ok", lambda: time.sleep(0.01))
    ahead.submit("broken", broken)
    ahead.submit("ok", broken)  # a key is compiled once
    ahead.wait()
    assert ahead.seconds("ok") >= 0.01 and ahead.seconds("broken") is None
    assert any("compile-ahead broken: failed" in line and "no such shape" in line for line in lines)
    assert "1 of 2 programs compiled (1 failed, 0 left" in lines[-1]
    ahead.close()
    disabled = CompileAhead(0)
    disabled.submit("x", broken)
    disabled.wait()
    assert not disabled.enabled and disabled.seconds("x") is None
    with pytest.raises(ValueError, match="workers must be an int >= 0"):
        CompileAhead(-1)


def test_token_agreement_and_its_table_cell():
    sys.path.insert(0, str(REPO))
    from bench import speculative as bench

    plain = [[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1]]
    assert bench.token_agreement(plain, plain) == dict(same_tokens_as_ar=True)
    spec = [[1, 2, 3, 9], [5, 6, 0, 0], [1, 1, 1, 1]]
    agreement = bench.token_agreement(spec, plain)
    assert agreement == dict(same_tokens_as_ar=False, rows_differing=2, first_difference=2)
    record = dict(preset="p", method="draft", tree="chain(4)", batch=3, temperature=0.0,
                  tau=2.0, tokens_per_s=10.0, speedup_vs_ar=1.5, device="d", **agreement)
    assert "| NO (2 rows, from token 2) |" in bench.render_markdown([record])


def test_attention_choices_and_a_note_in_the_table():
    import argparse

    sys.path.insert(0, str(REPO))
    from bench import speculative as bench

    assert bench._attention_list("pallas, reference,pallas") == ("pallas", "reference")
    with pytest.raises(argparse.ArgumentTypeError, match="auto, pallas, reference"):
        bench._attention_list("kernel")
    record = dict(preset="p", method="plain", tree=None, batch=1, temperature=0.0, tau=1.0,
                  tokens_per_s=10.0, speedup_vs_ar=1.0, device="d", attention="pallas",
                  attention_note="Run as auto at commit x.")
    table = bench.render_markdown([record])
    assert "## p, attention pallas" in table and "\nRun as auto at commit x.\n" in table


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 2, got 0"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--batches", "0"], "--batches must be >= 1, got 0"),
    (["--temperatures", "0,-1"], "--temperatures must be one or more values >= 0, got 0.0,-1.0"),
    (["--methods", ","], "--methods names no method"),
    (["--steps", "-1"], "argument --steps: must be >= 1, got -1"),
    (["--draft-steps", "x"], "argument --draft-steps: expected an integer, got 'x'"),
    (["--budget-s", "-5"], "--budget-s must be >= 0, got -5.0"),
    (["--target", "/nonexistent"], "--target /nonexistent: no config.json there"),
    (["--preset", "synthetic-tiny", "--temperatures", "1", "--steps", "3"],
     "--temperatures, --steps do not apply to the synthetic preset synthetic-tiny"),
])
def test_bad_overrides_are_named_before_anything_runs(flags, message, capsys):
    sys.path.insert(0, str(REPO))
    from bench import speculative

    with pytest.raises(SystemExit) as exit_info:
        speculative.main(["--preset", "cpu-tiny", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
