"""Tensor (and data) parallelism on 8 fake CPU devices: the same logits and greedy tokens for
every tp, KV heads split or replicated, and clear errors for meshes that cannot work."""

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxdec
from jaxdec.models import llama

PROMPTS = [[5, 9, 31, 2, 77], [40, 41], [3, 8, 19, 60, 61, 62, 11, 4, 90]]


@pytest.fixture(scope="module")
def reference(loaded):
    model = loaded("llama-gqa")  # 8 query heads, 2 KV heads
    tokens = np.random.RandomState(0).randint(0, 97, (2, 24))
    return tokens, np.asarray(jaxdec.forward(model, tokens)), jaxdec.generate(
        model, PROMPTS, max_new_tokens=16).tokens


def test_fake_devices_are_available():
    assert len(jax.devices()) == 8


@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 1), (4, 1), (2, 2), (8, 1)])
def test_same_logits_and_greedy_tokens(tp, dp, hf_checkpoints, reference):
    """tp=2 splits the 2 KV heads; tp=4 and 8 replicate them; 97 vocab rows are padded."""
    tokens, ref_logits, ref_tokens = reference
    model = jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0], mesh=jaxdec.make_mesh(tp=tp, dp=dp))
    logits = np.asarray(jaxdec.forward(model, tokens))
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    np.testing.assert_array_equal(jaxdec.generate(model, PROMPTS, max_new_tokens=16).tokens, ref_tokens)
    if dp > 1:  # a batch dp does not divide: padded inside
        odd = np.asarray(jaxdec.forward(model, tokens[:1]))
        np.testing.assert_allclose(odd, ref_logits[:1], rtol=1e-5,
                                   atol=1e-5 * np.abs(ref_logits).max())


@pytest.mark.parametrize("tp", [4, 8])
def test_biases_are_sharded_or_added_once(tp, hf_checkpoints, loaded):
    """q|k|v and gate|up biases split with their heads and columns; o's and down's are added
    once, after the shards' partial sums (tp = 8 repeats each of the 4 KV heads)."""
    tokens = np.random.RandomState(2).randint(0, 97, (2, 12))
    ref = np.asarray(jaxdec.forward(loaded("llama-bias"), tokens))
    model = jaxdec.load_pretrained(hf_checkpoints("llama-bias")[0], mesh=jaxdec.make_mesh(tp=tp))
    np.testing.assert_allclose(np.asarray(jaxdec.forward(model, tokens)), ref, rtol=1e-5,
                               atol=1e-5 * np.abs(ref).max())


def test_mqa_with_tied_vocab_parallel_embeddings(hf_checkpoints, loaded):
    tokens = np.random.RandomState(1).randint(0, 97, (1, 20))
    ref = np.asarray(jaxdec.forward(loaded("qwen2-mqa-tied"), tokens))
    model = jaxdec.load_pretrained(hf_checkpoints("qwen2-mqa-tied")[0], mesh=jaxdec.make_mesh(tp=4))
    np.testing.assert_allclose(np.asarray(jaxdec.forward(model, tokens)), ref, rtol=1e-5,
                               atol=1e-5 * np.abs(ref).max())


def test_params_are_split_by_heads(hf_checkpoints):
    model = jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0], mesh=jaxdec.make_mesh(tp=4))
    layer = model.params["layers"][0]
    # 4 qkv groups for 2 KV heads (tp = 4 > K): a shard's group is its 2 query heads, then
    # the key and value of the KV head they read, which two groups repeat.
    assert layer["qkv"].shape == (64, 4 * (2 + 2) * 8)  # flat: [E, R (H/R + 2) D]
    assert layer["qkv"].addressable_shards[0].data.shape == (64, 1 * 4 * 8)
    qkv = np.asarray(llama.qkv_view(layer["qkv"], 8, 8))
    assert qkv.shape == (64, 4, 2 + 2, 8)
    np.testing.assert_array_equal(qkv[:, 0, 2:], qkv[:, 1, 2:])
    np.testing.assert_array_equal(qkv[:, 2, 2:], qkv[:, 3, 2:])
    assert layer["o"].addressable_shards[0].data.shape == (2, 8, 64)
    assert layer["gate_up"].addressable_shards[0].data.shape == (2, 64, 32)
    assert model.params["lm_head"].addressable_shards[0].data.shape == (64, 25)  # 100 / 4


def test_your_own_mesh(hf_checkpoints, reference):
    tokens, ref_logits, _ = reference
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("dp", "tp"))
    model = jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0], mesh=mesh)
    np.testing.assert_allclose(np.asarray(jaxdec.forward(model, tokens)), ref_logits,
                               rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    tp_only = Mesh(np.array(jax.devices()[:2]), ("tp",))
    model = jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0], mesh=tp_only)
    np.testing.assert_allclose(np.asarray(jaxdec.forward(model, tokens)), ref_logits,
                               rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    # Without a "tp" axis the model gets one of size 1 (its collectives name it: every
    # forward failed with jax's "unbound axis name: tp").
    dp_only = Mesh(np.array(jax.devices()[:2]), ("dp",))
    model = jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0], mesh=dp_only)
    assert dict(model.mesh.shape) == {"dp": 2, "tp": 1}
    np.testing.assert_allclose(np.asarray(jaxdec.forward(model, tokens)), ref_logits,
                               rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    with pytest.raises(ValueError, match=r"model.mesh has no \"tp\" axis"):
        jaxdec.forward(dataclasses.replace(model, mesh=dp_only), tokens)


def test_meshes_of_explicit_axes(hf_checkpoints, reference):
    """jax.make_mesh's meshes (Explicit axes by default) are taken as the same devices with
    jaxdec's Auto axes (accepted, then every forward failed inside shard_map; a dp x tp one
    failed to load)."""
    tokens, ref_logits, ref_tokens = reference
    mesh = jax.make_mesh((2, 2), ("dp", "tp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    model = jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0], mesh=mesh)
    assert model.mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2
    assert list(model.mesh.devices.flat) == list(mesh.devices.flat)
    np.testing.assert_allclose(np.asarray(jaxdec.forward(model, tokens)), ref_logits,
                               rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    np.testing.assert_array_equal(
        jaxdec.generate(model, PROMPTS, max_new_tokens=16).tokens, ref_tokens)


def test_calls_inside_another_context_mesh(hf_checkpoints, loaded, reference):
    """A caller's own context mesh (jax.set_mesh) around jaxdec's calls: they run on their
    model's mesh (every call failed: "the context mesh ... should match the mesh passed to
    shard_map"); inside the caller's jax.jit, where the context cannot change, an error says
    what to do."""
    tokens, ref_logits, ref_tokens = reference
    model = loaded("llama-gqa")
    user = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(user):
        np.testing.assert_allclose(np.asarray(jaxdec.forward(model, tokens)), ref_logits,
                                   rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
        np.testing.assert_array_equal(
            jaxdec.generate(model, PROMPTS, max_new_tokens=16).tokens, ref_tokens)
        on_two = jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0],
                                        mesh=jaxdec.make_mesh(tp=2))
        np.testing.assert_array_equal(
            jaxdec.speculative_generate(on_two, jaxdec.drafters.PromptLookup(), PROMPTS,
                                        max_new_tokens=16).tokens, ref_tokens)
        assert jaxdec.init_cache(model.config, 2, 16).lengths.shape == (2,)
        with pytest.raises(ValueError, match="forward runs on its model's mesh .* traced under "
                                             "jax.jit with another context mesh"):
            jax.jit(lambda t: jaxdec.forward(model, t))(jnp.asarray(tokens))
    with jax.set_mesh(model.mesh):  # the model's own: fine inside jit too
        np.testing.assert_allclose(
            np.asarray(jax.jit(lambda t: jaxdec.forward(model, t))(jnp.asarray(tokens))),
            ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())


def test_arrays_on_other_devices_are_taken(hf_checkpoints, loaded, reference):
    """Ids and keys another model left on its devices: forward took only ids on its own
    devices, and a key committed elsewhere failed every sampled call ("incompatible
    devices")."""
    tokens, ref_logits, _ = reference
    elsewhere = jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0],
                                       mesh=jaxdec.make_mesh(tp=2, devices=jax.devices()[4:]))
    on_zero = jax.device_put(jnp.asarray(tokens), jax.devices()[0])
    np.testing.assert_allclose(np.asarray(jaxdec.forward(elsewhere, on_zero)), ref_logits,
                               rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    sampler = jaxdec.Sampler(temperature=1.0)
    key = jax.device_put(jax.random.key(3), jax.devices()[0])
    want = jaxdec.generate(loaded("llama-gqa"), PROMPTS, max_new_tokens=8, sampler=sampler,
                           key=jax.random.key(3)).tokens
    np.testing.assert_array_equal(
        jaxdec.generate(elsewhere, PROMPTS, max_new_tokens=8, sampler=sampler, key=key).tokens,
        want)
    np.testing.assert_array_equal(jaxdec.speculative_generate(
        elsewhere, jaxdec.drafters.PromptLookup(), PROMPTS, max_new_tokens=8, sampler=sampler,
        key=key).tokens.shape, want.shape)
    session = jaxdec.PrefixCache(elsewhere, 64)
    assert len(session.generate(PROMPTS[0], max_new_tokens=4, sampler=sampler,
                                key=key).tokens[0]) == 4
    # The padded forms called eagerly (their jitted program refused them).
    from jaxdec.generate import prepare_batch

    batch = prepare_batch(elsewhere, PROMPTS, max_new_tokens=8, stop_tokens=(), pad_id=0,
                          max_len=None)
    arrays = [jax.device_put(x, jax.devices()[0]) for x in (batch.tokens, batch.lengths)]
    cache = jaxdec.init_cache(elsewhere.config, 3, batch.max_len, mesh=elsewhere.mesh)
    (out, _), _ = jaxdec.generate_padded(elsewhere, *arrays, cache, key, max_new_tokens=8,
                                         sampler=sampler)
    np.testing.assert_array_equal(out, want)
    drafter = jaxdec.drafters.PromptLookup().prepare(elsewhere)
    (out, _), *_ = jaxdec.speculative.speculative_padded(
        elsewhere, drafter, *arrays, jaxdec.init_cache(elsewhere.config, 3, batch.max_len + 8,
                                                       mesh=elsewhere.mesh),
        key, None, max_new_tokens=8, sampler=sampler, topology=jaxdec.tree.chain(2))
    assert out.shape == want.shape


# ----------------------------------------------------------------------------- bad input


def test_tp_not_dividing_the_heads(hf_checkpoints):
    with pytest.raises(ValueError, match="tp=3 does not divide the model's 8 attention heads"):
        jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0], mesh=jaxdec.make_mesh(tp=3))


def test_kv_heads_and_tp_must_divide_one_another():
    config = jaxdec.ModelConfig(vocab_size=32, hidden_size=24, intermediate_size=48,
                                num_layers=1, num_heads=12, num_kv_heads=3, head_dim=2)
    with pytest.raises(ValueError, match="tp=2 and the model's 3 KV heads"):
        jaxdec.init_model(config, jax.random.PRNGKey(0), mesh=jaxdec.make_mesh(tp=2))
    # A draft model placed on a target's mesh: the message says whose heads.
    from jaxdec.drafters import DraftModel

    draft = jaxdec.init_model(config, jax.random.PRNGKey(0))
    target = jaxdec.init_model(config.replace(num_kv_heads=4), jax.random.PRNGKey(0),
                               mesh=jaxdec.make_mesh(tp=2))
    with pytest.raises(ValueError, match="the draft model cannot run on the target's mesh: "
                                         "tp=2 and the draft's 3 KV heads"):
        DraftModel(draft).prepare(target)


def test_bad_meshes():
    with pytest.raises(ValueError, match=r"dp \* tp = 4 \* 4 = 16 exceeds the 8 available"):
        jaxdec.make_mesh(tp=4, dp=4)
    with pytest.raises(ValueError, match="^tp=16 exceeds the 8 available devices"):
        jaxdec.make_mesh(tp=16)  # (the CLI, which has no --dp, said "dp * tp = 1 * 16")
    with pytest.raises(ValueError, match="tp must be an int >= 1, got 0"):
        jaxdec.make_mesh(tp=0)
    with pytest.raises(TypeError, match="devices must be a sequence of jax devices"):
        jaxdec.make_mesh(tp=2, devices="cpu")
    with pytest.raises(TypeError, match="devices must be a sequence of jax devices"):
        jaxdec.make_mesh(devices=jax.devices()[0])  # one device, not in a list
    with pytest.raises(ValueError, match="devices is empty"):
        jaxdec.make_mesh(devices=[])
    # An iterator (was read up by the check: "exceeds the 0 available devices"); a device
    # listed twice (failed in loading).
    assert jaxdec.make_mesh(tp=2, devices=iter(jax.devices()[2:])).devices.size == 2
    with pytest.raises(ValueError, match="devices lists a device more than once"):
        jaxdec.make_mesh(tp=2, dp=2, devices=jax.devices()[:2] * 2)
    with pytest.raises(ValueError, match="mesh lists a device more than once"):
        jaxdec.parallel.resolve_mesh(Mesh(np.array(jax.devices()[:2] * 2).reshape(2, 2),
                                          ("dp", "tp")))
    config = jaxdec.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="batch_size=3 is not a multiple of the mesh's dp=2"):
        jaxdec.init_cache(config, 3, 16, mesh=jaxdec.make_mesh(dp=2))
    assert jaxdec.make_mesh(tp=2, devices=jax.devices()[2:]).devices.flat[0] == jax.devices()[2]
    with pytest.raises(ValueError, match="not understood"):
        jaxdec.parallel.resolve_mesh(Mesh(np.array(jax.devices()[:2]), ("model",)))
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        jaxdec.parallel.resolve_mesh("tp=2")


def test_a_mesh_of_other_processes_devices_alone(monkeypatch):
    """With several processes, a mesh holding none of this process's devices is named (the
    first load failed in jax's make_array_from_callback, naming neither)."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)  # the devices here are process 0's
    with pytest.raises(ValueError, match=r"the mesh's devices are all other processes' "
                                         r"\(process 1 has none of them\)"):
        jaxdec.make_mesh(tp=2, devices=jax.devices()[:2])


@pytest.mark.parametrize("tp", [2, 4])
def test_tree_forward_and_commit_under_tp(tp, hf_checkpoints, loaded):
    """Verification-style forward (tree mask) and `commit` on a head-sharded cache give the
    same logits and committed cache as on one device."""
    import jax.numpy as jnp

    from jaxdec.model import forward_with_cache

    def run(model):
        cache = jaxdec.init_cache(model.config, 2, 16, mesh=model.mesh)
        prompt = jnp.array([[5, 17, 33, 8], [9, 9, 1, 4]])
        _, _, cache = forward_with_cache(model, prompt, jnp.tile(jnp.arange(4), (2, 1)), cache)
        cache = cache.replace(lengths=jnp.array([4, 2]))
        tree = jnp.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)
        logits, _, cache = forward_with_cache(
            model, jnp.array([[40, 41, 42], [50, 51, 52]]),
            cache.lengths[:, None] + jnp.array([[0, 1, 1]]), cache, mask_BTT=jnp.stack([tree] * 2))
        cache = jaxdec.commit(cache, jnp.array([[0, 2], [0, 1]]), jnp.array([2, 1]))
        return np.asarray(logits), [np.asarray(layer.k) for layer in cache.layers], cache.lengths

    ref_logits, ref_keys, ref_lengths = run(loaded("llama-gqa"))
    model = jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0], mesh=jaxdec.make_mesh(tp=tp))
    logits, keys, lengths = run(model)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    np.testing.assert_array_equal(lengths, ref_lengths)
    for got, want in zip(keys, ref_keys):
        if got.shape != want.shape:  # tp > KV heads: each shard holds a copy of its KV head
            got = got[:, :, :: tp // want.shape[2]]
        np.testing.assert_allclose(got[:, :6], want[:, :6], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp", [2, 4])
def test_init_model_draws_the_familys_params_leaf_by_leaf(tp):
    """`init_model` equals the family's `init_params` compiled as one program (padded
    vocabulary rows zero) under tp = 2 and 4 (more shards than KV heads: qkv regrouped), bit
    for bit, built by one small program per distinct leaf shape and sharding instead (one
    program for the whole tree of an 8B model took over a minute to compile)."""
    import jax.numpy as jnp

    from jaxdec.model import family

    config = jaxdec.ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                                tie_word_embeddings=False)
    mesh = jaxdec.make_mesh(tp=tp)
    # Made before counting: the key's own program compiles once per process (whether this
    # test's count includes it depended on the tests the worker had run before).
    key = jax.random.PRNGKey(3)
    events = []
    thread = threading.get_ident()

    def listener(event, duration, **_):  # this thread's compiles (not a leftover worker's)
        if (event == "/jax/core/compile/backend_compile_duration"
                and threading.get_ident() == thread):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        model = jaxdec.init_model(config, key, dtype=jnp.bfloat16, mesh=mesh, std=0.1)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # Shapes: embed, lm_head, norms, qkv, o, gate_up, down (+ the key split): far fewer
    # programs than the 3 x 6 + 3 leaves.
    assert 0 < len(events) <= 10
    vocab = 98 if tp == 2 else 100
    want = jax.jit(lambda k: family(config).init_params(
        config, k, dtype=jnp.bfloat16, vocab_size=vocab, std=0.1, groups=max(2, tp)))(
            jax.random.PRNGKey(3))
    got = jax.tree.map(np.asarray, model.params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g.astype(np.float32), np.asarray(w, np.float32))
    assert model.params["embed"].shape == (vocab, 32) and not np.asarray(
        model.params["embed"][97:], np.float32).any()
    assert not np.asarray(model.params["lm_head"][:, 97:], np.float32).any()
    # The real rows and columns are one device's (the head was drawn at its padded width:
    # another model on every mesh whose tp does not divide the vocabulary).
    one = jaxdec.init_model(config, key, dtype=jnp.bfloat16, std=0.1).params
    for name, real in (("embed", np.s_[:97]), ("lm_head", np.s_[:, :97])):
        np.testing.assert_array_equal(np.asarray(model.params[name], np.float32)[real],
                                      np.asarray(one[name], np.float32))
    # The same key typed: the same weights (init_model takes both forms as one key).
    typed = jaxdec.init_model(config, jax.random.key(3), dtype=jnp.bfloat16, mesh=mesh, std=0.1)
    assert all(np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
               for a, b in zip(jax.tree.leaves(typed.params), jax.tree.leaves(model.params)))
    # Placed sharded: each device holds its 4 / tp of the 4 query heads (its qkv groups).
    assert model.params["layers"][0]["qkv"].addressable_shards[0].data.shape == (
        (32, 1 * 4 * 8) if tp == 2 else (32, 1 * 3 * 8))


def test_qkv_groups_hand_computed():
    """The fused qkv layout: group r = its query heads, then the key and the value of their KV
    head (repeated when there are more groups than KV heads); split_qkv inverts it."""
    from jaxdec.models import llama

    q = np.arange(4.0).reshape(1, 4, 1)  # [E=1, H=4, D=1]
    k, v = np.array([[[10.0], [11.0]]]), np.array([[[20.0], [21.0]]])  # K = 2
    two = llama.group_qkv(q, k, v, 2, xp=np)
    np.testing.assert_array_equal(two[0, :, :, 0], [[0, 1, 10, 20], [2, 3, 11, 21]])
    four = llama.group_qkv(q, k, v, 4, xp=np)
    np.testing.assert_array_equal(four[0, :, :, 0],
                                  [[0, 10, 20], [1, 10, 20], [2, 11, 21], [3, 11, 21]])
    for fused in (two, four):
        for got, want in zip(llama.split_qkv(fused, 2), (q, k, v)):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="qkv groups"):
        llama.param_shapes(jaxdec.ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                                              num_layers=1, num_heads=4, num_kv_heads=2,
                                              head_dim=2), groups=3)


def test_streams_on_a_dp_mesh_compile_without_xla_warnings(hf_checkpoints, capfd):
    """A stream's arrays are gathered whole before the host callback (XLA moved each dp-split
    array to one device itself, printing an "involuntary full rematerialization" warning at
    every compile); its calls see the same tokens."""
    model = jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0], mesh=jaxdec.make_mesh(dp=2))
    prompts = [[5, 6, 7], [8, 9], [10]]
    for call in (jaxdec.generate, lambda *a, **k: jaxdec.speculative_generate(
            model, jaxdec.drafters.PromptLookup(), *a[1:], **k)):
        seen = []
        out = call(model, prompts, max_new_tokens=5, max_len=44,  # (a program of its own)
                   stream=lambda step, tokens, *_: seen.append((int(step), tokens.tolist())))
        assert "Involuntary full rematerialization" not in capfd.readouterr().err
        assert len(seen) >= 2 and all(len(tokens) == 3 for _, tokens in seen)
        np.testing.assert_array_equal(out.tokens, jaxdec.generate(
            model, prompts, max_new_tokens=5).tokens)


def test_timings_on_a_dp_mesh_compile_without_xla_warnings(hf_checkpoints, capfd):
    """The timing stamps depended on one element of each dp-split cache array through a
    reshape (and on the dp-split first tokens whole): XLA warned of an "involuntary full
    rematerialization" at every compile of a timed program (ten for a draft model's)."""
    model = jaxdec.load_pretrained(hf_checkpoints("llama-gqa")[0], mesh=jaxdec.make_mesh(dp=2))
    prompts = [[5, 6, 7], [8, 9], [10]]
    plain = jaxdec.generate(model, prompts, max_new_tokens=5).tokens
    for call in (jaxdec.generate, lambda *a, **k: jaxdec.speculative_generate(
            model, jaxdec.drafters.DraftModel(model), *a[1:], tree=jaxdec.tree.chain(2),
            profile=True, **k)):
        out = call(model, prompts, max_new_tokens=5, max_len=45,  # (a program of its own)
                   return_timings=True)
        assert "Involuntary full rematerialization" not in capfd.readouterr().err
        assert out.prefill_s > 0 and out.decode_s > 0
        np.testing.assert_array_equal(out.tokens, plain)
