"""Model building blocks against hand-computed values: RMSNorm, rotary embeddings (with
llama3 and linear scaling), the slot-visibility rule, and attention (the reference and its
query-chunked form)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec import RopeConfig
from jaxdec.models import layers as L


def test_rms_norm_hand_computed():
    x = jnp.array([[3.0, 4.0]])
    # mean of squares = 12.5
    np.testing.assert_allclose(L.rms_norm(x, jnp.array([1.0, 2.0]), 0.0),
                               [[3 / math.sqrt(12.5), 8 / math.sqrt(12.5)]], rtol=1e-6)


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


def test_apply_rope_rotates_half_pairs():
    x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)  # pairs (1, 3) and (2, 4)
    inv_freq = np.array([0.5, 0.25], np.float32)
    out = L.apply_rope(x, jnp.array([[2]]), inv_freq)[0, 0, 0]
    a, b = 1.0, 0.5  # angles 2 * inv_freq
    expected = [1 * math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
                3 * math.cos(a) + 1 * math.sin(a), 4 * math.cos(b) + 2 * math.sin(b)]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(L.apply_rope(x, jnp.array([[0]]), inv_freq), x)


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


def test_attention_rejects_bad_arguments():
    q = jnp.zeros((1, 1, 3, 4))
    kv = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match="not a multiple of KV heads"):
        L.attention(q, kv, kv, jnp.array([0]), jnp.array([[0]]))
    with pytest.raises(TypeError, match="AttentionImpl"):
        L.attention(jnp.zeros((1, 1, 2, 4)), kv, kv, jnp.array([0]), jnp.array([[0]]), impl="fast")


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
