"""Tree-verification attention: one kernel for decode (T = 1), chain and tree verification
over the KV cache, with a GPU (Triton) and a TPU (Mosaic) variant and a jnp reference.

    out_BTHD = tree_attention(q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT,
                              mask_BTT=tree_mask, window=None)

`Impl.AUTO` runs the kernel for the platform of the queries' devices (the default backend's
under a trace) when it supports the shapes (see `unsupported_reason`) and the reference
otherwise; naming a kernel runs it or raises. `Impl.MOSAIC_GPU` (hopper.py, a Mosaic GPU
kernel for Hopper, written for verification of 16 or more tokens) runs only when named.
`interpret=True` runs a named kernel through Pallas's interpreter (any backend, for tests;
AUTO on a CPU has no kernel and runs the reference). `Impl.BLOCKED` (blocked.py) is jnp too,
walking the cache a block at a time up to the rows' furthest slot: the models' CPU path over
long caches. Every implementation computes the same function (see `tree_attention`), and
gradients through a kernel are the reference's.
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.pallas_kernels.tree_attention import blocked, common, gpu, hopper, tpu
from jaxdec.pallas_kernels.tree_attention.common import MAX_QUERIES, BlockSizes
from jaxdec.pallas_kernels.tree_attention.hopper import HopperBlockSizes
from jaxdec.pallas_kernels.tree_attention.reference import (
    tree_attention_reference,
    visible_slots,
)

__all__ = [
    "BlockSizes", "HopperBlockSizes", "Impl", "MAX_QUERIES", "tree_attention",
    "tree_attention_reference", "unsupported_reason", "visible_slots",
]


class Impl(enum.Enum):
    """Which implementation `tree_attention` runs."""

    AUTO = "auto"  # the backend's kernel when it takes the shapes, else the reference
    REFERENCE = "reference"  # jnp (any backend)
    BLOCKED = "blocked"  # blocked.py: jnp, the cache a block at a time (any backend)
    TRITON = "triton"  # gpu.py: Triton-lowered Pallas (CUDA / ROCm, or interpret)
    MOSAIC = "mosaic"  # tpu.py: Mosaic TPU Pallas (TPU, or interpret)
    MOSAIC_GPU = "mosaic_gpu"  # hopper.py: Mosaic GPU for Hopper (or interpret, jax >= 0.11)


_KERNELS = {Impl.TRITON: gpu, Impl.MOSAIC: tpu}
_BACKEND_KERNEL = {"gpu": Impl.TRITON, "cuda": Impl.TRITON, "rocm": Impl.TRITON,
                   "tpu": Impl.MOSAIC}


def backend_kernel(backend: str | None = None) -> Impl | None:
    """The kernel for a backend (the default backend when None), or None (e.g. CPU)."""
    return _BACKEND_KERNEL.get(backend or jax.default_backend())


def platform_of(x) -> str | None:
    """The platform of a concrete jax array's devices; None for a traced value or a numpy
    array (whose platform is the default backend's)."""
    if not isinstance(x, jax.Array):
        return None
    try:
        devices = x.devices()
    except jax.errors.ConcretizationTypeError:  # a tracer: its devices are not known here
        return None
    return next(iter(devices)).platform


# The Triton kernel's third pipeline stage: where the packed query rows fill a 64-row tile
# and a key / value block row takes at most 256 bytes (head_dim 128 in bf16 / fp16: three
# stages and the query tile take 112 KiB, still two programs per multiprocessor). On the
# H200 (bench/results/kernels-h200, 2026-11-27) three stages beat two in all 8 swept cases
# at T = 16 and 64 (contexts 4K and 64K, batch 1 and 8), by 5-29%.
DEEP_PIPELINE_MIN_ROWS = 64
DEEP_PIPELINE_MAX_ROW_BYTES = 256


def default_block_sizes(impl: Impl, num_slots: int, *, q_shape=None, num_kv_heads=None,
                        dtype=None) -> BlockSizes:
    """Block sizes for a kernel and a cache length: TPU blocks must divide the cache. For the
    Triton kernel, the queries' shape [B, T, H, D], the KV heads and the dtype (bf16 when
    None) choose the pipeline depth (`DEEP_PIPELINE_MIN_ROWS`); without them, two stages."""
    if impl is Impl.MOSAIC:
        for block_k in (512, 256, 128, 64, 32, 16, 8):
            if num_slots % block_k == 0:
                return BlockSizes(block_k=block_k)
        return BlockSizes(block_k=num_slots)
    block_k = 64
    while block_k > 16 and block_k > num_slots:
        block_k //= 2
    num_stages = 2
    if q_shape is not None and num_kv_heads is not None:
        _, T, H, D = q_shape
        row_bytes = D * jnp.dtype(dtype or jnp.bfloat16).itemsize
        if (T * (H // num_kv_heads) >= DEEP_PIPELINE_MIN_ROWS
                and row_bytes <= DEEP_PIPELINE_MAX_ROW_BYTES):
            num_stages = 3
    return BlockSizes(block_k=block_k, num_stages=num_stages)


def _impl(impl) -> Impl:
    """An `Impl`, or its value ("auto", "reference", "triton", ...), as an `Impl`."""
    if isinstance(impl, str) and impl in {i.value for i in Impl}:
        impl = Impl(impl)
    if not isinstance(impl, Impl):
        raise TypeError(f"impl must be a tree_attention.Impl or one of "
                        f"{[i.value for i in Impl]}, got {impl!r}")
    return impl


def unsupported_reason(impl: Impl, q_shape, k_shape, block_sizes=None, *, dtype=None,
                       window: int | None = None) -> str | None:
    """Why a kernel (an `Impl` or its value) cannot run these shapes (None when it can).
    `dtype` (the queries'; None: not checked) matters to `Impl.MOSAIC` (no fp16) and
    `Impl.MOSAIC_GPU`, `window` to the latter only."""
    impl = _impl(impl)
    if impl is Impl.AUTO:
        raise ValueError("unsupported_reason asks about one implementation (triton, mosaic, "
                         "mosaic_gpu, ...), not AUTO, which picks among them")
    T, H, D = q_shape[1], q_shape[2], q_shape[3]
    S = k_shape[1]
    if impl in (Impl.REFERENCE, Impl.BLOCKED):  # jnp: any shapes
        return None
    if T > MAX_QUERIES:
        return f"{T} new tokens per row; the kernels take at most {MAX_QUERIES}"
    if impl is Impl.MOSAIC_GPU:
        rows = common.num_rows(T, H // k_shape[2], hopper.ROWS)
        return hopper.check_config(dtype or "bfloat16", D, S, rows, window,
                                   block_sizes or HopperBlockSizes())
    block_sizes = block_sizes or default_block_sizes(
        impl, S, q_shape=q_shape, num_kv_heads=k_shape[2], dtype=dtype)
    return _KERNELS[impl].check_config(D, S, block_sizes, dtype)


def tree_attention(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    lengths_B: jax.Array,
    positions_BT: jax.Array,
    *,
    mask_BTT: jax.Array | None = None,
    window: int | None = None,
    impl: Impl = Impl.AUTO,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """T new queries per row against the KV cache, under a tree (or causal) mask.

    Scores are q . k / sqrt(D), softmax in fp32. A query that sees no key at all (its own
    slot hidden by the mask, nothing cached) gets zeros.

    Args:
      q_BTHD: queries, already rotated; bf16, fp16 or fp32 (fp32 accumulation throughout).
      k_BSKD, v_BSKD: one layer's cache, in the queries' dtype, the new tokens' K/V written at
        slots [length, length + T) (those past the cache's end are not in it: a tree larger
        than the room left, whose nodes there are never accepted); K divides H. Slots no
        query sees must hold finite values (zeros, or keys and values written before): they
        are multiplied by zero, and 0 * inf is NaN.
      lengths_B: integer cached tokens per row before the new ones.
      positions_BT: integer positions of the new tokens (length + depth in a tree).
      mask_BTT: bool, new token t sees new token u when mask[b, t, u] (causal when None).
      window: sliding-window size, or None.
      impl: an `Impl` or its value ("auto", "reference", "triton", ...); interpret: run a
        named kernel in Pallas's interpreter.
      block_sizes: kernel tiling: a `BlockSizes` (defaults from `default_block_sizes`), or a
        `HopperBlockSizes` for `Impl.MOSAIC_GPU`.
    Returns:
      [B, T, H, D] in the query dtype. Differentiable: a kernel's gradient is the
      reference's (the kernels have no backward pass of their own).
    """
    impl = _impl(impl)
    sizes_type = HopperBlockSizes if impl is Impl.MOSAIC_GPU else BlockSizes
    if block_sizes is not None and not isinstance(block_sizes, sizes_type):
        raise TypeError(f"block_sizes must be a {sizes_type.__name__} for impl={impl.value}, "
                        f"got {block_sizes!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(
            window, (int, np.integer)) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    # Positions are int32: a wider window hides nothing more (a huge one is "no window").
    window = None if window is None else min(int(window), 2**31 - 1)
    q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT = (
        x if isinstance(x, (jax.Array, np.ndarray)) else jnp.asarray(x)
        for x in (q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT))
    if mask_BTT is not None and not isinstance(mask_BTT, (jax.Array, np.ndarray)):
        mask_BTT = jnp.asarray(mask_BTT)
    common.check_shapes(q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, mask_BTT)
    common.check_dtypes(q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, mask_BTT)
    B, T, H, D = q_BTHD.shape
    if B == 0 or T == 0 or k_BSKD.shape[1] == 0:  # nothing to compute, or no key to see
        return jnp.zeros((B, T, H, D), q_BTHD.dtype)
    if impl is Impl.AUTO:
        kernel = backend_kernel(platform_of(q_BTHD))
        if kernel is not None and unsupported_reason(
            kernel, q_BTHD.shape, k_BSKD.shape, block_sizes, dtype=q_BTHD.dtype
        ) is None:
            impl = kernel
        else:
            impl = Impl.REFERENCE
    if impl is Impl.REFERENCE:
        return tree_attention_reference(
            q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, mask_BTT=mask_BTT, window=window
        )
    if impl is Impl.BLOCKED:
        return blocked.tree_attention_blocked(
            q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, mask_BTT=mask_BTT, window=window
        )
    reason = unsupported_reason(impl, q_BTHD.shape, k_BSKD.shape, block_sizes,
                                dtype=q_BTHD.dtype, window=window)
    if reason is not None:
        raise ValueError(f"tree_attention impl={impl.value}: {reason}")
    # (Arrays on a CPU only: a trace may be compiled for another platform, a TPU's say.)
    if not interpret and platform_of(q_BTHD) == "cpu":
        raise ValueError(f"tree_attention impl={impl.value} is a Pallas kernel for "
                         f"{'a TPU' if impl is Impl.MOSAIC else 'a GPU'}: on a CPU pass "
                         "interpret=True (Pallas's interpreter) or impl='reference'")
    if impl is not Impl.MOSAIC_GPU:
        block_sizes = block_sizes or default_block_sizes(
            impl, k_BSKD.shape[1], q_shape=q_BTHD.shape, num_kv_heads=k_BSKD.shape[2],
            dtype=q_BTHD.dtype)
    return _kernel(impl, window, block_sizes or HopperBlockSizes(), interpret, q_BTHD, k_BSKD,
                   v_BSKD, lengths_B, positions_BT, mask_BTT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _kernel(impl, window, block_sizes, interpret, q, k, v, lengths, positions, mask):
    """A Pallas kernel's forward; its gradient is the reference's (`_kernel_bwd`)."""
    if impl is Impl.MOSAIC_GPU:
        return hopper.tree_attention_hopper(q, k, v, lengths, positions, mask,
                                            sizes=block_sizes, interpret=interpret)
    fn = gpu.tree_attention_gpu if impl is Impl.TRITON else tpu.tree_attention_tpu
    return fn(q, k, v, lengths, positions, mask, window=window, block_sizes=block_sizes,
              interpret=interpret)


def _kernel_fwd(impl, window, block_sizes, interpret, q, k, v, lengths, positions, mask):
    out = _kernel(impl, window, block_sizes, interpret, q, k, v, lengths, positions, mask)
    return out, (q, k, v, lengths, positions, mask)


def _kernel_bwd(impl, window, block_sizes, interpret, saved, g):
    q, k, v, lengths, positions, mask = saved
    _, vjp = jax.vjp(lambda q, k, v: tree_attention_reference(
        q, k, v, lengths, positions, mask_BTT=mask, window=window), q, k, v)
    return (*vjp(g), None, None, None)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)
