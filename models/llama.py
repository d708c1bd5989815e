"""The Llama family (Llama 1/2/3, Mistral, Qwen2/2.5) as pure functions over a param pytree.

Params (global shapes; `layers` is a list so the decode loop reads each layer's weights in
place, see PITFALLS):

    embed       [V, E]            vocab-parallel rows
    layers[i]   attn_norm [E], q [E, H, D], k [E, K, D], v [E, K, D], o [H, D, E],
                (q_bias [H, D], k_bias [K, D], v_bias [K, D], o_bias [E]),
                mlp_norm [E], gate [E, F], up [E, F], down [F, E],
                (gate_bias [F], up_bias [F], down_bias [E])
    final_norm  [E]
    lm_head     [E, V]            absent when the embeddings are tied

`forward` is written per tensor-parallel shard: it sees its local heads / MLP columns /
vocabulary rows and reduces with `psum` over the "tp" mesh axis. Run it through
`jaxdec.model.forward` (shard_map) rather than directly.

Legend: B batch, T new tokens, E model width, H/K query/KV heads, D head dim, F MLP width,
V vocabulary, N logit positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdec.cache import Cache
from jaxdec.config import ModelConfig
from jaxdec.models import layers as L
from jaxdec.parallel import TP


def param_axes(config: ModelConfig) -> dict:
    """Logical axis names of every parameter (same structure as the params)."""

    def layer():
        axes = {
            "attn_norm": ("embed",),
            "q": ("embed", "q_heads", "head_dim"),
            "k": ("embed", "kv_heads", "head_dim"),
            "v": ("embed", "kv_heads", "head_dim"),
            "o": ("q_heads", "head_dim", "embed"),
            "mlp_norm": ("embed",),
            "gate": ("embed", "mlp"),
            "up": ("embed", "mlp"),
            "down": ("mlp", "embed"),
        }
        if config.qkv_bias:
            axes.update(q_bias=("q_heads", "head_dim"), k_bias=("kv_heads", "head_dim"),
                        v_bias=("kv_heads", "head_dim"))
        if config.o_bias:
            axes["o_bias"] = ("embed",)
        if config.mlp_bias:
            axes.update(gate_bias=("mlp",), up_bias=("mlp",), down_bias=("embed",))
        return axes

    axes = {
        "embed": ("vocab", "embed"),
        "layers": [layer() for _ in range(config.num_layers)],
        "final_norm": ("embed",),
    }
    if not config.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(config: ModelConfig, *, vocab_size: int | None = None) -> dict:
    """Global shape of every parameter; `vocab_size` overrides the (padded) vocabulary."""
    E, H, K, D, F = (config.hidden_size, config.num_heads, config.num_kv_heads,
                     config.head_dim, config.intermediate_size)
    V = vocab_size or config.vocab_size
    sizes = {"vocab": V, "embed": E, "q_heads": H, "kv_heads": K, "head_dim": D, "mlp": F}
    return jax.tree.map(
        lambda axes: tuple(sizes[a] for a in axes), param_axes(config),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def init_params(
    config: ModelConfig, key: jax.Array, *, dtype=jnp.float32, vocab_size: int | None = None,
    std: float = 0.02,
) -> dict:
    """Random params: normal(0, std) matrices, zero biases, unit norms (leaf i drawn from the
    i-th of `jax.random.split(key, leaves)`, in tree order; `jaxdec.init_model` draws the
    same values one leaf at a time)."""
    shapes = param_shapes(config, vocab_size=vocab_size)
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    return jax.tree.unflatten(treedef, [
        init_leaf(leaf_kind(jax.tree_util.keystr(path)), shape, k, dtype=dtype, std=std)
        for (path, shape), k in zip(flat, keys)])


def leaf_kind(path: str) -> str:
    """How a parameter (by its keystr path) is initialised: "ones", "zeros" or "normal"."""
    if path.endswith("norm']"):
        return "ones"
    if path.endswith("bias']"):
        return "zeros"
    return "normal"


def init_leaf(kind: str, shape: tuple, key: jax.Array, *, dtype, std: float) -> jax.Array:
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _embed_lookup(embed_VE: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    """Vocab-parallel lookup: each shard fills the rows it owns, then one psum."""
    local_vocab = embed_VE.shape[0]
    local_ids = tokens_BT - jax.lax.axis_index(TP) * local_vocab
    owned = (local_ids >= 0) & (local_ids < local_vocab)
    rows = jnp.take(embed_VE, jnp.clip(local_ids, 0, local_vocab - 1), axis=0)
    return jax.lax.psum(jnp.where(owned[..., None], rows, 0).astype(embed_VE.dtype), TP)


def _local_kv(weight_EKD, bias_KD, config: ModelConfig, tp: int):
    """This shard's KV projection. When tp exceeds the KV heads the projections are
    replicated and each shard keeps the one head its query heads read."""
    if tp <= config.num_kv_heads:
        return weight_EKD, bias_KD
    head = jax.lax.axis_index(TP) * config.num_kv_heads // tp
    weight = jax.lax.dynamic_slice_in_dim(weight_EKD, head, 1, axis=1)
    bias = None if bias_KD is None else jax.lax.dynamic_slice_in_dim(bias_KD, head, 1, axis=0)
    return weight, bias


def _attention_block(layer: dict, x_BTE, inv_rms_BT1, positions_BT, kv_entry, lengths_B,
                     mask_BTT, *, config: ModelConfig, tp: int, window, inv_freq, impl):
    """x_BTE and inv_rms_BT1: the attention norm's factors (`L.rms_norm_factored`)."""
    q = L.project("bte,ehd->bthd", x_BTE, layer["q"], inv_rms_BT1)
    k_w, k_b = _local_kv(layer["k"], layer.get("k_bias"), config, tp)
    v_w, v_b = _local_kv(layer["v"], layer.get("v_bias"), config, tp)
    k = L.project("bte,ekd->btkd", x_BTE, k_w, inv_rms_BT1)
    v = L.project("bte,ekd->btkd", x_BTE, v_w, inv_rms_BT1)
    if config.qkv_bias:
        q, k, v = q + layer["q_bias"], k + k_b, v + v_b
    q = L.apply_rope(q, positions_BT, inv_freq)
    k = L.apply_rope(k, positions_BT, inv_freq)
    if kv_entry is None:  # no cache: the new tokens are the whole context
        keys, values = k, v
    else:
        kv_entry = kv_entry.write(k, v, lengths_B)
        keys, values = kv_entry.k, kv_entry.v
    attn = L.attention(q, keys, values, lengths_B, positions_BT, mask_BTT=mask_BTT, window=window,
                       impl=impl)
    out = jax.lax.psum(jnp.einsum("bthd,hde->bte", attn, layer["o"]), TP)
    if config.o_bias:
        out = out + layer["o_bias"]
    return out, kv_entry


def _mlp_block(layer: dict, x_BTE, inv_rms_BT1, config: ModelConfig):
    """x_BTE and inv_rms_BT1: the MLP norm's factors (`L.rms_norm_factored`)."""
    biases = {"gate": layer["gate_bias"], "up": layer["up_bias"]} if config.mlp_bias else None
    out = jax.lax.psum(L.gated_mlp(x_BTE, layer["gate"], layer["up"], layer["down"], biases,
                                   inv_rms_BT1), TP)
    if config.mlp_bias:
        out = out + layer["down_bias"]
    return out


def forward(
    params: dict,
    tokens_BT: jax.Array,
    positions_BT: jax.Array,
    cache: Cache | None,
    mask_BTT: jax.Array | None = None,
    logits_indices_BN: jax.Array | None = None,
    *,
    config: ModelConfig,
    tp: int,
    attention: L.AttentionImpl = L.AttentionImpl.AUTO,
):
    """One forward over T new tokens per row, per tensor-parallel shard.

    Args:
      params: this shard's params.
      tokens_BT, positions_BT: int32 new tokens and their positions.
      cache: this shard's cache; the new K/V are written at slots [length, length + T) and
        the lengths are left unchanged (the caller commits). None: no cache, the T tokens are
        the whole context (positions must then start at 0).
      mask_BTT: which new tokens each new token sees (causal when None).
      logits_indices_BN: compute logits only at these token indices (e.g. each row's last
        prompt token); all T positions when None.
      config: the model config; tp: the tensor-parallel degree (static); attention: the
        attention implementation (static).
    Returns:
      (logits [B, N or T, V/tp] fp32 for this shard's vocabulary rows,
       hidden [B, T, E] after the final norm, the updated cache or None).
    """
    inv_freq = L.rope_inv_freq(config.rope, config.head_dim)
    x = _embed_lookup(params["embed"], tokens_BT)
    lengths = None if cache is None else cache.lengths
    new_entries = []
    for i, layer in enumerate(params["layers"]):
        entry = None if cache is None else cache.layers[i]
        h, inv_rms = L.rms_norm_factored(x, layer["attn_norm"], config.rms_norm_eps)
        attn, entry = _attention_block(
            layer, h, inv_rms, positions_BT, entry, lengths, mask_BTT,
            config=config, tp=tp, window=config.layer_windows[i], inv_freq=inv_freq,
            impl=attention,
        )
        x = x + attn
        h, inv_rms = L.rms_norm_factored(x, layer["mlp_norm"], config.rms_norm_eps)
        x = x + _mlp_block(layer, h, inv_rms, config)
        new_entries.append(entry)
    hidden = L.rms_norm(x, params["final_norm"], config.rms_norm_eps)
    picked = hidden
    if logits_indices_BN is not None:
        picked = jnp.take_along_axis(hidden, logits_indices_BN[..., None], axis=1)
    if config.tie_word_embeddings:
        logits = jnp.einsum("bne,ve->bnv", picked, params["embed"],
                            preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("bne,ev->bnv", picked, params["lm_head"],
                            preferred_element_type=jnp.float32)
    new_cache = None if cache is None else cache.replace(layers=tuple(new_entries))
    return logits, hidden, new_cache
