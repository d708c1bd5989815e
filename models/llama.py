"""The Llama family (Llama 1/2/3, Mistral, Qwen2/2.5) as pure functions over a param pytree.

Params (global shapes; `layers` is a list so the decode loop reads each layer's weights in
place, see PITFALLS):

    embed       [V, E]            vocab-parallel rows
    layers[i]   attn_norm [E], qkv [E, R (H/R + 2) D], o [H, D, E],
                (qkv_bias [R, H/R + 2, D], o_bias [E]),
                mlp_norm [E], gate_up [2, E, F], down [F, E],
                (gate_up_bias [2, F], down_bias [E])
    final_norm  [E]
    lm_head     [E, V]            absent when the embeddings are tied

The query, key and value projections are one matrix, in R = max(K, tp) groups (`kv_groups`):
group r holds query heads [r H/R, (r + 1) H/R), then the key and the value of the KV head
those heads read; when tp exceeds the KV heads, each KV head's projection is repeated in
tp / K groups, so every shard holds whole groups. The weight is stored flat,
[E, R (H/R + 2) D] (the groups' columns in order: a tp shard's are whole groups), and its
product viewed as [..., R, H/R + 2, D] (`qkv_view`): libtpu tiles an array's two minor axes,
and copied a [E, R, H/R + 2, D] weight (minor axes (H/R + 2, D)) into another order for
products of many rows, keeping every layer's copy through the program (1.6 GiB of the
Llama-3-8B decode program's temporaries at batch 16 on one v6e chip); a GPU reads either as
the same matrix. The gate and up projections are one array too ([2, E, F]: gate, then up;
`L.gate_up_product`). One matrix is one matmul: a decode step at batch 1 ran q and k|v (and
gate and up) as separate kernels, k|v as a reduction at 60% of the memory bandwidth.
`group_qkv` / `split_qkv` convert to and from separate q, k, v (checkpoints, other meshes;
on the grouped view).

`forward` is written per tensor-parallel shard: it sees its local heads / MLP columns /
vocabulary rows and reduces with `psum` over the "tp" mesh axis. Run it through
`jaxdec.model.forward` (shard_map) rather than directly.

Legend: B batch, T new tokens, E model width, H/K query/KV heads, D head dim, F MLP width,
V vocabulary, N logit positions.
"""

from __future__ import annotations

import functools

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
            "qkv": ("embed", "qkv_columns"),
            "o": ("q_heads", "head_dim", "embed"),
            "mlp_norm": ("embed",),
            "gate_up": ("gate_up", "embed", "mlp"),
            "down": ("mlp", "embed"),
        }
        if config.qkv_bias:
            axes["qkv_bias"] = ("kv_groups", "qkv_slot", "head_dim")
        if config.o_bias:
            axes["o_bias"] = ("embed",)
        if config.mlp_bias:
            axes.update(gate_up_bias=("gate_up", "mlp"), down_bias=("embed",))
        return axes

    axes = {
        "embed": ("vocab", "embed"),
        "layers": [layer() for _ in range(config.num_layers)],
        "final_norm": ("embed",),
    }
    if not config.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


# The parameters with a vocabulary axis (tp pads it: `jaxdec.parallel.padded_vocab`): which.
VOCAB_AXES = {"['embed']": 0, "['lm_head']": 1}


def kv_groups(config: ModelConfig, tp: int = 1) -> int:
    """R, the groups of the fused qkv projection on a tp-way mesh: max(K, tp)."""
    return max(config.num_kv_heads, tp)


def param_shapes(config: ModelConfig, *, vocab_size: int | None = None,
                 groups: int | None = None) -> dict:
    """Global shape of every parameter; `vocab_size` overrides the (padded) vocabulary,
    `groups` the qkv groups R (default K, one device's layout; see `kv_groups`)."""
    E, H, K, D, F = (config.hidden_size, config.num_heads, config.num_kv_heads,
                     config.head_dim, config.intermediate_size)
    R = groups or K
    if R % K or H % R:
        raise ValueError(f"{R} qkv groups must be a multiple of the {K} KV heads and divide "
                         f"the {H} query heads")
    V = vocab_size or config.vocab_size
    sizes = {"vocab": V, "embed": E, "q_heads": H, "kv_groups": R, "qkv_slot": H // R + 2,
             "head_dim": D, "qkv_columns": R * (H // R + 2) * D, "gate_up": 2, "mlp": F}
    return jax.tree.map(
        lambda axes: tuple(sizes[a] for a in axes), param_axes(config),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def group_qkv(q, k, v, groups: int, xp=jnp):
    """Separate projections -> the fused layout: q [..., H, D], k and v [..., K, D] (weights
    with a leading E axis, or biases) -> [..., R, H/R + 2, D] with R = `groups`. `xp` is the
    array module (numpy for checkpoints on the host)."""
    *lead, H, D = q.shape
    K = k.shape[-2]
    repeat = groups // K
    parts = [q.reshape(*lead, groups, H // groups, D),
             xp.repeat(k, repeat, axis=-2)[..., None, :],
             xp.repeat(v, repeat, axis=-2)[..., None, :]]
    return xp.concatenate(parts, axis=-2)


def split_qkv(qkv, kv_heads: int):
    """The fused layout -> (q [..., H, D], k [..., K, D], v [..., K, D]); a KV head repeated
    in several groups is read from its first."""
    *lead, R, slots, D = qkv.shape
    per, every = slots - 2, R // kv_heads
    q = qkv[..., :per, :].reshape(*lead, R * per, D)
    return q, qkv[..., ::every, per, :], qkv[..., ::every, per + 1, :]


def qkv_view(w, num_heads: int, head_dim: int):
    """The flat qkv weight [..., R (H/R + 2) D] (any R; H = `num_heads`, D = `head_dim`)
    viewed as [..., R, H/R + 2, D]."""
    H, D = num_heads, head_dim
    R = (w.shape[-1] // D - H) // 2  # R (H/R + 2) D = (H + 2R) D
    return w.reshape(*w.shape[:-1], R, H // R + 2, D)


def is_grouped(name: str) -> bool:
    """Whether a parameter (by its keystr path) is laid out in qkv groups."""
    return name.endswith(("['qkv']", "['qkv_bias']"))


def regroup(name: str, x, config: ModelConfig, groups: int, xp=jnp):
    """A parameter (by its keystr path) in the layout of `groups` qkv groups (unchanged for
    every parameter but qkv and its bias, and when already there)."""
    if not is_grouped(name):
        return x
    flat = name.endswith("['qkv']")
    view = qkv_view(x, config.num_heads, config.head_dim) if flat else x
    if view.shape[-3] == groups:
        return x
    out = group_qkv(*split_qkv(view, config.num_kv_heads), groups, xp=xp)
    return out.reshape(*out.shape[:-3], -1) if flat else out


def init_params(
    config: ModelConfig, key: jax.Array, *, dtype=jnp.float32, vocab_size: int | None = None,
    std: float = 0.02, groups: int | None = None,
) -> dict:
    """Random params: normal(0, std) matrices, zero biases, unit norms (leaf i drawn from the
    i-th of `jax.random.split(key, leaves)`, in tree order, in one device's layout, then
    regrouped to `groups`; `jaxdec.init_model` draws the same values one leaf at a time).
    A `vocab_size` above the config's pads the drawn embedding and head with zeros: a key
    gives the same model whatever the padding (tp)."""
    padded = vocab_size or config.vocab_size
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = jax.tree_util.keystr(path)
        leaf = init_leaf(leaf_kind(name), shape, k, dtype=dtype, std=std)
        if name in VOCAB_AXES and padded != config.vocab_size:
            pad = [(0, 0)] * leaf.ndim
            pad[VOCAB_AXES[name]] = (0, padded - config.vocab_size)
            leaf = jnp.pad(leaf, pad)
        leaves.append(regroup(name, leaf, config, groups or config.num_kv_heads))
    return jax.tree.unflatten(treedef, leaves)


def leaf_kind(path: str) -> str:
    """How a parameter (by its keystr path) is initialised: "ones", "zeros", "normal" or
    "normal_gate_up" (see `init_leaf`)."""
    if path.endswith("norm']"):
        return "ones"
    if path.endswith("bias']"):
        return "zeros"
    if path.endswith("['gate_up']"):
        return "normal_gate_up"
    return "normal"


def init_leaf(kind: str, shape: tuple, key: jax.Array, *, dtype, std: float) -> jax.Array:
    """One parameter of `shape`. "normal_gate_up" ([2, E, F]) draws its values in [E, 2, F]
    order, gate|up stacked before F as jaxdec first laid them out, so a key gives the model
    it always gave (seeded tests, the demo's figures)."""
    if kind == "ones":
        return jnp.ones(shape, dtype)
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    if kind == "normal_gate_up":
        G, E, F = shape
        drawn = init_leaf("normal", (E, G, F), key, dtype=dtype, std=std)
        return jnp.transpose(drawn, (1, 0, 2))
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _embed_lookup(embed_VE: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    """Vocab-parallel lookup: each shard fills the rows it owns, then one psum."""
    local_vocab = embed_VE.shape[0]
    local_ids = tokens_BT - jax.lax.axis_index(TP) * local_vocab
    owned = (local_ids >= 0) & (local_ids < local_vocab)
    rows = jnp.take(embed_VE, jnp.clip(local_ids, 0, local_vocab - 1), axis=0)
    return jax.lax.psum(jnp.where(owned[..., None], rows, 0).astype(embed_VE.dtype), TP)


def _attention_block(layer: dict, x_BTE, inv_rms_BT1, positions_BT, kv_entry, lengths_B,
                     mask_BTT, *, config: ModelConfig, slots: int, window, inv_freq, impl,
                     matmul=L.MatmulImpl.XLA, fresh: bool = False, prefill: bool = False):
    """x_BTE and inv_rms_BT1: the attention norm's output (`L.pre_projection_norm`). This
    shard's qkv groups (`slots` = H/R + 2 columns of D each) give its query heads and the KV
    head(s) they read. `fresh`: the cache is empty before these tokens, so they attend to
    their own keys and values (as with no cache), which are still written to it."""
    qkv = L.project("bte,en->btn", x_BTE, layer["qkv"], inv_rms_BT1, matmul)
    qkv = qkv.reshape(*qkv.shape[:2], -1, slots, config.head_dim)
    if "qkv_bias" in layer:
        qkv = qkv + layer["qkv_bias"][None, None]
    B, T, R, slots, D = qkv.shape
    q = qkv[:, :, :, : slots - 2].reshape(B, T, R * (slots - 2), D)
    k, v = qkv[:, :, :, slots - 2], qkv[:, :, :, slots - 1]
    q = L.apply_rope(q, positions_BT, inv_freq, config.rope.attention_scale)
    k = L.apply_rope(k, positions_BT, inv_freq, config.rope.attention_scale)
    if kv_entry is None:  # no cache: the new tokens are the whole context
        keys, values = k, v
    else:
        kv_entry = kv_entry.write(k, v, lengths_B)
        keys, values = (k, v) if fresh else (kv_entry.k, kv_entry.v)
    attn = L.attention(q, keys, values, None if fresh else lengths_B, positions_BT,
                       mask_BTT=mask_BTT, window=window, impl=impl, prefill=prefill)
    if matmul is L.MatmulImpl.XLA:
        out = jnp.einsum("bthd,hde->bte", attn, layer["o"])
    else:
        out = L.dense(attn.reshape(*attn.shape[:2], -1), layer["o"], matmul).astype(attn.dtype)
    if prefill and kv_entry is not None:
        # The cache written before the layer goes on, so its new keys and values die here:
        # left to itself XLA wrote every layer's at the end, all of them alive until then
        # (Llama-3-8B shape compiled for an H100, a 124K-token prompt: +1.8 GB a layer).
        out, kv_entry = jax.lax.optimization_barrier((out, kv_entry))
    out = jax.lax.psum(out, TP)
    if config.o_bias:
        out = out + layer["o_bias"][None, None]
    return out, kv_entry


def _mlp_block(layer: dict, x_BTE, inv_rms_BT1, config: ModelConfig,
               matmul=L.MatmulImpl.XLA, prefill: bool = False):
    """x_BTE and inv_rms_BT1: the MLP norm's output (`L.pre_projection_norm`). `prefill`: in
    chunks of tokens where there are many (`L.chunked_gated_mlp`: a long prompt's
    activations)."""
    args = (x_BTE, layer["gate_up"], layer["down"], layer.get("gate_up_bias"), inv_rms_BT1,
            matmul)
    if prefill:  # each chunk's partial sums reduced in its turn (as map_in_place wants)
        out = L.chunked_gated_mlp(*args, reduce=functools.partial(jax.lax.psum, axis_name=TP))
    else:
        out = jax.lax.psum(L.gated_mlp(*args), TP)
    if config.mlp_bias:
        out = out + layer["down_bias"][None, None]
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
    matmul: L.MatmulImpl = L.MatmulImpl.XLA,
    fresh: bool = False,
    prefill: bool = False,
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
        attention implementation (static); matmul: the projections' (static, `L.MatmulImpl`);
        fresh: the cache holds nothing before these tokens (static; see
        `jaxdec.model.forward_with_cache`); prefill: no gradient will be taken (static): the
        MLP runs in chunks of tokens where there are many (`L.chunked_gated_mlp`) and long
        causal blocks attend over blocks of keys (`L.attention`'s `prefill`).
    Returns:
      (logits [B, N or T, V/tp] fp32 for this shard's vocabulary rows,
       hidden [B, T, E] after the final norm, the updated cache or None).
    """
    inv_freq = L.rope_inv_freq(config.rope, config.head_dim)
    slots = config.num_heads // kv_groups(config, tp) + 2
    x = _embed_lookup(params["embed"], tokens_BT)
    lengths = None if cache is None else cache.lengths
    new_entries = []
    for i, layer in enumerate(params["layers"]):
        entry = None if cache is None else cache.layers[i]
        h, inv_rms = L.pre_projection_norm(x, layer["attn_norm"], config.rms_norm_eps)
        attn, entry = _attention_block(
            layer, h, inv_rms, positions_BT, entry, lengths, mask_BTT,
            config=config, slots=slots, window=config.layer_windows[i], inv_freq=inv_freq,
            impl=attention, matmul=matmul, fresh=fresh, prefill=prefill,
        )
        x = x + attn
        h, inv_rms = L.pre_projection_norm(x, layer["mlp_norm"], config.rms_norm_eps)
        x = x + _mlp_block(layer, h, inv_rms, config, matmul, prefill=prefill)
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
