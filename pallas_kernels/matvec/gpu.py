"""x [M, K] @ w [K, N] (or each of G matrices, w [G, K, N]) for a few rows (a decode step's
tokens) as a Triton-lowered Pallas kernel: split-K, streaming the weights once.

Grid (G, N / block_n, num_splits): program (g, j, s) multiplies the rows by the tile
[K / num_splits, block_n] of matrix g's columns j and split s, `block_k` weight rows per
step, and writes an fp32 partial [rows, block_n]; the partials of the splits are summed by
XLA, which
fuses that sum into whatever consumes the product. The rows go through the matrix units
padded to their 16-row tile (the weights' bytes, not the arithmetic, are the cost); one row
(decode at batch 1) is broadcast to the 16 inside the kernel instead, so no pad kernel runs
before the projection. Triton's software pipeline copies x and the weight tiles
asynchronously, `num_stages - 1` tiles ahead of the one being multiplied: a bandwidth-bound
kernel needs many bytes in flight. (A first version multiplied one row element-wise:
compiled for sm_90a it loaded x per weight element, 64 scalar loads beside 8 vector ones per
step, and pipelined nothing.)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxdec.pallas_kernels.tree_attention.common import _is_pow2, check_tiling

ROWS = 16  # the matrix units' smallest tile: fewer rows are padded to it


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tiling (static). block_n: output columns per program (a power of two >= 16); block_k:
    weight rows per pipeline step (a power of two >= 16: the dot's contraction); num_splits:
    programs along K (None: `default_num_splits`); num_warps, num_stages: Triton's."""

    block_n: int = 128
    block_k: int = 64
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self):
        check_tiling(self, ("block_n", "block_k", "num_warps", "num_stages"))


def default_num_splits(K: int, N: int, sizes: BlockSizes, num_cores: int = 132,
                       groups: int = 1) -> int:
    """The fewest splits (a power of two, each at least two `block_k` steps long and dividing
    K evenly) that give two programs per multiprocessor over the `groups` matrices, or the
    most that qualify."""
    tiles = groups * (N // sizes.block_n)
    best = 1
    splits = 1
    while K % (splits * sizes.block_k) == 0 and K // splits >= 2 * sizes.block_k:
        best = splits
        if tiles * splits >= 2 * num_cores:
            break
        splits *= 2
    return best


def check_config(M: int, K: int, N: int, sizes: BlockSizes, num_splits: int) -> str | None:
    """Why the kernel cannot take these shapes, or None when it can."""
    for name in ("block_n", "block_k"):
        value = getattr(sizes, name)
        if not _is_pow2(value) or value < 16:
            return f"{name}={value} must be a power of two >= 16 (Triton dot shapes)"
    if M > ROWS:
        return f"{M} rows: the kernel takes at most {ROWS} (a decode step's tokens)"
    if K < 1 or N < 1:
        return f"x [{M}, {K}] @ w [{K}, {N}] is empty"
    if N % sizes.block_n:
        return f"N={N} is not a multiple of block_n={sizes.block_n}"
    if K % (num_splits * sizes.block_k):
        return f"K={K} is not a multiple of num_splits x block_k = {num_splits * sizes.block_k}"
    return None


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, precision):
    # x_ref [R, K / splits] (R = 16, or 1: one row broadcast to the matrix units' 16),
    # w_ref [K / splits, block_n], o_ref [R, block_n] fp32.
    def step(i, acc):
        start = pl.multiple_of(i * block_k, block_k)
        x = x_ref[:, pl.ds(start, block_k)]
        if x.shape[0] == 1:
            x = jnp.broadcast_to(x, (ROWS, block_k))
        return acc + jax.lax.dot_general(
            x, w_ref[pl.ds(start, block_k), :], (((1,), (0,)), ((), ())),
            precision=precision, preferred_element_type=jnp.float32)

    steps = w_ref.shape[0] // block_k
    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((ROWS, o_ref.shape[1]), jnp.float32))
    if o_ref.shape[0] == 1:  # 16 identical rows: any one of them (max is exact)
        acc = jnp.max(acc, axis=0, keepdims=True)
    o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "num_cores"))
def matvec_gpu(x_MK, w, *, block_sizes: BlockSizes, interpret: bool = False,
               num_cores: int = 132):
    """See `jaxdec.pallas_kernels.matvec.matvec` (impl=TRITON): [M, N] fp32 for w [K, N],
    [G, M, N] for w [G, K, N]."""
    M, K = x_MK.shape
    w_GKN = w if w.ndim == 3 else w[None]  # one matrix: a group of one (a free reshape)
    G, _, N = w_GKN.shape
    bn, bk = block_sizes.block_n, block_sizes.block_k
    splits = block_sizes.num_splits or default_num_splits(K, N, block_sizes, num_cores, G)
    reason = check_config(M, K, N, block_sizes, splits)
    if reason:
        raise ValueError(reason)
    chunk = K // splits
    # One row (decode at batch 1) is broadcast inside the kernel: no pad, which would be one
    # more kernel before each projection; more rows are padded to the matrix units' 16.
    rows, x = (1, x_MK) if M == 1 else (ROWS, jnp.pad(x_MK, ((0, ROWS - M), (0, 0))))
    partials = pl.pallas_call(
        functools.partial(_kernel, block_k=bk, precision=(
            (jax.lax.Precision.HIGHEST,) * 2 if x_MK.dtype == jnp.float32 else None)),
        grid=(G, N // bn, splits),
        in_specs=[pl.BlockSpec((rows, chunk), lambda g, j, s: (0, s)),
                  pl.BlockSpec((None, chunk, bn), lambda g, j, s: (g, s, j))],
        out_specs=pl.BlockSpec((None, None, rows, bn), lambda g, j, s: (s, g, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, G, rows, N), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                             num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="matvec",
    )(x, w_GKN)
    out = partials.sum(axis=0)[:, :M]
    return out if w.ndim == 3 else out[0]
