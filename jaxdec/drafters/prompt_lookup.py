"""`PromptLookup`: training-free drafts copied from the row's own prompt and output.

The last n tokens (n from `max_ngram` down to `min_ngram`, the longest that occurs earlier)
are looked up in everything the row has seen; the tokens that followed the most recent
`num_candidates` occurrences are candidate continuations, merged into one tree (shared
prefixes once). Code and documents repeat themselves, so this often drafts long runs for free.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdec.drafters.base import History, LookupDrafter, Proposal, lookup_settings
from jaxdec.tree import Topology, from_candidates
from jaxdec.verify import ProposalKind


class PromptLookup(LookupDrafter):
    """Args:
      max_ngram, min_ngram: the n-gram lengths matched, longest first.
      depth: tokens per candidate continuation (the tree's depth).
      num_candidates: matches merged into the tree (the most recent ones).

    depth and num_candidates shape the default tree (`default_topology`); a `tree=` given
    to the call replaces it: the candidates then fill its nodes, as deep as it goes.
    The settings are fixed once made (a new drafter changes one).
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, depth: int = 6,
                 num_candidates: int = 3):
        self._set_settings(lookup_settings(max_ngram, min_ngram, depth, num_candidates))

    def __repr__(self) -> str:
        return (f"PromptLookup(max_ngram={self.max_ngram}, min_ngram={self.min_ngram}, "
                f"depth={self.depth}, num_candidates={self.num_candidates})")

    def __eq__(self, other):
        return type(other) is type(self) and other._settings() == self._settings()

    def __hash__(self):
        return hash((type(self), self._settings()))

    def init(self, tokens_BT, prompt_lengths_B, *, max_len: int) -> History:
        return History.from_prompts(tokens_BT, prompt_lengths_B, max_len + 1)

    def propose(self, history: History, root_B, lengths_B, key, *, topology: Topology, sampler):
        del lengths_B, key, sampler
        ends_BH = _latest_match_ends(history, self.max_ngram, self.min_ngram)
        ends_BC = _latest(ends_BH, min(self.num_candidates, ends_BH.shape[1]))
        cand, valid = _continuations(history.tokens, history.length, ends_BC,
                                     topology.max_depth)
        tree = from_candidates(root_B, cand, valid, topology.num_nodes)
        # One candidate's trie is a chain in node order, whatever the node budget.
        return Proposal(tree=tree, q=None, kind=ProposalKind.DETERMINISTIC,
                        chain=self.num_candidates == 1), history

    def update(self, history: History, proposal, verdict, n_commit_B, emitted_BL) -> History:
        del proposal, verdict
        return history.append(emitted_BL, n_commit_B)


def _latest_match_ends(history: History, max_ngram: int, min_ngram: int) -> jax.Array:
    """bool [B, H]: the positions that end an earlier occurrence of the row's last n tokens
    (and are followed by at least one token), for the longest n (max_ngram down to min_ngram)
    that occurs.

    An n-gram's occurrences are the (n - 1)-gram's with one more token compared (the n-th
    from the end), so each of the max_ngram tokens is compared once: comparing every n-gram
    whole compiled max_ngram**2 / 2 comparisons (40 s at 64 on a CPU)."""
    tokens, length = history.tokens, history.length
    H = tokens.shape[1]
    i = jnp.arange(H, dtype=jnp.int32)[None, :]
    query = history.last(max_ngram)  # [:, max_ngram - 1 - k]: the row's k-th token from its end
    same = i <= length[:, None] - 2  # followed by a token
    occurs = {}
    for k in range(max_ngram):
        # tokens[i - k] beside position i: the history shifted right by a static amount, an
        # element-wise read (a gather at computed indices cost a CPU ~0.07 ms per n-gram
        # token at 16K positions); the padding lands where i < k, which no n-gram of more
        # than k tokens ending at i can use.
        shift = min(k, H)
        earlier = jnp.pad(tokens[:, :H - shift], ((0, 0), (shift, 0)))
        same &= earlier == query[:, max_ngram - 1 - k:max_ngram - k]
        n = k + 1
        if n >= min_ngram:
            occurs[n] = same & (i >= n - 1) & (length[:, None] >= n)
    ends = jnp.zeros(tokens.shape, bool)
    found = jnp.zeros(tokens.shape[:1], bool)
    for n in range(max_ngram, min_ngram - 1, -1):
        take = ~found & jnp.any(occurs[n], axis=1)
        ends = jnp.where(take[:, None], occurs[n], ends)
        found = found | take
    return ends


# The most candidates `_latest` finds by merging lists (beyond, by `lax.top_k`).
MERGED_COUNT = 16


def _latest(ends_BH, count: int) -> jax.Array:
    """int [B, count]: the last `count` positions set in each row, latest first (-1: fewer).

    One reduction whose value is a list: each position starts as [position or -1, -1, ...],
    and two lists (each sorted, latest first) merge into the `count` largest of both. One
    kernel on a GPU, like `lax.top_k`, which sorted the whole history on a CPU instead (1.2 ms
    a step at 16K positions)."""
    scores = jnp.where(ends_BH, jnp.arange(ends_BH.shape[1], dtype=jnp.int32)[None, :], -1)
    if count > MERGED_COUNT:  # the merge's body grows as count**2 (255: 74 s to compile)
        return jax.lax.top_k(scores, count)[0]
    none = jnp.full_like(scores, -1)
    lists = jax.lax.reduce((scores,) + (none,) * (count - 1), (jnp.int32(-1),) * count,
                           _merge_latest, (1,))
    return jnp.stack(lists, axis=1)


def _merge_latest(a, b):
    """The `len(a)` largest of two descending lists: the k-th (from 0) takes i of a's and
    k + 1 - i of b's largest for some i, and is then the smaller of a[i - 1] and b[k - i]
    (an empty side does not bound it); the best split gives the largest such value."""
    merged = []
    for k in range(len(a)):
        options = [b[k], a[k]] + [jnp.minimum(a[i - 1], b[k - i]) for i in range(1, k + 1)]
        best = options[0]
        for option in options[1:]:
            best = jnp.maximum(best, option)
        merged.append(best)
    return tuple(merged)


def _continuations(source_BH, length_B, ends_BC, depth: int):
    """The `depth` tokens after each match end (-1: no match) and which of them exist.

    A position past the row's end (or of no match) reads as -1 and token ids are >= 0, so the
    tokens say which exist: one kernel on a GPU computes the reads' indices, where a separate
    validity mask beside clamped indices made two."""
    H = source_BH.shape[1]
    pos = ends_BC[:, :, None] + 1 + jnp.arange(depth, dtype=jnp.int32)[None, None, :]
    B, C, _ = pos.shape
    valid = (ends_BC[:, :, None] >= 0) & (pos < length_B[:, None, None])
    index = jnp.where(valid, pos, H).reshape(B, C * depth)
    tokens = jnp.take_along_axis(source_BH, index, axis=1, mode="fill", fill_value=-1)
    tokens = tokens.reshape(B, C, depth)
    return tokens, tokens >= 0


jax.tree_util.register_pytree_node(
    PromptLookup,
    lambda d: ((), d._settings()),
    lambda aux, _: PromptLookup(*aux),
)
