"""`Model` (config + params + mesh) and the global-view forward.

A Model is a pytree: its params are the leaves, its config and mesh are static, so a Model
can be passed straight into a function you `jax.jit` yourself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxdec import parallel
from jaxdec.cache import BF16_BITS, Cache, cache_axes
from jaxdec.checks import check_config, check_ids, check_model, check_param_dtype
from jaxdec.config import ModelConfig
from jaxdec.models import llama
from jaxdec.models.layers import (GPU_BACKENDS, AttentionImpl, MatmulImpl, attention_kernel,
                                  fused_causal_usable, use_platform)
from jaxdec.pallas_kernels import tree_attention
from jaxdec.sampling import check_key


def _member(kind, value, name: str):
    """`kind(value)` for an enum, or a ValueError naming the argument and its choices."""
    try:
        return kind(value)
    except ValueError:
        choices = [m.value for m in kind]
        raise ValueError(f"{name} must be one of {choices}, got {value!r}") from None


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded model. Models compare (and hash) by identity: their arrays have no single
    truth value (a generated `==` raised "the truth value of an array is ambiguous").

    Attributes:
      config: the static ModelConfig.
      params: the param pytree, placed with the mesh's sharding (see jaxdec.models.llama).
      mesh: the ("dp", "tp") mesh the params live on.
      tokenizer: a `tokenizers.Tokenizer` when the checkpoint has tokenizer.json (not part of
        the pytree: inside jit it is None, and so in any Model rebuilt from the leaves,
        `jax.tree.map`'s or `jax.device_put`'s: replace `params` with
        `dataclasses.replace` to keep it and the fields below).
      chat_template: the checkpoint's `jaxdec.chat.ChatTemplate` (instruction-tuned
        checkpoints), else None; like the tokenizer, not part of the pytree.
      generation_config: the checkpoint's generation_config.json (a dict: its sampling
        defaults, stop ids, ...) or None; `save_pretrained` writes it back (jaxdec's own
        sampling takes no defaults from it). Not part of the pytree.
      attention: which attention implementation the forward runs (static; see
        `jaxdec.models.layers.AttentionImpl`): AUTO uses the Pallas tree-attention kernel on
        GPU/TPU for decode and verification over caches large enough for it to pay
        (`layers.AUTO_KERNEL_MIN_KV_BYTES`, else the reference) and, on GPU, cuDNN's fused
        attention for causal blocks without a cache (training); on CPU, a cache of
        `layers.BLOCKED_MIN_SLOTS` or more walked in blocks, else the jnp reference.
      matmul: how the layers' projections run (static; `jaxdec.models.layers.MatmulImpl`):
        XLA's product, or (experimental) a Pallas matrix-vector kernel for decode steps on
        GPU.
      tokenizer_config: the checkpoint's tokenizer_config.json (a dict: transformers'
        tokenizer settings, such as its padding side) or None; `save_pretrained` writes it
        back into a directory that has none (the chat template and special tokens its
        own). Not part of the pytree.
    """

    config: ModelConfig
    params: Any
    mesh: Mesh
    tokenizer: Any = None
    chat_template: Any = None
    generation_config: Any = None
    attention: AttentionImpl = AttentionImpl.AUTO
    matmul: MatmulImpl = MatmulImpl.XLA
    tokenizer_config: Any = None  # (last: Models built positionally keep their meaning)

    def __repr__(self) -> str:
        # (the generated one printed every parameter's values: 48K characters for a 2M model)
        leaves = jax.tree.leaves(self.params)
        count = sum(int(np.prod(getattr(x, "shape", ()))) for x in leaves)
        dtypes = sorted({str(getattr(x, "dtype", type(x).__name__)) for x in leaves})
        mesh = ", ".join(f"{name}={size}" for name, size in self.mesh.shape.items())
        tokenizer = self.tokenizer
        if tokenizer is not None:
            tokenizer = (f"<{tokenizer.get_vocab_size()} tokens>"
                         if hasattr(tokenizer, "get_vocab_size") else type(tokenizer).__name__)
        return (f"Model(config={self.config!r}, params=<{count:,} {'/'.join(dtypes)}>, "
                f"mesh=<{mesh}>, tokenizer={tokenizer}, "
                f"chat_template={'<template>' if self.chat_template is not None else None}, "
                f"attention={self.attention.value!r}, matmul={self.matmul.value!r})")

    @property
    def dtype(self):
        """The parameters' dtype: a cache for this model holds keys and values in it
        (`init_cache(model.config, ..., dtype=model.dtype)`)."""
        return param_dtype(self)

    def with_attention(self, attention: "AttentionImpl | str") -> "Model":
        """This model with another attention implementation ("auto", "reference", "pallas",
        "pallas_interpret", "cudnn" or an AttentionImpl)."""
        return dataclasses.replace(self, attention=_member(AttentionImpl, attention, "attention"))

    def with_matmul(self, matmul: "MatmulImpl | str") -> "Model":
        """This model with another projection implementation ("xla", "pallas",
        "pallas_interpret" or a MatmulImpl; see `jaxdec.models.layers.MatmulImpl`)."""
        return dataclasses.replace(self, matmul=_member(MatmulImpl, matmul, "matmul"))

    @property
    def tp(self) -> int:
        return parallel.tp_size(self.mesh)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size


jax.tree_util.register_pytree_node(
    Model,
    lambda m: ((m.params,), (m.config, m.mesh, m.attention, m.matmul)),
    lambda aux, children: Model(config=aux[0], params=children[0], mesh=aux[1], attention=aux[2],
                                matmul=aux[3]),
)


def family(config: ModelConfig):
    """The module implementing a config's model family: `init_params` (with `leaf_kind` and
    `init_leaf`, which draw one parameter), `param_axes`, `param_shapes` and a per-shard
    `forward`. Every supported architecture is a Llama-family
    model today; state-space and hybrid families plug in here."""
    del config
    return llama


def param_dtype(model: Model):
    """The dtype of the model's parameters (and so of its caches)."""
    return jax.tree.leaves(model.params)[0].dtype


# A cache any kernel's tiling takes: `check_attention` asks the kernel about the model's heads
# and dtype at this size, so only what no call could change refuses it.
_PROBE_SLOTS = 4096


def attention_refusal(model: Model) -> str | None:
    """Why the Pallas kernel the model's attention names ("pallas", "pallas_interpret")
    cannot take its heads (head dim, dtype), as "the <kernel> kernel cannot take it
    (<reason>)"; None where it can or none is named (an unavailable kernel raises
    `attention_kernel`'s ValueError)."""
    kernel = attention_kernel(model.attention, parallel.platform(model.mesh))
    if kernel is None or model.attention not in (AttentionImpl.PALLAS,
                                                 AttentionImpl.PALLAS_INTERPRET):
        return None
    c = model.config
    reason = tree_attention.unsupported_reason(
        kernel[0], (1, 1, c.num_heads, c.head_dim), (1, _PROBE_SLOTS, c.num_kv_heads, c.head_dim),
        dtype=param_dtype(model))
    return None if reason is None else f"the {kernel[0].value} kernel cannot take it ({reason})"


def check_attention(model: Model, what: str = "this model") -> None:
    """A ValueError, before anything is traced, where the model's attention names a Pallas
    kernel ("pallas", "pallas_interpret") its devices lack or that cannot take its heads
    (head dim, dtype): a named kernel is not quietly replaced by the reference, as AUTO's
    is. (Per call, shapes a kernel does not tile still run the reference: a long prompt's
    causal prefill, a cache smaller than one block, on a TPU one of slots off multiples of
    8.) `what`: the model, in the message."""
    refusal = attention_refusal(model)
    if refusal is not None:
        raise ValueError(f"attention={model.attention.value!r} for {what}: {refusal}; use "
                         "\"auto\" (the kernel where it can run, else the reference) or "
                         "\"reference\"")


def _mesh_param_shapes(config: ModelConfig, mesh: Mesh) -> dict:
    """The global shape of every parameter of a model of `config` on `mesh` (vocabulary
    padded for tp, qkv in the mesh's groups)."""
    fam = family(config)
    return fam.param_shapes(config, vocab_size=parallel.padded_vocab(config, mesh),
                            groups=fam.kv_groups(config, parallel.tp_size(mesh)))


@functools.lru_cache(maxsize=64)
def _expected_params(config: ModelConfig, mesh: Mesh):
    """(treedef, [(name, shape)]) of the params a model of `config` holds on `mesh`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        _mesh_param_shapes(config, mesh), is_leaf=lambda x: isinstance(x, tuple))
    return treedef, [(jax.tree_util.keystr(path), shape) for path, shape in flat]


def check_params(model: Model) -> None:
    """A ValueError unless `model.params` has the structure and leaf shapes its config and
    mesh call for (`abstract_model`'s), a TypeError for a leaf that is no floating-point
    array; each names the leaf. Params edited by hand (a truncated embedding, a norm of
    shape (1,)) could otherwise broadcast or index their way to wrong logits."""
    if parallel.TP not in model.mesh.axis_names:   # a Model built by hand
        raise ValueError('model.mesh has no "tp" axis (the forward\'s collectives name it): '
                         "build the model with init_model / load_pretrained (they add one of "
                         "size 1) or on jaxdec.make_mesh(...)")
    treedef, expected = _expected_params(model.config, model.mesh)
    leaves, got_treedef = jax.tree_util.tree_flatten(model.params)
    if got_treedef != treedef:
        flat, _ = jax.tree_util.tree_flatten_with_path(model.params)
        got = {jax.tree_util.keystr(path) for path, _ in flat}
        names = [name for name, _ in expected]
        missing = [name for name in names if name not in got]
        extra = sorted(got.difference(names))
        parts = [f"{what} {', '.join(some[:4])}{' ...' if len(some) > 4 else ''}"
                 for what, some in (("missing", missing), ("unexpected", extra)) if some]
        raise ValueError(
            "model.params do not match model.config: " + ("; ".join(parts) if parts else
            "the leaves are in other containers (keep load_pretrained's: dicts, and a list "
            "of layers)"))
    for leaf, (name, shape) in zip(leaves, expected):
        leaf_shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"model.params{name} must be a floating-point array, got "
                            f"{dtype if dtype is not None else type(leaf).__name__}")
        if tuple(leaf_shape) != shape:
            raise ValueError(
                f"model.params{name} has shape {tuple(leaf_shape)}; model.config on a "
                f"tp={parallel.tp_size(model.mesh)} mesh needs {shape}")
    # (a model moved with jax.device_put keeps its mesh: every program refused its params)
    devices = set(model.mesh.devices.flat)
    for leaf, (name, _) in zip(leaves, expected):
        if (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
                and not leaf.sharding.device_set <= devices):
            on, mesh = (sorted(d.id for d in where) for where in (leaf.sharding.device_set,
                                                                   devices))
            raise ValueError(
                f"model.params{name} lie on devices {on}, outside model.mesh's {mesh} "
                "(jax.device_put moves the params, not the mesh): load the model onto the "
                "devices wanted (load_pretrained(..., mesh=jaxdec.make_mesh(devices=...)))")


def param_shardings(config: ModelConfig, mesh: Mesh):
    return parallel.shardings(mesh, family(config).param_axes(config), config)


@parallel.runs_on_model_mesh(lambda a: a["mesh"])
def init_model(
    config: ModelConfig, key: jax.Array, *, dtype=jnp.float32, mesh: Mesh | None = None,
    std: float = 0.02,
) -> Model:
    """A randomly initialised model, created directly in its sharded layout (weights are never
    materialised on one device first).

    The leaves are drawn one at a time, each by a small program compiled once per distinct
    (kind, shape, sharding): one program for the whole tree of an 8B model (291 large random
    leaves) took 67 s to compile on a CPU, these 8 small ones 7 s. The values are
    those of the family's `init_params` (padded vocabulary rows zero): a key gives the same
    model on every mesh."""
    check_config(config)
    key = check_key(key, required=True)
    dtype = check_param_dtype(dtype)
    if (isinstance(std, bool) or not isinstance(std, numbers.Real) or not math.isfinite(std)
            or std <= 0):
        raise ValueError(f"std must be a finite number > 0, got {std!r}")
    mesh = parallel.resolve_mesh(mesh)
    parallel.check_divisibility(config, mesh)
    vocab = parallel.padded_vocab(config, mesh)
    fam = family(config)
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    # Drawn in one device's layout, then regrouped for the mesh (init_params' values).
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        fam.param_shapes(config, vocab_size=vocab), is_leaf=is_shape)
    shardings = treedef.flatten_up_to(param_shardings(config, mesh))
    keys = jax.random.split(parallel.onto_mesh(key, mesh), len(flat))
    groups = fam.kv_groups(config, parallel.tp_size(mesh))
    leaves = []
    for (path, shape), sharding, k in zip(flat, shardings, keys):
        name = jax.tree_util.keystr(path)
        zero_from = _padded_vocab_axis(name, shape, config.vocab_size)
        regroup = (config, groups, name[name.rindex("["):]) if fam.is_grouped(name) and \
            groups != config.num_kv_heads else None
        draw = _leaf_program(fam, fam.leaf_kind(name), shape, jnp.dtype(dtype), float(std),
                             sharding, zero_from, regroup)
        leaves.append(draw(k))
    return Model(config=config, params=jax.tree.unflatten(treedef, leaves), mesh=mesh)


def _padded_vocab_axis(name: str, shape: tuple, vocab_size: int) -> tuple[int, int] | None:
    """(axis, true size) of a leaf whose vocabulary axis is padded (tp padding: those rows or
    columns are zero), else None."""
    axis = llama.VOCAB_AXES.get(name)
    if axis is None or shape[axis] <= vocab_size:
        return None
    return axis, vocab_size


@functools.lru_cache(maxsize=256)  # (bounded: a sweep over std or meshes kept every program)
def _leaf_program(fam, kind: str, shape: tuple, dtype, std: float, sharding, zero_from,
                  regroup: tuple | None):
    """One leaf's draw, compiled once per distinct (kind, shape, sharding, ...); `regroup`:
    (config, groups, the leaf's last key) for a qkv leaf whose mesh layout differs from one
    device's."""
    def draw(k):
        if zero_from is None:
            x = fam.init_leaf(kind, shape, k, dtype=dtype, std=std)
        else:   # drawn at the true size, so that a key gives the same model on every mesh
            axis, size = zero_from
            true_shape = shape[:axis] + (size,) + shape[axis + 1:]
            x = fam.init_leaf(kind, true_shape, k, dtype=dtype, std=std)
            x = jnp.pad(x, [(0, shape[a] - true_shape[a]) for a in range(len(shape))])
        if regroup is not None:
            config, groups, name = regroup
            x = fam.regroup(name, x, config, groups)
        return x

    return jax.jit(draw, out_shardings=sharding)


def abstract_model(config: ModelConfig, *, dtype=jnp.float32, mesh: Mesh | None = None) -> Model:
    """A Model whose params are `jax.ShapeDtypeStruct`s (shape, dtype and sharding, no data):
    what `generate(..., compile_only=True)` and `speculative_generate(..., compile_only=True)`
    need to compile a program before the weights exist (while they train or load). A program
    compiled for it serves any Model with the same config, dtype and mesh (`init_model`,
    `load_pretrained`) without compiling again."""
    check_config(config)
    dtype = check_param_dtype(dtype)
    mesh = parallel.resolve_mesh(mesh)
    parallel.check_divisibility(config, mesh)
    params = jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding),
        _mesh_param_shapes(config, mesh), param_shardings(config, mesh),
        is_leaf=lambda x: isinstance(x, tuple))
    return Model(config=config, params=params, mesh=mesh)


def is_abstract(tree) -> bool:
    """Whether a Model (or any pytree, e.g. a drafter) holds shapes only (see `abstract_model`)."""
    return any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(tree))


def check_runnable(model: Model, cannot: str = "run them") -> None:
    """A ValueError where the model holds shapes only: it compiles programs, never runs them
    (inside a `.lower` its leaves are tracers and it passes)."""
    if is_abstract(model):
        raise ValueError("the model's params are shapes only (jaxdec.abstract_model): it can "
                         "compile programs (compile_only=True, or jax.jit(...).lower), not "
                         f"{cannot}")


def _batch_axis(mesh: Mesh):
    return parallel.DP if parallel.DP in mesh.axis_names else None


@functools.partial(jax.jit, static_argnames=("check_vma", "fresh", "prefill"))
@parallel.runs_on_model_mesh(lambda a: a["model"].mesh)
def forward_with_cache(
    model: Model,
    tokens_BT: jax.Array,
    positions_BT: jax.Array,
    cache: Cache | None,
    *,
    mask_BTT: jax.Array | None = None,
    logits_indices_BN: jax.Array | None = None,
    check_vma: bool = True,
    fresh: bool = False,
    prefill: bool | None = None,
):
    """The one forward (prefill, decode, verification), in the global view.

    Jitted (and inlined when called inside your own jit). Runs the family's per-shard forward
    (`jaxdec.models.llama.forward`) under `jax.shard_map` on the model's mesh. New K/V are
    written at each row's current length; lengths are not advanced (see `jaxdec.cache.commit`).
    Slots past the cache's end are not written (a finished row held at max_len, a padded
    block's padding): a token there sees none of its own keys and values, and its logits are
    not the model's, so keep each row's real tokens within max_len.

    Args:
      model: the Model.
      tokens_BT, positions_BT: int32 [B, T].
      cache: a Cache from `jaxdec.init_cache` (or None: no cache, positions start at 0).
      mask_BTT: bool, which new tokens each new token attends to (causal when None).
      logits_indices_BN: token indices to compute logits at (all T when None).
      fresh: static; True promises an empty cache (every row's length 0) and positions 0..T-1
        (a prefill of right-padded prompts): the tokens attend causally to their own keys and
        values, as with no cache (on GPU cuDNN's fused attention where it takes the shapes,
        instead of attention over every slot of the cache), and those are written to the
        cache all the same. Needs the causal mask (mask_BTT None).
      prefill: static; no gradient will be taken through this causal block of prompt tokens
        (default: `fresh`): long blocks then run their MLP in chunks of tokens and, without
        cuDNN, attend chunk by chunk over blocks of keys (`jaxdec.models.layers.attention`'s
        `prefill`), whether the cache is empty or holds a prefix (`jaxdec.PrefixCache`).
    Returns:
      (logits [B, N or T, V] fp32, hidden [B, T, E] after the final norm, cache).
    """
    config, mesh = model.config, model.mesh
    _check_forward_shapes(model, tokens_BT, positions_BT, cache, mask_BTT, logits_indices_BN)
    # (int64 ids, under jax_enable_x64, met int32 offsets in the embedding lookup: an error
    # under strict promotion)
    tokens_BT = jnp.asarray(tokens_BT).astype(jnp.int32)
    if fresh and mask_BTT is not None:
        raise ValueError("fresh=True is a causal prefill: it takes no mask_BTT")
    prefill = fresh if prefill is None else prefill
    if prefill and mask_BTT is not None:
        raise ValueError("prefill=True is a causal block of prompt tokens: it takes no mask_BTT")
    batch = _batch_axis(mesh)
    tp_axis = parallel.TP if parallel.TP in mesh.axis_names else None
    cache_specs = None if cache is None else parallel.specs(mesh, cache_axes(config), config)
    args = [model.params, tokens_BT, positions_BT]
    in_specs = [parallel.specs(mesh, family(config).param_axes(config), config), P(batch, None),
                P(batch, None)]
    optional = {"cache": (cache, cache_specs), "mask": (mask_BTT, P(batch, None, None)),
                "logits_indices": (logits_indices_BN, P(batch, None))}
    present = [name for name, (value, _) in optional.items() if value is not None]
    for name in present:
        args.append(optional[name][0])
        in_specs.append(optional[name][1])

    attention, platform = model.attention, parallel.platform(mesh)
    check_attention(model)
    if attention is AttentionImpl.CUDNN and platform not in GPU_BACKENDS:
        raise ValueError(f"attention=CUDNN needs a GPU, not the model's {platform!r} devices "
                         "(use AUTO or REFERENCE)")

    def per_shard(params, tokens, positions, *rest):
        given = dict(zip(present, rest))
        return family(config).forward(
            params, tokens, positions, given.get("cache"), given.get("mask"),
            given.get("logits_indices"), config=config, tp=parallel.tp_size(mesh),
            attention=attention, matmul=model.matmul, fresh=fresh, prefill=prefill,
        )

    with use_platform(platform):  # the kernels of the mesh's devices, for what traces here
        if (cache is None or fresh) and mask_BTT is None and attention is AttentionImpl.AUTO:
            attention = cache_free_attention(config, model.tp, param_dtype(model))
        if attention_kernel(attention) is not None or model.matmul is not MatmulImpl.XLA:
            # A pallas_call's outputs carry no varying-manual-axes annotation (and
            # interpreted kernels fail the check), so the check is off wherever a kernel may
            # run.
            check_vma = False
        out_specs = (P(batch, None, tp_axis), P(batch, None, None), cache_specs)
        logits, hidden, cache = jax.shard_map(
            per_shard, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs,
            check_vma=check_vma,
        )(*args)
    if logits.shape[-1] != config.vocab_size:
        logits = logits[..., : config.vocab_size]
    return logits, hidden, cache


def cache_free_attention(config: ModelConfig, tp: int, dtype) -> AttentionImpl:
    """What AUTO runs for a causal block with no cache (training, `jaxdec.forward`): CUDNN
    (cuDNN's fused attention) where it works for the per-shard heads, the compute dtype and
    the windows (probed once per shape on a GPU), else AUTO's other choices."""
    kv_heads = config.num_kv_heads // tp if tp <= config.num_kv_heads else 1
    if fused_causal_usable(dtype, config.num_heads // tp, kv_heads, config.head_dim,
                           config.layer_windows):
        return AttentionImpl.CUDNN
    return AttentionImpl.AUTO


def _check_forward_shapes(model, tokens_BT, positions_BT, cache, mask_BTT, logits_indices_BN):
    """Static shape and dtype checks, raised while tracing (before anything compiles)."""
    for name, value in (("tokens", tokens_BT), ("positions", positions_BT),
                        ("logits_indices", logits_indices_BN)):
        if value is not None and not jnp.issubdtype(jnp.result_type(value), jnp.integer):
            raise TypeError(f"{name} must be integers, got {jnp.result_type(value)}")
    if tokens_BT.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens_BT.shape}")
    B, T = tokens_BT.shape
    if positions_BT.shape != (B, T):
        raise ValueError(f"positions shape {positions_BT.shape} != tokens shape {(B, T)}")
    if mask_BTT is not None and mask_BTT.shape != (B, T, T):
        raise ValueError(f"mask must be [batch, T, T] = {(B, T, T)}, got {mask_BTT.shape}")
    if mask_BTT is not None and jnp.result_type(mask_BTT) != jnp.bool_:
        raise TypeError(f"mask must be bool, got {jnp.result_type(mask_BTT)}")
    if logits_indices_BN is not None and (
        logits_indices_BN.ndim != 2 or logits_indices_BN.shape[0] != B
    ):
        raise ValueError(f"logits_indices must be [batch={B}, N], got {logits_indices_BN.shape}")
    if cache is not None:
        check_cache(model, cache, B)
    if B % parallel.dp_size(model.mesh):
        raise ValueError(
            f"batch size {B} is not a multiple of the mesh's dp={parallel.dp_size(model.mesh)}"
        )


def check_cache(model: Model, cache, batch: int) -> None:
    """The cache is one `init_cache` makes for this model and batch on its mesh."""
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be a jaxdec Cache (see init_cache), got "
                        f"{type(cache).__name__}")
    config = model.config
    want = parallel.cache_kv_heads(config, model.mesh), config.head_dim
    if len(cache.layers) != config.num_layers:
        raise ValueError(f"the cache has {len(cache.layers)} layers, the model "
                         f"{config.num_layers}: make it with init_cache(model.config, ...)")
    shape, dtype = cache.layers[0].k.shape, jnp.dtype(cache.layers[0].k.dtype)
    want_dtype = jnp.dtype(param_dtype(model))
    # (inside jaxdec's CPU programs a bf16 cache travels as its bits: `jaxdec.cache.as_bits`)
    if dtype != want_dtype and not (dtype == BF16_BITS and want_dtype == jnp.bfloat16):
        raise TypeError(f"the cache holds {dtype} keys and values, the model's parameters are "
                        f"{want_dtype}: make it with init_cache(model.config, ..., "
                        "dtype=model.dtype)")
    lengths_dtype = jnp.dtype(getattr(cache.lengths, "dtype", np.float64))
    if lengths_dtype != jnp.int32:  # (a cast of the whole cache pytree casts them too)
        raise TypeError(f"the cache's lengths must be int32, got {lengths_dtype} (a "
                        "jax.tree.map over the cache changes them too: cast its layers only)")
    if (len(shape) != 4 or shape[0] != batch or shape[2:] != want
            or cache.lengths.shape != (batch,)):
        raise ValueError(
            f"the cache's layers are {tuple(shape)} with lengths {tuple(cache.lengths.shape)}; "
            f"this call needs [batch={batch}, slots, kv_heads={want[0]}, head_dim={want[1]}]: "
            "make it with init_cache(model.config, batch, max_len, mesh=model.mesh)")
    k = cache.layers[0].k
    if isinstance(k, jax.Array) and not isinstance(k, jax.core.Tracer) and (
            k.sharding.device_set != set(model.mesh.devices.flat)):  # (jax's error named neither)
        raise ValueError(
            f"the cache lies on {len(k.sharding.device_set)} device(s), not on the model's mesh "
            f"of {model.mesh.devices.size}: make it with init_cache(model.config, batch, "
            "max_len, mesh=model.mesh)")


@parallel.runs_on_model_mesh(lambda a: a["model"].mesh)
def forward(model: Model, tokens: jax.Array) -> jax.Array:
    """Full causal forward from position 0 without a cache: logits [B, T, V] (fp32).

    Works eagerly or inside your own `jax.jit` (where the ids' range cannot be checked: an id
    outside the vocabulary embeds as zeros; eagerly, ids on a device are read back to the host
    for that check, a wait for the device: inside jit there is none). On a data-parallel mesh
    any batch size works (the rows are padded to a multiple of dp inside, as `generate` pads
    its batch).
    """
    check_model(model)
    check_runnable(model)
    if not isinstance(tokens, jax.Array):  # host ids: checked at their own width (int64 too)
        tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integers, got {tokens.dtype}")
    if 0 in tokens.shape:
        raise ValueError(f"tokens must hold at least one token in one row, got shape "
                         f"{tokens.shape}")
    try:
        ids = np.asarray(tokens)
    except jax.errors.TracerArrayConversionError:  # traced by the caller's jit
        ids = None
    if ids is not None:
        check_ids("tokens", ids, model.config.vocab_size)
    if tokens.shape[1] > model.config.max_positions:
        raise ValueError(
            f"tokens length {tokens.shape[1]} exceeds the model's {model.config.max_positions} "
            f"positions ({model.config.describe_max_positions()})"
        )
    # Concrete ids go from the host (where they were checked): ids on other devices (another
    # model's output) would be refused by the program over this model's mesh.
    return _causal_logits(model, jnp.asarray(tokens, jnp.int32) if ids is None
                          else ids.astype(np.int32))


@jax.jit
def _causal_logits(model: Model, tokens_BT: jax.Array) -> jax.Array:
    (B, T), dp = tokens_BT.shape, parallel.dp_size(model.mesh)
    # Rows of zeros up to a multiple of dp (the batch axis is split over it), dropped after.
    tokens_BT = jnp.pad(tokens_BT, ((0, -B % dp), (0, 0)))
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tokens_BT.shape)
    logits, _, _ = forward_with_cache(model, tokens_BT, positions, None)
    return logits[:B]
