"""Matrix-vector products for decoding: a decode step's few rows times a weight matrix,
bound by the weights' bytes. A Triton-lowered Pallas kernel (split-K, the weights streamed
once through a deep pipeline) and a jnp reference.

    y_MN = matvec(x_MK, w_KN)          # fp32, M <= 16
    y_GMN = matvec(x_MK, w_GKN)        # x times each of G matrices (gate and up: G = 2)

Not the models' default (`Model.with_matmul("pallas")` runs it, experimentally): in the H200
decode profile XLA's own fusions read the q|k|v weights at 64% of the bandwidth and o's at
74% (gate|up 89%, down 93%), and `bench/matvec.py` times this kernel against XLA's product
on the decode shapes of a Llama-3-8B layer (the decode benchmark's `jaxdec-matvec`, a whole
decode step with it) to say whether it should be. TPU: XLA's product (the reference) is the
path; the kernel is GPU-only.
"""

from __future__ import annotations

import enum

import jax

from jaxdec.pallas_kernels.matvec.gpu import ROWS, BlockSizes, default_num_splits
from jaxdec.pallas_kernels.matvec.reference import matvec_reference
from jaxdec.pallas_kernels.tree_attention.common import gpu_core_count

__all__ = ["BlockSizes", "Impl", "ROWS", "default_num_splits", "matvec", "matvec_reference",
           "unsupported_reason"]


class Impl(enum.Enum):
    """Which implementation `matvec` runs."""

    AUTO = "auto"  # the kernel on a GPU where it tiles the shapes, else the reference
    REFERENCE = "reference"  # jnp (XLA's product)
    TRITON = "triton"  # gpu.py (CUDA, or interpret)


def unsupported_reason(M: int, K: int, N: int, block_sizes: BlockSizes | None = None,
                       num_cores: int = 132, groups: int = 1) -> str | None:
    """Why the kernel cannot take x [M, K] @ w [K, N] (or w [groups, K, N]; static shapes),
    or None when it can."""
    from jaxdec.pallas_kernels.matvec import gpu

    sizes = block_sizes or BlockSizes()
    splits = sizes.num_splits or default_num_splits(K, N, sizes, num_cores, groups)
    return gpu.check_config(M, K, N, sizes, splits)


def matvec(x_MK: jax.Array, w: jax.Array, *, impl: Impl | str = Impl.AUTO,
           interpret: bool = False, block_sizes: BlockSizes | None = None,
           num_cores: int | None = None) -> jax.Array:
    """x [M, K] @ w [K, N] with fp32 accumulation: [M, N] fp32; for w [G, K, N], x times
    each of the G matrices in one kernel: [G, M, N] fp32.

    Args:
      x_MK: at most `ROWS` (16) rows for the kernel; any dtype jnp.dot takes.
      w: the weights [K, N] or [G, K, N], same dtype as x.
      impl: AUTO (the kernel on a GPU where it tiles the shapes, the reference elsewhere),
        REFERENCE or TRITON (a ValueError for shapes it does not tile).
      interpret: run the kernel through Pallas's interpreter (tests, any backend; under AUTO,
        as on a GPU).
      block_sizes: the kernel's tiling (defaults: `BlockSizes()`).
      num_cores: multiprocessors the split count is chosen for (default: the GPU's, 132
        without one).
    """
    try:
        impl = Impl(impl)
    except ValueError:
        raise ValueError(f"impl must be one of {[i.value for i in Impl]}, got {impl!r}") from None
    if x_MK.ndim != 2 or w.ndim not in (2, 3):
        raise ValueError(f"x must be [M, K] and w [K, N] or [G, K, N], got {x_MK.shape} and "
                         f"{w.shape}")
    if x_MK.shape[1] != w.shape[-2]:
        raise ValueError(f"x {x_MK.shape} and w {w.shape} do not share K")
    if x_MK.dtype != w.dtype:
        raise TypeError(f"x is {x_MK.dtype} and w {w.dtype}: the kernel takes one dtype")
    if impl is Impl.AUTO:  # the kernel where it runs and tiles the shapes
        kernel = (jax.default_backend() == "gpu" or interpret) and unsupported_reason(
            x_MK.shape[0], x_MK.shape[1], w.shape[-1], block_sizes,
            num_cores or (132 if interpret else gpu_core_count()),
            groups=w.shape[0] if w.ndim == 3 else 1) is None
        impl = Impl.TRITON if kernel else Impl.REFERENCE
    if impl is Impl.REFERENCE:
        return matvec_reference(x_MK, w)
    from jaxdec.pallas_kernels.matvec import gpu

    cores = num_cores or (132 if interpret else gpu_core_count())
    return gpu.matvec_gpu(x_MK, w, block_sizes=block_sizes or BlockSizes(),
                          interpret=interpret, num_cores=cores)
