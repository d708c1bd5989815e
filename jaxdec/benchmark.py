"""How fast a model decodes on this machine, against the memory-bandwidth limit.

    records = jaxdec.benchmark.decode_speed(model, batch_sizes=(1, 16), context=2048)

or from a shell, `jaxdec bench --shape llama3-8b` (random weights of that shape) or
`jaxdec bench --model DIR` (a checkpoint's own weights).

Decode is memory-bound: every step reads each weight once and the KV cache up to the current
length, and does about one multiply-add per byte read at batch 1 (accelerators do hundreds).
So the limit on tokens/s is the bytes a step cannot avoid reading over the memory bandwidth,
and `decode_speed` reports both: the bytes (`decode_step_bytes`), the bandwidth it measured
on this machine in the same call (`memory_bandwidth`) and the fraction of that limit reached.
`bench/decode.py` is the fuller benchmark (transformers side by side, a kernel profile).

Greedy decoding with no stop token, on random prompts of `context - new_tokens // 2` tokens:
over the `new_tokens - 1` decode steps a step attends to `context` cached tokens on average.
Times come from `GenerateResult` (stamped inside the compiled program; compilation is in the
warm-up call, timed apart as `compile_s`); tokens/s and step time are medians over `repeats`.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import statistics
import time
from collections.abc import Sequence

import numpy as np

from jaxdec.checks import check_int, check_model
from jaxdec.config import ModelConfig, RopeConfig

_LLAMA3_ROPE = dict(theta=500000.0, rope_type="llama3", low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192)

# Random-weight models of public checkpoints' shapes (`jaxdec bench --shape NAME`): the
# speed of a model depends on its shape and dtype, not on its weights' values.
SHAPES: dict[str, ModelConfig] = {
    # (llama3-8b and -70b: Llama 3.1's configs, 131072 positions with llama3 rope scaling;
    # Llama 3's have 8192 and no scaling: the same weights, so the same speed.)
    "llama3-8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=131072, rope=RopeConfig(factor=8.0, **_LLAMA3_ROPE),
        dtype="bfloat16"),
    "llama3-70b": ModelConfig(  # (with --tp: its weights alone are 141 GB in bf16)
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=131072, rope=RopeConfig(factor=8.0, **_LLAMA3_ROPE),
        dtype="bfloat16"),
    "llama3.2-1b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
        max_position_embeddings=131072, rope=RopeConfig(factor=32.0, **_LLAMA3_ROPE),
        tie_word_embeddings=True, dtype="bfloat16"),
    "qwen2.5-0.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
        max_position_embeddings=32768, rope=RopeConfig(theta=1000000.0), qkv_bias=True,
        tie_word_embeddings=True, dtype="bfloat16"),
    "qwen2.5-7b": ModelConfig(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
        max_position_embeddings=32768, rope=RopeConfig(theta=1000000.0), qkv_bias=True,
        dtype="bfloat16"),
    "mistral-7b": ModelConfig(  # v0.3 (no sliding window)
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        max_position_embeddings=32768, rope=RopeConfig(theta=1000000.0), dtype="bfloat16"),
    # Seconds on a CPU: what the tests run.
    "tiny": ModelConfig(
        model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
        max_position_embeddings=8192, dtype="bfloat16"),
}


@dataclasses.dataclass(frozen=True)
class StepBytes:
    """The bytes one decode step must read: `weights` (every parameter once; of the input
    embedding only the rows looked up, unless it is also the output projection) and `kv`
    (keys and values of every layer up to the context, or its sliding window)."""

    weights: int
    kv: int

    @property
    def total(self) -> int:
        return self.weights + self.kv


def decode_step_bytes(config: ModelConfig, batch: int, context: int, *, dtype="bfloat16",
                      tp: int = 1) -> StepBytes:
    """The bytes a greedy decode step of `batch` rows attending to `context` cached tokens
    must read, for parameters and cache of `dtype`, on a `tp`-way tensor-parallel mesh (the
    vocabulary padded to a multiple of tp; KV heads repeated where tp exceeds them, as jaxdec
    lays them out). Arithmetic only: nothing is allocated or traced.

    Bytes a step reads beyond these (a cache slot past a row's length, a key outside a sliding
    window that the attention reads and masks) are not counted: they show up as a lower
    fraction of the bandwidth."""
    import jax.numpy as jnp

    from jaxdec.model import family
    from jaxdec.parallel import check_tp_split

    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a jaxdec.ModelConfig, got {type(config).__name__}")
    batch, context, tp = check_int("batch", batch), check_int("context", context), \
        check_int("tp", tp)
    check_tp_split(config, tp)
    itemsize = jnp.dtype(dtype).itemsize
    fam = family(config)
    vocab = -(-config.vocab_size // tp) * tp
    groups = fam.kv_groups(config, tp)  # also the cache's KV heads: max(K, tp)
    shapes = fam.param_shapes(config, vocab_size=vocab, groups=groups)
    params = sum(math.prod(shape) for shape in _shape_leaves(shapes)) * itemsize
    weights = params
    if not config.tie_word_embeddings:  # the input embedding: only the rows looked up
        weights += (batch - vocab) * config.hidden_size * itemsize
    kv = sum(2 * batch * min(context, window or context) * groups * config.head_dim
             for window in config.layer_windows) * itemsize
    return StepBytes(weights=weights, kv=kv)


def _shape_leaves(tree) -> list[tuple]:
    import jax

    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, tuple))


def memory_bandwidth(nbytes: int | None = None, *, passes: int = 8, trials: int = 5
                     ) -> dict[str, float]:
    """GB/s of two memory-bound programs on the default device, over an fp32 array of
    `nbytes` (default 1 GiB on an accelerator, 64 MiB on a CPU): "x + 1" (read + write, a
    copy's traffic) and "sum" (read only, as decode mostly does). fp32, so the compiler has no
    dtype conversion to hoist out of the loop. Each pass runs inside one jitted loop whose trip
    count is an argument (never unrolled or fused across passes) and depends on the pass
    before (nothing is hoisted), timed per pass as the difference of 2n and n passes, so
    dispatch and synchronization cancel out. The larger of the two is the machine's
    bandwidth as far as decode is concerned."""
    import jax
    import jax.numpy as jnp

    from jaxdec.train.loop import seconds_per_pass

    if nbytes is None:
        nbytes = (1 << 30) if jax.default_backend() != "cpu" else (64 << 20)
    nbytes = check_int("nbytes", nbytes)
    passes, trials = check_int("passes", passes), check_int("trials", trials)
    if nbytes < 4:
        raise ValueError(f"nbytes must be >= 4 (one fp32 value), got {nbytes}")
    x = jnp.ones((nbytes // 4,), jnp.float32)

    @jax.jit
    def bump(n, a):
        return jax.lax.fori_loop(0, n, lambda _, a: a + 1, a)

    @jax.jit
    def read(n, a):
        def body(_, acc):
            return acc + jnp.sum(a + acc * 1e-30)
        return jax.lax.fori_loop(0, n, body, jnp.float32(0))

    def per_pass(program) -> float:
        return seconds_per_pass(program, x, passes=passes, trials=trials)

    size = x.size * 4
    return {"x + 1": 2 * size / per_pass(bump) / 1e9, "sum": size / per_pass(read) / 1e9}


def prompt_length(context: int, new_tokens: int) -> int:
    """The prompt length at which decode steps attend to `context` tokens on average."""
    length = context - new_tokens // 2
    if length < 1:
        raise ValueError(f"context={context} leaves no prompt for new_tokens={new_tokens}: "
                         f"context must exceed new_tokens // 2 = {new_tokens // 2}")
    return length


def random_prompts(vocab_size: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """`batch` random prompts of `length` token ids below `vocab_size`, the same for a seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, (batch, length)).tolist()


DEFAULT_CONTEXT = 2048


def default_context(config, new_tokens: int) -> int:
    """`DEFAULT_CONTEXT`, or less where the model's positions end before a benchmark of it
    and `new_tokens` would."""
    room = config.max_positions - (new_tokens - new_tokens // 2)  # (see `prompt_length`)
    return max(1, min(DEFAULT_CONTEXT, room))


def check_positions(config, context: int, new_tokens: int) -> None:
    """A ValueError unless a benchmark of `context` and `new_tokens` fits the config's
    positions."""
    needed = prompt_length(context, new_tokens) + new_tokens
    limit = config.max_positions
    if needed > limit:
        raise ValueError(
            f"context={context} with new_tokens={new_tokens} needs {needed} positions, beyond "
            f"the model's {limit} ({config.describe_max_positions()})")


def decode_speed(model, batch_sizes: Sequence[int] = (1,), *, context: int = DEFAULT_CONTEXT,
                 new_tokens: int = 128, warmup: int = 1, repeats: int = 3,
                 bandwidth_gbps: float | None = None) -> list[dict]:
    """Greedy decode speed of `model` (a `jaxdec.Model`), one record per batch size.

    Args:
      batch_sizes: rows decoded together.
      context: the average number of cached tokens a decode step attends to (the prompts
        have `context - new_tokens // 2` random tokens).
      new_tokens: tokens produced per row (>= 2: the first comes from the prefill).
      warmup: untimed runs first (>= 1: the first compiles).
      repeats: timed runs; the record holds their medians.
      bandwidth_gbps: the memory bandwidth of one device to compare with; measured here by
        `memory_bandwidth` when None.

    Each record: batch, context, new_tokens, prompt_len, tokens_per_s (decode tokens over all
    rows per second), step_ms, prefill_s, decode_s, compile_s (the first call's extra time),
    weight_bytes, kv_bytes, bytes_per_step (`decode_step_bytes`, for the batch padded to a
    multiple of the mesh's dp as `generate` pads it, each of dp replicas reading the
    weights, the KV averaged over the steps, each layer's up to its window), achieved_gbps
    (bytes_per_step / step time), bandwidth_gbps (per device, times the mesh's devices: the
    limit), fraction (achieved / limit), roofline_tokens_per_s (batch x limit /
    bytes_per_step), and the device, devices, dtype, attention, jax_version and date.
    """
    import jax

    import jaxdec
    from jaxdec.model import is_abstract, param_dtype

    check_model(model)
    if is_abstract(model):
        raise ValueError("model holds shapes only (abstract_model): decode_speed needs "
                         "weights (init_model or load_pretrained)")
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence):
        raise TypeError(f"batch_sizes must be a sequence of ints, got {batch_sizes!r}")
    if not batch_sizes:
        raise ValueError("batch_sizes must be a non-empty sequence of ints, got ()")
    batch_sizes = tuple(check_int("batch_sizes", b) for b in batch_sizes)
    context, new_tokens = check_int("context", context), check_int("new_tokens", new_tokens)
    warmup, repeats = check_int("warmup", warmup), check_int("repeats", repeats)
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (the first token comes from the prefill, "
                         f"so one token times no decode step), got {new_tokens}")
    check_positions(model.config, context, new_tokens)
    prompt_len = prompt_length(context, new_tokens)
    if bandwidth_gbps is None:
        bandwidth_gbps = max(memory_bandwidth().values())
    elif isinstance(bandwidth_gbps, bool) or not isinstance(bandwidth_gbps, (int, float)) \
            or not bandwidth_gbps > 0:
        raise ValueError(f"bandwidth_gbps must be a number > 0 (or None: measure it), got "
                         f"{bandwidth_gbps!r}")
    dtype = param_dtype(model)
    devices = model.mesh.devices.size
    dp = model.mesh.devices.size // model.tp
    limit_gbps = bandwidth_gbps * devices
    common = dict(
        device=jax.devices()[0].device_kind, devices=devices, dtype=str(dtype),
        attention=model.attention.value, jax_version=jax.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    records = []
    for batch in batch_sizes:
        prompts = random_prompts(model.config.vocab_size, batch, prompt_len)

        def run():
            res = jaxdec.generate(model, prompts, max_new_tokens=new_tokens,
                                  return_timings=True)
            if not (res.lengths == new_tokens).all():  # no stop token: cannot happen
                raise RuntimeError(f"rows stopped early: {res.lengths.tolist()}")
            return res.prefill_s, res.decode_s

        started = time.perf_counter()
        first = run()
        first_s = time.perf_counter() - started
        for _ in range(warmup - 1):
            run()
        runs = [run() for _ in range(repeats)]
        prefill_s = statistics.median(r[0] for r in runs)
        decode_s = statistics.median(r[1] for r in runs)
        step_s = decode_s / (new_tokens - 1)
        # `generate` pads the batch to a multiple of dp (rows that decode too). Each of dp
        # replicas reads the weights (the embedding rows of its own rows); the KV cache is
        # read once over the mesh, each layer's up to its window, averaged over the steps.
        padded = -(-batch // dp) * dp
        need = decode_step_bytes(model.config, padded, context, dtype=dtype, tp=model.tp)
        rows = 0 if model.config.tie_word_embeddings else \
            padded * model.config.hidden_size * dtype.itemsize
        weights = (need.weights - rows) * dp + rows
        kv = _mean_kv_bytes(model.config, padded, prompt_len, new_tokens, dtype=dtype,
                            tp=model.tp)
        per_step = weights + kv
        achieved = per_step / step_s / 1e9
        records.append(dict(
            batch=batch, context=context, new_tokens=new_tokens, prompt_len=prompt_len,
            tokens_per_s=batch * (new_tokens - 1) / decode_s, step_ms=step_s * 1e3,
            prefill_s=prefill_s, decode_s=decode_s,
            compile_s=max(first_s - sum(first), 0.0),
            weight_bytes=weights, kv_bytes=kv, bytes_per_step=per_step,
            achieved_gbps=achieved, bandwidth_gbps=limit_gbps, fraction=achieved / limit_gbps,
            roofline_tokens_per_s=batch * limit_gbps * 1e9 / per_step, **common))
    return records


def _mean_kv_bytes(config: ModelConfig, batch: int, prompt_len: int, new_tokens: int, *,
                   dtype, tp: int) -> float:
    """The KV bytes a decode step of `decode_speed`'s runs reads, averaged over its steps:
    step j (1 .. new_tokens - 1) attends to prompt_len + j keys, up to each layer's window
    (the window of the average context counted up to 14% more)."""
    steps = np.arange(1, new_tokens) + prompt_len
    keys = sum(float(np.minimum(steps, window or steps[-1]).mean())
               for window in config.layer_windows)
    per_key = decode_step_bytes(config, batch, 1, dtype=dtype, tp=tp).kv / config.num_layers
    return keys * per_key


def _figure(value: float) -> str:
    """A table's number: whole from 100 on, else 3 significant digits (a tiny model's
    GB/step read 0.000)."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def format_table(records: Sequence[dict]) -> str:
    """`decode_speed`'s records as a plain-text table."""
    header = ("batch", "context", "tokens/s", "step ms", "prefill ms", "GB/step", "GB/s",
              "of limit", "limit tokens/s")
    rows = [(str(r["batch"]), str(r["context"]), f"{r['tokens_per_s']:.1f}",
             f"{r['step_ms']:.2f}", f"{r['prefill_s'] * 1e3:.1f}",
             _figure(r["bytes_per_step"] / 1e9), _figure(r["achieved_gbps"]),
             f"{r['fraction']:.1%}", f"{r['roofline_tokens_per_s']:.1f}") for r in records]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
