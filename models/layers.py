"""Building blocks shared by the model families: RMSNorm, rotary embeddings, the gated MLP,
and the single attention entry point (which dispatches to the Pallas tree-attention kernel or
its jnp reference, both in `jaxdec.pallas_kernels.tree_attention`).

Shape legend: B batch, T new tokens, S cache slots, H query heads, K KV heads, G = H // K
query heads per KV head, D head dim, E model width, F MLP width.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.cache import bits_as_bf16
from jaxdec.config import RopeConfig
from jaxdec.pallas_kernels import matvec, tree_attention

# The reference and its visibility rule live beside the kernels; the models use them from here.
attention_reference = tree_attention.tree_attention_reference
visible_slots = tree_attention.visible_slots


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with the statistics in fp32; the scale is applied in the input dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return jax.lax.broadcast_to_rank(weight, x.ndim) * normed.astype(x.dtype)


def rms_norm_factored(x: jax.Array, weight: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """RMSNorm split for the projection that follows: `(weight * x, inv_rms)`, with inv_rms =
    1 / RMS(x) in fp32 [..., 1]. A projection applies the row scale after its matmul
    (`project`): (weight * x * inv_rms) @ W = ((weight * x) @ W) * inv_rms.

    Why: with the scale applied before the matmul, a decode step at batch 1 ran the norm as
    two kernels (the statistics, then the scaling) between the residual add and the matmul.
    Factored, `weight * x` and the statistics are one fusion, `weight * x` feeds the matmul
    directly, and the row scale joins whatever reads the matmul's output
    (the rotary embedding, SwiGLU's product). Rounding: `weight * x` is rounded to the input
    dtype once and the matmul's fp32 result is scaled before its own rounding, where
    `rms_norm` rounds the normalised x and its product with the weight."""
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return jax.lax.broadcast_to_rank(weight, x.ndim) * x, inv_rms


# Up to this many tokens per shard, a block's RMSNorm is factored into the projection after it
# (`pre_projection_norm`). Decode and verification steps (a few tokens per row) read weights,
# not activations, and save two kernels per layer; training and prefill move activations,
# where the factored form costs a [tokens, width] fp32 matmul output and, in the backward
# pass, a reduction over every projection's output instead of over its input (the compiled
# gpu-base training step, `bench/census.py`: 162 GB of element-wise operands and results
# factored against 99 GB normalising first, and 93 against 67 GB for the matmuls).
FACTORED_NORM_MAX_TOKENS = 64


def pre_projection_norm(x: jax.Array, weight: jax.Array, eps: float
                        ) -> tuple[jax.Array, jax.Array | None]:
    """The RMSNorm before a projection, as `(h, inv_rms)` for `project(..., h, W, inv_rms)`:
    factored (`rms_norm_factored`) for at most `FACTORED_NORM_MAX_TOKENS` tokens, else
    `(rms_norm(x), None)`. The token count is static (x's shape), so each program takes one
    form. float16 is never factored: its range ends at 65504, and `weight * x` unnormalised
    overflows where the normalised x does not (a residual entry of 3e4 under a gain of 4 made
    every logit NaN)."""
    if (math.prod(x.shape[:-1]) <= FACTORED_NORM_MAX_TOKENS
            and x.dtype != jnp.float16):
        return rms_norm_factored(x, weight, eps)
    return rms_norm(x, weight, eps), None


class MatmulImpl(enum.Enum):
    """How the layers' projections run (static).

    XLA: XLA's product (the default).
    PALLAS: experimental, for decode steps on a GPU: a projection of at most 16 tokens per
      shard runs `jaxdec.pallas_kernels.matvec`'s kernel where it takes the shapes, XLA's
      product otherwise (more tokens, another platform, shapes the kernel does not tile).
      `bench/matvec.py` and `bench/decode.py`'s `jaxdec-matvec` measure it against XLA.
    PALLAS_INTERPRET: the same kernel through Pallas's interpreter on any backend (tests).
    """

    XLA = "xla"
    PALLAS = "pallas"
    PALLAS_INTERPRET = "pallas_interpret"


def dense(x, weight, matmul: MatmulImpl = MatmulImpl.XLA, subscripts: str | None = None):
    """x [..., K] times `weight` (its leading axes, K in all, contracted with x's last; its
    trailing axes the output's) with fp32 accumulation: [..., *trailing] fp32. `subscripts`:
    the einsum XLA runs (default: a plain matrix product over the flattened axes); with
    `matmul` PALLAS the matrix-vector kernel runs instead where `MatmulImpl` says."""
    K = x.shape[-1]
    lead = weight.ndim - 1 if subscripts is None else 1
    out_axes = weight.shape[lead:]
    N = math.prod(out_axes)
    if math.prod(weight.shape[:lead]) == K and _takes_matvec(x, weight, N, matmul):
        out = matvec.matvec(x.reshape(-1, K), weight.reshape(K, -1), impl=matvec.Impl.TRITON,
                            interpret=matmul is MatmulImpl.PALLAS_INTERPRET)
        return out.reshape(*x.shape[:-1], *out_axes)
    if subscripts is not None:
        return jnp.einsum(subscripts, x, weight, preferred_element_type=jnp.float32)
    out = jnp.dot(x.reshape(-1, K), weight.reshape(K, N), preferred_element_type=jnp.float32)
    return out.reshape(*x.shape[:-1], *out_axes)


def _takes_matvec(x, weight, N: int, matmul: MatmulImpl, groups: int = 1) -> bool:
    """Whether x [..., K] times `weight` (`groups` [K, N] matrices) runs the matrix-vector
    kernel under `matmul` (see `MatmulImpl`)."""
    if matmul is MatmulImpl.XLA or x.dtype != weight.dtype:
        return False
    tokens, K = math.prod(x.shape[:-1]), x.shape[-1]
    return ((matmul is MatmulImpl.PALLAS_INTERPRET or current_platform() in GPU_BACKENDS)
            and tokens <= matvec.ROWS
            and matvec.unsupported_reason(tokens, K, N, groups=groups) is None)


def project(subscripts: str, x, weight, inv_rms=None, matmul: MatmulImpl = MatmulImpl.XLA
            ) -> jax.Array:
    """`einsum(subscripts, x, weight)` with fp32 accumulation, scaled per row by `inv_rms`
    ([B, T, 1] from `rms_norm_factored`; broadcast over the output's trailing axes), in x's
    dtype; `matmul`: see `MatmulImpl` (subscripts must then contract x's last axis with the
    weight's first)."""
    out = dense(x, weight, matmul, subscripts)
    if inv_rms is not None:
        out = out * inv_rms.reshape(inv_rms.shape + (1,) * (out.ndim - inv_rms.ndim))
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------- rotary embeddings


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [D/2] (float32) after the configured scaling.

    "llama3" scaling (Llama 3.1) leaves high frequencies alone, divides low frequencies (waves
    longer than original_max / low_freq_factor) by `factor`, and interpolates smoothly between;
    "yarn" ramps by turns over the original context instead (`_yarn_ramp`).

    Computed in float32, operation for operation as transformers computes them: in float64
    the frequencies are closer to the exact ones but not to the model's (Llama 3.1's differ
    by up to 3e-7 relatively; at position 3000 the logits then differed by 1.4e-4).
    """
    f32 = np.float32
    exponents = np.arange(0, head_dim, 2).astype(f32) / f32(head_dim)
    # (the float64 power rounded: torch's float32 power is that or, on some CPUs, 1 ulp off
    # it; a few in 1520 theta / head_dim / scaling draws differed, by at most 5.5e-7)
    powers = (np.float64(rope.theta) ** exponents.astype(np.float64)).astype(f32)
    inv_freq = f32(1.0) / powers
    if rope.rope_type == "linear":
        inv_freq = inv_freq / f32(rope.factor)
    elif rope.rope_type == "llama3":
        factor, low = f32(rope.factor), f32(rope.low_freq_factor)
        old_context = rope.original_max_position_embeddings
        wavelen = f32(2 * np.pi) / inv_freq
        scaled = np.where(wavelen > f32(old_context / rope.low_freq_factor),
                          inv_freq / factor, inv_freq)
        # smooth = 0 on the low-frequency side (fully scaled), 1 on the high side (unscaled).
        smooth = (f32(old_context) / wavelen - low) / f32(rope.high_freq_factor
                                                          - rope.low_freq_factor)
        smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < f32(old_context / rope.high_freq_factor)) & ~(
            wavelen > f32(old_context / rope.low_freq_factor))
        inv_freq = np.where(medium, smoothed, scaled)
    elif rope.rope_type == "yarn":
        kept = f32(1) - _yarn_ramp(rope, head_dim)  # 1 for frequencies kept as they are
        divided = f32(1.0) / (f32(rope.factor) * powers)
        inv_freq = divided * (f32(1) - kept) + inv_freq * kept
    return inv_freq.astype(np.float32)


def _yarn_ramp(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """YaRN's interpolation weight per frequency [D/2] (float32): 0 for frequencies kept as
    they are, 1 for those divided by the factor.

    Frequency i turns original_context * inv_freq_i / 2pi times over the original context;
    solving for i at `beta_fast` and `beta_slow` turns gives the ramp's ends (on the scale of
    the head dimension, as transformers computes them).
    """
    def index_turning(turns):
        return (head_dim * math.log(rope.original_max_position_embeddings / (turns * 2 * math.pi))
                / (2 * math.log(rope.theta)))

    low, high = index_turning(rope.beta_fast), index_turning(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if high == low:
        high += 0.001
    ramp = (np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(ramp, np.float32(0), np.float32(1))


def apply_rope(x_BTND: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray,
               scale: float = 1.0) -> jax.Array:
    """Rotates the two halves of each head (the HF "rotate_half" layout), in fp32; `scale`
    multiplies cos and sin (`RopeConfig.attention_scale`)."""
    angles = (positions_BT.astype(jnp.float32)[..., None]
              * jnp.asarray(inv_freq)[None, None])  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    x = x_BTND.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BTND.dtype)


# --------------------------------------------------------------------------------- MLP


def gated_mlp(x_BTE, gate_up_2EF, down_FE, bias_2F=None, inv_rms_BT1=None,
              matmul: MatmulImpl = MatmulImpl.XLA) -> jax.Array:
    """SwiGLU MLP: down(silu(gate(x)) * up(x)), gate and up as one [2, E, F] array (one
    batched matmul, `gate_up_product`). Under tensor parallelism F is the local shard and the
    result is a partial sum the caller reduces. With `inv_rms_BT1`, x is `weight * x` from
    `rms_norm_factored` and the projection applies the scale. `matmul`: see `MatmulImpl`."""
    gate_up = gate_up_product(x_BTE, gate_up_2EF, inv_rms_BT1, matmul)
    if bias_2F is not None:
        gate_up = gate_up + bias_2F[:, None, None]
    hidden = jax.nn.silu(gate_up[0]) * gate_up[1]
    if matmul is MatmulImpl.XLA:
        return hidden @ down_FE
    return dense(hidden, down_FE, matmul).astype(hidden.dtype)


def gate_up_product(x_BTE, gate_up_2EF, inv_rms_BT1=None, matmul: MatmulImpl = MatmulImpl.XLA
                    ) -> jax.Array:
    """x's gate and up projections [2, B, T, F] in x's dtype (fp32 accumulation, scaled per
    row by `inv_rms_BT1` like `project`).

    One product over both matrices, gate and up being the batch axis of a batched matmul (x
    broadcast to it): gate|up stacked on the axis before F ([E, 2, F]) was one plain matmul,
    but libtpu tiles the two minor axes of a weight, (2, F), and copied every layer's weight
    into another order where a product of many rows wanted it, keeping the copies through the
    program. [2, E, F] is what it tiles as it is: the Llama-3-8B decode program on one v6e
    chip at batch 16 went from 10.6 to 4.0 GiB of temporaries (2.5 with qkv flat too, see
    `llama`), and the Llama-3-70B one fits a v5e-16 at batch 16
    (`bench/results/tpu-compile.md`). An H100 compile runs the batched
    product as one matmul kernel reading the weight in place, as it ran [E, 2, F]'s (the same
    kernels per decode layer at batch 1 and 16). With `matmul` PALLAS the matrix-vector
    kernel takes both matrices in one launch."""
    B, T, E = x_BTE.shape
    F = gate_up_2EF.shape[-1]
    if _takes_matvec(x_BTE, gate_up_2EF, F, matmul, groups=2):
        out = matvec.matvec(x_BTE.reshape(B * T, E), gate_up_2EF, impl=matvec.Impl.TRITON,
                            interpret=matmul is MatmulImpl.PALLAS_INTERPRET)
        out = out.reshape(2, B, T, F)
    else:
        x_2BTE = jnp.broadcast_to(x_BTE[None], (2,) + x_BTE.shape)
        out = jnp.einsum("gbte,gef->gbtf", x_2BTE, gate_up_2EF,
                         preferred_element_type=jnp.float32)
    if inv_rms_BT1 is not None:
        out = out * inv_rms_BT1[None]
    return out.astype(x_BTE.dtype)


# A prefill's MLP runs over at most this many tokens at a time (a `lax.map` over chunks of
# the shard's tokens): its [tokens, 2F] gate|up product and [tokens, F] SwiGLU output were
# the largest buffers of a long prompt's prefill. Llama-3-8B shapes compiled for an H100 with
# cuDNN's attention, prompt of 32K tokens: 3.64 GB of temporaries whole, 1.71 GB in chunks
# of 4096 (each chunk's products are still large matmuls). Decode never reaches it.
PREFILL_MLP_CHUNK_TOKENS = 4096
_MIN_MLP_CHUNK_TOKENS = 1024  # smaller chunks than this: not worth a loop (no chunking)


def mlp_chunk_tokens(tokens: int, max_tokens: int = PREFILL_MLP_CHUNK_TOKENS) -> int | None:
    """The tokens per chunk for a chunked MLP over `tokens` tokens: the largest divisor of
    `tokens` in [min(1024, max_tokens), max_tokens], or None (run it whole) when `tokens` is at
    most `max_tokens` or no divisor is in range (jaxdec's prompt buckets are multiples of
    1024 past 1024 tokens, so one is)."""
    if tokens <= max_tokens:
        return None
    low = min(_MIN_MLP_CHUNK_TOKENS, max_tokens)
    return next((size for size in range(max_tokens, low - 1, -1) if tokens % size == 0), None)


def chunked_gated_mlp(x_BTE, gate_up_2EF, down_FE, bias_2F=None, inv_rms_BT1=None,
                      matmul: MatmulImpl = MatmulImpl.XLA, *,
                      max_tokens: int | None = None, reduce=None) -> jax.Array:
    """`reduce(gated_mlp(...))` over the B * T tokens `max_tokens` (default
    `PREFILL_MLP_CHUNK_TOKENS`) or fewer at a time (`mlp_chunk_tokens`; whole where it gives
    None), one chunk after another, each chunk's result written over its input
    (`map_in_place`; no gradient): every token's result as `gated_mlp`'s, with the
    [tokens, 2F] and [tokens, F] activations of one chunk alive at a time. `reduce` (e.g. the
    tensor-parallel psum of the partial sums; None: none) runs on each chunk."""
    reduce = reduce or (lambda y: y)
    B, T, E = x_BTE.shape
    size = mlp_chunk_tokens(B * T, max_tokens or PREFILL_MLP_CHUNK_TOKENS)
    if size is None:
        return reduce(gated_mlp(x_BTE, gate_up_2EF, down_FE, bias_2F, inv_rms_BT1, matmul))
    chunks = B * T // size
    xs = [x_BTE.reshape(chunks, 1, size, E)]
    if inv_rms_BT1 is not None:
        xs.append(inv_rms_BT1.reshape(chunks, 1, size, 1))

    def one(*parts):
        return reduce(gated_mlp(parts[0], gate_up_2EF, down_FE, bias_2F,
                                parts[1] if len(parts) > 1 else None, matmul))

    out = map_in_place(one, *xs)
    return out.reshape(B, T, out.shape[-1])


def map_in_place(fn, xs, *others):
    """`lax.map(lambda a: fn(*a), (xs, *others))` without gradients: where `fn` returns a
    slice of `xs`'s shape and dtype, each result is written over the slice it was computed
    from (a `fori_loop`), so the map needs no output buffer of its own. `lax.map`'s stacked
    output starts as a zero fill, and XLA merged every layer's fill into one fusion at the
    program's start: each layer's output buffer was alive through the whole prefill (the
    Llama-3-8B shape at batch 16 x 2K tokens, compiled for an H100: 0.54 GB a layer, 19.7 GB
    of temporaries at 32 layers, 2.5 GB in place; one TPU v6e chip could not hold it). Under
    `shard_map` the results must vary over the mesh axes `xs` does (reduce partial sums in
    `fn`), as a loop's carry keeps its type."""
    result = jax.eval_shape(fn, xs[0], *(o[0] for o in others))
    if (result.shape, result.dtype) != (xs.shape[1:], xs.dtype):
        return jax.lax.map(lambda args: fn(*args), (xs, *others))

    def body(i, buf):
        out = fn(buf[i], *(o[i] for o in others))
        return jax.lax.dynamic_update_index_in_dim(buf, out, i, 0)

    return jax.lax.fori_loop(0, xs.shape[0], body, xs)


# --------------------------------------------------------------------------- attention


class AttentionImpl(enum.Enum):
    """Which attention implementation the entry point runs.

    AUTO: the Pallas tree-attention kernel on GPU (Triton) and TPU (Mosaic) wherever it takes
      the shapes (decode and verification: at most `MAX_QUERIES` new tokens per row) and the
      layer's cache is large enough for it to pay (`AUTO_KERNEL_MIN_KV_BYTES`); on GPU,
      CUDNN for causal blocks with no cache (training, `jaxdec.forward`) where cuDNN works
      for the shapes (`fused_causal_usable`, resolved by `jaxdec.model.forward_with_cache`);
      on CPU, a cache of `BLOCKED_MIN_SLOTS` or more walked in blocks up to the rows'
      furthest slot (`tree_attention.Impl.BLOCKED`, jnp); a prefill longer than a query
      chunk that cuDNN does not run (TPU, CPU, fp32) walks its keys in blocks too, chunk by
      chunk (`attention`'s `prefill`); the jnp reference otherwise.
    REFERENCE: always the jnp reference.
    PALLAS: the backend's kernel where it takes the shapes; raises on a backend without one.
    PALLAS_INTERPRET: the GPU kernel through Pallas's interpreter on any backend (tests).
    CUDNN: cuDNN's fused (flash) attention for causal blocks with no cache, AUTO's choices
      elsewhere; GPU only.
    """

    AUTO = "auto"
    REFERENCE = "reference"
    PALLAS = "pallas"
    PALLAS_INTERPRET = "pallas_interpret"
    CUDNN = "cudnn"


# Below this many bytes of one layer's cache (keys + values, all rows of the shard), AUTO runs
# the reference: a pallas_call and the ops around it (query packing, the split-K combine) cost
# a few microseconds of their own, while the reference over a small cache is one or two fused
# XLA products. Measured on an H200 (bench/results, commit a8f00e1): gpu-small's speculative
# runs (fp32 caches of 0.4-3.6 MB per layer) were slower with the kernel everywhere (prompt lookup at
# batch 1: 0.52x against 0.99x), plain decoding 6-15% slower; the Llama-3-8B decode at 2K
# context (8 MB per layer and row) was faster with it at batch 1 and 16; the kernel benchmark
# (commit 3c05020) had the crossover near 4 MB (batch 1 at 1K context: a tie).
AUTO_KERNEL_MIN_KV_BYTES = 4 * 2**20

# From this many cache slots on, AUTO on a CPU runs `tree_attention.Impl.BLOCKED`: the cache
# walked in blocks up to the rows' furthest slot, so a step costs what the rows hold rather
# than what the cache could (the reference scores, and XLA's CPU products transpose, every
# slot). `bench/cpu_attention.py` on a 2-core CPU (bench/results/cpu-attention-cpu.md), a
# 4-layer fp32 model decoding 64 tokens after a 5-token prompt: 16384 slots, reference 100
# tokens/s, blocked 1631 (batch 4: 167 and 4470); 4096 slots, 456 and 2099 (this machine's
# noise, from the same path run both ways: 0.87-1.05x). Below, one block would be most of
# the cache and the reference runs.
BLOCKED_MIN_SLOTS = 2 * tree_attention.blocked.BLOCK_SLOTS


_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxdec_platform",
                                                                      default=None)


@contextlib.contextmanager
def use_platform(platform: str | None):
    """Inside (this thread, this context), the models pick their kernels for `platform`:
    `jaxdec.model.forward_with_cache` sets the platform of the model's mesh while it traces,
    so a model on CPU devices of a GPU machine (or on a compile-only GPU) gets the kernels of
    its own devices. None leaves the choice as it is."""
    token = _PLATFORM.set(platform) if platform is not None else None
    try:
        yield
    finally:
        if token is not None:
            _PLATFORM.reset(token)


def current_platform() -> str:
    """The platform kernels are picked for: `use_platform`'s, else `jax.default_backend()`."""
    return _PLATFORM.get() or jax.default_backend()


def attention_kernel(impl: AttentionImpl, platform: str | None = None
                     ) -> tuple[tree_attention.Impl, bool] | None:
    """The (kernel, interpret) an implementation choice resolves to on `platform` (default:
    `current_platform()`), or None when only the reference runs."""
    if impl is AttentionImpl.REFERENCE:
        return None
    if impl is AttentionImpl.PALLAS_INTERPRET:
        return tree_attention.Impl.TRITON, True
    platform = platform or current_platform()
    kernel = tree_attention.backend_kernel(platform)
    if kernel is None:
        if impl is AttentionImpl.PALLAS:
            raise ValueError(
                f"attention=PALLAS: no Pallas kernel for the {platform!r} platform (use "
                "\"auto\", \"reference\", or \"pallas_interpret\" to run the kernel "
                "interpreted; AttentionImpl.AUTO, ... in Python)"
            )
        return None
    return kernel, False


def attention(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    lengths_B: jax.Array | None,
    positions_BT: jax.Array,
    *,
    mask_BTT: jax.Array | None = None,
    window: int | None = None,
    impl: AttentionImpl = AttentionImpl.AUTO,
    query_chunk: int = 512,
    prefill: bool = False,
) -> jax.Array:
    """The one attention entry point: T new queries against a row's cache.

    The new tokens' keys and values are already written at slots [length, length + T) of
    `k`/`v`; the queries see the cached prefix plus the new tokens allowed by `mask_BTT`
    (causal when None, a tree's ancestor mask during verification), limited to a sliding
    `window` when given.

    Args:
      q_BTHD: queries, already rotated.
      k_BSKD, v_BSKD: the cache (one layer), K dividing H.
      lengths_B: int32 number of cached tokens per row (before the new ones), or None when
        there is no cache: `k`/`v` are the T new tokens' own keys and values, at positions
        0..T-1.
      positions_BT: int32 positions of the new tokens (length + depth for a tree; with a
        causal mask, length + t).
      impl: see `AttentionImpl`. The kernel path differentiates through the reference.
      query_chunk: causal blocks longer than this (long prefills) are processed this many
        queries at a time, so memory grows with chunk x S instead of T x S.
      prefill: static; no gradient will be taken (a prompt's prefill): unless `impl` is
        REFERENCE, each query chunk of a long causal block then walks only the keys up to its
        own last position, in blocks of `PREFILL_KEY_BLOCK` (`tree_attention.Impl.BLOCKED`'s
        online softmax), so memory grows with chunk x block instead of chunk x S and the keys
        a chunk cannot see are skipped.
    Returns:
      [B, T, H, D] in the query dtype.
    """
    if not isinstance(impl, AttentionImpl):
        raise TypeError(f"impl must be an AttentionImpl, got {impl!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(
            window, (int, np.integer)) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    T = q_BTHD.shape[1]
    cached = lengths_B is not None
    if not cached:
        if q_BTHD.ndim == 4 and impl is AttentionImpl.CUDNN and mask_BTT is None:
            return fused_causal(q_BTHD, k_BSKD, v_BSKD, window=window)
        lengths_B = jnp.zeros(q_BTHD.shape[:1], jnp.int32)
    # The shapes the kernels and the reference take, named before anything is traced.
    tree_attention.common.check_shapes(q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT,
                                       mask_BTT)
    kernel = kernel_for(impl, q_BTHD.shape, k_BSKD, cached=cached, dtype=q_BTHD.dtype)
    if kernel == (tree_attention.Impl.BLOCKED, False) and mask_BTT is None and T > query_chunk:
        # A long causal block over a cache (a prefill continuing a PrefixCache's): in query
        # chunks below, each walking the keys in blocks, as a fresh prefill does (all T
        # queries at once held T x block scores: memory growing with the prompt).
        kernel = None
    if kernel != (tree_attention.Impl.BLOCKED, False):
        # A bf16 cache's bits (`jaxdec.cache.as_bits`, inside a CPU program) as its values;
        # the blocked path reads the bits block by block.
        k_BSKD, v_BSKD = bits_as_bf16(k_BSKD), bits_as_bf16(v_BSKD)
    if kernel is not None:
        return _kernel_with_reference_grad(kernel, window, q_BTHD, k_BSKD, v_BSKD, lengths_B,
                                           positions_BT, mask_BTT)
    if mask_BTT is not None or T <= query_chunk:
        return _rematerialized(attention_reference, window=window)(
            q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, mask_BTT=mask_BTT
        )
    return _causal_in_query_chunks(
        q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, window=window, chunk=query_chunk,
        blocked=prefill and impl is not AttentionImpl.REFERENCE, in_place=prefill,
    )


def kernel_for(impl: AttentionImpl, q_shape, k_BSKD: jax.Array, *, cached: bool = True,
               dtype=None) -> tuple[tree_attention.Impl, bool] | None:
    """The (kernel, interpret) `attention` runs for these shapes, or None for the reference:
    the kernel must take the shapes, and AUTO also wants the cache to be worth it. On a CPU,
    AUTO walks a cache of `BLOCKED_MIN_SLOTS` or more (`cached`: `k` is a cache, not the new
    tokens' own keys) in blocks (`tree_attention.Impl.BLOCKED`, jnp). `dtype`: the queries'
    (a kernel may not take it: no fp16 on TPUs); None: not checked."""
    kernel = attention_kernel(impl)
    if kernel is None:
        if (impl is AttentionImpl.AUTO and cached and current_platform() == "cpu"
                and k_BSKD.shape[1] >= BLOCKED_MIN_SLOTS):
            return tree_attention.Impl.BLOCKED, False
        return None
    kv_bytes = 2 * k_BSKD.size * jnp.dtype(k_BSKD.dtype).itemsize
    if impl is AttentionImpl.AUTO and kv_bytes < AUTO_KERNEL_MIN_KV_BYTES:
        return None
    if tree_attention.unsupported_reason(kernel[0], q_shape, k_BSKD.shape,
                                         dtype=dtype) is not None:
        return None
    return kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kernel_with_reference_grad(kernel, window, q, k, v, lengths, positions, mask):
    """The Pallas kernel forward; gradients (training on short sequences) come from the
    reference, whose result the kernel's equals."""
    impl, interpret = kernel
    if impl is tree_attention.Impl.BLOCKED:  # (k, v may be a bf16 cache's bits: see above)
        return tree_attention.blocked.tree_attention_blocked(
            q, k, v, lengths, positions, mask_BTT=mask, window=window)
    return tree_attention.tree_attention(
        q, k, v, lengths, positions, mask_BTT=mask, window=window, impl=impl,
        interpret=interpret,
    )


def _kernel_fwd(kernel, window, q, k, v, lengths, positions, mask):
    out = _kernel_with_reference_grad(kernel, window, q, k, v, lengths, positions, mask)
    return out, (q, k, v, lengths, positions, mask)


def _kernel_bwd(kernel, window, saved, g):
    q, k, v, lengths, positions, mask = saved
    _, vjp = jax.vjp(
        lambda q, k, v: attention_reference(q, k, v, lengths, positions, mask_BTT=mask,
                                            window=window),
        q, k, v,
    )
    return (*vjp(g), None, None, None)


_kernel_with_reference_grad.defvjp(_kernel_fwd, _kernel_bwd)


def _rematerialized(fn, **static):
    """`fn` whose backward pass recomputes the [B, H, T, S] scores instead of storing them
    (training memory then stays linear in the number of layers); no cost without gradients."""
    return jax.checkpoint(functools.partial(fn, **static))


# Keys a step of a long prefill's blocked attention scores per query chunk (`attention`'s
# `prefill`): [chunk, heads, block] fp32 scores a step, 64 MiB for 512 queries of 32 heads.
# The reference scored every slot: Llama-3-8B shapes compiled for an H100, a 32K-token
# prompt, reference attention: 2 GiB of scores a chunk.
PREFILL_KEY_BLOCK = 1024


def _causal_in_query_chunks(q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, *, window, chunk,
                            blocked: bool = False, in_place: bool = False):
    """Causal attention one query chunk at a time (`lax.map`). For chunk i, the new tokens of
    earlier chunks are simply part of the cached prefix (length + i * chunk), which is exact
    because a causal block's token t sits at slot length + t with position length + t.
    `blocked`: each chunk through `tree_attention_blocked` (no gradient: its loop's trip count
    is traced), which visits only the blocks of keys the chunk's queries may see. `in_place`
    (no gradient): each chunk's output over its queries (`map_in_place`)."""
    B, T, H, D = q_BTHD.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    q = jnp.pad(q_BTHD, ((0, 0), (0, pad), (0, 0), (0, 0)))  # padded queries are dropped
    positions = jnp.pad(positions_BT, ((0, 0), (0, pad)))
    q_nBCHD = q.reshape(B, n, chunk, H, D).swapaxes(0, 1)
    pos_nBC = positions.reshape(B, n, chunk).swapaxes(0, 1)

    if blocked:
        reference = functools.partial(tree_attention.blocked.tree_attention_blocked,
                                      window=window, block=PREFILL_KEY_BLOCK)
    else:
        reference = _rematerialized(attention_reference, window=window)

    def one(q_BCHD, i, pos_BC):
        return reference(q_BCHD, k_BSKD, v_BSKD, lengths_B + i * chunk, pos_BC)

    chunks = jnp.arange(n, dtype=lengths_B.dtype)
    if in_place:
        out = map_in_place(one, q_nBCHD, chunks, pos_nBC)
    else:
        out = jax.lax.map(lambda args: one(*args), (q_nBCHD, chunks, pos_nBC))
    return out.swapaxes(0, 1).reshape(B, n * chunk, H, D)[:, :T]


# ------------------------------------------------------- fused causal attention (cuDNN, GPU)


FUSED_IMPLEMENTATION = "cudnn"  # jax.nn.dot_product_attention's; tests run "xla" on CPUs


def fused_causal(q_BTHD, k_BTKD, v_BTKD, *, window: int | None,
                 implementation: str | None = None) -> jax.Array:
    """Causal self-attention of a block with no cached prefix through
    `jax.nn.dot_product_attention` (cuDNN's flash attention on GPU: the [T, T] scores never
    reach HBM, forward or backward). Same visibility as the reference: a query sees the keys
    at or before it, fewer than `window` positions back. `implementation="xla"` runs the same
    call anywhere (tests)."""
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(
        q_BTHD, k_BTKD, v_BTKD, is_causal=True, local_window_size=local,
        implementation=implementation or FUSED_IMPLEMENTATION)


FUSED_DTYPES = (jnp.bfloat16, jnp.float16)  # what cuDNN's fused attention takes
GPU_BACKENDS = ("gpu", "cuda")  # an NVIDIA GPU's platform (`jax.default_backend()`: "gpu")


def fused_causal_usable(dtype, heads: int, kv_heads: int, head_dim: int,
                        windows=(None,)) -> bool:
    """Whether cuDNN runs a cache-free causal block: on a GPU (`current_platform()`), in
    bf16 / fp16, and only once a small probe of these (per-shard) head counts, head dim and
    each window (forward and gradients under `shard_map`, as the models call it) compiled,
    ran and matched the reference there. A failed probe warns once and leaves the reference
    in charge; so does a GPU with no devices in this process (a compile-only topology: there
    is nothing to probe on). Call it outside `shard_map` (it runs a program of its own;
    inside `jit` is fine)."""
    platform = current_platform()
    if platform not in GPU_BACKENDS or jnp.dtype(dtype) not in map(jnp.dtype, FUSED_DTYPES):
        return False
    return all(_probe_fused_causal(jnp.dtype(dtype).name, heads, kv_heads, head_dim, window,
                                   FUSED_IMPLEMENTATION, platform)
               for window in sorted(set(windows), key=str))


@functools.lru_cache(maxsize=None)
def _probe_fused_causal(dtype: str, heads: int, kv_heads: int, head_dim: int,
                        window: int | None, implementation: str, platform: str) -> bool:
    from jax.sharding import Mesh, PartitionSpec as P

    with jax.ensure_compile_time_eval():  # a concrete run, even while a caller is traced
        T = 256
        kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(0), 4)
        q = jax.random.normal(kq, (2, T, heads, head_dim), dtype)
        k = jax.random.normal(kk, (2, T, kv_heads, head_dim), dtype)
        v = jax.random.normal(kv, (2, T, kv_heads, head_dim), dtype)
        g = jax.random.normal(kg, (2, T, heads, head_dim), jnp.float32)
        lengths = jnp.zeros((2,), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
        try:
            device = jax.devices(platform)[0]
        except RuntimeError:  # compiling for a GPU this process has no backend for
            return False
        q, k, v, g, lengths, positions = jax.device_put((q, k, v, g, lengths, positions), device)
        mesh = Mesh(np.array([device]), ("probe",))

        def outputs(fn):
            def loss(q, k, v):
                return jnp.sum(fn(q, k, v).astype(jnp.float32) * g)

            def both(q, k, v):
                return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

            run = jax.shard_map(both, mesh=mesh, in_specs=(P(),) * 3, out_specs=P(),
                                check_vma=False)
            return [np.asarray(x, np.float32) for x in jax.tree.leaves(jax.jit(run)(q, k, v))]

        try:
            got = outputs(functools.partial(fused_causal, window=window,
                                            implementation=implementation))
        except Exception as error:  # cuDNN missing or too old, or these shapes unsupported
            warnings.warn(f"cuDNN fused attention unavailable ({type(error).__name__}: "
                          f"{str(error)[:300]}); causal blocks without a cache use the reference")
            return False
        want = outputs(lambda q, k, v: attention_reference(q, k, v, lengths, positions,
                                                           window=window))
    for a, b in zip(got, want):
        if not np.all(np.abs(a - b) <= 0.05 * np.max(np.abs(b)) + 0.02):
            warnings.warn("cuDNN fused attention disagrees with the reference on a probe; "
                          "causal blocks without a cache use the reference")
            return False
    return True
