"""Building blocks shared by the model families: RMSNorm, rotary embeddings, the gated MLP,
and the single attention entry point.

Shape legend: B batch, T new tokens, S cache slots, H query heads, K KV heads, G = H // K
query heads per KV head, D head dim, E model width, F MLP width.
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.config import RopeConfig

# Large but finite: a query that sees no key at all (a padding row) gets a uniform
# distribution instead of NaNs, and exp(_MASKED - max) underflows to exactly 0 otherwise.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with the statistics in fp32; the scale is applied in the input dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


# ---------------------------------------------------------------------------- rotary embeddings


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [D/2] (float32) after the configured scaling.

    "llama3" scaling (Llama 3.1) leaves high frequencies alone, divides low frequencies (waves
    longer than original_max / low_freq_factor) by `factor`, and interpolates smoothly between.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / rope.theta**exponents
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        old_context = float(rope.original_max_position_embeddings)
        wavelen = 2 * np.pi / inv_freq
        # smooth = 0 on the low-frequency side (fully scaled), 1 on the high side (unscaled).
        smooth = (old_context / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smooth = np.clip(smooth, 0.0, 1.0)
        inv_freq = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
    return inv_freq.astype(np.float32)


def apply_rope(x_BTND: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates the two halves of each head (the HF "rotate_half" layout), in fp32."""
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BTND.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BTND.dtype)


# --------------------------------------------------------------------------------- MLP


def gated_mlp(x_BTE, gate_EF, up_EF, down_FE, biases=None) -> jax.Array:
    """SwiGLU MLP: down(silu(gate(x)) * up(x)). Under tensor parallelism F is the local shard
    and the result is a partial sum the caller reduces."""
    gate = x_BTE @ gate_EF
    up = x_BTE @ up_EF
    if biases is not None:
        gate, up = gate + biases["gate"], up + biases["up"]
    out = (jax.nn.silu(gate) * up) @ down_FE
    return out


# --------------------------------------------------------------------------- attention


class AttentionImpl(enum.Enum):
    """Which attention implementation the entry point runs. AUTO picks the best available for
    the backend (today: the jnp reference everywhere; Pallas kernels plug in here)."""

    AUTO = "auto"
    REFERENCE = "reference"


def visible_slots(
    lengths_B: jax.Array,
    positions_BT: jax.Array,
    num_slots: int,
    *,
    mask_BTT: jax.Array | None = None,
    window: int | None = None,
) -> jax.Array:
    """Which cache slots each new token may attend to: bool [B, T, S].

    Slots below the row's length hold the cached prefix (slot index == position). The T new
    tokens sit at slots [length, length + T): token t sees new token u when `mask[b, t, u]`
    (causal, u <= t, when mask is None). With a sliding window, a key is visible only when
    query position - key position < window.
    """
    T = positions_BT.shape[1]
    slots = jnp.arange(num_slots, dtype=jnp.int32)
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


def attention_reference(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    lengths_B: jax.Array,
    positions_BT: jax.Array,
    *,
    mask_BTT: jax.Array | None = None,
    window: int | None = None,
) -> jax.Array:
    """Readable jnp attention over the cache, fp32 scores and softmax. See `attention`."""
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    q_BTKGD = q_BTHD.reshape(B, T, K, H // K, D)
    scores = jnp.einsum(
        "btkgd,bskd->bkgts", q_BTKGD, k_BSKD, preferred_element_type=jnp.float32
    ) * (D**-0.5)
    visible_BTS = visible_slots(lengths_B, positions_BT, S, mask_BTT=mask_BTT, window=window)
    scores = jnp.where(visible_BTS[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum(
        "bkgts,bskd->btkgd", probs.astype(v_BSKD.dtype), v_BSKD, preferred_element_type=jnp.float32
    )
    return out.reshape(B, T, H, D).astype(q_BTHD.dtype)


def attention(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    lengths_B: jax.Array,
    positions_BT: jax.Array,
    *,
    mask_BTT: jax.Array | None = None,
    window: int | None = None,
    impl: AttentionImpl = AttentionImpl.AUTO,
    query_chunk: int = 512,
) -> jax.Array:
    """The one attention entry point: T new queries against a row's cache.

    The new tokens' keys and values are already written at slots [length, length + T) of
    `k`/`v`; the queries see the cached prefix plus the new tokens allowed by `mask_BTT`
    (causal when None, a tree's ancestor mask during verification), limited to a sliding
    `window` when given.

    Args:
      q_BTHD: queries, already rotated.
      k_BSKD, v_BSKD: the cache (one layer), K dividing H.
      lengths_B: int32 number of cached tokens per row (before the new ones).
      positions_BT: int32 positions of the new tokens (length + depth for a tree; with a
        causal mask, length + t).
      query_chunk: causal blocks longer than this (long prefills) are processed this many
        queries at a time, so memory grows with chunk x S instead of T x S.
    Returns:
      [B, T, H, D] in the query dtype.
    """
    if not isinstance(impl, AttentionImpl):
        raise TypeError(f"impl must be an AttentionImpl, got {impl!r}")
    if q_BTHD.shape[2] % k_BSKD.shape[2]:
        raise ValueError(
            f"query heads {q_BTHD.shape[2]} are not a multiple of KV heads {k_BSKD.shape[2]}"
        )
    T = q_BTHD.shape[1]
    if mask_BTT is not None or T <= query_chunk:
        return _rematerialized(attention_reference, window=window)(
            q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, mask_BTT=mask_BTT
        )
    return _causal_in_query_chunks(
        q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, window=window, chunk=query_chunk
    )


def _rematerialized(fn, **static):
    """`fn` whose backward pass recomputes the [B, H, T, S] scores instead of storing them
    (training memory then stays linear in the number of layers); no cost without gradients."""
    return jax.checkpoint(functools.partial(fn, **static))


def _causal_in_query_chunks(q_BTHD, k_BSKD, v_BSKD, lengths_B, positions_BT, *, window, chunk):
    """Causal attention one query chunk at a time (`lax.map`). For chunk i, the new tokens of
    earlier chunks are simply part of the cached prefix (length + i * chunk), which is exact
    because a causal block's token t sits at slot length + t with position length + t."""
    B, T, H, D = q_BTHD.shape
    n = -(-T // chunk)
    pad = n * chunk - T
    q = jnp.pad(q_BTHD, ((0, 0), (0, pad), (0, 0), (0, 0)))  # padded queries are dropped
    positions = jnp.pad(positions_BT, ((0, 0), (0, pad)))
    q_nBCHD = q.reshape(B, n, chunk, H, D).swapaxes(0, 1)
    pos_nBC = positions.reshape(B, n, chunk).swapaxes(0, 1)

    reference = _rematerialized(attention_reference, window=window)

    def one(args):
        i, q_BCHD, pos_BC = args
        return reference(q_BCHD, k_BSKD, v_BSKD, lengths_B + i * chunk, pos_BC)

    out = jax.lax.map(one, (jnp.arange(n, dtype=lengths_B.dtype), q_nBCHD, pos_nBC))
    return out.swapaxes(0, 1).reshape(B, n * chunk, H, D)[:, :T]
