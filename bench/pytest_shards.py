"""Runs pytest over groups of test files side by side, one process per group, and merges
their junit reports into one.

The device's GPU tests are compile-bound: one process compiles one program at a time on one
CPU core, while the lent machine has 16 (the 35 tests took 298 s in one process on the H200).

    python bench/pytest_shards.py --group FILE[,FILE...] [--group ...] -- PYTEST_ARGS

Every group's process gets PYTEST_ARGS and its files; a `--junitxml=PATH` (or
`--junitxml PATH`) among them is this run's merged report (each process writes its own beside
it). The processes share the GPU: each sees XLA_PYTHON_CLIENT_PREALLOCATE=false (jax
otherwise claims most of the card's memory for the first process). Their output lines are
printed as they come, after `[group N]`; a
group's end is printed as `[group N] finished, exit code C after S s: FILES` (`finished_line`;
`bench/device.py` reads it back with `parse_finished`: each group's time in the record, and
whether the Hopper kernel's group failed, also when the run is stopped at its limit). The
exit code is 0 when every group's is 0 or 5 (pytest found no test in the group under the
selection), else the first other one.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

NO_TESTS_COLLECTED = 5  # pytest's exit code when the selection leaves a group empty


def finished_line(index: int, code: int, seconds: float, files: list[str]) -> str:
    return f"[group {index}] finished, exit code {code} after {seconds:.1f} s: {' '.join(files)}"


_FINISHED = re.compile(r"\[group (\d+)\] finished, exit code (-?\d+) after ([\d.]+) s: (.*)$")


def parse_finished(line: str) -> dict | None:
    """A `finished_line` (anywhere in `line`) as {group, exit_code, seconds, files}, else
    None."""
    match = _FINISHED.search(line.rstrip("\n"))
    if match is None:
        return None
    return dict(group=int(match.group(1)), exit_code=int(match.group(2)),
                seconds=float(match.group(3)), files=match.group(4).split())


_JUNIT_OPTIONS = ("--junitxml", "--junit-xml")  # pytest's two spellings


def split_junit(pytest_args: list[str]) -> tuple[list[str], Path | None]:
    """PYTEST_ARGS without the junit report's option (`--junitxml=PATH` or `--junitxml PATH`,
    also spelt `--junit-xml`), and PATH (None when absent; the last one given counts, as in
    pytest)."""
    rest, junit = [], None
    args = iter(pytest_args)
    for arg in args:
        option, equals, value = arg.partition("=")
        if option in _JUNIT_OPTIONS:
            value = value if equals else next(args, None)
            if not value:
                raise ValueError(f"{option} needs a path")
            junit = Path(value)
        else:
            rest.append(arg)
    return rest, junit


def merge_junit(parts: list[Path], target: Path) -> None:
    """One <testsuites> of every readable part's test suites (a part a stopped or crashed
    process did not write is left out)."""
    merged = ET.Element("testsuites")
    for part in parts:
        try:
            root = ET.parse(part).getroot()
        except (OSError, ET.ParseError):
            continue
        merged.extend([root] if root.tag == "testsuite" else list(root.iter("testsuite")))
    tmp = target.with_name(target.name + ".partial")
    ET.ElementTree(merged).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, target)


def run(groups: list[list[str]], pytest_args: list[str]) -> int:
    pytest_args, junit = split_junit(pytest_args)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    parts = [None if junit is None else junit.with_name(f"{junit.stem}.group{i}{junit.suffix}")
             for i in range(len(groups))]
    for part in parts:  # an earlier run's part would be merged as this one's
        if part is not None:
            part.unlink(missing_ok=True)
    lock = threading.Lock()
    codes = [None] * len(groups)

    def one(i: int) -> None:
        argv = [sys.executable, "-m", "pytest", *pytest_args, *groups[i]]
        if parts[i] is not None:
            argv.append(f"--junitxml={parts[i]}")
        # Same process group as this one: stopping this run stops every group.
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        for line in proc.stdout:
            with lock:
                print(f"[group {i}] {line.rstrip()}", flush=True)
        codes[i] = proc.wait()
        with lock:
            print(finished_line(i, codes[i], time.monotonic() - started, groups[i]), flush=True)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if junit is not None:
        merge_junit([p for p in parts if p is not None], junit)
    failed = [c for c in codes if c not in (0, NO_TESTS_COLLECTED)]
    if failed:
        return failed[0]
    return 0 if any(c == 0 for c in codes) else NO_TESTS_COLLECTED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        ours, pytest_args = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    else:
        ours, pytest_args = argv, []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", action="append", required=True,
                        help="comma-separated test files run by one process (repeatable)")
    args = parser.parse_args(ours)
    groups = [[f for f in g.split(",") if f] for g in args.group]
    if any(not g for g in groups):
        parser.error("every --group names at least one test file")
    try:
        split_junit(pytest_args)
    except ValueError as e:
        parser.error(str(e))
    return run(groups, pytest_args)


if __name__ == "__main__":
    sys.exit(main())
