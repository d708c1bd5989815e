"""Helpers every benchmark shares: where results go, what each record says about the run
(device, versions, commit, date), compiling a grid's programs ahead of its timed runs, and
the memory-bandwidth ceiling."""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Hashable

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
# What a jaxdec decode step runs: a record measured with other sources measured other code.
MODEL_SOURCES = ("models", "pallas_kernels/tree_attention", "pallas_kernels/matvec",
                 "jaxdec/cache.py",
                 "jaxdec/generate.py", "jaxdec/model.py", "jaxdec/parallel.py",
                 "jaxdec/sampling.py")


def sources_digest(roots) -> str:
    """A hash of the .py files under `roots` (paths relative to the repository, files or
    folders): records carry it, so a result is current only while the code it measured is.
    (The device gets a copy of the working tree, so both sides hash the same files.)"""
    import hashlib

    digest = hashlib.sha256()
    for root in roots:
        path = REPO / root
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(str(file.relative_to(REPO)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def versions() -> dict:
    """{'jax_version': ..., 'jaxdec_version': ..., 'torch_version': ..., ...} (None if absent)."""

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {f"{p}_version": version(p) for p in ("jax", "jaxdec", "torch", "transformers")}


def git_commit() -> str | None:
    """The checked-out commit (short hash): `$JAXDEC_COMMIT` when set (a lent device gets a
    copy of the working tree without `.git`, so its call passes the hash), else git's."""
    given = os.environ.get("JAXDEC_COMMIT", "").strip()
    if given:
        return given
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def newest(records: list[dict]) -> dict:
    """The most recently measured record (ISO dates sort as text): a merged file's header
    describes it, never merely the oldest row kept."""
    return max(records, key=lambda r: str(r.get("date") or ""))


def runs_note(records: list[dict], describe: Callable[[dict], str]) -> str:
    """'' when every record came from one run (same date and commit); otherwise a sentence
    naming each run, `describe(record)` of its first record and how many rows it gave,
    newest first: results files merge calls, and each row is judged by its own run's
    ceilings."""
    runs: dict[tuple, list[dict]] = {}
    for r in records:
        runs.setdefault((r.get("date"), r.get("commit")), []).append(r)
    if len(runs) < 2:
        return ""
    ordered = sorted(runs.values(), key=lambda rows: str(rows[0].get("date") or ""),
                     reverse=True)
    return (f" The rows come from {len(runs)} runs, each row judged by its own run's figures: "
            + "; ".join(f"{describe(rows[0])} ({len(rows)} rows)" for rows in ordered) + ".")


def out_dir(value: str) -> Path:
    """An argparse `type` for a benchmark's `--out`: a directory, or a path one can be made
    at, refused up front (a file there failed the first write, after the measuring)."""
    import argparse

    path = Path(value)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{existing} is not writable")
    return path


def device_slug(name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'cpu' -> 'cpu'; otherwise the name, slugified.
    Variants that differ keep their mark: 'TPU v5 lite' -> 'v5e' (not 'TPU v5''s 'v5'),
    'NVIDIA H100 PCIe' -> 'h100-pcie', 'NVIDIA H100 NVL' -> 'h100-nvl'."""
    if not name:
        return "unknown"
    lowered = name.lower()
    if lowered == "cpu" or lowered.startswith("cpu"):
        return "cpu"
    tokens = re.findall(r"[a-z0-9]+", lowered)
    for token in tokens:
        if re.fullmatch(r"[a-z]+\d+[a-z]*", token) and not token.endswith("gb"):
            if "lite" in tokens:  # TPU v5e, v6e: device_kind 'TPU v5 lite'
                return token + "e"
            return "-".join([token] + [t for t in ("pcie", "nvl") if t in tokens])
    return re.sub(r"[^a-z0-9]+", "-", lowered).strip("-")


def device_name(env: dict | None = None) -> str:
    """The name of jax's first device, asked of a short-lived process, so the caller never
    initialises a backend (nor holds accelerator memory while its workers run)."""
    proc = subprocess.run([sys.executable, "-c",
                           "import jax; print(jax.devices()[0].device_kind)"],
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"could not query the device:\n{proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


def read_records(path: Path) -> list[dict]:
    """The JSON list of records at `path`, or [] where there is none (missing, cut short, not
    a list)."""
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return records if isinstance(records, list) else []


# How a benchmark's error starts where its time budget cut a run (skipped; stopped at a time
# limit; only part of it recorded before the stop).
TIME_ERRORS = ("skipped", "timed out", "unfinished")


def keep_measured(old: list[dict], new: list[dict], ident: Callable[[dict], tuple]) -> list[dict]:
    """`new` with each record that its time budget cut (an error of `TIME_ERRORS`) replaced by
    the measured record it would displace (same `ident`, no error), marked with the cut
    attempt's error: a call that ran out of time never erases figures an earlier call
    measured (they stay, stale where the code changed, until a measurement replaces them)."""
    measured = {ident(r): r for r in old if r.get("error") is None}
    kept = []
    for r in new:
        earlier = measured.get(ident(r))
        if earlier is not None and str(r.get("error") or "").startswith(TIME_ERRORS):
            r = dict(earlier, last_attempt_error=r["error"], last_attempt_date=r.get("date"))
        kept.append(r)
    return kept


def kept_note(records: list[dict], describe: Callable[[dict], str]) -> str:
    """A Markdown note naming the rows `keep_measured` kept (their figures an earlier call's,
    the last attempt cut for time), or "" without any."""
    kept = [r for r in records if r.get("last_attempt_error")]
    if not kept:
        return ""
    return ("\nKept from earlier calls (the last attempt ran out of time; their figures are "
            "the earlier measurement's, with its commit): " + "; ".join(
                f"{describe(r)} (measured at {r.get('commit') or '?'}, attempt "
                f"{r.get('last_attempt_date') or '?'}: {r['last_attempt_error']})"
                for r in kept) + ".\n")


def merge_records(path: Path, records: list[dict], key: str | tuple[str, ...]) -> list[dict]:
    """The records already in `path` (if any) with those matching a new record on `key` (one
    field or several) replaced, so runs made in separate calls (one preset, or one subset of
    methods, per device call) accumulate in one file; a new record its time budget cut does
    not replace a measured one (`keep_measured`)."""
    fields = (key,) if isinstance(key, str) else tuple(key)

    def ident(r):
        return tuple(r.get(f) for f in fields)

    kept, old = [], []
    if path.exists():
        old = json.loads(path.read_text())
        new_keys = {ident(r) for r in records}
        kept = [r for r in old if ident(r) not in new_keys]
    return kept + keep_measured(old, records, ident)


def replace_text(path: Path, text: str) -> None:
    """Writes `path` whole: to a file beside it, then renamed over it, so a run stopped
    mid-write (a device step killed at its time limit) leaves the previous file, never a cut
    one that a later call would merge into, or an archive carry over, the committed results."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def write_merged(path: Path, records: list[dict], key: str | tuple[str, ...],
                 render: Callable[[list[dict]], str], indent: int = 2) -> list[dict]:
    """Merges `records` into the JSON list at `path` (`merge_records` on `key`), writes the
    Markdown table `render` makes of the result beside it (`path` with `.md`), each file
    replaced whole (`replace_text`), and returns the merged records."""
    merged = merge_records(path, records, key)
    replace_text(path, json.dumps(merged, indent=indent) + "\n")
    fields = (key,) if isinstance(key, str) else tuple(key)
    replace_text(path.with_suffix(".md"), render(merged) + kept_note(
        merged, lambda r: ", ".join(f"{f}={r.get(f)}" for f in fields
                                    if f not in ("device", "preset", "kernel", "plan"))))
    return merged


class CompileAhead:
    """Compiles a benchmark's programs in worker threads before they are timed.

    A job is a jaxdec call with `compile_only=True`, usually on `jaxdec.abstract_model`s, so
    the programs of a whole grid compile side by side (XLA releases the GIL while it compiles)
    and beside training, before the weights exist. Call `wait` before timing anything: no
    compile then runs beside a timed run (XLA's GPU autotuner runs kernels on the device), and
    the timed calls find their programs compiled. A job that fails is reported and left to the
    timed call, which compiles inline (and raises properly if the call itself is wrong).
    With `workers=0` nothing is compiled ahead. While jobs run, Python switches threads every
    millisecond (instead of 5), so a training loop beside them waits less for the interpreter
    lock that tracing holds.
    """

    SWITCH_INTERVAL_S = 0.001

    def __init__(self, workers: int, log: Callable[[str], None] = print):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an int >= 0, got {workers!r}")
        self.log = log
        self.jobs: dict[Hashable, concurrent.futures.Future] = {}
        self._pool = (concurrent.futures.ThreadPoolExecutor(workers, "compile-ahead")
                      if workers else None)
        self._switch_interval = None
        if self._pool is not None:
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(self.SWITCH_INTERVAL_S)

    def _restore_switch_interval(self) -> None:
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None

    @property
    def enabled(self) -> bool:
        return self._pool is not None

    def submit(self, key: Hashable, compile_fn: Callable[[], object]) -> None:
        if self._pool is None or key in self.jobs:
            return

        def job():
            start = time.perf_counter()
            try:
                compile_fn()
            except Exception:
                self.log(f"compile-ahead {key}: failed, the timed call compiles it\n"
                         + traceback.format_exc(limit=3))
                raise
            return time.perf_counter() - start

        self.jobs[key] = self._pool.submit(job)

    def wait(self, deadline: float | None = None) -> None:
        """Blocks until every job is done or `deadline` (time.monotonic) passes; jobs not
        started by then are dropped."""
        if not self.jobs:
            self._restore_switch_interval()
            return
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        start = time.perf_counter()
        done, pending = concurrent.futures.wait(list(self.jobs.values()), timeout=timeout)
        # A job not started is dropped; one compiling cannot be stopped (XLA holds it) and
        # runs on beside the first timed calls: said, so their figures can be read so.
        running = sum(1 for future in pending if not future.cancel())
        self._restore_switch_interval()
        failed = sum(1 for f in done if not f.cancelled() and f.exception() is not None)
        self.log(f"compile-ahead: {len(done) - failed} of {len(self.jobs)} programs compiled "
                 f"({failed} failed, {len(pending)} left to the timed calls"
                 + (f", {running} of them still compiling beside the first timed runs"
                    if running else "") + f"), waited {time.perf_counter() - start:.1f} s")

    def seconds(self, key: Hashable) -> float | None:
        """Wall seconds the job for `key` took (None: no job, or it failed or never ran)."""
        future = self.jobs.get(key)
        if future is None or not future.done() or future.cancelled() or future.exception():
            return None
        return round(future.result(), 3)

    def close(self) -> None:
        self._restore_switch_interval()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def default_compile_workers() -> int:
    """Compile-ahead threads by default: half the CPU cores, up to 8, on an accelerator; none
    on a CPU, whose cores the timed runs themselves use."""
    import jax

    if jax.default_backend() == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def counting_compiles():
    """Counts XLA compiles (in any thread) while the block runs: `with counting_compiles() as
    n: ...; n[0]`. A timed call whose program was compiled ahead counts 0."""
    import jax

    count = [0]

    def listener(event, duration, **_):
        del duration
        if event == BACKEND_COMPILE_EVENT:
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# How `measure_hbm` times its probes; records name it, so results taken another way (the
# first device runs timed one dispatched x + 1 each, which read 2.5-3.2 TB/s on an H200 whose
# kernels reached 3.9) are known to be due again.
HBM_METHOD = "jax loop probes: (t(2n) - t(n)) / n"


def measure_hbm(nbytes: int, *, passes: int = 8, trials: int = 5) -> dict[str, float]:
    """GB/s of `jaxdec.benchmark.memory_bandwidth`'s two probes ("jax x + 1": read + write,
    "jax sum": read only) over an fp32 array of `nbytes`, each timed per pass inside one
    jitted loop."""
    from jaxdec.benchmark import memory_bandwidth

    return {f"jax {name}": gbps
            for name, gbps in memory_bandwidth(nbytes, passes=passes, trials=trials).items()}


def profile_kernels(run: Callable[[], object], *, top: int = 12) -> dict:
    """Runs `run()` once under the JAX profiler and sums the device's kernel time by kernel
    name: {run_s, kernel_s (summed over every device event), kernels: [{name, ms, calls}]
    (the `top` longest in total)}, or {run_s, error} when the trace has no device events
    (a CPU, or a profiler without device tracing). `run_s` is the traced call's wall time,
    from its start until its result is ready: starting and stopping the profiler (seconds,
    writing the trace) are outside it. The traced run is slower than a plain one: use it to
    see where time goes, never as the timing."""
    import gzip
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            start = time.perf_counter()
            jax.block_until_ready(run())
            run_s = time.perf_counter() - start
        traces = sorted(Path(tmp).rglob("perfetto_trace.json.gz"))
        if not traces:
            return dict(run_s=round(run_s, 4), error="the profiler wrote no perfetto trace")
        with gzip.open(traces[-1], "rt") as f:
            trace = json.load(f)
    return dict(run_s=round(run_s, 4), **summarize_trace(trace, top=top))


SHORT_KERNEL_US = 5.0  # a kernel this short is mostly launch and ramp, not work
# Lines of a device's trace whose events span other lines' (not kernels of their own).
SPANNING_LINES = ("XLA Modules", "Steps", "XLA TraceMe", "Framework Ops",
                  "Framework Name Scope", "Source code")


def summarize_trace(trace: dict | list, *, top: int = 12) -> dict:
    """Kernel time by name from a Chrome/perfetto trace: complete events ("X", microseconds)
    of the processes named "/device:..." (the GPU's streams, the TPU's "XLA Ops" line). Also
    counts every device event (`events`) and those under `SHORT_KERNEL_US` (`short_events`,
    `short_s`): many short kernels per step is overhead that fusion, not bandwidth, removes."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace

    def is_device(name: str) -> bool:  # "/device:GPU:0", or a GPU/TPU named another way
        return name.startswith("/device:") or (
            ("GPU" in name or "TPU" in name) and "host" not in name.lower())

    devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and is_device(str(e.get("args", {}).get("name", "")))}
    # A TPU's process has lines that span other lines' events ("XLA Modules": a whole
    # program; "Steps"): only its "XLA Ops" line is kernels. A GPU's lines are its streams.
    threads = {(e.get("pid"), e.get("tid")): str(e.get("args", {}).get("name", ""))
               for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
               and e.get("pid") in devices}
    with_ops = {pid for (pid, _), name in threads.items() if name == "XLA Ops"}

    def is_kernel(e) -> bool:
        pid, line = e.get("pid"), threads.get((e.get("pid"), e.get("tid")), "")
        if pid in with_ops:
            return line == "XLA Ops"
        return line not in SPANNING_LINES

    totals: dict[str, list] = {}
    short = [0, 0.0]  # kernels under SHORT_KERNEL_US: how many, their summed microseconds
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in devices and is_kernel(e):
            entry = totals.setdefault(e.get("name", "?"), [0.0, 0])
            dur = float(e.get("dur", 0))
            entry[0] += dur
            entry[1] += 1
            if dur < SHORT_KERNEL_US:
                short[0] += 1
                short[1] += dur
    if not totals:
        return dict(error="no device events in the trace")
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])
    return dict(kernel_s=round(sum(us for us, _ in totals.values()) / 1e6, 6),
                events=sum(calls for _, calls in totals.values()),
                short_events=short[0], short_s=round(short[1] / 1e6, 6),
                kernels=[dict(name=name[:120], ms=round(us / 1e3, 3), calls=calls)
                         for name, (us, calls) in ranked[:top]])
