"""Decoding caches as pytrees: one typed entry per layer plus per-row lengths.

A `Cache` holds a tuple of layer entries and `lengths[B]`, the number of committed tokens of
each row. Every entry type implements the same three operations, so a hybrid model mixes
entry types without the decode loop knowing:

- `write(new, lengths)`: store the T new tokens' state at slots [length, length + T);
- `commit(lengths, accepted_slots, n_accepted, prefix)`: keep the accepted path of the tokens
  just written (a tree's accepted nodes, in order) as contiguous positions from `length` on
  (`prefix`: the path is slots 0..n-1, as on a chain, and may stay where it was written);
- `axes()`: logical axis names per leaf, mapped to mesh axes by `jaxdec.parallel`.

On a CPU the generate and speculative loops carry a bf16 cache as its uint16 bits
(`as_bits` / `as_floats`); `KVLayer.write` and `commit` take either form.

Today there is `KVLayer` (attention); state-space entries (conv + ssm state) arrive with the
Mamba2 models and commit the state of the accepted node instead.

Shape legend: B batch, S cache slots (max_len), K KV heads, D head dim, N accepted path.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import parallel
from jaxdec.checks import (check_bool, check_config, check_int, check_int_array,
                           check_param_dtype)


def _pytree_dataclass(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


# Inside one compiled program on a CPU (the generate and speculative loops), a bf16 cache
# travels as its bits: XLA's CPU backend converts a bf16 array to fp32 and back around every
# in-place update and before every slice of it, the whole cache each time, where a uint16
# array is updated and sliced in place (a write and a 128-slot read per step, in a loop: 1630
# us at 32768 slots as bf16, ~10 us as uint16). The attention reads such a cache as bf16
# (`models.layers.attention`); `as_bits` / `as_floats` convert at the loop's edges.
BF16_BITS = jnp.uint16


def _bitcast(x, dtype):
    """`x` bitcast to `dtype` (of the same width); an abstract array (`init_cache(...,
    abstract=True)`'s) stays abstract, in the new dtype."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return jax.lax.bitcast_convert_type(x, dtype)


def as_bits(tree):
    """`tree` (any pytree) with every `KVLayer`'s bf16 keys and values as their uint16 bits
    (free: a bitcast); other entries unchanged."""
    def bits(entry):
        if isinstance(entry, KVLayer) and entry.k.dtype == jnp.bfloat16:
            return KVLayer(k=_bitcast(entry.k, BF16_BITS), v=_bitcast(entry.v, BF16_BITS))
        return entry

    return jax.tree.map(bits, tree, is_leaf=lambda x: isinstance(x, KVLayer))


def as_floats(tree):
    """The inverse of `as_bits`: bits caches back to bf16."""
    def floats(entry):
        if isinstance(entry, KVLayer) and entry.k.dtype == BF16_BITS:
            return KVLayer(k=_bitcast(entry.k, jnp.bfloat16), v=_bitcast(entry.v, jnp.bfloat16))
        return entry

    return jax.tree.map(floats, tree, is_leaf=lambda x: isinstance(x, KVLayer))


def carries_bits(tree) -> bool:
    """Whether `tree` holds a `KVLayer` as bits (`as_bits`): what a program that carries bf16
    caches as bits internally hands back as it was given."""
    return any(isinstance(entry, KVLayer) and entry.k.dtype == BF16_BITS
               for entry in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, KVLayer)))


def bits_as_bf16(x: jax.Array) -> jax.Array:
    """A bits cache's array (uint16) as the bf16 values it holds; any other array as it is."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == BF16_BITS else x


def _stored(new: jax.Array, cache: jax.Array) -> jax.Array:
    """New keys / values as `cache` stores them: in its dtype, or a bits cache's bf16 bits."""
    if cache.dtype == BF16_BITS:
        return jax.lax.bitcast_convert_type(new.astype(jnp.bfloat16), BF16_BITS)
    return new.astype(cache.dtype)


@_pytree_dataclass
class KVLayer:
    """Keys and values of one attention layer: k, v [B, S, K, D], rotated keys."""

    k: jax.Array
    v: jax.Array

    @staticmethod
    def axes() -> "KVLayer":
        names = ("batch", "cache_seq", "cache_heads", "head_dim")
        return KVLayer(k=names, v=names)

    def write(self, k_BTKD: jax.Array, v_BTKD: jax.Array, lengths_B: jax.Array) -> "KVLayer":
        """Writes T new keys/values per row at slots [length, length + T); slots past the end
        of the cache are dropped (a speculative tree near the end of the cache writes past it).
        One decode token (T = 1) of a single row must lie within the cache: its write is
        shifted onto the last slot otherwise.

        A single row is written with one `dynamic_update_slice` per tensor: XLA then writes in
        place and fuses the producer (the rotary embedding) into the write. A scatter, which
        several rows need, keeps its bounds check as separate kernels (counted on the compiled
        8B decode step at batch 1: 4 kernels per layer more than the two in-place writes)."""
        B, T = k_BTKD.shape[:2]
        S = self.k.shape[1]
        if B == 1 and T == 1:
            # `_in_dim` gives the other axes' zero starts the length's type (int32 also in
            # x64 mode, where a literal 0 would be int64 and the update would not trace).
            return KVLayer(
                k=jax.lax.dynamic_update_slice_in_dim(
                    self.k, _stored(k_BTKD, self.k), lengths_B[0], axis=1),
                v=jax.lax.dynamic_update_slice_in_dim(
                    self.v, _stored(v_BTKD, self.v), lengths_B[0], axis=1),
            )
        if B == 1 and T <= S:
            # A window of T slots that ends at the last slot at the latest: where the tokens
            # would pass the end, the window starts `shift` slots before the row's length,
            # those slots keep what they hold, and the tokens past the end are dropped.
            start = jnp.minimum(lengths_B[0], S - T)
            shift = lengths_B[0] - start
            keep_old = (jnp.arange(T, dtype=jnp.int32) < shift)[None, :, None, None]

            def put(cache, new):
                old = jax.lax.dynamic_slice_in_dim(cache, start, T, axis=1)
                new = _stored(new, cache)
                padded = jnp.concatenate([jnp.zeros_like(new), new], axis=1)
                moved = jax.lax.dynamic_slice_in_dim(padded, T - shift, T, axis=1)
                return jax.lax.dynamic_update_slice_in_dim(
                    cache, jnp.where(keep_old, old, moved), start, axis=1)

            return KVLayer(k=put(self.k, k_BTKD), v=put(self.v, v_BTKD))
        rows = jnp.arange(k_BTKD.shape[0], dtype=jnp.int32)[:, None]
        slots = lengths_B[:, None] + jnp.arange(T, dtype=lengths_B.dtype)[None, :]
        return KVLayer(
            k=self.k.at[rows, slots].set(_stored(k_BTKD, self.k), mode="drop"),
            v=self.v.at[rows, slots].set(_stored(v_BTKD, self.v), mode="drop"),
        )

    def commit(self, lengths_B, accepted_slots_BN, n_accepted_B, prefix: bool = False
               ) -> "KVLayer":
        if prefix:  # the kept keys and values already lie at slots length + i
            return self
        B, N = accepted_slots_BN.shape
        S = self.k.shape[1]
        rows = jnp.arange(B, dtype=jnp.int32)[:, None]
        src = lengths_B[:, None] + accepted_slots_BN
        dst = lengths_B[:, None] + jnp.arange(N, dtype=lengths_B.dtype)[None, :]
        # Slots past the accepted count are not written (sent out of range and dropped).
        dst = jnp.where(jnp.arange(N, dtype=jnp.int32)[None, :] < n_accepted_B[:, None], dst, S)

        def move(x):
            picked = x[rows, jnp.clip(src, 0, S - 1)]  # gather all first: sources may overlap
            return x.at[rows, dst].set(picked, mode="drop")

        return KVLayer(k=move(self.k), v=move(self.v))


@_pytree_dataclass
class Cache:
    """Per-layer entries and per-row committed lengths (int32 [B])."""

    layers: tuple[Any, ...]
    lengths: jax.Array

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        """Number of slots per row (the static capacity)."""
        return self.layers[0].k.shape[1]

    def replace(self, **changes) -> "Cache":
        return dataclasses.replace(self, **changes)


@parallel.runs_on_model_mesh(lambda a: a["mesh"])
def init_cache(
    config,
    batch_size: int,
    max_len: int,
    *,
    dtype=jnp.float32,
    mesh=None,
    abstract: bool = False,
) -> Cache:
    """Allocates an empty cache (zeros, lengths 0), placed with the mesh's sharding. `dtype`
    must be the model's (`model.dtype`: a model refuses a cache of another dtype).

    With `abstract=True` every leaf is a `jax.ShapeDtypeStruct` (shape, dtype, sharding; no
    memory), what a program compiled ahead (`compile_only=True`) needs; the allocation's own
    small programs are compiled then too, so the real call that follows compiles nothing.

    KV heads are sharded over the `tp` mesh axis. When tp exceeds the model's KV heads, each
    shard holds the one KV head its query heads read, so the cache has max(K, tp) heads.
    """

    check_config(config)
    batch_size, max_len = check_int("batch_size", batch_size), check_int("max_len", max_len)
    dtype = check_param_dtype(dtype)  # an integer cache would truncate every key and value
    mesh = parallel.resolve_mesh(mesh)
    parallel.check_divisibility(config, mesh)
    if batch_size % parallel.dp_size(mesh):
        raise ValueError(f"batch_size={batch_size} is not a multiple of the mesh's "
                         f"dp={parallel.dp_size(mesh)} (the cache's rows are split dp ways)")
    heads = parallel.cache_kv_heads(config, mesh)
    shape = (batch_size, max_len, heads, config.head_dim)
    shardings = parallel.shardings(mesh, cache_axes(config), config)
    zeros = _compile_zeros if abstract else _zeros
    layers = tuple(
        KVLayer(k=zeros(shape, dtype, device=s.k), v=zeros(shape, dtype, device=s.v))
        for s in shardings.layers
    )
    return Cache(layers=layers, lengths=zeros((batch_size,), jnp.int32, device=shardings.lengths))


@functools.lru_cache(maxsize=256)
def _zeros_program(shape: tuple, dtype, sharding):
    """The allocation of zeros as a jitted function, one per shape, dtype and sharding (every
    layer shares it). A jitted function, not a compiled executable: inside a traced program
    (a DraftModel's cache, made in the speculative loop's program) it is traced like any op,
    where an executable would run and leave its output in the program as a constant."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def _zeros(shape, dtype, device):
    return _zeros_program(shape, jnp.dtype(dtype), device)()


def _compile_zeros(shape, dtype, device) -> jax.ShapeDtypeStruct:
    """The allocation compiled (the real allocation later compiles nothing), not run."""
    _zeros_program(shape, jnp.dtype(dtype), device).lower().compile()
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=device)


def cache_axes(config) -> Cache:
    """Logical axis names of every cache leaf (same structure as the cache)."""
    return Cache(
        layers=tuple(KVLayer.axes() for _ in range(config.num_layers)), lengths=("batch",)
    )


def _check_accepted_values(cache: Cache, accepted_slots, n_accepted) -> None:
    """The ranges `commit` promises, where the values are known (outside a trace; inside
    one, the caller's loop is trusted): 0 <= n_accepted <= N, lengths + n_accepted within
    the cache, 0 <= accepted_slots."""
    arrays = (accepted_slots, n_accepted, cache.lengths)
    if any(isinstance(x, jax.core.Tracer) or not getattr(x, "is_fully_addressable", True)
           for x in arrays):
        return
    n = np.asarray(n_accepted)
    N = accepted_slots.shape[1]
    if n.size and (n.min() < 0 or n.max() > N):
        raise ValueError(f"n_accepted must be in [0, {N}] (accepted_slots has {N} columns), "
                         f"got {n.tolist()}")
    if n.size and np.max(np.asarray(cache.lengths) + n) > cache.max_len:
        raise ValueError(f"n_accepted {n.tolist()} would grow the lengths "
                         f"{np.asarray(cache.lengths).tolist()} past the cache's "
                         f"{cache.max_len} slots")
    if accepted_slots.size and int(np.min(np.asarray(accepted_slots))) < 0:
        raise ValueError("accepted_slots must be >= 0 (indices among the last forward's "
                         "tokens)")


def commit(cache: Cache, accepted_slots: jax.Array, n_accepted: jax.Array, *,
           prefix: bool = False) -> Cache:
    """Keeps the accepted path of the tokens written by the last forward.

    The last forward wrote T tokens per row at slots [length, length + T) without advancing
    the lengths. `accepted_slots[b, i]` is the index (0..T-1) among those tokens of the i-th
    accepted one, in path order; the first `n_accepted[b]` of them are moved to slots
    length + i, and the row's length grows by `n_accepted[b]`. Plain decoding is the special
    case accepted_slots = [[0]], n_accepted = 1. Rejected slots are left to be overwritten.

    Args:
      cache: the cache after the forward.
      accepted_slots: int [B, N] with N <= T, increasing along a path (a tree lists parents
        before children).
      n_accepted: int [B], 0 <= n_accepted <= N.
      prefix: static; True promises accepted_slots[b, i] == i for i < n_accepted[b] (a chain's
        accepted path is always its prefix): the kept tokens are where the forward wrote them,
        so nothing moves and only the lengths advance (no gather and scatter per layer).
    Returns:
      The cache with the path made contiguous and lengths advanced.
    """
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be a jaxdec Cache (see init_cache), got "
                        f"{type(cache).__name__}")
    accepted_slots = check_int_array("accepted_slots", accepted_slots)
    n_accepted = check_int_array("n_accepted", n_accepted)
    prefix = check_bool("prefix", prefix)
    if accepted_slots.ndim != 2 or accepted_slots.shape[0] != cache.batch_size:
        raise ValueError(
            f"accepted_slots must be [batch={cache.batch_size}, N], got {accepted_slots.shape}"
        )
    if n_accepted.shape != (cache.batch_size,):
        raise ValueError(f"n_accepted must be [{cache.batch_size}], got {n_accepted.shape}")
    _check_accepted_values(cache, accepted_slots, n_accepted)
    layers = tuple(
        entry.commit(cache.lengths, accepted_slots, n_accepted, prefix) for entry in cache.layers
    )
    return Cache(layers=layers, lengths=cache.lengths + n_accepted)
