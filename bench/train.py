"""Training throughput and quality of a preset: its target and its distilled draft, in one run.

Usage (on the lent GPU machine, one call per preset; results land in $OUT):

    python3 -m pip install --no-deps --no-build-isolation -e . && \\
        cp bench/results/train-h100.json $OUT/ 2>/dev/null; \\
        python3 bench/train.py --preset gpu-small --out $OUT

Writes `train-<device>.json` (one record per preset; a record for the same preset already in
the file is replaced, so calls for different presets accumulate) and `train-<device>.md`.

Each record: preset, params (target), tokens_per_s and mfu of the target's training (model
FLOPs per second / the bf16 matmul peak measured in the same run; compile excluded),
heldout_loss / heldout_ppl of the target, the draft's acceptance_before / acceptance_after
(held-out expected acceptance, mean over tokens of sum_v min(p, q)), the draft's own
throughput, wall seconds per phase (`target_phase_seconds`, `draft_phase_seconds`: corpus,
tokenizer, encoding, evaluation, training, export, ...; `target_compile_seconds`: compiling
the training step, part of `train`, not of the throughput), the attention the training ran
(`cudnn`: cuDNN's fused attention, what AUTO picks on a GPU where it works; `reference`: the
jnp reference), device, jax version and date.

`--steps`, `--draft-steps`, `--max-train-bytes` and `--eval-tokens` shrink a preset (the test
suite runs `cpu-tiny` this way in seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    RESULTS, device_slug, git_commit, out_dir, utc_now, versions, write_merged)


def run(preset, work: Path, on_target: Callable[[dict], None] | None = None) -> dict:
    """Trains the target then the draft under `work`; returns the record. `on_target` gets
    the record once the target is trained (its throughput, MFU and held-out loss; `error`
    says the draft is still to come), so a run stopped during the draft keeps those (where
    no complete record of the preset was measured before: that one is kept, `keep_measured`)."""
    import jax

    from jaxdec.train import train_draft, train_lm

    started = time.perf_counter()
    target = train_lm(preset, work / "target", force=True)
    target_s = time.perf_counter() - started
    record = {
        "preset": preset.name, "params": target["params"], "steps": target["steps"],
        "tokens_per_s": target["tokens_per_s"], "mfu": target["mfu"],
        "heldout_loss": target["heldout_loss"], "heldout_ppl": target["heldout_ppl"],
        "target_seconds": target_s, "attention": target["attention"],
        "target_compile_seconds": target.get("compile_seconds"),
        "target_phase_seconds": target.get("phase_seconds"),
        "matmul_peak_tflops": target.get("matmul_peak_tflops"),
        # Threads compiling other programs beside the training (bench/speculative.py trains
        # while its grid compiles and sets this): 0 here, nothing runs beside it.
        "compile_ahead_workers": 0,
        "device": jax.devices()[0].device_kind, "date": utc_now(), "commit": git_commit(),
        **versions(),
        "error": "unfinished: the draft was not trained (the run stopped after the target)",
    }
    if on_target is not None:
        on_target(dict(record))
    started = time.perf_counter()
    draft = train_draft(work / "target", preset, work / "draft", force=True)
    record.update({
        "draft_params": draft["params"], "draft_steps": draft["steps"],
        "draft_objective": draft["objective"], "acceptance_before": draft["acceptance_before"],
        "acceptance_after": draft["acceptance_after"], "draft_tokens_per_s": draft["tokens_per_s"],
        "draft_mfu": draft["mfu"], "draft_seconds": time.perf_counter() - started,
        "draft_phase_seconds": draft.get("phase_seconds"), "error": None,
    })
    return record


def _fmt(value, spec=".3g", scale=1.0, suffix=""):
    return "–" if value is None else format(value / scale, spec) + suffix


def render_markdown(records: list[dict]) -> str:
    devices = sorted({r["device"] for r in records if r.get("device")})
    lines = [
        f"# Training: targets and distilled drafts on {', '.join(devices)}",
        "",
        "MFU = model FLOPs per second (6 per matmul weight per token plus attention) / the bf16 "
        "matmul peak measured in the same run (one device's, times the devices). Acceptance = "
        "held-out mean of sum_v min(p, q) (speculative sampling's at temperature 1).",
        "",
        "compile threads: programs compiling beside the training (bench/speculative.py compiles "
        "its grid while its models train; they share the CPU and Python's interpreter lock "
        "with the training loop), 0 for a training alone.",
        "",
        "| preset | params | steps | tokens/s | MFU | attention | compile threads "
        "| held-out loss | ppl | draft params | acceptance before | after | target s | draft s "
        "| date | jax |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in records:
        cells = [r.get("preset"), _fmt(r.get("params"), ".1f", 1e6, "M"), r.get("steps"),
                 _fmt(r.get("tokens_per_s"), ",.0f"), _fmt(r.get("mfu"), ".2f"),
                 r.get("attention"), r.get("compile_ahead_workers"),
                 _fmt(r.get("heldout_loss"), ".3f"),
                 _fmt(r.get("heldout_ppl"), ".1f"),
                 _fmt(r.get("draft_params"), ".1f", 1e6, "M"), _fmt(r.get("acceptance_before"), ".3f"),
                 _fmt(r.get("acceptance_after"), ".3f"), _fmt(r.get("target_seconds"), ".0f"),
                 _fmt(r.get("draft_seconds"), ".0f"), r.get("date"), r.get("jax_version")]
        lines.append("| " + " | ".join("–" if c is None else str(c) for c in cells) + " |")
    for r in records:
        if r.get("error"):
            lines.append(f"\n- {r.get('preset')}: {r['error']}")
    timed = [r for r in records if r.get("target_phase_seconds")]
    if timed:
        lines += ["", "Where each run's wall time went (seconds; `train` includes compiling "
                  "the training step, given apart; older records give their first step, "
                  "its compile included):", ""]
        for r in timed:
            if r.get("target_first_step_seconds") is not None:  # an older record
                apart = f"first step {_fmt(r['target_first_step_seconds'], '.1f')}"
            else:
                apart = f"step compile {_fmt(r.get('target_compile_seconds'), '.1f')}"
            parts = [f"target {_phases(r['target_phase_seconds'])} ({apart})"]
            if r.get("draft_phase_seconds"):
                parts.append(f"draft {_phases(r['draft_phase_seconds'])}")
            lines.append(f"- {r.get('preset')}: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def _phases(seconds: dict) -> str:
    return ", ".join(f"{name} {s:.1f}" for name, s in seconds.items())


def positive_int(text: str) -> int:
    """An argparse `type`: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


SHRINK_FLAGS = ("steps", "draft_steps", "max_train_bytes", "eval_tokens")


def add_shrink_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that shrink a training preset (tests run CPU presets in seconds with them)."""
    parser.add_argument("--steps", type=positive_int, help="override the target's training steps")
    parser.add_argument("--draft-steps", type=positive_int,
                        help="override the draft's training steps")
    parser.add_argument("--max-train-bytes", type=positive_int, help="override the corpus budget")
    parser.add_argument("--eval-tokens", type=positive_int,
                        help="override the held-out tokens evaluated")


def shrunk(preset, args):
    """`preset` with the overrides of `add_shrink_arguments` applied."""
    overrides = {"target_steps": args.steps, "draft_steps": args.draft_steps,
                 "max_train_bytes": args.max_train_bytes, "eval_tokens": args.eval_tokens}
    return dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    from jaxdec.train.presets import PRESETS

    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    add_shrink_arguments(parser)
    parser.add_argument("--out", type=out_dir, default=RESULTS)
    return parser


def main(argv=None) -> int:
    from jaxdec.train import get_preset

    args = build_parser().parse_args(argv)
    preset = shrunk(get_preset(args.preset), args)
    args.out.mkdir(parents=True, exist_ok=True)

    def write(record):
        path = args.out / f"train-{device_slug(record['device'])}.json"
        write_outputs(path, record)
        return path

    with tempfile.TemporaryDirectory(prefix="jaxdec-bench-train-") as work:
        path = write(run(preset, Path(work), on_target=write))
    print(path.with_suffix(".md").read_text())
    return 0


def write_outputs(path: Path, record: dict) -> None:
    """Merges `record` into `path` (replacing one of the same preset trained with as many
    compile threads beside it: a training alone and one beside a benchmark's compiles are
    kept apart) and rewrites the Markdown table beside it."""
    write_merged(path, [record], ("preset", "compile_ahead_workers"), render_markdown)


if __name__ == "__main__":
    sys.exit(main())
