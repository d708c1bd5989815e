"""The blocked jnp attention (`tree_attention.Impl.BLOCKED`, AUTO's CPU path over long caches)
against the reference, and what AUTO picks on a CPU."""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import jaxdec
from jaxdec.models import layers as L
from jaxdec.pallas_kernels import tree_attention as TA
from jaxdec.pallas_kernels.tree_attention import blocked
from test_tree_attention_vs_reference import ancestor_mask, make_case, reference_of


TREE_ATTENTION_BLOCKED = blocked.tree_attention_blocked


@functools.partial(jax.jit, static_argnames=("window", "block"))
def _blocked(case_arrays, mask, *, window, block):
    return blocked.tree_attention_blocked(*case_arrays, mask_BTT=mask, window=window,
                                          block=block)


def run_blocked(case, block):
    arrays = tuple(case[n] for n in ("q_BTHD", "k_BSKD", "v_BSKD", "lengths_B", "positions_BT"))
    return _blocked(arrays, case["mask_BTT"], window=case["window"], block=block)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 3), T=st.sampled_from([1, 3, 8]), K=st.sampled_from([1, 2]),
    G=st.sampled_from([1, 4]), S=st.integers(9, 200), block=st.sampled_from([8, 32, 256]),
    tree=st.sampled_from(["chain", "star", "random"]), causal=st.booleans(),
    window=st.sampled_from([None, 1, 5, 40]), seed=st.integers(0, 2**16),
)
def test_blocked_equals_the_reference(B, T, K, G, S, block, tree, causal, window, seed):
    """Drawn shapes, per-row lengths (rows of different lengths), trees or a causal block,
    windows, and blocks smaller than, across or larger than the cache (the last one shifted
    back inside it): fp32 results equal to the reference's."""
    case = make_case(B=B, T=T, K=K, G=G, D=8, S=S, tree=tree, window=window,
                     dtype=jnp.float32, seed=seed, causal=causal)
    np.testing.assert_allclose(run_blocked(case, block), reference_of(case),
                               rtol=1e-5, atol=1e-5)


def test_blocked_hand_computed_across_blocks():
    """The reference's hand case (two cached keys, a root with two children) in blocks of 2
    slots: the prefix, the root and a child fall in different blocks; window 2 too."""
    q = jnp.array([0.0, 1.0, 2.0]).reshape(1, 3, 1, 1)
    keys, vals = np.array([1.0, -1.0, 0.5, 2.0, 3.0]), np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    k, v = jnp.asarray(keys).reshape(1, 5, 1, 1), jnp.asarray(vals).reshape(1, 5, 1, 1)
    mask = jnp.asarray(ancestor_mask([-1, 0, 0]))[None]
    positions = jnp.array([[2, 3, 3]])
    out = blocked.tree_attention_blocked(q, k, v, jnp.array([2]), positions, mask_BTT=mask,
                                         block=2)
    for t, slots in enumerate([[0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 4]]):
        scores = np.array([float(q[0, t, 0, 0]) * keys[s] for s in slots])
        p = np.exp(scores - scores.max())
        np.testing.assert_allclose(out[0, t, 0, 0], (p / p.sum()) @ vals[slots], rtol=1e-6)
    out = blocked.tree_attention_blocked(q, k, v, jnp.array([2]), positions, mask_BTT=mask,
                                         window=2, block=2)
    np.testing.assert_allclose(out[0, 0, 0, 0], (20.0 + 30.0) / 2, rtol=1e-6)


@pytest.mark.parametrize("window", [None, 16])
def test_blocks_past_the_rows_and_before_the_window_are_never_read(window):
    """Slots in blocks wholly past the longest row's length + T (or wholly before every
    query's window) hold NaN: the blocked result is finite and equals the reference's on a
    cache without them (the reference reads every slot: NaN there reaches its output)."""
    B, T, S, C = 2, 4, 512, 32
    case = make_case(B=B, T=T, K=2, G=2, D=8, S=S, tree="random", window=window,
                     dtype=jnp.float32, seed=3)
    lengths = np.array([300, 200])
    case["lengths_B"] = jnp.asarray(lengths, jnp.int32)
    depth = np.asarray(case["mask_BTT"]).sum(-1) - 1
    case["positions_BT"] = jnp.asarray(lengths[:, None] + depth, jnp.int32)
    clean = reference_of(case)
    first_unread = -(-(lengths.max() + T) // C) * C
    poisoned = dict(case)
    for name in ("k_BSKD", "v_BSKD"):
        x = np.array(case[name])
        x[:, first_unread:] = np.nan
        if window is not None:  # the earliest query is at position 200: slots < 185 unseen
            x[:, :C * ((200 - window + 1) // C)] = np.nan
        poisoned[name] = jnp.asarray(x)
    got = run_blocked(poisoned, C)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, clean, rtol=1e-5, atol=1e-5)
    assert not np.isfinite(np.asarray(reference_of(poisoned))).all()


def test_a_window_past_another_rows_tokens_still_walks_them():
    """Positions ahead of slots (the function takes any; jaxdec's models keep position =
    slot): a window starting past one row's new tokens, set by another row's positions, does
    not skip that row's own slots."""
    case = make_case(B=2, T=3, K=1, G=2, D=8, S=1024, tree="chain", window=4,
                     dtype=jnp.float32, seed=11)
    case["lengths_B"] = jnp.array([600, 100], jnp.int32)
    case["positions_BT"] = jnp.array([[600, 601, 602], [900, 901, 902]], jnp.int32)
    want = reference_of(case)
    assert np.abs(np.asarray(want[1])).max() > 0.1
    np.testing.assert_allclose(run_blocked(case, 256), want, rtol=1e-5, atol=1e-5)


def test_auto_walks_long_caches_in_blocks_on_a_cpu():
    """On a CPU, AUTO takes BLOCKED for a cache of BLOCKED_MIN_SLOTS or more, the reference
    below it, for the cache-free case (the keys are the new tokens') and when REFERENCE is
    asked for."""
    assert jax.default_backend() == "cpu"
    q = (1, 1, 4, 16)
    long = jax.ShapeDtypeStruct((1, L.BLOCKED_MIN_SLOTS, 2, 16), jnp.float32)
    short = jax.ShapeDtypeStruct((1, L.BLOCKED_MIN_SLOTS - 1, 2, 16), jnp.float32)
    assert L.kernel_for(L.AttentionImpl.AUTO, q, long) == (TA.Impl.BLOCKED, False)
    assert L.kernel_for(L.AttentionImpl.AUTO, q, short) is None
    assert L.kernel_for(L.AttentionImpl.AUTO, q, long, cached=False) is None
    assert L.kernel_for(L.AttentionImpl.REFERENCE, q, long) is None
    with L.use_platform("tpu"):  # another platform's AUTO is untouched
        assert L.kernel_for(L.AttentionImpl.AUTO, q, long) != (TA.Impl.BLOCKED, False)


def test_a_long_prefill_over_a_cache_attends_in_query_chunks(monkeypatch):
    """A prefill continuing a cache of BLOCKED_MIN_SLOTS or more (a PrefixCache's next turn)
    attends 512 queries at a time, as a fresh one does (all of its queries at once held
    queries x block scores: 676 MB at 16K tokens, growing with the prompt), with the whole
    sequence's logits."""
    from jaxdec.model import forward_with_cache

    seen = []
    monkeypatch.setattr(blocked, "tree_attention_blocked", lambda q, *a, **k: seen.append(
        q.shape[1]) or TREE_ATTENTION_BLOCKED(q, *a, **k))
    config = jaxdec.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                                max_position_embeddings=2048)
    model = jaxdec.init_model(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 700), 0, 64)
    cache = jaxdec.init_cache(config, 1, 1024)
    first, rest = tokens[:, :100], tokens[:, 100:]
    _, _, cache = forward_with_cache(model, first, jnp.arange(100)[None], cache, fresh=True)
    cache = cache.replace(lengths=jnp.array([100], jnp.int32))  # (the caller commits)
    seen.clear()
    logits, _, _ = forward_with_cache(model, rest, jnp.arange(100, 700)[None], cache,
                                      prefill=True)
    assert seen and max(seen) == 512
    np.testing.assert_allclose(logits, jaxdec.forward(model, tokens)[:, 100:], rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("tp", [1, 2])
def test_generate_over_a_long_cache_matches_the_reference(tp, hf_checkpoints, monkeypatch):
    """Greedy decoding of a ragged batch with a cache of 1024 slots (AUTO: blocked) gives the
    reference's tokens, on one device and under tensor parallelism (the loop's carry under
    `shard_map`); speculative decoding with prompt lookup too."""
    traced = []
    monkeypatch.setattr(blocked, "tree_attention_blocked", lambda *a, **k: traced.append(1) or
                        TREE_ATTENTION_BLOCKED(*a, **k))
    model = jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0],
                                   mesh=jaxdec.make_mesh(tp=tp))
    prompts = [[5, 9, 2, 7, 5, 9, 2], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]
    kw = dict(max_new_tokens=12, max_len=1024)
    want = jaxdec.generate(model.with_attention(L.AttentionImpl.REFERENCE), prompts, **kw)
    assert not traced
    got = jaxdec.generate(model, prompts, **kw)
    assert traced  # the decode steps' layers
    np.testing.assert_array_equal(got.tokens, want.tokens)
    if tp == 1:
        spec = jaxdec.speculative_generate(model, jaxdec.drafters.PromptLookup(), prompts,
                                           **kw)
        np.testing.assert_array_equal(spec.tokens, want.tokens)


def test_bf16_decoding_on_a_cpu_carries_the_cache_as_bits(monkeypatch):
    """A bf16 model on a CPU: the decode loop carries its cache as uint16 bits
    (`jaxdec.cache.as_bits`; XLA's CPU backend would convert the whole bf16 cache at every
    write and block read). Tokens and the returned cache are bit for bit those of the loop
    carrying bf16, over a cache of 1024 slots (blocked attention) and one of 64 (the
    reference); speculative decoding too."""
    gen = sys.modules["jaxdec.generate"]  # the module (`jaxdec.generate` is the function)
    config = jaxdec.ModelConfig(model_type="llama", vocab_size=96, hidden_size=64,
                                intermediate_size=128, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=16, max_position_embeddings=2048)
    model = jaxdec.init_model(config, jax.random.key(3), dtype=jnp.bfloat16, std=0.3)
    tokens = jnp.asarray([[5, 9, 2, 7, 0, 0], [3, 1, 4, 1, 5, 9]], jnp.int32)
    lengths = jnp.asarray([4, 6], jnp.int32)

    def run(slots):
        cache = jaxdec.init_cache(config, 2, slots, dtype=jnp.bfloat16)
        (out, n), cache = jax.jit(lambda c: jaxdec.generate_padded(
            model, tokens, lengths, c, jax.random.key(0), max_new_tokens=10))(cache)
        return np.asarray(out), [np.asarray(x).view(np.uint16) for x in jax.tree.leaves(cache)
                                 if x.dtype == jnp.bfloat16]

    for slots in (1024, 64):
        carried = run(slots)
        with monkeypatch.context() as m:
            m.setattr(gen, "as_bits", lambda tree: tree)
            m.setattr(gen, "as_floats", lambda tree: tree)
            plain = run(slots)
        np.testing.assert_array_equal(carried[0], plain[0])
        assert len(carried[1]) == 2 * config.num_layers
        for got, want in zip(carried[1], plain[1]):
            np.testing.assert_array_equal(got, want)
    prompts = [[5, 9, 2, 7, 5, 9, 2], [3, 1, 4, 1, 5, 9]]
    want = jaxdec.generate(model, prompts, max_new_tokens=10, max_len=1024).tokens
    spec = jaxdec.speculative_generate(model, jaxdec.drafters.DraftModel(model), prompts,
                                       max_new_tokens=10, max_len=1024).tokens
    np.testing.assert_array_equal(spec, want)
