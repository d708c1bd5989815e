"""speculative_generate end to end: greedy output identical to generate for every drafter and
tree, the target's cache identical to plain decoding's, sampled output following the target's
exact distribution (chi-square), tensor parallelism, and bad input."""

import dataclasses
import functools
import inspect
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import gammaincc

import jaxdec
from jaxdec import tree
from jaxdec.drafters import DraftModel, Drafter, PromptLookup, Proposal, Retrieval
from jaxdec.verify import ProposalKind
from program_deps import clocks_the_loop_waits_on, trace_program
from runenv import FAST_CPU_COMPILES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import counting_compiles  # noqa: E402

TARGET = "llama-gqa"
PROMPTS_SEED = 0


def _prompts(lengths=(3, 14, 9), seed=PROMPTS_SEED):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, 97, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def unrelated_draft(hf_checkpoints):
    """A different random model with the same vocabulary: most drafts get rejected."""
    return jaxdec.load_pretrained(hf_checkpoints("qwen2-mqa-tied")[0])


def _repetitive_prompts():
    base = [11, 12, 13, 14, 15, 16, 17, 18]
    return [base * 3, [40, 41, 42, 40, 41, 42, 40], base[:5] + [30, 31] + base]


DRAFTERS = {
    "self-chain4": (lambda m, u: DraftModel(m), tree.chain(4)),
    "self-kary": (lambda m, u: DraftModel(m), tree.kary(2, 2)),
    "self-choices": (lambda m, u: DraftModel(m),
                     tree.from_choices([[0], [1], [0, 0], [1, 0], [0, 0, 0], [0, 1]])),
    "unrelated-chain3": (lambda m, u: DraftModel(u), tree.chain(3)),
    "unrelated-kary": (lambda m, u: DraftModel(u), tree.kary(1, 4)),
    "prompt-lookup": (lambda m, u: PromptLookup(), None),
    "prompt-lookup-chain": (lambda m, u: PromptLookup(max_ngram=2), tree.chain(5)),
    # One candidate: chain proposals, committed without moving the cache.
    "prompt-lookup-one": (lambda m, u: PromptLookup(num_candidates=1), None),
    "retrieval": (lambda m, u: Retrieval(np.array(sum(_repetitive_prompts(), []) * 2)), None),
    "dynamic-self": (lambda m, u: DraftModel(m), tree.dynamic(3, 2, 8)),
    "dynamic-unrelated": (lambda m, u: DraftModel(u), tree.dynamic(2, 3)),
    "prompt-lookup-dynamic-budget": (lambda m, u: PromptLookup(), tree.dynamic(3, 2)),
}


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_greedy_is_token_identical_to_generate(name, loaded, unrelated_draft):
    model = loaded(TARGET)
    make, topology = DRAFTERS[name]
    prompts = _prompts() + _repetitive_prompts()
    plain = jaxdec.generate(model, prompts, max_new_tokens=20, return_logprobs=True)
    spec = jaxdec.speculative_generate(model, make(model, unrelated_draft), prompts,
                                       max_new_tokens=20, tree=topology, return_logprobs=True)
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    np.testing.assert_array_equal(spec.lengths, plain.lengths)
    # The target's log-probabilities where verification read its logits: decode's.
    np.testing.assert_allclose(spec.logprobs, plain.logprobs, rtol=1e-4, atol=1e-4)
    for result, names in ((plain, ("tokens", "lengths", "logprobs")),
                          (spec, ("tokens", "lengths", "logprobs")),
                          (spec.stats, ("acceptance_by_depth", "row_steps"))):
        # arrays of the result's own (they were read-only views of jax arrays)
        assert all(getattr(result, name).flags.writeable for name in names)
    stats = spec.stats
    assert stats.steps == stats.row_steps.max() and 1 <= stats.tau
    # tau: the tokens produced per step (a last step cut by max_new_tokens counts what it kept).
    assert stats.tau == pytest.approx(spec.lengths.sum() / stats.row_steps.sum())
    if name.startswith("self"):  # the target drafting for itself: every draft accepted
        depth = topology.max_depth
        np.testing.assert_allclose(stats.acceptance_by_depth, 1.0)
        # Every step but each row's last (20 tokens) emits depth + 1.
        np.testing.assert_array_equal(stats.row_steps, -(-20 // (depth + 1)))
    if name.startswith("unrelated"):
        assert stats.acceptance_by_depth[0] < 0.5
    if name == "dynamic-self":  # the draft's best first token outscores every drafted node
        np.testing.assert_allclose(stats.acceptance_by_depth[0], 1.0)
        assert stats.tau > 2


def test_retrieval_from_the_targets_own_text_pays_off(loaded):
    """A datastore holding the target's own continuations: retrieval drafts them back."""
    model = loaded(TARGET)
    prompts = _prompts()
    plain = jaxdec.generate(model, prompts, max_new_tokens=24)
    store = np.concatenate([np.array(p + o, np.int32) for p, o in zip(prompts, plain.to_lists())])
    spec = jaxdec.speculative_generate(model, Retrieval(store, min_ngram=2), prompts,
                                       max_new_tokens=24)
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    assert spec.stats.tau > 3


def test_stop_tokens_and_the_end_of_the_cache(loaded):
    model = loaded(TARGET)
    prompts = _prompts()
    free = jaxdec.generate(model, prompts, max_new_tokens=16)
    stops = [[int(free.tokens[0, 5])], [], [int(free.tokens[2, 2]), int(free.tokens[2, 9])]]
    plain = jaxdec.generate(model, prompts, max_new_tokens=16, stop_tokens=stops, pad_id=-1)
    # The tightest cache: the longest row fills it exactly, so its last trees are cut short.
    tight = max(len(p) for p in prompts) + 16 - 1
    spec = jaxdec.speculative_generate(model, DraftModel(model), prompts, max_new_tokens=16,
                                       stop_tokens=stops, pad_id=-1, tree=tree.chain(6),
                                       max_len=tight)
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    np.testing.assert_array_equal(spec.lengths, plain.lengths)
    assert spec.lengths[1] == 16 and spec.lengths[0] < 16


def test_acceptance_counts_only_the_drafts_kept(loaded):
    """The target drafting for itself accepts every draft; drafts that max_new_tokens or a
    stop token cut off do not count (they did: [1, 1, 1, 1] where two tokens were kept)."""
    model = loaded(TARGET)
    prompt = _prompts(lengths=(6,))
    spec = jaxdec.speculative_generate(model, DraftModel(model), prompt, max_new_tokens=2,
                                       tree=tree.chain(4))
    assert spec.stats.tau == 2.0
    np.testing.assert_array_equal(spec.stats.acceptance_by_depth, [1, 1, 0, 0])
    first = int(jaxdec.generate(model, prompt, max_new_tokens=1).tokens[0, 0])
    spec = jaxdec.speculative_generate(model, DraftModel(model), prompt, max_new_tokens=8,
                                       tree=tree.chain(4), stop_tokens=[first])
    assert spec.stats.tau == 1.0
    np.testing.assert_array_equal(spec.stats.acceptance_by_depth, [1, 0, 0, 0])


def _random_choices(rs, nodes: int, max_depth: int = 4) -> list[list[int]]:
    """A random Medusa-style tree: each node the next child of a node drawn at random."""
    paths, children = [()], {(): 0}
    while len(paths) <= nodes:
        parent = paths[rs.randint(len(paths))]
        if len(parent) < max_depth:
            child = parent + (children[parent],)
            children[parent] += 1
            children[child] = 0
            paths.append(child)
    return [list(p) for p in paths[1:]]


@pytest.mark.parametrize("seed", range(4))
def test_drawn_trees_batches_and_stops_match_generate(seed, loaded, unrelated_draft):
    """Drawn settings: a random tree, 1 to 3 ragged prompts of 1 to 16 tokens, stop tokens
    for some rows, the tightest cache or the default, a self-drafting, unrelated or
    prompt-lookup drafter: the same tokens as generate."""
    rs = np.random.RandomState(100 + seed)
    model = loaded(TARGET)
    prompts = [rs.randint(3, 97, rs.randint(1, 17)).tolist() for _ in range(rs.randint(1, 4))]
    topology = tree.from_choices(_random_choices(rs, rs.randint(1, 10)))
    max_new = int(rs.randint(4, 20))
    free = jaxdec.generate(model, prompts, max_new_tokens=max_new)
    stops = [[int(row[rs.randint(max_new)])] if rs.rand() < 0.6 else [] for row in free.tokens]
    max_len = max(map(len, prompts)) + max_new - 1 if seed % 2 else None
    drafter = [DraftModel(model), DraftModel(unrelated_draft), PromptLookup(num_candidates=2),
               DraftModel(unrelated_draft, proposal="topk")][seed]
    plain = jaxdec.generate(model, prompts, max_new_tokens=max_new, stop_tokens=stops,
                            max_len=max_len)
    spec = jaxdec.speculative_generate(model, drafter, prompts, max_new_tokens=max_new,
                                       stop_tokens=stops, tree=topology, max_len=max_len)
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    np.testing.assert_array_equal(spec.lengths, plain.lengths)


def test_streaming_callback_sees_each_steps_new_tokens(loaded, unrelated_draft):
    """stream(step, tokens [B, D + 1], counts [B]) once a step, in order: each row's pieces
    add up to its output, rows stop at their stop token, pad_id fills the rest."""
    model = loaded(TARGET)
    prompts = _prompts()
    free = jaxdec.generate(model, prompts, max_new_tokens=16)
    stops = [[int(free.tokens[0, 5])], [], []]
    seen = []
    result = jaxdec.speculative_generate(
        model, DraftModel(unrelated_draft), prompts, max_new_tokens=16, stop_tokens=stops,
        pad_id=-1, tree=tree.kary(2, 2),
        stream=lambda step, tokens, counts: seen.append((int(step), tokens, counts)))
    assert [step for step, *_ in seen] == list(range(result.stats.steps))
    pieces = [[] for _ in prompts]
    for _, tokens, counts in seen:
        assert isinstance(tokens, np.ndarray) and tokens.shape == (3, 3) and counts.shape == (3,)
        for b, n in enumerate(counts):
            assert 0 <= n <= 3 and (tokens[b, n:] == -1).all()
            if len(pieces[b]) == result.lengths[b]:
                assert n == 0  # a row that has stopped gets nothing more
            pieces[b] += tokens[b, :n].tolist()
    assert pieces == result.to_lists()
    assert result.lengths[0] < 16 and pieces[0][-1] == stops[0][0]
    assert any(n > 1 for *_, counts in seen for n in counts)  # some drafts were accepted
    # Another function streams the next call, with the same compiled program.
    again = []
    with counting_compiles() as compiles:
        jaxdec.speculative_generate(
            model, DraftModel(unrelated_draft), prompts, max_new_tokens=16, stop_tokens=stops,
            pad_id=-1, tree=tree.kary(2, 2),
            stream=lambda step, tokens, counts: again.append(int(counts.sum())))
    assert compiles[0] == 0 and sum(again) == result.lengths.sum()


def test_rows_filling_a_dp_batch_never_keep_the_loop_running(hf_checkpoints):
    """On a dp = 2 mesh one prompt runs as 2 rows, the second a copy: sampled, it drew its
    own tokens and could run on after the real row stopped (steps counted, streams called
    with nothing to stream). Now it starts stopped: the loops end with the real row."""
    model = jaxdec.load_pretrained(hf_checkpoints(TARGET)[0], mesh=jaxdec.make_mesh(dp=2))
    sampled = dict(sampler=jaxdec.Sampler(temperature=1.0), stop_tokens=list(range(3, 40)),
                   max_new_tokens=24)
    for seed in range(3):
        key = jax.random.PRNGKey(seed)
        active = []
        jaxdec.generate(model, [[5, 9, 2]], key=key,
                        stream=lambda step, tokens, live: active.append(bool(live.any())),
                        **sampled)
        assert all(active), active
        spec = jaxdec.speculative_generate(model, DraftModel(model), [[5, 9, 2]], key=key,
                                           tree=tree.chain(2), **sampled)
        assert spec.stats.steps == spec.stats.row_steps[0]


@pytest.mark.parametrize("partitionable", [True, False], ids=["", "threefry-unpartitionable"])
@pytest.mark.parametrize("topology", [tree.chain(3), tree.kary(2, 2)], ids=["iid", "wr"])
def test_a_sampled_row_is_the_same_in_any_batch(hf_checkpoints, topology, partitionable):
    """A row's sampled tokens depend on the key and the row, as generate's do: not on the rows
    beside it or the rows a mesh's dp adds (verification's numbers were drawn batch-last;
    with jax_threefry_partitionable off, the draft's children, the bonus tokens and
    deterministic drafts' draws still were, from keys split batch-wide)."""
    with jax.threefry_partitionable(partitionable):
        _same_row_in_any_batch(hf_checkpoints, topology)


def _same_row_in_any_batch(hf_checkpoints, topology):
    path = hf_checkpoints(TARGET)[0]
    prompts = _prompts()
    sampled = dict(sampler=jaxdec.Sampler(temperature=1.0), key=jax.random.PRNGKey(7),
                   max_new_tokens=24, tree=topology)
    runs = []
    for mesh, rows in ((None, prompts[:1]), (None, prompts), (jaxdec.make_mesh(dp=2),
                                                              prompts[:1])):
        model = jaxdec.load_pretrained(path, mesh=mesh)
        # A draft near the target: acceptance turns on verification's random numbers.
        near = dataclasses.replace(model, params=jax.tree.map(lambda x: x * 0.8, model.params))
        runs.append(jaxdec.speculative_generate(model, DraftModel(near), rows,
                                                **sampled).tokens[0])
    np.testing.assert_array_equal(runs[1], runs[0])
    np.testing.assert_array_equal(runs[2], runs[0])


def test_streaming_sees_only_the_callers_rows(hf_checkpoints):
    """On a dp = 2 mesh 3 prompts run as 4 rows; both loops' streams see the 3. A stream's
    exception reaches the caller as itself."""
    model = jaxdec.load_pretrained(hf_checkpoints(TARGET)[0], mesh=jaxdec.make_mesh(dp=2))
    prompts = _prompts()
    shapes = []
    plain = jaxdec.generate(model, prompts, max_new_tokens=4,
                            stream=lambda step, tokens, active: shapes.append(tokens.shape))
    assert set(shapes) == {(3,)}
    shapes.clear()
    spec = jaxdec.speculative_generate(
        model, PromptLookup(), prompts, max_new_tokens=4,
        stream=lambda step, tokens, counts: shapes.append((tokens.shape, counts.shape)))
    assert set(shapes) == {((3, 7), (3,))}
    np.testing.assert_array_equal(spec.tokens, plain.tokens)

    def fails(step, tokens, counts):   # on the mesh's devices, callbacks may interleave
        raise LookupError(f"step {step}")

    with pytest.raises(LookupError, match="step"):
        jaxdec.speculative_generate(model, PromptLookup(), prompts, max_new_tokens=4,
                                    stream=fails)


@pytest.mark.parametrize("name", ["self-chain", "unrelated-tree", "lookup"])
def test_a_single_row_reaches_the_end_of_the_cache(name, loaded, unrelated_draft):
    """One row (its cache writes are in-place windows, not a batch's scatter) in the tightest
    cache: the last trees write past its end, and prompt lookup's tree (19 nodes) is larger
    than the whole cache of the 3-token prompt (18 slots)."""
    model = loaded(TARGET)
    drafter, topology = {
        "self-chain": (DraftModel(model), tree.chain(6)),
        "unrelated-tree": (DraftModel(unrelated_draft), tree.kary(2, 2)),
        "lookup": (PromptLookup(), None),
    }[name]
    for prompt in (_prompts()[0], _repetitive_prompts()[1]):
        plain = jaxdec.generate(model, [prompt], max_new_tokens=16)
        spec = jaxdec.speculative_generate(model, drafter, [prompt], max_new_tokens=16,
                                           tree=topology, max_len=len(prompt) + 16 - 1)
        np.testing.assert_array_equal(spec.tokens, plain.tokens)


@pytest.mark.parametrize("topology", [tree.chain(4), tree.kary(2, 2)], ids=["chain", "tree"])
def test_a_sliding_window_model_drafting_for_itself(loaded, topology):
    """Mistral with a window (6) much shorter than the sequences, as its own draft: the draft's
    levels and the verification see exactly the keys plain decoding sees (every draft is
    accepted, the tokens are the same), for a batch (with a 1-token prompt) and a single row."""
    model = loaded("mistral-window")
    prompts = _prompts(lengths=(3, 14, 1))
    plain = jaxdec.generate(model, prompts, max_new_tokens=20)
    for rows in (slice(None), slice(1, 2)):
        spec = jaxdec.speculative_generate(model, DraftModel(model), prompts[rows],
                                           max_new_tokens=20, tree=topology)
        np.testing.assert_array_equal(spec.tokens, plain.tokens[rows])
        np.testing.assert_allclose(spec.stats.acceptance_by_depth, 1.0)


@pytest.mark.parametrize("topology", [tree.kary(2, 2), tree.chain(3)], ids=["tree", "chain"])
def test_target_cache_equals_plain_decoding(loaded, topology):
    """The tree as the target's own draft (every node accepted); the chain with an unrelated
    random draft (mostly rejected: the kept prefix stays where the forward wrote it)."""
    from jaxdec.generate import prepare_batch
    from jaxdec.speculative import speculative_padded

    model = loaded(TARGET)
    prompts = _prompts()
    batch = prepare_batch(model, prompts, max_new_tokens=12, stop_tokens=(), pad_id=0,
                          max_len=48)
    key = jax.random.PRNGKey(0)

    plain_run = jax.jit(functools.partial(jaxdec.generate_padded, max_new_tokens=12))
    (plain_out, plain_n), plain_cache = plain_run(
        model, batch.tokens, batch.lengths, jaxdec.init_cache(model.config, 3, 48), key, batch.stop)
    spec_run = jax.jit(functools.partial(
        speculative_padded, max_new_tokens=12, sampler=jaxdec.Greedy(), topology=topology))
    draft = model if not topology.is_chain else jaxdec.init_model(
        model.config.replace(num_layers=1), jax.random.PRNGKey(5))
    drafter = DraftModel(draft).prepare(model)
    (spec_out, spec_n), stats, spec_cache, _, _ = spec_run(
        model, drafter, batch.tokens, batch.lengths, jaxdec.init_cache(model.config, 3, 48), key,
        batch.stop)
    # Self-drafted (depth 2): 3 tokens a step, 12 in 4; the random draft's rejections: more.
    assert (int(stats["steps"]) > 4) == topology.is_chain
    np.testing.assert_array_equal(spec_out, plain_out)
    np.testing.assert_array_equal(spec_cache.lengths, plain_cache.lengths)
    np.testing.assert_array_equal(plain_cache.lengths, batch.lengths + 11)
    for got, want in zip(spec_cache.layers, plain_cache.layers):
        for b, n in enumerate(np.asarray(plain_cache.lengths)):
            np.testing.assert_allclose(got.k[b, :n], want.k[b, :n], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got.v[b, :n], want.v[b, :n], rtol=1e-5, atol=1e-5)
    if topology.is_chain:
        return
    # As generate_padded: no stop ids as None, and a cache without room for the prompt block
    # and the new tokens refused (its last tokens came out wrong); exactly that room suffices
    # (the tree's nodes past the end are never accepted).
    width = batch.tokens.shape[1]
    (tight_out, _), *_ = spec_run(model, drafter, batch.tokens, batch.lengths,
                                  jaxdec.init_cache(model.config, 3, width + 11), key, None)
    np.testing.assert_array_equal(tight_out, plain_out)
    with pytest.raises(ValueError, match=f"the cache's {width + 10} slots hold no prompt block "
                       f"of {width} tokens and 12 new tokens: it needs max_len >= {width + 11}"):
        spec_run(model, drafter, batch.tokens, batch.lengths,
                 jaxdec.init_cache(model.config, 3, width + 10), key, batch.stop)
    # Called eagerly: generate_padded's checks of the values (a length of 0 and an id past
    # the vocabulary ran and returned tokens), greedy without a key, one compiled program.
    def eager(tokens=batch.tokens, lengths=batch.lengths, **settings):
        return speculative_padded(
            model, drafter, tokens, lengths, jaxdec.init_cache(model.config, 3, 48), None,
            batch.stop, **{"max_new_tokens": 12, "sampler": None, "topology": topology,
                           **settings})

    with pytest.raises(ValueError, match=r"prompt_lengths_B must be in \[1, "):
        eager(lengths=np.where(np.arange(3) == 0, 0, batch.lengths))
    with pytest.raises(ValueError, match=r"tokens_BT has ids outside \[0, 97\)"):
        eager(tokens=jnp.asarray(batch.tokens).at[0, 0].set(999))
    with pytest.raises(TypeError, match="topology must be a jaxdec.tree Topology"):
        eager(topology=[[0], [1]])
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 0"):
        eager(max_new_tokens=0)
    with pytest.raises(ValueError, match="key is needed to sample"):
        eager(sampler=jaxdec.Sampler(temperature=1.0))
    np.testing.assert_array_equal(eager()[0][0], plain_out)
    with counting_compiles() as compiles:
        np.testing.assert_array_equal(eager()[0][0], plain_out)
    assert compiles[0] == 0


# ------------------------------------------------------------------- lossless sampling

V = 8
SMALL = jaxdec.ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
PROMPT = [1, 5, 2, 7, 1, 5]
ROWS = 20_000


@pytest.fixture(scope="module")
def small_models():
    # Random models; the draft's seed is one whose proposals the target accepts at depth 0 in
    # every case below (0.2 to 0.5 of the time), so the tests see accepted drafts as well as
    # rejected ones. (Some seeds give a top-k proposal the target's top-p never accepts.)
    target = jaxdec.init_model(SMALL, jax.random.PRNGKey(0), std=0.5)
    draft = jaxdec.init_model(SMALL.replace(num_layers=1), jax.random.PRNGKey(2), std=0.5)
    return target, draft


@pytest.fixture
def optimized_program(monkeypatch):
    """The 20k-row sampling tests compute far more than they compile, so their speculative
    program compiles with XLA's default LLVM optimizations (as a user's does; the suite's quick
    flags turn them off, runenv.py): the same traced program, in half the time."""
    from jaxdec import speculative

    program = speculative._program.__wrapped__
    static = [name for name, p in inspect.signature(program).parameters.items()
              if p.kind is p.KEYWORD_ONLY]  # the settings, static in the library's jit
    monkeypatch.setattr(speculative, "_program", jax.jit(
        program, static_argnames=static, donate_argnames=("cache", "drafter_state"),
        compiler_options={"xla_backend_optimization_level": 2}))


def _exact_joint(target, sampler):
    p1 = np.asarray(sampler.probs(jaxdec.forward(target, np.array([PROMPT]))[0, -1]), np.float64)
    nxt = np.array([PROMPT + [t] for t in range(V)])
    p2 = np.asarray(sampler.probs(jaxdec.forward(target, nxt)[:, -1]), np.float64)
    return (p1[:, None] * p2).ravel()


def _p_value(tokens, joint):
    counts = np.bincount(tokens[:, 0] * V + tokens[:, 1], minlength=V * V).astype(np.float64)
    assert counts[joint == 0].sum() == 0, "sampled a pair the target never produces"
    expected = len(tokens) * joint
    keep = expected >= 5
    stat = np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep])
    return float(gammaincc((keep.sum() - 1) / 2, stat / 2))


SAMPLED = {
    "chain-iid": ("auto", tree.chain(3), jaxdec.Sampler(temperature=1.3)),
    "tree-iid": ("iid", tree.kary(2, 2), jaxdec.Sampler(temperature=0.9, top_p=0.8)),
    "tree-without-replacement": ("auto", tree.kary(2, 2), jaxdec.Sampler(temperature=1.3)),
    "chain-without-replacement-top-p": ("without_replacement", tree.chain(3),
                                        jaxdec.Sampler(temperature=0.9, top_p=0.8)),
    "topk-deterministic": ("topk", tree.kary(2, 2), jaxdec.Sampler(temperature=0.9, top_p=0.8)),
    "dynamic": ("auto", tree.dynamic(2, 2, 6), jaxdec.Sampler(temperature=0.9, top_p=0.8)),
}


@pytest.mark.parametrize("name", list(SAMPLED))
def test_sampling_follows_the_target_distribution(name, small_models, optimized_program):
    target, draft = small_models
    proposal, topology, sampler = SAMPLED[name]
    result = jaxdec.speculative_generate(
        target, DraftModel(draft, proposal=proposal), [PROMPT] * ROWS, max_new_tokens=2,
        sampler=sampler, tree=topology, key=jax.random.PRNGKey(3))
    assert _p_value(result.tokens, _exact_joint(target, sampler)) > 1e-3
    assert result.stats.acceptance_by_depth[0] > 0.02  # accepted drafts are exercised too


@pytest.mark.parametrize("name", ["prompt-lookup", "retrieval"])
def test_training_free_drafts_sampling_follows_the_target_distribution(name, small_models,
                                                                       optimized_program):
    """Deterministic drafts (copied n-gram continuations) under sampling."""
    target, _ = small_models
    sampler = jaxdec.Sampler(temperature=1.3)
    # Depth 3 (the first two tokens are tested): the default depth's 19-node trie verified for
    # 20k rows doubled the test's time and tested nothing more.
    drafter = PromptLookup(max_ngram=2, depth=3) if name == "prompt-lookup" else Retrieval(
        np.random.RandomState(0).randint(0, V, 400), max_ngram=2, depth=3, num_candidates=3)
    result = jaxdec.speculative_generate(target, drafter, [PROMPT] * ROWS, max_new_tokens=2,
                                         sampler=sampler, key=jax.random.PRNGKey(4))
    assert _p_value(result.tokens, _exact_joint(target, sampler)) > 1e-3
    assert result.stats.acceptance_by_depth[0] > 0.005  # some of the 20k rows accept a draft


def test_a_wrong_verifier_fails_the_same_test(small_models, optimized_program, monkeypatch):
    from jaxdec import verify

    target, draft = small_models
    sampler = jaxdec.Sampler(temperature=1.3)
    monkeypatch.setattr(verify, "_residual", lambda r, q: r)  # bonus from p, not the residual
    jax.clear_caches()
    try:
        result = jaxdec.speculative_generate(
            target, DraftModel(draft), [PROMPT] * ROWS, max_new_tokens=2, sampler=sampler,
            tree=tree.chain(3), key=jax.random.PRNGKey(3))
    finally:
        jax.clear_caches()
    assert _p_value(result.tokens, _exact_joint(target, sampler)) < 1e-6


# ----------------------------------------------------------------- tensor parallelism


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_greedy_matches_tp1(tp, hf_checkpoints, loaded):
    reference = loaded(TARGET)
    prompts = _prompts() + _repetitive_prompts()[:1]
    expected = jaxdec.generate(reference, prompts, max_new_tokens=12).tokens
    model = jaxdec.load_pretrained(hf_checkpoints(TARGET)[0], mesh=jaxdec.make_mesh(tp=tp))
    for drafter, topology in ((DraftModel(reference), tree.kary(2, 2)),
                              (DraftModel(reference), tree.chain(3)), (PromptLookup(), None)):
        got = jaxdec.speculative_generate(model, drafter, prompts, max_new_tokens=12,
                                          tree=topology)
        np.testing.assert_array_equal(got.tokens, expected)


def test_tensor_parallel_sampling_matches_tp1(hf_checkpoints, loaded):
    """Sampling too: the random draws do not depend on the sharding, so with one key tp = 4
    (vocabulary-parallel logits, KV heads repeated) gives tp = 1's tokens, for a sampled tree
    (drafts without replacement) and for deterministic drafts."""
    reference = loaded(TARGET)
    model = jaxdec.load_pretrained(hf_checkpoints(TARGET)[0], mesh=jaxdec.make_mesh(tp=4))
    prompts = _prompts() + _repetitive_prompts()[:1]
    settings = dict(max_new_tokens=12, sampler=jaxdec.Sampler(temperature=0.9, top_p=0.9),
                    key=jax.random.key(3))
    for drafter, topology in ((DraftModel(reference), tree.kary(2, 2)), (PromptLookup(), None)):
        expected = jaxdec.speculative_generate(reference, drafter, prompts, tree=topology,
                                               **settings).tokens
        got = jaxdec.speculative_generate(model, drafter, prompts, tree=topology, **settings)
        np.testing.assert_array_equal(got.tokens, expected)


def test_sampled_logprobs_are_the_targets(loaded):
    """Sampling (tokens unlike plain decoding's): each token's logprob is log_softmax of the
    target's full forward over the row so far, at the token; 0 after the row's end."""
    model = loaded(TARGET)
    prompts = _prompts((3, 14))
    spec = jaxdec.speculative_generate(
        model, DraftModel(model), prompts, max_new_tokens=9, tree=tree.chain(3),
        sampler=jaxdec.Sampler(temperature=0.8, top_k=20), key=jax.random.PRNGKey(4),
        return_logprobs=True, stop_tokens=[int(t) for t in range(3, 40)])
    assert spec.lengths.min() < 9  # a row stopped
    for prompt, tokens, logprobs, n in zip(prompts, spec.tokens, spec.logprobs, spec.lengths):
        row = prompt + tokens[:n].tolist()
        table = jax.nn.log_softmax(jaxdec.forward(model, jnp.asarray([row]))[0], axis=-1)
        want = [table[len(prompt) - 1 + i, t] for i, t in enumerate(tokens[:n])]
        np.testing.assert_allclose(logprobs[:n], want, rtol=1e-4, atol=1e-4)
        assert (logprobs[n:] == 0).all()


def test_timings(loaded):
    model = loaded(TARGET)
    result = jaxdec.speculative_generate(model, DraftModel(model), _prompts(), max_new_tokens=8,
                                         tree=tree.chain(2), return_timings=True)
    assert result.prefill_s > 0 and result.decode_s > 0 and result.decode_tokens_per_s > 0
    assert result.stats.draft_s is None
    profiled = jaxdec.speculative_generate(model, DraftModel(model), _prompts(), max_new_tokens=8,
                                           tree=tree.chain(2), profile=True)
    assert profiled.stats.draft_s > 0 and profiled.stats.verify_s > 0
    np.testing.assert_array_equal(profiled.tokens, result.tokens)


def test_the_loop_waits_on_the_timing_clocks(loaded):
    """As in plain generate: the clock after the prefills is an input of the loop."""
    model = loaded(TARGET)
    jaxpr = trace_program("jaxdec.speculative", lambda: jaxdec.speculative_generate(
        model, DraftModel(model), _prompts(), max_new_tokens=8, tree=tree.chain(2),
        return_timings=True, compile_only=True))
    assert clocks_the_loop_waits_on(jaxpr) == (2, 2)


# -------------------------------------------------------------------------- bad input


def test_typed_and_raw_keys_draw_the_same_tokens(loaded):
    """`jax.random.key(seed)` (a typed key) and `jax.random.PRNGKey(seed)` (its raw data) are
    one key: the same tokens, through deterministic proposals' verification and recursive
    rejection sampling, from one compiled program; a batch of keys is refused."""
    model = loaded(TARGET)
    sampler = jaxdec.Sampler(temperature=1.0)
    for drafter in (PromptLookup(), DraftModel(model)):
        raw = jaxdec.speculative_generate(model, drafter, _prompts(), max_new_tokens=6,
                                          sampler=sampler, key=jax.random.PRNGKey(4)).tokens
        with counting_compiles() as compiles:
            typed = jaxdec.speculative_generate(model, drafter, _prompts(), max_new_tokens=6,
                                                sampler=sampler, key=jax.random.key(4)).tokens
        np.testing.assert_array_equal(raw, typed)
        assert compiles[0] == 0
    with pytest.raises(TypeError, match="key must be one PRNG key"):
        jaxdec.speculative_generate(model, PromptLookup(), _prompts(), max_new_tokens=4,
                                    key=jax.random.split(jax.random.key(0), 2))


def test_a_draft_models_default_tree_is_no_part_of_the_program(loaded):
    """Drafters that differ only in a default tree the call replaces share one compiled
    program (it was static data of the drafter: a compile each); a tree built by hand with
    list fields works as the default too (it failed in jit: unhashable)."""
    model = loaded(TARGET)
    run = functools.partial(jaxdec.speculative_generate, model, prompts=_prompts(),
                            max_new_tokens=5, tree=tree.chain(3))
    want = run(DraftModel(model)).tokens
    with counting_compiles() as compiles:
        for default in (tree.kary(2, 2), tree.chain(5)):
            np.testing.assert_array_equal(run(DraftModel(model, tree=default)).tokens, want)
    assert compiles[0] == 0
    by_hand = tree.Topology(parents=[-1, 0, 1, 2], ranks=[0, 0, 0, 0])
    np.testing.assert_array_equal(jaxdec.speculative_generate(
        model, DraftModel(model, tree=by_hand), _prompts(), max_new_tokens=5).tokens, want)


def _every_entry_point(model):
    """Tokens of generate and speculative_generate in the paths a JAX mode can break."""
    sampler = jaxdec.Sampler(temperature=1.0)
    store = Retrieval(np.array(sum(_prompts(), []) * 2))
    return [jaxdec.generate(model, _prompts(), max_new_tokens=6, sampler=sampler).tokens,
            # one row: the cache's single-row write (a dynamic_update_slice)
            jaxdec.generate(model, _prompts()[:1], max_new_tokens=6).tokens,
            jaxdec.speculative_generate(model, PromptLookup(), _prompts(),
                                        max_new_tokens=6, profile=True).tokens,
            jaxdec.speculative_generate(model, store, _prompts(), max_new_tokens=6).tokens,
            # a tree: Gumbel-top-k children, recursive rejection sampling over siblings
            jaxdec.speculative_generate(model, DraftModel(model), _prompts(), max_new_tokens=6,
                                        sampler=sampler, tree=tree.kary(2, 2)).tokens]


@pytest.fixture(scope="module")
def default_mode_tokens(loaded):
    return _every_entry_point(loaded(TARGET))


@pytest.mark.parametrize("mode", ["x64", "x64+strict"])
def test_user_jax_modes_give_the_same_tokens(loaded, default_mode_tokens, mode):
    """A user's choice of JAX modes for their own code: with `jax_enable_x64` on, the loops'
    integer bookkeeping stays int32 (a while loop's carry may not change type) and the random
    draws float32; with strict dtype promotion as well, no operation mixes types implicitly
    (strict alone is the weaker check: without x64, an unspecified index vector or draw is
    already int32 / float32). The tokens are the default mode's."""
    with jax.enable_x64(True), jax.numpy_dtype_promotion(
            "strict" if mode == "x64+strict" else "standard"):
        other = _every_entry_point(loaded(TARGET))
    for a, b in zip(default_mode_tokens, other, strict=True):
        np.testing.assert_array_equal(a, b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _RepeatRoot(Drafter):
    """A drafter of one's own, the smallest: a chain of copies of the latest token (runs of
    one token). `mistake` (static) makes it break one rule of the interface."""

    offset: jax.Array  # a leaf, so the drafter is a pytree with data
    mistake: str = dataclasses.field(default="", metadata=dict(static=True))

    def default_topology(self):
        return tree.chain(3)

    def init(self, tokens_BT, prompt_lengths_B, *, max_len):
        if self.mistake == "str_state":
            return {"steps": jnp.zeros(tokens_BT.shape[:1], jnp.int32), "note": "hello"}
        if self.mistake == "empty":  # (no mistake: a buffer of no columns yet, a number)
            return {"steps": jnp.zeros(tokens_BT.shape[:1], jnp.int32),
                    "buffer": jnp.zeros((tokens_BT.shape[0], 0), jnp.int32), "scale": 1.0}
        return {"steps": jnp.zeros(tokens_BT.shape[:1], jnp.int32)}

    def propose(self, state, root_B, lengths_B, key, *, topology, sampler):
        B, D = root_B.shape[0], topology.max_depth
        cand = jnp.broadcast_to(root_B[:, None, None] + self.offset, (B, 1, D))
        drafted = tree.from_candidates(root_B, cand, jnp.ones((B, 1, D), bool),
                                       topology.num_nodes)
        if self.mistake == "shape":
            drafted = dataclasses.replace(drafted, tokens=drafted.tokens[:, :-1])
        if self.mistake == "float":
            drafted = dataclasses.replace(drafted, tokens=drafted.tokens.astype(jnp.float32))
        if self.mistake == "int16":  # (x64 makes jnp's default ints int64: the same case)
            drafted = dataclasses.replace(drafted, tokens=drafted.tokens.astype(jnp.int16))
        if self.mistake == "numpy":  # a fixed tree of numpy arrays: a chain of zeros
            N = D + 1
            drafted = tree.TokenTree(
                tokens=np.zeros((B, N), np.int32),
                parents=np.tile(np.arange(N, dtype=np.int32) - 1, (B, 1)),
                depth=np.tile(np.arange(N, dtype=np.int32), (B, 1)),
                valid=np.ones((B, N), bool), ancestors=np.tile(np.tri(N, dtype=bool), (B, 1, 1)))
        if self.mistake == "dict":
            drafted = dataclasses.asdict(drafted)
        kind = {"kind": ProposalKind.IID, "kind_value": "deterministic",
                "kind_name": "DETERMINISTIC"}.get(self.mistake, ProposalKind.DETERMINISTIC)
        proposal = Proposal(tree=drafted, q=None, kind=kind, chain=True)
        if self.mistake == "tuple":
            return proposal
        if self.mistake == "state":
            return proposal, {"steps": state["steps"].astype(jnp.float32)}
        return proposal, {**state, "steps": state["steps"] + 1}

    def update(self, state, proposal, verdict, n_commit_B, emitted_BL):
        return {} if self.mistake == "update" else state

    def prepare(self, target):
        return None if self.mistake == "prepare" else self

    def held_length(self, state):
        return jnp.min(state["steps"]) if self.mistake == "held" else None


def test_a_drafter_of_your_own(loaded):
    """The Drafter interface from outside the library: exact output, and a clear error for
    each rule a drafter's methods break (while the loop traces)."""
    model = loaded(TARGET)
    prompts = _prompts()
    plain = jaxdec.generate(model, prompts, max_new_tokens=12)
    for offset in (0, 1):
        out = jaxdec.speculative_generate(model, _RepeatRoot(jnp.int32(offset)), prompts,
                                          max_new_tokens=12)
        np.testing.assert_array_equal(out.tokens, plain.tokens)
    # Ids of another integer width are taken (the loop's carry refused them), and a kind
    # given by its value (the error read "a deterministic proposal where its proposal_kind
    # said ProposalKind.DETERMINISTIC").
    for fine in ("int16", "kind_value", "numpy"):
        out = jaxdec.speculative_generate(model, _RepeatRoot(jnp.int32(0), fine), prompts,
                                          max_new_tokens=12)
        np.testing.assert_array_equal(out.tokens, plain.tokens)
    # A state array of no elements and a number, timed and profiled (the clocks' wait on one
    # element of each array indexed past its end, and read a number's size).
    out = jaxdec.speculative_generate(model, _RepeatRoot(jnp.int32(0), "empty"), prompts,
                                      max_new_tokens=12, return_timings=True, profile=True)
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    for mistake, error, match in [
        ("tuple", TypeError, r"_RepeatRoot.propose must return \(Proposal, state\)"),
        ("shape", ValueError, r"tree.tokens has shape \(3, 3\), expected \(3, 4\)"),
        ("float", TypeError, r"_RepeatRoot.propose: tree.tokens is float32, expected integers"),
        ("kind", ValueError, "returned a ProposalKind.IID proposal where its proposal_kind"),
        ("state", TypeError, r"_RepeatRoot.propose returned a state unlike init's.*float32"),
        ("update", TypeError, r"_RepeatRoot.update returned a state unlike init's"),
        ("kind_name", ValueError, r"_RepeatRoot.propose's Proposal.kind must be a ProposalKind"),
        ("dict", TypeError, r"_RepeatRoot.propose: Proposal.tree must be a jaxdec.tree.TokenTree"
                            r" \(from from_candidates, or a topology's template\), got dict"),
        # (the while loop said "Argument 'hello' of type str is not a valid JAX type")
        ("str_state", TypeError, r"_RepeatRoot.init returned a state the loop cannot carry: its "
                                 r"leaf \['note'\] is a str"),
    ]:
        with pytest.raises(error, match=match):
            jaxdec.speculative_generate(model, _RepeatRoot(jnp.int32(0), mistake), prompts,
                                        max_new_tokens=4)
    # A prepare that returns nothing (a PrefixCache decoded plainly, without the drafter)
    with pytest.raises(TypeError, match="_RepeatRoot.prepare must return the drafter to run"):
        jaxdec.speculative_generate(model, _RepeatRoot(jnp.int32(0), "prepare"), prompts,
                                    max_new_tokens=4)
    with pytest.raises(TypeError, match="_RepeatRoot.prepare must return the drafter to run"):
        jaxdec.PrefixCache(model, 64, drafter=_RepeatRoot(jnp.int32(0), "prepare"))
    # A held_length of another shape than [rows] is named (its next call failed indexing an
    # int, and every call after it), each call's.
    session = jaxdec.PrefixCache(model, 64, drafter=_RepeatRoot(jnp.int32(0), "held"))
    for _ in range(2):
        with pytest.raises(TypeError, match=r"_RepeatRoot.held_length must return int \[rows\] "
                                            r"= \[1\] .*got int32 \[\]"):
            session.generate(prompts[0], max_new_tokens=4)
    with pytest.raises(NotImplementedError, match="_RepeatRoot has no default tree: pass tree="):
        Drafter.default_topology(_RepeatRoot(jnp.int32(0)))   # the base class's
    with pytest.raises(NotImplementedError, match=r"_RepeatRoot must implement update\(state, "):
        Drafter.update(_RepeatRoot(jnp.int32(0)), {}, None, None, None, None)

    class Unregistered(_RepeatRoot):  # (a subclass is a type of its own to jax's registry)
        pass

    # jax's error asked for static_argnums of jaxdec's own program.
    with pytest.raises(TypeError, match="Unregistered is not a registered pytree: .*"
                                        "register_dataclass"):
        jaxdec.speculative_generate(model, Unregistered(jnp.int32(0)), prompts, max_new_tokens=4)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Prompter(Drafter):
    """Drafts two candidates a step: a wrong one, then the tokens `answer` holds next (a
    table of plain decoding's output), so most drafts are accepted. `mistake` (static) spoils
    the tree's structure: verification must stay exact whatever the tree says."""

    answer: jax.Array  # [B, M]
    mistake: str = dataclasses.field(default="", metadata=dict(static=True))

    def default_topology(self):
        return tree.from_parents([-1, 0, 0, 1, 2, 3, 4])   # two chains of 3, breadth first

    def init(self, tokens_BT, prompt_lengths_B, *, max_len):
        return jnp.zeros(tokens_BT.shape[:1], jnp.int32)   # tokens emitted so far

    def propose(self, state, root_B, lengths_B, key, *, topology, sampler):
        B, M = self.answer.shape
        columns = jnp.minimum(state[:, None] + jnp.arange(3)[None, :], M - 1)
        right = jnp.take_along_axis(self.answer, columns, axis=1)
        cand = jnp.stack([(right + 1) % 7, right], axis=1)
        drafted = tree.from_candidates(root_B, cand, jnp.ones((B, 2, 3), bool), 7)
        spoilt = dict(
            depth=dict(depth=jnp.zeros_like(drafted.depth)),
            ancestors=dict(ancestors=jnp.broadcast_to(jnp.eye(7, dtype=bool), (B, 7, 7))),
            parents=dict(parents=jnp.broadcast_to(jnp.arange(7)[None, :] % 3 + 4, (B, 7))),
            valid=dict(valid=jnp.zeros_like(drafted.valid)),
        ).get(self.mistake, {})
        drafted = dataclasses.replace(drafted, **spoilt)
        return Proposal(tree=drafted, q=None, kind=ProposalKind.DETERMINISTIC,
                        chain=self.mistake == "chain"), state

    def update(self, state, proposal, verdict, n_commit_B, emitted_BL):
        return state + n_commit_B


def test_a_drafters_tree_is_verified_as_its_parents_say(loaded):
    """A drafter of one's own whose tree's depth, ancestors or chain flag disagree with its
    parents (or whose parents point forward) still gives plain decoding's tokens: the loop
    derives the structure from the parents (it verified the tree as given, and emitted other
    tokens, or int32's minimum)."""
    model = loaded(TARGET)
    prompts = _prompts()
    plain = jaxdec.generate(model, prompts, max_new_tokens=12)
    answer = jnp.asarray(plain.tokens)
    right = jaxdec.speculative_generate(model, _Prompter(answer), prompts, max_new_tokens=12)
    np.testing.assert_array_equal(right.tokens, plain.tokens)
    assert right.stats.tau > 2   # the second candidate is accepted
    for mistake in ("depth", "ancestors", "chain", "parents", "valid"):
        out = jaxdec.speculative_generate(model, _Prompter(answer, mistake), prompts,
                                          max_new_tokens=12)
        np.testing.assert_array_equal(out.tokens, plain.tokens, err_msg=mistake)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _UniformChain(Drafter):
    """Sampled drafts: a chain of tokens drawn uniformly (q uniform). `mistake` (static)
    spoils the tree's structure, gives q a vocabulary of 1, or scales it (sums of 0.01)."""

    vocab: int = dataclasses.field(metadata=dict(static=True))
    mistake: str = dataclasses.field(default="", metadata=dict(static=True))

    def default_topology(self):
        return tree.chain(2)

    def proposal_kind(self, sampler, topology):
        return ProposalKind.DETERMINISTIC if sampler.is_greedy else ProposalKind.IID

    def init(self, tokens_BT, prompt_lengths_B, *, max_len):
        return ()

    def propose(self, state, root_B, lengths_B, key, *, topology, sampler):
        B, N = root_B.shape[0], topology.num_nodes
        drafted = topology.template(B).with_tokens(
            jax.random.randint(key, (B, N), 0, self.vocab, jnp.int32))
        spoilt = dict(
            depth=dict(depth=jnp.zeros_like(drafted.depth)),
            parents=dict(parents=jnp.zeros_like(drafted.parents)),
        ).get(self.mistake, {})
        drafted = dataclasses.replace(drafted, **spoilt)
        q = jnp.full((B, N, 1 if self.mistake == "vocab" else self.vocab),
                     (0.01 if self.mistake == "scaled" else 1.0) / self.vocab)
        return Proposal(tree=drafted, q=q, kind=self.proposal_kind(sampler, topology),
                        chain=True), state

    def update(self, state, proposal, verdict, n_commit_B, emitted_BL):
        return state


def test_sampled_children_are_verified_on_the_topology(loaded):
    """A drafter of one's own drawing its children: the tree's structure is the static
    topology's whatever the drafter says (the same tokens as with a right tree), q is taken
    as a distribution (rows scaled by 0.01, as a top-k mask's probabilities left
    unnormalised, had nearly every draft accepted), and must cover the target's vocabulary
    (a q of one entry broadcast, and the output was not the target's distribution)."""
    model = loaded(TARGET)
    V = model.config.vocab_size
    run = functools.partial(jaxdec.speculative_generate, model, prompts=_prompts(),
                            max_new_tokens=10, sampler=jaxdec.Sampler(temperature=2.0),
                            key=jax.random.key(3))
    right = run(_UniformChain(V))
    for mistake in ("depth", "parents", "scaled"):
        np.testing.assert_array_equal(run(_UniformChain(V, mistake)).tokens, right.tokens,
                                      err_msg=mistake)
    with pytest.raises(ValueError, match=rf"_UniformChain.propose: sampled children need q "
                                         rf"\[3, 3, {V}\] \(rows, the topology's nodes, the "
                                         rf"target's vocabulary\), got \(3, 3, 1\)"):
        run(_UniformChain(V, "vocab"))


def test_bad_drafters_and_trees(loaded):
    model = loaded(TARGET)
    with pytest.raises(TypeError, match="drafter must be"):
        jaxdec.speculative_generate(model, model, _prompts(), max_new_tokens=4)
    with pytest.raises(TypeError, match="stream must be callable"):
        jaxdec.speculative_generate(model, PromptLookup(), _prompts(), max_new_tokens=4,
                                    stream="print")
    with pytest.raises(TypeError, match="Topology"):
        jaxdec.speculative_generate(model, PromptLookup(), _prompts(), max_new_tokens=4,
                                    tree=[[0], [1]])
    for flag in ("return_timings", "profile"):
        with pytest.raises(TypeError, match=f"{flag} must be a bool, got 1"):
            jaxdec.speculative_generate(model, PromptLookup(), _prompts(), max_new_tokens=4,
                                        **{flag: 1})
    with pytest.raises(ValueError, match="contiguous"):
        jaxdec.speculative_generate(model, DraftModel(model), _prompts(), max_new_tokens=4,
                                    sampler=jaxdec.Sampler(), tree=tree.from_choices([[1], [0], [0, 2]]))
    with pytest.raises(ValueError, match="a dynamic tree drafts each expanded node's most"):
        jaxdec.speculative_generate(model, DraftModel(model, proposal="iid"), _prompts(),
                                    max_new_tokens=4, sampler=jaxdec.Sampler(),
                                    tree=tree.dynamic(2, 2))
    with pytest.raises(ValueError, match="max_ngram"):
        PromptLookup(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="proposal"):
        DraftModel(model, proposal="beam")
    with pytest.raises(TypeError, match="tree must be a jaxdec.tree Topology"):
        DraftModel(model, tree="chain:4")
    with pytest.raises(ValueError, match="1-D integer"):
        Retrieval(np.zeros((2, 2), np.int32))


def test_draft_vocabulary_padding_and_mismatch(loaded):
    model = loaded(TARGET)
    config = model.config
    padded = jaxdec.init_model(config.replace(vocab_size=100, num_layers=1), jax.random.PRNGKey(5))
    plain = jaxdec.generate(model, _prompts(), max_new_tokens=10)
    spec = jaxdec.speculative_generate(model, DraftModel(padded), _prompts(), max_new_tokens=10)
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    alien = jaxdec.init_model(config.replace(vocab_size=4000, num_layers=1), jax.random.PRNGKey(5))
    with pytest.raises(ValueError, match=r"\(4000\) and the target's \(97\)"):
        jaxdec.speculative_generate(model, DraftModel(alien), _prompts(), max_new_tokens=4)
    with pytest.raises(ValueError, match="encoded with the target's tokenizer"):
        jaxdec.speculative_generate(model, Retrieval(np.arange(200)), _prompts(), max_new_tokens=4)


def test_the_step_updates_the_caches_in_place():
    """No whole-cache copies in the compiled loop: each draft level overwrites the level
    before's keys and values in the carried cache (a forward over the loop-invariant cache
    copied it once per level, ~35% of a CPU step at a 3K context), and commits scatter into
    the caches in place: one scatter per layer and tensor for a branching tree, none for a
    chain (its accepted path is its prefix, already where it is kept)."""
    from jaxdec import speculative
    from jaxdec.generate import prepare_batch

    config = SMALL.replace(num_layers=2)
    target = jaxdec.abstract_model(config)
    drafter = DraftModel(jaxdec.abstract_model(config.replace(num_layers=1))).prepare(target)
    # (a cache's dtype: its values', or a bf16 cache's bits on a CPU; not the u32 random bits
    # of a draw that happens to have its shape)
    cache = (rf"= (?:f32|bf16|f16|u16)\[1,\d+,{config.num_kv_heads},{config.head_dim}\]"
             r"\{[\d,]*\}")
    for topology, scatters in ((tree.kary(2, 2), 2 * (2 + 1)), (tree.chain(3), 0)):
        batch = prepare_batch(target, [PROMPT], max_new_tokens=8, stop_tokens=(), pad_id=0,
                              max_len=None, extra_slots=topology.num_nodes)
        lowered = speculative._program.lower(  # speculative_generate's (cache donated)
            target, drafter, batch.tokens, batch.lengths,
            jaxdec.init_cache(config, 1, batch.max_len, abstract=True), jax.random.PRNGKey(0),
            batch.stop, np.int32(8), capacity=8, sampler=jaxdec.Sampler(temperature=0.9),
            topology=topology, pad_id=0, timed=False, profile=False)
        # As a user's XLA compiles it: the suite's quick-compile flags (runenv.py) may take
        # the older CPU emitters, which expand scatters into loops.
        hlo = lowered.compile({"xla_cpu_use_fusion_emitters": True} if "fusion_emitters" in
                              FAST_CPU_COMPILES else None).as_text()
        assert "while(" in hlo
        assert re.findall(cache + r" copy\(", hlo) == []
        assert len(re.findall(cache + r" \S*scatter\S*\(", hlo)) == scatters, topology


def test_compile_only_with_abstract_target_and_draft(loaded):
    """Speculative programs compile from shapes alone; the real models' first call compiles
    nothing. Abstract models cannot run, and an abstract draft must share the target's mesh."""
    model = loaded(TARGET)
    abstract = jaxdec.abstract_model(model.config)
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    settings = dict(max_new_tokens=9, tree=tree.kary(2, 3), sampler=jaxdec.Sampler(top_p=0.8),
                    key=jax.random.PRNGKey(2))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = jaxdec.speculative_generate(abstract, DraftModel(abstract), _prompts(),
                                          compile_only=True, **settings)
        assert isinstance(out, jax.stages.Compiled) and compiles
        compiles.clear()
        result = jaxdec.speculative_generate(model, DraftModel(model), _prompts(seed=9),
                                             **settings)
        assert compiles == [] and result.tokens.shape == (3, 9)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    with pytest.raises(ValueError, match="drafter's params are shapes only"):
        jaxdec.speculative_generate(model, DraftModel(abstract), _prompts(), max_new_tokens=4)
    with pytest.raises(ValueError, match="target's params are shapes only"):
        jaxdec.speculative_generate(abstract, PromptLookup(), _prompts(), max_new_tokens=4)
    elsewhere = jaxdec.abstract_model(model.config, mesh=jaxdec.make_mesh(tp=2))
    with pytest.raises(ValueError, match="on the target's mesh"):
        jaxdec.speculative_generate(abstract, DraftModel(elsewhere), _prompts(), max_new_tokens=4,
                                    compile_only=True)


@pytest.mark.parametrize("name", ["unrelated-chain3", "dynamic-self"])
def test_a_prefix_cache_of_several_rows_with_a_drafter(name, loaded, unrelated_draft):
    """Three rows, each its own conversation (a next turn, a divergent prompt, a new one;
    the draft model's cache resumed per row): greedy calls give `generate`'s tokens, sampled
    ones `speculative_generate`'s for the same key."""
    model = loaded(TARGET)
    make, topology = DRAFTERS[name]
    drafter = make(model, unrelated_draft)
    session = jaxdec.PrefixCache(model, max_len=64, drafter=drafter, tree=topology, rows=3)
    rs = np.random.RandomState(8)
    prompts = [rs.randint(3, 97, n).tolist() for n in (10, 5, 7)]
    for step in range(3):
        extra = dict(sampler=jaxdec.Sampler(temperature=1.0),
                     key=jax.random.PRNGKey(step)) if step == 1 else {}
        result = session.generate(prompts, max_new_tokens=6, **extra)
        want = (jaxdec.speculative_generate(model, drafter, prompts, max_new_tokens=6,
                                            tree=topology, max_len=64, **extra) if extra else
                jaxdec.generate(model, prompts, max_new_tokens=6))
        np.testing.assert_array_equal(result.tokens, want.tokens)
        assert session.tokens == [p + out[:-1] for p, out in zip(prompts, result.to_lists())]
        outs = result.to_lists()
        prompts = [prompts[0] + outs[0] + [7, 8], prompts[1][:3] + [9, 9],
                   rs.randint(3, 97, 6).tolist()]


@pytest.mark.parametrize("name", ["self-kary", "unrelated-chain3", "prompt-lookup"])
def test_a_prefix_cache_with_a_drafter(name, loaded, unrelated_draft, monkeypatch):
    """`PrefixCache(..., drafter=...)` over a conversation's calls (the next turn, a prompt
    diverging midway, one sharing nothing): greedy calls give `generate`'s tokens and
    logprobs, sampled ones `speculative_generate`'s for the same key, and only what the
    caches lack is prefilled, a draft model's cache resumed where it stopped."""
    import jaxdec.prefix_cache as module

    model = loaded(TARGET)
    make, topology = DRAFTERS[name]
    fed, program = [], module._spec_program

    def spy(target, drafter, tokens, lengths, cache, *args, **kwargs):
        prompts, state = args[4:6]  # after key, stop, limit, stream_id
        fed.append((int(np.asarray(cache.lengths)[0]) if prompts is not None else 0,
                    int(lengths[0]), None if state is None else int(state.cache.lengths[0])))
        return program(target, drafter, tokens, lengths, cache, *args, **kwargs)

    monkeypatch.setattr(module, "_spec_program", spy)
    drafter = make(model, unrelated_draft)
    session = jaxdec.PrefixCache(model, max_len=64, drafter=drafter, tree=topology)
    rs = np.random.RandomState(5)
    prompt = rs.randint(3, 97, 12).tolist()
    for step in range(5):
        sampled = dict(sampler=jaxdec.Sampler(temperature=1.0), key=jax.random.PRNGKey(step))
        extra = sampled if step % 2 else {}
        result = session.generate(prompt, max_new_tokens=6, return_logprobs=True, **extra)
        assert isinstance(result, jaxdec.SpeculativeResult) and result.stats.steps >= 1
        if name.startswith("self"):  # a resumed draft cache as right as a fresh one
            np.testing.assert_allclose(result.stats.acceptance_by_depth, 1.0)
        want = (jaxdec.speculative_generate(model, drafter, [prompt], max_new_tokens=6,
                                            tree=topology, max_len=64, return_logprobs=True,
                                            **extra) if extra else
                jaxdec.generate(model, [prompt], max_new_tokens=6, return_logprobs=True))
        np.testing.assert_array_equal(result.tokens, want.tokens)
        np.testing.assert_allclose(result.logprobs, want.logprobs, rtol=1e-4, atol=1e-5)
        assert session.tokens == prompt + result.to_lists()[0][:-1]
        prompt = [prompt + result.to_lists()[0] + [7, 8, 9], prompt[:6] + [5], prompt,
                  rs.randint(3, 97, 5).tolist(), None][step]
    # (kept, fed, the tokens the draft model's cache held): the next turn keeps the 12 + 5
    # cached, or the 16 a draft model's cache holds (one behind the target's); the divergent
    # prompt 6; the same prompt all but its last token; the unrelated one nothing.
    if isinstance(drafter, DraftModel):
        assert fed == [(0, 12, None), (16, 5, 16), (6, 1, 25), (6, 1, 11), (0, 5, None)]
    else:
        assert fed == [(0, 12, None), (17, 4, None), (6, 1, None), (6, 1, None), (0, 5, None)]
