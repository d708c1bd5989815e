"""The drafter interface shared by every drafter.

A drafter is a pytree (its arrays are leaves, its settings static), so it is an ordinary
argument of the jitted speculative loop. Each step the loop calls

    proposal, state = drafter.propose(state, root_B, lengths_B, key, topology=..., sampler=...)
    ... the target verifies proposal.tree ...
    state = drafter.update(state, proposal, verdict, n_commit_B, emitted_BL)

Invariants: the target's cache holds every output token except the last one (the root of the
next tree); `lengths_B` is that cache length, so node i sits at slot length + i and position
length + depth[i]. `update` receives the accepted path and how many of its nodes the target
committed (n_commit: the root and the first n_commit - 1 accepted nodes), plus the tokens the
step emitted (the first n_commit of `emitted_BL`). A `jaxdec.PrefixCache` starts its calls
after the first with `resume` instead of `init` (by default the same thing).

B is the loop's batch: on a mesh whose dp does not divide the prompts, the prompts and then
filler rows (to a multiple of dp; they decode nothing).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxdec.checks import check_int
from jaxdec.tree import MAX_NODES, Topology, TokenTree, from_parents
from jaxdec.verify import ProposalKind


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Proposal:
    """A drafted tree per row; q [B, N, V] is the drafter's distribution at each node (the
    one its children were drawn from), needed only for sampled (non-deterministic) children.
    `chain` (static): every row's tree is a chain in node order (node i's parent is i - 1), so
    an accepted path is nodes 0..n-1 and commits move nothing (`jaxdec.cache.commit`'s
    `prefix`). `slots` [B, N]: where the drafter keeps each node in its own state, for its
    `update` (a draft model's dynamic tree); None where it needs none.

    From a drafter of your own (a `propose` outside jaxdec) the loop keeps the tree's tokens,
    parents and `valid` only: depth and ancestors are derived from the parents (a parent
    must be an earlier node, else the node is never accepted) and `chain` makes the tree a
    chain; sampled children take the topology's structure. q must be [B, N, the target's
    vocabulary], the distribution the children were really drawn from (each node's row is
    normalised to sum to 1, its negative entries taken as 0)."""

    tree: TokenTree
    q: jax.Array | None
    kind: ProposalKind = dataclasses.field(metadata=dict(static=True))
    chain: bool = dataclasses.field(default=False, metadata=dict(static=True))
    slots: jax.Array | None = None


class Drafter:
    """Base class: subclasses implement init / propose / update and may override the rest."""

    def default_topology(self) -> Topology:
        """The tree `speculative_generate` drafts when given none."""
        raise NotImplementedError(f"{type(self).__name__} has no default tree: pass tree=... "
                                  "(a jaxdec.tree Topology), or define default_topology")

    def prepare(self, target) -> "Drafter":
        """Host-side checks and placement against the target model, before tracing."""
        del target
        return self

    def check_reach(self, positions: int) -> None:
        """Called by speculative_generate and PrefixCache.generate before each run whose
        sequences reach `positions` tokens: a drafter that drafts poorly past some position
        warns (verification keeps the output exact; stacklevel=4 names their caller)."""
        del positions

    def proposal_kind(self, sampler, topology: Topology) -> ProposalKind:
        """How `propose` chooses children for this sampler and tree (deterministic unless a
        subclass samples them)."""
        del sampler, topology
        return ProposalKind.DETERMINISTIC

    def init(self, tokens_BT, prompt_lengths_B, *, max_len: int) -> Any:
        """The drafter's state for right-padded prompts (tokens [B, T], lengths [B]): the
        loop carries it from step to step (arrays as leaves)."""
        raise NotImplementedError(f"{type(self).__name__} must implement init(tokens_BT, "
                                  "prompt_lengths_B, *, max_len) (its state for the prompts; "
                                  "a drafter with none returns ())")

    def resume(self, state, tokens_BT, prompt_lengths_B, new_BT, kept_B, *,
               max_len: int) -> Any:
        """The state `init(tokens_BT, prompt_lengths_B)` would give, built on `state` (the
        last run's final state, or None where `held_length` is None), which already holds
        each row's first kept_B prompt tokens; new_BT holds the rest, right-padded (a
        `jaxdec.PrefixCache`'s next call). The default ignores `state` and calls `init`: a
        drafter with costly state of its own (a draft model's cache) overrides both this and
        `held_length`."""
        del state, new_BT, kept_B
        return self.init(tokens_BT, prompt_lengths_B, max_len=max_len)

    def held_length(self, state) -> jax.Array | None:
        """[B]: how many of each row's tokens (prompt, then output) a final state holds for
        `resume` to build on; None (the default): `resume` needs no state."""
        del state
        return None

    def propose(self, state, root_B, lengths_B, key, *, topology: Topology, sampler):
        """(Proposal, state): a tree of `topology`'s nodes per row, rooted at `root_B`."""
        raise NotImplementedError(f"{type(self).__name__} must implement propose(state, root_B, "
                                  "lengths_B, key, *, topology, sampler) -> (Proposal, state)")

    def update(self, state, proposal: Proposal, verdict, n_commit_B, emitted_BL):
        """The state after verification kept `n_commit_B` tokens per row."""
        raise NotImplementedError(f"{type(self).__name__} must implement update(state, proposal, "
                                  "verdict, n_commit_B, emitted_BL) -> state (a drafter "
                                  "with nothing to update returns state)")


def prepared(drafter: "Drafter", target) -> "Drafter":
    """`drafter.prepare(target)`, checked: a Drafter (a `prepare` of your own that returns
    nothing, say, is named: a PrefixCache decoded without its drafter)."""
    ready = drafter.prepare(target)
    if not isinstance(ready, Drafter):
        raise TypeError(f"{type(drafter).__name__}.prepare must return the drafter to run (self, "
                        f"or a prepared copy), got {type(ready).__name__}")
    check_drafter(ready)
    return ready


def check_drafter(drafter, *, optional: bool = False) -> None:
    """A TypeError naming what was given unless `drafter` is a Drafter registered as a pytree
    (or, `optional`, None)."""
    if optional and drafter is None:
        return
    if isinstance(drafter, Drafter):
        if any(leaf is drafter for leaf in jax.tree.leaves(drafter)):  # not a pytree node
            raise TypeError(
                f"{type(drafter).__name__} is not a registered pytree: the speculative loop "
                "takes a drafter as an argument of its jitted program, so register it (e.g. "
                "@jax.tree_util.register_dataclass on a dataclass, its arrays fields and its "
                "settings static fields; see examples/custom_drafter.py)")
        return
    raise TypeError(
        f"drafter must be {'None or ' if optional else ''}a jaxdec.drafters drafter "
        "(DraftModel, PromptLookup, Retrieval, or a subclass of jaxdec.drafters.Drafter), "
        f"got {type(drafter).__name__}")


def candidates_topology(num_candidates: int, depth: int) -> Topology:
    """The node budget for C candidate continuations of D tokens: C disjoint chains under the
    root (the largest trie they can form)."""
    num_candidates, depth = check_int("num_candidates", num_candidates), check_int("depth", depth)
    if 1 + num_candidates * depth > MAX_NODES:
        raise ValueError(f"num_candidates={num_candidates} x depth={depth} + the root is "
                         f"{1 + num_candidates * depth} nodes, more than a tree's {MAX_NODES}: "
                         "pass fewer, or a tree (its nodes are the budget the candidates share)")
    parents = [-1]
    for _ in range(num_candidates):
        parents += [0] + [len(parents) + d for d in range(depth - 1)]
    return from_parents(parents)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class History:
    """Every token of each row so far (prompt, then output; the last one is the root):
    tokens [B, H], length [B]."""

    tokens: jax.Array
    length: jax.Array

    @staticmethod
    def from_prompts(tokens_BT, prompt_lengths_B, capacity: int) -> "History":
        B, T = tokens_BT.shape
        buffer = jnp.zeros((B, capacity), jnp.int32).at[:, :T].set(tokens_BT[:, :capacity])
        return History(tokens=buffer, length=prompt_lengths_B.astype(jnp.int32))

    def append(self, emitted_BL, n_B) -> "History":
        L = emitted_BL.shape[1]
        offsets = jnp.arange(L, dtype=jnp.int32)[None, :]
        slots = jnp.where(offsets < n_B[:, None], self.length[:, None] + offsets,
                          self.tokens.shape[1])
        rows = jnp.arange(self.tokens.shape[0], dtype=jnp.int32)[:, None]
        # The History's own dtypes whatever the caller's (int64 arrays in x64 mode).
        new = emitted_BL.astype(self.tokens.dtype)
        return History(tokens=self.tokens.at[rows, slots].set(new, mode="drop"),
                       length=self.length + n_B.astype(self.length.dtype))

    def last(self, n: int) -> jax.Array:
        """[B, n]: the last n tokens of each row (clipped at the start)."""
        idx = jnp.clip(self.length[:, None] - n + jnp.arange(n, dtype=jnp.int32)[None, :], 0, None)
        return jnp.take_along_axis(self.tokens, idx, axis=1)


class PlacedCopies:
    """What a drafter prepared for targets' meshes (its datastore, or its draft model, copied
    onto their devices), by key, the `MAX_KEPT` most recently used kept: a drafter tried on
    one mesh after another (a notebook trying layouts) held a copy for each, on the same
    devices, as long as it lived."""

    MAX_KEPT = 2

    def __init__(self):
        self._entries = collections.OrderedDict()

    def get(self, key, default=None):
        if key not in self._entries:
            return default
        self._entries.move_to_end(key)
        return self._entries[key]

    def __setitem__(self, key, value) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.MAX_KEPT:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class FixedSettings:
    """A drafter whose settings (`SETTINGS`, set by `_set_settings`) are fixed once it is
    made: they are the static data of its compiled programs, and what it prepares for a
    target (a datastore laid out for them, a draft model placed on a mesh) is kept per mesh
    with them, so an assignment to one would half-apply. Make a new drafter to change one."""

    SETTINGS: tuple[str, ...] = ()

    def _set_settings(self, values) -> None:
        for name, value in zip(self.SETTINGS, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        if name in self.SETTINGS:
            raise AttributeError(
                f"{type(self).__name__}'s {name} is fixed when it is made (its compiled "
                "programs, and what it prepared for a target, are built for it): make a new "
                f"drafter, {type(self).__name__}(..., {name}=...)")
        super().__setattr__(name, value)


class LookupDrafter(FixedSettings, Drafter):
    """The settings an n-gram lookup drafter (PromptLookup, Retrieval) shares, fixed when
    made (a Retrieval's datastore is sorted and padded for max_ngram and depth)."""

    SETTINGS = ("max_ngram", "min_ngram", "depth", "num_candidates")

    def _settings(self) -> tuple[int, int, int, int]:
        return tuple(getattr(self, name) for name in self.SETTINGS)

    def default_topology(self) -> Topology:
        return candidates_topology(self.num_candidates, self.depth)


def history_capacity(prompt_bucket: int, max_new_tokens: int) -> int:
    return int(prompt_bucket + max_new_tokens + 1)


# The longest n-gram a lookup drafter matches: each length is a search of its own in the
# compiled step (compile time grows with it: at 64, ~6 s for prompt lookup's step and ~9 s
# for retrieval's on a CPU).
MAX_NGRAM = 64


def lookup_settings(max_ngram, min_ngram, depth, num_candidates) -> tuple[int, int, int, int]:
    """Validated settings of an n-gram lookup drafter (PromptLookup, Retrieval)."""
    settings = (check_int("max_ngram", max_ngram), check_int("min_ngram", min_ngram),
                check_int("depth", depth), check_int("num_candidates", num_candidates))
    if settings[0] > MAX_NGRAM:
        raise ValueError(f"max_ngram={max_ngram} exceeds {MAX_NGRAM} (each length is searched "
                         "in the compiled step)")
    if settings[1] > settings[0]:
        raise ValueError(f"min_ngram={min_ngram} exceeds max_ngram={max_ngram}")
    for name, value in (("depth", settings[2]), ("num_candidates", settings[3])):
        if value > MAX_NODES - 1:  # (a depth of 10**8 was a datastore padding of 0.4 GiB)
            raise ValueError(f"{name}={value} exceeds a tree's {MAX_NODES - 1} nodes below its "
                             "root")
    return settings
