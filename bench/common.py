"""Helpers every benchmark shares: where results go and what each record says about the run
(device, versions, commit, date)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def versions() -> dict:
    """{'jax_version': ..., 'jaxdec_version': ..., 'torch_version': ..., ...} (None if absent)."""

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {f"{p}_version": version(p) for p in ("jax", "jaxdec", "torch", "transformers")}


def git_commit() -> str | None:
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


def device_slug(name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'cpu' -> 'cpu'; otherwise the name, slugified."""
    if not name:
        return "unknown"
    lowered = name.lower()
    if lowered == "cpu" or lowered.startswith("cpu"):
        return "cpu"
    for token in re.findall(r"[a-z0-9]+", lowered):
        if re.fullmatch(r"[a-z]+\d+[a-z]*", token) and not token.endswith("gb"):
            return token
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


def merge_records(path: Path, records: list[dict], key: str | tuple[str, ...]) -> list[dict]:
    """The records already in `path` (if any) with those matching a new record on `key` (one
    field or several) replaced, so runs made in separate calls (one preset, or one subset of
    methods, per device call) accumulate in one file."""
    fields = (key,) if isinstance(key, str) else tuple(key)

    def ident(r):
        return tuple(r.get(f) for f in fields)

    kept = []
    if path.exists():
        new_keys = {ident(r) for r in records}
        kept = [r for r in json.loads(path.read_text()) if ident(r) not in new_keys]
    return kept + records
