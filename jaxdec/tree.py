"""Token trees for speculative decoding.

A tree has a static number of nodes N. Node 0 is the root: the last token already produced
(not yet in the cache); every other node is a draft token whose parent comes earlier
(`parents[i] < i`), so a forward over the N nodes in index order sees parents before
children. The target verifies all nodes in one forward under the ancestor mask, at positions
length + depth.

- `Topology`: a tree's static shape (parents and each node's rank among its siblings),
  hashable, so it can be a static argument to `jax.jit`. Built by `chain(k)`,
  `kary(depth, width)`, `from_choices(paths)` or `from_parents(parents)`, all validated.
- `DynamicTree`: a node, depth and width budget within which a drafter shapes each row's
  tree itself, every step (`dynamic(depth, width, nodes)`: EAGLE-2's dynamic trees).
- `TokenTree`: a pytree of per-row arrays [..., N] (tokens, parents, depth, valid, ancestor
  mask); drafters fill one per batch row, and rows may differ in shape (prompt lookup and
  retrieval build a trie per row with `from_candidates`).

Shape legend: B batch, N nodes, C candidate sequences, D candidate depth.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.checks import check_int

MAX_NODES = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenTree:
    """Per-row token trees (leading axes are batch axes; the last is the node axis).

    Attributes:
      tokens: int32 [..., N]; tokens[..., 0] is the root.
      parents: int32 [..., N]; -1 for the root (and for unused nodes).
      depth: int32 [..., N]; 0 for the root.
      valid: bool [..., N]; unused node slots are False (never accepted).
      ancestors: bool [..., N, N]; ancestors[i, j] when j is i or an ancestor of i (the
        attention mask among the tree's nodes).
    """

    tokens: jax.Array
    parents: jax.Array
    depth: jax.Array
    valid: jax.Array
    ancestors: jax.Array

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[-1]

    def positions(self, lengths_B: jax.Array) -> jax.Array:
        """Positions of the nodes when the row's cache holds `lengths` tokens: length + depth."""
        return lengths_B[:, None] + self.depth

    def with_tokens(self, tokens: jax.Array) -> "TokenTree":
        return dataclasses.replace(self, tokens=tokens)


@dataclasses.dataclass(frozen=True)
class Topology:
    """A static tree shape: `parents[i]` (-1 for the root) and `ranks[i]`, node i's index among
    its parent's children (for a draft model: the i-th most likely / i-th drawn token).
    Hashable; build it with the functions below (they validate)."""

    parents: tuple[int, ...]
    ranks: tuple[int, ...]

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @functools.cached_property
    def depth(self) -> np.ndarray:
        depth = np.zeros(self.num_nodes, np.int32)
        for i, p in enumerate(self.parents[1:], start=1):
            depth[i] = depth[p] + 1
        return depth

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @functools.cached_property
    def ancestors(self) -> np.ndarray:
        """bool [N, N]: j is i or an ancestor of i."""
        anc = np.eye(self.num_nodes, dtype=bool)
        for i, p in enumerate(self.parents[1:], start=1):
            anc[i] |= anc[p]
        return anc

    @functools.cached_property
    def children(self) -> np.ndarray:
        """int32 [N, K]: node i's children by rank (-1 where none); K = the most children."""
        width = max(1, max(self.ranks[1:], default=0) + 1)
        table = np.full((self.num_nodes, width), -1, np.int32)
        for i, (p, r) in enumerate(zip(self.parents[1:], self.ranks[1:]), start=1):
            table[p, r] = i
        return table

    @property
    def max_children(self) -> int:
        return self.children.shape[1]

    @property
    def is_chain(self) -> bool:
        """Node i's parent is node i - 1: an accepted path is always nodes 0..n-1."""
        return self.parents == tuple(range(-1, self.num_nodes - 1))

    @property
    def ranks_contiguous(self) -> bool:
        """Every node's children have ranks 0..m-1 (needed when children are sampled)."""
        return all(np.all((row >= 0) == (np.arange(row.size) < np.sum(row >= 0)))
                   for row in self.children)

    def template(self, batch: int) -> TokenTree:
        """A TokenTree of this shape for `batch` rows, tokens zero."""
        n = self.num_nodes

        def rows(x, dtype):
            return jnp.broadcast_to(jnp.asarray(x, dtype), (batch,) + np.shape(x))

        return TokenTree(
            tokens=jnp.zeros((batch, n), jnp.int32), parents=rows(self.parents, jnp.int32),
            depth=rows(self.depth, jnp.int32), valid=jnp.ones((batch, n), bool),
            ancestors=rows(self.ancestors, bool),
        )


@dataclasses.dataclass(frozen=True)
class DynamicTree:
    """A tree each row's drafter shapes itself, step by step, within a static budget (EAGLE-2's
    dynamic draft trees): `depth` levels, `width` children per expanded node and `nodes`
    nodes (root included). A draft model expands, level after level, the `width` nodes of
    highest path probability under the draft (the root first) into their `width` most
    likely children each; the tree holds the `nodes - 1` most probable of all the nodes it
    drafted. Prompt lookup and retrieval take it as a node and depth budget. Hashable (a
    static argument); build it with `dynamic`."""

    depth: int
    width: int
    nodes: int

    @property
    def num_nodes(self) -> int:
        return self.nodes

    @property
    def max_depth(self) -> int:
        return self.depth

    @property
    def expanded(self) -> int:
        """The nodes a draft model runs: the root and `width` per level below it but the last."""
        return 1 + (self.depth - 1) * self.width

    @property
    def max_children(self) -> int:
        return self.width

    @property
    def is_chain(self) -> bool:
        return False


# ------------------------------------------------------------------------------ builders


def from_parents(parents: Sequence[int], ranks: Sequence[int] | None = None) -> Topology:
    """A tree from each node's parent index (-1 for the root, node 0).

    Raises ValueError unless there is exactly one root, every parent comes before its child
    (which also rules out cycles), and there are at most MAX_NODES nodes. Ranks default to
    each node's order of appearance among its siblings.
    """
    if isinstance(parents, (str, bytes)) or not isinstance(parents, (Sequence, np.ndarray)):
        raise TypeError(f"parents must be a list of parent indices, got {parents!r}")
    parents = [_index("parents", p) for p in parents]
    if not parents:
        raise ValueError("a tree needs at least its root node")
    if len(parents) > MAX_NODES:
        raise ValueError(f"a tree has at most {MAX_NODES} nodes, got {len(parents)}")
    if parents[0] != -1:
        raise ValueError(f"node 0 must be the root (parent -1), got parent {parents[0]}")
    for i, p in enumerate(parents[1:], start=1):
        if p == -1:
            raise ValueError(f"node {i} is a second root: a tree has exactly one root")
        if not 0 <= p < i:
            raise ValueError(
                f"node {i} has parent {p}: parents must come before their children "
                "(this also rules out cycles)"
            )
    if ranks is None:
        seen: dict[int, int] = {}
        ranks = [0]
        for p in parents[1:]:
            ranks.append(seen.get(p, 0))
            seen[p] = ranks[-1] + 1
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, (Sequence, np.ndarray)):
        raise TypeError(f"ranks must be a list of child ranks, got {ranks!r}")
    ranks = [_rank(r) for r in ranks]
    if len(ranks) != len(parents):
        raise ValueError("ranks must be one non-negative int per node")
    if ranks[0] != 0:  # (a tree of another root rank drafted the same, compiled its own)
        raise ValueError(f"the root has no siblings: its rank must be 0, got {ranks[0]}")
    if max(ranks) >= MAX_NODES:  # a node's children table is as wide as its largest rank
        raise ValueError(f"child ranks must be < {MAX_NODES} (a tree's most nodes), got "
                         f"{max(ranks)}")
    siblings = {(p, r) for p, r in zip(parents[1:], ranks[1:])}
    if len(siblings) != len(parents) - 1:
        raise ValueError("two children of one node have the same rank")
    return Topology(parents=tuple(parents), ranks=tuple(ranks))


def chain(k: int) -> Topology:
    """A chain of k draft tokens (k + 1 nodes with the root)."""
    k = check_int("chain length", k)
    if k + 1 > MAX_NODES:  # before a list of k parents is made (10**23 overflowed)
        raise ValueError(f"a tree has at most {MAX_NODES} nodes, got chain({k}): {k + 1}")
    return from_parents([-1] + list(range(k)))


def kary(depth: int, width: int) -> Topology:
    """A full tree: every node down to `depth` has `width` children (breadth-first order)."""
    depth, width = check_int("depth", depth), check_int("width", width)
    total, level_size = 1, 1
    for _ in range(depth):  # stops at the first level past MAX_NODES (a huge depth is quick)
        level_size *= width
        total += level_size
        if total > MAX_NODES:
            raise ValueError(f"kary({depth}, {width}) has more than {MAX_NODES} nodes")
    parents, level = [-1], [0]
    for _ in range(depth):
        nxt = []
        for p in level:
            for _ in range(width):
                parents.append(p)
                nxt.append(len(parents) - 1)
        level = nxt
    return from_parents(parents)


def from_choices(paths: Sequence[Sequence[int]]) -> Topology:
    """A tree from Medusa-style choices: each path lists child ranks from the root, e.g.
    [[0], [1], [0, 0], [0, 1]] is the root's two best children and two children of the best.
    Every path's prefix must itself be a path; a path given twice counts once. Nodes are
    ordered by depth, then path."""
    try:
        paths = list(paths) if not isinstance(paths, (str, bytes)) else None
    except TypeError:  # not iterable
        paths = None
    if paths is None or not all(isinstance(p, (Sequence, np.ndarray))
                                and not isinstance(p, (str, bytes)) for p in paths):
        raise ValueError("choices must be a list of lists of child ranks")
    if not paths:
        raise ValueError("choices must list at least one path (the root is implicit)")
    if any(len(p) == 0 for p in paths):
        raise ValueError("a choice path is empty (the root is implicit)")
    ranks_of = [tuple(_rank(c) for c in p) for p in paths]
    paths = sorted(set(ranks_of), key=lambda p: (len(p), p))
    index = {(): 0}
    parents, ranks = [-1], [0]
    for p in paths:
        if p[:-1] not in index:
            raise ValueError(f"choice {list(p)} has no parent: {list(p[:-1])} is not a choice")
        index[p] = len(parents)
        parents.append(index[p[:-1]])
        ranks.append(p[-1])
    return from_parents(parents, ranks)


def dynamic(depth: int, width: int = 4, nodes: int | None = None) -> DynamicTree:
    """A dynamic tree (see `DynamicTree`) of `depth` levels and `width` children per expanded
    node, with `nodes` nodes, root included (default: as many as the draft expands,
    1 + (depth - 1) * width, and `width` more), at least 2 and at most as many as it drafts,
    1 + width + (depth - 1) * width**2, and MAX_NODES."""
    depth, width = check_int("depth", depth), check_int("width", width)
    expanded = 1 + (depth - 1) * width
    drafted = 1 + width + (depth - 1) * width**2
    if expanded > MAX_NODES:  # the draft runs these nodes every step (whatever `nodes`)
        raise ValueError(f"dynamic(depth={depth}, width={width}) expands {expanded} nodes "
                         f"(1 + (depth - 1) * width), more than a tree's {MAX_NODES}: pass "
                         "a smaller depth or width")
    given = nodes is not None
    nodes = check_int("nodes", nodes) if given else min(expanded + width, drafted)
    said = f"nodes={nodes}" if given else f"nodes (default {nodes}: expanded + width)"
    if not 2 <= nodes <= drafted:
        raise ValueError(f"dynamic(depth={depth}, width={width}) takes 2 to {drafted} nodes "
                         f"(the root and the nodes it drafts), got nodes={nodes}")
    if nodes > MAX_NODES:
        raise ValueError(f"a tree has at most {MAX_NODES} nodes, got {said}: pass nodes <= "
                         f"{MAX_NODES}")
    return DynamicTree(depth=depth, width=width, nodes=nodes)


def _rank(c) -> int:
    """A child rank: an int >= 0 (numpy's too); floats and strings are refused, not rounded."""
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
        raise ValueError(f"child ranks must be ints >= 0, got {c!r}")
    return int(c)


def _index(name: str, value) -> int:
    """A node index (-1 for none): an int, numpy's too; floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be ints, got {value!r}")
    return int(value)


def _spec_int(text: str) -> int:
    """A number of a tree spec: ASCII digits only (int() also takes "3_0" and other
    scripts' digits)."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"expected a number, got {text!r}")
    return int(text)


def parse(spec: str) -> Topology | DynamicTree:
    """A tree from a command-line spec: "chain:K", "kary:DEPTH:WIDTH",
    "dynamic:DEPTH[:WIDTH[:NODES]]" or a JSON choices list such as "[[0],[1],[0,0]]"."""
    import json

    if not isinstance(spec, str):
        raise TypeError(f"a tree spec is a string (chain:K, kary:D:W, dynamic:D[:W[:N]] or a "
                        f"JSON choices list), got {spec!r}")
    kind, _, rest = spec.partition(":")
    try:
        if kind == "chain":
            return chain(_spec_int(rest))
        if kind == "kary":
            parts = rest.split(":")
            if len(parts) != 2:  # (it said "not enough values to unpack")
                raise ValueError(f"kary takes DEPTH:WIDTH, got {rest!r}")
            return kary(*(_spec_int(x) for x in parts))
        if kind == "dynamic":
            return dynamic(*(_spec_int(x) for x in rest.split(":", 2)))
        return from_choices(json.loads(spec))
    except (ValueError, TypeError, RecursionError) as e:  # (RecursionError: JSON nested deep)
        raise ValueError(f"bad tree spec {spec[:60]!r} (chain:K, kary:D:W, dynamic:D[:W[:N]] or "
                         f"a JSON choices list): {e}") from None


def as_topology(tree) -> Topology | DynamicTree:
    """`tree` as a validated Topology or DynamicTree to draft and verify (TypeError for
    anything else; a ValueError for a root alone: nothing to draft)."""
    if isinstance(tree, Topology):
        if tree.num_nodes < 2:
            raise ValueError("tree is the root alone: a tree to draft needs at least one node "
                             "below it (e.g. chain(1))")
        return from_parents(tree.parents, tree.ranks)
    if isinstance(tree, DynamicTree):
        return dynamic(tree.depth, tree.width, tree.nodes)
    raise TypeError("tree must be a jaxdec.tree Topology (chain, kary, from_choices) or "
                    f"DynamicTree (dynamic), got {tree!r}")


# ------------------------------------------------------------------- tries from candidates


def from_candidates(root_B: jax.Array, cand_BCD: jax.Array, cand_valid_BCD: jax.Array,
                    num_nodes: int) -> TokenTree:
    """Merges C candidate continuations per row into one trie (shared prefixes become one
    path), in breadth-first order, keeping at most `num_nodes` nodes (root included): the
    shallowest nodes survive, so a tree too big for its budget becomes a shallower one.

    Args:
      root_B: the root token of each row.
      cand_BCD: candidate continuations (token d of candidate c).
      cand_valid_BCD: which candidate tokens exist (a candidate's valid tokens are a prefix).
      num_nodes: N, the static node budget.
    """
    num_nodes = check_int("num_nodes", num_nodes, minimum=2)
    if num_nodes > MAX_NODES:
        raise ValueError(f"a tree has at most {MAX_NODES} nodes, got num_nodes={num_nodes}")
    if getattr(cand_BCD, "ndim", None) != 3 or not jnp.issubdtype(cand_BCD.dtype, jnp.integer):
        raise TypeError(f"candidates must be an integer [B, C, D] array, got "
                        f"{getattr(cand_BCD, 'dtype', type(cand_BCD).__name__)} "
                        f"{getattr(cand_BCD, 'shape', '')}")
    if getattr(cand_valid_BCD, "shape", None) != cand_BCD.shape:
        raise ValueError(f"cand_valid_BCD must have the candidates' shape {cand_BCD.shape}")
    B, C, D = cand_BCD.shape
    if not C or not D:
        raise ValueError(f"cand_BCD {cand_BCD.shape} holds no candidate tokens (C and D must be "
                         ">= 1; a drafter with nothing to propose marks them invalid)")
    if getattr(root_B, "shape", None) != (B,):
        raise ValueError(f"root_B must be [B] = [{B}] (the candidates' rows), got "
                         f"{getattr(root_B, 'shape', type(root_B).__name__)}")
    valid = jnp.cumprod(cand_valid_BCD.astype(jnp.int32), axis=2).astype(bool)
    # same[b, c', c, d]: candidates c' and c agree on tokens 0..d (and both exist there).
    eq = (cand_BCD[:, :, None, :] == cand_BCD[:, None, :, :]) & valid[:, :, None, :] & valid[:, None, :, :]
    same = jnp.cumprod(eq.astype(jnp.int32), axis=3).astype(bool)
    owner = jnp.argmax(same, axis=1).astype(jnp.int32)  # [B, C, D]: the first with this prefix
    is_new = valid & (owner == jnp.arange(C, dtype=jnp.int32)[None, :, None])
    # Breadth-first ids: order new nodes by (depth, candidate).
    new_DC = jnp.swapaxes(is_new, 1, 2).reshape(B, D * C).astype(jnp.int32)
    ids_DC = 1 + jnp.cumsum(new_DC, axis=1) - new_DC
    ids = jnp.swapaxes(ids_DC.reshape(B, D, C), 1, 2)  # [B, C, D]
    # Node (c, d) of every candidate, new or shared, is the owner's node.
    node = jnp.take_along_axis(ids, owner, axis=1)
    parent = jnp.concatenate([jnp.zeros((B, C, 1), ids.dtype), node[:, :, :-1]], axis=2)
    depth = jnp.broadcast_to(jnp.arange(1, D + 1, dtype=jnp.int32), (B, C, D))
    keep = is_new & (ids < num_nodes)
    slot = jnp.where(keep, ids, num_nodes)  # dropped nodes go out of range
    rows = jnp.arange(B, dtype=jnp.int32)[:, None, None]

    # The four per-node fields in one scatter (a scatter is a kernel of its own): [token,
    # parent, depth, present] per node, the root's and the unused slots' set beforehand.
    base = jnp.zeros((B, num_nodes, 4), jnp.int32).at[:, :, 1].set(-1)
    base = base.at[:, 0].set(jnp.stack([root_B.astype(jnp.int32), jnp.full((B,), -1, jnp.int32),
                                        jnp.zeros((B,), jnp.int32), jnp.ones((B,), jnp.int32)],
                                       axis=-1))
    fields = jnp.stack([cand_BCD.astype(jnp.int32), parent.astype(jnp.int32), depth,
                        keep.astype(jnp.int32)], axis=-1)
    table = base.at[rows, slot].set(fields, mode="drop")
    tokens, parents, depths = table[..., 0], table[..., 1], table[..., 2]
    present = table[..., 3].astype(bool)
    # A kept node's ancestors are the nodes its candidates pass through on the way (all kept:
    # breadth-first ids are smaller), written in one scatter: `ancestor_mask(parents,
    # present)`, without its chain of squarings (5 matmul kernels a step at 20 nodes).
    live = valid & (node < num_nodes)
    above = jnp.arange(D)[None, None, None, :] < jnp.arange(D)[None, None, :, None]  # d' above d
    src = jnp.where(live[..., :, None] & above, node[..., :, None], num_nodes)  # [B, C, D, D]
    dst = jnp.broadcast_to(node[..., None, :], src.shape)
    N = num_nodes
    ancestors = jnp.broadcast_to(jnp.eye(N, dtype=bool), (B, N, N))
    ancestors = ancestors.at[rows[..., None], src, dst].set(True, mode="drop")
    ancestors = ancestors | (present[:, :, None] & (jnp.arange(N) == 0)[None, None, :])
    return TokenTree(tokens=tokens, parents=parents, depth=depths, valid=present,
                     ancestors=ancestors)


def ancestor_mask(parents_BN: jax.Array, valid_BN: jax.Array) -> jax.Array:
    """bool [B, N, N] from per-row parents (parents before children; invalid nodes see only
    themselves)."""
    if getattr(parents_BN, "ndim", None) != 2 or getattr(valid_BN, "shape", None) != \
            parents_BN.shape:
        raise ValueError(f"parents_BN and valid_BN must both be [B, N], got "
                         f"{getattr(parents_BN, 'shape', None)} and "
                         f"{getattr(valid_BN, 'shape', None)}")
    B, N = parents_BN.shape
    parents = jnp.where(valid_BN, parents_BN, -1)
    # Reachability over "self or parent" edges, by squaring: after k squarings a row holds
    # every ancestor at most 2^k levels up, and a chain has at most N - 1 levels. A few tiny
    # batched products instead of a loop over nodes, which on a GPU launches a few tiny
    # kernels per node from the host, every speculative step.
    reach = (jnp.eye(N, dtype=bool)[None]
             | (parents[:, :, None] == jnp.arange(N, dtype=jnp.int32)[None, None, :]))
    for _ in range(max(N - 1, 1).bit_length()):
        hops = jnp.einsum("bij,bjk->bik", reach.astype(jnp.float32), reach.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)
        reach = hops > 0
    return reach
