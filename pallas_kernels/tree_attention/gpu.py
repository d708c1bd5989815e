"""Tree-verification attention as a Triton-lowered Pallas kernel (GPU), flash-decoding style.

Grid (B, K * row_tiles, N): each program takes one row of the batch, one KV head, one tile of
packed query rows (the G heads x T new tokens of that KV head, see `common`) and one of N
splits of the slots [lo, hi) the row's queries can see. It streams its split's key/value
blocks once, applies the visibility rule (cached prefix + bit-packed tree mask + window) and
keeps an online softmax in fp32; a second, small kernel (`_combine`, the math of
`common.combine`) merges the N partials and writes the result in the query dtype (with one
split the kernel normalises and writes it itself: no partials, no second kernel). Blocks
wholly inside the cached prefix (without a window: all but the last one or two) skip the
visibility rule, whose integer work per score would otherwise rival the matrix products.

Triton rules kept by construction (and checked in `check_config`, since CUDA lowering on older
jax does not): power-of-two block shapes, every dot's contraction (D and block_k) >= 16, at
most 3 grid dimensions, index tables read inside the kernel rather than prefetched.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxdec.pallas_kernels.tree_attention import common
from jaxdec.pallas_kernels.tree_attention.reference import MASKED


# Key blocks a split reads at least. On the H200 (bench/results/kernels-h200, 2026-11-27),
# decode (T = 1) at batch 1 ran faster with 4 blocks per split than with the 1-2 that the
# wave-fill rule alone chose: at 1K 4 splits 12.7 us against 17 splits 14.0 us, at 4K 16
# splits 21.1 us against 33 splits 26.5 us (and 65 splits 42.2 us). The combine then read
# the splits one after another (a memory round trip each); it loads them at once since, so
# more splits may pay now: the kernels benchmark's decode sweep times 2 to 64 of them.
MIN_BLOCKS_PER_SPLIT = 4
# The fp32 partials' bytes allowed against a split's cache bytes: a quarter while the kernel
# is bandwidth-bound (decode, short chains), as much as the cache from 64 real query rows on,
# where each key block feeds 64+ rows of matrix work and the programs' count sets the time.
# (The H200 profile of 2026-11-27 at T = 64, batch 1: one split of 17 blocks at 1K and four
# of 16-17 blocks at 4K both took 29.5 us: the 1K case used a quarter of the programs.)
PARTIAL_SHARE = 0.25
PARTIAL_SHARE_MANY_ROWS = 1.0
MANY_ROWS = 64


def default_num_splits(batch: int, kv_heads: int, row_tiles: int, num_slots: int,
                       real_rows: int, block_sizes: common.BlockSizes,
                       num_cores: int) -> int:
    """The kernel's split count: `common.default_num_splits` with two programs of 4 warps per
    multiprocessor (8 // num_warps), at least `MIN_BLOCKS_PER_SPLIT` key blocks a split, and
    the partials' share by the real query rows (`PARTIAL_SHARE`, `PARTIAL_SHARE_MANY_ROWS`)."""
    return common.default_num_splits(
        batch, kv_heads, row_tiles, num_slots, real_rows, block_sizes.block_k,
        num_cores=num_cores, programs_per_core=max(1, 8 // block_sizes.num_warps),
        partial_share=PARTIAL_SHARE_MANY_ROWS if real_rows >= MANY_ROWS else PARTIAL_SHARE,
        min_blocks=MIN_BLOCKS_PER_SPLIT)


def check_config(head_dim: int, num_slots: int, block_sizes: common.BlockSizes,
                 dtype=None) -> str | None:
    """Why the Triton kernel cannot take these shapes, or None when it can (every input
    dtype: bf16, fp16, fp32)."""
    bk, bm = block_sizes.block_k, block_sizes.block_m
    if not common._is_pow2(head_dim) or head_dim < 16:
        return f"head_dim={head_dim} must be a power of two >= 16 (Triton dot contraction)"
    if not common._is_pow2(bk) or bk < 16:
        return f"block_k={bk} must be a power of two >= 16 (Triton dot contraction)"
    if not common._is_pow2(bm) or bm < 16:
        return f"block_m={bm} must be a power of two >= 16"
    if num_slots < bk:
        return f"the cache has {num_slots} slots, fewer than block_k={bk}"
    return None


def _kernel(
    lengths_ref,  # [] int32: cached tokens of this row
    lo_ref,  # [] int32: first slot any query of this row may see (block aligned)
    hi_ref,  # [] int32: length + T
    q_ref,  # [block_m, D]
    k_ref,  # [S, D]: this row's keys for this KV head
    v_ref,  # [S, D]
    pos_ref,  # [block_m] int32 query positions
    words_ref,  # [W, block_m] int32 mask words
    *out_refs,  # partials: o [block_m, D], m, l [block_m] (fp32); normalized: out [block_m, D]
    normalized: bool,
    block_k: int,
    num_splits: int,
    num_words: int,
    num_slots: int,
    row_tiles: int,
    real_rows: int,
    window: int | None,
    scale: float,
    precision,
):
    split = pl.program_id(2)
    length, lo, hi = lengths_ref[()], lo_ref[()], hi_ref[()]
    n_blocks = common.cdiv(hi - lo, block_k)
    per_split = common.cdiv(n_blocks, num_splits)
    first = split * per_split
    count = jnp.clip(n_blocks - first, 0, per_split)

    q = q_ref[...]
    pos = pos_ref[...][:, None]
    words = [words_ref[w, :][:, None] for w in range(num_words)]
    iota = jnp.arange(block_k, dtype=jnp.int32)[None, :]

    def update(carry, k, v, visible):
        """One key block into the online softmax; `visible` None: every slot is visible."""
        o, m, l = carry
        s = jax.lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32,
        ) * scale  # [block_m, block_k]
        if visible is not None:
            s = jnp.where(visible, s, MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        if visible is not None:
            p = jnp.where(visible, p, 0.0)
        correction = jnp.exp(m - m_new)
        l = correction * l + jnp.sum(p, axis=1)
        pv = jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32,
        )
        return correction[:, None] * o + pv, m_new, l

    def cached_block(i, carry):
        # Wholly inside the cached prefix (and no window): every row sees every slot, so the
        # visibility rule and its masking are skipped; the block is aligned and in range.
        start = pl.multiple_of(lo + (first + i) * block_k, block_k)
        return update(carry, k_ref[pl.ds(start, block_k), :], v_ref[pl.ds(start, block_k), :],
                      None)

    def masked_block(i, carry):
        start = lo + (first + i) * block_k
        # The last block may run past the cache end: shift it back and hide the slots the
        # previous block already covered (slots < start).
        off = jnp.minimum(start, num_slots - block_k)
        visible = common.visibility(off + iota, length, hi, start, pos, words, window)
        return update(carry, k_ref[pl.ds(off, block_k), :], v_ref[pl.ds(off, block_k), :],
                      visible)

    block_m, D = q_ref.shape
    init = (
        jnp.zeros((block_m, D), jnp.float32),
        jnp.full((block_m,), MASKED, jnp.float32),
        jnp.zeros((block_m,), jnp.float32),
    )
    # This split's blocks [first, first + count): the leading ones that lie wholly in the
    # cached prefix take the unmasked loop (all but the last block or two of a long context).
    n_cached = 0 if window is not None else jnp.maximum(length - lo, 0) // block_k
    unmasked = jnp.clip(n_cached - first, 0, count)
    carry = jax.lax.fori_loop(0, unmasked, cached_block, init)
    o, m, l = jax.lax.fori_loop(unmasked, count, masked_block, carry)
    if normalized:  # one split: the output itself (a row that saw no key: zeros)
        (out_ref,) = out_refs
        values = [(out_ref, (o / jnp.where(l > 0, l, 1.0)[:, None]).astype(out_ref.dtype))]
    else:
        values = list(zip(out_refs, (o, m, l)))
    if real_rows >= row_tiles * block_m:
        for ref, value in values:
            ref[...] = value
    else:  # padding rows (T * G below 16 or not a power of two): never read
        tile = pl.program_id(1) % row_tiles
        real = tile * block_m + jnp.arange(block_m, dtype=jnp.int32) < real_rows
        for ref, value in values:
            plgpu.store(ref, value, mask=real[:, None] if value.ndim == 2 else real)


@functools.partial(
    jax.jit, static_argnames=("window", "block_sizes", "interpret")
)
def tree_attention_gpu(
    q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, mask_BTT=None, *,
    window: int | None, block_sizes: common.BlockSizes, interpret: bool = False,
):
    """See `jaxdec.pallas_kernels.tree_attention.tree_attention` (impl=TRITON)."""
    B, T, H, D = q_BTHD.shape
    G = H // k_BSKD.shape[2]
    args = (q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, mask_BTT)
    rows = common.num_rows(T, G, 16)
    kw = dict(window=window, rows=rows, block_sizes=block_sizes, interpret=interpret)
    if num_splits(q_BTHD.shape, k_BSKD.shape, rows=rows, block_sizes=block_sizes,
                   interpret=interpret) == 1:  # nothing to merge: the kernel writes the output
        (out,), _ = _call(*args, **kw, normalized=True)
    else:
        part = partials(*args, **kw)
        out = _combine([part], real_rows=T * G, dtype=q_BTHD.dtype, interpret=interpret)
    return common.unpack_output(out, T, H)


def partials(q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, mask_BTT, *,
             window: int | None, rows: int, block_sizes: common.BlockSizes,
             lo_B: jax.Array | None = None, interpret: bool = False):
    """The kernel's unnormalised partials and their split count, (o [B, K, Np, rows, D],
    m [B, K, Np, rows], l [B, K, Np, rows], N): splits at or past N are not written.

    `rows` is the packed query rows (a power of two >= 16, at least T * G); `lo_B`, when
    given, is the first slot each row walks (aligned to block_k; the slots before it are left
    to another kernel, as `hopper.py` does with the blocks wholly inside the cached prefix).
    """
    (o, m, l), N = _call(q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, mask_BTT,
                         window=window, rows=rows, block_sizes=block_sizes, lo_B=lo_B,
                         interpret=interpret, normalized=False)
    return o, m, l, N


def num_splits(q_shape, k_shape, *, rows: int, block_sizes: common.BlockSizes,
               interpret: bool = False) -> int:
    """The split count the kernel runs for these shapes and `rows` packed query rows: the
    tiling's, or `default_num_splits` (on this process's GPU; an H100's 132 multiprocessors
    when interpreted)."""
    B, T, H, _ = q_shape
    S, K = k_shape[1], k_shape[2]
    row_tiles = rows // min(block_sizes.block_m, rows)
    return block_sizes.num_splits or default_num_splits(
        B, K, row_tiles, S, T * (H // K), block_sizes,
        num_cores=132 if interpret else common.gpu_core_count())


def _call(q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, mask_BTT, *, window, rows,
          block_sizes, interpret, normalized: bool, lo_B=None):
    """The kernel over the splits: ([o, m, l] partials, or with `normalized` (one split only)
    [out [B, K, rows, D] in the query dtype], N)."""
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G = H // K
    bk = block_sizes.block_k
    block_m = min(block_sizes.block_m, rows)
    row_tiles = rows // block_m
    N = num_splits(q_BTHD.shape, k_BSKD.shape, rows=rows, block_sizes=block_sizes,
                    interpret=interpret)
    if normalized and N != 1:
        raise ValueError(f"a normalized output needs one split, not {N}")
    Np = common._next_pow2(N)
    W = common.num_words(T)
    packed = common.pack_inputs(q_BTHD, lengths_B, positions_BT, mask_BTT, num_kv_heads=K,
                                rows=rows, window=window, block_k=bk)
    lo = packed.lo_B if lo_B is None else lo_B.astype(jnp.int32)

    kernel = functools.partial(
        _kernel, normalized=normalized, block_k=bk, num_splits=N, num_words=W, num_slots=S,
        row_tiles=row_tiles, real_rows=T * G, window=window,
        scale=D**-0.5,
        precision=(packed.precision,) * 2 if packed.precision else None,
    )
    scalar = pl.BlockSpec((None,), lambda b, i, n: (b,))
    if normalized:
        out_specs = [pl.BlockSpec((None, None, block_m, D),
                                  lambda b, i, n: (b, i // row_tiles, i % row_tiles, 0))]
        out_shape = [jax.ShapeDtypeStruct((B, K, rows, D), q_BTHD.dtype)]
    else:
        # Room for a power-of-two count of splits (`_combine` reads them as one block); the
        # programs write the first N, the rest is never read.
        partial_spec = pl.BlockSpec((None, None, None, block_m),
                                    lambda b, i, n: (b, i // row_tiles, n, i % row_tiles))
        out_specs = [pl.BlockSpec((None, None, None, block_m, D),
                                  lambda b, i, n: (b, i // row_tiles, n, i % row_tiles, 0)),
                     partial_spec, partial_spec]
        out_shape = [jax.ShapeDtypeStruct((B, K, Np, rows, D), jnp.float32),
                     jax.ShapeDtypeStruct((B, K, Np, rows), jnp.float32),
                     jax.ShapeDtypeStruct((B, K, Np, rows), jnp.float32)]
    outs = pl.pallas_call(
        kernel,
        grid=(B, K * row_tiles, N),
        in_specs=[
            scalar, scalar, scalar,
            pl.BlockSpec((None, None, block_m, D), lambda b, i, n: (b, i // row_tiles, i % row_tiles, 0)),
            pl.BlockSpec((None, S, None, D), lambda b, i, n: (b, 0, i // row_tiles, 0)),
            pl.BlockSpec((None, S, None, D), lambda b, i, n: (b, 0, i // row_tiles, 0)),
            pl.BlockSpec((None, block_m), lambda b, i, n: (b, i % row_tiles)),
            pl.BlockSpec((None, W, block_m), lambda b, i, n: (b, 0, i % row_tiles)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
        ),
        interpret=interpret,
        name="tree_attention",
    )(packed.lengths_B, lo, packed.hi_B, packed.q_BKMD, k_BSKD, v_BSKD, packed.pos_BM,
      packed.words_BWM)
    return list(outs), N


# fp32 elements of the partial outputs one combine program loads at once (32 KiB: 64 registers
# a thread at 4 warps). The splits are loaded together, not one after another: a loop over
# them waits out a memory round trip per split (a serial chain ~0.3-0.5 us a link on the
# H200: 4K decode took 26.5 us with 33 splits, 42.2 us with 65), so the combine's rows are
# tiled finely enough that every split of a tile fits in one load.
COMBINE_ELEMENTS = 8192


def combine_tiling(num_slots: tuple[int, ...], rows: int,
                   head_dim: int) -> tuple[int, tuple[int, ...]]:
    """(tile, chunks): the combine's rows a program (a power of two <= `rows`), and for each
    part of `num_slots` (its partials' power-of-two split room) the splits one load takes;
    a tile's splits past a chunk (more than `COMBINE_ELEMENTS` / D of them) take a few
    loads, issued together (an unrolled loop)."""
    widest = max(num_slots)
    tile = max(1, min(rows, COMBINE_ELEMENTS // (widest * head_dim)))
    tile = 1 << (tile.bit_length() - 1)  # a power of two
    chunks = tuple(min(n, max(1, COMBINE_ELEMENTS // (tile * head_dim))) for n in num_slots)
    return tile, tuple(1 << (c.bit_length() - 1) for c in chunks)


def _combine_kernel(*refs, num_splits: tuple[int, ...], chunks: tuple[int, ...]):
    """`common.combine` for one (row, KV head, row tile): each part's partials [Np, tile(, D)]
    merged exactly (refs: every part's o, m, l, then the output); a part's splits at or past
    its count were never written (any bits: selected away, never multiplied by a zero)."""
    parts = [refs[3 * i:3 * i + 3] for i in range(len(num_splits))]
    out_ref = refs[-1]
    written = []
    for (_, m_ref, l_ref), n in zip(parts, num_splits):
        split = jnp.arange(m_ref.shape[0], dtype=jnp.int32)[:, None] < n
        m, l = m_ref[...], l_ref[...]
        written.append((m, l, split & (l > 0)))  # a split that saw no visible key: nothing
    m_max = functools.reduce(jnp.maximum, [
        jnp.max(jnp.where(w, m, MASKED), axis=0) for m, _, w in written])
    total = sum(jnp.sum(jnp.where(w, l * jnp.exp(m - m_max[None, :]), 0.0), axis=0)
                for m, l, w in written)

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    for (o_ref, m_ref, l_ref), n, chunk in zip(parts, num_splits, chunks):
        for first in range(0, n, chunk):  # static: the loads do not wait on each other
            # (each chunk's m and l loaded again rather than sliced: Triton cannot slice a
            # value; with one chunk it is the same load as above)
            m, l = m_ref[first:first + chunk, :], l_ref[first:first + chunk, :]
            split = first + jnp.arange(chunk, dtype=jnp.int32)[:, None] < n
            live = (split & (l > 0))[:, :, None]
            weight = jnp.exp(m - m_max[None, :])[:, :, None]
            o = o_ref[first:first + chunk, :, :]  # [chunk, tile, D]
            acc = acc + jnp.sum(jnp.where(live, weight * o, 0.0), axis=0)
    out_ref[...] = (acc / jnp.where(total > 0, total, 1.0)[:, None]).astype(out_ref.dtype)


def _combine(parts, *, real_rows: int, dtype, interpret: bool):
    """The partials of one or more kernels, `parts` = [(o [B, K, Np, rows, D], m, l
    [B, K, Np, rows], N), ...], merged into [B, K, R, D] in `dtype`, R = the real rows rounded
    up to a power of two (at T = 1, the G heads: [B, K, G, D] is [B, 1, H, D] as it lies), in
    one kernel (XLA's combine takes two: the max, then the weighted sums). Its grid runs a
    program per `combine_tiling` tile of rows, each loading all of its tile's splits at once."""
    B, K, _, rows, D = parts[0][0].shape
    R = min(rows, common._next_pow2(real_rows))
    tile, chunks = combine_tiling(tuple(o.shape[2] for o, *_ in parts), R, D)
    in_specs, args = [], []
    for o, m, l, _ in parts:
        Np = o.shape[2]
        partial_spec = pl.BlockSpec((None, None, Np, tile), lambda b, k, t: (b, k, 0, t))
        in_specs += [pl.BlockSpec((None, None, Np, tile, D), lambda b, k, t: (b, k, 0, t, 0)),
                     partial_spec, partial_spec]
        args += [o, m, l]
    return pl.pallas_call(
        functools.partial(_combine_kernel, num_splits=tuple(n for *_, n in parts),
                          chunks=chunks),
        grid=(B, K, R // tile),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, tile, D), lambda b, k, t: (b, k, t, 0)),
        out_shape=jax.ShapeDtypeStruct((B, K, R, D), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="tree_attention_combine",
    )(*args)
