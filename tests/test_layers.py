"""Model building blocks against hand-computed values: RMSNorm, rotary embeddings (with
llama3 and linear scaling), the slot-visibility rule, and attention (the reference and its
query-chunked form), and the fused path for cache-free causal blocks (cuDNN on a GPU, checked
there by `TestCudnnOnGPU`; its call is checked here through jax's XLA implementation)."""

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec import RopeConfig
from jaxdec.model import forward_with_cache
from jaxdec.models import layers as L
from jaxdec.pallas_kernels import tree_attention as TA


def test_rms_norm_hand_computed():
    x = jnp.array([[3.0, 4.0]])
    # mean of squares = 12.5
    np.testing.assert_allclose(L.rms_norm(x, jnp.array([1.0, 2.0]), 0.0),
                               [[3 / math.sqrt(12.5), 8 / math.sqrt(12.5)]], rtol=1e-6)


def test_factored_rms_norm_then_projection_equals_the_norm_then_matmul():
    """`project(rms_norm_factored(x))` applies the row scale after the matmul: in fp32 the
    same as `rms_norm(x) @ W`, for 2-D and head-shaped weights."""
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(2, 3, 8).astype(np.float32))
    g = jnp.asarray(rs.rand(8).astype(np.float32) + 0.5)
    w = jnp.asarray(rs.randn(8, 2, 5).astype(np.float32))
    h, inv_rms = L.rms_norm_factored(x, g, 1e-5)
    assert inv_rms.shape == (2, 3, 1)
    want = jnp.einsum("bte,egf->btgf", L.rms_norm(x, g, 1e-5), w, precision="highest")
    np.testing.assert_allclose(L.project("bte,egf->btgf", h, w, inv_rms), want, rtol=1e-5,
                               atol=1e-5)


def test_pre_projection_norm_factors_only_a_few_tokens():
    """Up to FACTORED_NORM_MAX_TOKENS tokens the norm is factored into the projection, above
    it applied first; in fp32 both give the same projection."""
    rs = np.random.RandomState(1)
    g = jnp.asarray(rs.rand(8).astype(np.float32) + 0.5)
    w = jnp.asarray(rs.randn(8, 6).astype(np.float32))
    limit = L.FACTORED_NORM_MAX_TOKENS
    for tokens, factored in ((1, True), (limit, True), (limit + 1, False)):
        x = jnp.asarray(rs.randn(1, tokens, 8).astype(np.float32))
        h, inv_rms = L.pre_projection_norm(x, g, 1e-5)
        assert (inv_rms is not None) == factored
        want = jnp.einsum("bte,ef->btf", L.rms_norm(x, g, 1e-5), w, precision="highest")
        np.testing.assert_allclose(L.project("bte,ef->btf", h, w, inv_rms), want, rtol=1e-5,
                                   atol=1e-5)


def test_float16_is_never_factored():
    """fp16 ends at 65504: a residual entry of 3e4 under a gain of 4 is finite normalised but
    not as `weight * x` (every logit was NaN in short forwards and decode steps)."""
    x = jnp.full((1, 2, 8), 1.0, jnp.float16).at[0, 0, 3].set(3e4)
    g = jnp.full((8,), 4.0, jnp.float16)
    w = jnp.eye(8, dtype=jnp.float16)
    h, inv_rms = L.pre_projection_norm(x, g, 1e-5)
    assert inv_rms is None
    out = L.project("bte,ef->btf", h, w, inv_rms)
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(L.rms_norm(x, g, 1e-5), np.float32))
    assert L.pre_projection_norm(x.astype(jnp.bfloat16), g.astype(jnp.bfloat16), 1e-5)[1] \
        is not None  # bf16's range holds it: factored


@pytest.mark.parametrize("tokens,limit,size", [
    (4096, 4096, None),  # at most the limit: whole
    (5120, 4096, 2560),  # a 5120-token prompt bucket: two chunks
    (8192, 4096, 4096),
    (6400, 4096, 3200),  # batch 100 x 64 tokens
    (4099 * 2, 4096, None),  # no divisor in [1024, 4096]: whole
    (64, 16, 16),  # a limit under 1024 is its own lower bound
    (60, 16, None),
])
def test_mlp_chunk_tokens(tokens, limit, size):
    assert L.mlp_chunk_tokens(tokens, limit) == size


@pytest.mark.parametrize("bias,factored", [(False, False), (True, True)])
def test_chunked_gated_mlp_equals_the_whole(bias, factored):
    """Chunks of 8 of 2 x 12 tokens (3 in a lax.map), with and without a bias and the
    factored norm's row scale: every token's output as the whole MLP's."""
    rs = np.random.RandomState(2)
    x = jnp.asarray(rs.randn(2, 12, 8).astype(np.float32))
    w_up = jnp.asarray(rs.randn(2, 8, 16).astype(np.float32) / 3)
    w_down = jnp.asarray(rs.randn(16, 8).astype(np.float32) / 4)
    b = jnp.asarray(rs.randn(2, 16).astype(np.float32)) if bias else None
    inv_rms = jnp.asarray(rs.rand(2, 12, 1).astype(np.float32) + 0.5) if factored else None
    whole = L.gated_mlp(x, w_up, w_down, b, inv_rms)
    chunked = jax.jit(functools.partial(L.chunked_gated_mlp, max_tokens=8))(
        x, w_up, w_down, b, inv_rms)
    assert "while" in jax.jit(functools.partial(L.chunked_gated_mlp, max_tokens=8)).lower(
        x, w_up, w_down, b, inv_rms).as_text()
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


def test_map_in_place_equals_lax_map():
    """Results written over their inputs equal lax.map's; a function whose results differ in
    shape or dtype from its input's slices is mapped by lax.map."""
    xs = jnp.arange(24.0).reshape(4, 2, 3)
    scale = jnp.array([1.0, -2.0, 0.5, 3.0])
    fn = lambda x, s: jnp.tanh(x * s) + x[::-1]  # noqa: E731  (reads the whole slice)
    want = jax.lax.map(lambda a: fn(*a), (xs, scale))
    got = jax.jit(L.map_in_place, static_argnums=0)(fn, xs, scale)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert "while" in jax.jit(L.map_in_place, static_argnums=0).lower(fn, xs, scale).as_text()
    np.testing.assert_array_equal(L.map_in_place(lambda x: x.sum(0), xs), xs.sum(1))
    np.testing.assert_array_equal(L.map_in_place(lambda x: x.astype(jnp.int32), xs),
                                  xs.astype(jnp.int32))


def test_prefill_temporaries_do_not_grow_with_layers():
    """A long prefill's chunked MLP and query chunks write each chunk's result over its input
    (`map_in_place`). Through lax.map, whose stacked outputs start as zero fills, XLA merged
    every layer's fill into one at the program's start and each layer added its map outputs
    to the peak: 17 MB a layer here (4 prompts of 2000 tokens: the MLP in 2 chunks, 4 query
    chunks), 0.3 MB with the results in place."""
    def temporaries(layers):
        config = jaxdec.ModelConfig(
            model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
            num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5,
            max_position_embeddings=4096, tie_word_embeddings=False,
            rope=jaxdec.RopeConfig(theta=10000.0))
        compiled = jaxdec.generate(jaxdec.abstract_model(config), [[1] * 2000] * 4,
                                   max_new_tokens=4, compile_only=True)
        return compiled.memory_analysis().temp_size_in_bytes

    per_layer = (temporaries(4) - temporaries(2)) / 2
    assert per_layer < 2e6, per_layer


def test_prefill_writes_each_layers_cache_before_going_on():
    """An optimization barrier ties each layer's cache write to its attention output (XLA
    otherwise wrote every layer's keys and values at the program's end, all of them alive
    until then: +1.8 GB a layer for a 124K-token prompt of the Llama-3-8B shape compiled for
    an H100; this CPU's scheduler happens not to defer them). Other forwards have none."""
    config = jaxdec.ModelConfig(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
        num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5,
        max_position_embeddings=256, tie_word_embeddings=False,
        rope=jaxdec.RopeConfig(theta=10000.0))
    model = jaxdec.abstract_model(config)
    cache = jaxdec.init_cache(config, 1, 16, abstract=True)
    tokens = jnp.ones((1, 4), jnp.int32)
    positions = jnp.arange(4, dtype=jnp.int32)[None]

    def barriers(prefill):
        return forward_with_cache.lower(
            model, tokens, positions, cache, fresh=True, prefill=prefill).as_text().count(
                "optimization_barrier")

    assert barriers(True) == config.num_layers and barriers(False) == 0


def test_kernels_are_picked_for_the_platform_in_use():
    """`use_platform` (what forward_with_cache sets from the model's mesh) decides the kernel,
    not the default backend; outside it, the default backend does."""
    kernel = L.attention_kernel
    with L.use_platform("gpu"):
        assert L.current_platform() == "gpu"
        assert kernel(L.AttentionImpl.AUTO) == (TA.Impl.TRITON, False)
        with L.use_platform("tpu"):
            assert kernel(L.AttentionImpl.PALLAS) == (TA.Impl.MOSAIC, False)
        with L.use_platform(None):  # None keeps the platform in force
            assert L.current_platform() == "gpu"
        with L.use_platform("cpu"):
            assert kernel(L.AttentionImpl.AUTO) is None
            assert not L.fused_causal_usable(jnp.bfloat16, 4, 2, 8)
            with pytest.raises(ValueError, match="no Pallas kernel for the 'cpu' platform"):
                kernel(L.AttentionImpl.PALLAS)
    assert L.current_platform() == jax.default_backend()
    assert kernel(L.AttentionImpl.AUTO, "gpu") == (TA.Impl.TRITON, False)
    assert kernel(L.AttentionImpl.REFERENCE, "gpu") is None
    assert kernel(L.AttentionImpl.PALLAS_INTERPRET, "cpu") == (TA.Impl.TRITON, True)


def test_rope_inv_freq_default_linear_llama3():
    np.testing.assert_allclose(L.rope_inv_freq(RopeConfig(theta=100.0), 4), [1.0, 0.1], rtol=1e-6)
    np.testing.assert_allclose(L.rope_inv_freq(RopeConfig(theta=100.0, rope_type="linear",
                                                          factor=4.0), 4), [0.25, 0.025])
    # llama3, original context 64, low/high freq factors 1/4: wavelengths above 64 are
    # scaled by 1/8, below 16 kept, and in between interpolated.
    rope = RopeConfig(theta=10000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=64)
    base = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)  # wavelengths 6.3, 63, 628, 6283
    got = L.rope_inv_freq(rope, 8)
    wavelen = 2 * np.pi / base[1]
    smooth = (64 / wavelen - 1) / 3
    expected = [base[0], (1 - smooth) * base[1] / 8 + smooth * base[1], base[2] / 8, base[3] / 8]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_rope_inv_freq_yarn_hand_computed():
    # Head dim 8, theta 1e4: frequencies 1, 0.1, 0.01, 0.001. Over an original context of
    # 4096, 32 turns (beta_fast) fall at index 8 ln(4096 / 64pi) / (2 ln 1e4) = 1.309 and one
    # turn (beta_slow) at 8 ln(4096 / 2pi) / (2 ln 1e4) = 2.814; truncated outwards, 1 and 3.
    # The ramp over indices 0..3 is then clip((i - 1) / 2) = 0, 0, 0.5, 1.
    rope = RopeConfig(theta=10000.0, rope_type="yarn", factor=4.0,
                      original_max_position_embeddings=4096)
    np.testing.assert_allclose(L.rope_inv_freq(rope, 8),
                               [1.0, 0.1, 0.5 * 0.01 + 0.5 * 0.01 / 4, 0.001 / 4], rtol=1e-6)
    assert rope.attention_scale == pytest.approx(1 + 0.1 * math.log(4.0))
    # Without truncation the third weight is (2 - 1.309) / (2.814 - 1.309) = 0.45907.
    loose = dataclasses.replace(rope, truncate=False, attention_factor=0.5)
    np.testing.assert_allclose(L.rope_inv_freq(loose, 8)[2],
                               (1 - 0.45907) * 0.01 + 0.45907 * 0.01 / 4, rtol=1e-5)
    assert loose.attention_scale == 0.5
    assert RopeConfig(rope_type="linear", factor=4.0).attention_scale == 1.0


@pytest.mark.parametrize("rope", [
    RopeConfig(theta=500000.0),
    RopeConfig(theta=10000.0, rope_type="linear", factor=3.0),
    # Llama 3.1's settings; Qwen2.5's long-context YaRN; a YaRN of other settings.
    RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
               high_freq_factor=4.0, original_max_position_embeddings=8192),
    RopeConfig(theta=1000000.0, rope_type="yarn", factor=4.0,
               original_max_position_embeddings=32768),
    RopeConfig(theta=10000.0, rope_type="yarn", factor=2.5, beta_fast=16.0, beta_slow=2.0,
               original_max_position_embeddings=2048, truncate=False),
], ids=["default", "linear", "llama3", "yarn-qwen2.5", "yarn-loose"])
def test_rope_inv_freq_is_transformers_float32_computation(rope):
    """The frequencies transformers computes (in float32), most to the bit, the others within
    an ulp (a float64 computation was closer to the exact values and up to 3e-7 from the
    model's: logits 1.4e-4 apart at position 3000)."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from jaxdec.config import _rope_to_hf

    head_dim = 128
    params = dict(_rope_to_hf(rope) or {"rope_type": "default"}, rope_theta=rope.theta)
    if rope.original_max_position_embeddings:
        params["original_max_position_embeddings"] = rope.original_max_position_embeddings
    config = transformers.LlamaConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
        rope_parameters=params,
        max_position_embeddings=4 * (rope.original_max_position_embeddings or 2048))
    assert config.rope_parameters == params
    if rope.rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        theirs, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        theirs, _ = ROPE_INIT_FUNCTIONS[rope.rope_type](config, "cpu")
    theirs = theirs.numpy()
    ours = L.rope_inv_freq(rope, head_dim)
    assert theirs.dtype == ours.dtype == np.float32
    ulps = np.abs(ours.view(np.int32) - theirs.view(np.int32))
    # (torch's float32 power is vectorised and may be an ulp from the correctly rounded one
    # jaxdec computes)
    assert ulps.max() <= 1 and (ulps == 0).mean() > 0.9, ulps


def test_apply_rope_rotates_half_pairs():
    x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)  # pairs (1, 3) and (2, 4)
    inv_freq = np.array([0.5, 0.25], np.float32)
    out = L.apply_rope(x, jnp.array([[2]]), inv_freq)[0, 0, 0]
    a, b = 1.0, 0.5  # angles 2 * inv_freq
    expected = [1 * math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
                3 * math.cos(a) + 1 * math.sin(a), 4 * math.cos(b) + 2 * math.sin(b)]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(L.apply_rope(x, jnp.array([[0]]), inv_freq), x)
    np.testing.assert_allclose(L.apply_rope(x, jnp.array([[2]]), inv_freq, 1.5)[0, 0, 0],
                               1.5 * np.asarray(expected), rtol=1e-6)


def test_visible_slots_hand_computed():
    # Row 0: 2 cached tokens, 3 new causal tokens in slots 2..4; slot 5 is past the end.
    vis = L.visible_slots(jnp.array([2]), jnp.array([[2, 3, 4]]), 6)
    np.testing.assert_array_equal(vis[0], [[1, 1, 1, 0, 0, 0],
                                           [1, 1, 1, 1, 0, 0],
                                           [1, 1, 1, 1, 1, 0]])
    # A tree: node 2 is a sibling of node 1 (both children of node 0).
    tree = jnp.array([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], bool)
    vis = L.visible_slots(jnp.array([2]), jnp.array([[2, 3, 3]]), 6, mask_BTT=tree)
    np.testing.assert_array_equal(vis[0], [[1, 1, 1, 0, 0, 0],
                                           [1, 1, 1, 1, 0, 0],
                                           [1, 1, 1, 0, 1, 0]])
    # Window 2: a query at position p sees positions p - 1 and p.
    vis = L.visible_slots(jnp.array([2]), jnp.array([[2, 3, 3]]), 6, mask_BTT=tree, window=2)
    np.testing.assert_array_equal(vis[0], [[0, 1, 1, 0, 0, 0],
                                           [0, 0, 1, 1, 0, 0],
                                           [0, 0, 1, 0, 1, 0]])


def test_attention_reference_hand_computed():
    # One query over three cached keys (length 2 + the new token in slot 2), D = 2.
    q = jnp.array([1.0, 0.0]).reshape(1, 1, 1, 2)
    k = jnp.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [9.0, 9.0]]).reshape(1, 4, 1, 2)
    v = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]]).reshape(1, 4, 1, 2)
    out = L.attention_reference(q, k, v, jnp.array([2]), jnp.array([[2]]))[0, 0, 0]
    scores = np.array([1.0, 0.0, 2.0]) / math.sqrt(2)  # slot 3 is not visible
    p = np.exp(scores) / np.exp(scores).sum()
    np.testing.assert_allclose(out, [p[0] + p[2], p[1] + p[2]], rtol=1e-6)


def test_attention_gqa_matches_repeated_kv_heads():
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (2, 3, 6, 8))
    k = jax.random.normal(kk, (2, 10, 2, 8))
    v = jax.random.normal(kv, (2, 10, 2, 8))
    lengths, positions = jnp.array([4, 7]), jnp.array([[4, 5, 6], [7, 8, 9]])
    grouped = L.attention(q, k, v, lengths, positions)
    repeated = L.attention(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), lengths, positions)
    np.testing.assert_allclose(grouped, repeated, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 5])
def test_query_chunks_equal_one_block(window):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(1), 3)
    B, T, S = 2, 37, 48
    q = jax.random.normal(kq, (B, T, 4, 8))
    k = jax.random.normal(kk, (B, S, 2, 8))
    v = jax.random.normal(kv, (B, S, 2, 8))
    lengths = jnp.array([0, 6])
    positions = lengths[:, None] + jnp.arange(T)[None]
    whole = L.attention(q, k, v, lengths, positions, window=window, query_chunk=64)
    chunked = L.attention(q, k, v, lengths, positions, window=window, query_chunk=8)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 5])
def test_a_long_prefill_walks_its_keys_in_blocks(monkeypatch, window):
    """`prefill=True`: a causal block longer than a query chunk attends chunk by chunk over
    blocks of keys (3 chunks of 16 queries, blocks of 8 keys), with the reference's result;
    REFERENCE keeps the reference."""
    from jaxdec.pallas_kernels.tree_attention import blocked

    calls = []
    walk = blocked.tree_attention_blocked
    monkeypatch.setattr(L, "PREFILL_KEY_BLOCK", 8)
    monkeypatch.setattr(blocked, "tree_attention_blocked",
                        lambda *a, **k: calls.append(k["block"]) or walk(*a, **k))
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(3), 3)
    B, T = 2, 40
    q = jax.random.normal(kq, (B, T, 4, 8))
    k = jax.random.normal(kk, (B, T, 2, 8))
    v = jax.random.normal(kv, (B, T, 2, 8))
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    want = L.attention(q, k, v, None, positions, window=window, query_chunk=64)
    assert not calls
    got = L.attention(q, k, v, None, positions, window=window, query_chunk=16, prefill=True)
    # Traced for map_in_place's shape check and inside its loop over the chunks.
    assert calls == [8, 8]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    L.attention(q, k, v, None, positions, window=window, query_chunk=16, prefill=True,
                impl=L.AttentionImpl.REFERENCE)
    assert calls == [8, 8]


def test_attention_rejects_bad_arguments():
    q = jnp.zeros((1, 1, 3, 4))
    kv = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match="not a multiple of KV heads"):
        L.attention(q, kv, kv, jnp.array([0]), jnp.array([[0]]))
    with pytest.raises(TypeError, match="AttentionImpl"):
        L.attention(jnp.zeros((1, 1, 2, 4)), kv, kv, jnp.array([0]), jnp.array([[0]]), impl="fast")
    q = jnp.zeros((1, 1, 2, 4))
    for window in (0, -3, 2.5, True):  # 0 attended to every slot
        with pytest.raises(ValueError, match="window must be a positive int"):
            L.attention(q, kv, kv, jnp.array([0]), jnp.array([[0]]), window=window)
    with pytest.raises(ValueError, match=r"q must be \[B, T, H, D\] and k \[B, S, K, D\]"):
        L.attention(q, kv[0], kv[0], jnp.array([0]), jnp.array([[0]]))
    with pytest.raises(ValueError, match=r"lengths must be \[1\]"):
        L.attention(q, kv, kv, jnp.array([0, 0]), jnp.array([[0]]))


def test_attention_gradients_match_the_plain_reference():
    """The entry point rematerialises scores in the backward pass; gradients are unchanged."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(2), 3)
    q = jax.random.normal(kq, (1, 5, 4, 8))
    k = jax.random.normal(kk, (1, 5, 2, 8))
    v = jax.random.normal(kv, (1, 5, 2, 8))
    lengths, positions = jnp.array([0]), jnp.arange(5)[None]

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, lengths, positions, window=3) ** 2)

    got = jax.grad(functools.partial(loss, L.attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(functools.partial(loss, L.attention_reference), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


# ------------------------------------------------- cache-free causal blocks (cuDNN on GPU)


def _block(seed, B=2, T=37, H=6, K=2, D=8):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (B, T, H, D)), jax.random.normal(kk, (B, T, K, D)),
            jax.random.normal(kv, (B, T, K, D)))


@pytest.mark.parametrize("window", [None, 5])
def test_fused_causal_call_matches_the_reference(window):
    """`fused_causal` through jax's XLA implementation: the same call cuDNN serves on a GPU, so
    its arguments (causal, `window - 1` keys back, grouped KV heads) are checked here."""
    q, k, v = _block(3)
    lengths, positions = jnp.zeros((2,), jnp.int32), jnp.broadcast_to(jnp.arange(37), (2, 37))

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) ** 2)

    fused = functools.partial(L.fused_causal, window=window, implementation="xla")
    reference = lambda q, k, v: L.attention_reference(q, k, v, lengths, positions, window=window)  # noqa: E731
    np.testing.assert_allclose(fused(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-6)
    got = jax.grad(functools.partial(loss, fused), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_cache_free_entry_point_is_a_causal_block_from_position_zero():
    q, k, v = _block(4)
    positions = jnp.broadcast_to(jnp.arange(37), (2, 37))
    for impl in (L.AttentionImpl.AUTO, L.AttentionImpl.REFERENCE):
        np.testing.assert_allclose(
            L.attention(q, k, v, None, positions, window=4, impl=impl),
            L.attention(q, k, v, jnp.zeros((2,), jnp.int32), positions, window=4),
            rtol=1e-6)


def test_fused_attention_is_not_probed_on_a_gpu_this_process_lacks():
    """Compiling for a GPU topology without one (a compile-only device): nothing to probe
    on, so cache-free causal blocks (training, prefills) take the reference, no error."""
    with L.use_platform("gpu"):
        assert not L.fused_causal_usable(jnp.bfloat16, 4, 2, 16)


def test_fused_probe_accepts_a_working_call_and_refuses_a_failing_one():
    # (Probing while a caller is traced, under jit and grad, is checked by
    # test_auto_runs_cache_free_forwards_through_the_fused_call.)
    assert L._probe_fused_causal("float32", 4, 2, 8, 3, "xla", "cpu")
    with pytest.warns(UserWarning, match="unavailable"):
        assert not L._probe_fused_causal("float32", 4, 2, 8, None, "no-such-implementation",
                                         "cpu")
    # On this CPU the models never pick cuDNN.
    assert not L.fused_causal_usable(jnp.bfloat16, 4, 2, 8)


def test_fused_probe_refuses_a_call_that_disagrees(monkeypatch):
    wrong = functools.partial(L.fused_causal, window=None)  # ignores the window
    monkeypatch.setattr(L, "fused_causal", lambda q, k, v, window, implementation: wrong(
        q, k, v, implementation=implementation))
    with pytest.warns(UserWarning, match="disagrees"):
        assert not L._probe_fused_causal.__wrapped__("float32", 4, 2, 8, 3, "xla", "cpu")


def test_auto_runs_cache_free_forwards_through_the_fused_call(monkeypatch):
    """Where the probe passes, AUTO sends the cache-free forward (training, `jaxdec.forward`)
    through `fused_causal` for every layer, with each shard's heads (tp = 2) and each layer's
    window, and the loss and gradients stay the reference's. (On a CPU the fused call runs
    jax's XLA version.)"""
    import jaxdec
    from jaxdec import model as model_module

    tp = 2

    probed, fused_calls = [], []
    monkeypatch.setattr(L, "FUSED_IMPLEMENTATION", "xla")

    def usable(dtype, heads, kv_heads, head_dim, windows):
        probed.append((heads, kv_heads, head_dim, tuple(windows)))
        return all(L._probe_fused_causal(jnp.dtype(dtype).name, heads, kv_heads, head_dim, w,
                                         "xla", "cpu") for w in set(windows))

    def counted(q, k, v, **kwargs):
        fused_calls.append((q.shape[1:3], kwargs["window"]))  # the probe's calls included
        return fused(q, k, v, **kwargs)

    fused = L.fused_causal
    monkeypatch.setattr(model_module, "fused_causal_usable", usable)
    monkeypatch.setattr(L, "fused_causal", counted)
    config = jaxdec.ModelConfig(
        model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=48,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64,
        layer_windows=(None, 6))
    mesh = jaxdec.make_mesh(tp=tp, devices=jax.devices()[:tp])
    model = jaxdec.init_model(config, jax.random.PRNGKey(0), mesh=mesh)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 19 + tp), 0, 64)

    def loss(params, attention):  # as training calls it: the probe runs under jit and grad
        logits = jaxdec.forward(jaxdec.Model(config=config, params=params, mesh=mesh,
                                             attention=attention), tokens)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

    L._probe_fused_causal.cache_clear()
    got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(model.params, L.AttentionImpl.AUTO)
    assert probed == [(4 // tp, 2 // tp, 8, (None, 6))]
    T, heads = tokens.shape[1], 4 // tp
    assert [window for shape, window in fused_calls if shape == (T, heads)] == [None, 6]
    want = jax.value_and_grad(loss)(model.params, L.AttentionImpl.REFERENCE)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_auto_runs_the_kernel_only_over_caches_worth_it(monkeypatch):
    """AUTO takes the backend's kernel for a layer cache of at least AUTO_KERNEL_MIN_KV_BYTES
    and the reference below (PALLAS takes the kernel either way); shapes the kernel does not
    take go to the reference for both. The backend is made to offer the Triton kernel."""
    TA = L.tree_attention
    monkeypatch.setattr(TA, "backend_kernel", lambda backend=None: TA.Impl.TRITON)
    B, K, D = 2, 2, 64
    slots = L.AUTO_KERNEL_MIN_KV_BYTES // (2 * B * K * D * 2)  # bf16 keys and values
    big = jax.ShapeDtypeStruct((B, slots, K, D), jnp.bfloat16)
    small = jax.ShapeDtypeStruct((B, slots // 2, K, D), jnp.bfloat16)
    q = (B, 4, 2 * K, D)
    kernel = (TA.Impl.TRITON, False)
    assert L.kernel_for(L.AttentionImpl.AUTO, q, big) == kernel
    assert L.kernel_for(L.AttentionImpl.AUTO, q, small) is None
    assert L.kernel_for(L.AttentionImpl.PALLAS, q, small) == kernel
    assert L.kernel_for(L.AttentionImpl.REFERENCE, q, big) is None
    too_many = (B, TA.MAX_QUERIES + 1, 2 * K, D)
    assert L.kernel_for(L.AttentionImpl.AUTO, too_many, big) is None
    assert L.kernel_for(L.AttentionImpl.PALLAS, too_many, big) is None
    # fp32 halves the slots needed.
    assert L.kernel_for(L.AttentionImpl.AUTO, q, small.update(dtype=jnp.float32)) == kernel
    # The queries' dtype: the TPU kernel takes no fp16 (the reference runs), Triton does.
    fp16 = big.update(dtype=jnp.float16)
    assert L.kernel_for(L.AttentionImpl.AUTO, q, fp16, dtype=jnp.float16) == kernel
    monkeypatch.setattr(TA, "backend_kernel", lambda backend=None: TA.Impl.MOSAIC)
    q128, big128 = (B, 4, 2 * K, 128), big.update(shape=(B, slots // 2, K, 128))
    assert L.kernel_for(L.AttentionImpl.AUTO, q128, big128, dtype=jnp.bfloat16) == (
        TA.Impl.MOSAIC, False)
    for impl in (L.AttentionImpl.AUTO, L.AttentionImpl.PALLAS):
        assert L.kernel_for(impl, q128, big128.update(dtype=jnp.float16),
                            dtype=jnp.float16) is None


def test_a_model_on_cpu_devices_runs_cpu_code_whatever_the_default_backend(monkeypatch):
    """On a GPU machine a model on CPU devices (a mesh of `jax.devices("cpu")`) gets the CPU
    choices: no Triton kernel, no cuDNN probe. Here the default backend is made to say "gpu"
    and the CPU model must still decode, and train-style forwards must not probe."""
    import warnings

    import jaxdec

    config = jaxdec.ModelConfig(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
        num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    model = jaxdec.init_model(config, jax.random.PRNGKey(0), dtype=jnp.bfloat16)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 6), 0, 64)
    want = jaxdec.forward(model, tokens)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    L._probe_fused_causal.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cuDNN probe on CPU devices would warn
        np.testing.assert_array_equal(jaxdec.forward(model, tokens), want)
    assert L._probe_fused_causal.cache_info().currsize == 0
    with pytest.raises(ValueError, match="no Pallas kernel for the 'cpu' platform"):
        jaxdec.generate(model.with_attention("pallas"), [[1, 2, 3]], max_new_tokens=2)
    result = jaxdec.generate(model.with_attention("auto"), [[1, 2, 3]], max_new_tokens=2)
    assert result.tokens.shape == (1, 2)


def test_cudnn_needs_a_gpu():
    import jaxdec

    config = jaxdec.ModelConfig(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
        num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    model = jaxdec.init_model(config, jax.random.PRNGKey(0)).with_attention("cudnn")
    with pytest.raises(ValueError, match="CUDNN needs a GPU"):
        jaxdec.forward(model, jnp.zeros((1, 4), jnp.int32))


@pytest.mark.gpu_only
@pytest.mark.skipif(jax.default_backend() not in L.GPU_BACKENDS, reason="needs a CUDA device")
class TestCudnnOnGPU:
    """cuDNN's fused attention on the card: the probe passes for the shapes jaxdec trains and
    serves, and a bf16 training loss and its gradients match the reference path's."""

    @pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (8, 4, 64), (12, 4, 64)])
    def test_probe_passes(self, heads, kv_heads, head_dim):
        assert L.fused_causal_usable(jnp.bfloat16, heads, kv_heads, head_dim)

    @pytest.mark.parametrize("windows", [(None,), (None, 100)])
    def test_training_gradients_match_the_reference(self, windows):
        import jaxdec
        from jaxdec.model import cache_free_attention

        config = jaxdec.ModelConfig(
            model_type="mistral", vocab_size=512, hidden_size=256, intermediate_size=512,
            num_layers=2, num_heads=8, num_kv_heads=4, head_dim=32,
            max_position_embeddings=1024, layer_windows=windows * (2 // len(windows)))
        if cache_free_attention(config, 1, jnp.bfloat16) is not L.AttentionImpl.CUDNN:
            assert windows != (None,), "cuDNN refused a model without windows"
            pytest.skip("this cuDNN does not take the sliding window: such models train "
                        "with the reference attention")
        model = jaxdec.init_model(config, jax.random.PRNGKey(0), dtype=jnp.bfloat16, std=0.1)
        tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 513), 0, 512)

        def loss(params, attention):
            logits = jaxdec.forward(jaxdec.Model(config=config, params=params, mesh=model.mesh,
                                                 attention=attention), tokens[:, :-1])
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

        got = jax.value_and_grad(loss)(model.params, L.AttentionImpl.AUTO)
        want = jax.value_and_grad(loss)(model.params, L.AttentionImpl.REFERENCE)
        np.testing.assert_allclose(got[0], want[0], rtol=2e-2)
        for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
            g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
            assert np.max(np.abs(g - w)) <= 0.1 * np.max(np.abs(w)) + 1e-3


def _long_prefill_tokens_match(monkeypatch, dtype):
    """Greedy tokens after a 1500-token prompt (3 query chunks, MLP chunks of 512 tokens,
    blocks of 256 keys) equal those of the reference attention run whole."""
    import jaxdec

    monkeypatch.setattr(L, "PREFILL_MLP_CHUNK_TOKENS", 512)
    monkeypatch.setattr(L, "PREFILL_KEY_BLOCK", 256)
    config = jaxdec.ModelConfig(
        model_type="llama", vocab_size=211, hidden_size=128, intermediate_size=256,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=2048)
    model = jaxdec.init_model(config, jax.random.PRNGKey(5), dtype=dtype, std=0.2)
    prompt = jax.random.randint(jax.random.PRNGKey(6), (1500,), 0, 211).tolist()
    got = jaxdec.generate(model, [prompt], max_new_tokens=4)
    row = list(prompt)
    reference = model.with_attention("reference")
    for _ in range(4):
        logits = jaxdec.forward(reference, jnp.asarray([row]))
        row.append(int(jnp.argmax(logits[0, -1])))
    assert got.to_lists()[0] == row[len(prompt):]


@pytest.mark.gpu_only
@pytest.mark.skipif(jax.default_backend() not in L.GPU_BACKENDS, reason="needs a CUDA device")
class TestLongPrefillOnGPU:
    """On the card: a long prefill's chunked MLP and (fp32: no cuDNN) its attention over
    blocks of keys give the reference's greedy tokens."""

    def test_fp32_blocked_attention(self, monkeypatch):
        _long_prefill_tokens_match(monkeypatch, jnp.float32)


def test_matmul_pallas_interpret_runs_the_kernel_with_the_same_logits():
    """`Model.with_matmul("pallas_interpret")`: a decode step's projections (q|k|v, o, gate|up,
    down: at most 16 tokens, shapes the kernel tiles) run the matrix-vector kernel and give
    XLA's logits and greedy tokens; a prefill of more tokens keeps XLA's product."""
    import jaxdec
    from jaxdec.pallas_kernels import matvec

    # Widths the kernel's default tiles take: every N a multiple of 128, every K of 64.
    config = jaxdec.ModelConfig(
        model_type="llama", vocab_size=64, hidden_size=128, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=64)
    model = jaxdec.init_model(config, jax.random.PRNGKey(0))
    kernel = model.with_matmul("pallas_interpret")
    assert kernel.matmul is L.MatmulImpl.PALLAS_INTERPRET
    for m in ("xla", "pallas"):  # the pytree keeps the choice through jit
        leaves, treedef = jax.tree.flatten(model.with_matmul(m))
        assert jax.tree.unflatten(treedef, leaves).matmul is L.MatmulImpl(m)
    for n_tokens, runs_kernel in ((3, True), (12, False)):
        tokens = jax.random.randint(jax.random.PRNGKey(n_tokens), (2, n_tokens), 0, 64)
        jaxpr = str(jax.make_jaxpr(lambda t: jaxdec.forward(kernel, t))(tokens))
        assert ("name=matvec" in jaxpr) == runs_kernel  # 2 x 12 tokens: over 16, XLA's
        # gate and up: one launch over both matrices (grid (2, column tiles, splits))
        assert bool(re.search(r"grid=\(2, ", jaxpr)) == runs_kernel
        np.testing.assert_allclose(jaxdec.forward(kernel, tokens),
                                   jaxdec.forward(model, tokens), rtol=1e-4, atol=1e-4)
    for prompts in ([[1, 2, 3], [4, 5]], [[7, 1, 3]]):  # batch 1: the one-row kernel
        want = jaxdec.generate(model, prompts, max_new_tokens=4)
        got = jaxdec.generate(kernel, prompts, max_new_tokens=4)
        np.testing.assert_array_equal(got.tokens, want.tokens)
    assert matvec.unsupported_reason(1, 128, 96) is not None  # N = 96: XLA's, silently
    with pytest.raises(ValueError, match="matmul must be one of"):
        model.with_matmul("cublas")
