"""Cache pytrees: allocation, per-row writes, and `commit` of an accepted tree path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec.cache import Cache, KVLayer, commit
from jaxdec.model import forward_with_cache


def _filled_layer(B=2, S=8, K=1, D=1):
    # Slot s of row b holds 100 * b + s: every move is visible in the values.
    values = (100 * np.arange(B)[:, None] + np.arange(S)[None, :]).astype(np.float32)
    kv = jnp.asarray(np.broadcast_to(values[:, :, None, None], (B, S, K, D)))
    return KVLayer(k=kv, v=-kv)


def test_write_at_per_row_lengths():
    layer = KVLayer(k=jnp.zeros((2, 6, 1, 1)), v=jnp.zeros((2, 6, 1, 1)))
    new = jnp.array([[1.0, 2.0], [3.0, 4.0]])[:, :, None, None]
    out = layer.write(new, -new, jnp.array([1, 4]))
    np.testing.assert_array_equal(out.k[..., 0, 0], [[0, 1, 2, 0, 0, 0], [0, 0, 0, 0, 3, 4]])
    np.testing.assert_array_equal(out.v, -out.k)


def test_write_past_the_end():
    """Slots past the end are dropped, for a batch's rows (a scatter) as for a single row (a
    window that ends at the last slot at the latest, the slots before the row's length kept:
    one dynamic_update_slice, which XLA fuses with the rotary embedding that produces it). A
    speculative tree near the end of the cache writes past it (its nodes there are never
    accepted); the slots it must not touch are the committed ones."""
    new = jnp.array([[7.0, 8.0], [5.0, 6.0]])[:, :, None, None]
    rows = KVLayer(k=jnp.zeros((2, 4, 1, 1)), v=jnp.zeros((2, 4, 1, 1)))
    out = rows.write(new, new, jnp.array([3, 1]))
    np.testing.assert_array_equal(out.k[:, :, 0, 0], [[0, 0, 0, 7], [0, 5, 6, 0]])
    one = _filled_layer(B=1, S=4)  # slots hold 0, 1, 2, 3
    for length, want in ((1, [0, 7, 8, 3]), (2, [0, 1, 7, 8]), (3, [0, 1, 2, 7]),
                         (4, [0, 1, 2, 3])):
        out = jax.jit(one.write)(new[:1], -new[:1], jnp.array([length]))
        np.testing.assert_array_equal(out.k[0, :, 0, 0], want, err_msg=f"length {length}")
        np.testing.assert_array_equal(out.v, -out.k)
    # A decode token (within the cache), and more tokens than the cache has slots.
    token = new[:1, :1]
    np.testing.assert_array_equal(one.write(token, token, jnp.array([2])).k[0, :, 0, 0],
                                  [0, 1, 7, 3])
    five = jnp.arange(10.0, 15.0)[None, :, None, None]
    np.testing.assert_array_equal(one.write(five, five, jnp.array([2])).k[0, :, 0, 0],
                                  [0, 1, 10, 11])


def test_a_bf16_cache_as_bits_writes_and_commits_the_same_bits():
    """A bf16 cache carried as its uint16 bits (`as_bits`, the CPU loops' form) is written and
    committed bit for bit as the bf16 cache is, on every write path (one decode token of one
    row, a row's block near and past the end, several rows), NaN and -0.0 included, and
    `as_floats` gives the bf16 cache back."""
    from jaxdec.cache import BF16_BITS, as_bits, as_floats

    rng = np.random.default_rng(0)
    S, K, D = 12, 2, 4
    bits16 = lambda x: np.asarray(x).view(np.uint16)  # noqa: E731
    for B, T, lengths in ((1, 1, [5]), (1, 4, [3]), (1, 4, [10]), (3, 1, [0, 7, 11]),
                          (3, 4, [2, 9, 12])):
        base = rng.normal(size=(B, S, K, D)).astype(jnp.bfloat16)
        new = rng.normal(size=(B, T, K, D)).astype(np.float32)
        new.reshape(-1)[:2] = [np.nan, -0.0]
        cache = Cache(layers=(KVLayer(k=jnp.asarray(base), v=jnp.asarray(-base)),),
                      lengths=jnp.asarray(lengths, jnp.int32))
        as_bf16 = cache.layers[0].write(jnp.asarray(new), -jnp.asarray(new), cache.lengths)
        carried = as_bits(cache)
        assert carried.layers[0].k.dtype == BF16_BITS
        written = jax.jit(lambda c, n: c.layers[0].write(n, -n, c.lengths))(carried,
                                                                           jnp.asarray(new))
        assert written.k.dtype == BF16_BITS
        back = as_floats(Cache(layers=(written,), lengths=cache.lengths)).layers[0]
        assert back.k.dtype == jnp.bfloat16
        for got, want in ((back.k, as_bf16.k), (back.v, as_bf16.v)):
            np.testing.assert_array_equal(bits16(got), bits16(want), err_msg=f"{B} {T}")
        if T > 1:
            slots = jnp.asarray(np.sort(rng.integers(0, T, size=(B, 3)), axis=1), jnp.int32)
            n = jnp.asarray(rng.integers(0, 4, size=B), jnp.int32)
            start = jnp.minimum(cache.lengths, S - 1)
            want = commit(Cache(layers=(as_bf16,), lengths=start), slots, n)
            got = as_floats(commit(Cache(layers=(written,), lengths=start), slots, n))
            np.testing.assert_array_equal(bits16(got.layers[0].k), bits16(want.layers[0].k))
    # An abstract cache (ahead-of-time compiles) as its abstract bits, and back.
    config = jaxdec.ModelConfig(vocab_size=16, hidden_size=16, intermediate_size=32,
                                num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)
    abstract = jaxdec.init_cache(config, 1, 8, dtype=jnp.bfloat16, abstract=True)
    carried = as_bits(abstract)
    assert jax.tree.map(lambda x: x.dtype, carried) == jax.tree.map(
        lambda x: x.dtype, jax.eval_shape(as_bits, abstract))
    assert carried.layers[0].k.sharding == abstract.layers[0].k.sharding
    assert as_floats(carried).layers[0].v.dtype == jnp.bfloat16


def test_commit_hand_computed():
    layer = _filled_layer()
    cache = Cache(layers=(layer,), lengths=jnp.array([2, 3]))
    # Row 0: tokens were written at slots 2..; accept new tokens 0, 2, 3 -> slots 2, 4, 5.
    # Row 1: written at slots 3..; accept only new token 1 -> slot 4.
    out = commit(cache, jnp.array([[0, 2, 3], [1, 0, 0]]), jnp.array([3, 1]))
    np.testing.assert_array_equal(out.lengths, [5, 4])
    np.testing.assert_array_equal(out.layers[0].k[0, :, 0, 0], [0, 1, 2, 4, 5, 5, 6, 7])
    np.testing.assert_array_equal(out.layers[0].k[1, :, 0, 0], [100, 101, 102, 104, 104, 105, 106, 107])
    np.testing.assert_array_equal(out.layers[0].v, -out.layers[0].k)


def test_commit_nothing_and_plain_decode_are_identities():
    cache = Cache(layers=(_filled_layer(),), lengths=jnp.array([2, 3]))
    none = commit(cache, jnp.zeros((2, 2), jnp.int32), jnp.array([0, 0]))
    np.testing.assert_array_equal(none.layers[0].k, cache.layers[0].k)
    np.testing.assert_array_equal(none.lengths, [2, 3])
    step = commit(cache, jnp.zeros((2, 1), jnp.int32), jnp.array([1, 1]))
    np.testing.assert_array_equal(step.layers[0].k, cache.layers[0].k)
    np.testing.assert_array_equal(step.lengths, [3, 4])


def test_a_prefix_path_commits_without_moving_anything():
    """prefix=True (a chain's path, slots 0..n-1) keeps the cache as written and advances the
    lengths: the same cache as the moving commit of that path."""
    cache = Cache(layers=(_filled_layer(),), lengths=jnp.array([2, 3]))
    path, n = jnp.array([[0, 1, 2], [0, 1, 2]]), jnp.array([3, 1])
    moved, kept = commit(cache, path, n), commit(cache, path, n, prefix=True)
    assert kept.layers[0] is cache.layers[0]
    np.testing.assert_array_equal(kept.lengths, [5, 4])
    np.testing.assert_array_equal(moved.lengths, kept.lengths)
    np.testing.assert_array_equal(moved.layers[0].k, kept.layers[0].k)
    np.testing.assert_array_equal(moved.layers[0].v, kept.layers[0].v)


def test_commit_refuses_lengths_past_the_cache():
    layer = _filled_layer()
    full = layer.k.shape[1]
    cache = Cache(layers=(layer,), lengths=jnp.array([full - 1, 0]))
    with pytest.raises(ValueError, match="past the cache's"):
        commit(cache, jnp.zeros((2, 2), jnp.int32), jnp.array([2, 0]))
    # Inside a trace the caller's loop is trusted (nothing to check there).
    traced = jax.jit(commit)(cache, jnp.zeros((2, 2), jnp.int32), jnp.array([1, 0]))
    assert traced.lengths.tolist() == [full, 0]


def test_commit_rejects_bad_shapes():
    cache = Cache(layers=(_filled_layer(),), lengths=jnp.array([2, 3]))
    with pytest.raises(ValueError, match="accepted_slots"):
        commit(cache, jnp.zeros((3, 2), jnp.int32), jnp.array([0, 0]))
    with pytest.raises(ValueError, match="n_accepted"):
        commit(cache, jnp.zeros((2, 2), jnp.int32), jnp.array([0, 0, 0]))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"cache": None}, TypeError, "cache must be a jaxdec Cache"),
    ({"accepted_slots": None}, TypeError, "accepted_slots must be an integer array"),
    ({"accepted_slots": [[0.0, 1.0], [0.5, 0.0]]}, TypeError, "accepted_slots must be an int"),
    ({"n_accepted": jnp.array([True, False])}, TypeError, "n_accepted must be an integer"),
    ({"n_accepted": ["1", "0"]}, TypeError, "n_accepted must be an integer array"),
    ({"prefix": "yes"}, TypeError, "prefix must be a bool"),
    ({"n_accepted": [3, 1]}, ValueError, r"n_accepted must be in \[0, 2\]"),
    ({"n_accepted": [-1, 1]}, ValueError, r"n_accepted must be in \[0, 2\]"),
    ({"accepted_slots": [[0, -7], [1, 0]]}, ValueError, "accepted_slots must be >= 0"),
])
def test_commit_rejects_bad_arguments(kwargs, error, match):
    """Each named before anything runs; nested lists and numpy integers are taken."""
    cache = Cache(layers=(_filled_layer(),), lengths=jnp.array([2, 3]))
    args = {"cache": cache, "accepted_slots": [[0, 1], [1, 0]],
            "n_accepted": np.array([2, 1], np.int64), "prefix": False}
    commit(**args)
    with pytest.raises(error, match=match):
        commit(**{**args, **kwargs})


def test_commit_of_a_verified_tree_equals_decoding_the_accepted_path(loaded):
    """A tree forward (ancestor mask, positions = length + depth) followed by commit leaves
    the same cache as running only the accepted tokens."""
    model = loaded("llama-gqa")
    prompt = jnp.array([[5, 17, 33, 8]])
    positions = jnp.arange(4)[None]
    cache = jaxdec.init_cache(model.config, 1, 16)
    _, _, cache = forward_with_cache(model, prompt, positions, cache)
    cache = cache.replace(lengths=jnp.array([4]))

    # Tree: node 0 (root), nodes 1 and 2 children of 0, node 3 child of 2.
    tree_tokens = jnp.array([[40, 41, 42, 43]])
    depth = jnp.array([0, 1, 1, 2])
    ancestors = jnp.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], bool)
    tree_logits, _, tree_cache = forward_with_cache(
        model, tree_tokens, 4 + depth[None], cache, mask_BTT=ancestors[None])
    committed = commit(tree_cache, jnp.array([[0, 2, 3]]), jnp.array([3]))

    path_logits, _, path_cache = forward_with_cache(
        model, jnp.array([[40, 42, 43]]), jnp.arange(4, 7)[None], cache)
    path_cache = path_cache.replace(lengths=path_cache.lengths + 3)

    np.testing.assert_array_equal(committed.lengths, [7])
    # Equal up to fp32 rounding: past the first layer the keys and values come from hidden
    # states the two forwards computed with differently shaped products (4 tree tokens
    # against 3), whose summation order is the CPU's own (one machine measured 4.6e-6
    # relative); a wrong slot or path differs by O(1).
    for got, want in zip(committed.layers, path_cache.layers):
        np.testing.assert_allclose(got.k[:, :7], want.k[:, :7], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.v[:, :7], want.v[:, :7], rtol=1e-5, atol=1e-5)
    # The tree's logits on the accepted path equal the path's own logits.
    np.testing.assert_allclose(tree_logits[0, jnp.array([0, 2, 3])], path_logits[0],
                               rtol=1e-5, atol=1e-5)


def test_forward_with_cache_takes_int64_ids_under_strict_promotion(loaded):
    """Under jax_enable_x64 with strict promotion, int64 ids (jnp's default there) run (they
    met the embedding lookup's int32 offsets: a TypePromotionError)."""
    model = loaded("llama-gqa")
    tokens = jnp.array([[5, 17, 33, 8, 9]])
    reference = np.asarray(jaxdec.forward(model, tokens))
    with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
        wide = jnp.asarray(np.asarray(tokens), jnp.int64)
        logits, _, _ = forward_with_cache(model, wide, jnp.arange(5, dtype=jnp.int64)[None],
                                          jaxdec.init_cache(model.config, 1, 8), fresh=True)
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)


def test_init_cache_shapes_and_sharding(loaded):
    config = loaded("llama-gqa").config
    cache = jaxdec.init_cache(config, 2, 10, dtype=jnp.bfloat16, mesh=jaxdec.make_mesh(tp=2))
    assert len(cache.layers) == config.num_layers
    assert cache.layers[0].k.shape == (2, 10, 2, 8) and cache.layers[0].k.dtype == jnp.bfloat16
    assert cache.layers[0].k.sharding.spec == jax.sharding.PartitionSpec("dp", None, "tp", None)
    assert cache.max_len == 10 and cache.batch_size == 2
    np.testing.assert_array_equal(cache.lengths, [0, 0])
    # tp above the KV heads: one (replicated) KV head per shard.
    wide = jaxdec.init_cache(config, 1, 4, mesh=jaxdec.make_mesh(tp=4))
    assert wide.layers[0].k.shape == (1, 4, 4, 8)
    with pytest.raises(ValueError, match="max_len"):
        jaxdec.init_cache(config, 1, 0)
    with pytest.raises(TypeError, match="config must be a jaxdec ModelConfig, got NoneType"):
        jaxdec.init_cache(None, 1, 4)
    with pytest.raises(ValueError, match="dtype=int32 is not floating point"):
        jaxdec.init_cache(config, 1, 4, dtype=jnp.int32)  # would truncate keys and values
    # numpy ints (a computed size) are taken, as Python ints.
    sized = jaxdec.init_cache(config, np.int64(2), np.int32(10),
                              mesh=jaxdec.make_mesh(tp=np.int64(2)))
    assert (sized.batch_size, sized.max_len) == (2, 10)


def test_abstract_cache_matches_the_allocated_one(loaded):
    """`abstract=True` (what compile_only programs take): the same shapes, dtypes and
    shardings as the allocated cache, and no memory."""
    config = loaded("llama-gqa").config
    mesh = jaxdec.make_mesh(tp=2)
    real = jaxdec.init_cache(config, 2, 10, dtype=jnp.bfloat16, mesh=mesh)
    abstract = jaxdec.init_cache(config, 2, 10, dtype=jnp.bfloat16, mesh=mesh, abstract=True)
    assert jax.tree.structure(real) == jax.tree.structure(abstract)
    for r, a in zip(jax.tree.leaves(real), jax.tree.leaves(abstract)):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype, a.sharding) == (r.shape, r.dtype, r.sharding)


def test_init_cache_inside_a_traced_program_is_traced(loaded):
    """A cache made inside a jitted program (a DraftModel's, in the speculative loop) is part
    of the program, not an allocation run while tracing and captured as a constant."""
    config = loaded("llama-gqa").config
    closed = jax.make_jaxpr(lambda: jaxdec.init_cache(config, 2, 64, mesh=jaxdec.make_mesh(tp=2)))()
    assert all(np.size(c) <= 1 for c in closed.consts)
    assert "broadcast_in_dim" in str(closed) or "pjit" in str(closed)
