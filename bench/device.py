"""Every outstanding accelerator measurement, in one device call, within a time budget.

A lent GPU machine comes for minutes at a time and keeps nothing between calls, so this runs
the checks and benchmarks in priority order, each as a subprocess with its own time limit,
skips those whose results for this device are already committed in `bench/results/`, and
hands back everything in one archive. Usage on the lent machine (one call):

    JAXDEC_COMMIT=<the short hash of HEAD> python3 bench/device.py --out $OUT

(the copy of the tree there has no .git: the variable names the commit in the records), then
here: `tar -xzf <files_at>/results.tar.gz -C bench/results` and commit.

Steps of the `gpu` plan, in order (first the steps whose figures can close an issue, the
earliest issue first: the trainings (both measured on the H200); then the kernels' tests on
the card, before any benchmark runs the kernels; the short kernels benchmark and the decode
re-measure (the kernel and foundation issues' goals, still open), then decode's
matrix-vector products; last the speculative re-measures (that issue's figures are complete:
they run when their code changed); `--only` takes the steps in the order it names them;
`--list` prints them with their commands):
  train-gpu-small  bench/train.py --preset gpu-small: target and draft trained alone (its time
                   budget: 3 minutes for both models; a speculative step trains while its grid
                   compiles, which shares the CPU and the interpreter lock)
  train-gpu-base   the same for gpu-base (the training issue's MFU goal is gpu-base's)
  gpu-tests        the tests that need the card (`pytest -k OnGPU`, three processes side by
                   side: bench/pytest_shards.py): the tree-attention kernels
                   (Triton; Mosaic GPU on a Hopper) and the matrix-vector kernel compiled
                   (fp32 / bf16, the Triton attention fp16 too)
                   and cuDNN's fused attention for training,
                   recorded as `gpu-tests-<device>.json/.md` with a hash of their sources (a
                   change to them makes the step due again)
  kernels          bench/kernels.py --preset h100 (the Triton kernel, and on a Hopper the
                   Mosaic GPU one for T >= 16, vs XLA reference vs roofline; `--no-hopper`
                   when that kernel failed its tests earlier in the same call)
  decode           bench/decode.py --preset h100 (jaxdec with the kernel, with the reference
                   attention and with cuBLAS matmuls vs transformers; `--resume` keeps the
                   impls already measured)
  matvec           bench/matvec.py --preset h100 (decode's matrix-vector products: the Pallas
                   kernel vs XLA's fusions vs cuBLAS on a Llama-3-8B layer's projections)
  spec-synthetic-8b  bench/speculative.py --preset synthetic-8b --attention pallas,reference
                   (the 8B target with a drafter of set acceptance: the speculative goal's
                   regime, met at 83ff787)
  spec-gpu-base    bench/speculative.py --preset gpu-base --attention auto (trains the preset's
                   models again, beside its grid's compiles, and records that training too;
                   AUTO only, so the grid fits beside training in one call: at these caches
                   AUTO is the reference path; a whole call)
  spec-gpu-small   bench/speculative.py --preset gpu-small --attention auto (trains as
                   spec-gpu-base does; AUTO only for the same reason)
  (The speculative steps are due again whenever the code they measure changed: their records
  carry `spec_sources`, a hash of `bench.speculative.SPECULATIVE_SOURCES`.)

A step is started only while at least its `min_s` of the budget is left, and is stopped (its
whole process group) at its own cap or when the budget runs out; the benchmarks write their
outputs after every case, so a stopped step keeps what it measured and a later call (with
`--redo STEP`, or automatically when the step recorded errors) finishes it (decode and the
speculative steps run with `--resume`: only what is missing). The `cpu-tiny` plan runs the
same machinery (a test subset and a speculative step on CPU presets) in well under a minute;
the test suite runs it, so this file cannot rot.

Outputs under `--out`: `results.tar.gz` (the result files of this device that this call wrote
or changed, each the committed records merged with this call's: JSON and Markdown; files it
left as committed stay out, so two calls' archives extracted in turn never undo each other),
`device-log.txt` (all output) and
`device-summary.json` (per step: status, seconds, return code). The archive is rewritten after
every step, so even a call cut off by its own limit returns what finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    HBM_METHOD, MODEL_SOURCES, RESULTS, TIME_ERRORS, device_name, device_slug, git_commit,
    out_dir, read_records, utc_now, versions, write_merged)
from bench.common import sources_digest as common_sources_digest  # noqa: E402
from bench.pytest_shards import NO_TESTS_COLLECTED, parse_finished  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
ARCHIVE = "results.tar.gz"


def _complete(file: str, *, failures_count: bool = False, **match) -> Callable[[Path, str], bool]:
    """Done when `<file>-<device>.json` has records matching `match` (field -> one value, or a
    tuple of values that must all be present) and none of them carries an error. With
    `failures_count` (a wanted-but-optional run, which a broken impl would otherwise make every
    call retry; `--redo` retries it on purpose), only an error of time (a budget skip, a
    timeout) keeps it due."""
    wanted = {k: v if isinstance(v, tuple) else (v,) for k, v in match.items()}

    def blocks(error) -> bool:
        return bool(error) and (not failures_count or str(error).startswith(TIME_ERRORS))

    def done(results: Path, slug: str) -> bool:
        rows = [r for r in read_records(results / f"{file}-{slug}.json")
                if all(r.get(k) in values for k, values in wanted.items())]
        if not rows or any(blocks(r.get("error")) for r in rows):
            return False
        return all({r.get(k) for r in rows} >= set(values) for k, values in wanted.items())

    return done


def _all_rows(file: str, field: str, value, **match) -> Callable[[Path, str], bool]:
    """Done when every record of `<file>-<device>.json` matching `match` (field -> value or
    tuple of values) has `field` == `value` (a row measured with other code is stale)."""
    wanted = {k: v if isinstance(v, tuple) else (v,) for k, v in match.items()}

    def done(results: Path, slug: str) -> bool:
        return all(r.get(field) == value for r in read_records(results / f"{file}-{slug}.json")
                   if all(r.get(k) in values for k, values in wanted.items()))

    return done


def _every_case(file: str, *, cases: Callable[[str], set[tuple]],
                **match) -> Callable[[Path, str], bool]:
    """Done when `<file>-<device>.json` has a record matching `match` (field -> value) for
    every (impl, batch, context, T) in `cases(device slug)` that its time budget did not cut
    (so a run cut off, whose missing cases keep older records or are recorded as skipped,
    stays due; a case that failed otherwise counts: its error is the finding)."""
    def done(results: Path, slug: str) -> bool:
        have = {(r.get("impl"), r.get("batch"), r.get("context"), r.get("T"))
                for r in read_records(results / f"{file}-{slug}.json")
                if all(r.get(k) == v for k, v in match.items())
                and not str(r.get("error") or "").startswith(TIME_ERRORS)}
        return cases(slug) <= have

    return done


HOPPER_SLUGS = ("h100", "h200")  # the devices where the kernels benchmark times `hopper` too


def kernel_cases(preset: str, hopper: bool = False) -> set[tuple]:
    """(impl, batch, context, T) the kernels benchmark times; with `hopper`, also the Hopper
    kernel's cases (on a Hopper device)."""
    from bench.kernels import PRESETS, hopper_case

    spec = PRESETS[preset]
    cases = [(b, c, t) for b in spec["batches"] for c in spec["contexts"]
             for t in spec["queries"]]
    impls = {(impl, *case) for impl in ("pallas", "reference") for case in cases}
    if hopper and spec.get("hopper"):
        impls |= {("hopper", *case) for case in cases if hopper_case(*case, spec)}
    return impls


def _all(*rules: Callable[[Path, str], bool]) -> Callable[[Path, str], bool]:
    return lambda results, slug: all(rule(results, slug) for rule in rules)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    # The command after the interpreter: `{out}` stands for the results folder, `{budget}` for
    # the seconds the step may use (less a margin for writing its outputs).
    argv: tuple[str, ...]
    done: Callable[[Path, str], bool]  # (results folder, device slug) -> measured already?
    min_s: float  # not started with less of the budget left than this
    cap_s: float  # stopped after this long at the latest
    pytest: bool = False  # a pytest run: recorded as gpu-tests-<device>.json
    # Appended to argv when this call's GPU tests found the Hopper kernel failing (or were
    # stopped in its tests), or the GPU tests of today's sources have not passed (not run for
    # lack of time): a benchmark then leaves that kernel out rather than time a broken one,
    # or hang on it, and stays due.
    without_hopper: tuple[str, ...] = ()


# The GPU tests in three processes side by side (bench/pytest_shards.py): compiling is what
# they cost, on one CPU core per process (the 35 took 298 s in one process on the H200 at
# 83ff787). The Hopper kernel's tests in a group of their own: a kernel that hangs the card
# stops the step (its warpgroups wait on barriers), and the other groups' results are kept.
GPU_TEST_GROUPS = (("tests/test_tree_attention_vs_reference.py",),
                   ("tests/test_layers.py", "tests/test_matvec.py"),
                   ("tests/test_tree_attention_hopper.py",))
GPU_TESTS = tuple(f for group in GPU_TEST_GROUPS for f in group)
GPU_TEST_SOURCES = ("pallas_kernels/tree_attention", "pallas_kernels/matvec", "models/layers.py",
                    *GPU_TESTS)


def sharded_pytest(groups, *pytest_args: str) -> tuple[str, ...]:
    """The argv (after the interpreter) of `bench/pytest_shards.py` over these file groups."""
    return ("bench/pytest_shards.py", *(a for g in groups for a in ("--group", ",".join(g))),
            "--", *pytest_args)


def suite_files(argv) -> str:
    """The test files a pytest step's argv names, space-separated (a record's `suite`)."""
    return " ".join(f for a in argv for f in a.split(",")
                    if f.startswith("tests/") and f.endswith(".py"))


def sources_digest() -> str:
    """A hash of what the GPU tests check and the tests themselves: the device test record is
    current only while these are unchanged."""
    return common_sources_digest(GPU_TEST_SOURCES)


def _tree_attention_sources() -> str:
    from bench.kernels import KERNEL_SOURCES

    return common_sources_digest(KERNEL_SOURCES)


def _matvec_sources() -> str:
    from bench.matvec import KERNEL_SOURCES

    return common_sources_digest(KERNEL_SOURCES)


def _speculative_sources() -> str:
    from bench.speculative import SPECULATIVE_SOURCES

    return common_sources_digest(SPECULATIVE_SOURCES)


def speculative_step(preset: str, *extra: str, min_s: float, cap_s: float,
                     attention: tuple[str, ...] = ("pallas", "reference"), **match) -> Step:
    """bench/speculative.py for one preset, resuming what is missing; on the device the
    kernel on (`pallas`) and off (`reference`), side by side (AUTO picks one of the two by
    the cache's size)."""
    return Step(f"spec-{preset}",
                ("bench/speculative.py", "--preset", preset, *extra,
                 "--attention", ",".join(attention), "--resume", "--budget-s", "{budget}",
                 "--out", "{out}"),
                _all(_complete("speculative", preset=preset, attention=attention, **match),
                     # due again whenever the code a speculative step runs changed
                     _all_rows("speculative", "spec_sources", _speculative_sources(),
                               preset=preset, attention=attention)),
                min_s=min_s, cap_s=cap_s)


def plan(name: str) -> list[Step]:
    if name == "gpu":
        from bench.decode import PRESETS as DECODE_PRESETS
        from bench.speculative import ORACLE_TARGET

        decode_h100 = dict(preset="h100", context=DECODE_PRESETS["h100"].context,
                           new_tokens=DECODE_PRESETS["h100"].new_tokens)

        return [
            # The training issue sizes gpu-small at 3 minutes for target and draft: the one
            # record so far trained beside the speculative grid's compiles (241 s).
            Step("train-gpu-small", ("bench/train.py", "--preset", "gpu-small", "--out", "{out}"),
                 _complete("train", preset="gpu-small", compile_ahead_workers=0),
                 min_s=240, cap_s=400),
            Step("train-gpu-base", ("bench/train.py", "--preset", "gpu-base", "--out", "{out}"),
                 _complete("train", preset="gpu-base", compile_ahead_workers=0),
                 min_s=360, cap_s=560),
            # Correct first: the kernels on the card before the benchmarks that run them
            # (due again whenever their sources change); then the kernels benchmark and
            # decode, whose goals (the kernel issue's, the foundation's) are still open.
            Step("gpu-tests", sharded_pytest(GPU_TEST_GROUPS, "-v", "-p", "no:cacheprovider",
                                             "-k", "OnGPU"),
                 _complete("gpu-tests", plan="gpu", sources=sources_digest()),
                 # All 35 tests, the Hopper class's 12 included, in 298 s on the H200
                 # (2026-11-27, 83ff787).
                 min_s=180, cap_s=360, pytest=True),
            Step("kernels", ("bench/kernels.py", "--preset", "h100", "--budget-s", "{budget}",
                             "--out", "{out}"),
                 # Every case, with the HBM ceiling measured the current way.
                 _all(_complete("kernels", preset="h100", impl=("pallas", "reference"),
                                hbm_method=HBM_METHOD),
                      _every_case("kernels", preset="h100",
                                  cases=lambda slug: kernel_cases(
                                      "h100", slug.split("-")[0] in HOPPER_SLUGS),
                                  hbm_method=HBM_METHOD),
                      # the kernels' rows are due again whenever their code changed
                      _all_rows("kernels", "kernel_sources", _tree_attention_sources(),
                                preset="h100", impl=("pallas", "hopper"))),
                 # 87 s on the H200 without the Hopper kernel (92 programs compiled first, at
                 # 9d75f5d; 120 now, 168 with the Hopper kernel's): its budget stops the
                 # compiles ahead halfway and the cases at its end, writing every case.
                 min_s=150, cap_s=360, without_hopper=("--no-hopper",)),
            Step("decode", ("bench/decode.py", "--preset", "h100", "--resume",
                            "--budget-s", "{budget}", "--out", "{out}"),
                 # hf-compile must have been tried, but a torch.compile failure does not make
                 # every later call retry it: `--redo decode` runs what is missing or failed
                 # (--resume keeps the finished impls).
                 # jaxdec's rows are due again whenever the code a decode step runs changed.
                 # (Rows of the preset's own context and new tokens: the file keeps other
                 # calls' configurations too.)
                 _all(_complete("decode", **decode_h100, impl=("jaxdec", "jaxdec-reference")),
                      _all_rows("decode", "model_sources", common_sources_digest(MODEL_SOURCES),
                                **decode_h100,
                                impl=("jaxdec", "jaxdec-reference", "jaxdec-matvec",
                                      "jaxdec-cublas", "jaxdec-graphs")),
                      # The matrix-vector kernel, cuBLAS and command-buffer comparisons are
                      # wanted, but their failures are not retried.
                      _complete("decode", **decode_h100,
                                impl=("jaxdec-matvec", "jaxdec-cublas", "jaxdec-graphs"),
                                failures_count=True),
                      _complete("decode", **decode_h100, impl="hf-eager"),
                      _complete("decode", **decode_h100, impl="hf-compile",
                                failures_count=True)),
                 min_s=240, cap_s=540),
            # Decode's matrix-vector products: our kernel against XLA's fusions and cuBLAS on
            # an 8B layer's shapes (the decode profile's largest gap; decode's own
            # `jaxdec-matvec` row runs the kernel in the whole step): a second call's size.
            Step("matvec", ("bench/matvec.py", "--preset", "h100", "--out", "{out}"),
                 _all(_complete("matvec", preset="h100", impl=("pallas", "xla", "xla-cublas"),
                                projection=("qkv", "o", "gate_up", "down"), rows=(1, 16)),
                      # due again whenever the kernel changed
                      _all_rows("matvec", "kernel_sources", _matvec_sources(), preset="h100")),
                 min_s=120, cap_s=240),
            # The speculative issue's figures are complete (gpu-base's at 5c7f9c4, its goal
            # met in the synthetic regime at 83ff787 and on gpu-base): these re-measures, due
            # whenever the code a speculative step runs changed, come after the issues still
            # open. synthetic-8b took 106 s on the H200 at 83ff787; records from before the
            # permutation target (their oracle drafted tokens the target no longer chose) do
            # not count.
            speculative_step("synthetic-8b", min_s=150, cap_s=560,
                             oracle_target=ORACLE_TARGET),
            # A trained preset fills a call (gpu-base trained and ran its grid in 483 s at
            # 5c7f9c4; gpu-small trained in ~134 s alone): at their caches (~200 slots) AUTO
            # runs the reference attention, no Pallas kernel, and their rows check their
            # tokens against plain decoding themselves.
            speculative_step("gpu-base", min_s=480, cap_s=560, attention=("auto",)),
            speculative_step("gpu-small", min_s=240, cap_s=560, attention=("auto",)),
        ]
    if name == "cpu-tiny":  # the same machinery on CPU presets, in well under a minute
        return [
            Step("gpu-tests", sharded_pytest(
                     (("tests/test_tree_attention_vs_reference.py",), ("tests/test_tree.py",)),
                     "-v", "-p", "no:cacheprovider", "-k",
                     "(TestTritonInterpret and chain-1) or test_chain"),
                 _complete("gpu-tests", plan="cpu-tiny", sources=sources_digest()),
                 min_s=5, cap_s=300, pytest=True),
            # One attention path: both run the same reference on a CPU (the speculative
            # benchmark's tests cover several paths in one call).
            speculative_step("synthetic-tiny", "--batches", "1", "--repeats", "1",
                             min_s=5, cap_s=300, attention=("reference",)),
        ]
    raise ValueError(f"unknown plan {name!r}; plans: gpu, cpu-tiny")


# ------------------------------------------------------------------------- running


class Log:
    """Writes to the log file, if any, and to stdout (the device call returns stdout's tail)."""

    def __init__(self, path: Path | None):
        self.file = None if path is None else path.open("a", buffering=1)

    def __call__(self, line: str) -> None:
        line = line.rstrip("\n")
        if self.file is not None:
            self.file.write(line + "\n")
        print(line, flush=True)


def run_command(argv: list[str], timeout_s: float, log: Log, env: dict,
                stamp: bool = False) -> tuple[int | None, float]:
    """(return code, or None when stopped at `timeout_s`; seconds). The command runs in its
    own process group, so stopping it also stops the workers it started. With `stamp`, each
    output line is logged after the seconds since the start (`[+12.3 s] ...`)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)

    def read():
        for line in proc.stdout:
            log(f"[+{time.monotonic() - started:.1f} s] {line}" if stamp else line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(timeout_s, 1))
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        code = None
    reader.join(timeout=5)
    return code, time.monotonic() - started


def verbose_outcomes(lines: list[str]) -> dict[str, int]:
    """Outcomes counted from `pytest -v` lines (`path::test PASSED [ 7%]`): what a run
    stopped before writing its junit file had finished."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    words = dict(PASSED="passed", FAILED="failed", ERROR="errors", SKIPPED="skipped")
    for line in lines:
        # A test's line names it first, then its outcome; the short summary's lines
        # ("FAILED path::test - message") give the outcome first and would count it twice.
        match = VERBOSE_LINE.match(line)
        if match:
            counts[words[match.group(1)]] += 1
    return counts


# `path::test OUTCOME`, after the log's stamps (`[+3.1 s]`, `[group N]`).
VERBOSE_LINE = re.compile(r"^(?:\[[^\]]*\]\s*)*"  # the stamps
                          r"[^\s\[][^\s]*::\S.*?\s(PASSED|FAILED|ERROR|SKIPPED)\b")


def pytest_record(junit: Path, plan_name: str, device: str, code: int | None,
                  seconds: float, suite: str, lines: list[str] = ()) -> dict:
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    slowest = []
    try:
        root = ET.parse(junit).getroot()
        for element in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
            for k in counts:
                counts[k] += int(element.get(k, 0))
        cases = [(float(c.get("time", 0)), f"{c.get('classname')}::{c.get('name')}")
                 for c in root.iter("testcase")]
        slowest = [dict(test=name, seconds=round(t, 1)) for t, name in sorted(cases)[::-1][:5]]
    except (OSError, ET.ParseError, ValueError):
        pass
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    error = None
    if code is None:  # no junit file: count what the verbose output says finished
        seen = verbose_outcomes(lines)
        passed = seen["passed"]
        counts.update(failures=seen["failed"], errors=seen["errors"], skipped=seen["skipped"])
        if counts["failures"] or counts["errors"]:  # a finding: no earlier record hides it
            error = (f"stopped at its time limit ({passed} passed, {counts['failures']} failed, "
                     f"{counts['errors']} errors before it)")
        else:  # only cut short: an earlier complete record of these sources stays
            error = f"timed out: stopped at its time limit ({passed} passed before it)"
    elif code != 0 or counts["failures"] or counts["errors"] or passed <= 0:
        error = (f"pytest exit code {code}: {counts['failures']} failed, {counts['errors']} "
                 f"errors, {passed} passed")
    record = dict(plan=plan_name, suite=suite, sources=sources_digest(),
                  passed=passed, failed=counts["failures"], errors=counts["errors"],
                  skipped=counts["skipped"], seconds=round(seconds, 1), slowest=slowest,
                  error=error,
                  device=device, date=utc_now(), commit=git_commit(), **versions())
    ends = group_ends(lines)
    if ends:  # a sharded run (bench/pytest_shards.py): each group's files, time and exit
        record["groups"] = ends
    return record


HOPPER_TESTS = "test_tree_attention_hopper"


def group_ends(lines: list[str]) -> list[dict]:
    """The groups of a sharded pytest run that finished, from its printed ends
    (`bench.pytest_shards.parse_finished`), in the order they finished."""
    return [end for end in map(parse_finished, lines) if end is not None]


def hopper_failed(junit: Path, lines: list[str], code: int | None) -> bool:
    """Whether a GPU test run found the Hopper kernel failing: a failure or error in its
    tests (junit, else the verbose lines), or a run stopped at its limit while they ran (a
    kernel that hangs the card looks like this), or their group's process ending with an
    error (`bench/pytest_shards.py` prints each group's end)."""
    started = any(f"{HOPPER_TESTS}.py::" in line for line in lines)
    passed = hopper_group_passed(group_ends(lines))
    if passed is not None:
        return not passed
    if code is None:
        return started
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return any(f"{HOPPER_TESTS}.py::" in line and (" FAILED" in line or " ERROR" in line)
                   for line in lines)
    return any(HOPPER_TESTS in (case.get("classname") or "")
               and (case.find("failure") is not None or case.find("error") is not None)
               for case in root.iter("testcase"))


def hopper_group_passed(groups: list[dict]) -> bool | None:
    """Whether the group of a sharded run that held the Hopper kernel's tests ended well;
    None where no such group ended."""
    ends = [g for g in groups if f"tests/{HOPPER_TESTS}.py" in g.get("files", ())]
    return any(g.get("exit_code") in (0, NO_TESTS_COLLECTED) for g in ends) if ends else None


def hopper_tested(results: Path, slug: str, plan_name: str) -> bool:
    """Whether the GPU tests of today's sources passed the Hopper kernel's on this device:
    a record of the plan with no error, or one whose Hopper group ended well (another
    group's failure says nothing of this kernel)."""
    for record in read_records(results / f"gpu-tests-{slug}.json"):
        if record.get("plan") != plan_name or record.get("sources") != sources_digest():
            continue
        if record.get("error") is None or hopper_group_passed(record.get("groups", ())):
            return True
    return False


def render_tests_markdown(records: list[dict]) -> str:
    lines = ["# Kernel tests compiled on the device", "",
             "| plan | device | passed | failed | errors | skipped | seconds | date | jax | "
             "commit |", "|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for r in records:
        lines.append(f"| {r['plan']} | {r['device']} | {r['passed']} | {r['failed']} | "
                     f"{r['errors']} | {r['skipped']} | {r['seconds']} | {r['date']} | "
                     f"{r.get('jax_version')} | {r.get('commit')} |")
    for r in records:
        if r.get("slowest"):
            lines.append(f"\n{r['plan']} ({r.get('commit')}), slowest tests: " + "; ".join(
                f"`{t['test']}` {t['seconds']} s" for t in r["slowest"]))
    for r in records:
        if r.get("groups"):
            lines.append(f"\n{r['plan']} ({r.get('commit')}), processes side by side: " + "; ".join(
                f"{' '.join(g['files'])} {g['seconds']:.0f} s (exit code {g['exit_code']})"
                for g in sorted(r["groups"], key=lambda g: g["group"])))
    for r in records:
        if r.get("error"):
            lines.append(f"\n- {r['plan']} ({r.get('commit')}): {r['error']}")
    return "\n".join(lines) + "\n"


def pack(work: Path, slug: str, out: Path, committed: Path) -> list[str]:
    """Writes the `*-<slug>.{json,md}` under `work` that this call wrote or changed (absent
    from `committed` or different there) to out/results.tar.gz, atomically; returns their
    names. Leaving unchanged files out means that extracting the archives of two calls in
    turn never puts the second call's stale copy of a file over what the first measured."""
    partial = out / (ARCHIVE + ".partial")
    names = []
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(work.glob(f"*-{slug}.*")):
            before = committed / path.name
            if path.suffix in (".json", ".md") and not (
                    before.is_file() and before.read_bytes() == path.read_bytes()):
                tar.add(path, arcname=path.name)
                names.append(path.name)
    partial.replace(out / ARCHIVE)
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default="gpu", choices=("gpu", "cpu-tiny"))
    parser.add_argument("--out", type=out_dir, help="where the archive, log and summary go")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="wall time for all steps (default 540: a device call allows 600)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="the committed results, merged into and used to skip steps")
    parser.add_argument("--only", help="comma-separated step names to consider, run in the order "
                                       "given (default: all, in the plan's order)")
    parser.add_argument("--redo", default="",
                        help="comma-separated step names to run even if their results are "
                             "committed ('all' for every step)")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    # (A restart after installing the checkout keeps the first interpreter's start: the
    # install counts against the budget. The monotonic clock is the machine's, not the
    # process's.)
    first_start = os.environ.get("JAXDEC_DEVICE_INSTALLED") and os.environ.get(
        "JAXDEC_DEVICE_STARTED")
    started = float(first_start) if first_start else time.monotonic()
    if not args.list:
        if args.out is None:
            parser.error("--out is required (the folder the device call returns)")
        if args.budget_s <= 0:
            parser.error(f"--budget-s must be positive, got {args.budget_s}")
        args.out.mkdir(parents=True, exist_ok=True)
    log = Log(None if args.list else args.out / "device-log.txt")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Never the test suite's fake CPU devices; its other flags (quick CPU compiles) stay.
    flags = [f for f in env.pop("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    # Before the plan, which imports the library: its `jaxdec.models` maps to the checkout's
    # models/ folder only once installed (the checkout's own jaxdec/ folder imports without,
    # and a stale jaxdec.egg-info in the checkout passes for an install), so try the import.
    check = subprocess.run([PY, "-c", "import jaxdec.models"], cwd=REPO, env=env,
                           capture_output=True, text=True, errors="replace")
    if check.returncode != 0:
        if os.environ.get("JAXDEC_DEVICE_INSTALLED"):
            last = (check.stderr.strip().splitlines() or ["(no output)"])[-1]
            log(f"[device] jaxdec.models does not import even after installing the checkout: "
                f"{last}")
            return 2
        log("[device] installing jaxdec (editable, no dependencies)")
        code, _ = run_command([PY, "-m", "pip", "install", "-q", "--no-deps",
                               "--no-build-isolation", "-e", "."], 300, log, env)
        if code != 0:
            log("[device] pip install failed")
            return 2
        # The install's import hook (a .pth file) is read only when an interpreter starts:
        # this one would still miss `jaxdec.models`, so start over in a fresh one.
        sys.stdout.flush()
        args_again = sys.argv[1:] if argv is None else [str(a) for a in argv]
        os.execve(PY, [PY, str(Path(__file__).resolve()), *args_again],
                  dict(os.environ, JAXDEC_DEVICE_INSTALLED="1",
                       JAXDEC_DEVICE_STARTED=repr(started)))
    steps = plan(args.plan)
    names = [s.name for s in steps]
    for flag in ("only", "redo"):  # step names, in the order given; 'all': every step
        chosen = list(dict.fromkeys(n.strip() for n in (getattr(args, flag) or "").split(",")
                                    if n.strip()))
        unknown = sorted(set(chosen) - set(names) - {"all"})
        if unknown:
            parser.error(f"--{flag}: unknown steps {unknown}; steps: {', '.join(names)}")
        setattr(args, flag, names if "all" in chosen else chosen)
    if args.only:
        by_name = {s.name: s for s in steps}
        steps = [by_name[n] for n in args.only]
    if args.list:
        for s in steps:
            print(f"{s.name:18s} min {s.min_s:>4.0f} s, cap {s.cap_s:>4.0f} s: "
                  f"python3 {' '.join(s.argv)}")
        return 0
    try:
        device = device_name(env)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    slug = device_slug(device)
    work = Path(tempfile.mkdtemp(prefix="jaxdec-device-"))
    try:
        return run_steps(args, steps, names, device, slug, work, log, env, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_steps(args, steps, names, device, slug, work, log, env, started) -> int:
    for path in args.results.glob(f"*-{slug}.*"):
        shutil.copy(path, work / path.name)
    redo = set(args.redo)
    log(f"[device] {device} ({slug}), plan {args.plan}, budget {args.budget_s:.0f} s, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    summary, packed = [], []
    hopper_broken = False  # this call's GPU tests found the Hopper kernel failing
    # Correct first: the Hopper kernel runs in a benchmark only once the GPU tests of its
    # sources passed (this call's or committed ones); a call that could not run them (too
    # little time left) leaves it out too.
    has_tests = any(s.name == "gpu-tests" for s in plan(args.plan))
    if git_commit() is None:
        log("[device] WARNING: no commit known (no .git here: set JAXDEC_COMMIT=<short hash of "
            "HEAD>): every record of this call says commit null")
    for step in steps:
        left = args.budget_s - (time.monotonic() - started)
        status, code, seconds = None, None, 0.0
        if step.name not in redo and step.done(work, slug):
            status = "already measured"
        elif left < step.min_s:
            status = f"not started: {left:.0f} s left, needs {step.min_s:.0f}"
        else:
            limit = min(step.cap_s, left)
            budget = max(limit - 30, 1)  # the step's own budget leaves it time to write
            argv = [PY] + [a.replace("{out}", str(work)).replace("{budget}", f"{budget:.0f}")
                           for a in step.argv]
            junit = work / "junit.xml"
            if step.pytest:
                argv += [f"--junitxml={junit}"]
            untested = has_tests and not hopper_tested(work, slug, args.plan)
            if (hopper_broken or untested) and step.without_hopper:
                argv += list(step.without_hopper)
                log(f"[device] {step.name}: " + (
                    "the Hopper kernel failed its tests in this call" if hopper_broken else
                    "the Hopper kernel's GPU tests have not passed for these sources")
                    + f": {' '.join(step.without_hopper)}")
            log(f"[device] {step.name}: {' '.join(argv[1:])} (limit {limit:.0f} s)")
            lines = []  # a pytest step's output, counted if the step is stopped

            def step_log(line):
                if step.pytest:
                    lines.append(line)
                log(line)

            code, seconds = run_command(argv, limit, step_log, env, stamp=step.pytest)
            if step.pytest:
                record = pytest_record(junit, args.plan, device, code, seconds,
                                       suite_files(step.argv), lines)
                path = work / f"gpu-tests-{slug}.json"
                # One record per version of the tested sources: a run cut short with no
                # failure does not replace what a complete run of them showed.
                write_merged(path, [record], ("plan", "device", "sources"),
                             render_tests_markdown)
                hopper_broken = hopper_broken or hopper_failed(junit, lines, code)
            status = ("stopped at its limit" if code is None
                      else "finished" if code == 0 else f"exit code {code}")
        summary.append(dict(step=step.name, status=status, return_code=code,
                            seconds=round(seconds, 1)))
        log(f"[device] {step.name}: {status}" + (f" after {seconds:.0f} s" if seconds else ""))
        packed = pack(work, slug, args.out, args.results)
        (args.out / "device-summary.json").write_text(json.dumps(
            dict(device=device, plan=args.plan, date=utc_now(), commit=git_commit(),
                 steps=summary), indent=2) + "\n")
    log("[device] summary: " + "; ".join(f"{s['step']} {s['status']}" for s in summary))
    log(f"[device] results: {args.out / ARCHIVE} (tar -xzf it into bench/results): "
        + (", ".join(packed) or "no result file changed"))
    return 0 if all(s["status"] in ("finished", "already measured") for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
