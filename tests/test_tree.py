"""Token trees: builders, validation, and tries merged from candidate continuations."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdec import tree


def test_chain():
    t = tree.chain(3)
    assert t.parents == (-1, 0, 1, 2) and t.ranks == (0, 0, 0, 0)
    np.testing.assert_array_equal(t.depth, [0, 1, 2, 3])
    np.testing.assert_array_equal(t.ancestors, np.tril(np.ones((4, 4), bool)))
    np.testing.assert_array_equal(t.children, [[1], [2], [3], [-1]])
    assert (t.num_nodes, t.max_depth, t.max_children) == (4, 3, 1)
    assert t.is_chain and tree.from_choices([[0], [0, 0]]).is_chain
    assert not tree.kary(2, 2).is_chain and not tree.from_parents([-1, 0, 0]).is_chain


def test_kary_breadth_first():
    t = tree.kary(2, 2)
    assert t.parents == (-1, 0, 0, 1, 1, 2, 2)
    assert t.ranks == (0, 0, 1, 0, 1, 0, 1)
    np.testing.assert_array_equal(t.depth, [0, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(t.children[:3], [[1, 2], [3, 4], [5, 6]])
    assert t.ancestors[6].tolist() == [True, False, True, False, False, False, True]


def test_from_choices_medusa_style():
    t = tree.from_choices([[0, 1], [1], [0], [0, 0], [2]])
    # depth 1: [0], [1], [2]; depth 2: [0, 0], [0, 1]
    assert t.parents == (-1, 0, 0, 0, 1, 1)
    assert t.ranks == (0, 0, 1, 2, 0, 1)
    assert t.ranks_contiguous
    gappy = tree.from_choices([[1], [0], [0, 2]])
    assert not gappy.ranks_contiguous
    with pytest.raises(ValueError, match=r"choice \[1, 0\] has no parent"):
        tree.from_choices([[0], [1, 0]])
    with pytest.raises(ValueError, match="empty"):
        tree.from_choices([[]])
    # Ranks are ints (numpy's too), never rounded or parsed; a path given twice counts once.
    assert tree.from_choices(np.array([[0], [1]])) == tree.from_choices([(0,), [1], [1]])
    assert tree.from_choices(p for p in [[0], [1]]) == tree.from_choices([[0], [1]])
    for bad in ([[0.5]], [["0"]], [[True]], [[-1]]):
        with pytest.raises(ValueError, match="child ranks must be ints >= 0"):
            tree.from_choices(bad)
    with pytest.raises(ValueError, match="list of lists of child ranks"):
        tree.from_choices("[[0]]")


@pytest.mark.parametrize("parents,match", [
    ([0, 0], "node 0 must be the root"),
    ([-1, 0, -1], "second root"),
    ([-1, 2, 1], "parents must come before their children"),  # a cycle 1 <-> 2
    ([-1, 1], "parents must come before"),  # its own parent
    ([-1] + [0] * tree.MAX_NODES, "at most"),
    ([], "at least its root"),
    ([-1, 0.7, 1.9], "parents must be ints, got 0.7"),  # was truncated to [-1, 0, 1]
    (["-1", "0"], "parents must be ints"),
])
def test_invalid_trees(parents, match):
    with pytest.raises(ValueError, match=match):
        tree.from_parents(parents)


def test_invalid_ranks_and_arguments():
    for ranks, match in [([0, 0.5], "child ranks must be ints"), ([0, -1], "ints >= 0"),
                         ([0, 5 * 10**7], "child ranks must be < 256"), ([0], "one"),
                         ([3, 0], "the root has no siblings: its rank must be 0, got 3")]:
        with pytest.raises(ValueError, match=match):
            tree.from_parents([-1, 0], ranks=ranks)
    with pytest.raises(ValueError, match="must be < 256"):  # not a 1 GB children table first
        tree.from_choices([[0], [5 * 10**7]])
    with pytest.raises(TypeError, match="parents must be a list"):
        tree.from_parents(None)
    with pytest.raises(TypeError, match="ranks must be a list"):
        tree.from_parents([-1, 0], ranks="01")
    assert tree.from_parents(np.array([-1, 0, 0]), ranks=np.array([0, 1, 0])).ranks == (0, 1, 0)


def test_builder_arguments_and_specs():
    with pytest.raises(ValueError, match="chain length"):
        tree.chain(0)
    with pytest.raises(ValueError, match="width"):
        tree.kary(2, 0)
    with pytest.raises(ValueError, match="more than"):
        tree.kary(8, 3)
    with pytest.raises(ValueError, match="more than 256 nodes"):
        tree.kary(10**6, 2)  # at once: the count stops past MAX_NODES
    for spec in (lambda: tree.chain(10**23), lambda: tree.parse("chain:" + "9" * 23)):
        with pytest.raises(ValueError, match="at most 256 nodes"):  # (an OverflowError)
            spec()
    with pytest.raises(ValueError, match="at least one path"):
        tree.from_choices([])
    with pytest.raises(ValueError, match="bad tree spec.*at least one path"):
        tree.parse("[]")
    with pytest.raises(ValueError, match=r"bad tree spec '\[\[\[.*maximum recursion depth"):
        tree.parse("[" * 100_000 + "]" * 100_000)  # (json's RecursionError)
    with pytest.raises(ValueError, match="tree is the root alone"):
        tree.as_topology(tree.from_parents([-1]))
    assert tree.parse("chain:5") == tree.chain(5) == tree.chain(np.int64(5))  # numpy ints too
    assert tree.kary(np.int32(2), np.int64(3)) == tree.kary(2, 3)
    assert tree.parse("kary:2:3") == tree.kary(2, 3)
    assert tree.parse("[[0],[1],[0,0]]") == tree.from_choices([[0], [1], [0, 0]])
    with pytest.raises(ValueError, match="bad tree spec"):
        tree.parse("star:3")
    with pytest.raises(TypeError, match="Topology"):
        tree.as_topology([0, 1])
    for spec in ("chain:3_0", "chain:\u0663", "kary:2: 3", "chain:-1"):  # int() took the first two
        with pytest.raises(ValueError, match="bad tree spec"):
            tree.parse(spec)
    for spec in ("kary:2", "kary:2:3:4"):  # ("not enough values to unpack")
        with pytest.raises(ValueError, match="bad tree spec.*: kary takes DEPTH:WIDTH, got"):
            tree.parse(spec)
    for spec in (3, None):
        with pytest.raises(TypeError, match="a tree spec is a string"):
            tree.parse(spec)


def test_dynamic_tree_budgets():
    spec = tree.dynamic(3, 2)  # the root and 2 expanded nodes a level but the last, 2 more
    assert (spec.num_nodes, spec.max_depth, spec.expanded, spec.max_children) == (7, 3, 5, 2)
    assert not spec.is_chain and hash(spec) == hash(tree.dynamic(3, 2, 7))
    assert tree.dynamic(1, 3).num_nodes == 4  # the root's 3 children, all leaves
    assert tree.dynamic(2, 3, 13).num_nodes == 13  # every drafted node: 1 + 3 + 9
    assert tree.parse("dynamic:4:3:20") == tree.dynamic(4, 3, 20) == tree.as_topology(
        tree.dynamic(np.int64(4), 3, 20))
    assert tree.parse("dynamic:3:2") == spec
    assert tree.dynamic(3, 2, 2).num_nodes == 2  # the root and the draft's best node
    for args, match in [((0, 2), "depth"), ((2, 0), "width"), ((3, 2, 1), "takes 2 to 11 nodes"),
                        ((3, 2, 12), "takes 2 to 11 nodes"), ((3, 12, 300), "at most 256"),
                        ((10**6, 1, 3), "expands 1000000 nodes"),
                        ((1, 300), r"got nodes \(default 301: expanded \+ width\): pass nodes "
                                   "<= 256"),
                        ((14, 20, 256), "expands 261 nodes .* pass a smaller depth or width"),
                        ((14, 20), "expands 261 nodes")]:  # (its default nodes was blamed)
        with pytest.raises(ValueError, match=match):
            tree.dynamic(*args)
    assert tree.parse("dynamic:3") == tree.dynamic(3)  # width 4
    with pytest.raises(ValueError, match=r"bad tree spec.*dynamic:D\[:W\[:N\]\]"):
        tree.parse("dynamic:3:x")


def test_template_and_positions():
    t = tree.kary(1, 3).template(batch=2)
    assert t.tokens.shape == (2, 4) and t.ancestors.shape == (2, 4, 4)
    np.testing.assert_array_equal(t.positions(jnp.array([10, 20])), [[10, 11, 11, 11],
                                                                      [20, 21, 21, 21]])


def test_trie_from_candidates_hand_computed():
    cands = jnp.array([[[1, 2, 3], [1, 2, 4], [5, 6, 7]]])
    valid = jnp.ones((1, 3, 3), bool)
    t = tree.from_candidates(jnp.array([9]), cands, valid, num_nodes=8)
    # Breadth first: depth 1 {1, 5}, depth 2 {2, 6}, depth 3 {3, 4, 7}.
    np.testing.assert_array_equal(t.tokens[0], [9, 1, 5, 2, 6, 3, 4, 7])
    np.testing.assert_array_equal(t.parents[0], [-1, 0, 0, 1, 2, 3, 3, 4])
    np.testing.assert_array_equal(t.depth[0], [0, 1, 1, 2, 2, 3, 3, 3])
    assert t.valid[0].all()
    expected = tree.from_parents([-1, 0, 0, 1, 2, 3, 3, 4]).ancestors
    np.testing.assert_array_equal(t.ancestors[0], expected)


def test_trie_arguments_are_checked():
    cands, valid, root = jnp.ones((1, 2, 2), jnp.int32), jnp.ones((1, 2, 2), bool), jnp.array([0])
    for nodes, match in [(0, "num_nodes must be an int >= 2"), (2.5, "num_nodes"),
                         (300, "at most 256 nodes")]:
        with pytest.raises(ValueError, match=match):
            tree.from_candidates(root, cands, valid, nodes)
    with pytest.raises(TypeError, match="candidates must be an integer"):
        tree.from_candidates(root, cands.astype(jnp.float32) + 0.5, valid, 4)
    with pytest.raises(ValueError, match="cand_valid_BCD must have"):
        tree.from_candidates(root, cands, valid[:, :1], 4)
    with pytest.raises(ValueError, match=r"root_B must be \[B\] = \[1\] .*got \(3,\)"):
        tree.from_candidates(jnp.zeros(3, jnp.int32), cands, valid, 4)
    for shape in ((1, 0, 2), (1, 2, 0)):  # (numpy's empty-argmax error)
        with pytest.raises(ValueError, match=r"holds no candidate tokens \(C and D must be"):
            tree.from_candidates(root, jnp.zeros(shape, jnp.int32), jnp.zeros(shape, bool), 4)
    with pytest.raises(ValueError, match="parents_BN and valid_BN must both be"):
        tree.ancestor_mask(jnp.array([-1, 0]), jnp.array([True, True]))


def test_trie_budget_keeps_the_shallow_nodes_and_skips_missing_tokens():
    cands = jnp.array([[[1, 2, 3], [1, 2, 4], [5, 6, 7]]])
    valid = jnp.array([[[1, 1, 1], [1, 1, 1], [1, 0, 1]]], bool)  # candidate 2 stops after 5
    t = tree.from_candidates(jnp.array([9]), cands, valid, num_nodes=5)
    np.testing.assert_array_equal(t.tokens[0], [9, 1, 5, 2, 3])
    np.testing.assert_array_equal(t.parents[0], [-1, 0, 0, 1, 3])
    assert t.valid[0].all()
    none = tree.from_candidates(jnp.array([9]), cands, jnp.zeros_like(valid), num_nodes=5)
    np.testing.assert_array_equal(none.valid[0], [True, False, False, False, False])


@pytest.mark.parametrize("seed", range(4))
def test_trie_ancestors_are_the_parents_closure(seed):
    """from_candidates writes the ancestor mask directly from the candidates' paths: the same
    as walking the trie's parents (`ancestor_mask`), with repeated prefixes, stops, and budgets
    that cut the trie."""
    rs = np.random.RandomState(seed)
    B, C, D = 3, 5, 4
    cands = jnp.asarray(rs.randint(0, 3, (B, C, D)))  # 3 tokens: many shared prefixes
    stops = rs.randint(0, D + 1, (B, C))
    valid = jnp.asarray(np.arange(D)[None, None, :] < stops[:, :, None])
    for num_nodes in (4, 9, 21):
        t = tree.from_candidates(jnp.arange(B), cands, valid, num_nodes=num_nodes)
        np.testing.assert_array_equal(t.ancestors, tree.ancestor_mask(t.parents, t.valid))


def test_ancestor_mask_matches_the_static_one():
    rs = np.random.RandomState(0)
    parents = [-1] + [int(rs.randint(0, i)) for i in range(1, 12)]
    static = tree.from_parents(parents).ancestors
    dynamic = tree.ancestor_mask(jnp.array([parents]), jnp.ones((1, 12), bool))
    np.testing.assert_array_equal(dynamic[0], static)


@pytest.mark.parametrize("N", [1, 2, 5, 17, 33])
def test_ancestor_mask_batched_with_invalid_nodes(N):
    """Rows with random trees, one deep chain, and invalid nodes (which see only themselves;
    a valid child of one inherits just that node), against walking the parents by hand."""
    rs = np.random.RandomState(N)
    parents = np.array([[-1] + [int(rs.randint(0, i)) for i in range(1, N)],
                        [-1] + list(range(N - 1)),
                        [-1] + [int(rs.randint(max(0, i - 2), i)) for i in range(1, N)]])
    valid = rs.rand(3, N) < 0.8
    valid[:, 0] = True
    valid[1] = True
    want = np.zeros((3, N, N), bool)
    for b in range(3):
        for i in range(N):
            want[b, i, i] = True
            node = i
            while valid[b, node] and parents[b, node] >= 0:
                node = parents[b, node]
                want[b, i, node] = True
    got = tree.ancestor_mask(jnp.asarray(parents), jnp.asarray(valid))
    np.testing.assert_array_equal(got, want)
