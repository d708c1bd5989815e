"""Tree-verification attention in plain jnp: the readable oracle the kernels are checked
against (and the CPU path).

T new queries per row attend to the row's cached prefix plus the new tokens their mask allows.
Slot layout of the cache [B, S, K, D]: slots [0, length) hold the cached prefix (slot index ==
position); the T new tokens' keys/values sit at slots [length, length + T). New token t sees
new token u when `mask[b, t, u]` (causal when no mask is given, an ancestor mask for a tree).
A sliding `window` hides keys whose position is `window` or more behind the query's.

Shape legend: B batch, T new tokens, S cache slots, H query heads, K KV heads, G = H // K,
D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Large but finite: a query that sees no key at all gets a uniform distribution instead of
# NaNs (its output is then set to zeros, as the kernels' is), and exp(MASKED - max)
# underflows to exactly 0 otherwise.
MASKED = -0.7 * float(np.finfo(np.float32).max)


def visible_slots(
    lengths_B: jax.Array,
    positions_BT: jax.Array,
    num_slots: int,
    *,
    mask_BTT: jax.Array | None = None,
    window: int | None = None,
) -> jax.Array:
    """Which cache slots each new token may attend to: bool [B, T, S] (see the module doc)."""
    return slots_visibility(jnp.arange(num_slots, dtype=jnp.int32), lengths_B, positions_BT,
                            mask_BTT=mask_BTT, window=window)


def slots_visibility(
    slots_S: jax.Array,
    lengths_B: jax.Array,
    positions_BT: jax.Array,
    *,
    mask_BTT: jax.Array | None = None,
    window: int | None = None,
) -> jax.Array:
    """`visible_slots` for the slot indices `slots_S` (int32 [S], any of the cache's): bool
    [B, T, S]."""
    T = positions_BT.shape[1]
    slots = slots_S
    num_slots = slots.shape[0]
    rel_BS = slots[None, :] - lengths_B[:, None].astype(jnp.int32)  # index among the new tokens
    cached_BS = rel_BS < 0
    is_new_BS = (rel_BS >= 0) & (rel_BS < T)
    rel_idx_BS = jnp.clip(rel_BS, 0, T - 1)
    if mask_BTT is None:
        new_ok_BTS = rel_BS[:, None, :] <= jnp.arange(T, dtype=jnp.int32)[None, :, None]
    else:
        idx_BTS = jnp.broadcast_to(rel_idx_BS[:, None, :], (mask_BTT.shape[0], T, num_slots))
        new_ok_BTS = jnp.take_along_axis(mask_BTT.astype(bool), idx_BTS, axis=2)
    visible_BTS = cached_BS[:, None, :] | (is_new_BS[:, None, :] & new_ok_BTS)
    if window is not None:
        new_pos_BS = jnp.take_along_axis(positions_BT, rel_idx_BS, axis=1)
        key_pos_BS = jnp.where(cached_BS, slots[None, :], new_pos_BS)
        distance_BTS = positions_BT[:, :, None] - key_pos_BS[:, None, :]
        visible_BTS &= distance_BTS < window
    return visible_BTS


def tree_attention_reference(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    lengths_B: jax.Array,
    positions_BT: jax.Array,
    *,
    mask_BTT: jax.Array | None = None,
    window: int | None = None,
) -> jax.Array:
    """Attention of T new queries over a row's cache, fp32 scores and softmax.

    Args:
      q_BTHD: queries (already rotated), H a multiple of K.
      k_BSKD, v_BSKD: one layer's cache with the new tokens' K/V already written.
      lengths_B: int32 cached tokens per row (before the new ones).
      positions_BT: int32 positions of the new tokens (length + depth in a tree).
      mask_BTT: bool, which new tokens each new token sees (causal when None).
      window: sliding-window size, or None.
    Returns:
      [B, T, H, D] in the query dtype; zeros for a query that sees no key.
    """
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
    scores = jnp.einsum(
        "btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32
    ) * (D**-0.5)
    visible_BTS = visible_slots(lengths_B, positions_BT, S, mask_BTT=mask_BTT, window=window)
    scores = jnp.where(visible_BTS[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum(
        "bkgts,bskd->btkgd", probs.astype(v_BSKD.dtype), v_BSKD, preferred_element_type=jnp.float32
    )
    sees_BT = jnp.any(visible_BTS, axis=-1)
    out = jnp.where(sees_BT[:, :, None, None, None], out, 0.0)
    return out.reshape(B, T, H, D).astype(q_BTHD.dtype)
