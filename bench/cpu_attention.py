"""CPU decode over caches larger than their contents: AUTO (the blocked jnp attention from
`models.layers.BLOCKED_MIN_SLOTS` slots on) against the jnp reference, side by side.

On a CPU, jaxdec's attention reads a long cache in blocks up to the longest row's length
(`tree_attention.Impl.BLOCKED`), where the reference scores every slot: with a cache larger
than its contents (a server's preallocated cache, a generous `max_len`, long
`max_new_tokens` early on) the reference's steps cost what the cache could hold. This times
greedy `jaxdec.generate` of the same prompts into caches of several sizes, both ways in one
process (alternating, median of the repeats after a warm-up run), checks their tokens agree,
and writes `cpu-attention-cpu.json` and a Markdown table under `--out`:

    python3 bench/cpu_attention.py                       # preset `cpu`: a few minutes
    python3 bench/cpu_attention.py --preset cpu-tiny     # seconds (what the tests run)

fp32 and bf16 models (weights and caches): the decode loops carry a bf16 cache as its bits
on a CPU (`jaxdec.cache.as_bits`), without which XLA's CPU backend converts the whole cache
around every write and block read.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import git_commit, out_dir, utc_now, versions, write_merged  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Preset:
    model: dict  # ModelConfig fields (llama)
    slots: tuple[int, ...]  # cache capacities (max_len)
    batch_sizes: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    repeats: int
    dtypes: tuple[str, ...] = ("float32", "bfloat16")


PRESETS = {
    "cpu": Preset(model=dict(vocab_size=512, hidden_size=256, intermediate_size=512,
                             num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32,
                             max_position_embeddings=32768),
                  slots=(256, 4096, 16384), batch_sizes=(1, 4), prompt_len=5, new_tokens=64,
                  repeats=3),
    "cpu-tiny": Preset(model=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                                  max_position_embeddings=2048),
                       slots=(64, 1024), batch_sizes=(1,), prompt_len=3, new_tokens=4,
                       repeats=1),
}
IMPLS = ("reference", "auto")


def run(preset: Preset) -> list[dict]:
    """One record per (dtype, slots, batch, impl): decode tokens per second and the tokens'
    match."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxdec
    from jaxdec.models import layers

    if jax.default_backend() != "cpu":  # the records say CPU: never time another backend
        raise RuntimeError(f"this benchmark times the CPU, but jax runs on "
                           f"{jax.default_backend()}: set JAX_PLATFORMS=cpu")
    config = jaxdec.ModelConfig(model_type="llama", **preset.model)
    stamp = dict(device=f"CPU ({os.cpu_count()} cores)", date=utc_now(), commit=git_commit(),
                 jax_version=versions()["jax_version"])
    records = []
    for dtype, slots in itertools.product(preset.dtypes, preset.slots):
        # Weights of std 0.25 (as the parity tests' checkpoints): clear argmax margins. fp32
        # tokens must agree exactly; bf16 rounds differently on the two paths (the blocked
        # one each block's unnormalised probabilities, the reference the normalised ones),
        # and a random model's greedy tokens part after a few dozen: recorded, not failed.
        model = jaxdec.init_model(config, jax.random.key(0), dtype=jnp.dtype(dtype), std=0.25)
        rng = np.random.default_rng(0)
        for batch in preset.batch_sizes:
            prompts = rng.integers(0, config.vocab_size, (batch, preset.prompt_len)).tolist()
            models = {impl: model.with_attention(impl) for impl in IMPLS}

            def call(impl):
                return jaxdec.generate(models[impl], prompts, max_new_tokens=preset.new_tokens,
                                       max_len=slots)

            tokens = {impl: np.asarray(call(impl).tokens) for impl in IMPLS}  # warm-up
            times = {impl: [] for impl in IMPLS}
            for _ in range(preset.repeats):
                for impl in IMPLS:
                    start = time.perf_counter()
                    jax.block_until_ready(call(impl).tokens)
                    times[impl].append(time.perf_counter() - start)
            differ = np.flatnonzero((tokens["auto"] != tokens["reference"]).any(axis=0))
            first_difference = int(differ[0]) if differ.size else None
            blocked = slots >= layers.BLOCKED_MIN_SLOTS
            for impl in IMPLS:
                seconds = statistics.median(times[impl])
                records.append(dict(
                    preset=preset_name(preset), dtype=dtype, slots=slots, batch=batch, impl=impl,
                    attention="blocked" if impl == "auto" and blocked else "reference",
                    prompt_len=preset.prompt_len, new_tokens=preset.new_tokens,
                    tokens_per_s=batch * preset.new_tokens / seconds, seconds=seconds,
                    same_tokens=first_difference is None,
                    first_difference=first_difference, **stamp))
    return records


def preset_name(preset: Preset) -> str:
    return next(name for name, p in PRESETS.items() if p is preset)


def render_markdown(records: list[dict]) -> str:
    lines = ["# CPU decode over long caches: blocked attention vs the reference", "",
             "Greedy `jaxdec.generate`, fp32 and bf16 models, a prompt of a few tokens "
             "then `new_tokens` "
             "tokens into a cache of `slots` slots (so the rows hold far less than the cache "
             "can); `auto` walks caches of 512 slots or more in blocks "
             "(`tree_attention.Impl.BLOCKED`) and runs the reference below; `reference` "
             "scores every slot. Both timed in one process, alternating; tokens/s over "
             "prefill and decode (median of the repeats). Where `auto` runs the reference "
             "too (fewer than 512 slots), the ratio is the machine's noise. Same tokens: "
             "fp32 must match exactly; bf16 rounds differently on the two paths, so a random "
             "model's greedy tokens may part after a few dozen.", "",
             "| preset | dtype | slots | batch | reference tokens/s | auto tokens/s "
             "| auto attention | speedup | same tokens | device | jax | date | commit |",
             "|---|---|---:|---:|---:|---:|---|---:|---|---|---|---|---|"]
    pairs = {}
    for r in records:
        key = (r["preset"], r.get("dtype", "float32"), r["slots"], r["batch"])
        pairs.setdefault(key, {})[r["impl"]] = r
    for (preset, dtype, slots, batch), pair in sorted(pairs.items()):
        ref, auto = pair.get("reference"), pair.get("auto")
        if ref is None or auto is None:
            continue
        lines.append(
            f"| {preset} | {dtype} | {slots} | {batch} | {ref['tokens_per_s']:.0f} | "
            f"{auto['tokens_per_s']:.0f} | {auto['attention']} | "
            f"{auto['tokens_per_s'] / ref['tokens_per_s']:.2f}x | "
            f"{same_column(auto)} | {auto['device']} | "
            f"{auto['jax_version']} | {auto['date']} | {auto['commit']} |")
    return "\n".join(lines) + "\n"


def same_column(record: dict) -> str:
    if record["same_tokens"]:
        return "yes"
    return f"from token {record['first_difference']} on: no"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", type=out_dir, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if "jax" not in sys.modules:  # on a machine with an accelerator too, time the CPU
        os.environ["JAX_PLATFORMS"] = "cpu"
    records = run(PRESETS[args.preset])
    args.out.mkdir(parents=True, exist_ok=True)
    write_merged(args.out / "cpu-attention-cpu.json", records,
                 key=("preset", "dtype", "slots", "batch", "impl"), render=render_markdown)
    print(render_markdown(records))
    # fp32 must give the same tokens both ways; bf16's rounding differs (see `run`).
    return 0 if all(r["same_tokens"] for r in records if r["dtype"] == "float32") else 1


if __name__ == "__main__":
    sys.exit(main())
