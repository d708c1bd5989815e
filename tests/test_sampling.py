"""Samplers: processed distributions against hand-computed ones, sampled frequencies against
`probs()` (chi-square), and argument validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import gammaincc

from jaxdec import Greedy, Sampler

P = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = jnp.log(jnp.asarray(P)) + 3.0  # any shift: softmax(LOGITS) == P


@pytest.mark.parametrize("sampler,expected", [
    (Sampler(), P),
    (Sampler(temperature=2.0), np.sqrt(P) / np.sqrt(P).sum()),
    (Sampler(temperature=0.5), P**2 / (P**2).sum()),
    (Sampler(top_k=2), [0.625, 0.375, 0, 0]),
    (Sampler(top_k=1), [1, 0, 0, 0]),
    (Sampler(top_p=0.8), [0.625, 0.375, 0, 0]),  # 0.5 + 0.3 reaches 0.8
    (Sampler(top_p=0.81), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    (Sampler(top_p=0.4), [1, 0, 0, 0]),
    (Sampler(top_p=1.0), P),
    (Sampler(min_p=0.4), [0.625, 0.375, 0, 0]),  # keeps p >= 0.2
    (Sampler(min_p=0.3), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    (Sampler(top_k=3, top_p=0.6), [0.625, 0.375, 0, 0]),  # top-p on the renormalised top-3
    (Sampler(temperature=0.0), [1, 0, 0, 0]),
    (Greedy(), [1, 0, 0, 0]),
])
def test_probs_hand_computed(sampler, expected):
    np.testing.assert_allclose(sampler.probs(LOGITS), expected, rtol=1e-5, atol=1e-7)


def test_ties_at_the_boundary_are_kept():
    logits = jnp.log(jnp.array([0.4, 0.2, 0.2, 0.2]))
    np.testing.assert_allclose(Sampler(top_k=2).probs(logits), [0.4, 0.2, 0.2, 0.2], rtol=1e-6)
    np.testing.assert_allclose(Sampler(top_p=0.5).probs(logits), [0.4, 0.2, 0.2, 0.2], rtol=1e-6)


def test_top_k_cuts_the_logits_as_given():
    """Logits apart by an ulp stay apart: shifted by the maximum (3), 1 and 1 - 2**-24 both
    round to -2, and the tie rule kept three tokens for top_k=2 (as transformers keeps two:
    [0.8808, 0.1192, 0, 0])."""
    logits = jnp.array([3.0, 1.0, np.nextafter(np.float32(1), np.float32(0)), 0.0], jnp.float32)
    probs = Sampler(top_k=2).probs(logits)
    np.testing.assert_allclose(probs, [1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(2.0)), 0, 0],
                               rtol=1e-6)


def test_top_p_cut_off_is_the_exact_nucleus():
    """The mass before each token, summed in float64, decides the nucleus: float32 sums
    from the largest down rounded it by a few ulp near 1 and dropped (or kept) a token at
    the cut-off, 19 rows in 400 at V=5000 (transformers sums from the smallest up: 1). A top_p
    so small that 1 - top_p rounds to 1 keeps the top token."""
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((400, 5000)) * 3).astype(np.float32)
    e = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    e /= e.sum(-1, keepdims=True)
    desc = -np.sort(-e, -1)
    before = np.cumsum(desc, -1) - desc
    exact = e >= desc[np.arange(len(e)), (before < 0.999).sum(-1) - 1][:, None]
    got = np.asarray(Sampler(top_p=0.999).probs(logits)) > 0
    assert (got != exact).any(-1).sum() <= 2   # (rows whose mass sits within fp32's reach)
    row = (np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32) * 3)[2]
    assert (np.asarray(Sampler(top_p=0.999).probs(row)) > 0).sum() == 39  # (was 38)
    np.testing.assert_array_equal(Sampler(top_p=1e-9).probs(LOGITS) > 0,
                                  Sampler(top_k=1).probs(LOGITS) > 0)


def test_settings_that_change_nothing_are_dropped():
    """Samplers of one distribution are equal (a static argument: one compiled program each;
    a slider moved to top_p=1 or temperature 0 compiled another)."""
    for same, base in [(Sampler(top_p=1.0), Sampler()), (Sampler(min_p=0.0), Sampler()),
                       (Sampler(top_p=np.float32(1), min_p=0, temperature=0.5),
                        Sampler(temperature=0.5)),
                       (Sampler(temperature=0, top_k=3, top_p=0.5, min_p=0.1),
                        Sampler(temperature=0))]:
        assert same == base and hash(same) == hash(base)
    assert Sampler(top_p=0.5).top_p == 0.5 and Sampler(top_p=1.0).top_p is None


def test_probs_batched_and_greedy_sample():
    logits = jnp.stack([LOGITS, LOGITS[::-1]])
    np.testing.assert_allclose(Sampler(top_k=1).probs(logits), [[1, 0, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(Greedy().sample(logits), [0, 3])
    np.testing.assert_array_equal(Sampler(temperature=0).sample(logits, jax.random.PRNGKey(0)), [0, 3])


def _chi_square_p_value(counts, probs):
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled a token with zero probability"
    expected = counts.sum() * probs[keep]
    stat = float(np.sum((counts[keep] - expected) ** 2 / expected))
    dof = int(keep.sum()) - 1
    return float(gammaincc(dof / 2, stat / 2))


@pytest.mark.parametrize("sampler", [
    Sampler(temperature=0.7),
    Sampler(temperature=1.3, top_p=0.9),
    Sampler(temperature=1.0, top_k=5, min_p=0.05),
])
def test_sampled_frequencies_match_probs(sampler):
    logits = jax.random.normal(jax.random.PRNGKey(3), (12,)) * 1.5
    n = 40_000
    # One call over a batch of identical rows: each row draws from its own split key.
    samples = np.asarray(sampler.sample(jnp.broadcast_to(logits, (n, 12)), jax.random.PRNGKey(7)))
    counts = np.bincount(samples, minlength=12)
    probs = np.asarray(sampler.probs(logits), np.float64)
    assert _chi_square_p_value(counts, probs) > 1e-3
    # Power: the same samples are rejected against the unprocessed softmax.
    raw = np.asarray(jax.nn.softmax(logits), np.float64)
    assert _chi_square_p_value(counts, raw) < 1e-6


def test_batch_rows_draw_independent_randomness():
    logits = jnp.zeros((4, 1000))
    draws = np.asarray(Sampler().sample(logits, jax.random.PRNGKey(0)))
    assert len(set(draws.tolist())) == 4
    # A single row and a batch are both accepted; same key, same draw for 1-D logits.
    one = Sampler().sample(logits[0], jax.random.PRNGKey(1))
    assert one.shape == () and int(one) == int(Sampler().sample(logits[0], jax.random.PRNGKey(1)))


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(temperature=True), "temperature"),
    (dict(top_p="0.9"), "top_p"),
    (dict(min_p=np.bool_(True)), "min_p"),
])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Sampler(**kwargs)


def test_a_sample_without_a_key_or_a_vocabulary_axis_is_named():
    with pytest.raises(ValueError, match="key is needed to sample"):
        Sampler().sample(jnp.zeros((2, 5)), None)
    for call in (Sampler().probs, functools.partial(Sampler().sample, key=jax.random.key(0)),
                 Greedy().sample, Greedy().probs):
        with pytest.raises(ValueError, match="logits must have a vocabulary axis"):
            call(jnp.float32(1))


def test_bf16_numbers_are_numbers():
    """A bf16 scalar (a bf16 model's computed temperature, say) was refused as not a number,
    with its own value in the message."""
    half = jnp.asarray(0.5, jnp.bfloat16)
    sampler = Sampler(temperature=half, top_p=jnp.bfloat16(0.5), min_p=half[()])
    assert sampler == Sampler(temperature=0.5, top_p=0.5, min_p=0.5)


def test_numpy_numbers_are_stored_as_python_numbers():
    """A Sampler is a static argument: numpy scalars (a computed temperature, say) are taken
    and stored as Python numbers, so equal settings are one compiled program."""
    given = Sampler(temperature=np.float32(0.5), top_k=np.int64(5), top_p=np.float64(0.9),
                    min_p=np.float32(0.25))
    assert given == Sampler(temperature=0.5, top_k=5, top_p=0.9, min_p=0.25)
    assert hash(given) == hash(Sampler(temperature=0.5, top_k=5, top_p=0.9, min_p=0.25))
    assert [type(getattr(given, f)) for f in ("temperature", "top_k", "top_p", "min_p")] == [
        float, int, float, float]


def test_samplers_are_hashable_static_arguments():
    assert hash(Sampler(top_p=0.9)) == hash(Sampler(top_p=0.9))
    assert Sampler(top_p=0.9) != Sampler(top_p=0.8)
    assert hash(Greedy()) == hash(Greedy())


def test_a_tiny_temperature_is_the_argmax_when_compiled():
    """Compiled, x / t and max(x / t) may round apart, which at a tiny t overflowed exp: NaN
    probabilities, and `sample` drew id 0. The logits are shifted by their max first."""
    logits = jax.random.normal(jax.random.key(0), (4, 256)) * 0.5 + 0.5
    top = np.asarray(jnp.argmax(logits, axis=-1))
    for t in (1e-6, 1e-10, 1e-20, 1e-38):
        sampler = Sampler(temperature=t)
        probs = np.asarray(jax.jit(sampler.probs)(logits))
        np.testing.assert_array_equal(probs, np.eye(256, dtype=np.float32)[top])
        np.testing.assert_array_equal(
            np.asarray(jax.jit(sampler.sample)(logits, jax.random.key(1))), top)


def test_concrete_arrays_are_taken_and_traced_ones_refused():
    """0-d arrays holding a value (a jnp scalar computed outside jit) count as numbers; a
    traced one cannot set a static argument: a TypeError naming it."""
    given = Sampler(temperature=jnp.float32(0.5), top_k=jnp.int32(5), top_p=np.array(0.9),
                    min_p=jnp.asarray(0.25))
    assert given == Sampler(temperature=0.5, top_k=5, top_p=0.9, min_p=0.25)
    assert [type(getattr(given, f)) for f in ("temperature", "top_k", "top_p", "min_p")] == [
        float, int, float, float]
    with pytest.raises(TypeError, match="temperature must be a concrete number, got a traced"):
        jax.jit(lambda t: Sampler(temperature=t).probs(LOGITS))(0.5)
    with pytest.raises(ValueError, match="top_k"):
        Sampler(top_k=jnp.zeros(2, jnp.int32))


def test_every_draw_resolves_tiny_probabilities(monkeypatch):
    """Every categorical draw (plain sampling, a draft model's children, verification's
    deterministic draws and bonus tokens) takes jax.random's "high" mode: with one 32-bit
    word per uniform, float32 Gumbel noise never exceeds ~16.6, so a token whose logit is
    17 below the top one was drawn 0.17 times as often as its probability says, one 19
    below (p ~ 5.6e-9) never: the draws did not follow `probs`."""
    import jaxdec
    from jaxdec import sampling

    modes = []

    def spy(real):
        def call(*args, mode=None, **kwargs):
            modes.append(mode)
            return real(*args, mode=mode, **kwargs)
        return call

    for name in ("categorical", "gumbel"):
        monkeypatch.setattr(jax.random, name, spy(getattr(jax.random, name)))
    logits = jnp.array([0.0, -19.0])
    assert int(Sampler(temperature=1.0).sample(logits, jax.random.key(0))) == 0
    config = jaxdec.ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                                num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
    model = jaxdec.init_model(config, jax.random.key(0))
    # (a chain's children are drawn independently, a k-ary tree's without replacement)
    for drafter, tree in ((jaxdec.drafters.DraftModel(model), jaxdec.tree.chain(2)),
                          (jaxdec.drafters.DraftModel(model), jaxdec.tree.kary(1, 2)),
                          (jaxdec.drafters.PromptLookup(), None)):
        jaxdec.speculative_generate(model, drafter, [[1, 2, 1, 2]], max_new_tokens=3,
                                    sampler=Sampler(temperature=1.0), tree=tree,
                                    key=jax.random.key(1))
    assert len(modes) >= 5 and set(modes) == {sampling.DRAW_MODE} == {"high"}
