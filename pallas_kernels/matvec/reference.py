"""The matrix-vector product the kernel computes, in jnp: the oracle of its tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matvec_reference(x_MK: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] accumulated in fp32 (IEEE for fp32 inputs): [M, N] fp32; for w
    [G, K, N], x times each of the G matrices: [G, M, N]."""
    precision = jax.lax.Precision.HIGHEST if x_MK.dtype == jnp.float32 else None
    if w.ndim == 3:  # x broadcast over the matrices: one batched product (see gate_up_product)
        x_GMK = jnp.broadcast_to(x_MK[None], (w.shape[0],) + x_MK.shape)
        return jnp.einsum("gmk,gkn->gmn", x_GMK, w, precision=precision,
                          preferred_element_type=jnp.float32)
    return jnp.dot(x_MK, w, precision=precision, preferred_element_type=jnp.float32)
