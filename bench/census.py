"""Kernel census: how many GPU kernels one decode step of jaxdec's generate loop launches, per
layer and in all, from the compiled program's HLO, on a machine without a GPU.

A decode step at batch 1 is a chain of short kernels (the H200 profile of commit a8f00e1:
22 per layer of the Llama-3-8B shape, 15 of them element-wise ones of ~1.4 us), so how many
kernels the compiler makes of the model code is a speed figure we can read without timing
anything. XLA compiles for a GPU it does not have once it is given the GPU's description
(a "compile-only" device): this script builds one for the target below, compiles the
decode program of the Llama-3-8B shape (`h100`; its speculative step with a Llama-3.2-1B-
shaped draft model on chain(4), `h100-draft`; the gpu-small target's, `h100-small`, or its
prompt-lookup and retrieval speculative steps, `h100-lookup` and `h100-retrieval`) with 2 and
3 layers, and counts the kernels
of the loop's body (a loop nested in it, such as a draft model's levels, times its trip
count); the difference is one layer's kernels, the rest the step's own (sampling, stop tests,
the logits head; drafting, the tree, acceptance, the commit for a speculative step).

    pip install --no-deps jax-cuda12-plugin==<jax version> jax-cuda12-pjrt==<jax version>
    python3 bench/census.py --out bench/results        # on a CPU machine
    python3 bench/census.py --preset h100-lookup --out bench/results
    python3 bench/census.py                            # on a GPU: its own device

Without a GPU the CUDA plugin loads with JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 (set here) and no
CUDA libraries; jaxdec picks its kernels for the platform of the model's devices ("gpu"
for a compile-only one). A compile-only device is never autotuned: matmuls get
the compiler's default tiling (often split-K, whose reduction may be a kernel of its own
or join its consumer), so a count can differ by a kernel or two from the device's, and the
census says nothing about a kernel's time. `--preset cpu-tiny` (`cpu-tiny-lookup`, `-draft`,
`-retrieval`) compile a tiny model for the CPU (what the tests run).

`h100-train-small` / `h100-train-base` count the same for one training step of the gpu-small /
gpu-base target (`jaxdec train lm`'s compiled step, forward, backward and optimizer, cuDNN's
fused attention assumed usable), with the bytes each kernel's operands and results occupy:
summed, an upper bound of the step's memory traffic (a kernel that gathers a few rows of an
operand counts all of it), read off the program, not measured.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import math
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import git_commit, out_dir, utc_now, versions, write_merged  # noqa: E402

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # the plugin loads without CUDA

# What XLA needs to know of a GPU to compile for it (a GpuTargetConfigProto, text format):
# the H100 SXM's published figures (132 SMs, 50 MiB L2, 3.35 TB/s, sm_90).
H100_SXM = dict(
    threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
    shared_memory_per_core=233472, threads_per_core_limit=2048, core_count=132,
    fpus_per_core=128, block_dim_limit_x=2147483647, block_dim_limit_y=65535,
    block_dim_limit_z=65535, memory_bandwidth=3352320000000, l2_cache_size=52428800,
    clock_rate_ghz=1.98, device_memory_size=84942979072, shared_memory_per_block_optin=232448,
    registers_per_core_limit=65536, registers_per_block_limit=65536,
)
TARGETS = {"h100": ("NVIDIA H100 80GB HBM3", H100_SXM, (9, 0))}
CUDNN_VERSION = (9, 8, 0)  # what the compiler assumes of the (absent) device's cuDNN

# A while body's instructions that launch nothing.
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier",
              "after-all", "partition-id", "replica-id", "copy-start", "copy-done",
              "fusion-done", "all-reduce-done", "all-gather-done", "collective-permute-done"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")


def target_config(target: str) -> str:
    """The GpuTargetConfigProto (text format) of a target in TARGETS."""
    name, facts, (major, minor) = TARGETS[target]
    info = "\n".join(f"  {key}: {value}" for key, value in facts.items())
    cudnn = CUDNN_VERSION
    return (f"gpu_device_info {{\n{info}\n  cuda_compute_capability {{ major: {major} "
            f"minor: {minor} }}\n}}\nplatform_name: \"CUDA\"\n"
            f"dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} patch: {cudnn[2]} }}\n"
            f"device_description_str: \"{name}\"\n")


def compile_only_devices(target: str):
    """One compile-only device of the target (XLA's CUDA plugin, no GPU needed)."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            "census", "cuda", target_config=target_config(target), topology="1x1x1")
    except Exception as e:  # noqa: BLE001  (what is missing is said below)
        raise RuntimeError(
            "compiling for a GPU without one needs XLA's CUDA plugin matching this jax "
            "(pip install --no-deps jax-cuda12-plugin==<jax version> "
            f"jax-cuda12-pjrt==<jax version>): {type(e).__name__}: {e}") from e
    return list(topology.devices)


def computations(hlo_text: str) -> dict[str, list[str]]:
    """Each computation's instruction lines, by name (compiled HLO text)."""
    out, current = {}, None
    for line in hlo_text.splitlines():
        match = _COMPUTATION.match(line)
        if match and not line.startswith(" "):
            current = out.setdefault(match.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            current.append(line)
    return out


def kernels(lines: list[str]) -> list[tuple[str, str]]:
    """(instruction name, kind) of the instructions of one computation that launch work:
    fusions (kind: the fusion's), custom calls (kind: the call target), anything else by
    its opcode."""
    out = []
    for line in lines:
        match = _INSTRUCTION.match(line)
        if not match or match.group(2) in _NO_KERNEL:
            continue
        name, op = match.groups()
        target = re.search(r'custom_call_target="([^"]+)"', line)
        kind = re.search(r"\bkind=(\w+)", line)
        out.append((name, target.group(1) if target else kind.group(1) if kind else op))
    return out


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_DEFINITION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) [a-z][\w\-]*\((.*)$")


def array_bytes(shape_text: str) -> int:
    """Bytes of the arrays an HLO shape names (a tuple's elements summed)."""
    return sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(shape_text))


def entry_kernels(hlo_text: str) -> list[tuple[str, str, int]]:
    """(name, kind, bytes) of the entry computation's kernels: bytes = its operands' and
    results' sizes (what it may read and write)."""
    comps = computations(hlo_text)
    header = re.search(r"^ENTRY %?([\w.\-]+) \((.*)\) -> ", hlo_text, re.M)
    sizes = {m.group(1): array_bytes(m.group(2))
             for m in re.finditer(r"([\w.\-]+): (\w+\[[\d,]*\])", header.group(2))}
    lines = comps[header.group(1)]
    for line in lines:
        match = _DEFINITION.match(line)
        if match:
            sizes[match.group(1)] = array_bytes(match.group(2))
    out = []
    for name, kind in kernels(lines):
        line = next(l for l in lines if (m := _DEFINITION.match(l)) and m.group(1) == name)
        operands = re.findall(r"%([\w.\-]+)", _DEFINITION.match(line).group(3).split(")")[0])
        out.append((name, kind, sizes[name] + sum(sizes.get(o, 0) for o in operands)))
    return out


def loop_kernels(comps: dict[str, list[str]], body: str) -> list[tuple[str, str]]:
    """The kernels one iteration of the while body `body` launches: a loop nested in it
    counts as its own body's kernels times its known trip count (a draft model's levels), or
    once as opcode "while" when the count is not known."""
    out = []
    for line in comps[body]:
        match = _INSTRUCTION.match(line)
        inner = re.search(r"\bbody=%?([\w.\-]+)", line)
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        if match and match.group(2) == "while" and inner and trips and inner.group(1) in comps:
            out += loop_kernels(comps, inner.group(1)) * int(trips.group(1))
        else:
            out += kernels([line])
    return out


def decode_loop(hlo_text: str) -> list[tuple[str, str]]:
    """The kernels of one iteration of the program's busiest while body (a generate
    program's decode loop), nested loops of known trip count unrolled (`loop_kernels`)."""
    comps = computations(hlo_text)
    bodies = [re.search(r"\bbody=%?([\w.\-]+)", line).group(1)
              for lines in comps.values() for line in lines if " while(" in line]
    if not bodies:
        raise ValueError("the program has no while loop")
    return max((loop_kernels(comps, b) for b in bodies if b in comps), key=len)


def category(name: str, kind: str) -> str:
    """matmul / attention (Pallas kernels, cuDNN's fused attention) / element-wise (reductions,
    copies, cache writes, everything else)."""
    if (name.startswith(("gemm_fusion", "cublas", "triton_gemm")) or kind in ("dot", "convolution")
            or "gemm" in kind.lower() or "cublas" in kind.lower()):
        return "matmul"
    if ("triton" in kind.lower() or "fmha" in kind.lower()
            or name.startswith(("pallas", "tree_attention"))):
        return "attention"
    return "element-wise"


@dataclasses.dataclass(frozen=True)
class Preset:
    description: str
    model: dict  # ModelConfig fields (llama), `rope` as a dict of RopeConfig fields; for
    # program "train", the training preset's target `Shape` fields
    batch_sizes: tuple[int, ...]
    prompt_len: int
    attention: tuple[str, ...]
    target: str | None  # a TARGETS key: compile for that GPU; None: this machine's devices
    program: str = "generate"  # "lookup": speculative_generate with prompt lookup;
    # "retrieval": with retrieval (`shaped_retrieval`); "draft": with a draft model (`draft`)
    # on chain(4); "train"
    train_preset: str | None = None  # program "train": the jaxdec.train preset compiled
    draft: dict | None = None  # program "draft": the draft's ModelConfig fields (over model's)


# Llama-3.2-1B's shape as ModelConfig fields over LLAMA3_8B's (same vocabulary and rope): the
# usual draft of a Llama-3-8B target.
LLAMA32_1B_DRAFT = dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                        num_kv_heads=8, head_dim=64, tie_word_embeddings=True)


def presets() -> dict[str, Preset]:
    from bench.decode import LLAMA3_8B, TINY
    from jaxdec.train.presets import get_preset

    small = get_preset("gpu-small")
    gpu_small = dict(TINY, vocab_size=small.vocab_size, hidden_size=small.target.hidden_size,
                     intermediate_size=small.target.intermediate_size,
                     num_layers=small.target.num_layers, num_heads=small.target.num_heads,
                     num_kv_heads=small.target.num_kv_heads,
                     head_dim=small.target.hidden_size // small.target.num_heads,
                     max_position_embeddings=small.max_positions)
    return {
        "h100": Preset("Llama-3-8B shape, bf16, the decode benchmark's context (2K)",
                       LLAMA3_8B, (1, 16), 1984, ("pallas", "reference"), "h100"),
        "h100-small": Preset("gpu-small target shape, bf16, plain decoding after a 200-token "
                             "prompt (to set beside h100-lookup)", gpu_small, (1,), 200,
                             ("reference", "pallas"), "h100"),
        "h100-draft": Preset("Llama-3-8B shape, bf16, a draft-model speculative step (chain(4); "
                             "a Llama-3.2-1B-shaped draft) after a 1984-token prompt",
                             LLAMA3_8B, (1,), 1984, ("pallas",), "h100", program="draft",
                             draft=LLAMA32_1B_DRAFT),
        "h100-lookup": Preset("gpu-small target shape, bf16, a prompt-lookup speculative step "
                              "(its default tree) after a 200-token prompt", gpu_small, (1,),
                              200, ("reference", "pallas"), "h100", program="lookup"),
        "h100-retrieval": Preset("gpu-small target shape, bf16, a retrieval speculative step "
                                 "(its default tree; a datastore of ~25M tokens, about "
                                 "gpu-small's training corpus) after a 200-token prompt",
                                 gpu_small, (1,), 200, ("pallas",), "h100",
                                 program="retrieval"),
        "h100-train-small": _train_preset("gpu-small", "h100"),
        "h100-train-base": _train_preset("gpu-base", "h100"),
        "cpu-tiny-train": _train_preset("cpu-tiny", None),
        "cpu-tiny": Preset("tiny Llama shape on this machine's CPU (what the tests run)",
                           TINY, (1, 2), 40, ("reference",), None),
        "cpu-tiny-lookup": Preset("tiny Llama shape, prompt lookup, this machine's CPU", TINY,
                                  (1,), 40, ("reference",), None, program="lookup"),
        "cpu-tiny-retrieval": Preset("tiny Llama shape, retrieval, this machine's CPU", TINY,
                                     (1,), 40, ("reference",), None, program="retrieval"),
        "cpu-tiny-draft": Preset("tiny Llama shape, a 1-layer draft on chain(4), this "
                                 "machine's CPU", TINY, (1,), 40, ("reference",), None,
                                 program="draft", draft=dict(num_layers=1)),
    }


def _train_preset(name: str, target: str | None) -> Preset:
    from jaxdec.train.presets import get_preset

    train = get_preset(name)
    where = "this machine's CPU" if target is None else "bf16, cuDNN attention"
    return Preset(f"one `jaxdec train lm --preset {name}` step ({where})",
                  dataclasses.asdict(train.target), (train.batch_size,), train.seq_len,
                  ("auto",), target, program="train", train_preset=name)


@contextlib.contextmanager
def assumed_cudnn(assume: bool):
    """Inside, jaxdec takes cuDNN's fused attention as usable without running its probe, and
    jax's cuDNN lowering sees CUDNN_VERSION (a compile-only device has no cuDNN to ask)."""
    if not assume:
        yield
        return
    from jax._src.cudnn import fused_attention_stablehlo

    from jaxdec.models import layers

    saved = layers._probe_fused_causal, fused_attention_stablehlo.check_cudnn_version
    layers._probe_fused_causal = lambda *args: True
    major, minor, patch = CUDNN_VERSION
    fused_attention_stablehlo.check_cudnn_version = lambda: major * 10000 + minor * 100 + patch
    try:
        yield
    finally:
        layers._probe_fused_causal, fused_attention_stablehlo.check_cudnn_version = saved


def compile_train(train_preset: str, layers: int, devices) -> str:
    """The compiled HLO text of one training step of a `jaxdec.train` preset's target with
    `layers` layers (bf16 compute on a GPU, fp32 on a CPU, as `jaxdec train lm` runs)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jaxdec
    from jaxdec.train import lm, loop
    from jaxdec.train.presets import get_preset

    train = get_preset(train_preset)
    shape = dataclasses.replace(train.target, num_layers=layers)
    config = shape.config(train.vocab_size, train.max_positions, 0)
    mesh = jaxdec.make_mesh(devices=devices)
    params = jaxdec.abstract_model(config, dtype=jnp.float32, mesh=mesh).params
    optimizer = loop.make_optimizer(learning_rate=train.target_learning_rate,
                                    steps=train.target_steps, warmup_steps=1,
                                    weight_decay=train.weight_decay, grad_clip=train.grad_clip)
    replicated = NamedSharding(mesh, P())
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), "params": params,
             "opt_state": jax.tree.map(
                 lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                 jax.eval_shape(optimizer.init, params))}
    batch = jax.ShapeDtypeStruct((train.batch_size, train.seq_len + 1), jnp.int32,
                                 sharding=replicated)
    dtype = jnp.float32 if devices[0].platform == "cpu" else jnp.bfloat16
    step = lm.make_lm_step(config, mesh, optimizer, dtype)
    return jax.jit(step).lower(state, batch).compile().as_text()


def train_census(preset: Preset, devices, compile_only: bool, layers: int = 2) -> list[dict]:
    """One record: a training step's kernels and their bytes, per layer (programs of
    `layers` and `layers + 1` layers) and for the whole step."""
    with assumed_cudnn(compile_only):
        steps = [entry_kernels(compile_train(preset.train_preset, n, devices))
                 for n in (layers, layers + 1)]
    counts = [collections.Counter(category(n, k) for n, k, _ in step) for step in steps]
    nbytes = [collections.Counter() for _ in steps]
    for total, step in zip(nbytes, steps):
        for name, kind, size in step:
            total[category(name, kind)] += size
    full = preset.model["num_layers"]
    per_layer = len(steps[1]) - len(steps[0])
    layer_bytes = {c: nbytes[1][c] - nbytes[0][c] for c in ("matmul", "attention", "element-wise")}
    own_bytes = {c: nbytes[0][c] - layers * layer_bytes[c] for c in layer_bytes}
    return [dict(
        batch=preset.batch_sizes[0], attention=preset.attention[0], prompt_len=preset.prompt_len,
        program="train", layers=full, kernels_per_layer=per_layer,
        per_layer_by_category={c: counts[1][c] - counts[0][c] for c in layer_bytes},
        step_own_kernels=len(steps[0]) - layers * per_layer,
        kernels_per_step=len(steps[0]) + (full - layers) * per_layer,
        per_layer_gb={c: round(b / 1e9, 3) for c, b in layer_bytes.items()},
        step_gb_by_category={c: round((own_bytes[c] + full * layer_bytes[c]) / 1e9, 2)
                             for c in layer_bytes},
    )]


def compile_decode(model_fields: dict, layers: int, batch: int, prompt_len: int, attention: str,
                   devices, new_tokens: int = 128, program: str = "generate",
                   draft: dict | None = None) -> str:
    """The compiled HLO text of `jaxdec.generate`'s program for these shapes (`program`
    "lookup": `jaxdec.speculative_generate`'s with prompt lookup; "retrieval": with retrieval
    from a datastore of `RETRIEVAL_TOKENS`; "draft": with a draft model of the fields `draft`
    changes, on chain(4))."""
    import jax.numpy as jnp

    import jaxdec
    from bench.decode import _prompts
    from jaxdec.drafters import DraftModel, PromptLookup

    fields = dict(model_fields, num_layers=layers, rope=jaxdec.RopeConfig(**model_fields["rope"]))
    config = jaxdec.ModelConfig(model_type="llama", dtype="bfloat16", **fields)
    mesh = jaxdec.make_mesh(devices=devices)
    model = jaxdec.abstract_model(config, dtype=jnp.bfloat16, mesh=mesh).with_attention(attention)
    prompts = _prompts(config.vocab_size, batch, prompt_len)
    if program == "lookup":
        return jaxdec.speculative_generate(model, PromptLookup(), prompts,
                                           max_new_tokens=new_tokens,
                                           compile_only=True).as_text()
    if program == "retrieval":
        return jaxdec.speculative_generate(model, shaped_retrieval(RETRIEVAL_TOKENS), prompts,
                                           max_new_tokens=new_tokens,
                                           compile_only=True).as_text()
    if program == "draft":
        small = config.replace(**draft)
        drafter = DraftModel(jaxdec.abstract_model(small, dtype=jnp.bfloat16, mesh=mesh)
                             .with_attention(attention))
        return jaxdec.speculative_generate(model, drafter, prompts, max_new_tokens=new_tokens,
                                           tree=jaxdec.tree.chain(4),
                                           compile_only=True).as_text()
    return jaxdec.generate(model, prompts, max_new_tokens=new_tokens, compile_only=True).as_text()


# About the tokens of gpu-small's training corpus (96 MB of text): the datastore's size is the
# only shape of a retrieval step it sets (its binary searches take log2(size) steps).
RETRIEVAL_TOKENS = 25_000_000


def shaped_retrieval(size: int):
    """A `Retrieval` drafter (default settings) whose datastore of `size` tokens is shapes only:
    it compiles programs, builds nothing."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdec.drafters import Retrieval

    tiny = Retrieval(np.arange(8, dtype=np.int32))
    tail = tiny.tokens.shape[0] - tiny.suffixes.shape[0]  # the sentinel tail past the stream
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tiny), [
        jax.ShapeDtypeStruct((size + tail,), jnp.int32), jax.ShapeDtypeStruct((size,), jnp.int32)])


def census(preset: Preset, devices, compile_only: bool, layers: int = 2) -> list[dict]:
    """One record per (batch size, attention): kernels per layer (by category and by kind)
    and the step's own, from programs of `layers` and `layers + 1` layers."""
    records = []
    for attention in preset.attention:
        for batch in preset.batch_sizes:
            loops = [decode_loop(compile_decode(preset.model, n, batch, preset.prompt_len,
                                                attention, devices, program=preset.program,
                                                draft=preset.draft))
                     for n in (layers, layers + 1)]
            counts = [collections.Counter(category(*k) for k in loop) for loop in loops]
            kinds = [collections.Counter(kind for _, kind in loop) for loop in loops]
            per_layer = len(loops[1]) - len(loops[0])
            layer_kinds = {k: kinds[1][k] - kinds[0][k] for k in kinds[1]
                           if kinds[1][k] != kinds[0][k]}
            full = preset.model["num_layers"]
            own = len(loops[0]) - layers * per_layer
            records.append(dict(
                batch=batch, attention=attention, prompt_len=preset.prompt_len,
                kernels_per_layer=per_layer,
                per_layer_by_category={c: counts[1][c] - counts[0][c] for c in
                                       ("matmul", "attention", "element-wise")},
                per_layer_by_kind=layer_kinds, step_own_kernels=own, program=preset.program,
                kernels_per_step=own + full * per_layer, layers=full))
    return records


def render_markdown(records: list[dict]) -> str:
    """One table, a row per record (each names its preset, program, compile and commit)."""
    lines = ["# Kernel census", "",
             "Kernels of one step of a compiled generate loop (the loop's body), counted from "
             "the program's HLO: no kernel was run or timed. `generate`: plain decoding; "
             "`lookup`: a speculative step with prompt lookup; `retrieval`: one with "
             "retrieval (a datastore of ~25M tokens); `draft`: one with a draft "
             "model on chain(4) (its levels' kernels in the step's own). Per layer (of the "
             "target) = the difference between programs of 3 and 2 layers; the step's own = "
             "the rest.", "",
             "| preset | program | batch | attention | kernels per layer | matmul | attention "
             "| element-wise | step's own | per step (all layers) | compiled for | jax | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("program") == "train":
            continue
        c = r["per_layer_by_category"]
        lines.append(f"| {r['preset']} | {r.get('program', 'generate')} | {r['batch']} | "
                     f"{r['attention']} | {r['kernels_per_layer']} | {c['matmul']} | "
                     f"{c['attention']} | {c['element-wise']} | {r['step_own_kernels']} | "
                     f"{r['kernels_per_step']} | {r['device']} ({r['compiled_on']}) | "
                     f"{r['jax_version']} | {r['commit']} |")
    train = [r for r in records if r.get("program") == "train"]
    if train:
        lines += ["", "## Training steps", "",
                  "Kernels of one compiled `jaxdec train lm` step (forward, backward, optimizer) "
                  "and the bytes of their operands and results (GB, summed: an upper bound of "
                  "the step's memory traffic, not a measurement).", "",
                  "| preset | batch x tokens | kernels per layer | matmul | attention | "
                  "element-wise | step's own | per step | GB per step: matmul | attention | "
                  "element-wise | compiled for | jax | commit |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in train:
            c, gb = r["per_layer_by_category"], r["step_gb_by_category"]
            lines.append(f"| {r['preset']} | {r['batch']} x {r['prompt_len']} | "
                         f"{r['kernels_per_layer']} | {c['matmul']} | {c['attention']} | "
                         f"{c['element-wise']} | {r['step_own_kernels']} | "
                         f"{r['kernels_per_step']} | {gb['matmul']} | {gb['attention']} | "
                         f"{gb['element-wise']} | {r['device']} ({r['compiled_on']}) | "
                         f"{r['jax_version']} | {r['commit']} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="h100", choices=sorted(presets()))
    parser.add_argument("--out", type=out_dir, default=None,
                        help="write census-<device>.json and .md here (default: print only); "
                             "records of other presets already there are kept")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    preset = presets()[args.preset]
    import jax

    from bench.common import device_slug
    from jaxdec.models.layers import GPU_BACKENDS

    if preset.target is None:
        devices, compile_only, how = jax.devices("cpu")[:1], False, "this machine's CPU"
    elif jax.default_backend() in GPU_BACKENDS:
        devices, compile_only, how = jax.devices()[:1], False, "this machine's GPU"
    else:
        devices, compile_only, how = compile_only_devices(preset.target), True, \
            "a compile-only device: no GPU, no autotuning"
    device = devices[0].device_kind
    records = (train_census if preset.program == "train" else census)(preset, devices,
                                                                      compile_only)
    run = dict(preset=args.preset, description=preset.description, device=device,
               compiled_on=how, commit=git_commit(), date=utc_now(),
               jax_version=versions()["jax_version"])
    for r in records:
        r.update(run)
    print(render_markdown(records))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"census-{device_slug(device)}"
        write_merged(stem.with_suffix(".json"), records, ("preset", "batch", "attention"),
                     render_markdown, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
