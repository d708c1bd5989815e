"""Verification rules: hand-computed greedy walks, and statistical losslessness of every rule
against synthetic target / draft distributions (with a deliberately wrong verifier to show
the test has power)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import gammaincc

from jaxdec import Greedy, Sampler, tree, verify
from jaxdec.verify import ProposalKind, Verdict, emitted_tokens


def _tree_of(topology, tokens, valid=None):
    t = topology.template(len(tokens))
    valid = t.valid if valid is None else jnp.asarray(valid, bool)
    return t.__class__(tokens=jnp.asarray(tokens, jnp.int32), parents=t.parents, depth=t.depth,
                       valid=valid, ancestors=t.ancestors)


def _logits_with_argmax(argmax_BN, V=10):
    return jax.nn.one_hot(jnp.asarray(argmax_BN), V) * 5.0


@pytest.mark.parametrize("argmax,path,bonus,emitted", [
    ([3, 4, 5, 0], [0, 1, 2, 3], 0, [3, 4, 5, 0]),  # everything accepted, then the bonus
    ([3, 2, 5, 0], [0, 1, 0, 0], 2, [3, 2]),  # rejected at depth 2
    ([1, 4, 5, 0], [0, 0, 0, 0], 1, [1]),  # rejected at once
])
def test_greedy_chain_hand_computed(argmax, path, bonus, emitted):
    t = _tree_of(tree.chain(3), [[9, 3, 4, 5]])
    v = verify.verify(t, _logits_with_argmax([argmax]), sampler=Greedy(),
                      key=jax.random.PRNGKey(0), max_depth=3)
    np.testing.assert_array_equal(v.path[0], path)
    assert int(v.n_path[0]) == len(emitted) and int(v.bonus[0]) == bonus
    np.testing.assert_array_equal(emitted_tokens(t, v)[0, : len(emitted)], emitted)


def test_greedy_tree_picks_the_matching_child_and_skips_invalid_nodes():
    t = _tree_of(tree.kary(1, 3), [[9, 7, 8, 9], [9, 7, 8, 9]],
                 valid=[[1, 1, 1, 1], [1, 1, 1, 0]])
    v = verify.verify(t, _logits_with_argmax([[9, 0, 0, 4], [9, 0, 0, 4]]), sampler=Greedy(),
                      key=jax.random.PRNGKey(0), max_depth=1)
    np.testing.assert_array_equal(v.path, [[0, 3], [0, 0]])
    np.testing.assert_array_equal(v.n_path, [2, 1])
    np.testing.assert_array_equal(v.bonus, [4, 9])  # row 1: node 3 is invalid


def _walk_by_hand(parents, tokens, valid, next_tokens, max_depth):
    """The walk level by level: from the root, the first valid child whose token is the
    target's next token at the current node."""
    cur, path = 0, [0]
    for _ in range(max_depth):
        children = [i for i in range(len(parents)) if parents[i] == cur and valid[i]
                    and tokens[i] == next_tokens[cur]]
        if not children:
            break
        cur = children[0]
        path.append(cur)
    return path + [0] * (max_depth + 1 - len(path)), len(path), next_tokens[cur]


@pytest.mark.parametrize("seed", range(6))
def test_matching_walk_equals_the_walk_by_hand(seed):
    """Random trees over 2 tokens (siblings repeat tokens: the first matching one is taken,
    even when a later one leads deeper), invalid nodes, and depth limits below the tree's."""
    rs = np.random.RandomState(seed)
    B, N = 4, 12
    parents = np.array([[-1] + [int(rs.randint(0, i)) for i in range(1, N)] for _ in range(B)])
    depth = np.zeros((B, N), np.int32)
    for b in range(B):
        for i in range(1, N):
            depth[b, i] = depth[b, parents[b, i]] + 1
    tokens = rs.randint(0, 2, (B, N))
    valid = rs.rand(B, N) < 0.85
    valid[:, 0] = True
    anc = tree.ancestor_mask(jnp.asarray(parents), jnp.asarray(valid))
    t = tree.TokenTree(tokens=jnp.asarray(tokens, jnp.int32), parents=jnp.asarray(parents, jnp.int32),
                       depth=jnp.asarray(depth), valid=jnp.asarray(valid), ancestors=anc)
    next_tokens = rs.randint(0, 2, (B, N))
    for max_depth in (1, 3, int(depth.max())):
        v = verify._walk_matching(t, jnp.asarray(next_tokens, jnp.int32), max_depth)
        for b in range(B):
            path, n_path, bonus = _walk_by_hand(parents[b], tokens[b], valid[b], next_tokens[b],
                                                max_depth)
            np.testing.assert_array_equal(v.path[b], path)
            assert int(v.n_path[b]) == n_path and int(v.bonus[b]) == bonus


def test_certain_draft_is_always_accepted_by_rejection_sampling():
    t = _tree_of(tree.chain(2), [[0, 1, 2]] * 4)
    logits = jnp.log(jax.nn.one_hot(jnp.array([[1, 2, 3]] * 4), 4) + 1e-30)
    q = jax.nn.one_hot(jnp.array([[1, 2, 0]] * 4), 4)
    v = verify.verify(t, logits, sampler=Sampler(), key=jax.random.PRNGKey(0), max_depth=2,
                      kind=ProposalKind.IID, q_BNV=q, topology=tree.chain(2))
    np.testing.assert_array_equal(v.n_path, 3)
    np.testing.assert_array_equal(v.bonus, 3)


@pytest.mark.parametrize("kind", [ProposalKind.IID, ProposalKind.WITHOUT_REPLACEMENT])
def test_sampled_walks_past_the_unrolled_lengths(kind):
    """The walk is rolled into loops beyond a few levels or children: a chain of 20 certain
    levels rejected at the 14th (its token has no target probability), and a star of 12
    children where only the 11th has any, walk as by hand."""
    V = 16
    drafted = np.arange(21) % 8  # node i's token; the target's certain next token below
    target_next = np.roll(drafted, -1)
    target_next[13] = 9  # at node 13 the target wants 9, the draft proposed drafted[14]
    t = _tree_of(tree.chain(20), [drafted] * 2)
    logits = jnp.log(jax.nn.one_hot(jnp.asarray([target_next] * 2), V) + 1e-30)
    q = jax.nn.one_hot(jnp.asarray([target_next] * 2), V).at[:, 13].set(
        jax.nn.one_hot(drafted[14], V))
    v = verify.verify(t, logits, sampler=Sampler(), key=jax.random.PRNGKey(0), max_depth=20,
                      kind=kind, q_BNV=q, topology=tree.chain(20))
    np.testing.assert_array_equal(v.n_path, 14)
    np.testing.assert_array_equal(v.path[:, :14], [np.arange(14)] * 2)
    np.testing.assert_array_equal(v.path[:, 14:], 0)
    np.testing.assert_array_equal(v.bonus, 9)

    star = tree.kary(1, 12)
    t = _tree_of(star, [[15] + list(range(12))] * 2)
    logits = jnp.log(jax.nn.one_hot(jnp.full((2, 13), 10), V) + 1e-30)
    q = jnp.broadcast_to(jnp.where(jnp.arange(V) < 12, 1 / 12, 0.0), (2, 13, V))
    v = verify.verify(t, logits, sampler=Sampler(), key=jax.random.PRNGKey(1), max_depth=1,
                      kind=kind, q_BNV=q, topology=star)
    np.testing.assert_array_equal(v.path, [[0, 11]] * 2)
    np.testing.assert_array_equal(v.n_path, 2)
    np.testing.assert_array_equal(v.bonus, 10)  # the certain token after token 10


@pytest.mark.parametrize("kind", [ProposalKind.IID, ProposalKind.WITHOUT_REPLACEMENT])
def test_sampled_verification_of_no_levels_is_the_bonus_alone(kind):
    """max_depth 0 walks nothing: the root, and a bonus from p at the root."""
    t = _tree_of(tree.chain(1), [[5, 1]] * 2)
    logits = jnp.log(jax.nn.one_hot(jnp.full((2, 2), 3), 8) + 1e-30)
    v = verify.verify(t, logits, sampler=Sampler(), key=jax.random.PRNGKey(0), max_depth=0,
                      kind=kind, q_BNV=jnp.full((2, 2, 8), 1 / 8), topology=tree.chain(1))
    np.testing.assert_array_equal(v.path, [[0], [0]])
    np.testing.assert_array_equal(v.n_path, 1)
    np.testing.assert_array_equal(v.bonus, 3)


def test_sampled_verification_program_does_not_grow_with_depth():
    """The walk is a loop over levels, not one copy of its body per level (a sampled
    chain(64) compiled for minutes): chain(64)'s program is about as large as chain(16)'s."""
    sizes = {}
    for depth in (16, 64):
        topology = tree.chain(depth)
        t = topology.template(2)
        fn = jax.jit(lambda logits, q, key: verify.verify(
            t, logits, sampler=Sampler(), key=key, max_depth=depth, kind=ProposalKind.IID,
            q_BNV=q, topology=topology))
        shape = jax.ShapeDtypeStruct((2, depth + 1, 8), jnp.float32)
        sizes[depth] = len(fn.lower(shape, shape, jax.random.key(0)).as_text())
    assert sizes[64] < 1.2 * sizes[16], sizes


def test_acceptance_resolves_ratios_below_float32_uniforms(monkeypatch):
    """Acceptance tests u * q(x) < p(x) with u on a grid of 2**-46 (`sampling.fine_uniform`):
    on jax.random.uniform's grid of 2**-23 a draft token with p / q = 1e-12 was accepted
    whenever u was 0, 2**-23 of the time (100 million rows: 8 acceptances, 1e-4 expected).
    p >= q accepts whatever u rounds to."""
    from jaxdec import sampling

    u = np.asarray(sampling.fine_uniform(jax.random.key(0), (1 << 20,)))
    assert u.dtype == np.float32 and 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 2e-3
    small = u[u < 2.0**-10]            # ~1024 of them, each on the fine grid, not 2**-23's
    assert 900 < small.size < 1150 and np.mean(small * 2.0**23 % 1 != 0) > 0.99
    assert sampling.fine_uniform(jax.random.key(0), (3,)).shape == (3,)

    def accepted(ratio, u, q=0.5):
        monkeypatch.setattr(sampling, "fine_uniform",
                            lambda key, shape: jnp.full(shape, u, jnp.float32))
        t = _tree_of(tree.chain(1), [[0, 1]])
        p_node = jnp.array([1 - ratio * q, ratio * q], jnp.float32)
        logits = jnp.log(jnp.stack([p_node, p_node]))[None]
        v = verify.verify(t, logits, sampler=Sampler(), key=jax.random.PRNGKey(0), max_depth=1,
                          kind=ProposalKind.IID, q_BNV=jnp.full((1, 2, 2), q, jnp.float32),
                          topology=tree.chain(1))
        return int(v.n_path[0]) == 2

    assert accepted(2.0**-30, 2.0**-31) and not accepted(2.0**-30, 2.0**-29)
    assert accepted(1.0, np.nextafter(np.float32(1), np.float32(0)))


# ------------------------------------------------------------- statistical losslessness

V = 6
N_ROWS = 30_000
P0 = np.array([0.30, 0.25, 0.2, 0.15, 0.07, 0.03])
Q0 = np.array([0.05, 0.1, 0.4, 0.25, 0.15, 0.05])
P2 = np.random.RandomState(0).dirichlet(np.ones(V), size=V)  # next-token law after token x
Q2 = np.random.RandomState(1).dirichlet(np.ones(V) * 0.7, size=V)


def _draw_children(key, q_BV, k, kind):
    B = q_BV.shape[0]
    logq = jnp.log(q_BV)
    if kind == ProposalKind.IID:
        return jax.random.categorical(key, logq[:, None, :], shape=(B, k))
    if kind == ProposalKind.WITHOUT_REPLACEMENT:
        return jax.lax.top_k(logq + jax.random.gumbel(key, logq.shape), k)[1]
    return jax.lax.top_k(logq, k)[1]


def _synthetic_step(kind, topology, sampler, seed):
    """Drafts a depth-2 tree per row from (Q0, Q2), verifies it against (P0, P2), and returns
    the first two output tokens (drawing the second from the target where the step emitted
    only one, as the next step would) and the accepted path lengths. One compiled program, as
    in the decoding loop (run eagerly, each operation compiled alone took 5-15 s a case); a
    new function each call, so it is traced anew (a patched verifier is seen)."""
    step = jax.jit(functools.partial(_synthetic_step_traced, kind, topology, sampler))
    return tuple(np.asarray(x) for x in step(jax.random.PRNGKey(seed)))


def _synthetic_step_traced(kind, topology, sampler, key):
    k1 = int(np.sum(np.array(topology.parents) == 0))
    k2 = topology.max_children
    kc, kg, kv, kn = jax.random.split(key, 4)
    B = N_ROWS
    first = _draw_children(kc, jnp.broadcast_to(jnp.asarray(Q0, jnp.float32), (B, V)), k1, kind)
    tokens = jnp.zeros((B, topology.num_nodes), jnp.int32)
    parents = np.array(topology.parents)
    ranks = np.array(topology.ranks)
    depth1 = np.where(parents == 0)[0]
    tokens = tokens.at[:, depth1].set(first[:, ranks[depth1]])
    for node in depth1:
        kids = np.where(parents == node)[0]
        if len(kids):
            q = jnp.asarray(Q2, jnp.float32)[tokens[:, node]]
            drawn = _draw_children(jax.random.fold_in(kg, int(node)), q, k2, kind)
            tokens = tokens.at[:, kids].set(drawn[:, ranks[kids]])
    depth = np.asarray(topology.depth)
    p_nodes = jnp.where((depth == 0)[None, :, None], jnp.asarray(P0, jnp.float32),
                        jnp.asarray(P2, jnp.float32)[tokens])
    q_nodes = jnp.where((depth == 0)[None, :, None], jnp.asarray(Q0, jnp.float32),
                        jnp.asarray(Q2, jnp.float32)[tokens])
    t = _tree_of(topology, tokens)
    v = verify.verify(t, jnp.log(p_nodes), sampler=sampler, key=kv,
                      max_depth=topology.max_depth, kind=kind, q_BNV=q_nodes, topology=topology)
    out = emitted_tokens(t, v)
    x1 = out[:, 0]
    p_next = sampler.probs(jnp.log(jnp.asarray(P2, jnp.float32))[x1])
    fallback = jax.random.categorical(kn, jnp.log(p_next))
    x2 = jnp.where(v.n_path >= 2, out[:, 1], fallback)
    return x1, x2, v.n_path


def _joint_p_value(x1, x2, sampler):
    p0 = np.asarray(sampler.probs(jnp.log(jnp.asarray(P0, jnp.float32))), np.float64)
    p2 = np.asarray(sampler.probs(jnp.log(jnp.asarray(P2, jnp.float32))), np.float64)
    joint = (p0[:, None] * p2).ravel()
    counts = np.bincount(x1 * V + x2, minlength=V * V).astype(np.float64)
    assert counts[joint == 0].sum() == 0, "an impossible pair was sampled"
    expected = len(x1) * joint
    keep = expected >= 5
    stat = np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep])
    stat += (counts[~keep].sum() - expected[~keep].sum()) ** 2 / max(expected[~keep].sum(), 1e-9)
    dof = int(keep.sum())
    return float(gammaincc(dof / 2, stat / 2))


CASES = [
    (ProposalKind.IID, tree.chain(2)),
    (ProposalKind.IID, tree.kary(2, 3)),
    (ProposalKind.WITHOUT_REPLACEMENT, tree.kary(2, 3)),
    (ProposalKind.DETERMINISTIC, tree.kary(2, 2)),
]
SAMPLERS = [Sampler(), Sampler(temperature=0.8, top_p=0.85)]


@pytest.mark.parametrize("kind,topology", CASES, ids=lambda x: getattr(x, "value", None))
@pytest.mark.parametrize("sampler", SAMPLERS, ids=["t1", "t0.8-p0.85"])
def test_verification_is_lossless(kind, topology, sampler):
    x1, x2, n_path = _synthetic_step(kind, topology, sampler, seed=7)
    assert _joint_p_value(x1, x2, sampler) > 1e-3
    assert n_path.mean() > 1.2  # the drafts are used, not just the bonus


def test_a_wrong_residual_fails_the_same_test(monkeypatch):
    """Drawing the bonus from p instead of the residual is biased; the test detects it."""
    monkeypatch.setattr(verify, "_residual", lambda r, q: r)
    sampler = Sampler()
    x1, x2, _ = _synthetic_step(ProposalKind.IID, tree.chain(2), sampler, seed=7)
    assert _joint_p_value(x1, x2, sampler) < 1e-6


@pytest.mark.parametrize("kind", [ProposalKind.WITHOUT_REPLACEMENT, ProposalKind.IID])
def test_an_invalid_sibling_keeps_sampled_verification_lossless(kind):
    """A child cut (the cache's end, a drafter) before a valid sibling drawn after it: without
    replacement, that sibling was drawn with the cut one's token removed, so it must not be
    tested against q with only the tested tokens removed (the first token's law was
    [0.016, 0.31, 0.33, 0.34] for p = [0.1, 0.2, 0.3, 0.4])."""
    p = np.array([0.1, 0.2, 0.3, 0.4])
    q = np.array([0.85, 0.05, 0.05, 0.05])
    topology = tree.from_parents([-1, 0, 0], ranks=[0, 1, 0])  # rank 0 is node 2
    B = N_ROWS

    @jax.jit
    def first_tokens(key):
        kd, kv = jax.random.split(key)
        logq = jnp.log(jnp.asarray(q, jnp.float32))
        draws = _draw_children(kd, jnp.broadcast_to(jnp.exp(logq), (B, 4)), 2, kind)
        tokens = jnp.zeros((B, 3), jnp.int32).at[:, 2].set(draws[:, 0]).at[:, 1].set(draws[:, 1])
        t = _tree_of(topology, tokens, jnp.broadcast_to(jnp.array([True, True, False]), (B, 3)))
        v = verify.verify(t, jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (B, 3, 4)),
                          sampler=Sampler(), key=kv, max_depth=1, kind=kind,
                          q_BNV=jnp.broadcast_to(jnp.exp(logq), (B, 3, 4)), topology=topology)
        return emitted_tokens(t, v)[:, 0]

    counts = np.bincount(np.asarray(first_tokens(jax.random.PRNGKey(3))), minlength=4)
    stat = float(np.sum((counts - B * p) ** 2 / (B * p)))
    assert float(gammaincc(3 / 2, stat / 2)) > 1e-3, counts / B


@pytest.mark.parametrize("kind", [ProposalKind.WITHOUT_REPLACEMENT, ProposalKind.IID])
def test_children_q_cannot_draw_are_never_accepted(kind):
    """Children q gives no probability: Gumbel-top-k wider than q's support fills the rest
    with such tokens (here the lowest ids past the support, ties at -inf), and a drafter of
    one's own may propose them. They were accepted whenever p had them (u * 0 < p(x)): the
    first token's law was [.05, .05, .9, 0, 0, 0] for p = [.05, .05, .3, .2, .2, .2]."""
    p = np.array([0.05, 0.05, 0.3, 0.2, 0.2, 0.2])
    q = np.array([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    topology = tree.kary(1, 4)
    B = N_ROWS

    @jax.jit
    def first_tokens(key):
        kd, kv = jax.random.split(key)
        qs = jnp.broadcast_to(jnp.asarray(q, jnp.float32), (B, 6))
        draws = _draw_children(kd, qs, 4, ProposalKind.WITHOUT_REPLACEMENT)
        if kind == ProposalKind.IID:  # two draws from q, then tokens it cannot draw
            draws = jnp.concatenate([_draw_children(kd, qs, 2, kind), draws[:, 2:]], axis=1)
        tokens = jnp.zeros((B, 5), jnp.int32).at[:, 1:].set(draws)
        t = _tree_of(topology, tokens)
        v = verify.verify(t, jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (B, 5, 6)),
                          sampler=Sampler(), key=kv, max_depth=1, kind=kind,
                          q_BNV=jnp.broadcast_to(jnp.asarray(q, jnp.float32), (B, 5, 6)),
                          topology=topology)
        return emitted_tokens(t, v)[:, 0]

    counts = np.bincount(np.asarray(first_tokens(jax.random.PRNGKey(3))), minlength=6)
    stat = float(np.sum((counts - B * p) ** 2 / (B * p)))
    assert float(gammaincc(5 / 2, stat / 2)) > 1e-3, counts / B


@pytest.mark.parametrize("kind", [ProposalKind.WITHOUT_REPLACEMENT, ProposalKind.IID])
def test_sampled_children_outside_the_vocabulary_are_never_accepted(kind):
    """A drafter of one's own marking ids outside [0, V) valid (-1 as "no draft", say): a
    negative id read q's mass of the last token, was accepted and reached the output (and,
    -1 being the stop list's padding, stopped its row); ids >= V were already refused."""
    V = 4
    t = _tree_of(tree.kary(1, 2), [[0, -1, V]] * 64)
    v = verify.verify(t, jnp.zeros((64, 3, V)), sampler=Sampler(), key=jax.random.PRNGKey(0),
                      max_depth=1, kind=kind, q_BNV=jnp.full((64, 3, V), 1.0 / V),
                      topology=tree.kary(1, 2))
    np.testing.assert_array_equal(v.n_path, 1)
    assert np.all((np.asarray(v.bonus) >= 0) & (np.asarray(v.bonus) < V))


def test_a_kind_given_by_its_value_is_that_kind():
    """`kind="without_replacement"` is the enum's value: it selects that rule (a string used
    to fall through to the IID rule); an unknown kind or sampler is named."""
    t = _tree_of(tree.chain(1), [[0, 1]])
    logits, q = jnp.zeros((1, 2, 4)), jnp.full((1, 2, 4), 0.25)
    args = dict(sampler=Sampler(), key=jax.random.PRNGKey(0), max_depth=1, q_BNV=q,
                topology=tree.chain(1))
    by_value = verify.verify(t, logits, kind="without_replacement", **args)
    by_enum = verify.verify(t, logits, kind=ProposalKind.WITHOUT_REPLACEMENT, **args)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), by_value, by_enum))
    with pytest.raises(ValueError, match="kind must be a ProposalKind"):
        verify.verify(t, logits, kind="withoutreplacement", **args)
    with pytest.raises(TypeError, match="sampler must be"):
        verify.verify(t, logits, **dict(args, sampler="greedy"))


def test_emitted_tokens_layout():
    t = _tree_of(tree.chain(2), [[9, 3, 4]])
    v = Verdict(path=jnp.array([[0, 1, 0]]), n_path=jnp.array([2]), bonus=jnp.array([7]))
    np.testing.assert_array_equal(emitted_tokens(t, v)[0, :2], [3, 7])


def test_sampled_children_need_a_static_tree():
    with pytest.raises(ValueError, match="static tree"):
        verify.check_proposal(ProposalKind.IID, None)
    with pytest.raises(ValueError, match="contiguous"):
        verify.check_proposal(ProposalKind.WITHOUT_REPLACEMENT, tree.from_choices([[1], [0], [0, 2]]))
    verify.check_proposal(ProposalKind.DETERMINISTIC, tree.from_choices([[1], [0], [0, 2]]))
    with pytest.raises(ValueError, match="static tree topology, got DynamicTree"):
        verify.check_proposal(ProposalKind.IID, tree.dynamic(2, 2))
    verify.check_proposal(ProposalKind.DETERMINISTIC, tree.dynamic(2, 2))
