"""Tree-verification attention in jnp, walking the cache a block of slots at a time: the CPU's
path over long caches.

The reference (`reference.py`) scores every slot of the cache, so its cost follows the cache's
capacity: a decode step over a 16K-slot cache holding 70 tokens costs what a full one does.
Here a loop (`lax.fori_loop` with a traced trip count) visits only the blocks between the
first slot any query may see (0, or the window's start) and the furthest one (the longest
row's length + T), keeping an online softmax in fp32 as the GPU kernel does, so a step costs
what the rows hold. The visibility rule is the reference's (`reference.slots_visibility`);
the results equal the reference's up to fp32 summation order (with bf16 values, up to bf16
rounding too: the probabilities are rounded per block, unnormalised, before the product with
the values, the reference's once normalised). A query that sees no key at all (only possible for a tree
node that sees neither the prefix nor itself) gets zeros, as from the reference and the
kernels.

The cache may also be a bf16 cache's bits (uint16, as `jaxdec.cache.as_bits` carries one
through a CPU program): each block is sliced from the bits and read as bf16.

Shape legend: B batch, T new tokens, S cache slots, H query heads, K KV heads, G = H // K,
C slots a block, D head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdec.pallas_kernels.tree_attention.reference import MASKED, slots_visibility

BLOCK_SLOTS = 256  # slots a loop iteration scores (smaller caches take one block)


def tree_attention_blocked(
    q_BTHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    lengths_B: jax.Array,
    positions_BT: jax.Array,
    *,
    mask_BTT: jax.Array | None = None,
    window: int | None = None,
    block: int = BLOCK_SLOTS,
) -> jax.Array:
    """`tree_attention_reference`'s result (same arguments), its cost following the rows'
    lengths instead of the cache's slots; `block` slots a step (the whole cache when it has
    fewer). Returns [B, T, H, D] in the query dtype."""
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    if B == 0 or T == 0 or S == 0:  # nothing to compute, or no key to see
        return jnp.zeros((B, T, H, D), q_BTHD.dtype)
    G = H // K
    C = min(block, S)
    q_BTKGD = q_BTHD.reshape(B, T, K, G, D)
    lengths_B = lengths_B.astype(jnp.int32)
    positions_BT = positions_BT.astype(jnp.int32)
    # The slots some query may see: [lo, hi). A cached slot's position is its index, so a
    # window hides every slot more than `window - 1` behind the earliest query; the new
    # tokens' own slots (from each row's length on) are walked whatever their positions.
    hi = jnp.minimum(jnp.max(lengths_B) + T, S)
    lo = jnp.zeros((), jnp.int32)
    if window is not None:
        lo = jnp.minimum(jnp.min(positions_BT) - (window - 1), jnp.min(lengths_B))
        lo = jnp.clip(lo, 0, hi) // C * C
    count = (hi - lo + (C - 1)) // C
    iota_C = jnp.arange(C, dtype=jnp.int32)

    def step(i, carry):
        o, m, l = carry
        start = lo + i * C
        # The last block may pass the cache's end: read the last C slots instead and leave
        # out those the previous block covered (below `start`).
        offset = jnp.minimum(start, S - C)
        slots_C = offset + iota_C
        visible_BTC = slots_visibility(slots_C, lengths_B, positions_BT, mask_BTT=mask_BTT,
                                       window=window)
        visible_BTC &= (slots_C >= start)[None, None, :]
        k_BCKD, v_BCKD = _block(k_BSKD, offset, C), _block(v_BSKD, offset, C)
        s = jnp.einsum("btkgd,bckd->bkgtc", q_BTKGD, k_BCKD,
                       preferred_element_type=jnp.float32) * (D**-0.5)
        visible = visible_BTC[:, None, None]
        s = jnp.where(visible, s, MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = correction * l + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkgtc,bckd->bkgtd", p.astype(v_BCKD.dtype), v_BCKD,
                        preferred_element_type=jnp.float32)
        return correction[..., None] * o + pv, m_new, l

    # A zero that varies over the mesh axes the inputs vary over (under `shard_map`, a loop's
    # carry must keep its type; constants vary over none). The select folds away when
    # compiled. (Peeling the first block out of the loop gives the carry that type too, but
    # then the just-written cache has a second reader, and XLA's CPU backend copied it.)
    inputs = [x.reshape(-1)[0].astype(jnp.float32) for x in (q_BTHD, k_BSKD, v_BSKD)]
    zero = jnp.where(True, 0.0, sum(inputs))
    init = (jnp.zeros((B, K, G, T, D), jnp.float32) + zero,
            jnp.full((B, K, G, T), MASKED, jnp.float32) + zero,
            jnp.zeros((B, K, G, T), jnp.float32) + zero)
    o, _, l = jax.lax.fori_loop(0, count, step, init)
    out = o / jnp.where(l > 0, l, 1.0)[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q_BTHD.dtype)


def _block(x_BSKD: jax.Array, offset: jax.Array, C: int) -> jax.Array:
    """x[:, offset:offset + C], a bits cache's block (uint16) as its bf16 values."""
    block = jax.lax.dynamic_slice_in_dim(x_BSKD, offset, C, axis=1)
    if block.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(block, jnp.bfloat16)
    return block
