"""bench/device.py: the one-call device driver, on its CPU plan."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from runenv import user_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import common, device  # noqa: E402


def _drive(*args, returncode=0):
    env = user_env()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "device.py"), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _archive(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / device.ARCHIVE) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_cpu_plan_measures_then_skips_what_is_measured(tmp_path):
    committed = tmp_path / "committed"
    committed.mkdir()
    (committed / "kernels-h100.json").write_text("[]")  # another device's file stays out
    _drive("--plan", "cpu-tiny", "--out", tmp_path / "first", "--results", committed)
    files = _archive(tmp_path / "first")
    assert sorted(files) == sorted(f"{n}-cpu.{e}" for n in ("gpu-tests", "speculative")
                                   for e in ("json", "md"))
    tests = json.loads(files["gpu-tests-cpu.json"])
    assert len(tests) == 1 and tests[0]["passed"] >= 1 and tests[0]["error"] is None
    # two groups side by side (bench/pytest_shards.py), one junit report
    assert tests[0]["suite"] == "tests/test_tree_attention_vs_reference.py tests/test_tree.py"
    assert tests[0]["passed"] >= 2
    assert sorted((g["files"], g["exit_code"]) for g in tests[0]["groups"]) == [
        (["tests/test_tree.py"], 0), (["tests/test_tree_attention_vs_reference.py"], 0)]
    slowest = tests[0]["slowest"]  # from the junit report: the tests that cost the most
    assert 1 <= len(slowest) <= 5 and all(t["test"].count("::") >= 1 for t in slowest)
    assert [t["seconds"] for t in slowest] == sorted((t["seconds"] for t in slowest),
                                                     reverse=True)
    assert ", slowest tests: `" in files["gpu-tests-cpu.md"].decode()
    spec = json.loads(files["speculative-cpu.json"])
    assert {r["attention"] for r in spec} == {"reference"}
    summary = json.loads((tmp_path / "first" / "device-summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["finished"] * 2
    assert "[device] summary" in (tmp_path / "first" / "device-log.txt").read_text()

    # The next call starts from those results (as if committed) and measures nothing again.
    for name, data in files.items():
        (committed / name).write_bytes(data)
    _drive("--plan", "cpu-tiny", "--out", tmp_path / "second", "--results", committed)
    summary = json.loads((tmp_path / "second" / "device-summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["already measured"] * 2
    assert _archive(tmp_path / "second") == {}  # only what a call changed travels back


def test_budget_and_step_names(tmp_path):
    out = _drive("--plan", "cpu-tiny", "--only", "gpu-tests", "--budget-s", "2", "--out",
                 tmp_path, returncode=1)
    assert "gpu-tests: not started" in out
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "device.py"), "--redo", "kernal",
                           "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown steps ['kernal']" in proc.stderr
    listing = _drive("--list")
    assert [line.split()[0] for line in listing.splitlines()] == [s.name for s in device.plan("gpu")]
    listing = _drive("--list", "--only", "decode,gpu-tests,decode")  # --only's order, once each
    assert [line.split()[0] for line in listing.splitlines()] == ["decode", "gpu-tests"]
    listing = _drive("--list", "--only", "all")  # every step, as --redo all
    assert [line.split()[0] for line in listing.splitlines()] == [s.name for s in device.plan("gpu")]


def test_a_bare_machine_installs_the_checkout_then_starts_again(monkeypatch, tmp_path):
    """The plan imports the library, whose `jaxdec.models` resolves only through the editable
    install's import hook, which an interpreter reads at start-up: where `import jaxdec.models`
    fails, the checkout is installed and the script starts again in a fresh interpreter (with
    the same arguments); a failed install, or an import still failing after one, stops it."""
    calls, pip_code, importable = [], [0], [False]

    class Started(Exception):
        pass

    real_run = device.subprocess.run

    def run(argv, *args, **kwargs):
        if argv[1:] == ["-c", "import jaxdec.models"]:
            calls.append("import?")
            return subprocess.CompletedProcess(
                argv, 0 if importable[0] else 1, "",
                "" if importable[0] else "ModuleNotFoundError: No module named 'jaxdec.models'\n")
        return real_run(argv, *args, **kwargs)

    def install(argv, timeout_s, log, env, stamp=False):
        calls.append("install" if argv[1:4] == ["-m", "pip", "install"] else argv)
        return pip_code[0], 0.0

    def execve(path, argv, env):
        calls.append(("execve", argv[1:], env.get("JAXDEC_DEVICE_INSTALLED")))
        # the first interpreter's start: the install counts against the budget
        assert 0 <= time.monotonic() - float(env["JAXDEC_DEVICE_STARTED"]) < 60
        raise Started

    real_plan = device.plan
    monkeypatch.delenv("JAXDEC_DEVICE_INSTALLED", raising=False)
    monkeypatch.delenv("JAXDEC_DEVICE_STARTED", raising=False)
    monkeypatch.setattr(device.subprocess, "run", run)
    monkeypatch.setattr(device, "run_command", install)
    monkeypatch.setattr(device.os, "execve", execve)
    monkeypatch.setattr(device, "plan", lambda name: calls.append("plan") or real_plan(name))
    with pytest.raises(Started):
        device.main(["--list", "--only", "decode"])
    assert calls == ["import?", "install",
                     ("execve", [str(REPO / "bench" / "device.py"), "--list", "--only", "decode"],
                      "1")]
    calls.clear()  # the fresh interpreter, where the import still fails: no second install
    monkeypatch.setenv("JAXDEC_DEVICE_INSTALLED", "1")
    assert device.main(["--out", str(tmp_path)]) == 2
    assert calls == ["import?"]
    assert ("even after installing the checkout: ModuleNotFoundError: No module named "
            "'jaxdec.models'") in (tmp_path / "device-log.txt").read_text()
    calls.clear()
    monkeypatch.delenv("JAXDEC_DEVICE_INSTALLED")
    pip_code[0] = 1
    assert device.main(["--out", str(tmp_path)]) == 2
    assert calls == ["import?", "install"]
    assert "pip install failed" in (tmp_path / "device-log.txt").read_text()
    calls.clear()  # installed: straight to the plan
    importable[0] = True
    assert device.main(["--list"]) == 0
    assert calls == ["import?", "plan"]


def test_completeness_rule(tmp_path):
    done = device._complete("speculative", preset="p", attention=("auto", "reference"))
    path = tmp_path / "speculative-h100.json"
    assert not done(tmp_path, "h100")  # no file
    rows = [{"preset": "p", "attention": "auto"}, {"preset": "q", "attention": "reference"}]
    path.write_text(json.dumps(rows))
    assert not done(tmp_path, "h100")  # the reference path is missing for preset p
    rows.append({"preset": "p", "attention": "reference"})
    path.write_text(json.dumps(rows))
    assert done(tmp_path, "h100")
    rows.append({"preset": "p", "attention": "auto", "error": "skipped: time budget used up"})
    path.write_text(json.dumps(rows))
    assert not done(tmp_path, "h100")


def test_decode_is_done_once_hf_compile_was_tried(tmp_path):
    """The decode step needs the jaxdec impls (measured with today's model code) and hf-eager
    finished, and hf-compile tried: a crash of it is not retried by every call, a run cut by
    time is."""
    decode = next(s for s in device.plan("gpu") if s.name == "decode")
    path = tmp_path / "decode-h100.json"
    current = device.common_sources_digest(device.MODEL_SOURCES)
    config = {"preset": "h100", "context": 2048, "new_tokens": 128}
    rows = [{**config, "impl": impl, "batch": b, "model_sources": current}
            for b in (1, 16)
            for impl in ("jaxdec", "jaxdec-reference", "jaxdec-matvec", "jaxdec-cublas",
                         "jaxdec-graphs", "hf-eager")]
    path.write_text(json.dumps(rows))
    assert not decode.done(tmp_path, "h100")  # hf-compile never ran
    for error, done in (("timed out after 300 s", False),
                        ("skipped: the time budget (--budget-s) was used up", False),
                        ("worker exited with code 1", True), (None, True)):
        tried = [{**config, "impl": "hf-compile", "batch": b, "error": error}
                 for b in (1, 16)]
        path.write_text(json.dumps(rows + tried))
        assert decode.done(tmp_path, "h100") is done, error
        # Rows of another context (another call's table in the same file) do not count.
        path.write_text(json.dumps([dict(r, context=32) for r in rows + tried]))
        assert not decode.done(tmp_path, "h100")
    for i in (2, 3, 4):  # the matrix-vector kernel's, cuBLAS's, graphs' failures: not retried
        rows[i]["error"] = "worker exited with code 1"
    path.write_text(json.dumps(rows + tried))
    assert [rows[i]["impl"] for i in (2, 3, 4)] == ["jaxdec-matvec", "jaxdec-cublas",
                                                    "jaxdec-graphs"]
    assert decode.done(tmp_path, "h100")
    rows[0]["error"] = "worker exited with code 1"  # a jaxdec impl must finish
    path.write_text(json.dumps(rows + tried))
    assert not decode.done(tmp_path, "h100")
    rows[0].update(error=None, model_sources="0" * 16)  # ... with the code as it is
    path.write_text(json.dumps(rows + tried))
    assert not decode.done(tmp_path, "h100")


def test_a_stopped_step_takes_its_children_with_it(tmp_path):
    pid_file = tmp_path / "child"
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen(['sleep', '120']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); "
              "time.sleep(120)")
    lines = []
    started = time.monotonic()
    code, seconds = device.run_command([sys.executable, "-c", script], 3, lines.append,
                                       dict(os.environ))
    assert code is None and seconds < 30 and time.monotonic() - started < 60
    assert lines == ["started\n"]
    status = Path(f"/proc/{int(pid_file.read_text())}/status")
    for _ in range(50):  # gone, or a zombie waiting to be reaped
        if not status.exists() or "State:\tZ" in status.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the step's child process outlived the step")


def test_a_stopped_decode_step_takes_its_worker_with_it(tmp_path):
    """bench/decode.py's worker runs in a session of its own: stopping the step (its
    process group) left the worker running, holding the accelerator."""
    def workers():
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "--worker" in text and '"repeats": 97731' in text:
                found.append(cmdline.parent.name)
        return found

    lines = []
    env = dict(user_env(), PYTHONUNBUFFERED="1")
    argv = [sys.executable, str(REPO / "bench" / "decode.py"), "--preset", "cpu-tiny",
            "--repeats", "97731", "--out", str(tmp_path)]
    started = time.monotonic()
    code, _ = device.run_command(argv, 12, lines.append, env)
    assert code is None and time.monotonic() - started < 60
    assert any("[decode jaxdec" in line for line in lines), lines  # its worker had started
    orphans = workers()  # (its 97731 repeats would keep an orphan busy for minutes)
    for pid in orphans:
        os.kill(int(pid), signal.SIGKILL)
    assert not orphans, "the decode worker outlived its step"


def test_kernel_changes_make_the_device_tests_due_again(tmp_path):
    step = next(s for s in device.plan("gpu") if s.name == "gpu-tests")
    record = dict(plan="gpu", passed=40, error=None, sources=device.sources_digest())
    (tmp_path / "gpu-tests-h100.json").write_text(json.dumps([record]))
    assert step.done(tmp_path, "h100")
    (tmp_path / "gpu-tests-h100.json").write_text(json.dumps([dict(record, sources="0" * 16)]))
    assert not step.done(tmp_path, "h100")


def test_every_gpu_step_parses_with_its_benchmark():
    """A flag renamed in a benchmark would otherwise fail only on the device."""
    from bench import decode, kernels, matvec, speculative, train

    parsers = {"bench/decode.py": lambda a: decode.parse_args(a)[1],
               "bench/kernels.py": kernels.parse_args, "bench/matvec.py": matvec.parse_args,
               "bench/train.py": lambda a: train.build_parser().parse_args(a),
               "bench/speculative.py": lambda a: speculative.build_parser().parse_args(a)}
    for step in device.plan("gpu"):
        if step.pytest:
            continue
        argv = [a.replace("{out}", "/tmp/out").replace("{budget}", "100") for a in step.argv]
        args = parsers[argv[0]](argv[1:])  # SystemExit on an unknown or malformed flag
        assert str(args.out) == "/tmp/out"


def test_records_name_the_commit_from_the_environment(monkeypatch):
    """A device's copy of the tree has no .git: JAXDEC_COMMIT names the commit there."""
    from bench.common import git_commit

    monkeypatch.setenv("JAXDEC_COMMIT", "abc1234")
    assert git_commit() == "abc1234"
    monkeypatch.delenv("JAXDEC_COMMIT")
    assert git_commit() != "abc1234"  # git's answer here (or None without git)


def test_kernels_are_done_only_with_every_case(tmp_path):
    """A kernels run cut off mid-way keeps its cases but leaves the step due."""
    from bench.common import HBM_METHOD

    (step,) = [s for s in device.plan("gpu") if s.name == "kernels"]
    sources = device._tree_attention_sources()
    cases = sorted(device.kernel_cases("h100"))
    assert len(cases) == 2 * 2 * 4 * 3  # impls x batches x contexts x T
    rows = [dict(preset="h100", impl=i, batch=b, context=c, T=t, hbm_method=HBM_METHOD,
                 kernel_sources=sources) for i, b, c, t in cases]
    path = tmp_path / "kernels-a100.json"  # a GPU that is no Hopper: no `hopper` rows due
    path.write_text(json.dumps(rows[:-1]))
    assert not step.done(tmp_path, "a100")
    path.write_text(json.dumps(rows))
    assert step.done(tmp_path, "a100")
    # On a Hopper the Hopper kernel's cases are due too (T = 16 and 64: 16 of them).
    hopper_cases = sorted(set(device.kernel_cases("h100", hopper=True)) - set(cases))
    assert len(hopper_cases) == 2 * 4 * 2 and {c[0] for c in hopper_cases} == {"hopper"}
    path = tmp_path / "kernels-h100.json"
    path.write_text(json.dumps(rows))
    assert not step.done(tmp_path, "h100")
    hopper_rows = [dict(rows[0], impl=i, batch=b, context=c, T=t) for i, b, c, t in hopper_cases]
    path.write_text(json.dumps(rows + hopper_rows))
    assert step.done(tmp_path, "h100")
    # Rows of a kernel's older code are due again.
    path.write_text(json.dumps(rows + hopper_rows[:-1]
                               + [dict(hopper_rows[-1], kernel_sources="old")]))
    assert not step.done(tmp_path, "h100")
    path.write_text(json.dumps(rows + hopper_rows))
    path.write_text(json.dumps([dict(r, hbm_method=None) for r in rows]))  # the old ceiling
    assert not step.done(tmp_path, "h100")
    # A new run cut off after one case: the other cases still hold the old method's records.
    path.write_text(json.dumps(rows[:2] + [dict(r, hbm_method=None) for r in rows[2:]]))
    assert not step.done(tmp_path, "h100")


def test_speculative_rows_of_other_code_or_a_stale_oracle_are_due(tmp_path):
    """The synthetic-8b rows measured with random weights (an oracle drafting tokens the
    target no longer chose), and any speculative rows measured with other code than the
    current `SPECULATIVE_SOURCES`, do not count as measured."""
    from bench.common import sources_digest
    from bench.speculative import ORACLE_TARGET, SPECULATIVE_SOURCES

    (step,) = [s for s in device.plan("gpu") if s.name == "spec-synthetic-8b"]
    rows = [dict(preset="synthetic-8b", attention=a, method=m, batch=1,
                 spec_sources=sources_digest(SPECULATIVE_SOURCES))
            for a in ("pallas", "reference") for m in ("plain", "oracle@0.8")]
    path = tmp_path / "speculative-h100.json"
    path.write_text(json.dumps(rows))
    assert not step.done(tmp_path, "h100")
    rows = [dict(r, oracle_target=ORACLE_TARGET) if r["method"] != "plain" else r for r in rows]
    path.write_text(json.dumps(rows))
    assert step.done(tmp_path, "h100")
    path.write_text(json.dumps(rows[:-1] + [dict(rows[-1], spec_sources="older code")]))
    assert not step.done(tmp_path, "h100")


def test_a_stopped_test_run_counts_what_finished(tmp_path):
    """A pytest step stopped at its limit writes no junit file: its record counts the verbose
    lines that finished (the log stamps each line with the seconds since the start)."""
    lines = ["[+3.1 s] tests/t.py::TestA::test_x[chain-1] PASSED        [ 10%]\n",
             "[+9.0 s] tests/t.py::TestA::test_y FAILED                  [ 20%]\n",
             "[+9.5 s] tests/t.py::TestB::test_z SKIPPED (needs X)       [ 30%]\n",
             "some other output PASSED\n",
             # the short summary repeats a failure: counted once
             "[+9.9 s] [group 0] FAILED tests/t.py::TestA::test_y - assert 1 == 2\n",
             "[+9.9 s] [group 1] tests/u.py::test_w[a b] ERROR                [ 40%]\n"]
    assert device.verbose_outcomes(lines) == dict(passed=1, failed=1, errors=1, skipped=1)
    record = device.pytest_record(tmp_path / "missing.xml", "gpu", "dev", None, 120.0,
                                  "tests/t.py", lines)
    assert (record["passed"], record["failed"], record["skipped"]) == (1, 1, 1)
    assert record["error"] == "stopped at its time limit (1 passed, 1 failed, 1 errors before it)"

    # Cut short with no failure: a complete passing record of the same sources is kept.
    passing = device.pytest_record(tmp_path / "missing.xml", "gpu", "dev", None, 60.0,
                                   "tests/t.py", lines[:1])
    assert passing["error"] == "timed out: stopped at its time limit (1 passed before it)"
    path = tmp_path / "gpu-tests-dev.json"
    complete = dict(passing, passed=40, error=None, date="earlier")
    path.write_text(json.dumps([complete]))
    for cut, kept in ((passing, True), (record, False)):
        merged = common.merge_records(path, [cut], ("plan", "device", "sources"))
        assert len(merged) == 1 and (merged[0]["passed"] == 40) == kept
        assert merged[0].get("last_attempt_error") == (cut["error"] if kept else None)

    stamped = []
    device.run_command([sys.executable, "-c", "print('a')"], 30, stamped.append,
                       dict(os.environ), stamp=True)
    assert len(stamped) == 1 and stamped[0].startswith("[+") and stamped[0].endswith(" s] a\n")


def test_a_failing_hopper_kernel_is_left_out_of_the_benchmark(tmp_path):
    """The Hopper kernel's test failures (junit, or the verbose lines of a run without one)
    or a run stopped in its tests make the call's kernels benchmark run with --no-hopper;
    other failures do not."""
    def junit(classname, outcome):
        path = tmp_path / f"{outcome}.xml"
        path.write_text(
            '<testsuites><testsuite tests="2" failures="1" errors="0" skipped="0">'
            '<testcase classname="tests.test_matvec.TestMatvecOnGPU" name="test_a"/>'
            f'<testcase classname="{classname}" name="test_b"><{outcome} message="x"/>'
            "</testcase></testsuite></testsuites>")
        return path

    hopper = "tests.test_tree_attention_hopper.TestHopperOnGPU"
    assert device.hopper_failed(junit(hopper, "failure"), [], 1)
    assert device.hopper_failed(junit(hopper, "error"), [], 1)
    assert not device.hopper_failed(junit("tests.test_layers.TestCudnnOnGPU", "failure"), [], 1)
    started = ["[+80.0 s] tests/test_tree_attention_hopper.py::TestHopperOnGPU::test_x "
               "PASSED [ 90%]\n"]
    assert device.hopper_failed(tmp_path / "missing.xml", started, None)  # stopped in them
    assert not device.hopper_failed(tmp_path / "missing.xml", ["tests/test_layers.py::t "
                                                               "PASSED\n"], None)
    assert device.hopper_failed(tmp_path / "missing.xml",
                                [started[0].replace("PASSED", "FAILED")], 1)
    # Run in groups: the Hopper group's end decides, even when another group was stopped.
    from bench.pytest_shards import finished_line

    for code, failed in ((0, False), (1, True)):
        ended = started + [finished_line(2, code, 80.0, ["tests/test_tree_attention_hopper.py"])]
        assert device.hopper_failed(tmp_path / "missing.xml", ended, None) is failed
    assert not device.hopper_failed(
        tmp_path / "missing.xml",
        [finished_line(0, 1, 60.0, ["tests/test_layers.py", "tests/test_matvec.py"])], 1)
    (step,) = [s for s in device.plan("gpu") if s.name == "kernels"]
    assert step.without_hopper == ("--no-hopper",)
    from bench import kernels

    assert kernels.parse_args(["--no-hopper"]).no_hopper


def test_the_hopper_kernel_waits_for_its_tests_and_a_missing_commit_is_said(
        tmp_path, monkeypatch):
    """A step that times the Hopper kernel gets --no-hopper unless the GPU tests of today's
    sources passed (committed, or in this call): a call with too little time left for the
    tests ran the kernel untested. A call that knows no commit says so."""
    import argparse
    import shutil

    monkeypatch.setattr(device, "git_commit", lambda: None)
    echo = device.Step("kernels", ("-c", "import sys; print('argv', sys.argv[1:])"),
                       lambda results, slug: False, min_s=0, cap_s=60,
                       without_hopper=("--no-hopper",))
    results = tmp_path / "results"
    results.mkdir()

    def call(tests=None):
        if tests is not None:
            (results / "gpu-tests-h200.json").write_text(json.dumps([tests]))
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        lines = []
        args = argparse.Namespace(budget_s=120, redo=[], plan="gpu", results=results,
                                  out=tmp_path / "out")
        args.out.mkdir(exist_ok=True)
        device.run_steps(args, [echo], ["kernels"], "NVIDIA H200", "h200", work,
                         lines.append, dict(os.environ), time.monotonic())
        return "\n".join(lines)

    untested = call()
    assert "WARNING: no commit known" in untested
    assert "argv ['--no-hopper']" in untested and "have not passed for these sources" in untested
    passed = dict(plan="gpu", device="NVIDIA H200", sources=device.sources_digest(), error=None)
    assert "argv []" in call(passed)
    assert "argv ['--no-hopper']" in call(dict(passed, sources="older tests"))
    # Another group's failure says nothing of the Hopper kernel; its own group's does.
    groups = [dict(files=["tests/test_layers.py"], exit_code=1),
              dict(files=["tests/test_tree_attention_hopper.py"], exit_code=0)]
    failing = dict(passed, error="pytest exit code 1: 1 failed", groups=groups)
    assert "argv []" in call(failing)
    groups[1]["exit_code"] = 1
    assert "argv ['--no-hopper']" in call(failing)


def test_matvec_step_is_due_again_when_the_kernel_changes(tmp_path):
    (step,) = [s for s in device.plan("gpu") if s.name == "matvec"]
    rows = [{"preset": "h100", "impl": impl, "projection": p, "rows": r,
             "kernel_sources": device._matvec_sources(), "error": None}
            for impl in ("pallas", "xla", "xla-cublas") for p in ("qkv", "o", "gate_up", "down")
            for r in (1, 16)]
    path = tmp_path / "matvec-h100.json"
    path.write_text(json.dumps(rows))
    assert step.done(tmp_path, "h100")
    path.write_text(json.dumps([dict(r, kernel_sources="0" * 16) for r in rows]))
    assert not step.done(tmp_path, "h100")
    path.write_text(json.dumps([r for r in rows if r["projection"] != "down"]))
    assert not step.done(tmp_path, "h100")


def test_sharded_pytest_merges_the_groups_reports(tmp_path):
    """bench/pytest_shards.py: one process per group, each group's end printed (read back
    into the record: files, seconds, exit code), the junit reports merged into the path
    asked for, and the exit code the groups' worst (a group the selection leaves empty does
    not fail the run)."""
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_a.py").write_text("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    (tests / "test_b.py").write_text("def test_three():\n    assert False\n")
    (tests / "test_c.py").write_text("def test_other():\n    pass\n")

    def shards(*args):
        argv = [sys.executable, str(REPO / "bench" / "pytest_shards.py"), *args]
        return subprocess.run(argv, cwd=tmp_path, env=user_env(), capture_output=True,
                              text=True, timeout=300)

    junit = tmp_path / "report.xml"
    proc = shards("--group", "tests/test_a.py", "--group", "tests/test_b.py,tests/test_c.py",
                  "--", "-v", "-p", "no:cacheprovider", f"--junitxml={junit}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    ends = sorted(device.group_ends(proc.stdout.splitlines()), key=lambda g: g["group"])
    assert [(g["group"], g["exit_code"], g["files"]) for g in ends] == [
        (0, 0, ["tests/test_a.py"]), (1, 1, ["tests/test_b.py", "tests/test_c.py"])]
    assert all(g["seconds"] > 0 for g in ends)
    assert "[group 0] tests/test_a.py::test_one PASSED" in proc.stdout
    record = device.pytest_record(junit, "cpu", "dev", proc.returncode, 1.0, "tests",
                                  proc.stdout.splitlines())
    assert (record["passed"], record["failed"]) == (3, 1)
    assert record["groups"] == device.group_ends(proc.stdout.splitlines())
    table = device.render_tests_markdown([record])
    assert "processes side by side: tests/test_a.py " in table
    assert "tests/test_b.py tests/test_c.py " in table and "(exit code 1)" in table
    assert not list(tmp_path.glob("*.partial"))

    # The option's other form; an earlier run's part file is not merged as this run's (here
    # group 1's process dies before writing its own).
    (tests / "test_dies.py").write_text("import os\nos._exit(3)\n")
    stale = tmp_path / "other.group1.xml"
    stale.write_text((tmp_path / "report.group0.xml").read_text())
    proc = shards("--group", "tests/test_a.py", "--group", "tests/test_dies.py", "--",
                  "-q", "-p", "no:cacheprovider", "--junit-xml", str(tmp_path / "other.xml"),
                  "-k", "two")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    record = device.pytest_record(tmp_path / "other.xml", "cpu", "dev", 3, 1.0, "tests",
                                  proc.stdout.splitlines())
    assert (record["passed"], record["failed"]) == (1, 0)
    proc = shards("--group", "tests/test_a.py", "--", "--junitxml")
    assert proc.returncode == 2 and "--junitxml needs a path" in proc.stderr
    proc = shards("--group", "tests/test_a.py", "--group", "tests/test_b.py", "--",
                  "-q", "-p", "no:cacheprovider", "-k", "one")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # test_b.py: nothing selected
    proc = shards("--group", "tests/test_a.py,", "--group", ",")
    assert proc.returncode == 2 and "names at least one test file" in proc.stderr


@pytest.mark.parametrize("script", ["census", "cpu_attention", "decode", "device", "kernels",
                                    "matvec", "ptx_report", "speculative", "tpu_compile", "train"])
def test_every_benchmark_refuses_an_out_that_is_no_directory(script, tmp_path, capsys):
    """Before measuring anything (kernels, matvec and decode measured, compiled ahead and ran
    a first case before their first write failed on the file)."""
    import importlib

    main = importlib.import_module(f"bench.{script}").main
    (tmp_path / "file").write_text("mine")
    for out, message in ((tmp_path / "file", "is not a directory"),
                         (tmp_path / "file" / "sub", "is not a directory")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--out", str(out)])
        assert exit_info.value.code == 2
        assert f"argument --out: {tmp_path / 'file'} {message}" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"
