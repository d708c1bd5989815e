"""What the GPU and TPU kernels share: the packed layout they read, the visibility rule they
apply to one block of cache slots, and the flash-decoding combine of their partial results.

Packed layout (built in jnp, all small next to the cache):
  * queries [B, K, M, D]: the G query heads of a KV head and the T new tokens packed into
    M = T * G rows (row r = t * G + g), padded to the kernel's row tile, so the matrix units
    see at least 16 rows even at T = 1;
  * row positions [B, M] int32: the query position of each row (for the sliding window);
  * mask words [B, W, M] int32: new token u is visible to row r when bit u % 32 of
    word u // 32 is set (W = ceil(T / 32), rounded up to a power of two); the window's limit on new keys is folded in;
  * kv ranges [B] int32: `lo` (the first cache slot any query may see, aligned down to the
    key block) and `hi` = length + T (one past the last new token).
A kernel walks slots [lo, hi) block by block (split over `num_splits` programs per row and KV
head) and returns unnormalised partials (o, m, l); `combine` merges them exactly.

Shape legend: B batch, T new tokens, S cache slots, H query heads, K KV heads, G = H // K,
D head dim, M packed query rows, N splits, W mask words.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MAX_QUERIES = 128  # new tokens per row the kernels accept (4 mask words)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tiling of the kernels (static).

    Attributes:
      block_k: cache slots per step (a power of two >= 16 on GPU: it is the contraction of
        the probabilities x values product; a multiple of 8 on TPU).
      block_m: packed query rows per program on GPU (a power of two >= 16); the TPU kernel
        takes all rows at once.
      num_splits: programs per (row, KV head) along the sequence; None chooses from the
        shapes so the GPU is filled without the partials outweighing the cache.
      num_warps, num_stages: Triton launch parameters (GPU only).
    """

    block_k: int = 64
    block_m: int = 64
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        check_tiling(self, ("block_k", "block_m", "num_warps", "num_stages"))


def check_tiling(sizes, names: tuple[str, ...]) -> None:
    """A frozen tiling dataclass's fields checked in place: `num_splits` by
    `check_num_splits`, each of `names` an int >= 1 (a ValueError naming it); numpy ints are
    stored as Python ints."""
    object.__setattr__(sizes, "num_splits", check_num_splits(sizes.num_splits))
    for name in names:
        value = getattr(sizes, name)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
                or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        object.__setattr__(sizes, name, int(value))


def check_num_splits(num_splits) -> int | None:
    """`num_splits` as a Python int, or None (chosen from the shapes); a ValueError for
    anything else, 0 included (it would otherwise read as None)."""
    if num_splits is None:
        return None
    if isinstance(num_splits, (bool, np.bool_)) or not isinstance(
            num_splits, numbers.Integral) or num_splits < 1:
        raise ValueError(f"num_splits must be an int >= 1 or None (chosen from the shapes), "
                         f"got {num_splits!r}")
    return int(num_splits)


def cdiv(a: jax.Array, b: int) -> jax.Array:
    """Ceiling division of a non-negative traced integer by a static one, in `a`'s type:
    `pl.cdiv`'s one truncating `lax.div`, whose Python-int divisor is an int64 operand in x64
    mode (and fails to trace there)."""
    return jax.lax.div(a + (b - 1), jnp.asarray(b, a.dtype))


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_shapes(q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, mask_BTT) -> None:
    """Static checks of the entry point's arguments, raised before anything is traced."""
    if q_BTHD.ndim != 4 or k_BSKD.ndim != 4:
        raise ValueError(
            f"q must be [B, T, H, D] and k [B, S, K, D], got {q_BTHD.shape} and {k_BSKD.shape}"
        )
    B, T, H, D = q_BTHD.shape
    if k_BSKD.shape != v_BSKD.shape:
        raise ValueError(f"k shape {k_BSKD.shape} != v shape {v_BSKD.shape}")
    if k_BSKD.shape[0] != B or k_BSKD.shape[3] != D:
        raise ValueError(
            f"k {k_BSKD.shape} does not match q {q_BTHD.shape} in batch or head dim"
        )
    if H % k_BSKD.shape[2]:
        raise ValueError(f"query heads {H} are not a multiple of KV heads {k_BSKD.shape[2]}")
    if lengths_B.shape != (B,):
        raise ValueError(f"lengths must be [{B}], got {lengths_B.shape}")
    if positions_BT.shape != (B, T):
        raise ValueError(f"positions must be {(B, T)}, got {positions_BT.shape}")
    if mask_BTT is not None and mask_BTT.shape != (B, T, T):
        raise ValueError(f"mask must be {(B, T, T)}, got {mask_BTT.shape}")


FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def check_dtypes(q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, mask_BTT) -> None:
    """The entry point's dtypes: q, k and v one of bf16 / fp16 / fp32 (fp64 under x64),
    integer lengths and positions, a bool mask."""
    dtypes = {name: jnp.dtype(x.dtype) for name, x in
              (("q", q_BTHD), ("k", k_BSKD), ("v", v_BSKD))}
    floats = set(map(jnp.dtype, FLOAT_DTYPES)) | {jnp.dtype(jnp.float64)}
    for name, dtype in dtypes.items():
        if dtype not in floats:
            raise TypeError(f"{name} must be bf16, fp16 or fp32, got {dtype}")
    if len(set(dtypes.values())) > 1:
        raise TypeError("q, k and v must share one dtype, got "
                        + ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items()))
    for name, x in (("lengths", lengths_B), ("positions", positions_BT)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must be integers, got {x.dtype}")
    if mask_BTT is not None and mask_BTT.dtype != jnp.bool_:
        raise TypeError(f"mask must be bool, got {mask_BTT.dtype}")


def num_rows(T: int, G: int, multiple: int) -> int:
    """Packed query rows M: T * G rounded up to a power of two >= `multiple`."""
    return max(multiple, _next_pow2(T * G))


def pack_queries(q_BTHD: jax.Array, num_kv_heads: int, rows: int) -> jax.Array:
    """[B, T, H, D] -> [B, K, M, D] with row t * G + g = query head k * G + g of token t."""
    B, T, H, D = q_BTHD.shape
    G = H // num_kv_heads
    q = q_BTHD.reshape(B, T, num_kv_heads, G, D).transpose(0, 2, 1, 3, 4)
    q = q.reshape(B, num_kv_heads, T * G, D)
    return jnp.pad(q, ((0, 0), (0, 0), (0, rows - T * G), (0, 0)))


def unpack_output(out_BKMD: jax.Array, T: int, num_heads: int) -> jax.Array:
    """The inverse of `pack_queries`: [B, K, M, D] -> [B, T, H, D]."""
    B, K, _, D = out_BKMD.shape
    G = num_heads // K
    out = out_BKMD[:, :, : T * G].reshape(B, K, T, G, D).transpose(0, 2, 1, 3, 4)
    return out.reshape(B, T, num_heads, D)


def num_words(T: int) -> int:
    """Mask words per row: ceil(T / 32) rounded up to a power of two (Triton block shapes)."""
    return _next_pow2(-(-T // 32))


def row_positions(positions_BT: jax.Array, G: int, rows: int) -> jax.Array:
    """[B, T] -> [B, M] int32: each token's position repeated for its G heads."""
    pos = jnp.repeat(positions_BT.astype(jnp.int32), G, axis=1)
    return jnp.pad(pos, ((0, 0), (0, rows - pos.shape[1])))


def mask_words(
    positions_BT: jax.Array, mask_BTT: jax.Array | None, window: int | None, G: int, rows: int
) -> jax.Array:
    """The new-token mask bit-packed per packed row: int32 [B, W, M]."""
    B, T = positions_BT.shape
    if mask_BTT is None:
        allowed = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    else:
        allowed = mask_BTT.astype(bool)
    if window is not None:  # new keys sit at their own positions, not at their slots
        allowed &= (positions_BT[:, :, None] - positions_BT[:, None, :]) < window
    W = num_words(T)
    allowed = jnp.pad(allowed, ((0, 0), (0, 0), (0, W * 32 - T)))
    bits = (allowed.reshape(B, T, W, 32).astype(jnp.uint32)
            << jnp.arange(32, dtype=jnp.uint32)[None, None, None])
    words = jax.lax.bitcast_convert_type(bits.sum(axis=-1, dtype=jnp.uint32), jnp.int32)
    words = jnp.repeat(words, G, axis=1)  # [B, T * G, W]
    words = jnp.pad(words, ((0, 0), (0, rows - T * G), (0, 0)))  # padded rows see no new key
    return words.transpose(0, 2, 1)


class Packed(NamedTuple):
    """The kernels' inputs besides the cache (see the module doc for the layout)."""

    q_BKMD: jax.Array
    pos_BM: jax.Array
    words_BWM: jax.Array
    lengths_B: jax.Array
    lo_B: jax.Array
    hi_B: jax.Array
    # HIGHEST for fp32 inputs (IEEE dots, not TF32), else DEFAULT: named, so that a user's
    # jax_default_matmul_precision="highest" does not ask Mosaic TPU for fp32 contraction of
    # bf16 operands, which its compiler refuses ("Bad lhs type").
    precision: Any


def pack_inputs(q_BTHD, lengths_B, positions_BT, mask_BTT, *, num_kv_heads: int, rows: int,
                window: int | None, block_k: int) -> Packed:
    """Everything both kernels read besides the cache, in the packed layout."""
    G = q_BTHD.shape[2] // num_kv_heads
    lo_B, hi_B = kv_ranges(lengths_B, positions_BT, window, block_k)
    return Packed(
        q_BKMD=pack_queries(q_BTHD, num_kv_heads, rows),
        pos_BM=row_positions(positions_BT, G, rows),
        words_BWM=mask_words(positions_BT, mask_BTT, window, G, rows),
        lengths_B=lengths_B.astype(jnp.int32), lo_B=lo_B, hi_B=hi_B,
        precision=(jax.lax.Precision.HIGHEST if q_BTHD.dtype == jnp.float32
                   else jax.lax.Precision.DEFAULT),
    )


def kv_ranges(
    lengths_B: jax.Array, positions_BT: jax.Array, window: int | None, block_k: int
) -> tuple[jax.Array, jax.Array]:
    """(lo, hi) int32 [B]: the slots a row's queries can see, lo aligned down to block_k."""
    lengths = lengths_B.astype(jnp.int32)
    hi = lengths + positions_BT.shape[1]
    lo = jnp.zeros_like(lengths)
    if window is not None:
        lo = jnp.maximum(0, jnp.min(positions_BT, axis=1).astype(jnp.int32) - window + 1)
        lo = jnp.minimum(lo, lengths)  # the new tokens themselves are always walked
    return lo // block_k * block_k, hi


def visibility(slots, lengths, hi, start, pos_rows, words, window):
    """Which (row, slot) pairs of one block are visible: bool [M, block_k].

    Args:
      slots: int32 [1, block_k] slot indices of the block.
      lengths, hi, start: int32 scalars; slots below `start` belong to an earlier block
        (a block shifted back to stay inside the cache) and are hidden here.
      pos_rows: int32 [M, 1] query positions; words: W int32 [M, 1] mask words.
    Written with elementwise ops only (shifts by per-slot amounts), so both Triton and
    Mosaic lower it.
    """
    cached = slots < lengths
    if window is None:
        cached_ok = cached
    else:
        cached_ok = cached & (pos_rows - slots < window)
    u = slots - lengths  # index among the new tokens (negative for cached slots)
    new_ok = jnp.zeros(cached_ok.shape, jnp.bool_)
    for w, word in enumerate(words):
        shift = jnp.clip(u - 32 * w, 0, 31)
        in_word = (u >= 32 * w) & (u < 32 * w + 32)
        new_ok = new_ok | (in_word & (((word >> shift) & 1) == 1))
    return (cached_ok | new_ok) & (slots >= start) & (slots < hi)


def combine(o_BKNMD: jax.Array, m_BKNM: jax.Array, l_BKNM: jax.Array) -> jax.Array:
    """Merges the splits' unnormalised partials exactly: [B, K, M, D] fp32.

    A split that saw no visible key has l = 0 and contributes nothing; a row that saw none at
    all (only padding rows) comes out as zeros.
    """
    m_max = jnp.max(m_BKNM, axis=2, keepdims=True)
    scale = jnp.where(l_BKNM > 0, jnp.exp(m_BKNM - m_max), 0.0)
    l = jnp.sum(l_BKNM * scale, axis=2)
    o = jnp.sum(o_BKNMD * scale[..., None], axis=2)
    return o / jnp.where(l > 0, l, 1.0)[..., None]


@functools.lru_cache(maxsize=None)
def gpu_core_count(default: int = 132) -> int:
    """The streaming multiprocessors of this process's first GPU (`default`, an H100's or
    H200's count, when there is none to ask: interpret mode, a compile-only device)."""
    try:
        return int(getattr(jax.devices("gpu")[0], "core_count", default))
    except RuntimeError:
        return default


def default_num_splits(batch: int, kv_heads: int, row_tiles: int, num_slots: int, rows: int,
                       block_k: int, num_cores: int = 132, programs_per_core: int = 2,
                       partial_share: float = 0.25, min_blocks: int = 1) -> int:
    """Splits per (row, KV head), chosen for how evenly the programs fill the GPU.

    A wave is `programs_per_core` programs on each of `num_cores` multiprocessors
    (`gpu_core_count()` where the kernel runs; the Triton kernel passes 8 // num_warps: two
    programs of 4 warps, ~250 registers per thread, fit an H100 multiprocessor). A split
    count's efficiency is the share of its last wave that is busy (waves / ceil(waves)); the
    count chosen is the smallest whose efficiency is within 85% of the best one's, among the
    counts that shorten the longest split (more splits with the same blocks per split only
    add partials). A split keeps at least `min_blocks` key blocks (one where the cache has
    fewer; the Triton kernel asks for 4: `gpu.MIN_BLOCKS_PER_SPLIT`), and the fp32 partials
    of the `rows` real query rows (rows x D, written once, read again by `combine`) stay
    within `partial_share` of the cache bytes the split reads (S / N slots x D, bf16 K and V;
    the Triton kernel: a quarter while it is bandwidth-bound, `gpu.PARTIAL_SHARE`). Enough
    tiles to nearly fill a wave take one split.

    (The rule before this one asked for two waves with at least 4 key blocks per split: 8
    splits, 64 programs for 132 multiprocessors, at 2K context in decoding, where the H200
    read its 8 MB of cache in 9.4 us, a fifth of its bandwidth. Without the 4-block floor,
    this one chose 17 and 33 splits at 1K and 4K, which the H200 ran slower than 4 and 16.)
    """
    tiles = batch * kv_heads * row_tiles
    wave = programs_per_core * num_cores
    if tiles >= 0.8 * wave:
        return 1
    blocks = -(-num_slots // block_k)
    most = max(1, min(blocks // min_blocks, int(partial_share * num_slots / rows), wave))
    efficiency = {}
    for n in range(1, most + 1):
        if n == 1 or -(-blocks // n) != -(-blocks // (n - 1)):
            waves = tiles * n / wave
            efficiency[n] = waves / math.ceil(waves)
    best = max(efficiency.values())
    return min(n for n, e in efficiency.items() if e >= 0.85 * best)
