"""What jaxdec's decode program asks of a TPU, read off programs compiled for TPUs this
machine does not have: per-chip memory (weights and cache, temporaries, code) of the
Llama-3-8B-shaped greedy decode program for each TPU generation and tensor-parallel degree,
whether it fits the chip's HBM, whether the Mosaic tree-attention kernel serves its decode
steps, its operations per step, and the compile's wall time on this machine.

libtpu compiles TPU programs without a TPU once jax describes the chips
(`jax.experimental.topologies`: compile-only devices), as XLA's CUDA plugin does for GPUs
(`bench/census.py`). Nothing runs and nothing is timed on a TPU: no speed figure comes from
here. Memory is libtpu's own accounting of the compiled program (per chip); `fits` compares
its sum with the chip's published HBM, and a program libtpu refuses as too large for the chip
(its usable HBM is a little less) is recorded with libtpu's error.

The `tpu-pod` preset compiles the Llama-3-70B shape for slices of several hosts (a v5e-16:
16 chips, 4 hosts; a v6e-8: 8 chips, 2 hosts), the program each host's process would run
(`jax.distributed`; the mesh spans every host's chips).

    pip install "jax[tpu]==<your jax>"                # libtpu, the version jax pins
    python3 bench/tpu_compile.py --out bench/results  # every TPU generation: tpu-compile.*
    python3 bench/tpu_compile.py --preset tpu-pod --out bench/results  # 70B on pod slices
    python3 bench/tpu_compile.py --preset cpu-tiny    # a tiny model on this CPU (the test)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.census import decode_loop  # noqa: E402
from bench.common import git_commit, out_dir, utc_now, versions, write_merged  # noqa: E402

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # beside another libtpu process

# Each generation's smallest one-host topology (4 chips) and the published HBM (GiB) of one of
# its devices: a chip, but for v4, whose topology lists each chip's two TensorCores as devices
# (16 of the chip's 32 GiB each; libtpu's own limit for one: 15.25 GiB). Then slices of
# several hosts (4 chips each).
GENERATIONS = {
    "v5e": ("v5e:2x2", 16), "v6e": ("v6e:2x2", 32), "v4": ("v4:2x2x1", 16),
    "v5p": ("v5p:2x2x1", 95), "v5e-16": ("v5e:4x4", 16), "v6e-8": ("v6e:2x4", 32),
}
GIB = 2**30

# Llama-3-70B (and 3.1 / 3.3: the same shapes and rope).
LLAMA3_70B_CHANGES = dict(hidden_size=8192, intermediate_size=28672, num_layers=80,
                          num_heads=64)
MODEL_NAMES = {"8b": "Llama-3-8B", "70b": "Llama-3-70B", "tiny": "tiny"}


@dataclasses.dataclass(frozen=True)
class Preset:
    description: str
    model: str  # "8b" (bench.decode.LLAMA3_8B), "70b" (its LLAMA3_70B_CHANGES) or "tiny"
    generations: tuple[str, ...]  # GENERATIONS keys; () = this machine's CPU
    tps: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    prompt_len: int
    new_tokens: int


PRESETS = {
    "tpu": Preset("Llama-3-8B shape, bf16, greedy decode of 64 tokens after 1984 (context "
                  "2K, the decode benchmark's)", "8b", ("v5e", "v6e", "v4", "v5p"), (1, 4),
                  (1, 16), 1984, 64),
    "tpu-pod": Preset("Llama-3-70B shape, bf16, greedy decode of 64 tokens after 1984, on "
                      "slices of several hosts", "70b", ("v5e-16", "v6e-8"), (8, 16), (1, 16),
                      1984, 64),
    "cpu-tiny": Preset("tiny Llama shape on this machine's CPU (what the test runs)", "tiny",
                       (), (1,), (1, 2), 40, 8),
}


def devices_for(generation: str | None) -> list:
    import jax

    if generation is None:
        return jax.devices("cpu")
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(topology_name=GENERATIONS[generation][0],
                                                platform="tpu")
    except Exception as e:  # noqa: BLE001  (what is missing is said below)
        raise RuntimeError(
            "compiling for a TPU without one needs libtpu, the version this jax pins "
            f'(pip install "jax[tpu]==<jax version>"): {type(e).__name__}: {e}') from e
    return list(topology.devices)


def compile_case(preset: Preset, generation: str | None, tp: int, batch: int) -> dict:
    """One record: the decode program of `preset`'s model compiled for `tp` chips."""
    import jax.numpy as jnp

    import jaxdec
    from bench.decode import LLAMA3_8B, TINY, _prompts

    fields = dict(TINY) if preset.model == "tiny" else dict(LLAMA3_8B)
    if preset.model == "70b":
        fields.update(LLAMA3_70B_CHANGES)
    fields["rope"] = jaxdec.RopeConfig(**fields["rope"])
    config = jaxdec.ModelConfig(model_type="llama", dtype="bfloat16", **fields)
    devices = devices_for(generation)
    mesh = jaxdec.make_mesh(tp=tp, devices=devices[:tp])
    model = jaxdec.abstract_model(config, dtype=jnp.bfloat16, mesh=mesh)
    record = dict(generation=generation or "cpu", device=devices[0].device_kind, tp=tp,
                  hosts=len({d.process_index for d in mesh.devices.flat}), model=preset.model,
                  batch=batch, prompt_len=preset.prompt_len, new_tokens=preset.new_tokens)
    start = time.perf_counter()
    try:
        compiled = jaxdec.generate(model, _prompts(config.vocab_size, batch, preset.prompt_len),
                                   max_new_tokens=preset.new_tokens, compile_only=True)
    except Exception as e:  # noqa: BLE001  (a program the chips cannot hold, recorded)
        return dict(record, compile_s=round(time.perf_counter() - start, 1),
                    error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    record["compile_s"] = round(time.perf_counter() - start, 1)
    stats = compiled.memory_analysis()
    loop = decode_loop(compiled.as_text())
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes
             + stats.generated_code_size_in_bytes)
    hbm = GENERATIONS[generation][1] if generation else None
    return dict(
        record, arguments_bytes=stats.argument_size_in_bytes,
        temporaries_bytes=stats.temp_size_in_bytes,
        code_bytes=stats.generated_code_size_in_bytes, total_bytes=total, hbm_gib=hbm,
        fits=None if hbm is None else total <= hbm * GIB,
        mosaic_kernels_per_step=sum(kind == "tpu_custom_call" for _, kind in loop),
        ops_per_step=len(loop))


def run(preset_name: str) -> list[dict]:
    preset = PRESETS[preset_name]
    records = []
    for generation in preset.generations or (None,):
        chips = len(devices_for(generation))
        for tp in (tp for tp in preset.tps if tp <= chips):
            for batch in preset.batch_sizes:
                r = compile_case(preset, generation, tp, batch)
                print(r, flush=True)
                records.append(r)
    try:
        libtpu = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        libtpu = None
    common = dict(preset=preset_name, description=preset.description, commit=git_commit(),
                  date=utc_now(), libtpu_version=libtpu, **versions())
    return [dict(r, **common) for r in records]


def render_markdown(records: list[dict]) -> str:
    lines = ["# The decode program on TPUs (compiled, not run)", "",
             "Each row: jaxdec.generate's program (prefill + decode loop, bf16) compiled by "
             "libtpu for compile-only chips of a TPU generation on a machine without a TPU; "
             "memory per chip is the compiled program's own accounting (arguments: weights "
             "and the KV cache; total adds temporaries, outputs not aliased to arguments and "
             "code), `fits` compares the total with the chip's published HBM. Mosaic kernels "
             "per step: the tree-attention kernel's calls in one decode step (one per layer, "
             "or none where a shard's cache is under the kernel's 4 MiB threshold and the "
             "reference runs). Nothing was run or timed on a TPU.", "",
             "| preset | model | chip | hosts | tp | batch | context | arguments GiB | "
             "temporaries GiB | code MiB | total GiB | HBM GiB | fits | Mosaic kernels per "
             "step | ops per step | compile s | jax | libtpu | commit |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"
             "---|---|"]
    for r in records:
        context = r["prompt_len"] + r["new_tokens"]
        # Records from before the model and hosts were recorded: their preset's, one host.
        model = r.get("model") or PRESETS[r["preset"]].model
        where = f"| {r['preset']} | {MODEL_NAMES[model]} | {r['device']} | {r.get('hosts', 1)} "
        if r.get("error"):
            lines.append(f"{where}| {r['tp']} | {r['batch']} | "
                         f"{context} | {r['error']} |||||||| {r['compile_s']} | "
                         f"{r.get('jax_version')} | {r.get('libtpu_version')} | "
                         f"{r['commit']} |")
            continue
        fits = {True: "yes", False: "no", None: ""}[r["fits"]]
        gib = {k: f"{r[f'{k}_bytes'] / GIB:.2f}" for k in ("arguments", "temporaries", "total")}
        lines.append(f"{where}| {r['tp']} | {r['batch']} | "
                     f"{context} | {gib['arguments']} | {gib['temporaries']} | "
                     f"{r['code_bytes'] / 2**20:.1f} | {gib['total']} | {r['hbm_gib'] or ''} | "
                     f"{fits} | "
                     f"{r['mosaic_kernels_per_step']} | {r['ops_per_step']} | "
                     f"{r['compile_s']} | {r.get('jax_version')} | "
                     f"{r.get('libtpu_version')} | {r['commit']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tpu", choices=sorted(PRESETS))
    parser.add_argument("--out", type=out_dir, default=None,
                        help="write tpu-compile.json and .md here (default: print only); "
                             "records of other cases already there are kept")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    records = run(args.preset)
    print(render_markdown(records))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_merged(args.out / "tpu-compile.json", records,
                     ("preset", "generation", "tp", "batch"), render_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
