"""Tree-verification attention for Hopper GPUs as a Mosaic GPU Pallas kernel (experimental).

Where `gpu.py` (Triton) is the portable kernel, this one is written for the regime it leaves
far from the roofline: verification of 16 or more new tokens, whose packed query rows (G heads
x T tokens per KV head) make the cache walk a matrix-matrix problem. Each program is a
producer / consumer set of warpgroups, as on Hopper's fast attention kernels:

  * one memory warpgroup streams its split's key and value blocks from HBM into a ring of
    shared-memory slots with TMA copies, a slot refilled as soon as both consumers release it;
  * one or two compute warpgroups (64 packed query rows each) take the blocks in turn through
    `wgmma` (scores, then probabilities x values) with an online softmax in registers.

The kernel covers only the cache blocks wholly inside each row's cached prefix, which need no
mask at all: `tree_attention_hopper` pairs it with the Triton kernel over the rest
(`gpu.partials` from the first slot it left: the last, partial block and the T new tokens
under the tree mask, a few blocks of 64 slots), and `gpu._combine` merges both kernels'
partials exactly. Grid (row tiles, splits, B x K).

Shapes it takes (see `check_config`): bf16 or fp16, head_dim 64 or 128 (a power-of-two
multiple of 64 whose tiles fit in shared memory: 256's do at no tiling), no sliding window. Only `Impl.MOSAIC_GPU` runs it (AUTO does not yet: untimed on a GPU so far); jax 0.11
and newer run it in Mosaic GPU's interpreter for tests (0.10's interpreter cannot take the
transposed shared-memory operand of the scores' `wgmma`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxdec.pallas_kernels.tree_attention import common
from jaxdec.pallas_kernels.tree_attention.reference import MASKED

ROWS = 64  # packed query rows per compute warpgroup (one wgmma M tile)
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HopperBlockSizes:
    """Tiling of the Mosaic GPU kernel (static).

    Attributes:
      block_k: cache slots per pipeline step (a multiple of 64).
      num_stages: shared-memory slots of the key / value ring (at least 2).
      num_splits: programs per (row, KV head, row tile) along the sequence; None: chosen as
        for the Triton kernel, with one program per multiprocessor.
      probs_in_registers: feed the probabilities to the second product from registers (as
        Hopper's wgmma allows) instead of through shared memory; compiled only (Mosaic GPU's
        interpreter takes wgmma operands from shared memory), so off by default until
        measured.
      pingpong: with two compute warpgroups, alternate them on the tensor cores (one's
        softmax under the other's products, a shared barrier between them); off by default
        until measured.
    """

    block_k: int = 64
    num_stages: int = 3
    num_splits: int | None = None
    probs_in_registers: bool = False
    pingpong: bool = False

    def __post_init__(self):
        object.__setattr__(self, "num_splits", common.check_num_splits(self.num_splits))


def shared_memory_bytes(head_dim: int, rows: int, sizes: HopperBlockSizes) -> int:
    """Shared memory a program allocates (bf16 / fp16 tiles): the query tiles, the key and
    value ring, the probabilities' staging tiles, the fp32 partials' staging and the barriers
    (an allowance for their alignment, from the compiled kernel: 217,200 bytes at the
    default tiling, head_dim 128, two compute warpgroups)."""
    wgs = 2 if rows >= 2 * ROWS else 1
    tiles = wgs * ROWS * head_dim * 2 + 2 * sizes.num_stages * sizes.block_k * head_dim * 2
    staging = (0 if sizes.probs_in_registers else wgs * ROWS * sizes.block_k * 2
               ) + wgs * ROWS * (head_dim + 2) * 4
    return tiles + staging + 4096


MAX_SHARED_MEMORY = 232448  # bytes per block on sm_90 (227 KiB)
TMA_SLOT_TILE = 8  # the slot dimension's tile in the key / value copies


def check_config(q_dtype, head_dim: int, num_slots: int, rows: int, window: int | None,
                 sizes: HopperBlockSizes) -> str | None:
    """Why this kernel cannot take these shapes, or None when it can (`rows`: the packed
    query rows, `common.num_rows(T, G, ROWS)`)."""
    if jnp.dtype(q_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(q_dtype).name}: the Hopper kernel takes bfloat16 or float16"
    if head_dim % 64:
        return f"head_dim={head_dim} must be a multiple of 64 (128-byte swizzled tiles)"
    if head_dim & (head_dim - 1):  # the tail (`gpu.partials`, Triton) contracts over it
        return (f"head_dim={head_dim} must be a power of two: the last block and the new "
                "tokens run the Triton kernel, whose dot contraction needs one")
    if window is not None:
        return "sliding windows are not supported by the Hopper kernel"
    if sizes.block_k % 64 or sizes.block_k < 64:
        return f"block_k={sizes.block_k} must be a positive multiple of 64"
    if sizes.num_stages < 2:
        return f"num_stages={sizes.num_stages} must be at least 2"
    if num_slots < sizes.block_k:
        return f"the cache has {num_slots} slots, fewer than block_k={sizes.block_k}"
    if num_slots % TMA_SLOT_TILE:
        # The key / value copies go through TMA descriptors over the whole cache, tiled
        # (8 slots, 64 channels) like the shared-memory tiles; Mosaic GPU refuses a slot count
        # off that tiling when it compiles (its interpreter does not check).
        return (f"the cache has {num_slots} slots: the Hopper kernel needs a multiple of "
                f"{TMA_SLOT_TILE} (its TMA copies are tiled by {TMA_SLOT_TILE} slots)")
    if (smem := shared_memory_bytes(head_dim, rows, sizes)) > MAX_SHARED_MEMORY:
        return (f"block_k={sizes.block_k} x num_stages={sizes.num_stages} at head_dim="
                f"{head_dim} needs ~{smem} bytes of shared memory, over Hopper's "
                f"{MAX_SHARED_MEMORY}")
    return None


def _mosaic():
    """The Mosaic GPU Pallas module (imported late: it loads MLIR bindings)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu


def interpret_supported() -> bool:
    """Whether this jax's Mosaic GPU interpreter runs the kernel (0.11 and newer; 0.10's
    cannot take the transposed shared-memory operand of the scores' wgmma)."""
    major, minor = (int(x) for x in jax.__version__.split(".")[:2])
    return (major, minor) >= (0, 11)


def _interpret_params(interpret):
    """Mosaic GPU's interpreter settings for `interpret` (False: none, True: the defaults, or
    the caller's own `InterpretGPUParams`, e.g. with `detect_races=True`)."""
    if interpret is False or interpret is None:
        return None
    if not interpret_supported():
        raise NotImplementedError(
            f"the Hopper tree-attention kernel's interpret mode needs jax >= 0.11 "
            f"(this is {jax.__version__}); on CPU use impl=TRITON with interpret=True")
    if jax.config.jax_enable_x64:  # (compiled for a GPU, x64 is fine: see the tests)
        raise NotImplementedError(
            "the Hopper tree-attention kernel's interpret mode fails under jax_enable_x64 "
            "(jax 0.12's Mosaic GPU interpreter gives its memory warpgroup's loop int64 "
            "carries, which MLIR's verifier refuses); interpret it with x64 off, or use "
            "impl=TRITON with interpret=True")
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams() if interpret is True else interpret


def _dense_partials(q_BKMD, k_BSKD, v_BSKD, lengths_B, *, num_splits: int, num_slots_p2: int,
                    sizes: HopperBlockSizes, interpret):
    """Unnormalised partials (o [B, K, Np, M, D], m and l [B, K, Np, M], fp32) of each row's
    queries over the cache blocks wholly inside its cached prefix, [0, length // block_k)."""
    plgpu = _mosaic()
    B, K, M, D = q_BKMD.shape
    dtype = q_BKMD.dtype
    bk, stages, N = sizes.block_k, sizes.num_stages, num_splits
    compute_wgs = 2 if M >= 2 * ROWS else 1
    pingpong = sizes.pingpong and compute_wgs == 2
    row_tiles = M // (compute_wgs * ROWS)
    scale = D**-0.5 * _LOG2E  # scores in log2 units: exp2 below
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def body(lengths_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref):
        tile, split, bkh = (lax.axis_index(a) for a in ("tile", "split", "bk"))
        b, kh = lax.div(bkh, jnp.int32(K)), lax.rem(bkh, jnp.int32(K))
        n_full = lax.div(lengths_ref[b], jnp.int32(bk))
        per_split = lax.div(n_full + (N - 1), jnp.int32(N))
        first = split * per_split
        count = jnp.clip(n_full - first, 0, per_split)
        wg = lax.axis_index("wg")

        def scoped(q_smem, k_smem, v_smem, p_smem, o_smem, m_smem, l_smem, q_bar, k_bar,
                   v_bar, k_free, v_free, turn):
            def kv_at(ref, i):
                return ref.at[b, pl.ds(pl.multiple_of((first + i) * bk, bk), bk), kh]

            @pl.when(wg == compute_wgs)
            def _memory():
                plgpu.set_max_registers(40, action="decrease")
                for i in range(stages):  # fill the ring
                    @pl.when(i < count)
                    def _():
                        plgpu.copy_gmem_to_smem(kv_at(k_ref, i), k_smem.at[i], k_bar.at[i])
                        plgpu.copy_gmem_to_smem(kv_at(v_ref, i), v_smem.at[i], v_bar.at[i])

                @pl.loop(0, jnp.maximum(count - stages, 0))
                def _refill(i):
                    slot = lax.rem(i, jnp.int32(stages))
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.copy_gmem_to_smem(kv_at(k_ref, i + stages), k_smem.at[slot],
                                            k_bar.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])
                    plgpu.copy_gmem_to_smem(kv_at(v_ref, i + stages), v_smem.at[slot],
                                            v_bar.at[slot])

                # The last blocks' releases, so every barrier phase is observed before the
                # barriers go (the interpreter checks it; on the GPU it costs an idle wait).
                for j in range(stages):
                    i = jnp.maximum(count - stages, 0) + j

                    @pl.when(i < count)
                    def _():
                        plgpu.barrier_wait(k_free.at[lax.rem(i, jnp.int32(stages))])
                        plgpu.barrier_wait(v_free.at[lax.rem(i, jnp.int32(stages))])

            @pl.when(wg < compute_wgs)
            def _compute():
                plgpu.set_max_registers(232, action="increase")
                row0 = (tile * compute_wgs + wg) * ROWS
                q_tile = q_smem.at[wg]
                plgpu.copy_gmem_to_smem(q_ref.at[b, kh, pl.ds(row0, ROWS)], q_tile,
                                        q_bar.at[wg])
                plgpu.barrier_wait(q_bar.at[wg])
                rows_layout = plgpu.Layout.WGMMA.reduce(1)
                m = plgpu.layout_cast(jnp.full((ROWS,), MASKED, jnp.float32), rows_layout)
                l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), rows_layout)
                o = plgpu.layout_cast(jnp.zeros((ROWS, D), jnp.float32), plgpu.Layout.WGMMA)

                def meet():  # both compute warpgroups at one point (ping-pong only)
                    plgpu.barrier_arrive(turn)
                    plgpu.barrier_wait(turn)

                if pingpong:  # the second warpgroup starts one turn behind the first
                    pl.when(wg == 1)(meet)

                def step(i, carry):
                    o, m, l = carry
                    slot = lax.rem(i, jnp.int32(stages))
                    plgpu.barrier_wait(k_bar.at[slot])

                    def scores(acc):
                        plgpu.wgmma(acc, q_tile, k_smem.at[slot].T)
                        if pingpong:  # the product issued: the other warpgroup's turn
                            meet()
                        return acc[...]

                    s = pl.run_scoped(scores, plgpu.ACC((ROWS, bk), jnp.float32)) * scale
                    plgpu.barrier_arrive(k_free.at[slot])
                    m_new = jnp.maximum(m, s.max(axis=1))
                    alpha = jnp.exp2(m - m_new)
                    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                    l = l * alpha + p.sum(axis=1)
                    o = o * lax.broadcast_in_dim(alpha, o.shape, [0])
                    if sizes.probs_in_registers:
                        probs = p.astype(dtype)
                    else:  # through shared memory (what the interpreter runs)
                        p_smem.at[wg][...] = p.astype(dtype)
                        plgpu.commit_smem()
                        probs = p_smem.at[wg]
                    if pingpong:  # softmax done; the tensor cores once the other is done
                        plgpu.barrier_arrive(turn)
                        plgpu.barrier_wait(v_bar.at[slot])
                        plgpu.barrier_wait(turn)
                    else:
                        plgpu.barrier_wait(v_bar.at[slot])

                    def values(acc):
                        plgpu.wgmma(acc, probs, v_smem.at[slot])
                        return acc[...]

                    pv = pl.run_scoped(values, plgpu.ACC((ROWS, D), jnp.float32))
                    plgpu.barrier_arrive(v_free.at[slot])
                    return o + pv, m_new, l

                o, m, l = lax.fori_loop(0, count, step, (o, m, l))
                if pingpong:  # the first warpgroup's last turn, matching the second's first
                    pl.when(wg == 0)(meet)
                # The partials in natural-log units, as `gpu._combine` reads them.
                o_smem.at[wg][...] = o
                m_smem.at[wg][...] = m * (1.0 / _LOG2E)
                l_smem.at[wg][...] = l
                plgpu.commit_smem()
                rows = pl.ds(row0, ROWS)
                plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[b, kh, split, rows])
                plgpu.copy_smem_to_gmem(m_smem.at[wg], m_ref.at[b, kh, split, rows])
                plgpu.copy_smem_to_gmem(l_smem.at[wg], l_ref.at[b, kh, split, rows])
                plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            plgpu.SMEM((compute_wgs, ROWS, D), dtype, transforms=swizzled),
            plgpu.SMEM((stages, bk, D), dtype, transforms=swizzled),
            plgpu.SMEM((stages, bk, D), dtype, transforms=swizzled),
            # the probabilities' staging tiles (none when they stay in registers)
            None if sizes.probs_in_registers else plgpu.SMEM((compute_wgs, ROWS, bk), dtype,
                                                             transforms=swizzled),
            plgpu.SMEM((compute_wgs, ROWS, D), jnp.float32),
            plgpu.SMEM((compute_wgs, ROWS), jnp.float32),
            plgpu.SMEM((compute_wgs, ROWS), jnp.float32),
            plgpu.Barrier(num_barriers=compute_wgs),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2) if pingpong else None,
            collective_axes="wg",
        )

    f32 = jnp.float32
    return plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((B, K, num_slots_p2, M, D), f32),
                  jax.ShapeDtypeStruct((B, K, num_slots_p2, M), f32),
                  jax.ShapeDtypeStruct((B, K, num_slots_p2, M), f32)),
        grid=(row_tiles, N, B * K),
        grid_names=("tile", "split", "bk"),
        num_threads=compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interpret_params(interpret),
    )(lengths_B, q_BKMD, k_BSKD, v_BSKD)


def default_num_splits(batch: int, kv_heads: int, rows: int, num_slots: int, real_rows: int,
                       block_k: int, num_cores: int) -> int:
    """Splits per (row, KV head, row tile): `common.default_num_splits` with one program per
    multiprocessor (a program holds up to three warpgroups and ~210 KB of shared memory), and
    partials up to the bytes of cache a split reads (this kernel's cases do 4 x 64 rows of
    matrix work per byte at T = 64: an idle half of the GPU costs more than the partials)."""
    compute_wgs = 2 if rows >= 2 * ROWS else 1
    row_tiles = rows // (compute_wgs * ROWS)
    return common.default_num_splits(batch, kv_heads, row_tiles, num_slots, real_rows,
                                     block_k, num_cores=num_cores, programs_per_core=1,
                                     partial_share=1.0)


@functools.partial(jax.jit, static_argnames=("sizes", "interpret"))
def tree_attention_hopper(q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, mask_BTT=None, *,
                          sizes: HopperBlockSizes, interpret=False):
    """See `jaxdec.pallas_kernels.tree_attention.tree_attention` (impl=MOSAIC_GPU).
    `interpret`: False, True, or Mosaic GPU's `InterpretGPUParams` (tests: race detection);
    the Triton part runs in Pallas's generic interpreter whenever this one is on."""
    mosaic_interpret, interpret = interpret, interpret is not False and interpret is not None
    from jaxdec.pallas_kernels.tree_attention import gpu

    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G = H // K
    rows = common.num_rows(T, G, ROWS)
    if interpret and sizes.probs_in_registers:
        raise ValueError("probs_in_registers=True is compiled only: Mosaic GPU's interpreter "
                         "takes wgmma operands from shared memory")
    N = sizes.num_splits or default_num_splits(
        B, K, rows, S, T * G, sizes.block_k,
        num_cores=132 if interpret else common.gpu_core_count())
    lengths = lengths_B.astype(jnp.int32)
    q_BKMD = common.pack_queries(q_BTHD, K, rows)
    dense = _dense_partials(q_BKMD, k_BSKD, v_BSKD, lengths, num_splits=N,
                            num_slots_p2=common._next_pow2(N), sizes=sizes,
                            interpret=mosaic_interpret)
    # The rest (the last partial block of the cached prefix and the new tokens, under the
    # tree mask) through the Triton kernel, from the first slot the dense part left.
    start = lengths // sizes.block_k * sizes.block_k
    tail = gpu.partials(q_BTHD, k_BSKD, v_BSKD, lengths, positions_BT, mask_BTT,
                        window=None, rows=rows, lo_B=start,
                        block_sizes=common.BlockSizes(num_splits=1), interpret=interpret)
    out = gpu._combine([(*dense, N), tail], real_rows=T * G, dtype=q_BTHD.dtype,
                       interpret=interpret)
    return common.unpack_output(out, T, H)
