"""Lossless verification of a token tree against the target's distributions.

Every rule walks down the tree from the root, one level at a time, and returns the accepted
path plus one bonus token drawn from the target, so each step emits between 1 and depth + 1
tokens whose distribution is exactly the target's processed distribution (`sampler.probs`):

- greedy (the sampler is greedy): move to the child whose token is the target's argmax;
  the bonus is the argmax where no child matches.
- `ProposalKind.DETERMINISTIC` (children are fixed choices: top-k expansion, prompt lookup,
  retrieval; q is one-hot): draw y ~ p at the current node and move to the child whose token
  is y. Trying the candidates in turn, each accepted with its residual probability, is
  exactly this.
- `ProposalKind.IID` (children drawn independently from q; a chain is the one-child case):
  recursive rejection sampling (SpecInfer): child x_j is accepted with min(1, r(x_j)/q(x_j))
  where r starts at p and after each rejection becomes norm(max(0, r - q)); the bonus is
  drawn from the final residual.
- `ProposalKind.WITHOUT_REPLACEMENT` (children drawn without replacement, e.g. Gumbel-top-k;
  Recursive Speculative Decoding): the same with q_j = q renormalised without the earlier
  siblings' tokens.

Legend: B batch, N nodes, V vocabulary, K children per node, L path length (max depth + 1).
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp

from jaxdec import sampling
from jaxdec.sampling import Greedy, Sampler, row_keys
from jaxdec.tree import Topology, TokenTree


# Loops of at most this many iterations (children, or levels x children) are unrolled.
_UNROLL = 8


class ProposalKind(enum.Enum):
    """How a drafter chose each node's children (verification must know)."""

    DETERMINISTIC = "deterministic"
    IID = "iid"
    WITHOUT_REPLACEMENT = "without_replacement"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Verdict:
    """path [B, L]: accepted node indices from the root (0), padded with 0 after n_path;
    n_path [B]: accepted nodes including the root; bonus [B]: the target's next token after
    the path. The step emits the path's draft tokens then the bonus: n_path tokens."""

    path: jax.Array
    n_path: jax.Array
    bonus: jax.Array


def _renormalize(v: jax.Array, fallback: jax.Array) -> jax.Array:
    total = jnp.sum(v, axis=-1, keepdims=True)
    return jnp.where(total > 0, v / jnp.where(total > 0, total, 1.0), fallback)


def _residual(r_BV: jax.Array, q_BV: jax.Array) -> jax.Array:
    """norm(max(0, r - q)): what is left of the target distribution after a rejection."""
    return _renormalize(jnp.maximum(r_BV - q_BV, 0.0), r_BV)


def _node_rows(x_BN, node_B):
    return jnp.take_along_axis(x_BN, node_B[:, None], axis=1)[:, 0]


def _node_dists(x_BNV, node_B):
    return jnp.take_along_axis(x_BNV, node_B[:, None, None], axis=1)[:, 0]


def verify(
    tree: TokenTree,
    target_logits_BNV: jax.Array,
    *,
    sampler: Greedy | Sampler,
    key: jax.Array,
    max_depth: int,
    kind: ProposalKind = ProposalKind.DETERMINISTIC,
    q_BNV: jax.Array | None = None,
    topology: Topology | None = None,
) -> Verdict:
    """Accepts a path of `tree` given the target's logits at every node.

    Args:
      tree: the drafted trees, one per row.
      target_logits_BNV: the target's logits at each node (its next-token distribution).
      sampler: the target's sampler; its `probs` define the output distribution.
      key: PRNG key (one per call; rows draw independent randomness from it).
      max_depth: static bound on the tree depth (levels walked).
      kind: how the drafter chose children (see the module docstring).
      q_BNV: for IID / WITHOUT_REPLACEMENT, the drafter's distribution at each node.
      topology: for IID / WITHOUT_REPLACEMENT, the static tree shape (children by rank).
    """
    kind = as_kind(kind)
    if not isinstance(sampler, (Greedy, Sampler)):
        raise TypeError(f"sampler must be jaxdec.Greedy() or a jaxdec.Sampler, got "
                        f"{type(sampler).__name__}")
    if sampler.is_greedy:
        next_BN = jnp.argmax(target_logits_BNV, axis=-1).astype(jnp.int32)
        return _walk_matching(tree, next_BN, max_depth)
    p_BNV = sampler.probs(target_logits_BNV)
    if kind == ProposalKind.DETERMINISTIC:
        B, N, V = p_BNV.shape
        keys = jax.vmap(lambda k: jax.random.split(k, N))(row_keys(key, B))
        draws = jax.vmap(jax.vmap(lambda k, p: sampling.draw(k, jnp.log(p))))(keys, p_BNV)
        return _walk_matching(tree, draws.astype(jnp.int32), max_depth)
    if q_BNV is None or topology is None:
        raise ValueError(f"{kind} verification needs the draft distributions and the topology")
    return _recursive_rejection(tree, p_BNV, q_BNV, topology, key, max_depth,
                                without_replacement=kind == ProposalKind.WITHOUT_REPLACEMENT)


def _walk_matching(tree: TokenTree, next_BN: jax.Array, max_depth: int) -> Verdict:
    """From the root, follow the child whose token equals the target's next token at the
    current node (its argmax, or a sample); of several such children, the first. Works on
    any per-row tree.

    Computed for all nodes at once rather than level by level (which ran two small kernels
    per level on a GPU, every speculative step): a node is a step of the walk when it matches
    and no earlier sibling does, and is on the path when it and all its ancestors are steps.
    """
    B, N = tree.tokens.shape
    parents = tree.parents
    want = jnp.take_along_axis(next_BN, jnp.maximum(parents, 0), axis=1)
    match = tree.valid & (parents >= 0) & (tree.tokens == want) & (tree.depth <= max_depth)
    index = jnp.arange(N, dtype=jnp.int32)
    earlier_sibling = ((index[None, :, None] > index[None, None, :])
                       & (parents[:, :, None] == parents[:, None, :]))  # [B, i, j]: j before i
    step = match & ~jnp.any(earlier_sibling & match[:, None, :], axis=2)
    step = step | (index == 0)[None, :]  # the root
    on_path = jnp.all(~tree.ancestors | step[:, None, :], axis=2)  # one chain from the root
    levels = jnp.arange(max_depth + 1, dtype=jnp.int32)
    at_level = on_path[:, None, :] & (tree.depth[:, None, :] == levels[None, :, None])
    path = jnp.sum(jnp.where(at_level, index[None, None, :], 0), axis=2).astype(jnp.int32)
    n_path = jnp.sum(on_path, axis=1).astype(jnp.int32)
    cur = jnp.take_along_axis(path, (n_path - 1)[:, None], axis=1)[:, 0]
    return Verdict(path=path, n_path=n_path, bonus=_node_rows(next_BN, cur))


def _recursive_rejection(tree, p_BNV, q_BNV, topology: Topology, key, max_depth: int, *,
                         without_replacement: bool) -> Verdict:
    """The walk down the tree as two loops, levels then each node's children in rank order,
    rolled where long (a Python loop over depth x children compiled one copy of the body per
    child: a sampled chain(64) took minutes) and unrolled where short (each loop iteration on a
    GPU is a kernel launch or more)."""
    B, N, V = p_BNV.shape
    children = jnp.asarray(topology.children)  # [N, K] static table
    K = children.shape[1]
    # Row b's numbers come from (key, b) alone, as generate's per-row keys: a row samples the
    # same tokens whatever the batch it runs in (or the rows a mesh's dp adds).
    uniforms = jax.vmap(lambda k: sampling.fine_uniform(k, (max(max_depth, 1), K)))(
        row_keys(jax.random.fold_in(key, 0), B)).transpose(1, 2, 0)  # [max_depth, K, B]
    # (At least one level's: the loop below traces its body even where it runs no level.)

    def level_step(level, carry):
        cur, alive, residual_BV, path = carry
        q_base = _node_dists(q_BNV, cur)
        # Without replacement, child j was drawn with children 0..j-1's tokens removed: past
        # an invalid child (cut by the cache's end, or by its drafter) the later ones were
        # drawn from a q this loop cannot rebuild, so they are left untested (lossless: the
        # tested children are still draws without replacement, in order).
        node_children = jnp.take(children, cur, axis=0)  # [B, K]

        def child_step(j, inner):
            r, removed, moved, blocked, nxt = inner
            child = jax.lax.dynamic_index_in_dim(node_children, j, axis=1, keepdims=False)
            child_valid = _node_rows(tree.valid, jnp.maximum(child, 0))
            exists = alive & ~moved & ~blocked & (child >= 0) & child_valid
            if without_replacement:
                blocked = blocked | ((child >= 0) & ~child_valid)
            x = _node_rows(tree.tokens, jnp.maximum(child, 0))
            left = q_base * (1 - removed) if without_replacement else q_base
            q_j = _renormalize(left, q_base) if without_replacement else q_base
            # A child q gives no probability (left to draw) was not drawn from q: Gumbel-top-k
            # wider than q's support fills the rest with such tokens, and one tested as
            # u * 0 < r_x was accepted whenever p had it (first-token law [.05, .05, .9, 0,
            # 0, 0] for p = [.05, .05, .3, .2, .2, .2], q = [.5, .5, 0, 0, 0, 0], 4
            # children). It is invalid; without replacement so are the later siblings.
            # (An id outside [0, V) neither: a negative one read q's last token's mass.)
            drawable = (x >= 0) & (x < V) & (_node_rows(left, x) > 0)
            if without_replacement:
                blocked = blocked | (exists & ~drawable)
            exists = exists & drawable
            q_x, r_x = _node_rows(q_j, x), _node_rows(r, x)  # (a row's entry at x)
            # min(1, r / q): r >= q always (u * q, rounded, could reach r = q).
            u = jax.lax.dynamic_index_in_dim(uniforms[level], j, axis=0, keepdims=False)
            accept = exists & ((r_x >= q_x) | (u * q_x < r_x))
            nxt = jnp.where(accept, child, nxt)
            moved = moved | accept
            rejected = exists & ~accept
            r = jnp.where(rejected[:, None], _residual(r, q_j), r)
            if without_replacement:
                removed = jnp.where(exists[:, None],
                                    removed + jax.nn.one_hot(x, V, dtype=removed.dtype), removed)
            return r, removed, moved, blocked, nxt

        no = jnp.zeros((B,), bool)
        removed = jnp.zeros((B, V) if without_replacement else (B, 0), q_base.dtype)
        r, _, moved, _, nxt = jax.lax.fori_loop(
            0, K, child_step, (_node_dists(p_BNV, cur), removed, no, no, cur),
            unroll=K <= _UNROLL)
        # A row that stops here draws its bonus from what is left of p at its node.
        residual_BV = jnp.where((alive & ~moved)[:, None], r, residual_BV)
        alive = alive & moved
        cur = jnp.where(moved, nxt, cur)
        path = path.at[:, level + 1].set(jnp.where(moved, cur, 0))
        # Rows that keep going take p at their new node as the bonus distribution for now.
        residual_BV = jnp.where(alive[:, None], _node_dists(p_BNV, cur), residual_BV)
        return cur, alive, residual_BV, path

    cur = jnp.zeros((B,), jnp.int32)
    carry = (cur, jnp.ones((B,), bool), _node_dists(p_BNV, cur),
             jnp.zeros((B, max_depth + 1), jnp.int32))
    _, _, residual_BV, path = jax.lax.fori_loop(0, max_depth, level_step, carry,
                                                unroll=max_depth * K <= _UNROLL)
    n_path = 1 + jnp.sum(jnp.cumprod(path[:, 1:] > 0, axis=1), axis=1)
    keys = row_keys(jax.random.fold_in(key, 1), B)
    bonus = jax.vmap(lambda k, r: sampling.draw(k, jnp.log(r)))(keys, residual_BV)
    return Verdict(path=path, n_path=n_path.astype(jnp.int32), bonus=bonus.astype(jnp.int32))


def emitted_tokens(tree: TokenTree, verdict: Verdict) -> jax.Array:
    """[B, L]: the step's output tokens: the path's draft tokens, then the bonus (padding
    after n_path)."""
    drafts = jnp.take_along_axis(tree.tokens, verdict.path[:, 1:], axis=1)
    L = verdict.path.shape[1]
    out = jnp.concatenate([drafts, jnp.zeros_like(drafts[:, :1])], axis=1)
    index = jnp.arange(L, dtype=jnp.int32)[None, :]
    return jnp.where(index == verdict.n_path[:, None] - 1, verdict.bonus[:, None], out)


def as_kind(kind, name: str = "kind") -> ProposalKind:
    """`kind` as a ProposalKind (its value, "without_replacement", names it too), or a
    ValueError naming `name`."""
    try:
        return ProposalKind(kind)
    except ValueError:
        raise ValueError(f"{name} must be a ProposalKind, one of "
                         f"{[k.value for k in ProposalKind]}, got {kind!r}") from None


def check_proposal(kind: ProposalKind, topology: Topology | None) -> None:
    """Static checks: sampled children need a static tree with contiguous sibling ranks."""
    if kind != ProposalKind.DETERMINISTIC:
        if not isinstance(topology, Topology):  # None, or a DynamicTree
            raise ValueError(f"{kind.value} proposals need a static tree topology, got "
                             f"{topology!r}")
        if not topology.ranks_contiguous:
            raise ValueError("sampled children need contiguous sibling ranks 0..m-1 in the tree")
