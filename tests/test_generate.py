"""`generate`: ragged batches, buckets without recompiles, stop tokens, streaming, timings,
the jittable `generate_padded`, and bad input."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import gammaincc

import jaxdec
from jaxdec.drafters import DraftModel
from jaxdec.generate import bucket_length
from program_deps import clocks_the_loop_waits_on, trace_program

VARIANT = "llama-gqa"
_compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _compiles.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None
)


def _prompts(lengths, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, 97, n).tolist() for n in lengths]


def test_ragged_batch_equals_per_row_runs(loaded):
    model = loaded(VARIANT)
    prompts = _prompts((3, 14, 9))
    batch = jaxdec.generate(model, prompts, max_new_tokens=10)
    for i, prompt in enumerate(prompts):
        alone = jaxdec.generate(model, [prompt], max_new_tokens=10)
        np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])


def test_no_recompilation_within_a_bucket(loaded):
    model = loaded(VARIANT)
    assert bucket_length(5) == bucket_length(12) == 16
    jaxdec.generate(model, _prompts((5, 2)), max_new_tokens=6)
    _compiles.clear()
    jaxdec.generate(model, _prompts((12, 7), seed=1), max_new_tokens=6, stop_tokens=[4, 5])
    # A Sampler at temperature 0 is greedy decoding: the same program.
    jaxdec.generate(model, _prompts((5, 2)), max_new_tokens=6,
                    sampler=jaxdec.Sampler(temperature=0.0, top_k=3))
    assert _compiles == []
    # generate_padded called eagerly: greedy without a key is the program a key runs.
    tokens, lengths = jnp.zeros((2, 16), jnp.int32).at[:, :2].set(3), jnp.array([2, 2])
    cache = jaxdec.init_cache(model.config, 2, 21)
    want = jaxdec.generate_padded(model, tokens, lengths, cache, jax.random.key(1),
                                  max_new_tokens=6)[0]
    _compiles.clear()
    got = jaxdec.generate_padded(model, tokens, lengths, cache, None, max_new_tokens=6)[0]
    assert _compiles == []
    np.testing.assert_array_equal(got[0], want[0])
    # A new bucket compiles (the counter works).
    jaxdec.generate(model, _prompts((20, 7)), max_new_tokens=6)
    assert _compiles


def test_where_a_key_lies_compiles_nothing(loaded):
    """A key made by jax.random.key, put on a device or replicated over the model's mesh is
    one program (each placement compiled its own), in generate and a PrefixCache."""
    model = loaded(VARIANT)
    sampler = jaxdec.Sampler(temperature=0.9)
    key = jax.random.key(5)
    placed = [key, jax.device_put(key, jax.devices()[0]),
              jax.device_put(key, jax.sharding.NamedSharding(model.mesh,
                                                             jax.sharding.PartitionSpec()))]
    want = jaxdec.generate(model, _prompts((5, 2)), max_new_tokens=4, sampler=sampler, key=key)
    session = jaxdec.PrefixCache(model, max_len=32)
    for _ in range(2):  # its first call's program and the one continuing a cache
        session.generate(_prompts((5,))[0], max_new_tokens=4, sampler=sampler, key=key)
    _compiles.clear()
    for each in placed:
        got = jaxdec.generate(model, _prompts((5, 2)), max_new_tokens=4, sampler=sampler, key=each)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        session.generate(_prompts((5,))[0], max_new_tokens=4, sampler=sampler, key=each)
    assert _compiles == []


def test_one_program_serves_every_max_new_tokens_of_a_cache(loaded):
    """With max_len given, max_new_tokens is a bound the loop reads at run time, not a shape:
    another count compiles nothing and gives the tokens (and log-probabilities) of a default
    cache's run, stopping where it should; the same for `speculative_generate`."""
    model = loaded(VARIANT)
    prompts = _prompts((5, 11), seed=3)
    jaxdec.generate(model, prompts, max_new_tokens=3, max_len=40, return_logprobs=True)
    _compiles.clear()
    counts = (1, 9, 25, 30)  # 30: all the room the longest prompt (11 of bucket 16) leaves
    runs = [jaxdec.generate(model, prompts, max_new_tokens=n, max_len=40, return_logprobs=True)
            for n in counts]
    assert _compiles == []
    for n, got in zip(counts, runs):
        want = jaxdec.generate(model, prompts, max_new_tokens=n, return_logprobs=True)
        assert got.tokens.shape == got.logprobs.shape == (2, n)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.lengths, [n, n])
        np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-6)
    # A stop token still ends its row before the bound.
    stop = int(want.tokens[1, 4])
    got = jaxdec.generate(model, prompts, max_new_tokens=25, max_len=40, stop_tokens=[stop])
    np.testing.assert_array_equal(
        got.tokens, jaxdec.generate(model, prompts, max_new_tokens=25, stop_tokens=[stop]).tokens)

    drafter = jaxdec.drafters.PromptLookup()
    spec = dict(tree=jaxdec.tree.chain(3), max_len=48)
    jaxdec.speculative_generate(model, drafter, prompts, max_new_tokens=4, **spec)
    _compiles.clear()
    runs = [jaxdec.speculative_generate(model, drafter, prompts, max_new_tokens=n, **spec)
            for n in (2, 17, 38)]
    assert _compiles == []
    for n, got in zip((2, 17, 38), runs):
        assert got.tokens.shape == (2, n)
        np.testing.assert_array_equal(
            got.tokens, jaxdec.generate(model, prompts, max_new_tokens=n).tokens)

    # A PrefixCache (its max_len fixed): the same prompt again with another count reuses
    # the continued prefill's program.
    session = jaxdec.PrefixCache(model, max_len=40)
    results = [session.generate(prompts[1], max_new_tokens=3)]
    results.append(session.generate(prompts[1], max_new_tokens=5))
    _compiles.clear()
    results.append(session.generate(prompts[1], max_new_tokens=12))
    assert _compiles == []
    for got in results:
        n = got.tokens.shape[1]
        np.testing.assert_array_equal(
            got.tokens, jaxdec.generate(model, prompts[1:], max_new_tokens=n).tokens)


def test_models_compare_by_identity(loaded):
    """A generated `==` compared the params' arrays ("truth value ... is ambiguous"); a model
    is itself, and a hashable key (a dict of compiled things per model)."""
    import copy

    model = loaded(VARIANT)
    twin = copy.deepcopy(model)
    assert model == model and model != twin and {model: 1, twin: 2}[model] == 1


def test_bucket_lengths():
    assert [bucket_length(n) for n in (1, 16, 17, 1000, 1024, 1025, 5000)] == [
        16, 16, 32, 1024, 1024, 2048, 5120]


def test_default_cache_sizes_are_block_multiples(loaded):
    """A default cache holds the prompt bucket, the new tokens and a tree's scratch slots,
    rounded up to a multiple of 8 (the Hopper kernel's copies; the TPU kernel's blocks divide
    the cache); an explicit max_len is kept as given."""
    from jaxdec.generate import CACHE_SLOT_MULTIPLE, prepare_batch

    model = loaded(VARIANT)
    assert CACHE_SLOT_MULTIPLE % 8 == 0
    for lengths, new, extra in (((5, 2), 6, 0), ((20,), 44, 0), ((20,), 45, 0), ((30,), 40, 19)):
        batch = prepare_batch(model, _prompts(lengths), max_new_tokens=new, stop_tokens=(),
                              pad_id=0, max_len=None, extra_slots=extra)
        least = bucket_length(max(lengths)) + new + extra
        assert batch.max_len % CACHE_SLOT_MULTIPLE == 0
        assert least <= batch.max_len < least + CACHE_SLOT_MULTIPLE
    given = prepare_batch(model, _prompts((5,)), max_new_tokens=6, stop_tokens=(), pad_id=0,
                          max_len=11)
    assert given.max_len == 11


def test_stop_tokens_shared_and_per_row(loaded):
    model = loaded(VARIANT)
    prompts = _prompts((4, 6))
    free = jaxdec.generate(model, prompts, max_new_tokens=12)
    stop_a, stop_b = int(free.tokens[0, 3]), int(free.tokens[1, 5])
    first_a = list(free.tokens[0]).index(stop_a)
    shared = jaxdec.generate(model, prompts, max_new_tokens=12, stop_tokens=[stop_a], pad_id=-1)
    assert shared.lengths[0] == first_a + 1
    np.testing.assert_array_equal(shared.tokens[0, : first_a + 1], free.tokens[0, : first_a + 1])
    assert np.all(shared.tokens[0, first_a + 1:] == -1)
    per_row = jaxdec.generate(model, prompts, max_new_tokens=12, stop_tokens=[[], [stop_b]])
    assert per_row.lengths[0] == 12
    first_b = list(free.tokens[1]).index(stop_b)
    assert per_row.lengths[1] == first_b + 1
    assert per_row.to_lists()[1] == free.tokens[1, : first_b + 1].tolist()
    # One id (as a config's eos_token_id often is) and arrays mean the same.
    one = jaxdec.generate(model, prompts, max_new_tokens=np.int64(12),  # numpy ints too
                          stop_tokens=np.int64(stop_a), pad_id=np.int32(-1))
    np.testing.assert_array_equal(one.tokens, shared.tokens)
    rows = jaxdec.generate(model, prompts, max_new_tokens=12,
                           stop_tokens=jnp.array([[stop_a], [stop_b]]))
    assert rows.lengths.tolist() == [first_a + 1, first_b + 1]
    # An array's rows padded with -1 (generate_padded's stop_tokens_BM): row 0 has none.
    padded = jaxdec.generate(model, prompts, max_new_tokens=12,
                             stop_tokens=np.array([[-1, -1], [stop_b, -1]]))
    assert padded.lengths.tolist() == [12, first_b + 1]
    with pytest.raises(ValueError, match=r"outside \[0, .*\[-1\]"):  # lists: no padding
        jaxdec.generate(model, prompts, max_new_tokens=12, stop_tokens=[[-1], [stop_b]])


def test_single_new_token_and_full_rows(loaded):
    model = loaded(VARIANT)
    prompts = _prompts((5, 1))
    one = jaxdec.generate(model, prompts, max_new_tokens=1)
    np.testing.assert_array_equal(one.lengths, [1, 1])
    logits = np.asarray(jaxdec.forward(model, np.array([prompts[0]])))
    assert one.tokens[0, 0] == np.argmax(logits[0, -1])


def test_streaming_callback_sees_every_step_in_order(loaded):
    """Each call's stream gets that call's steps; a new function (here a closure over a new
    list) does not recompile."""
    model = loaded(VARIANT)
    for seed in (0, 1):
        seen = []
        _compiles.clear()
        result = jaxdec.generate(
            model, _prompts((3, 5), seed=seed), max_new_tokens=7,
            stream=lambda step, tokens, active: seen.append((int(step), tokens)))
        assert all(isinstance(tokens, np.ndarray) for _, tokens in seen)
        assert [s for s, _ in seen] == list(range(7))
        np.testing.assert_array_equal(np.stack([t for _, t in seen], axis=1), result.tokens)
    assert _compiles == []  # the second call's new stream ran the first call's program


def test_a_streams_exception_reaches_the_caller_as_itself(loaded, caplog):
    """The stream raising ends the call with that exception (not jax's runtime error), jax's
    log of the failed callback is kept quiet, and the next call streams as usual."""

    class Enough(Exception):
        pass

    def stop_at_step_2(step, tokens, active):
        if step == 2:
            raise Enough(step)

    model = loaded(VARIANT)
    with pytest.raises(Enough) as raised:
        jaxdec.generate(model, _prompts((3, 5)), max_new_tokens=7, stream=stop_at_step_2)
    assert raised.value.args == (2,)
    assert not any("callback failed" in record.getMessage() for record in caplog.records)

    def interrupt(step, tokens, active):  # (a BaseException: it came as jax's INTERNAL error)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        jaxdec.generate(model, _prompts((3, 5)), max_new_tokens=7, stream=interrupt)
    steps = []
    jaxdec.generate(model, _prompts((3, 5)), max_new_tokens=7,
                    stream=lambda step, tokens, active: steps.append(int(step)))
    assert steps == list(range(7))


def test_streams_of_several_threads(loaded, caplog):
    """Calls from several threads: each stream sees its caller's context variables (a
    server's request state; the runtime's threads run most steps, where they were gone),
    its own rows, and raises to its own caller; jax's log of a failed callback stays quiet
    while other calls run (the filter went with the first call to end)."""
    import concurrent.futures
    import contextvars

    request = contextvars.ContextVar("request", default=None)
    model = loaded(VARIANT)
    want = jaxdec.generate(model, _prompts((3, 5)), max_new_tokens=7).tokens

    class Enough(Exception):
        pass

    def call(i):
        request.set(i)
        seen = []

        def stream(step, tokens, active):
            seen.append((request.get(), tokens.tolist()))
            if i % 2 and step == 3:
                raise Enough(i)

        try:
            out = jaxdec.generate(model, _prompts((3, 5)), max_new_tokens=7, stream=stream)
        except Enough as e:
            return "raised", e.args[0], seen
        return "done", out.tokens, seen

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(8)))
    for i, (how, what, seen) in enumerate(results):
        assert {who for who, _ in seen} == {i}
        if i % 2:
            assert (how, what, len(seen)) == ("raised", i, 4)
        else:
            assert how == "done" and len(seen) == 7
            np.testing.assert_array_equal(what, want)
            np.testing.assert_array_equal(np.array([t for _, t in seen]).T, want)
    assert not any("callback failed" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("sampler", [None, jaxdec.Sampler(temperature=0.7, top_p=0.9)],
                         ids=["greedy", "sampled"])
def test_logprobs_are_the_models(loaded, sampler):
    """Each token's log-probability: log_softmax of a full forward over the row so far at the
    token (the model's distribution, whatever the sampler); 0 after a row stops."""
    model = loaded(VARIANT)
    prompts = _prompts((3, 14, 9), seed=5)
    result = jaxdec.generate(model, prompts, max_new_tokens=8, sampler=sampler,
                             key=jax.random.PRNGKey(1), return_logprobs=True,
                             stop_tokens=list(range(3, 30)))
    assert result.logprobs.shape == (3, 8) and result.logprobs.dtype == np.float32
    assert result.lengths.min() < 8  # a row stopped
    for prompt, tokens, logprobs, n in zip(prompts, result.tokens, result.logprobs,
                                           result.lengths):
        row = prompt + tokens[:n].tolist()
        table = jax.nn.log_softmax(jaxdec.forward(model, jnp.asarray([row]))[0], axis=-1)
        want = [table[len(prompt) - 1 + i, t] for i, t in enumerate(tokens[:n])]
        np.testing.assert_allclose(logprobs[:n], want, rtol=1e-5, atol=1e-5)
        assert (logprobs[n:] == 0).all() and (logprobs[:n] < 0).all()
    assert jaxdec.generate(model, prompts, max_new_tokens=2).logprobs is None


@pytest.mark.parametrize("tp", [1, 2])
def test_a_prefix_cache_prefills_only_what_is_new(loaded, hf_checkpoints, tp, monkeypatch):
    """A conversation's calls (the next prompt extends the last prompt and output; one that
    diverges midway; the same prompt again; one sharing nothing): each call's tokens (greedy
    and sampled) and logprobs are `generate`'s on the whole prompt, and only the tokens past
    the common beginning are prefilled."""
    import jaxdec.prefix_cache as module

    fed, program = [], module._program

    def spy(model, tokens, lengths, cache, *args, **kwargs):
        fed.append((int(np.asarray(cache.lengths)[0]) if kwargs["continued"] else 0,
                    int(lengths[0])))
        return program(model, tokens, lengths, cache, *args, **kwargs)

    monkeypatch.setattr(module, "_program", spy)
    model = loaded(VARIANT) if tp == 1 else jaxdec.load_pretrained(
        hf_checkpoints(VARIANT)[0], mesh=jaxdec.make_mesh(tp=tp))
    session = jaxdec.PrefixCache(model, max_len=96)
    rs = np.random.RandomState(4)
    first = rs.randint(3, 97, 12).tolist()
    sampled = dict(sampler=jaxdec.Sampler(temperature=1.0), key=jax.random.PRNGKey(2))
    prompts = [first]
    for step in range(5):
        prompt, extra = prompts[-1], dict(sampled if step % 2 else {})
        result = session.generate(prompt, max_new_tokens=6, return_logprobs=True, **extra)
        want = jaxdec.generate(model, [prompt], max_new_tokens=6, return_logprobs=True, **extra)
        np.testing.assert_array_equal(result.tokens, want.tokens)
        np.testing.assert_allclose(result.logprobs, want.logprobs, rtol=1e-4, atol=1e-5)
        assert session.tokens == prompt + result.to_lists()[0][:-1]
        held = session.tokens
        held += [1, 2, 3]  # a copy: the record of what the cache holds is the session's
        assert session.tokens == prompt + result.to_lists()[0][:-1]
        following = [
            prompt + result.to_lists()[0] + rs.randint(3, 97, 4).tolist(),  # the next turn
            prompt[:7] + [5, 6, 7],  # diverges after 7 tokens
            prompt,  # again
            rs.randint(3, 97, 9).tolist(),  # nothing in common
            None,
        ][step]
        prompts.append(following)
    # (kept, fed): the next turn keeps the 12 + 5 cached, the divergent one 7, the same
    # prompt all but its last token, the unrelated one nothing.
    assert fed == [(0, 12), (17, 5), (7, 3), (9, 1), (0, 9)]
    with pytest.raises(ValueError, match="max_len=96 is too small"):
        session.generate(first * 8, max_new_tokens=6)
    assert session.generate(first, max_new_tokens=2).tokens.shape == (1, 2)


def test_a_speculative_session_compiles_two_programs_whatever_its_length(loaded):
    """With a drafter, a session's programs do not depend on the conversation's length either
    (the whole prompts the drafter resumes from were its bucket wide: a program per bucket
    of the conversation): turns whose new tokens stay in one bucket compile nothing after
    the second, as the conversation grows past 16, 32 and 64 tokens."""
    model = loaded(VARIANT)
    session = jaxdec.PrefixCache(model, drafter=jaxdec.drafters.PromptLookup(),
                                 tree=jaxdec.tree.chain(2), max_len=128)
    rs = np.random.RandomState(6)
    prompt = rs.randint(3, 97, 10).tolist()
    compiled = []
    for turn in range(9):
        _compiles.clear()
        result = session.generate(prompt, max_new_tokens=4)
        compiled.append(len(_compiles))
        np.testing.assert_array_equal(
            result.tokens, jaxdec.generate(model, [prompt], max_new_tokens=4).tokens)
        prompt = prompt + result.to_lists()[0] + rs.randint(3, 97, 4).tolist()
    assert len(prompt) > 70 and compiled[2:] == [0] * 7, compiled


@pytest.mark.parametrize("dp,rows", [(1, 3), (2, 4), (2, 3)])
def test_a_prefix_cache_of_several_rows(loaded, hf_checkpoints, dp, rows, monkeypatch):
    """Three rows (on a dp = 2 mesh, four and three: the cache then holds a fourth row that
    decodes nothing), each its own conversation: every call returns
    `generate`'s tokens and logprobs for the whole prompts; each row keeps what it shares with
    its own cache (a row's next turn, a row that diverges, a row that starts over), and a row
    whose kept tokens leave the block less room prefills more of its prompt again."""
    import jaxdec.prefix_cache as module

    fed, program = [], module._program

    def spy(model, tokens, lengths, cache, *args, **kwargs):
        kept = np.asarray(cache.lengths) if kwargs["continued"] else np.zeros(len(lengths))
        fed.append((kept.tolist(), np.asarray(lengths).tolist(), tokens.shape[1]))
        return program(model, tokens, lengths, cache, *args, **kwargs)

    monkeypatch.setattr(module, "_program", spy)
    model = loaded(VARIANT) if dp == 1 else jaxdec.load_pretrained(
        hf_checkpoints(VARIANT)[0], mesh=jaxdec.make_mesh(dp=dp))
    session = jaxdec.PrefixCache(model, max_len=80, rows=rows)
    rs = np.random.RandomState(6)
    prompts = [rs.randint(3, 97, n).tolist() for n in (9, 4, 13, 6)[:rows]]
    sampled = dict(sampler=jaxdec.Sampler(temperature=1.0), key=jax.random.PRNGKey(3))
    for step in range(3):
        extra = sampled if step == 1 else {}
        result = session.generate(prompts, max_new_tokens=5, return_logprobs=True, **extra)
        want = jaxdec.generate(model, prompts, max_new_tokens=5, return_logprobs=True, **extra)
        np.testing.assert_array_equal(result.tokens, want.tokens)
        np.testing.assert_allclose(result.logprobs, want.logprobs, rtol=1e-4, atol=1e-5)
        assert session.tokens == [p + out[:-1] for p, out in zip(prompts, result.to_lists())]
        outs = result.to_lists()
        prompts = [prompts[0] + outs[0] + [7, 8],  # the next turn
                   prompts[1][:2] + [9] * 3,  # diverges after 2 tokens, then the same again
                   rs.randint(3, 97, 40 + 10 * step).tolist(),  # a new conversation
                   *prompts[3:]]  # the same again (dp = 2)
    # (kept, rest, block width) per call. The second call: row 0 keeps its 9 + 4 cached tokens,
    # row 1 its 2 common ones, row 2 nothing, row 3 all but its last; the block is the longest
    # rest's (40) bucket, 64. The third: row 2's 50 new tokens (bucket 64) leave row 0 room
    # for 16 of its 20 cached ones. Every block is a bucket (no program of its own).
    # The dp filler row (rows = 3 on dp = 2) prefills row 0's last token afresh every call.
    filler = [[0], [1]] if dp * rows == 6 else [[], []]
    assert fed[1][0] == [13, 2, 0, 5][:rows] + filler[0] and fed[1][2] == 64
    assert fed[2][0] == [16, 4, 0, 5][:rows] + filler[0] and fed[2][2] == 64
    assert fed[2][1] == [23 - 16, 1, 50, 1][:rows] + filler[1]


def test_a_one_row_session_on_a_data_parallel_mesh(hf_checkpoints):
    """One conversation on a dp = 2 mesh (the cache's second row fills the mesh), with a draft
    model keeping its own cache: each sampled turn is `speculative_generate`'s, and a stream
    sees the conversation's row only."""
    model = jaxdec.load_pretrained(hf_checkpoints(VARIANT)[0], mesh=jaxdec.make_mesh(dp=2))
    drafter, tree = jaxdec.drafters.DraftModel(model), jaxdec.tree.chain(3)
    session = jaxdec.PrefixCache(model, max_len=64, drafter=drafter, tree=tree)
    prompt = np.random.RandomState(8).randint(3, 97, 11).tolist()
    for turn in range(2):
        seen = []
        sampled = dict(sampler=jaxdec.Sampler(temperature=1.0), key=jax.random.PRNGKey(turn))
        got = session.generate(prompt, max_new_tokens=7, stream=lambda *a: seen.append(a),
                               **sampled)
        want = jaxdec.speculative_generate(model, drafter, [prompt], max_new_tokens=7, tree=tree,
                                           max_len=64, **sampled)
        np.testing.assert_array_equal(got.tokens, want.tokens)
        assert {a[1].shape[0] for a in seen} == {1}
        prompt = prompt + got.to_lists()[0] + [5, 6]
    assert len(session.tokens) == 11 + 7 + 2 + 7 - 1


def test_prefix_cache_bad_arguments(loaded):
    model = loaded(VARIANT)
    with pytest.raises(ValueError, match="max_len must be an int >= 2"):
        jaxdec.PrefixCache(model, max_len=1)
    with pytest.raises(ValueError, match="exceeds the model's"):
        jaxdec.PrefixCache(model, max_len=10**6)
    with pytest.raises(ValueError, match="rows must be an int >= 1"):
        jaxdec.PrefixCache(model, max_len=16, rows=0)
    with pytest.raises(TypeError, match="prompts must be 2 lists of token ids"):
        jaxdec.PrefixCache(model, max_len=16, rows=2).generate([1, 2], max_new_tokens=2)
    with pytest.raises(TypeError, match="drafter must be None or a jaxdec.drafters drafter"):
        jaxdec.PrefixCache(model, max_len=16, drafter=model)
    with pytest.raises(ValueError, match="tree .* needs a drafter"):
        jaxdec.PrefixCache(model, max_len=16, tree=jaxdec.tree.chain(2))
    session = jaxdec.PrefixCache(model, max_len=32)
    with pytest.raises(ValueError, match="profile times a drafter's steps"):
        session.generate([1, 2], max_new_tokens=2, profile=True)
    for prompt in ("hello", [[1, 2], [3]], np.zeros((2, 2), np.int32)):
        with pytest.raises(TypeError, match="one list of token ids"):
            session.generate(prompt, max_new_tokens=2)
    np.testing.assert_array_equal(  # arrays are lists of ids too
        session.generate(jnp.arange(3, 9), max_new_tokens=2).tokens,
        jaxdec.generate(model, [list(range(3, 9))], max_new_tokens=2).tokens)
    with pytest.raises(TypeError, match="return_logprobs must be a bool"):
        session.generate([1, 2], max_new_tokens=2, return_logprobs=1)
    # Shapes only: refused when made (the first call compiled, then failed inside jax).
    abstract = jaxdec.abstract_model(model.config)
    with pytest.raises(ValueError, match="the model's params are shapes only"):
        jaxdec.PrefixCache(abstract, max_len=16)
    with pytest.raises(ValueError, match="the drafter's params are shapes only"):
        jaxdec.PrefixCache(model, max_len=16, drafter=DraftModel(abstract))


def test_a_cancelled_call_keeps_the_sessions_conversation(loaded):
    """A stream raising to cancel a call loses the caches it was given; the session's record
    stays (it was emptied: a next turn built from `session.tokens` dropped the whole
    conversation, silently), and the next call prefills its prompt whole."""
    model = loaded(VARIANT)
    session = jaxdec.PrefixCache(model, max_len=48)
    first = session.generate([1, 2, 3, 4], max_new_tokens=4)
    held = session.tokens
    assert held == [1, 2, 3, 4] + first.to_lists()[0][:3]

    class Cancel(Exception):
        pass

    def stream(step, *_):
        raise Cancel

    with pytest.raises(Cancel):
        session.generate(held + [first.to_lists()[0][3], 9], max_new_tokens=4, stream=stream)
    assert session.tokens == held and "holding=0 tokens" in repr(session)
    follow = session.tokens + [first.to_lists()[0][3], 5]
    np.testing.assert_array_equal(session.generate(follow, max_new_tokens=3).tokens,
                                  jaxdec.generate(model, [follow], max_new_tokens=3).tokens)


def test_a_prefix_cache_decodes_one_call_at_a_time(loaded):
    """A call while another runs (here from that call's stream, as another thread's would
    come) is refused and leaves the running call alone (two threads' calls failed deep
    inside, or one decoded the other's cache, silently)."""
    model = loaded(VARIANT)
    session = jaxdec.PrefixCache(model, max_len=32)
    refused = []

    def stream(step, *_):
        if step == 1:
            with pytest.raises(RuntimeError, match="this PrefixCache is decoding another call"):
                session.generate([7, 8], max_new_tokens=2)
            refused.append(step)

    got = session.generate([1, 2, 3], max_new_tokens=4, stream=stream)
    assert refused == [1]
    np.testing.assert_array_equal(
        got.tokens, jaxdec.generate(model, [[1, 2, 3]], max_new_tokens=4).tokens)
    again = session.generate([1, 2, 3] + got.to_lists()[0] + [5], max_new_tokens=2)
    np.testing.assert_array_equal(again.tokens, jaxdec.generate(
        model, [[1, 2, 3] + got.to_lists()[0] + [5]], max_new_tokens=2).tokens)
    # A conversation branched by a deep copy (the lock made it fail: "cannot pickle
    # '_thread.lock' object"): each branch its own session.
    import copy

    branch, shallow = copy.deepcopy(session), copy.copy(session)
    # (sharing the model: a branch copied every weight; a shallow copy shared the donated
    # cache, and the other session's next call failed inside XLA)
    assert branch.model is session.model is shallow.model
    assert branch.cache.layers[0].k is not session.cache.layers[0].k
    follow = session.tokens + again.to_lists()[0]
    for s in (branch, shallow, session):
        np.testing.assert_array_equal(s.generate(follow + [9], max_new_tokens=2).tokens,
                                      jaxdec.generate(model, [follow + [9]],
                                                      max_new_tokens=2).tokens)


def test_timings(loaded):
    result = jaxdec.generate(loaded(VARIANT), _prompts((3, 5)), max_new_tokens=8,
                             return_timings=True)
    assert 0 < result.prefill_s < 60 and 0 < result.decode_s < 60
    assert result.decode_tokens_per_s > 0
    plain = jaxdec.generate(loaded(VARIANT), _prompts((3, 5)), max_new_tokens=8)
    assert plain.prefill_s is None
    np.testing.assert_array_equal(plain.tokens, result.tokens)


def test_the_decode_loop_waits_on_the_timing_clocks(loaded):
    """Both host clocks are inputs of the decode loop: a clock nothing waits on ran after the
    loop on a GPU (decode_s ~0)."""
    model = loaded(VARIANT)
    jaxpr = trace_program("jaxdec.generate", lambda: jaxdec.generate(
        model, _prompts((3, 5)), max_new_tokens=8, return_timings=True, compile_only=True))
    assert clocks_the_loop_waits_on(jaxpr) == (2, 2)


def test_sampled_first_tokens_follow_the_processed_distribution(loaded):
    model = loaded(VARIANT)
    prompt = _prompts((6,))[0]
    sampler = jaxdec.Sampler(temperature=1.5, top_k=6)
    n = 3000
    result = jaxdec.generate(model, [prompt] * n, max_new_tokens=1, sampler=sampler,
                             key=jax.random.PRNGKey(11))
    probs = np.asarray(sampler.probs(jaxdec.forward(model, np.array([prompt]))[0, -1]), np.float64)
    counts = np.bincount(result.tokens[:, 0], minlength=probs.size)
    keep = probs > 0
    assert counts[~keep].sum() == 0
    expected = n * probs[keep]
    stat = np.sum((counts[keep] - expected) ** 2 / expected)
    assert float(gammaincc((keep.sum() - 1) / 2, stat / 2)) > 1e-3


def test_sampling_is_reproducible_from_the_key(loaded):
    model, prompts = loaded(VARIANT), _prompts((4, 8))
    sampler = jaxdec.Sampler(temperature=1.0, top_p=0.95)
    a = jaxdec.generate(model, prompts, max_new_tokens=8, sampler=sampler, key=jax.random.PRNGKey(1))
    b = jaxdec.generate(model, prompts, max_new_tokens=8, sampler=sampler, key=jax.random.PRNGKey(1))
    c = jaxdec.generate(model, prompts, max_new_tokens=8, sampler=sampler, key=jax.random.PRNGKey(2))
    typed = jaxdec.generate(model, prompts, max_new_tokens=8, sampler=sampler, key=jax.random.key(1))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.tokens, typed.tokens)  # the same key, typed
    assert not np.array_equal(a.tokens, c.tokens)


def test_generate_padded_under_your_own_jit_with_donation(loaded):
    model = loaded(VARIANT)
    prompts = _prompts((3, 9))
    tokens = np.zeros((2, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = np.array([3, 9], np.int32)
    step = jax.jit(functools.partial(jaxdec.generate_padded, max_new_tokens=6),
                   donate_argnames="cache")
    cache = jaxdec.init_cache(model.config, 2, 32)
    (out, n), cache = step(model, tokens, lengths, cache, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(out, jaxdec.generate(model, prompts, max_new_tokens=6).tokens)
    np.testing.assert_array_equal(cache.lengths, lengths + 5)
    with_logprobs = jax.jit(functools.partial(jaxdec.generate_padded, max_new_tokens=6,
                                              return_logprobs=True))
    (again, _, logprobs), _ = with_logprobs(model, tokens, lengths,
                                            jaxdec.init_cache(model.config, 2, 32),
                                            jax.random.PRNGKey(0))
    np.testing.assert_array_equal(again, out)
    np.testing.assert_allclose(logprobs, jaxdec.generate(
        model, prompts, max_new_tokens=6, return_logprobs=True).logprobs, rtol=1e-6)
    # Called eagerly: one program, compiled once (the loop compiled again in every call).
    jaxdec.generate_padded(model, tokens, lengths, jaxdec.init_cache(model.config, 2, 32), None,
                           max_new_tokens=6)
    _compiles.clear()
    (eager, _), eager_cache = jaxdec.generate_padded(
        model, tokens, lengths, jaxdec.init_cache(model.config, 2, 32), None, max_new_tokens=6)
    assert _compiles == []
    np.testing.assert_array_equal(eager, out)
    np.testing.assert_array_equal(eager_cache.lengths, lengths + 5)

    # A stream is any host function, one that cannot be hashed too (a dataclass's instance:
    # a static argument of the eager program refused it).
    @dataclasses.dataclass
    class Collector:
        steps: list

        def __call__(self, step, tokens, active):
            self.steps.append(int(step))

    seen = Collector([])
    (streamed, _), _ = jaxdec.generate_padded(model, tokens, lengths,
                                              jaxdec.init_cache(model.config, 2, 32), None,
                                              max_new_tokens=6, stream=seen)
    np.testing.assert_array_equal(streamed, out)
    assert sorted(seen.steps) == list(range(6))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("prompts,kwargs,error,match", [
    ([[1, 2], []], {}, ValueError, r"prompts\[1\] is empty"),
    ([], {}, TypeError, "non-empty list"),
    ("hello", {}, TypeError, "non-empty list"),
    (["hello"], {}, TypeError, "tokenize it first"),
    ([1, 2, 3], {}, TypeError,
     r"got a list of ints \(one prompt is \[ids\]: prompts=\[\[1, 2, 3\]\]\)"),
    ([[1, [2]]], {}, TypeError, r"prompts\[0\] must be a flat list of integer token ids"),
    ([[1, 200]], {}, ValueError, r"outside \[0, 97\)"),
    ([[1, 2]], dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    ([[1, 2]], dict(max_new_tokens=2048), ValueError, "max_position_embeddings"),
    ([[1, 2, 3]], dict(max_len=3), ValueError, "max_len=3 is too small"),
    ([[1, 2]], dict(sampler="greedy"), TypeError, "sampler"),
    ([[1, 2]], dict(key=0), TypeError, "key must be one PRNG key.*got int"),
    ([[1, 2]], dict(key=np.zeros((2, 2), np.uint32)), TypeError, r"shape \(2, 2\)"),
    ([[1, 2]], dict(key=np.zeros(2, np.int32)), TypeError, "dtype int32"),
    ([[1, 2]], dict(stop_tokens=[[1], [2]]), ValueError, "per-row lists for 1 prompts"),
    ([[1, 2]], dict(stop_tokens=[500]), ValueError, "stop_tokens"),
    ([[1, 2]], dict(stop_tokens="2"), TypeError, "stop_tokens.*got a string"),
    ([[1, 2]], dict(stop_tokens=[2.5]), TypeError, "stop_tokens must be token ids"),
    ([[1, 2]], dict(stop_tokens=[True]), TypeError, "stop_tokens must be token ids"),
    ([[1, 2]], dict(stop_tokens=object()), TypeError, "stop_tokens must be token ids"),
    ([[1, 2]], dict(return_timings="yes"), TypeError, "return_timings must be a bool"),
    ([[1, 2]], dict(return_logprobs=1), TypeError, "return_logprobs must be a bool"),
])
def test_bad_input_is_rejected_before_tracing(loaded, prompts, kwargs, error, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    model = loaded(VARIANT)  # outside the counted span: only generate's own work counts
    jax.lax.iota(jnp.int32, 1)  # (a process's first iota compiles: check_untraced makes one)
    _compiles.clear()
    with pytest.raises(error, match=match):
        jaxdec.generate(model, prompts, **kwargs)
    assert _compiles == []


def test_generate_padded_checks_what_it_is_given(loaded):
    """Its cache must hold the prompt block and every new token (a short one returned wrong
    tokens with full counts); max_new_tokens, pad_id and key are named; greedy takes None."""
    model = loaded(VARIANT)
    tokens, lengths = np.ones((2, 16), np.int32), np.array([3, 9], np.int32)
    run = functools.partial(jaxdec.generate_padded, model, tokens, lengths)
    with pytest.raises(ValueError, match="the cache's 18 slots hold no prompt block of 16 "
                                         "tokens and 8 new tokens: it needs max_len >= 23"):
        run(jaxdec.init_cache(model.config, 2, 18), jax.random.PRNGKey(0), max_new_tokens=8)
    # A cache of another dtype than the model's (twice the memory a bf16 model needs, and
    # not generate's numerics) is named.
    assert model.dtype == jnp.float32
    with pytest.raises(TypeError, match="the cache holds bfloat16 keys and values, the model's "
                                        r"parameters are float32: .*dtype=model.dtype"):
        run(jaxdec.init_cache(model.config, 2, 32, dtype=jnp.bfloat16), None, max_new_tokens=4)
    # Lengths cast with the rest of the cache (a jax.tree.map over it) are named.
    for dtype in (jnp.float32, jnp.int8):
        cast = jax.tree.map(lambda x: x.astype(dtype) if x.ndim == 1 else x,
                            jaxdec.init_cache(model.config, 2, 32))
        with pytest.raises(TypeError, match=f"the cache's lengths must be int32, got "
                                            f"{jnp.dtype(dtype).name}"):
            run(cast, None, max_new_tokens=4)
    # A cache of the right shapes off the model's mesh (on a tp mesh, one made without mesh=;
    # jax's error named neither).
    elsewhere = jax.device_put(jaxdec.init_cache(model.config, 2, 32), jax.devices()[1])
    with pytest.raises(ValueError, match="the cache lies on 1 device.s., not on the model's "
                                         "mesh of 1: .*mesh=model.mesh"):
        run(elsewhere, None, max_new_tokens=4)
    cache = jaxdec.init_cache(model.config, 2, 32)
    for kwargs, error, match in [
            (dict(max_new_tokens=0), ValueError, "max_new_tokens must be an int >= 1"),
            (dict(max_new_tokens=4.0), ValueError, "max_new_tokens must be an int"),
            (dict(max_new_tokens=4, pad_id=2**40), ValueError, "pad_id must fit int32"),
            (dict(max_new_tokens=4, sampler=jaxdec.Sampler()), ValueError, "key is needed")]:
        with pytest.raises(error, match=match):
            run(cache, None, **kwargs)
    (out, _), _ = run(cache, None, max_new_tokens=4)
    np.testing.assert_array_equal(out, run(jaxdec.init_cache(model.config, 2, 32),
                                           jax.random.PRNGKey(5), max_new_tokens=4)[0][0])
    # Keys, prompts, lengths and stop ids are named (jax.random's messages, or wrong tokens
    # from a length of 0 or past the block, from float ids truncated, from ids past the
    # vocabulary embedded as zeros).
    fresh = lambda: jaxdec.init_cache(model.config, 2, 32)  # noqa: E731
    for args, error, match in [
            ((tokens, lengths, 0), TypeError, "key must be one PRNG key"),
            ((tokens, lengths, jax.random.split(jax.random.key(0), 2)), TypeError,
             "key must be one PRNG key"),
            ((tokens, np.array([0, 9]), None), ValueError,
             r"prompt_lengths_B must be in \[1, 16\] \(tokens_BT's length\), got \[0, 9\]"),
            ((tokens, np.array([3, 17]), None), ValueError, "prompt_lengths_B must be in"),
            ((tokens, lengths[:1], None), ValueError,
             r"prompt_lengths_B must be \[2\] \(tokens_BT is \[2, 16\]\), got shape \(1,\)"),
            ((tokens + 0.5, lengths, None), TypeError, "tokens_BT must be an integer array"),
            ((tokens, lengths.astype(np.float32), None), TypeError,
             "prompt_lengths_B must be an integer array"),
            ((tokens.at[1, 2].set(500) if False else np.where(np.arange(16) == 2, 500, tokens)
              .astype(np.int32), lengths, None), ValueError,
             r"tokens_BT has ids outside \[0, 97\): \[500, 500\]")]:
        with pytest.raises(error, match=match):
            jaxdec.generate_padded(model, *args[:2], fresh(), args[2], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"stop_tokens_BM must be \[2, M\]"):
        jaxdec.generate_padded(model, tokens, lengths, fresh(), None, np.array([1, 2]),
                               max_new_tokens=4)
    # Stop ids past the vocabulary (never matched: generate refuses them too); -1 pads.
    with pytest.raises(ValueError, match=r"stop_tokens_BM has ids outside \[0, 97\): \[500\]"):
        jaxdec.generate_padded(model, tokens, lengths, fresh(), None,
                               np.array([[500, -1], [3, -1]], np.int32), max_new_tokens=4)
    # Padding past a row's length may be anything (-1 here).
    padded = np.where(np.arange(16)[None] < lengths[:, None], tokens, -1).astype(np.int32)
    np.testing.assert_array_equal(
        jaxdec.generate_padded(model, padded, lengths, fresh(), None, max_new_tokens=4)[0][0], out)
    with pytest.raises(ValueError, match="pad_id must fit int32"):
        jaxdec.generate(model, [[1, 2]], max_new_tokens=2, pad_id=2**40)
    with pytest.raises(TypeError, match="max_len must be an int, got 30.0"):
        jaxdec.generate(model, [[1, 2]], max_new_tokens=2, max_len=30.0)


def test_inside_jit_generate_names_the_traced_argument(loaded):
    """`generate` runs its own program and reads it on the host: inside a user's jit it says
    so (and what to jit instead) rather than failing deep in a host conversion; 0-d arrays
    holding a value count as numbers."""
    model = loaded(VARIANT)
    inside = r"cannot run inside a jax transformation \(jit, vmap, grad\): its argument "
    with pytest.raises(TypeError, match="jaxdec.generate " + inside + "'model'.*generate_padded"):
        jax.jit(lambda m: jaxdec.generate(m, [[1, 2]], max_new_tokens=2).tokens)(model)
    with pytest.raises(TypeError, match=inside + "'prompts'"):
        jax.jit(lambda p: jaxdec.generate(model, p, max_new_tokens=2).tokens)(
            jnp.array([[1, 2]]))
    with pytest.raises(TypeError, match="jaxdec.generate cannot run inside jax.jit"):
        jax.jit(lambda n: jaxdec.generate(model, [[1, 2]], max_new_tokens=n).tokens)(2)
    with pytest.raises(TypeError, match="jaxdec.speculative_generate " + inside + "'prompts'"):
        jax.jit(lambda p: jaxdec.speculative_generate(
            model, jaxdec.drafters.PromptLookup(), p, max_new_tokens=2).tokens)(
            jnp.array([[1, 2]]))
    session = jaxdec.PrefixCache(model, max_len=16)
    with pytest.raises(TypeError, match="PrefixCache.generate " + inside + "'prompt'"):
        jax.jit(lambda p: session.generate(p, max_new_tokens=2).tokens)(jnp.array([1, 2]))
    # Nothing traced (every argument closed over), the call still inside jit.
    closed = r"cannot run inside jax.jit \(or another trace: .*closed over arguments too\)"
    with pytest.raises(TypeError, match="jaxdec.generate " + closed + ".*generate_padded"):
        jax.jit(lambda x: x + jaxdec.generate(model, [[1, 2]], max_new_tokens=2).tokens)(0)
    with pytest.raises(TypeError, match="jaxdec.speculative_generate " + closed):
        jax.jit(lambda x: x + jaxdec.speculative_generate(
            model, jaxdec.drafters.PromptLookup(), [[1, 2]], max_new_tokens=2).tokens)(0)
    with pytest.raises(TypeError, match="PrefixCache.generate " + closed):
        jax.jit(lambda x: x + session.generate([1, 2], max_new_tokens=2).tokens)(0)
    np.testing.assert_array_equal(
        jaxdec.generate(model, [[1, 2]], max_new_tokens=jnp.int32(3), pad_id=np.array(0)).tokens,
        jaxdec.generate(model, [[1, 2]], max_new_tokens=3).tokens)


def test_yarn_extends_the_positions(loaded):
    """Qwen2.5's long-context recipe keeps max_position_embeddings at the original context
    and adds YaRN: factor x original positions are allowed, one more is refused."""
    model = loaded("qwen2-yarn")  # max_position_embeddings 128, factor 4 x original 32
    assert model.config.max_positions == 128
    recipe = jaxdec.Model(config=model.config.replace(max_position_embeddings=32),
                          params=model.params, mesh=model.mesh)
    assert recipe.config.max_positions == 128
    out = jaxdec.generate(recipe, [[5] * 30], max_new_tokens=98)
    np.testing.assert_array_equal(out.tokens, jaxdec.generate(model, [[5] * 30],
                                                              max_new_tokens=98).tokens)
    with pytest.raises(ValueError, match=r"129 exceeds the model's 128 positions \(YaRN's "
                                         r"factor 4 x original_max_position_embeddings 32\)"):
        jaxdec.generate(recipe, [[5] * 30], max_new_tokens=99)
    with pytest.raises(ValueError, match=r"exceeds the model's 128 positions \(YaRN's factor 4"):
        jaxdec.forward(recipe, np.ones((1, 129), np.int32))


def test_forward_bad_input(loaded):
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        jaxdec.forward(loaded(VARIANT), np.array([1, 2, 3]))
    with pytest.raises(TypeError, match="integers"):
        jaxdec.forward(loaded(VARIANT), np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        jaxdec.forward(loaded(VARIANT), np.ones((1, 3000), np.int32))
    with pytest.raises(TypeError, match="model must be a jaxdec Model, got NoneType"):
        jaxdec.forward(None, np.ones((1, 3), np.int32))
    vocab = loaded(VARIANT).config.vocab_size
    for bad in (vocab, -1):  # concrete ids are checked (a traced id would embed as zeros)
        with pytest.raises(ValueError, match=rf"ids outside \[0, {vocab}\): \[{bad}\]"):
            jaxdec.forward(loaded(VARIANT), jnp.array([[1, bad, 2]]))
    # int64 ids from the host are checked before the int32 cast (2**32 + 5 would be 5).
    with pytest.raises(ValueError, match=rf"ids outside \[0, {vocab}\): \[4294967301\]"):
        jaxdec.forward(loaded(VARIANT), np.array([[1, 2**32 + 5]], np.int64))
    for empty in ((0, 3), (1, 0)):
        with pytest.raises(ValueError, match="at least one token in one row"):
            jaxdec.forward(loaded(VARIANT), np.zeros(empty, np.int32))


def test_params_that_do_not_fit_the_config_are_refused(loaded):
    """Hand-edited params are checked against the config, naming the leaf: a truncated
    embedding ran (ids past it embedded as zeros) and a (1,) norm broadcast, both to wrong
    logits; a transposed weight failed deep in the forward."""
    model = loaded(VARIANT)
    config = model.config

    def edited(change):
        params = jax.tree.map(lambda x: x, model.params)   # fresh containers, shared leaves
        change(params)
        return dataclasses.replace(model, params=params)

    cases = [
        (lambda p: p.update(embed=p["embed"][:50]), ValueError,
         rf"model.params\['embed'\] has shape \(50, {config.hidden_size}\); model.config on "
         rf"a tp=1 mesh needs \({config.vocab_size}, {config.hidden_size}\)"),
        (lambda p: p["layers"][0].update(attn_norm=jnp.ones((1,))), ValueError,
         r"\['layers'\]\[0\]\['attn_norm'\] has shape \(1,\)"),
        (lambda p: p["layers"][1].update(down=p["layers"][1]["down"].T), ValueError,
         r"\['layers'\]\[1\]\['down'\] has shape"),
        (lambda p: p["layers"][1].update(down=np.zeros(p["layers"][1]["down"].shape, np.int8)),
         TypeError, r"\['layers'\]\[1\]\['down'\] must be a floating-point array, got int8"),
        (lambda p: p["layers"].pop(), ValueError,
         r"do not match model.config: missing \['layers'\]\[1\]\['attn_norm'\]"),
        (lambda p: p.update(extra=jnp.ones(3)), ValueError, r"unexpected \['extra'\]"),
        # moved with jax.device_put: the mesh stays (every program failed in jax's dispatch)
        (lambda p: p.update(embed=jax.device_put(p["embed"], jax.devices()[1])), ValueError,
         r"model.params\['embed'\] lie on devices \[1\], outside model.mesh's \[0\] "
         r"\(jax.device_put moves the params, not the mesh\)"),
    ]
    for change, error, message in cases:
        bad = edited(change)
        with pytest.raises(error, match=message):
            jaxdec.forward(bad, [[1, 2, 3]])
        with pytest.raises(error, match=message):
            jaxdec.generate(bad, [[1, 2, 3]], max_new_tokens=2)
        with pytest.raises(error, match=message):
            DraftModel(bad)
    with pytest.raises(ValueError, match="leaves are in other containers"):
        jaxdec.forward(edited(lambda p: p.update(layers=tuple(p["layers"]))), [[1, 2, 3]])


def test_prompts_may_be_arrays(loaded):
    prompts = _prompts((3, 6))
    as_arrays = [np.array(p, np.int64) for p in prompts]
    np.testing.assert_array_equal(
        jaxdec.generate(loaded(VARIANT), as_arrays, max_new_tokens=3).tokens,
        jaxdec.generate(loaded(VARIANT), prompts, max_new_tokens=3).tokens)
    # A [batch, length] array (numpy or jax): every row is a whole prompt.
    square = _prompts((4, 4))
    expected = jaxdec.generate(loaded(VARIANT), square, max_new_tokens=3).tokens
    for batch in (np.array(square, np.int64), jnp.array(square)):
        np.testing.assert_array_equal(
            jaxdec.generate(loaded(VARIANT), batch, max_new_tokens=3).tokens, expected)
    with pytest.raises(TypeError, match="flat list of integer"):
        jaxdec.generate(loaded(VARIANT), [[1.5, 2.0]], max_new_tokens=3)
    with pytest.raises(TypeError, match="flat list of integer"):
        jaxdec.generate(loaded(VARIANT), np.ones((2, 3), np.float32), max_new_tokens=3)
    with pytest.raises(TypeError, match=r"\[batch, length\] token ids, got shape \(3,\)"):
        jaxdec.generate(loaded(VARIANT), np.array([1, 2, 3]), max_new_tokens=3)


def test_forward_with_cache_shape_errors(loaded):
    from jaxdec.model import forward_with_cache

    model = loaded(VARIANT)
    tokens, positions = jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3), jnp.int32)
    cache = jaxdec.init_cache(model.config, 2, 8)
    with pytest.raises(ValueError, match="positions shape"):
        forward_with_cache(model, tokens, positions[:, :2], cache)
    with pytest.raises(ValueError, match=r"mask must be \[batch, T, T\]"):
        forward_with_cache(model, tokens, positions, cache, mask_BTT=jnp.ones((2, 3, 2), bool))
    with pytest.raises(ValueError, match=r"the cache's layers are \(1, 8, .*this call needs "
                                         r"\[batch=2"):
        forward_with_cache(model, tokens, positions, jaxdec.init_cache(model.config, 1, 8))
    # A cache of another model (head dim, KV heads, layers) or none at all is named.
    import dataclasses

    other = dataclasses.replace(model.config, head_dim=model.config.head_dim * 2)
    with pytest.raises(ValueError, match="head_dim=.*init_cache\\(model.config"):
        forward_with_cache(model, tokens, positions, jaxdec.init_cache(other, 2, 8))
    fewer = dataclasses.replace(model.config, num_layers=1, layer_windows=(None,))
    with pytest.raises(ValueError, match="the cache has 1 layers"):
        forward_with_cache(model, tokens, positions, jaxdec.init_cache(fewer, 2, 8))
    with pytest.raises(TypeError, match="cache must be a jaxdec Cache"):
        forward_with_cache(model, tokens, positions, {"k": 0})
    # Integer tokens, positions and logit indices, a bool mask: fractional positions ran.
    for kwargs, match in [(dict(tokens_BT=tokens + 0.5), "tokens must be integers"),
                          (dict(positions_BT=positions + 0.5), "positions must be integers"),
                          (dict(logits_indices_BN=jnp.zeros((2, 1))), "logits_indices must be"),
                          (dict(mask_BTT=jnp.ones((2, 3, 3))), "mask must be bool")]:
        with pytest.raises(TypeError, match=match):
            forward_with_cache(model, **{"tokens_BT": tokens, "positions_BT": positions,
                                         "cache": cache, **kwargs})
    dp_model = jaxdec.Model(config=model.config, params=model.params,
                            mesh=jaxdec.make_mesh(dp=2))
    with pytest.raises(ValueError, match="not a multiple of the mesh's dp=2"):
        forward_with_cache(dp_model, jnp.zeros((3, 4), jnp.int32), jnp.zeros((3, 4), jnp.int32),
                           None)  # (jaxdec.forward pads such a batch itself)


def test_a_fresh_prefill_attends_as_through_the_empty_cache(loaded):
    """fresh=True (an empty cache, positions 0..T-1): the tokens attend to their own keys and
    values (cuDNN's fused attention on a GPU) with the same logits and the same cache as
    attention over the cache's slots; a mask is refused."""
    from jaxdec.model import forward_with_cache

    model = loaded(VARIANT)
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, 97, (2, 12)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    cache = jaxdec.init_cache(model.config, 2, 20)
    want = forward_with_cache(model, tokens, positions, cache)
    got = forward_with_cache(model, tokens, positions, cache, fresh=True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for new, old in zip(got[2].layers, want[2].layers):
        np.testing.assert_allclose(new.k, old.k, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(new.v, old.v, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="fresh=True is a causal prefill"):
        forward_with_cache(model, tokens, positions, cache, fresh=True,
                           mask_BTT=jnp.ones((2, 12, 12), bool))


@pytest.mark.parametrize("tp", [1, 2])
def test_a_long_prefill_runs_in_chunks_with_the_same_tokens(monkeypatch, tp):
    """A prefill of more than `PREFILL_MLP_CHUNK_TOKENS` tokens (lowered to 64 here) runs its
    MLP chunk by chunk, and one longer than a query chunk (512) its attention chunk by chunk
    over blocks of keys (`PREFILL_KEY_BLOCK`, lowered to 128): a ragged batch's greedy tokens
    are those of full forwards (which do neither), on one device and under tensor
    parallelism."""
    from jaxdec.models import layers as L
    from jaxdec.pallas_kernels.tree_attention import blocked

    sizes, blocks = [], []
    chunk_tokens, walk = L.mlp_chunk_tokens, blocked.tree_attention_blocked
    monkeypatch.setattr(L, "PREFILL_MLP_CHUNK_TOKENS", 64)
    monkeypatch.setattr(L, "PREFILL_KEY_BLOCK", 128)
    monkeypatch.setattr(L, "mlp_chunk_tokens", lambda *a: sizes.append(chunk_tokens(*a)) or
                        sizes[-1])
    monkeypatch.setattr(blocked, "tree_attention_blocked",
                        lambda *a, **k: blocks.append(k.get("block")) or walk(*a, **k))
    # A config no other test compiles for (a program cached before the patch would not chunk).
    config = jaxdec.ModelConfig(vocab_size=101, hidden_size=32, intermediate_size=48,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    model = jaxdec.init_model(config, jax.random.PRNGKey(7), mesh=jaxdec.make_mesh(tp=tp),
                              std=0.3)
    prompts = _prompts((600, 45), seed=3)
    got = jaxdec.generate(model, prompts, max_new_tokens=5).to_lists()
    assert 64 in sizes and 128 in blocks  # the prefill's 2 x 1024 tokens
    for prompt, tokens in zip(prompts, got):
        row = list(prompt)
        for _ in range(5):
            row.append(int(jnp.argmax(jaxdec.forward(model, jnp.asarray([row]))[0, -1])))
        assert tokens == row[len(prompt):]
    # The same over a cached prefix (a PrefixCache's next turn of 600 tokens), the CPU's
    # blocked walk over the cache turned off (it takes long blocks of new tokens itself).
    monkeypatch.setattr(L, "BLOCKED_MIN_SLOTS", 10**9)
    session = jaxdec.PrefixCache(model, max_len=1024)
    session.generate(prompts[1], max_new_tokens=5)
    longer = session.tokens + got[1][-1:] + _prompts((600,), seed=4)[0]
    del blocks[:]
    continued = session.generate(longer, max_new_tokens=5)
    assert 128 in blocks  # the continued prefill walked its keys in blocks too
    np.testing.assert_array_equal(continued.tokens,
                                  jaxdec.generate(model, [longer], max_new_tokens=5).tokens)


def test_compile_only_on_an_abstract_model_then_the_real_call_compiles_nothing(loaded):
    """`abstract_model` + `compile_only`: the program compiles before the weights exist, and
    the loaded model's first call finds it (same config, dtype and mesh)."""
    model = loaded(VARIANT)
    abstract = jaxdec.abstract_model(model.config, dtype=jax.tree.leaves(model.params)[0].dtype)
    for real, shape in zip(jax.tree.leaves(model.params), jax.tree.leaves(abstract.params)):
        assert isinstance(shape, jax.ShapeDtypeStruct)
        assert (shape.shape, shape.dtype, shape.sharding) == (real.shape, real.dtype, real.sharding)
    prompts = _prompts((37, 20))  # a bucket (64) and a length no other test compiles
    settings = dict(max_new_tokens=11, sampler=jaxdec.Sampler(temperature=0.7, top_k=5),
                    key=jax.random.PRNGKey(3), return_timings=True)
    _compiles.clear()
    compiled = jaxdec.generate(abstract, prompts, compile_only=True, **settings)
    assert isinstance(compiled, jax.stages.Compiled) and "while" in compiled.as_text()
    assert _compiles  # it compiled...
    _compiles.clear()
    result = jaxdec.generate(model, _prompts((40, 33), seed=4), **settings)
    assert _compiles == [] and result.tokens.shape == (2, 11)  # ...once, for the real call
    with pytest.raises(ValueError, match="model's params are shapes only"):
        jaxdec.generate(abstract, prompts, max_new_tokens=4)
    with pytest.raises(ValueError, match="model's params are shapes only"):  # (jax's TypeError)
        jaxdec.forward(abstract, np.ones((1, 3), np.int32))
    with pytest.raises(ValueError, match="shapes only .* not be saved"):  # (an AttributeError)
        jaxdec.save_pretrained(abstract, "never-written")
    with pytest.raises(TypeError, match="compile_only must be a bool"):
        jaxdec.generate(model, prompts, max_new_tokens=4, compile_only="yes")
    with pytest.raises(TypeError, match="config must be a jaxdec ModelConfig"):
        jaxdec.abstract_model({"vocab_size": 8})


@pytest.mark.parametrize("call, error, match", [
    (lambda c: jaxdec.init_model({"vocab_size": 8}, jax.random.key(0)), TypeError,
     "config must be a jaxdec ModelConfig, got dict"),
    (lambda c: jaxdec.init_model(c, 0), TypeError, "key must be one PRNG key.*got int"),
    (lambda c: jaxdec.init_model(c, None), TypeError, "key must be one PRNG key.*got None"),
    (lambda c: jaxdec.init_model(c, jax.random.key(0), dtype=jnp.int32), ValueError,
     "dtype=int32 is not floating point"),
    (lambda c: jaxdec.init_model(c, jax.random.key(0), std=0.0), ValueError,
     "std must be a finite number > 0"),
    (lambda c: jaxdec.abstract_model(c, dtype="fp32"), TypeError, "dtype='fp32' is not a dtype"),
    (lambda c: jaxdec.load_pretrained(3), TypeError,
     r"path must be a str or os.PathLike \(a path\), got int"),
    (lambda c: dataclasses.replace(c, num_layers=2), ValueError,
     r"config.replace\(num_layers=...\) keeps a uniform window"),
    (lambda c: c.replace(eos_token_ids="2"), TypeError, "eos_token_ids must be token ids"),
])
def test_model_constructors_refuse_bad_arguments(call, error, match):
    """Refused before any program is traced."""
    config = jaxdec.ModelConfig(model_type="llama", vocab_size=32, hidden_size=16,
                                intermediate_size=32, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    with pytest.raises(error, match=match):
        call(config)


def test_abstract_model_on_a_tp_mesh_matches_the_sharded_params(hf_checkpoints):
    mesh = jaxdec.make_mesh(tp=2)
    model = jaxdec.load_pretrained(hf_checkpoints(VARIANT)[0], mesh=mesh)
    abstract = jaxdec.abstract_model(model.config, mesh=mesh)
    got = [(s.shape, s.dtype, s.sharding) for s in jax.tree.leaves(abstract.params)]
    assert got == [(p.shape, p.dtype, p.sharding) for p in jax.tree.leaves(model.params)]
    jaxdec.generate(abstract, _prompts((9, 4)), max_new_tokens=5, compile_only=True)
    _compiles.clear()
    jaxdec.generate(model, _prompts((11, 2), seed=6), max_new_tokens=5)
    assert _compiles == []


def test_a_cache_comes_back_in_the_form_given():
    """On a CPU the padded loops carry a bf16 cache as its bits (`as_bits`): a bits cache
    given (a caller's own loop carrying one) comes back as bits (it came back as bf16, so a
    loop around the call changed its carry's dtype), a bf16 one as bf16, the same values."""
    from jaxdec.cache import BF16_BITS, as_bits, as_floats
    from jaxdec.drafters import PromptLookup
    from jaxdec.speculative import speculative_padded

    config = jaxdec.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                                max_position_embeddings=128)
    model = jaxdec.init_model(config, jax.random.key(0), dtype=jnp.bfloat16, std=0.3)
    tokens = jnp.asarray([[5, 6, 5, 6, 5, 0, 0, 0], [7, 8, 7, 8, 0, 0, 0, 0]], jnp.int32)
    lengths = jnp.asarray([5, 4], jnp.int32)
    runs = {
        "generate_padded": lambda cache: jaxdec.generate_padded(
            model, tokens, lengths, cache, None, max_new_tokens=6),
        "speculative_padded": lambda cache: (lambda r: (r[0], r[2]))(speculative_padded(
            model, PromptLookup(), tokens, lengths, cache, None, None, max_new_tokens=6,
            sampler=None, topology=jaxdec.tree.chain(3))),
    }
    for name, run in runs.items():
        fresh = jaxdec.init_cache(config, 2, 24, dtype=jnp.bfloat16)
        (out_f, _), cache_f = run(fresh)
        (out_b, _), cache_b = run(as_bits(fresh))
        kv = lambda cache: {x.dtype for x in jax.tree.leaves(cache) if x.ndim > 1}  # noqa: E731
        assert kv(cache_f) == {jnp.dtype(jnp.bfloat16)} and kv(cache_b) == {jnp.dtype(BF16_BITS)}, name
        np.testing.assert_array_equal(out_b, out_f)
        for got, want in zip(jax.tree.leaves(as_floats(cache_b)), jax.tree.leaves(cache_f)):
            np.testing.assert_array_equal(np.asarray(got, np.float32),
                                          np.asarray(want, np.float32))
