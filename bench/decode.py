"""Greedy decode speed of jaxdec against Hugging Face transformers, on one machine, in one run.

Usage (on the lent GPU machine, one call; results land in $OUT):

    python3 -m pip install --no-deps --no-build-isolation -e . && \\
        python3 bench/decode.py --preset h100 --out $OUT

and on a CPU, in seconds: `python3 bench/decode.py --preset cpu-tiny --out /tmp/bench`.
`--batch-sizes 1,16 --context 2048 --new-tokens 128 --impls jaxdec,hf-eager,hf-compile`
override the preset; `--resume` keeps the impls the output file already holds (same
configuration, every batch size finished; jaxdec's only while the code a decode step runs is
unchanged: its records carry `model_sources`, a hash of it) and runs only the others, so a
call cut short is finished by the next. Writes `decode-<device>.json` (a list of records, one
per impl and batch size) and `decode-<device>.md` (a table) to `--out` (default
`bench/results/`); a call replaces the rows of the impls it runs in its configuration (preset,
context, new tokens) and keeps every other row, each other configuration a table of its own.

What runs
  - `jaxdec`: `jaxdec.generate` on a model with random bf16 weights (`jaxdec.init_model`),
    default attention (the Pallas tree-attention kernel on GPU/TPU).
  - `jaxdec-reference`: the same with the jnp reference attention (`with_attention(
    "reference")`), so the kernel's effect on whole-model decode is measured side by side.
  - `jaxdec-matvec`: `jaxdec` with the layers' projections of a decode step run by the Pallas
    matrix-vector kernel (`with_matmul("pallas")`, `jaxdec.pallas_kernels.matvec`; see also
    `bench/matvec.py`) instead of XLA's fusions.
  - `jaxdec-cublas`: `jaxdec` with XLA's Triton GEMM fusions off
    (`--xla_gpu_enable_triton_gemm=false`: the matrix products go to cuBLAS), in a worker
    of its own (XLA reads its flags once per process): which library's matrix-vector
    products come nearer the bandwidth at batch 1.
  - `jaxdec-graphs`: `jaxdec` with XLA's command buffers (CUDA graphs) extended to while
    loops and conditionals (`--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL`), in a
    worker of its own: whether launching the decode loop's short kernels as graphs, with
    the loop's condition on the device, closes part of the gap to the roofline.
  - `hf-eager`: `LlamaForCausalLM.generate` with the default dynamic cache.
  - `hf-compile`: the same with `cache_implementation="static"` and torch.compile
    (mode="reduce-overhead", fullgraph=True). Where transformers' `generate` compiles the
    decode step itself (it does with a static cache on CUDA, configured by `CompileConfig`),
    we configure that; on older versions we set `model.forward = torch.compile(...)`, the
    recipe their docs give. The record's `notes` say which was used.
  Both sides get the same config, the same random prompts and greedy decoding with no stop
  token, so every row produces exactly `new_tokens` tokens.

Context
  `context` is the average number of cached tokens a decode step attends to: the prompt has
  `context - new_tokens // 2` tokens, so over the `new_tokens - 1` decode steps the KV length
  averages `context` (the h100 preset: a 1984-token prompt + 128 new tokens = context 2048).

Timing (compile excluded; median over `--repeats` runs after `--warmup` runs)
  - jaxdec: `GenerateResult.decode_s`, stamped inside the compiled program from the first
    token to the last. Each batch size's program compiles (`--compile-ahead` threads, on by
    default on an accelerator) while the random weights are drawn, before anything is
    measured; records carry `compile_ahead_s` and `first_call_compiles` (0 when ahead).
  - transformers: a streamer receives the prompt, then each new token as it reaches the host
    (`generate` copies it with `.cpu()`, which waits for the device). decode = last token's
    arrival - first token's arrival; prefill = first token's arrival - the prompt's (this
    includes generate's setup, e.g. allocating the static cache).
  tokens_per_s = batch * (new_tokens - 1) / decode; step_ms = decode / (new_tokens - 1).

Bytes per step and the roofline
  Each decode step must read every weight once and the KV cache up to the current length:

      weight_bytes = param_bytes - embed_bytes + batch * hidden * 2   (untied embeddings:
                     lm_head is read whole, the embedding gather reads only `batch` rows)
      weight_bytes = param_bytes                                      (tied: the table is read
                     once, as the output projection)
      kv_bytes     = 2 (k and v) * layers * batch * context * kv_heads * head_dim * 2
      bytes_per_step = weight_bytes + kv_bytes                         (bf16: 2 bytes/value)

  param_bytes counts every parameter (norms included) of the Llama-family layout (each record
  also has `param_bytes` as the impl counted its own model: they agree); writing the
  new token's K/V (2 * layers * batch * kv_heads * head_dim * 2 bytes) is left out. These are
  the bytes a step cannot avoid: whatever an implementation reads beyond them (e.g. attention
  over unused cache slots) shows up as a lower hbm_fraction. For the h100 preset at batch 1
  that is 15.3 GB, so ~3.0 TB/s gives a roofline of ~196 tokens/s.
  The ceiling `hbm_gbps` is the best memory bandwidth measured in this run: in the jaxdec
  workers, `bench.common.measure_hbm`'s two JAX probes (`x + 1`, bytes = read + write, and a
  read-only `sum`, each timed per pass inside one jitted loop) and, in the transformers
  workers, torch `dst.copy_(src)` (read + write). Then

      achieved_gbps         = bytes_per_step / step time
      hbm_fraction          = achieved_gbps / hbm_gbps
      roofline_tokens_per_s = batch * hbm_gbps / bytes_per_step

  (hbm_fraction is also tokens_per_s / roofline_tokens_per_s.)

  Where the time goes: after its timed runs, each jaxdec batch size runs once more under the
  JAX profiler (`--no-profile` skips it); the record's `profile` holds that run's summed
  device kernel time against its wall time and the kernels longest in total, and the table's
  notes quote them. The timings never come from the traced run.

Process layout
  Worker subprocesses (this file with `--worker`) run one after the other in the order
  `--impls` gives (the riskiest, hf-compile, last by default): the jaxdec impls share one
  (one set of weights, one ceiling measurement, all their programs compiled side by side;
  the attention path is the model's `with_attention`; an impl with XLA flags has its own),
  each transformers impl has its own.
  A crash, an out-of-memory error or a hang in one costs only its own records; JAX's
  preallocated GPU memory pool and torch's caching allocator never share the device; the
  16 GB model never exists twice. Workers append JSON events to a file; the parent turns
  them into records and rewrites both outputs after every worker, so a run cut short still
  leaves the finished impls' results. `--budget-s` bounds the workers' total wall time (a
  worker still running when it runs out is killed and its missing batch sizes are recorded
  as errors).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    CompileAhead, counting_compiles, default_compile_workers, device_name, device_slug, git_commit,
    measure_hbm, out_dir, MODEL_SOURCES, profile_kernels, SHORT_KERNEL_US, sources_digest,
    keep_measured, kept_note, read_records, replace_text, versions)

IMPLS = ("jaxdec", "jaxdec-reference", "jaxdec-matvec", "jaxdec-cublas", "jaxdec-graphs",
         "hf-eager", "hf-compile")
# jaxdec's attention per impl: AUTO runs the Pallas tree-attention kernel on GPU/TPU.
JAXDEC_ATTENTION = {"jaxdec": "auto", "jaxdec-reference": "reference", "jaxdec-matvec": "auto",
                    "jaxdec-cublas": "auto", "jaxdec-graphs": "auto"}
# jaxdec's projections per impl (`Model.with_matmul`; XLA's product where not named):
# jaxdec-matvec runs a decode step's projections through the Pallas matrix-vector kernel.
JAXDEC_MATMUL = {"jaxdec-matvec": "pallas"}
# XLA flags of a jaxdec impl's worker (an impl with flags gets a worker of its own: XLA reads
# them once per process). jaxdec-cublas: the matrix products by cuBLAS instead of XLA's Triton
# GEMM fusions, whose decode matrix-vector products ran at 64% (q|k|v) to 93% (down) of the
# bandwidth on the H200 (commit bff28a8's profile). jaxdec-graphs: XLA's command buffers
# (CUDA graphs) also take while loops and conditionals, so the decode loop can run as graphs
# with its condition evaluated on the device: a batch-1 step is ~14 kernels per layer, most of
# them a few microseconds long, and the H200 profile left 1.18 ms of a 4.62 ms step between
# the kernels' bytes and the step.
JAXDEC_XLA_FLAGS = {"jaxdec-cublas": "--xla_gpu_enable_triton_gemm=false",
                    "jaxdec-graphs": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"}
GOAL_FRACTION = 0.85  # the issue's goal: jaxdec at batch 1 reaches 85% of the roofline
# A step faster than streaming its bytes at the measured ceiling (beyond noise) is a timing
# error, never a result: the record gets an error, so the next call measures it again.
PLAUSIBLE_FRACTION = 1.05
BF16_BYTES = 2
MEMORY_BOUND_INTENSITY = 100  # FLOP/byte; GPUs balance at a few hundred
PROMPT_SEED = 0

_LLAMA3_ROPE = dict(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                 num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                 max_position_embeddings=131072, tie_word_embeddings=False, rope=_LLAMA3_ROPE)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=131072,
            tie_word_embeddings=False, rope=_LLAMA3_ROPE)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A benchmark configuration (the command line overrides batch sizes, context, new tokens,
    impls and budget)."""

    description: str
    model: dict  # ModelConfig fields (llama), `rope` as a dict of RopeConfig fields
    batch_sizes: tuple[int, ...]
    context: int
    new_tokens: int
    impls: tuple[str, ...]
    copy_mib: int  # size of the array the bandwidth measurement copies
    budget_s: float | None  # total wall time for the workers (None: unbounded)


PRESETS = {
    "h100": Preset(
        description="Llama-3-8B-shaped model, random bf16 weights",
        model=LLAMA3_8B, batch_sizes=(1, 16), context=2048, new_tokens=128,
        impls=IMPLS, copy_mib=1024,
        budget_s=520,  # the device call allows 600 s, pip install and startup included
    ),
    "cpu-tiny": Preset(
        description="tiny Llama-shaped model (2 layers, width 64), random bf16 weights",
        model=TINY, batch_sizes=(1, 2), context=64, new_tokens=8,
        impls=("jaxdec", "hf-eager"),  # torch.compile on a CPU takes minutes: ask for it
        copy_mib=64, budget_s=None,
    ),
}


# ------------------------------------------------------------------ roofline arithmetic


def param_count(model: dict) -> int:
    """Parameters of the Llama-family layout (no biases): embedding, per layer q/k/v/o, the
    gated MLP and two norms, the final norm, and lm_head unless the embeddings are tied."""
    E, F, V = model["hidden_size"], model["intermediate_size"], model["vocab_size"]
    H, K, D = model["num_heads"], model["num_kv_heads"], model["head_dim"]
    per_layer = E * H * D * 2 + E * K * D * 2 + 3 * E * F + 2 * E
    lm_head = 0 if model["tie_word_embeddings"] else E * V
    return V * E + model["num_layers"] * per_layer + E + lm_head


def model_config(model: dict):
    """The jaxdec.ModelConfig of a preset's model fields."""
    from jaxdec import ModelConfig, RopeConfig

    return ModelConfig(model_type="llama", dtype="bfloat16",
                       **dict(model, rope=RopeConfig(**model["rope"])))


def bytes_per_step(model: dict, batch: int, context: int) -> dict[str, int]:
    """The bytes a decode step must read (see the module docstring): weights and KV cache
    (`jaxdec.benchmark.decode_step_bytes`)."""
    from jaxdec.benchmark import decode_step_bytes

    need = decode_step_bytes(model_config(model), batch, context, dtype="bfloat16")
    return {"weight_bytes": need.weights, "kv_bytes": need.kv, "bytes_per_step": need.total}


def flops_per_step(model: dict, batch: int, context: int) -> int:
    """Matmul FLOPs of one decode step (2 per weight per row, plus attention scores and
    values over `context` keys); for the arithmetic intensity only."""
    matmul_params = param_count(model) - model["vocab_size"] * model["hidden_size"]
    if model["tie_word_embeddings"]:
        matmul_params += model["vocab_size"] * model["hidden_size"]
    attention = 4 * model["num_layers"] * model["num_heads"] * model["head_dim"] * context
    return batch * (2 * matmul_params + attention)


def add_roofline(record: dict, model: dict, hbm_gbps: float | None) -> dict:
    """Fills the bandwidth fields of a record that has `step_ms` (None where unknown)."""
    out = dict(record, **bytes_per_step(model, record["batch"], record["context"]))
    step_s = None if out.get("step_ms") is None else out["step_ms"] / 1e3
    achieved = None if not step_s else out["bytes_per_step"] / step_s / 1e9
    out["achieved_gbps"] = achieved
    out["hbm_gbps"] = hbm_gbps
    out["hbm_fraction"] = achieved / hbm_gbps if achieved and hbm_gbps else None
    out["roofline_tokens_per_s"] = (
        out["batch"] * hbm_gbps * 1e9 / out["bytes_per_step"] if hbm_gbps else None
    )
    if (out["hbm_fraction"] or 0) > PLAUSIBLE_FRACTION and not out.get("error"):
        out["error"] = (f"implausible: {out['hbm_fraction']:.0%} of the measured HBM ceiling "
                        "(the step or the ceiling was mistimed)")
    return out


# ------------------------------------------------------------------ workers (subprocesses)


def _prompts(vocab_size: int, batch: int, length: int):
    """The same random prompts for every impl: [batch][length] ids
    (`jaxdec.benchmark.random_prompts`)."""
    from jaxdec.benchmark import random_prompts

    return random_prompts(vocab_size, batch, length, seed=PROMPT_SEED)


def _check_tokens(shape: tuple, batch: int, new_tokens: int) -> None:
    if tuple(shape) != (batch, new_tokens):
        raise RuntimeError(f"expected {batch} x {new_tokens} new tokens, got shape {shape}")


def _timed_runs(run: Callable[[], tuple[float, float]], warmup: int, repeats: int) -> dict:
    """Calls `run` (-> prefill_s, decode_s) warmup + repeats times; medians of the timed runs."""
    for _ in range(warmup):
        run()
    timings = [run() for _ in range(repeats)]
    return {"prefill_s": statistics.median(t[0] for t in timings),
            "decode_s": statistics.median(t[1] for t in timings),
            "decode_s_runs": [t[1] for t in timings]}


def _best_seconds(step: Callable[[], None], sync: Callable[[], None], *, trials: int = 5,
                  iters: int = 10) -> float:
    """The fastest per-call time of `step` over `trials` bursts of `iters` calls."""
    step()
    sync()
    best = math.inf
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def run_jaxdec(spec: dict, emit: Callable[..., None], impls: list[str]) -> None:
    """The jaxdec impls (attention paths) of `impls`, in one process: one set of weights and
    one ceiling measurement, every (impl, batch size) program compiled side by side first.
    Events of one impl carry its name."""
    import jax
    import jax.numpy as jnp
    import jaxdec

    emit("env", device=jax.devices()[0].device_kind, platform=jax.default_backend())
    config = model_config(spec["model"])
    N = spec["new_tokens"]
    # Every program compiles in a thread while the weights are drawn; nothing is measured
    # until they are done.
    workers = spec.get("compile_ahead")
    workers = default_compile_workers() if workers is None else workers
    ahead = CompileAhead(workers, log=lambda line: emit("log", line=line))
    shapes = jaxdec.abstract_model(config, dtype=jnp.bfloat16)
    for impl in impls:
        for batch in spec["batch_sizes"]:
            prompts = _prompts(config.vocab_size, batch, spec["prompt_len"])
            ahead.submit((impl, batch), functools.partial(
                jaxdec.generate, shapes.with_attention(JAXDEC_ATTENTION[impl]).with_matmul(
                    JAXDEC_MATMUL.get(impl, "xla")), prompts,
                max_new_tokens=N, return_timings=True, compile_only=True))
    model = jaxdec.init_model(config, jax.random.PRNGKey(0), dtype=jnp.bfloat16)
    jax.block_until_ready(model.params)
    emit("phase", name="weights drawn")
    ahead.wait()
    ahead.close()
    emit("phase", name="programs compiled")
    for source, gbps in measure_hbm(spec["copy_mib"] << 20).items():
        emit("bandwidth", source=f"{source} (fp32, in a loop)", gbps=gbps)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    for impl in impls:
        attention, matmul = JAXDEC_ATTENTION[impl], JAXDEC_MATMUL.get(impl, "xla")
        for batch in spec["batch_sizes"]:
            _time_jaxdec(model.with_attention(attention).with_matmul(matmul), impl, batch, spec,
                         emit, ahead,
                         notes=f"jaxdec.generate, attention={attention}" + (
                             f", matmul={matmul}" if matmul != "xla" else "") + (
                             f", XLA_FLAGS {JAXDEC_XLA_FLAGS[impl]}"
                             if impl in JAXDEC_XLA_FLAGS else ""),
                         param_bytes=param_bytes)


def _time_jaxdec(model, impl: str, batch: int, spec: dict, emit, ahead, **fields) -> None:
    """One (impl, batch size): the timed runs, then (with `profile`) one traced run."""
    import jaxdec

    N = spec["new_tokens"]
    try:
        prompts = _prompts(model.config.vocab_size, batch, spec["prompt_len"])

        def run():
            res = jaxdec.generate(model, prompts, max_new_tokens=N, return_timings=True)
            _check_tokens(res.tokens.shape, batch, N)
            if not (res.lengths == N).all():
                raise RuntimeError(f"rows stopped early: lengths {res.lengths.tolist()}")
            return res.prefill_s, res.decode_s

        with counting_compiles() as compiles:  # in the first (warmup) call: 0 when ahead
            timed = _timed_runs(run, spec["warmup"], spec["repeats"])
        emit("result", impl=impl, batch=batch, compile_ahead_s=ahead.seconds((impl, batch)),
             first_call_compiles=compiles[0], **fields, **timed)
    except Exception as e:  # one batch size failing (e.g. out of memory) is a record
        emit("error", impl=impl, batch=batch, error=_describe(e))
        return
    if spec.get("profile"):  # after the timed runs: where a step's time goes
        try:
            summary = profile_kernels(run)
        except Exception as e:  # noqa: BLE001  (the timings stand without it)
            summary = dict(error=_describe(e))
        emit("profile", impl=impl, batch=batch, profile=summary)


def _torch_copy_gbps(nbytes: int, device: str) -> float:
    """Bandwidth of torch `dst.copy_(src)` over a bf16 tensor (bytes = read + write)."""
    import torch

    src = torch.ones(nbytes // BF16_BYTES, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = _best_seconds(lambda: dst.copy_(src), sync)
    return 2 * nbytes / seconds / 1e9


def hf_config_kwargs(model: dict) -> dict:
    """`transformers.LlamaConfig` kwargs for the model spec (the 4.x rope layout, which 5.x
    also reads); no bos/eos so greedy decoding never stops early."""
    rope = model["rope"]
    return dict(
        vocab_size=model["vocab_size"], hidden_size=model["hidden_size"],
        intermediate_size=model["intermediate_size"], num_hidden_layers=model["num_layers"],
        num_attention_heads=model["num_heads"], num_key_value_heads=model["num_kv_heads"],
        head_dim=model["head_dim"], rms_norm_eps=model["rms_norm_eps"],
        max_position_embeddings=model["max_position_embeddings"],
        tie_word_embeddings=model["tie_word_embeddings"], hidden_act="silu",
        attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, rope_theta=rope["theta"],
        rope_scaling={key: rope[key] for key in ("rope_type", "factor", "low_freq_factor",
                                                 "high_freq_factor",
                                                 "original_max_position_embeddings")},
        attn_implementation="sdpa",
    )


def _hf_model(model: dict, device: str):
    """A randomly initialised bf16 LlamaForCausalLM, created directly on `device`."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**hf_config_kwargs(model))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            hf = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return hf.to(device=device, dtype=torch.bfloat16).eval()


def _enable_compile(hf, device: str) -> tuple[dict, str]:
    """Static cache + torch.compile, the way this transformers version documents it.
    Returns (GenerationConfig kwargs, a note saying which way was used)."""
    import torch
    import transformers

    compile_config = getattr(transformers, "CompileConfig", None)
    static = {"cache_implementation": "static"}
    if device == "cuda" and compile_config is not None and hasattr(hf, "get_compiled_call"):
        # generate() compiles the decode step itself when the cache is static.
        config = compile_config(fullgraph=True, dynamic=False, mode="reduce-overhead")
        return dict(static, compile_config=config), (
            "static cache; generate() compiles the decode step "
            "(CompileConfig mode=reduce-overhead, fullgraph, dynamic=False)")
    hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True,
                               dynamic=False)
    return static, "static cache; model.forward = torch.compile(mode=reduce-overhead, fullgraph)"


def run_hf(spec: dict, emit: Callable[..., None], *, compiled: bool) -> None:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    emit("env", device=name, platform=device)
    emit("bandwidth", source="torch copy_ (bf16)",
         gbps=_torch_copy_gbps(spec["copy_mib"] << 20, device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    class ArrivalClock(BaseStreamer):
        """Stamps each `put` (the prompt, then each new token on the host)."""

        def __init__(self):
            self.stamps = []

        def put(self, value):
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    hf = _hf_model(spec["model"], device)
    sync()
    emit("phase", name="weights drawn")
    param_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    extra, notes = _enable_compile(hf, device) if compiled else ({}, "dynamic cache, eager")
    N = spec["new_tokens"]
    generation = transformers.GenerationConfig(
        max_new_tokens=N, do_sample=False, eos_token_id=None, bos_token_id=None,
        pad_token_id=0, **extra)
    # reduce-overhead records CUDA graphs over the first calls: warm up at least twice.
    warmup = max(spec["warmup"], 2) if compiled else spec["warmup"]
    for batch in spec["batch_sizes"]:
        try:
            ids = torch.as_tensor(_prompts(spec["model"]["vocab_size"], batch,
                                           spec["prompt_len"]), device=device)
            mask = torch.ones_like(ids)

            def run():
                clock = ArrivalClock()
                sync()
                out = hf.generate(input_ids=ids, attention_mask=mask,
                                  generation_config=generation, streamer=clock)
                sync()
                _check_tokens((out.shape[0], out.shape[1] - ids.shape[1]), batch, N)
                if len(clock.stamps) != N + 1:
                    raise RuntimeError(f"the streamer saw {len(clock.stamps) - 1} of {N} tokens")
                return clock.stamps[1] - clock.stamps[0], clock.stamps[-1] - clock.stamps[1]

            emit("result", batch=batch, notes=notes, param_bytes=param_bytes,
                 **_timed_runs(run, warmup, spec["repeats"]))
        except Exception as e:  # one batch size failing (e.g. out of memory) is a record
            emit("error", batch=batch, error=_describe(e))
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()


def _describe(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 500 else text[:497] + "..."


def worker_main(impls: tuple[str, ...], spec: dict, events_path: str) -> int:
    """Runs one transformers impl, or the jaxdec impls together, appending JSON events to
    `events_path`."""
    label = ",".join(impls)

    started = time.monotonic()

    def emit(event: str, **fields):
        elapsed = round(time.monotonic() - started, 1)
        with open(events_path, "a") as f:
            f.write(json.dumps({"event": event, "t": elapsed, **fields}) + "\n")
        # A timeline in the output (the device log), so a slow phase shows where time went.
        brief = ", ".join(f"{k}={v}" for k, v in fields.items() if not isinstance(v, list))
        print(f"[decode {label} +{elapsed:.0f} s] {event}: {brief}"[:300], flush=True)

    try:
        if all(impl in JAXDEC_ATTENTION for impl in impls):
            run_jaxdec(spec, emit, list(impls))
        elif len(impls) == 1:
            run_hf(spec, emit, compiled=impls[0] == "hf-compile")
        else:
            raise ValueError(f"only the jaxdec impls share a worker, got {label}")
    except Exception as e:  # a failure before the first batch: every batch gets it
        emit("error", batch=None, error=_describe(e))
        raise
    return 0


# ------------------------------------------------------------------ orchestration


def _worker_env(impls: list[str]) -> dict:
    env = dict(os.environ)
    flags = JAXDEC_XLA_FLAGS.get(impls[0])
    if flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    if impls[0] not in JAXDEC_ATTENTION:  # in case anything imports jax next to torch: no preallocated pool
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def worker_units(impls) -> list[list[str]]:
    """The workers to start, in order: consecutive jaxdec impls with the same XLA flags
    share one (one model, their programs compiled together); each transformers impl has its
    own."""
    units: list[list[str]] = []
    for impl in impls:
        if (impl in JAXDEC_ATTENTION and units and units[-1][0] in JAXDEC_ATTENTION
                and JAXDEC_XLA_FLAGS.get(impl) == JAXDEC_XLA_FLAGS.get(units[-1][0])):
            units[-1].append(impl)
        else:
            units.append([impl])
    return units


def run_worker(impls: list[str], spec: dict, timeout_s: float | None
               ) -> tuple[list[dict], str | None]:
    """Runs a worker unit in a subprocess; returns its events and why it ended badly (or
    None)."""
    with tempfile.TemporaryDirectory() as tmp:
        events_path = os.path.join(tmp, "events.jsonl")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(impls),
               "--spec", json.dumps(spec), "--events", events_path]
        # Its own process group, so a timeout also ends compile helpers it started.
        proc = subprocess.Popen(cmd, env=_worker_env(impls), start_new_session=True)
        failure = None
        try:
            rc = proc.wait(timeout=timeout_s)
            if rc != 0:
                failure = f"worker exited with code {rc}"
        except subprocess.TimeoutExpired:
            failure = f"timed out after {timeout_s:.0f} s"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return _read_events(events_path), failure


def _read_events(path: str) -> list[dict]:
    events = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut off when the worker was killed
                    pass
    return events


def impl_records(impl: str, events: list[dict], failure: str | None, spec: dict,
                 common: dict) -> list[dict]:
    """One record per batch size from a worker's events (without the bandwidth fields): the
    events naming `impl`, and those naming no impl (the worker's, e.g. its device; without
    one, as when the worker died before it said, `common`'s device)."""
    events = [e for e in events if e.get("impl") in (None, impl)]
    env = next((e for e in events if e["event"] == "env"), {})
    results = {e["batch"]: e for e in events if e["event"] == "result"}
    errors = {e["batch"]: e["error"] for e in events if e["event"] == "error"}
    profiles = {e["batch"]: e["profile"] for e in events if e["event"] == "profile"}
    steps = spec["new_tokens"] - 1
    records = []
    for batch in spec["batch_sizes"]:
        record = dict(impl=impl, batch=batch, **common)
        record.update(device=env.get("device") or common.get("device"),
                      tokens_per_s=None, step_ms=None, prefill_s=None, decode_s=None,
                      param_bytes=None, error=None, notes=None)
        result = results.get(batch)
        if result is not None:
            decode_s = result["decode_s"]
            record.update(tokens_per_s=batch * steps / decode_s, step_ms=decode_s / steps * 1e3,
                          prefill_s=result["prefill_s"], decode_s=decode_s,
                          decode_s_runs=result["decode_s_runs"],
                          param_bytes=result["param_bytes"], notes=result["notes"])
            for field in ("compile_ahead_s", "first_call_compiles"):  # jaxdec impls only
                if field in result:
                    record[field] = result[field]
            if batch in profiles:
                record["profile"] = profiles[batch]
        else:
            record["error"] = errors.get(batch) or errors.get(None) or failure or "no result"
        if impl in JAXDEC_ATTENTION:  # which code it ran (or failed to run)
            record["model_sources"] = sources_digest(MODEL_SOURCES)
        records.append(record)
    return records


def hbm_ceiling(bandwidths: dict[str, float]) -> float | None:
    return max(bandwidths.values()) if bandwidths else None


def _fmt(value, spec: str = ".1f") -> str:
    return "–" if value is None else f"{value:{spec}}"


def _pct(fraction) -> str:
    return "–" if fraction is None else f"{100 * fraction:.1f}%"


def _fmt_gbps(value) -> str:
    return "–" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _ratio(a, b) -> str:
    return "–" if not a or not b else f"{a / b:.2f}x"


def _runs_line(records: list[dict]) -> str:
    """When and from what each impl's rows were measured: `--resume` keeps rows of earlier
    calls, so one table can hold several runs."""
    runs: dict[tuple, list[str]] = {}
    for r in records:
        key = tuple(r.get(k) for k in ("date", "commit", "jax_version", "torch_version",
                                        "transformers_version"))
        if r["impl"] not in runs.setdefault(key, []):
            runs[key].append(r["impl"])
    parts = [f"{', '.join(impls)}: run {date}, jax {jax_v}, torch {torch_v}, transformers "
             f"{hf_v}, commit {commit}"
             for (date, commit, jax_v, torch_v, hf_v), impls in runs.items()]
    return ("; ".join(parts) or "No runs") + "."


def render_markdown(records: list[dict], bandwidths: dict[str, float], meta: dict) -> str:
    """The results table, the bandwidths, the bytes per step and what bounds decode speed."""
    model, ceiling = meta["model"], hbm_ceiling(bandwidths)
    by_key = {(r["impl"], r["batch"]): r for r in records}
    devices = sorted({r["device"] for r in records if r["device"]})
    lines = [
        f"# Greedy decode: jaxdec vs transformers on {', '.join(devices) or 'an unknown device'}",
        "",
        f"Preset `{meta['preset']}`: {meta['description']}; context {meta['context']} (prompt "
        f"{meta['prompt_len']} + {meta['new_tokens']} new tokens, so decode attends to "
        f"{meta['context']} cached tokens on average); median of {meta['repeats']} runs after "
        f"warm-up; tokens/s are decode tokens summed over the batch. {_runs_line(records)}",
        "",
        meta.get("bandwidth_label", "Memory bandwidth measured in this run") + ": "
        + (", ".join(f"{src} {_fmt_gbps(gbps)} GB/s" for src, gbps in sorted(bandwidths.items()))
           or "none")
        + (f"; the ceiling used is the best, {_fmt_gbps(ceiling)} GB/s." if ceiling else "."),
        "",
        "| impl | batch | tokens/s | step ms | prefill s | GB/s | HBM fraction "
        "| roofline tokens/s | vs hf-eager | vs hf-compile |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        eager = by_key.get(("hf-eager", r["batch"]), {}).get("tokens_per_s")
        compiled = by_key.get(("hf-compile", r["batch"]), {}).get("tokens_per_s")
        lines.append(
            f"| {r['impl']} | {r['batch']} | {_fmt(r['tokens_per_s'])} "
            f"| {_fmt(r['step_ms'], '.2f')} | {_fmt(r['prefill_s'], '.3f')} "
            f"| {_fmt_gbps(r['achieved_gbps'])} | {_pct(r['hbm_fraction'])} "
            f"| {_fmt(r['roofline_tokens_per_s'])} | {_ratio(r['tokens_per_s'], eager)} "
            f"| {_ratio(r['tokens_per_s'], compiled)} |"
        )
    failed = [r for r in records if r["error"]]
    if failed:
        lines += ["", "Failures:", ""]
        lines += [f"- {r['impl']} batch {r['batch']}: {r['error']}" for r in failed]
    notes = sorted({(r["impl"], r["notes"]) for r in records if r["notes"]})
    if notes:
        lines += ["", "How each impl ran: " + "; ".join(f"{i}: {n}" for i, n in notes) + "."]
    lines += ["", "## What bounds decode speed", ""]
    for batch in meta["batch_sizes"]:
        lines.append(_bound_line(model, batch, meta["context"], ceiling,
                                 by_key.get(("jaxdec", batch))))
    lines += ["", _goal_line(by_key.get(("jaxdec", 1)))]
    return "\n".join(lines) + "\n"


def _bound_line(model: dict, batch: int, context: int, ceiling: float | None,
                jaxdec: dict | None) -> str:
    sizes = bytes_per_step(model, batch, context)
    intensity = flops_per_step(model, batch, context) / sizes["bytes_per_step"]
    memory_bound = intensity < MEMORY_BOUND_INTENSITY
    line = (f"- Batch {batch}: a step reads {sizes['weight_bytes'] / 1e9:.3g} GB of weights and "
            f"{sizes['kv_bytes'] / 1e9:.3g} GB of KV cache and does {intensity:.0f} FLOP per "
            "byte read; current GPUs do hundreds of FLOPs per byte of HBM bandwidth (H100: "
            "~780 TFLOP/s over ~3 TB/s), so "
            + ("memory bandwidth, not compute, bounds the step." if memory_bound
               else "compute may bound the step as much as memory does."))
    if ceiling and jaxdec and jaxdec.get("step_ms"):
        floor_ms = sizes["bytes_per_step"] / (ceiling * 1e9) * 1e3
        gap = jaxdec["step_ms"] - floor_ms
        line += (f" Streaming those bytes at {_fmt_gbps(ceiling)} GB/s takes {floor_ms:.2f} ms; "
                 f"jaxdec's step takes {jaxdec['step_ms']:.2f} ms, so {gap:.2f} ms per step "
                 f"({100 * gap / jaxdec['step_ms']:.0f}%) goes to something other than reading "
                 "memory at full speed.")
    profile = (jaxdec or {}).get("profile")
    if profile:
        line += " " + _profile_text(profile)
    return line


def _profile_text(profile: dict) -> str:
    """One traced run (prefill and every step) of jaxdec: kernel time and the top kernels."""
    if profile.get("error"):
        return f"(No kernel profile: {profile['error']}.)"
    top = "; ".join(f"`{k['name']}` {k['ms']:.1f} ms x{k['calls']}" for k in profile["kernels"])
    counts = ""
    if profile.get("events") is not None:
        counts = (f" {profile['events']} kernels ran, {profile['short_events']} of them shorter "
                  f"than {SHORT_KERNEL_US:g} us ({profile['short_s']:.3f} s in all).")
    if profile.get("run_s") is not None:
        of_wall = (f" of the call's {profile['run_s']:.3f} s wall (the rest: launch gaps and "
                   "host work)")
    else:  # records before 2026-11-29 timed the profiler's start and stop too ("wall_s")
        of_wall = ""
    return (f"In one traced run (prefill and all steps) the device's kernels ran "
            f"{profile['kernel_s']:.3f} s{of_wall}.{counts} The longest kernels in total: "
            f"{top}.")


def _goal_line(record: dict | None) -> str:
    goal = f"Goal: jaxdec at batch 1 reaches >= {GOAL_FRACTION:.0%} of the roofline"
    if not record or record.get("hbm_fraction") is None:
        return goal + ": not measured in this run."
    if record.get("error"):
        return goal + ": no valid measurement in this run (see the errors above)."
    met = "met" if record["hbm_fraction"] >= GOAL_FRACTION else "not met"
    return (f"{goal}: measured {record['hbm_fraction']:.1%} "
            f"({record['tokens_per_s']:.1f} of {record['roofline_tokens_per_s']:.1f} tokens/s), "
            f"{met}.")


CONFIG_FIELDS = ("preset", "context", "new_tokens")  # one table of the results file


def _config(record: dict) -> tuple:
    return tuple(record.get(k) for k in CONFIG_FIELDS)


def write_outputs(out_dir: Path, records: list[dict], bandwidths: dict[str, float],
                  meta: dict, pending: Sequence[str] = ()) -> tuple[Path, Path]:
    """Writes decode-<device>.json and .md; returns their paths. `records` (this call's
    configuration) replace the file's rows of that configuration, but those of the impls
    still `pending` in this call (kept as they are until their run replaces them); rows of
    other configurations (preset, context, new tokens) are kept, each configuration a table
    of its own after this call's."""
    slug = device_slug(next((r["device"] for r in records if r["device"]), None))
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"decode-{slug}.json", out_dir / f"decode-{slug}.md"
    this = {_config(r) for r in records}
    old = read_records(json_path)
    others = [r for r in old if _config(r) not in this]
    # A row this call's budget cut keeps the figures an earlier call measured (stale ones
    # too: `kept_records` left them out, and a time-out must not erase them).
    records = keep_measured(old, records, lambda r: (_config(r), r.get("impl"), r.get("batch")))
    records += [r for r in old if _config(r) in this and r.get("impl") in pending]
    replace_text(json_path, json.dumps(records + others, indent=2) + "\n")
    text = render_markdown(records, bandwidths, meta) + kept_note(
        records, lambda r: f"{r.get('impl')} batch {r.get('batch')}")
    for config in dict.fromkeys(_config(r) for r in others):
        text += "\n" + _earlier_table([r for r in others if _config(r) == config])
    replace_text(md_path, text)
    return json_path, md_path


def _earlier_table(records: list[dict]) -> str:
    """The table of an earlier call's configuration, from its stored records (each judged by
    the ceiling stored with it), its headings a level down."""
    first = records[0]
    preset = PRESETS.get(first.get("preset"))
    if preset is None:
        return (f"## Preset `{first.get('preset')}` (no longer defined)\n\n{len(records)} rows "
                "in the JSON file.\n")
    meta = dict(model=preset.model, description=preset.description, preset=first["preset"],
                context=first["context"], prompt_len=first.get("prompt_len"),
                new_tokens=first["new_tokens"], repeats=first.get("repeats"),
                batch_sizes=sorted({r["batch"] for r in records}))
    ceiling = max((r["hbm_gbps"] for r in records if r.get("hbm_gbps")), default=None)
    meta["bandwidth_label"] = "Memory bandwidth these rows were judged by"
    text = render_markdown(records, {"their ceiling": ceiling} if ceiling else {}, meta)
    return "\n".join("#" + line if line.startswith("#") else line
                     for line in text.splitlines()) + "\n"


def kept_records(out_dir: Path, preset: str, spec: dict, impls, *, resume: bool,
                 device: str) -> tuple[list[dict], float | None]:
    """The rows of this device's output file that this call keeps in its configuration's
    table: those of impls it does not run, and with `resume` those of impls that finished
    every batch size (jaxdec's: measured with today's `MODEL_SOURCES`); and the best
    bandwidth ceiling they were measured against (the merged table uses the best ceiling of
    all calls). `device`: the name of the device the workers run on."""
    old = read_records(out_dir / f"decode-{device_slug(device)}.json")
    same = [r for r in old if _config(r) == (preset, spec["context"], spec["new_tokens"])]
    kept = [r for r in same if r.get("impl") not in impls]
    # jaxdec's rows count only while the code a decode step runs is what they measured.
    current = [r for r in same if r.get("impl") in impls and (
        r["impl"] not in JAXDEC_ATTENTION
        or r.get("model_sources") == sources_digest(MODEL_SOURCES))]
    for impl in dict.fromkeys(r["impl"] for r in current) if resume else ():
        rows = {r["batch"]: r for r in current if r["impl"] == impl and r.get("error") is None}
        if set(spec["batch_sizes"]) <= set(rows):
            kept += [rows[b] for b in spec["batch_sizes"]]
    ceiling = max((r["hbm_gbps"] for r in kept if r.get("hbm_gbps")), default=None)
    return kept, ceiling


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,16, got {text!r}")
    return values


def _impl_list(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in IMPLS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"impls must be among {', '.join(IMPLS)}; got {text!r}")
    return names


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="h100")
    parser.add_argument("--batch-sizes", type=_int_list, help="e.g. 1,16 (default: the preset's)")
    parser.add_argument("--context", type=int, help="average KV length during decode")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per row (>= 2)")
    parser.add_argument("--impls", type=_impl_list,
                        help=f"comma-separated among {', '.join(IMPLS)} (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (compiles)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median is reported)")
    parser.add_argument("--budget-s", type=float, help="total worker wall time (default: preset's)")
    parser.add_argument("--compile-ahead", type=int, metavar="THREADS",
                        help="jaxdec impls: threads that compile each batch size's program "
                             "while the weights are drawn (0: at the first call; default: half "
                             "the CPU cores up to 8 on an accelerator, 0 on a CPU)")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                        help="jaxdec impls: after the timed runs, one run under the JAX "
                             "profiler, whose kernel time by kernel goes into the record and "
                             "the table's notes (default: on)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the impls the output file already holds for every batch size "
                             "(same preset, context and new tokens; jaxdec's only if measured "
                             "with the same model code) and run only the others (without it, "
                             "the impls asked for run again; the file's other rows are kept "
                             "either way)")
    parser.add_argument("--out", type=out_dir, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--worker", type=_impl_list, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--events", help=argparse.SUPPRESS)
    return parser, parser.parse_args(argv)


def make_spec(args, preset: Preset) -> dict:
    """What every worker needs, as JSON; validates the overrides."""
    context = preset.context if args.context is None else args.context
    new_tokens = preset.new_tokens if args.new_tokens is None else args.new_tokens
    prompt_len = context - new_tokens // 2
    if new_tokens < 2:
        raise ValueError("--new-tokens must be >= 2 (decode speed needs steps after the first)")
    if prompt_len < 1:
        raise ValueError(f"--context {context} is too short for {new_tokens} new tokens")
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    if args.compile_ahead is not None and args.compile_ahead < 0:
        raise ValueError(f"--compile-ahead must be >= 0, got {args.compile_ahead}")
    return dict(model=preset.model, batch_sizes=list(args.batch_sizes or preset.batch_sizes),
                context=context, prompt_len=prompt_len, new_tokens=new_tokens,
                warmup=args.warmup, repeats=args.repeats, copy_mib=preset.copy_mib,
                compile_ahead=args.compile_ahead, profile=args.profile)


def main(argv=None) -> int:
    """Runs the benchmark; 0 when every impl produced every batch size's result."""
    parser, args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, json.loads(args.spec), args.events)
    # A stop (bench/device.py signals the step's process group) unwinds through
    # `run_worker`'s cleanup: the worker, in a session of its own, would outlive it, holding
    # the accelerator.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    preset = PRESETS[args.preset]
    try:
        spec = make_spec(args, preset)
    except ValueError as e:
        parser.error(str(e))
    budget = args.budget_s if args.budget_s is not None else preset.budget_s
    deadline = None if budget is None else time.monotonic() + budget
    common = dict(context=spec["context"], prompt_len=spec["prompt_len"],
                  new_tokens=spec["new_tokens"], preset=args.preset, repeats=spec["repeats"],
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  commit=git_commit(), **versions(),
                  # (as the workers see it: the worker's own name is recorded where it said)
                  device=device_name({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}))
    meta = dict(spec, preset=args.preset, description=preset.description)
    records, bandwidths = [], {}
    impls = args.impls or preset.impls
    raw, ceiling = kept_records(args.out, args.preset, spec, impls, resume=args.resume,
                                device=common["device"])
    if ceiling:
        bandwidths["an earlier call's ceiling"] = ceiling
    finished = {r["impl"] for r in raw}
    due = []
    for impl in impls:
        if impl in finished:
            print(f"[decode bench] {impl}: already measured (--resume)", flush=True)
        else:
            due.append(impl)
    units = worker_units(due)
    for i, unit in enumerate(units):
        label = ",".join(unit)
        left = None if deadline is None else deadline - time.monotonic()
        print(f"[decode bench] {label}: batch sizes {spec['batch_sizes']}, context "
              f"{spec['context']}, {spec['new_tokens']} new tokens", flush=True)
        started = time.monotonic()
        if left is not None and left < 1:
            events, failure = [], "skipped: the time budget (--budget-s) was used up"
        else:
            events, failure = run_worker(unit, spec, left)
        print(f"[decode bench] {label}: {failure or 'finished'} after "
              f"{time.monotonic() - started:.0f} s", flush=True)
        for e in events:
            if e["event"] == "bandwidth":
                bandwidths[e["source"]] = max(e["gbps"], bandwidths.get(e["source"], 0.0))
        for impl in unit:
            raw += impl_records(impl, events, failure, spec, common)
        records = [add_roofline(r, spec["model"], hbm_ceiling(bandwidths)) for r in raw]
        # After every worker (a call stopped later keeps what it measured; the impls it has
        # still to run keep their rows until then).
        write_outputs(args.out, records, bandwidths, meta,
                      pending=[impl for later in units[i + 1:] for impl in later])
    records = [add_roofline(r, spec["model"], hbm_ceiling(bandwidths)) for r in raw]
    if not records:
        print("[decode bench] nothing to run", flush=True)
        return 0
    json_path, md_path = write_outputs(args.out, records, bandwidths, meta)
    print(md_path.read_text(), flush=True)
    print(f"[decode bench] wrote {json_path} and {md_path}", flush=True)
    return 0 if all(r["error"] is None for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
