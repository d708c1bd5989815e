"""The matrix-vector product the kernel computes, in jnp: the oracle of its tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matvec_reference(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] accumulated in fp32 (IEEE for fp32 inputs): [M, N] fp32."""
    precision = jax.lax.Precision.HIGHEST if x_MK.dtype == jnp.float32 else None
    return jnp.dot(x_MK, w_KN, precision=precision, preferred_element_type=jnp.float32)
