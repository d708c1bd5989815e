"""Drafters in isolation: prompt-lookup matches, retrieval suffix search, and the draft
model's level-by-level tree drafting, against hand-computed expectations."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdec
from jaxdec import Greedy, tree
from jaxdec.drafters import DraftModel, PromptLookup, Retrieval
from jaxdec.drafters.base import History, candidates_topology
from jaxdec.drafters.prompt_lookup import MERGED_COUNT, _latest, _latest_match_ends
from jaxdec.drafters.retrieval import UNROLLED_WIDTH, _search, _suffix_order
from jaxdec.verify import ProposalKind


def _history(rows, capacity=32):
    tokens = np.zeros((len(rows), capacity), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return History(tokens=jnp.asarray(tokens), length=jnp.array([len(r) for r in rows]))


def test_prompt_lookup_hand_computed():
    # Row 0 ends with "1 2": earlier "1 2" occurrences are followed by 3 4 and by 7 8.
    # Row 1 has no earlier match of its last token: nothing is drafted.
    history = _history([[1, 2, 3, 4, 9, 1, 2, 7, 8, 5, 1, 2], [5, 6, 7]])
    drafter = PromptLookup(max_ngram=2, min_ngram=1, depth=3, num_candidates=2)
    topology = drafter.default_topology()
    proposal, _ = drafter.propose(history, jnp.array([2, 7]), None, None, topology=topology,
                                  sampler=jaxdec.Greedy())
    t = proposal.tree
    # Most recent match first: "7 8 5" then "3 4 9".
    np.testing.assert_array_equal(t.tokens[0, :7], [2, 7, 3, 8, 4, 5, 9])
    np.testing.assert_array_equal(t.parents[0, :7], [-1, 0, 0, 1, 2, 3, 4])
    assert t.valid[0, :7].all()
    np.testing.assert_array_equal(t.valid[1], [True] + [False] * (topology.num_nodes - 1))


def test_a_lookup_default_tree_too_big_names_its_settings():
    with pytest.raises(ValueError, match=r"num_candidates=100 x depth=6 \+ the root is 601 "
                                         "nodes, more than a tree's 256"):
        PromptLookup(depth=6, num_candidates=100).default_topology()
    # With a tree of its own the candidates share its nodes.
    config = jaxdec.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)
    model = jaxdec.init_model(config, jax.random.key(0))
    out = jaxdec.speculative_generate(model, PromptLookup(depth=6, num_candidates=100),
                                      [[1, 2, 1, 2]], max_new_tokens=3, tree=tree.chain(3))
    np.testing.assert_array_equal(out.tokens, jaxdec.generate(model, [[1, 2, 1, 2]],
                                                              max_new_tokens=3).tokens)


def test_lookup_settings_past_what_a_step_can_use():
    """An n-gram length past MAX_NGRAM (a huge one compiled for ever; Retrieval's failed in
    numpy), a depth or a candidate count past a tree's nodes (Retrieval padded its datastore
    with `depth` sentinels: 0.4 GiB for 10**8) are refused when the drafter is made."""
    from jaxdec.drafters.base import MAX_NGRAM

    for make in (PromptLookup, lambda **k: Retrieval(np.arange(10), **k)):
        with pytest.raises(ValueError, match=f"max_ngram={MAX_NGRAM + 1} exceeds {MAX_NGRAM}"):
            make(max_ngram=MAX_NGRAM + 1)
        with pytest.raises(ValueError, match="depth=256 exceeds a tree's 255 nodes"):
            make(depth=256)
        with pytest.raises(ValueError, match="num_candidates=10000 exceeds a tree's 255"):
            make(num_candidates=10**4)
    assert PromptLookup(max_ngram=MAX_NGRAM, depth=255).depth == 255


def test_prompt_lookup_prefers_the_longest_ngram_and_stops_at_the_end():
    # Last 2 tokens "5 6" occur once (followed by 5 6 ...); "6" alone occurs more often.
    history = _history([[6, 0, 5, 6, 5, 6]])
    drafter = PromptLookup(max_ngram=2, min_ngram=1, depth=4, num_candidates=1)
    proposal, _ = drafter.propose(history, jnp.array([6]), None, None,
                                  topology=tree.chain(4), sampler=jaxdec.Greedy())
    # "5 6" at 2..3 is followed by 5 6 and then the history ends.
    np.testing.assert_array_equal(proposal.tree.tokens[0, :3], [6, 5, 6])
    np.testing.assert_array_equal(proposal.tree.valid[0], [True, True, True, False, False])


def _match_ends_by_hand(row, max_ngram, min_ngram):
    """The ends of the longest n-gram's earlier occurrences, one position at a time."""
    L = len(row)
    for n in range(max_ngram, min_ngram - 1, -1):
        if L < n:
            continue
        ends = {i for i in range(n - 1, L - 1) if row[i - n + 1:i + 1] == row[L - n:]}
        if ends:
            return ends
    return set()


@pytest.mark.parametrize("capacity", [1, 2, 3, 9, 40])
def test_prompt_lookup_match_ends_against_brute_force(capacity):
    rng = np.random.default_rng(capacity)
    for max_ngram, min_ngram in [(3, 1), (4, 2), (1, 1), (9, 2)]:
        rows = [list(rng.integers(0, 3, rng.integers(0, capacity + 1))) for _ in range(8)]
        history = _history(rows, capacity)
        ends = np.asarray(_latest_match_ends(history, max_ngram, min_ngram))
        assert ends.shape == (len(rows), capacity)
        for row, got in zip(rows, ends):
            assert set(np.flatnonzero(got)) == _match_ends_by_hand(row, max_ngram, min_ngram)


@pytest.mark.parametrize("count", [1, 3, 5, MERGED_COUNT + 1])
def test_prompt_lookup_latest_match_ends(count):
    """The `count` latest set positions of each row, latest first, -1 where a row has fewer
    (rows with none, one, and many; merged lists, and `lax.top_k` beyond MERGED_COUNT)."""
    rng = np.random.default_rng(count)
    width = 11 if count <= MERGED_COUNT else 2 * count
    ends = rng.random((6, width)) < np.array([0.0, 0.05, 0.2, 0.5, 0.9, 1.0])[:, None]
    ends[1] = False
    ends[1, 4] = True
    got = np.asarray(_latest(jnp.asarray(ends), count))
    for row, latest in zip(ends, got):
        want = list(np.flatnonzero(row)[::-1][:count])
        np.testing.assert_array_equal(latest, want + [-1] * (count - len(want)))


def test_history_append():
    history = _history([[1, 2], [3]], capacity=5)
    out = history.append(jnp.array([[7, 8, 9], [4, 5, 6]]), jnp.array([2, 3]))
    np.testing.assert_array_equal(out.tokens, [[1, 2, 7, 8, 0], [3, 4, 5, 6, 0]])
    np.testing.assert_array_equal(out.length, [4, 4])
    np.testing.assert_array_equal(out.last(3), [[2, 7, 8], [4, 5, 6]])
    with jax.enable_x64(True):  # a caller's int64 tokens and counts keep the int32 history
        wide = history.append(jnp.array([[7, 8, 9], [4, 5, 6]], jnp.int64), jnp.array([2, 3]))
    assert wide.tokens.dtype == wide.length.dtype == jnp.int32
    np.testing.assert_array_equal(wide.tokens, out.tokens)


def test_suffix_search_hand_computed():
    stream = np.array([3, 1, 2, 3, 1, 2, 4, 1, 3], np.int32)
    padded = np.concatenate([stream, np.full(6, -1, np.int32)])
    order = _suffix_order(padded, stream.size, 3)
    keys = [tuple(padded[i:i + 3]) for i in order]
    assert keys == sorted(keys)
    query = jnp.array([[1, 2, 0], [9, 9, 0], [3, 1, 0]])  # 2-grams, padded to 3
    wide = jnp.array([[1, 2, 3], [1, 2, 4], [3, 1, 2]])  # 3-grams
    # Q = 4 searches side by side: both bounds of the 2-grams and of the 3-grams.
    bounds = np.asarray(_search(jnp.asarray(padded), jnp.asarray(order),
                                jnp.stack([query, query, wide, wide]),
                                jnp.array([2, 2, 3, 3]),
                                strict=jnp.array([False, True, False, True])))
    found = [[sorted(order[a:b].tolist()) for a, b in zip(bounds[i], bounds[i + 1])]
             for i in (0, 2)]
    assert found == [[[1, 4], [], [0, 3]], [[1], [4], [0, 3]]]


@pytest.mark.parametrize("largest", [2, 2**15 - 2, 2**15 - 1, 2**16, 2**21 - 2, 2**31 - 3])
@pytest.mark.parametrize("width", [1, 3, 4, 6])
def test_suffix_order_is_a_stable_lexicographic_sort(largest, width):
    """Token ids around the sizes where the packed keys change (4, 3, 2 tokens per key):
    the order is a lexsort of one key per token, equal n-grams by position."""
    rng = np.random.default_rng(largest + width)
    alphabet = np.array([0, 1, largest // 2, largest - 1, largest])  # few ids: many ties
    stream = alphabet[rng.integers(0, 5, 500)].astype(np.int32)
    padded = np.concatenate([stream, np.full(width + 2, -1, np.int32)])
    expected = np.lexsort([padded[j:j + stream.size] for j in range(width)][::-1])
    np.testing.assert_array_equal(_suffix_order(padded, stream.size, width), expected)


@pytest.mark.parametrize("n", [3, 12])  # compared token by token; and as one vector
@pytest.mark.parametrize("size", [2, 7, 8, 9, 63, 64, 65, 700])
def test_suffix_search_against_brute_force(size, n):
    """The 8-ary search's bounds equal counting the suffixes below the query (<= where
    strict), for datastore sizes around the powers of 8 and queries of every width (n-grams
    longer than `UNROLLED_WIDTH` compare as one vector)."""
    assert (n > UNROLLED_WIDTH) == (n == 12)
    rng = np.random.default_rng(size)
    stream = rng.integers(0, 4, size).astype(np.int32)
    padded = np.concatenate([stream, np.full(n + 2, -1, np.int32)])
    order = _suffix_order(padded, size, n)
    # Queries: n-grams that occur (from the stream) and random ones, widths 1..n.
    starts = rng.integers(0, size, 12)
    queries = np.concatenate([padded[starts[:, None] + np.arange(n)],
                              rng.integers(0, 5, (12, n))]).astype(np.int32)
    queries = np.where(queries < 0, 0, queries)
    Q = 2 * n
    query = np.broadcast_to(queries, (Q,) + queries.shape)
    widths = np.repeat(np.arange(1, n + 1), 2)
    strict = np.tile([False, True], n)
    got = np.asarray(_search(jnp.asarray(padded), jnp.asarray(order), jnp.asarray(query),
                             jnp.asarray(widths), strict=jnp.asarray(strict)))
    for q in range(Q):
        w = widths[q]
        keys = [tuple(padded[i:i + w]) for i in order]
        for b, row in enumerate(queries):
            target = tuple(row[:w])
            want = sum(k <= target if strict[q] else k < target for k in keys)
            assert got[q, b] == want, (q, b)


def test_retrieval_program_grows_linearly_with_max_ngram():
    """Long n-grams compare as one vector: token by token, XLA's optimised step for
    max_ngram=32 was 3.2x max_ngram=16's (14 MB, 45 s to compile on a CPU; 64 took 9
    minutes and 12 GB)."""
    size = {}
    for n in (16, 32):
        drafter = Retrieval(np.random.default_rng(0).integers(0, 64, 500), max_ngram=n)
        topology = drafter.default_topology()
        history = History(jnp.zeros((1, 40), jnp.int32), jnp.full((1,), 10, jnp.int32))

        def propose(history, root, drafter=drafter, topology=topology):
            return drafter.propose(history, root, root, None, topology=topology,
                                   sampler=Greedy())[0].tree

        size[n] = len(jax.jit(propose).lower(history, jnp.zeros((1,), jnp.int32))
                      .compile().as_text())
    assert size[32] < 2.2 * size[16], size


def test_retrieval_search_compiles_quickly_with_xla_default_cpu_flags():
    """The suite compiles with XLA's quick CPU flags (runenv.py); users get XLA's defaults,
    under which the search at batch 1 once took minutes to compile for a 1000-token datastore
    (a plain take's bounds handling around each of its reads; the fusion emitters) and, for
    the GPU presets' 25M tokens, ran out of memory (jax 0.12, which has no older emitters for
    the suite's flags to pick). Here the 25M-token search compiles in seconds."""
    code = """
import jax, jax.numpy as jnp, numpy as np
from jaxdec.drafters.retrieval import _search
size, Q, B, n = 25_000_000, 8, 1, 4  # batch 1: the case that was slow
strict = np.arange(Q) >= Q // 2
search = jax.jit(lambda t, s, q, w: _search(t, s, q, w, strict=strict))
shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
search.lower(shape(size + 10), shape(size), shape(Q, B, n), shape(Q)).compile()
"""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the retrieval search did not compile in 120 s with XLA's default flags")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_retrieval_proposes_continuations():
    stream = np.array([5, 1, 2, 3, 4, 0, 7, 1, 2, 8, 9, 0], np.int32)
    drafter = Retrieval(stream, max_ngram=2, min_ngram=1, depth=3, num_candidates=2)
    history = _history([[6, 6, 1, 2]])
    proposal, _ = drafter.propose(history, jnp.array([2]), None, None,
                                  topology=drafter.default_topology(), sampler=jaxdec.Greedy())
    t = proposal.tree
    children = sorted(int(t.tokens[0, i]) for i in range(t.num_nodes)
                      if t.valid[0, i] and t.parents[0, i] == 0)
    assert children == [3, 8]  # "1 2" is followed by 3 4 0 and by 8 9 0
    assert int(np.sum(t.valid[0])) == 7


def _root_children(drafter, rows):
    proposal, _ = drafter.propose(_history(rows), jnp.array([row[-1] for row in rows]), None,
                                  None, topology=drafter.default_topology(),
                                  sampler=jaxdec.Greedy())
    t = proposal.tree
    return [sorted(int(t.tokens[b, i]) for i in range(t.num_nodes)
                   if t.valid[b, i] and t.parents[b, i] == 0) for b in range(len(rows))]


def test_retrieval_drafts_every_occurrence_when_there_are_few():
    """Fewer occurrences than candidates: each is drafted once (the spread picked one twice
    and skipped another); one ending the datastore gives way to a shorter n-gram."""
    stream = np.array([1, 2, 1, 3, 0, 9, 5, 1, 6], np.int32)
    drafter = Retrieval(stream, max_ngram=1, depth=1, num_candidates=4)
    assert _root_children(drafter, [[8, 1]]) == [[2, 3, 6]]
    stream = np.array([3, 1, 2, 7, 0, 5, 1, 2], np.int32)  # "1 2" last ends the datastore
    for max_ngram in (2, 3):  # the ending occurrence sorts last, or first, in its range
        drafter = Retrieval(stream, max_ngram=max_ngram, depth=2, num_candidates=1)
        assert _root_children(drafter, [[5, 1, 2]]) == [[7]]
    drafter = Retrieval(np.array([4, 5, 6, 1, 2], np.int32), max_ngram=2, depth=2)
    assert _root_children(drafter, [[1, 2]]) == [[]]  # nothing follows "2" anywhere


def test_spread_picks_hand_computed():
    from jaxdec.drafters.retrieval import spread_picks

    lo = jnp.array([10, 0, 0, 0], jnp.int32)
    picks, have = spread_picks(lo, jnp.array([3, 2, 8, 0], jnp.int32), 4)
    assert picks[:, :3].tolist()[:2] == [[10, 11, 12], [0, 1, 2]]
    assert have.tolist() == [[True] * 3 + [False], [True] * 2 + [False] * 2, [True] * 4,
                             [False] * 4]
    assert picks[2].tolist() == [1, 3, 5, 7]  # the middles of 4 parts of 8
    # A frequent n-gram of a large datastore: (2c + 1) * count would overflow int32.
    count, C = 2**31 - 5, 63
    picks, _ = spread_picks(jnp.zeros(1, jnp.int32), jnp.array([count], jnp.int32), C)
    assert picks[0].tolist() == [(2 * c + 1) * count // (2 * C) for c in range(C)]


def test_retrieval_from_texts(hf_checkpoints):
    from hf_models import make_tokenizer

    tokenizer = make_tokenizer()
    drafter = Retrieval.from_texts(["the quick brown fox", "hello world"], tokenizer)
    assert drafter.size > 5
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        Retrieval.from_texts([""], tokenizer)
    with pytest.raises(TypeError, match="got one string: wrap it in a list"):
        Retrieval.from_texts("the quick brown fox", tokenizer)  # not one document a character
    with pytest.raises(TypeError, match="texts must be a list of documents"):
        Retrieval.from_texts([[1, 2, 3]], tokenizer)
    with pytest.raises(TypeError, match="tokenizer must be a tokenizers.Tokenizer.*NoneType"):
        Retrieval.from_texts(["hello world"], None)



def test_retrieval_from_texts_checks_its_settings_before_encoding(monkeypatch):
    """Bad settings are named before the corpus is encoded (minutes on a large one), not
    after."""
    from hf_models import make_tokenizer

    from jaxdec import data

    monkeypatch.setattr(data, "encode", lambda *a: pytest.fail("encoded first"))
    with pytest.raises(ValueError, match="depth must be an int >= 1, got 0"):
        Retrieval.from_texts(["hello world"], make_tokenizer(), depth=0)
    with pytest.raises(ValueError, match="min_ngram=3 exceeds max_ngram=2"):
        Retrieval.from_texts(["hello world"], make_tokenizer(), max_ngram=2, min_ngram=3)
    with pytest.raises(TypeError, match="from_texts: got an unexpected keyword argument 'dept'"):
        Retrieval.from_texts(["hello world"], make_tokenizer(), dept=3)


def test_retrieval_datastores_are_kept_in_a_cache_dir(tmp_path, monkeypatch):
    """With cache_dir a datastore is built once: a later call with the same texts, tokenizer
    and settings reads it back (the same tokens and suffix order, nothing encoded); other
    texts or settings build their own; a damaged entry is built again."""
    from hf_models import make_tokenizer

    from jaxdec import data

    tokenizer, texts = make_tokenizer(), ["the quick brown fox", "hello world", "the quick"]
    fresh = Retrieval.from_texts(texts, tokenizer, max_ngram=3)
    built = Retrieval.from_texts(texts, tokenizer, max_ngram=3, cache_dir=tmp_path)
    (folder,) = os.listdir(tmp_path)
    encode = data.encode
    monkeypatch.setattr(data, "encode", lambda *a: pytest.fail("encoded again"))
    for store in (built, Retrieval.from_texts(texts, tokenizer, max_ngram=3, depth=6,
                                              cache_dir=tmp_path)):
        np.testing.assert_array_equal(store.tokens, fresh.tokens)
        np.testing.assert_array_equal(store.suffixes, fresh.suffixes)
        assert store._max_id == fresh._max_id
    monkeypatch.setattr(data, "encode", encode)
    Retrieval.from_texts(texts[:2], tokenizer, max_ngram=3, cache_dir=tmp_path)
    Retrieval.from_texts(texts, tokenizer, max_ngram=2, cache_dir=tmp_path)
    assert len(os.listdir(tmp_path)) == 3
    for meta in ('{"format": "jaxdec-retrieval-1", "size": 3}', "[1, 2]"):  # by hand
        (tmp_path / folder / "datastore.json").write_text(meta)
        np.testing.assert_array_equal(
            Retrieval.from_texts(texts, tokenizer, max_ngram=3, cache_dir=tmp_path).suffixes,
            fresh.suffixes)
    for cut in (b"cut short", b""):  # (an empty file: np.load's EOFError)
        (tmp_path / folder / "suffixes.npy").write_bytes(cut)
        again = Retrieval.from_texts(texts, tokenizer, max_ngram=3, cache_dir=tmp_path)
        np.testing.assert_array_equal(again.suffixes, fresh.suffixes)
    monkeypatch.setattr(data, "encode", lambda *a: pytest.fail("encoded again"))
    mended = Retrieval.from_texts(texts, tokenizer, max_ngram=3, cache_dir=tmp_path)
    np.testing.assert_array_equal(mended.suffixes, fresh.suffixes)


def test_retrieval_from_a_directory(tmp_path):
    """Every readable file, one alone too (a datastore holds nothing out)."""
    from hf_models import make_tokenizer

    tokenizer = make_tokenizer()
    (tmp_path / "b.txt").write_text("hello world")
    one = Retrieval.from_directory(tmp_path, tokenizer)
    np.testing.assert_array_equal(one.tokens,
                                  Retrieval.from_texts(["hello world"], tokenizer).tokens)
    (tmp_path / "a.txt").write_text("the quick brown fox")
    (tmp_path / "c.bin").write_bytes(b"\x00\xff")
    both = Retrieval.from_directory(tmp_path, tokenizer)
    np.testing.assert_array_equal(both.tokens, Retrieval.from_texts(
        ["the quick brown fox", "hello world"], tokenizer).tokens)
    with pytest.raises(ValueError, match="b.txt is a file"):
        Retrieval.from_directory(tmp_path / "b.txt", tokenizer)


def test_retrieval_copies_its_datastore_once_per_mesh():
    """Repeated calls reuse the datastore already on the target's devices (a mesh of its own
    gets its own copy); the ids are still checked against each target's vocabulary, also
    for a datastore rebuilt from its leaves (as jit does)."""
    config = jaxdec.ModelConfig(vocab_size=16, hidden_size=16, intermediate_size=32,
                                num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8)
    target = jaxdec.init_model(config, jax.random.PRNGKey(0))
    drafter = Retrieval(np.array([1, 2, 3, 1, 2, 4, 9], np.int32), max_ngram=2)
    placed = drafter.prepare(target)
    assert isinstance(placed.tokens, jax.Array) and isinstance(placed.suffixes, jax.Array)
    assert drafter.prepare(target) is placed
    assert placed.prepare(target).tokens is placed.tokens  # already there: not copied again
    on_two = jaxdec.init_model(config, jax.random.PRNGKey(0), mesh=jaxdec.make_mesh(tp=2))
    other = drafter.prepare(on_two)
    assert other is not placed and other.tokens.sharding.mesh == on_two.mesh
    small = jaxdec.init_model(config.replace(vocab_size=8), jax.random.PRNGKey(0))
    for datastore in (drafter, placed, jax.tree.map(lambda x: x, placed)):
        with pytest.raises(ValueError, match="encoded with the target's tokenizer"):
            datastore.prepare(small)
    # The copies of the two meshes used last are kept (a drafter tried on mesh after mesh
    # kept a copy on each, on the same devices, as long as it lived).
    on_dp = jaxdec.init_model(config, jax.random.PRNGKey(0), mesh=jaxdec.make_mesh(dp=2))
    assert drafter.prepare(on_dp).tokens.sharding.mesh == on_dp.mesh
    assert len(drafter._placed) == 2 and drafter.prepare(on_two) is other
    assert drafter.prepare(target) is not placed  # the oldest: copied again


@pytest.mark.parametrize("make", [lambda: PromptLookup(max_ngram=2),
                                  lambda: Retrieval(np.array([1, 2, 3, 1, 2, 4], np.int32),
                                                    max_ngram=2)],
                         ids=["prompt-lookup", "retrieval"])
def test_a_lookup_drafters_settings_are_fixed_when_made(make):
    """An assignment to a setting is refused by name (a Retrieval's datastore is sorted and
    padded for its max_ngram and depth, and copied onto each mesh with its settings: a
    changed one half-applied); the pytree round trip keeps them."""
    drafter = make()
    for name in ("max_ngram", "min_ngram", "depth", "num_candidates"):
        with pytest.raises(AttributeError, match=f"{name} is fixed when it is made"):
            setattr(drafter, name, 1)
    assert drafter.max_ngram == 2 and drafter.depth == 6
    rebuilt = jax.tree.map(lambda x: x, drafter)
    assert rebuilt._settings() == drafter._settings() == (2, 1, 6, drafter.num_candidates)
    assert rebuilt.default_topology().num_nodes == drafter.default_topology().num_nodes


def test_a_draft_models_settings_are_fixed_when_made():
    """A DraftModel keeps the copy it placed on each mesh: a model or proposal assigned
    afterwards would have been ignored by the next call on that mesh (the old copy's)."""
    config = jaxdec.ModelConfig(vocab_size=16, hidden_size=16, intermediate_size=32,
                                num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8)
    target = jaxdec.init_model(config, jax.random.PRNGKey(0))
    draft_model = jaxdec.init_model(config, jax.random.PRNGKey(1))
    drafter = DraftModel(draft_model, tree=tree.chain(2))
    placed = drafter.prepare(target)
    for name, value in (("model", target), ("proposal", "iid"), ("tree", tree.chain(3)),
                        ("target_vocab", 7)):
        with pytest.raises(AttributeError, match=f"{name} is fixed when it is made"):
            setattr(drafter, name, value)
    assert drafter.prepare(target) is placed and drafter.proposal == "auto"
    rebuilt = jax.tree.map(lambda x: x, placed)
    assert (rebuilt.proposal, rebuilt.target_vocab, rebuilt.tree) == ("auto", placed.target_vocab,
                                                                       None)


def test_draft_model_is_placed_on_a_mesh_once():
    """A draft loaded on other devices than the target's is copied onto the target's mesh by
    the first call and the copy reused by the calls after it."""
    config = jaxdec.ModelConfig(vocab_size=16, hidden_size=16, intermediate_size=32,
                                num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8)
    draft = jaxdec.init_model(config, jax.random.PRNGKey(1))
    drafter = DraftModel(draft)
    on_one = jaxdec.init_model(config, jax.random.PRNGKey(0))
    on_two = jaxdec.init_model(config, jax.random.PRNGKey(0), mesh=jaxdec.make_mesh(tp=2))
    placed = drafter.prepare(on_two)
    assert placed.model.mesh == on_two.mesh and placed.model is not draft
    assert drafter.prepare(on_two) is placed
    assert placed.prepare(on_two).model is placed.model  # already there: not copied again
    assert drafter.prepare(on_one).model is draft  # already on that mesh: nothing copied
    for bad in (-5, 2.5, "x", True):  # (taken, and ignored: prepare sets it)
        with pytest.raises(ValueError, match="target_vocab must be an int >= 1"):
            DraftModel(draft, target_vocab=bad)


def test_a_draft_model_run_past_its_positions_warns():
    """A run reaching past the draft model's positions (a short-context draft for a
    long-context target) warns, naming both, and stays exact; one within them does not."""
    import warnings

    config = jaxdec.ModelConfig(vocab_size=16, hidden_size=16, intermediate_size=32,
                                num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                                max_position_embeddings=64)
    target = jaxdec.init_model(config, jax.random.PRNGKey(0))
    drafter = DraftModel(jaxdec.init_model(config.replace(max_position_embeddings=12),
                                           jax.random.PRNGKey(1)))
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8]]
    with pytest.warns(UserWarning, match="reaches position 14, past the draft model's 12 "
                                         "positions") as caught:
        got = jaxdec.speculative_generate(target, drafter, prompts, max_new_tokens=8)
    assert caught[0].filename == __file__  # the caller's line
    want = jaxdec.generate(target, prompts, max_new_tokens=8)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    session = jaxdec.PrefixCache(target, 32, drafter=drafter, rows=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # once per line, as Python shows them by default
        for _ in range(2):
            got = session.generate(prompts, max_new_tokens=8)
    assert len(caught) == 1 and "past the draft model's 12 positions" in str(caught[0].message)
    assert caught[0].filename == __file__  # a PrefixCache's caller too
    np.testing.assert_array_equal(got.tokens, want.tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxdec.speculative_generate(target, drafter, prompts, max_new_tokens=6)


def test_draft_model_checks_a_target_tokenizer_once(loaded, monkeypatch):
    """The vocabularies are compared once per target tokenizer, not on every call."""
    from jaxdec.drafters import draft_model

    calls = []
    check = draft_model.check_vocabularies
    monkeypatch.setattr(draft_model, "check_vocabularies",
                        lambda target, draft: calls.append(target) or check(target, draft))
    model = loaded("llama-gqa")
    drafter = DraftModel(model)
    first = drafter.prepare(model)
    assert drafter.prepare(model) is first and calls == [model]
    retokenized = dataclasses.replace(model, tokenizer=object())  # checked again
    assert drafter.prepare(retokenized) is first and calls == [model, retokenized]


def test_a_draft_of_another_tokenizer_is_refused(loaded):
    """Where both models carry a tokenizer they are compared, also at equal vocabulary sizes
    (such a draft drafts ids that mean other text: it was taken, and never right)."""
    from tokenizers import Tokenizer, models

    def words(prefix, n):
        return Tokenizer(models.WordLevel({f"{prefix}{i}": i for i in range(n)},
                                          unk_token=f"{prefix}0"))

    model = loaded("llama-gqa")
    V = model.config.vocab_size
    target = dataclasses.replace(model, tokenizer=words("a", V))
    for draft_tokenizer in (words("b", V), words("a", V - 1)):
        draft = dataclasses.replace(model, tokenizer=draft_tokenizer)
        with pytest.raises(ValueError, match="the draft's tokenizer differs from the target's"):
            DraftModel(draft).prepare(target)
    assert DraftModel(dataclasses.replace(model, tokenizer=words("a", V))).prepare(target)


def test_candidates_topology_budget():
    t = candidates_topology(3, 2)
    assert t.num_nodes == 7 and t.max_depth == 2 and t.max_children == 3
    # (depth 0 gave chains of one token each; no candidates, the root alone)
    for bad, name in [((2, 0), "depth"), ((0, 3), "num_candidates"), ((2.5, 2), "num_candidates")]:
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            candidates_topology(*bad)


def _one_width(tokens, width=32):
    """[1, width]: `tokens` padded at the end, so calls on every length share one program."""
    row = np.zeros((1, width), np.int32)
    row[0, : len(tokens)] = tokens
    return row


def _next_token_logits(model, context):
    """The model's logits after `context` (a causal forward: the padding after it changes
    nothing before it)."""
    return np.asarray(jaxdec.forward(model, _one_width(context))[0, len(context) - 1])


@pytest.mark.parametrize("topology", [tree.kary(2, 2), tree.from_choices([[1], [1, 0]])],
                         ids=["kary", "chain-of-second-best"])
def test_draft_model_topk_tree_follows_the_draft(loaded, topology):
    """Each drafted child is the parent's rank-th most likely token under the draft itself
    (a chain of other ranks than 0 too: it drafted the best token)."""
    model = loaded("llama-gqa")
    prompt = [5, 9, 31, 2]
    drafter = DraftModel(model).prepare(model)
    state = drafter.init(jnp.array([prompt]), jnp.array([4]), max_len=16)
    proposal, _ = drafter.propose(state, jnp.array([prompt[-1]]), state.cache.lengths,
                                  jax.random.PRNGKey(0), topology=topology,
                                  sampler=jaxdec.Greedy())
    tokens = np.asarray(proposal.tree.tokens[0])
    for node in range(1, topology.num_nodes):
        path, p = [], node
        while p > 0:
            path.append(int(tokens[p]))
            p = topology.parents[p]
        context = prompt + path[::-1][:-1]
        logits = _next_token_logits(model, context)
        assert tokens[node] == np.argsort(-logits)[topology.ranks[node]]


def test_a_tree_wider_than_the_vocabulary_is_named(loaded):
    model = loaded("llama-gqa")
    V = model.config.vocab_size
    drafter = DraftModel(model).prepare(model)
    state = drafter.init(jnp.array([[5, 9]]), jnp.array([2]), max_len=16)
    for topology in (tree.from_choices([[0], [V]]), tree.dynamic(2, V + 1)):
        with pytest.raises(ValueError, match=f"tree: a node has {V + 1} children, more than "
                                             f"the vocabulary's {V} tokens"):
            drafter.propose(state, jnp.array([9]), state.cache.lengths, jax.random.PRNGKey(0),
                            topology=topology, sampler=jaxdec.Greedy())


@pytest.mark.parametrize("topology", [tree.chain(3), tree.kary(2, 2)], ids=["chain", "tree"])
def test_draft_model_steps_keep_the_draft_cache_one_token_behind(loaded, topology):
    """The draft holds back the last committed token for the next step's first level. Over
    steps that keep 1..D+1 tokens along different paths (and a step that keeps none), every
    drafted node is the draft's own rank-th choice after its ancestors, and the draft's cache
    holds exactly the keys and values a prefill of the committed tokens but the last two
    writes (a chain: one token a level; a tree: all slots a level, the path compacted)."""
    from jaxdec.verify import Verdict

    model = loaded("llama-gqa")
    D, max_len = topology.max_depth, 40
    drafter = DraftModel(model).prepare(model)
    rows = [[5, 9, 31, 2], [7]]  # the second: a 1-token prompt (nothing held back at first)
    tokens = np.zeros((2, 4), np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    state = drafter.init(jnp.asarray(tokens), jnp.array([len(r) for r in rows]), max_len=max_len)
    propose = jax.jit(lambda st, root, n: drafter.propose(
        st, root, n, jax.random.PRNGKey(0), topology=topology, sampler=jaxdec.Greedy()))
    update = jax.jit(drafter.update)
    parents = np.asarray(topology.parents)
    children = [np.flatnonzero(parents == i) for i in range(topology.num_nodes)]
    # Row 1 keeps nothing in its first two steps (an inactive row: its state must not move),
    # so the next step's rows differ in holding a token back.
    keeps = [[2, 0], [D + 1, 0], [1, D + 1], [3, 2], [D + 1, D + 1], [1, 3]]
    started = [False, False]
    for step, keep in enumerate(keeps):
        roots = jnp.array([r[-1] for r in rows])
        proposal, state = propose(state, roots, jnp.array([len(r) - 1 for r in rows]))
        assert proposal.chain == topology.is_chain
        drafted = np.asarray(proposal.tree.tokens)
        path = np.zeros((2, D + 1), np.int32)
        emitted = np.zeros((2, D + 1), np.int32)
        for b, r in enumerate(rows):
            for node in range(1, topology.num_nodes):  # the draft's rank-th choice
                ancestors, p = [], topology.parents[node]
                while p > 0:
                    ancestors.append(int(drafted[b, p]))
                    p = topology.parents[p]
                logits = _next_token_logits(model, r + ancestors[::-1])
                assert drafted[b, node] == np.argsort(-logits)[topology.ranks[node]], (step, b)
            for j in range(1, keep[b]):  # accept keep - 1 nodes, a different child each step
                options = children[path[b, j - 1]]
                path[b, j] = options[(step + b + j) % len(options)]
            # The step emits the path's nodes, then a bonus token.
            emitted[b, : max(keep[b] - 1, 0)] = drafted[b, path[b, 1:keep[b]]]
            if keep[b]:
                emitted[b, keep[b] - 1] = 60 + step
            rows[b] = r + emitted[b, : keep[b]].tolist()
        verdict = Verdict(path=jnp.asarray(path), n_path=jnp.array(keep),
                          bonus=jnp.asarray(emitted[:, 0]))
        state = update(state, proposal, verdict, jnp.array(keep), jnp.asarray(emitted))
        for b, r in enumerate(rows):
            # A row that has kept tokens holds back the last one; before, none.
            started[b] |= keep[b] > 0
            held = len(r) - 1 - started[b]
            assert int(state.cache.lengths[b]) == held, (step, b)
            assert int(state.pending[b]) == started[b]
            if started[b]:
                assert int(state.previous[b]) == r[-2]
            prefill = drafter.init(jnp.asarray(_one_width(r)), jnp.array([len(r)]),
                                   max_len=max_len).cache
            for got, want in zip(state.cache.layers, prefill.layers):
                np.testing.assert_allclose(got.k[b, :held], want.k[0, :held], atol=1e-5)
                np.testing.assert_allclose(got.v[b, :held], want.v[0, :held], atol=1e-5)


def test_draft_model_resume_prefills_only_the_rest():
    """`resume` (a PrefixCache's next call): a draft cache that holds each row's first kept
    tokens, prefilled with the rest, holds what `init` on the whole prompts writes; a
    drafter without state of its own resumes with `init` itself."""
    model = jaxdec.init_model(jaxdec.ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, max_position_embeddings=64), jax.random.PRNGKey(3))
    drafter = DraftModel(model).prepare(model)
    rows, kept, max_len = [[5, 9, 31, 2, 7, 8, 1], [3, 4, 6, 10]], [4, 1], 24
    whole = np.zeros((2, 8), np.int32)
    first = np.zeros((2, 4), np.int32)
    rest = np.zeros((2, 8), np.int32)
    for b, (r, k) in enumerate(zip(rows, kept)):
        whole[b, : len(r)] = r
        first[b, :k] = r[:k]
        rest[b, : len(r) - k] = r[k:]
    lengths = jnp.array([len(r) for r in rows])
    # `init` on the first tokens (+ 1: init holds all but the last), then garbage after them.
    state = drafter.init(jnp.asarray(first), jnp.array(kept) + 1, max_len=max_len)
    state = dataclasses.replace(state, pending=jnp.ones(2, jnp.int32))
    resumed = drafter.resume(state, jnp.asarray(whole), lengths, jnp.asarray(rest),
                             jnp.array(kept), max_len=max_len)
    want = drafter.init(jnp.asarray(whole), lengths, max_len=max_len)
    np.testing.assert_array_equal(resumed.cache.lengths, lengths - 1)
    np.testing.assert_array_equal(drafter.held_length(resumed), lengths - 1)
    np.testing.assert_array_equal(resumed.pending, want.pending)
    for got, ref in zip(resumed.cache.layers, want.cache.layers):
        for b, r in enumerate(rows):
            np.testing.assert_allclose(got.k[b, : len(r) - 1], ref.k[b, : len(r) - 1],
                                       atol=1e-5)
            np.testing.assert_allclose(got.v[b, : len(r) - 1], ref.v[b, : len(r) - 1],
                                       atol=1e-5)
    with pytest.raises(ValueError, match="the draft's cache has 24 slots, the target's 32"):
        drafter.resume(state, jnp.asarray(whole), lengths, jnp.asarray(rest), jnp.array(kept),
                       max_len=32)
    lookup = PromptLookup()
    again = lookup.resume(None, jnp.asarray(whole), lengths, jnp.asarray(rest), jnp.array(kept),
                          max_len=max_len)
    fresh = lookup.init(jnp.asarray(whole), lengths, max_len=max_len)
    assert lookup.held_length(again) is None
    for got, ref in zip(jax.tree.leaves(again), jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(got, ref)


def test_draft_model_dynamic_tree_against_brute_force(loaded):
    """A dynamic tree (EAGLE-2) drafted level by level equals one built from full forwards:
    each level expands the `width` best children of the nodes expanded before it (by path
    log-probability under the draft), and the tree holds the root and the best of all the
    drafted nodes, in depth order; ancestors are the parents' closure, and `slots` say where
    the draft's cache holds each expanded node (1 + its expansion order)."""
    from jax.nn import log_softmax

    model = loaded("llama-gqa")
    drafter = DraftModel(model).prepare(model)
    rows = [[5, 9, 31, 2], [7, 3]]
    tokens = np.zeros((2, 4), np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    lengths = jnp.array([len(r) for r in rows])
    state = drafter.init(jnp.asarray(tokens), lengths, max_len=32)
    for spec in (tree.dynamic(3, 2, 9), tree.dynamic(3, 3, 5)):
        D, W, N = spec.depth, spec.width, spec.num_nodes
        proposal, _ = drafter.propose(state, jnp.array([r[-1] for r in rows]), lengths - 1,
                                      jax.random.PRNGKey(0), topology=spec,
                                      sampler=jaxdec.Greedy())
        assert proposal.kind is ProposalKind.DETERMINISTIC and not proposal.chain
        got = jax.tree.map(np.asarray, proposal.tree)
        np.testing.assert_array_equal(got.ancestors, np.asarray(tree.ancestor_mask(
            proposal.tree.parents, proposal.tree.valid)))
        for b, prompt in enumerate(rows):
            def logp(path):
                return np.asarray(log_softmax(_next_token_logits(model, prompt + list(path))))

            frontier, expanded, drafted = [((), 0.0)], [()], []
            for level in range(D):
                children = []
                for path, score in frontier:
                    lp = logp(path)
                    children += [(path + (int(t),), score + lp[t])
                                 for t in np.argsort(-lp)[:W]]
                children.sort(key=lambda c: -c[1])
                frontier = children[:W] if level < D - 1 else []
                expanded += [path for path, _ in frontier]
                drafted += children
            best = [path for path, _ in sorted(drafted, key=lambda c: -c[1])[: N - 1]]
            paths = []
            for i in range(N):
                path, j = [], i
                while j > 0:
                    path.append(int(got.tokens[b, j]))
                    j = int(got.parents[b, j])
                paths.append(tuple(path[::-1]))
            assert got.valid[b].all() and got.tokens[b, 0] == prompt[-1]
            assert paths[0] == () and sorted(paths[1:]) == sorted(best), spec
            assert all(got.parents[b, i] < i for i in range(1, N))
            np.testing.assert_array_equal(got.depth[b], [len(p) for p in paths])
            want_slots = [1 + expanded.index(p) if p in expanded else 0 for p in paths]
            want_slots[0] = 1
            np.testing.assert_array_equal(np.asarray(proposal.slots)[b], want_slots)


def test_reprs_are_short_and_say_what_matters(loaded):
    """A Model's repr printed every parameter's values (48K characters for the demo's 2M
    target); drafters and sessions had only their addresses."""
    model = loaded("llama-gqa")
    text = repr(model)
    count = sum(x.size for x in jax.tree.leaves(model.params))
    assert len(text) < 1500 and f"params=<{count:,} float32>" in text
    assert " int>, mesh=" in repr(jax.tree.map(lambda x: 0, model))  # never raises
    assert "mesh=<dp=1, tp=1>" in text and "attention='auto'" in text
    lookup = jaxdec.drafters.PromptLookup(depth=4)
    assert repr(lookup) == ("PromptLookup(max_ngram=3, min_ngram=1, depth=4, "
                            "num_candidates=3)")
    assert repr(jaxdec.drafters.Retrieval(np.arange(50))).startswith("Retrieval(<50 tokens>")
    assert repr(jaxdec.drafters.DraftModel(model)).startswith(
        f"DraftModel(<{model.config.num_layers} layers")
    session = jaxdec.PrefixCache(model, max_len=32, drafter=lookup)
    session.generate([3, 4, 5], max_new_tokens=3)
    assert repr(session) == f"PrefixCache(max_len=32, rows=1, holding=5 tokens, drafter={lookup!r})"
