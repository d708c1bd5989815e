"""Tree-verification attention as a Mosaic TPU Pallas kernel.

Grid (B, K, R, N, blocks per split): the last axis walks one split's key blocks
sequentially (the TPU grid is a loop), accumulating an online softmax in VMEM scratch; the
others are parallel (megacore). Row lengths and slot ranges are scalar-prefetched so each
step's key block index is data dependent: steps past a row's last block re-point at that
block (no new DMA) and skip their compute. The packed query rows (G heads x T tokens) are one
tile up to `MAX_ROWS`, else R tiles of `MAX_ROWS` (each reads the cache again: a 16 MiB
scoped VMEM held 1024 rows of bf16 but not 2048 rows of fp32 against 512-slot key blocks).
Blocks wholly inside the cached prefix (without a window) skip the visibility rule and its
masking.

Mosaic rules kept: the cache is viewed as [B, S, K * D] so a (block_k, D) block of one KV head
has a lane dimension of D (D a multiple of 128) and a sublane dimension block_k (a multiple of
8 dividing S); per-row vectors are [M, 1] columns.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxdec.pallas_kernels.tree_attention import common
from jaxdec.pallas_kernels.tree_attention.reference import MASKED


# What the kernel's cache blocks may hold: Mosaic TPU has no fp16 vectors (libtpu's compiler
# refuses the loads on v4, v5e, v5p and v6e: "Invalid vector type for load").
DTYPES = ("bfloat16", "float32")
# Packed query rows per program (a power of two): more rows are split into tiles of this many.
MAX_ROWS = 512


def check_config(head_dim: int, num_slots: int, block_sizes: common.BlockSizes,
                 dtype=None) -> str | None:
    """Why the Mosaic kernel cannot take these shapes (and `dtype`, the inputs'; None: not
    checked), or None when it can."""
    bk = block_sizes.block_k
    if dtype is not None and jnp.dtype(dtype).name not in DTYPES:
        return (f"dtype {jnp.dtype(dtype).name} is not supported on TPUs (Mosaic has no "
                f"vectors of it): {' or '.join(DTYPES)}")
    if head_dim % 128:
        return f"head_dim={head_dim} must be a multiple of 128 (TPU lane width)"
    if num_slots % 8:  # (before block_k: its default for such a cache is the cache itself)
        return (f"the cache's {num_slots} slots must be a multiple of 8 (the kernel's blocks, "
                "multiples of 8, divide it)")
    if bk % 8:
        return f"block_k={bk} must be a multiple of 8"
    if num_slots % bk:
        return f"block_k={bk} must divide the cache's {num_slots} slots"
    return None


def _kernel(
    lengths_ref,  # SMEM [B] int32
    lo_ref,  # SMEM [B] int32, block aligned
    hi_ref,  # SMEM [B] int32
    q_ref,  # [M, D]: M packed query rows (one tile of them)
    k_ref,  # [block_k, D]
    v_ref,  # [block_k, D]
    pos_ref,  # [M, 1] int32
    words_ref,  # [M, W] int32
    o_ref,  # [M, D] f32
    m_ref,  # [M, 1] f32
    l_ref,  # [M, 1] f32
    o_scr, m_scr, l_scr,  # VMEM accumulators, shaped as the outputs
    *,
    block_k: int,
    blocks_per_split: int,
    num_words: int,
    window: int | None,
    scale: float,
    precision,
):
    b, split, i = pl.program_id(0), pl.program_id(3), pl.program_id(4)
    length, hi = lengths_ref[b], hi_ref[b]
    # lax.div (truncation) rather than //: the values are non-negative, and floor division
    # lowers through `sign`, which Mosaic lowers only for a known TPU generation. (int32
    # divisors: a Python int would be an int64 operand in x64 mode.)
    block = jax.lax.div(lo_ref[b], jnp.int32(block_k)) + split * blocks_per_split + i
    start = block * block_k

    @pl.when(i == 0)
    def _init():
        o_scr[...] = jnp.zeros_like(o_scr)
        m_scr[...] = jnp.full_like(m_scr, MASKED)
        l_scr[...] = jnp.zeros_like(l_scr)

    def update(visible):
        """One key block into the online softmax; `visible` None: every slot is visible."""
        s = jax.lax.dot_general(
            q_ref[...], k_ref[...], (((1,), (1,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32,
        ) * scale  # [M, block_k]
        if visible is not None:
            s = jnp.where(visible, s, MASKED)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if visible is not None:
            p = jnp.where(visible, p, 0.0)
        correction = jnp.exp(m_prev - m_new)
        l_scr[...] = correction * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        pv = jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32,
        )
        o_scr[...] = correction * o_scr[...] + pv
        m_scr[...] = m_new

    def masked():
        slots = start + jax.lax.broadcasted_iota(jnp.int32, (q_ref.shape[0], block_k), 1)
        words = [words_ref[:, w : w + 1] for w in range(num_words)]
        update(common.visibility(slots, length, hi, start, pos_ref[...], words, window))

    if window is None:
        # A block wholly inside the cached prefix is visible to every row: no masking.
        cached = start + block_k <= length
        pl.when(cached)(lambda: update(None))
        pl.when(jnp.logical_not(cached) & (start < hi))(masked)
    else:
        pl.when(start < hi)(masked)

    @pl.when(i == blocks_per_split - 1)
    def _finish():
        o_ref[...] = o_scr[...]
        m_ref[...] = m_scr[...]
        l_ref[...] = l_scr[...]


@functools.partial(
    jax.jit, static_argnames=("window", "block_sizes", "interpret", "max_rows")
)
def tree_attention_tpu(
    q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, mask_BTT=None, *,
    window: int | None, block_sizes: common.BlockSizes, interpret: bool = False,
    max_rows: int = MAX_ROWS,
):
    """See `jaxdec.pallas_kernels.tree_attention.tree_attention` (impl=MOSAIC). `max_rows`
    (a power of two >= 16): packed query rows per program."""
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G = H // K
    bk = block_sizes.block_k
    rows = common.num_rows(T, G, 16)
    tile = min(rows, max_rows)  # both powers of two: the tiles cover the rows
    N = block_sizes.num_splits or 1  # the grid is sequential: splits only feed megacore
    blocks_per_split = -(-(S // bk) // N)
    W = common.num_words(T)

    packed = common.pack_inputs(q_BTHD, lengths_B, positions_BT, mask_BTT, num_kv_heads=K,
                                rows=rows, window=window, block_k=bk)
    # New tokens past the cache's end (length + T > S) are not in it: no block past the
    # last is read (a block index past it would be an out-of-bounds copy on a TPU).
    hi_B = jnp.minimum(packed.hi_B, S)
    pos_BM1 = packed.pos_BM[..., None]  # per-row vectors as [M, 1] columns
    words_BMW = packed.words_BWM.transpose(0, 2, 1)
    k_BSX = k_BSKD.reshape(B, S, K * D)  # free: contiguous
    v_BSX = v_BSKD.reshape(B, S, K * D)

    def kv_index(b, k, r, n, i, lengths_ref, lo_ref, hi_ref):
        last = jnp.maximum(jax.lax.div(hi_ref[b] + bk - 1, jnp.int32(bk)) - 1, 0)
        first = jax.lax.div(lo_ref[b], jnp.int32(bk)) + n * blocks_per_split + i
        return b, jnp.minimum(first, last), k

    row_block = lambda b, k, r, n, i, *_: (b, r, 0)  # noqa: E731
    out_block = lambda b, k, r, n, i, *_: (b, k, n, r, 0)  # noqa: E731
    kernel = functools.partial(
        _kernel, block_k=bk, blocks_per_split=blocks_per_split, num_words=W, window=window,
        scale=D**-0.5, precision=packed.precision,
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(B, K, rows // tile, N, blocks_per_split),
        in_specs=[
            pl.BlockSpec((None, None, tile, D), lambda b, k, r, n, i, *_: (b, k, r, 0)),
            pl.BlockSpec((None, bk, D), kv_index),
            pl.BlockSpec((None, bk, D), kv_index),
            pl.BlockSpec((None, tile, 1), row_block),
            pl.BlockSpec((None, tile, W), row_block),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, tile, D), out_block),
            pl.BlockSpec((None, None, None, tile, 1), out_block),
            pl.BlockSpec((None, None, None, tile, 1), out_block),
        ],
        scratch_shapes=[
            pltpu.VMEM((tile, D), jnp.float32),
            pltpu.VMEM((tile, 1), jnp.float32),
            pltpu.VMEM((tile, 1), jnp.float32),
        ],
    )
    o, m, l = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((B, K, N, rows, D), jnp.float32),
            jax.ShapeDtypeStruct((B, K, N, rows, 1), jnp.float32),
            jax.ShapeDtypeStruct((B, K, N, rows, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="tree_attention",
    )(packed.lengths_B, packed.lo_B, hi_B, packed.q_BKMD, k_BSX, v_BSX, pos_BM1,
      words_BMW)
    out = common.combine(o, m[..., 0], l[..., 0])
    return common.unpack_output(out, T, H).astype(q_BTHD.dtype)
