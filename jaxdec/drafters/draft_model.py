"""`DraftModel`: a smaller jaxdec model drafts a chain or a tree, level by level.

The draft's cache stays one token behind the target's (`DraftState`): the last token a step
commits (whose keys and values the draft may never have computed: the deepest drafted node's)
is held back, and the next step's first level runs it beside the new root. So a tree of
depth D costs D draft forwards, each level reading the logits of its own nodes only:

- a tree: each level is one forward over the held-back token and all N tree slots under the
  ancestor mask (slots not yet drafted hold placeholders no drafted node can see), so every
  level has the same shape and the levels run in one `lax.fori_loop`; `update` keeps the
  accepted path but its last node with `commit`, as the target does;
- a chain (`Topology.is_chain`, the default chain(4)): one token per level (two in the first),
  since a chain's earlier nodes are every later node's ancestors: each level runs its node
  against the cache with the nodes before it counted in, and a commit moves nothing.

- a dynamic tree (`jaxdec.tree.dynamic`, EAGLE-2): the same level forwards over the expanded
  nodes only, each level choosing which nodes the next expands by their path probability under
  the draft, so every row's tree follows the draft's confidence (children: the top-k).

Children of a node are, by `proposal`:

- "topk": the node's most likely tokens (deterministic; always used with a greedy target);
- "iid": independent samples from the draft's processed distribution (SpecInfer);
- "without_replacement": distinct samples by Gumbel-top-k (Recursive Speculative Decoding);
- "auto" (default): topk for a greedy target, iid for chains, without_replacement for trees.

The draft may have a different vocabulary size when one only pads the other (same tokenizer,
extra unused rows): extra draft entries are masked, missing ones are never proposed.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import parallel, sampling
from jaxdec.cache import Cache, commit, init_cache
from jaxdec.checks import check_int
from jaxdec.drafters.base import Drafter, FixedSettings, PlacedCopies, Proposal
from jaxdec.model import (Model, check_attention, check_params, family, forward_with_cache,
                          is_abstract, param_dtype, param_shardings)
from jaxdec.tree import (DynamicTree, TokenTree, Topology, ancestor_mask, as_topology,
                         chain)
from jaxdec.sampling import row_keys
from jaxdec.verify import ProposalKind

PROPOSALS = ("auto", "topk", "iid", "without_replacement")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftState:
    """A DraftModel's state between steps: its cache and the token it holds back.

    cache.lengths: the draft's committed tokens per row: the target's length before a row's
      first step, one less (`pending` = 1) after it.
    pending [B]: 1 where the token before the root (`previous`) has no keys and values in the
      draft's cache yet: the next step's first level runs it beside the root.
    previous [B]: that token (meaningful where pending).
    """

    cache: Cache
    pending: jax.Array
    previous: jax.Array


class DraftModel(FixedSettings, Drafter):
    """Drafts with a (small) jaxdec Model that shares the target's tokenizer.

    Args:
      model: the draft Model (e.g. from `jaxdec train draft`). Load it on the target's mesh
        (`mesh=target.mesh`); otherwise the first call on a mesh copies it there (and the copy
        is kept for the calls after it: those of the two meshes used last).
      proposal: how children are chosen (see the module docstring).
      tree: the default tree when `speculative_generate` gets none (chain(4)).
      target_vocab: the target's vocabulary size, which the proposals' distributions span
        (a draft of a padded vocabulary masks its extra entries); `prepare` sets it from the
        target, so leave it None.
    The settings are fixed once made (a new DraftModel changes one).
    """

    SETTINGS = ("model", "proposal", "tree", "target_vocab")  # fixed when made

    def __init__(self, model: Model, *, proposal: str = "auto",
                 tree: Topology | DynamicTree | None = None,
                 target_vocab: int | None = None):
        if not isinstance(model, Model):
            raise TypeError(f"DraftModel needs a jaxdec Model, got {type(model).__name__}")
        check_params(model)
        if proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
        if target_vocab is not None:
            target_vocab = check_int("target_vocab", target_vocab)
        # (the tree validated, and with hashable fields: a Topology built by hand may hold
        # lists)
        self._set_settings((model, proposal, None if tree is None else as_topology(tree),
                            target_vocab))
        # (mesh, target vocabulary) -> (the target tokenizer checked, the draft prepared)
        self._placed = PlacedCopies()

    def __repr__(self) -> str:
        return (f"DraftModel(<{self.model.config.num_layers} layers, "
                f"{self.model.config.hidden_size} wide, {self.model.dtype}>, "
                f"proposal={self.proposal!r}, tree={self.tree!r})")

    def _replace(self, **changes) -> "DraftModel":
        fields = dict(model=self.model, proposal=self.proposal, tree=self.tree,
                      target_vocab=self.target_vocab)
        fields.update(changes)
        return DraftModel(fields.pop("model"), **fields)

    def default_topology(self) -> Topology:
        return self.tree or chain(4)

    def proposal_kind(self, sampler, topology: Topology | DynamicTree) -> ProposalKind:
        if isinstance(topology, DynamicTree):
            if self.proposal not in ("auto", "topk"):
                raise ValueError(f"a dynamic tree drafts each expanded node's most likely "
                                 f"tokens: it takes proposal 'auto' or 'topk', not "
                                 f"{self.proposal!r}")
            return ProposalKind.DETERMINISTIC
        if sampler.is_greedy or self.proposal == "topk":
            return ProposalKind.DETERMINISTIC
        if self.proposal == "iid":
            return ProposalKind.IID
        if self.proposal == "without_replacement":
            return ProposalKind.WITHOUT_REPLACEMENT
        return ProposalKind.IID if topology.max_children == 1 else ProposalKind.WITHOUT_REPLACEMENT

    def prepare(self, target: Model) -> "DraftModel":
        """Checks the vocabularies and places the draft on the target's mesh, once per mesh
        and target tokenizer (those of the two meshes used last kept): later calls get the
        same copy (where both models carry a
        tokenizer, the check compares them: 0.6 s for 128K entries on a CPU core)."""
        draft = self.model
        key = (target.mesh, target.config.vocab_size)
        checked, prepared = self._placed.get(key, (None, None))
        if prepared is not None and checked is target.tokenizer:
            return prepared
        check_vocabularies(target, draft)
        check_attention(draft, "the draft model")  # (before the program traces it)
        if prepared is not None:
            self._placed[key] = (target.tokenizer, prepared)
            return prepared
        if draft.mesh != target.mesh:
            if is_abstract(draft):
                raise ValueError("an abstract draft model (jaxdec.abstract_model) must be built "
                                 "on the target's mesh (mesh=target.mesh)")
            try:
                parallel.check_divisibility(draft.config, target.mesh)
            except ValueError as e:
                raise ValueError(f"the draft model cannot run on the target's mesh: "
                                 f"{str(e).replace('the model', 'the draft')}") from None
            vocab = parallel.padded_vocab(draft.config, target.mesh)
            params = jax.tree.map(parallel.to_host, draft.params)
            rows = params["embed"].shape[0]
            params = _resize_vocab(params, rows, vocab)
            fam = family(draft.config)
            groups = fam.kv_groups(draft.config, parallel.tp_size(target.mesh))
            params = jax.tree_util.tree_map_with_path(
                lambda path, x: fam.regroup(jax.tree_util.keystr(path), x, draft.config, groups,
                                            xp=np), params)
            params = jax.tree.map(parallel.put_on_mesh, params,
                                  param_shardings(draft.config, target.mesh))
            draft = Model(config=draft.config, params=params, mesh=target.mesh,
                          tokenizer=draft.tokenizer, attention=draft.attention,
                          matmul=draft.matmul)
        prepared = self._replace(model=draft, target_vocab=target.config.vocab_size)
        self._placed[key] = (target.tokenizer, prepared)
        return prepared

    def check_reach(self, positions: int) -> None:
        config = self.model.config
        if positions > config.max_positions:
            warnings.warn(
                f"this run reaches position {positions}, past the draft model's "
                f"{config.max_positions} positions ({config.describe_max_positions()}): it "
                "drafts from positions it was not trained for (the output stays exact; "
                "fewer drafts may be accepted)", stacklevel=4)

    def init(self, tokens_BT, prompt_lengths_B, *, max_len: int):
        """The draft's cache with every prompt token but the last (like the target's)."""
        cache = init_cache(self.model.config, tokens_BT.shape[0], max_len,
                           dtype=param_dtype(self.model), mesh=self.model.mesh)
        return self._prefilled(cache, tokens_BT, None, prompt_lengths_B)

    def resume(self, state: DraftState, tokens_BT, prompt_lengths_B, new_BT, kept_B, *,
               max_len: int):
        """Prefills only new_BT on top of the first kept_B tokens `state`'s cache holds."""
        del tokens_BT
        if state.cache.max_len != max_len:
            raise ValueError(f"the draft's cache has {state.cache.max_len} slots, the "
                             f"target's {max_len}")
        return self._prefilled(state.cache, new_BT, kept_B, prompt_lengths_B)

    def _prefilled(self, cache, tokens_BT, start_B, prompt_lengths_B) -> DraftState:
        """The state after writing `tokens_BT` from each row's `start_B` (None: an empty
        cache, the prefill `fresh`), holding every prompt token but the last."""
        B, T = tokens_BT.shape
        offsets = jnp.arange(T, dtype=jnp.int32)[None, :]
        positions = jnp.broadcast_to(offsets, (B, T)) if start_B is None else \
            start_B[:, None] + offsets
        if start_B is not None:
            cache = cache.replace(lengths=start_B)
        _, _, cache = forward_with_cache(self.model, tokens_BT, positions, cache,
                                         logits_indices_BN=jnp.zeros((B, 1), jnp.int32),
                                         fresh=start_B is None, prefill=True)
        zeros = jnp.zeros((B,), jnp.int32)
        return DraftState(cache=cache.replace(lengths=(prompt_lengths_B - 1).astype(jnp.int32)),
                          pending=zeros, previous=zeros)

    def held_length(self, state: DraftState):
        """The tokens the draft's cache holds (the target's, or all but its last)."""
        return state.cache.lengths

    def _target_logits(self, logits_BNV):
        """Draft logits on the target's vocabulary: extra entries dropped, missing ones -inf."""
        V = self.target_vocab or logits_BNV.shape[-1]
        if logits_BNV.shape[-1] >= V:
            return logits_BNV[..., :V]
        pad = jnp.full(logits_BNV.shape[:-1] + (V - logits_BNV.shape[-1],), -jnp.inf,
                       logits_BNV.dtype)
        return jnp.concatenate([logits_BNV, pad], axis=-1)

    def _children(self, logits_BMV, key, kind: ProposalKind, K: int, sampler):
        """K children of each of M drafted nodes from the draft's logits [B, M, V]: (tokens
        [B, M, K] int32, drawable [B, M, K], the processed distribution [B, M, V] they were
        drawn from, or None for deterministic children)."""
        logits = self._target_logits(logits_BMV).astype(jnp.float32)
        if kind == ProposalKind.DETERMINISTIC:
            scores, cand = jax.lax.top_k(logits, K)
            return cand.astype(jnp.int32), scores > -jnp.inf, None
        probs = sampler.probs(logits)
        log_probs = jnp.log(probs)
        # Row b's draws from (key, b) alone: a row's drafts do not depend on its batch.
        keys = row_keys(key, logits.shape[0])
        if kind == ProposalKind.IID:
            cand = jax.vmap(lambda k, lp: sampling.draw(
                k, lp[:, None, :], shape=(lp.shape[0], K)))(keys, log_probs)
        else:  # Gumbel-top-k: K distinct draws in sampling order
            gumbel = jax.vmap(lambda k: jax.random.gumbel(
                k, log_probs.shape[1:], jnp.float32, mode=sampling.DRAW_MODE))(
                keys)
            cand = jax.lax.top_k(log_probs + gumbel, K)[1]
        ok = jnp.take_along_axis(probs, cand, axis=2) > 0
        return cand.astype(jnp.int32), ok, probs

    def propose(self, state: DraftState, root_B, lengths_B, key, *, topology: Topology,
                sampler):
        kind = self.proposal_kind(sampler, topology)
        vocab = self.target_vocab or self.model.config.vocab_size
        if topology.max_children > vocab:  # top-k over the vocabulary cannot draft them
            raise ValueError(f"tree: a node has {topology.max_children} children, more than "
                             f"the vocabulary's {vocab} tokens")
        if isinstance(topology, DynamicTree):
            return self._propose_dynamic(state, root_B, lengths_B, topology)
        # A chain of best tokens drafts one token a step; a chain of other ranks (the second
        # best, ...) takes the tree path, which drafts each node's rank.
        if topology.is_chain and not any(topology.ranks):
            return self._propose_chain(state, root_B, lengths_B, key, topology, kind, sampler)
        B, N, D = root_B.shape[0], topology.num_nodes, topology.max_depth
        template = topology.template(B)
        depth = np.asarray(topology.depth)
        parents = np.maximum(np.asarray(topology.parents), 0)
        ranks = np.asarray(topology.ranks)
        K = topology.max_children
        V = self.target_vocab or self.model.config.vocab_size
        # Level ell reads the logits of its own nodes only (depth ell, padded to the widest
        # level); `place[i]`: node i's row among its level's. (A tree that is not a chain has
        # D >= 1.)
        levels = [np.flatnonzero(depth == d) for d in range(D)]
        level_nodes = np.zeros((D, max(len(n) for n in levels)), np.int32)
        place = np.zeros(N, np.int32)
        for d, nodes in enumerate(levels):
            level_nodes[d, : len(nodes)] = nodes
            place[nodes] = np.arange(len(nodes))
        level_nodes = jnp.asarray(level_nodes)
        # Slot 0 holds the held-back token (a placeholder no node sees where none is pending),
        # slot 1 + i node i: the draft writes from its own length, `pending` before the root.
        held = state.pending == 1
        mask = jnp.concatenate([
            jnp.concatenate([jnp.ones((B, 1, 1), bool), jnp.zeros((B, 1, N), bool)], axis=2),
            jnp.concatenate([jnp.broadcast_to(held[:, None, None], (B, N, 1)),
                             template.ancestors], axis=2)], axis=1)
        positions = jnp.concatenate([(lengths_B - state.pending)[:, None],
                                     lengths_B[:, None] + template.depth], axis=1)
        first = jnp.where(held, state.previous, root_B)[:, None]

        def level(ell, carry):
            # Each level writes all N + 1 slots' keys and values before reading them, so it
            # can overwrite the level before's in the carried cache (updated in place); a
            # forward over the loop-invariant `cache` would copy the whole cache every level.
            tokens, valid, q, written = carry
            rows = jnp.broadcast_to(1 + level_nodes[ell], (B, level_nodes.shape[1]))
            logits, _, written = forward_with_cache(
                self.model, jnp.concatenate([first, tokens], axis=1), positions, written,
                mask_BTT=mask, logits_indices_BN=rows)
            cand, ok, probs = self._children(logits, jax.random.fold_in(key, ell), kind, K,
                                             sampler)
            if probs is not None:
                q = jnp.where((depth == ell)[None, :, None], probs[:, place], q)
            child_tokens = cand[:, place[parents], ranks]
            child_ok = ok[:, place[parents], ranks] & valid[:, parents]
            is_next = (depth == ell + 1)[None, :]
            tokens = jnp.where(is_next, child_tokens, tokens)
            valid = jnp.where(is_next, child_ok, valid)
            return tokens, valid, q, written

        tokens = template.tokens.at[:, 0].set(root_B.astype(template.tokens.dtype))
        q = jnp.zeros((B, N, V), jnp.float32) if kind != ProposalKind.DETERMINISTIC else None
        tokens, valid, q, written = jax.lax.fori_loop(
            0, D, level, (tokens, template.valid, q, state.cache))
        tree = dataclasses.replace(template, tokens=tokens, valid=valid)
        return (Proposal(tree=tree, q=q, kind=kind, chain=False),
                dataclasses.replace(state, cache=written))

    def _propose_dynamic(self, state: DraftState, root_B, lengths_B, spec: DynamicTree):
        """EAGLE-2's dynamic tree (see `jaxdec.tree.DynamicTree`). Each level runs one forward
        over the held-back token and the E expandable slots (the root, then `width` nodes a
        level) under the ancestor mask drafted so far, as the static tree's levels do; it
        reads the logits of its own `width` expanded nodes (the root alone at level 0), drafts
        their `width` most likely children each, scored by path log-probability under the
        draft, and expands the best `width` of those next (their slots get their tokens, so
        the next forward runs them). The tree is the root and the `nodes - 1` best of all
        drafted nodes (ties to the shallower, so a node's parent always comes with it),
        ordered by depth; `Proposal.slots` says where the expanded ones sit in the draft's
        cache (the only ones `update` commits: a committed node other than the last has a
        child in the tree, so it was expanded)."""
        B, N, D, W = root_B.shape[0], spec.num_nodes, spec.max_depth, spec.width
        E = spec.expanded
        held = state.pending == 1
        level_of = np.concatenate([[0], 1 + np.arange(E - 1) // W]).astype(np.int32)  # depth
        positions = jnp.concatenate([(lengths_B - state.pending)[:, None],
                                     lengths_B[:, None] + jnp.asarray(level_of)[None, :]],
                                    axis=1)
        first = jnp.where(held, state.previous, root_B)[:, None]
        rows = jnp.arange(B, dtype=jnp.int32)[:, None]
        eye = jnp.eye(E, dtype=bool)
        neg = jnp.float32(-jnp.inf)
        children = jnp.arange(W * W, dtype=jnp.int32)

        def level(ell, carry):
            tokens, parents, ancestors, scores, pool, written = carry
            pool_scores, pool_tokens, pool_parents = pool
            # Slot 0 (the held-back token) sees itself; node e the held-back token where one
            # is pending, and its drafted ancestors (nodes not drafted yet: nobody).
            mask = jnp.concatenate([
                jnp.concatenate([jnp.ones((B, 1, 1), bool), jnp.zeros((B, 1, E), bool)], axis=2),
                jnp.concatenate([jnp.broadcast_to(held[:, None, None], (B, E, 1)), ancestors],
                                axis=2)], axis=1)
            start = jnp.where(ell == 0, 0, 1 + (ell - 1) * W).astype(jnp.int32)
            # This level's nodes (level 0: the root, its row repeated).
            live = (ell > 0) | (jnp.arange(W) == 0)
            nodes = jnp.where(live, start + jnp.arange(W, dtype=jnp.int32), 0)
            logits, _, written = forward_with_cache(
                self.model, jnp.concatenate([first, tokens], axis=1), positions, written,
                mask_BTT=mask, logits_indices_BN=jnp.broadcast_to(1 + nodes, (B, W)))
            logp = jax.nn.log_softmax(self._target_logits(logits).astype(jnp.float32), axis=-1)
            best, cand = jax.lax.top_k(logp, W)  # [B, W, W]: each node's children
            parent_scores = jnp.take_along_axis(scores, jnp.broadcast_to(nodes, (B, W)), axis=1)
            child_scores = jnp.where(live[None, :, None], parent_scores[:, :, None] + best,
                                     neg).reshape(B, W * W)
            child_tokens = cand.reshape(B, W * W).astype(jnp.int32)
            child_parents = jnp.broadcast_to(start + children // W, (B, W * W))
            # The best W children are expanded next (before the last level: past it the
            # slots are out of range and the writes dropped); the rest join the pool.
            top_scores, top = jax.lax.top_k(child_scores, W)
            slots = jnp.broadcast_to(1 + ell * W + jnp.arange(W, dtype=jnp.int32), (B, W))
            expand = (ell < D - 1) & jnp.any(children[None, None, :] == top[:, :, None], axis=1)
            top_parents = jnp.take_along_axis(child_parents, top, axis=1)
            tokens = tokens.at[rows, slots].set(
                jnp.take_along_axis(child_tokens, top, axis=1), mode="drop")
            parents = parents.at[rows, slots].set(top_parents, mode="drop")
            scores = scores.at[rows, slots].set(top_scores, mode="drop")
            inherited = jnp.take_along_axis(ancestors, top_parents[:, :, None], axis=1)
            ancestors = ancestors.at[rows, slots].set(inherited | eye[slots], mode="drop")
            pool = tuple(jax.lax.dynamic_update_slice_in_dim(x, new[:, None], ell, axis=1)
                         for x, new in ((pool_scores, jnp.where(expand, neg, child_scores)),
                                        (pool_tokens, child_tokens),
                                        (pool_parents, child_parents)))
            return tokens, parents, ancestors, scores, pool, written

        carry = (jnp.zeros((B, E), jnp.int32).at[:, 0].set(root_B.astype(jnp.int32)),
                 jnp.full((B, E), -1, jnp.int32), jnp.broadcast_to(eye, (B, E, E)),
                 jnp.full((B, E), neg).at[:, 0].set(0.0),
                 (jnp.full((B, D, W * W), neg), jnp.zeros((B, D, W * W), jnp.int32),
                  jnp.zeros((B, D, W * W), jnp.int32)), state.cache)
        tokens, parents, _, scores, pool, written = jax.lax.fori_loop(0, D, level, carry)
        # Every drafted node but the root: the expanded ones (at draft slot 1 + e), then the
        # pool's (never run by the draft: slot 0, a placeholder `update` never reads).
        pool_depth = jnp.broadcast_to(1 + jnp.arange(D * W * W, dtype=jnp.int32) // (W * W),
                                      (B, D * W * W))
        cand_scores = jnp.concatenate([scores[:, 1:], pool[0].reshape(B, -1)], axis=1)
        cand_tokens = jnp.concatenate([tokens[:, 1:], pool[1].reshape(B, -1)], axis=1)
        cand_parents = jnp.concatenate([parents[:, 1:], pool[2].reshape(B, -1)], axis=1)
        cand_depth = jnp.concatenate([jnp.broadcast_to(jnp.asarray(level_of[1:]), (B, E - 1)),
                                      pool_depth], axis=1)
        cand_expanded = jnp.concatenate([jnp.arange(1, E, dtype=jnp.int32),
                                         jnp.zeros(D * W * W, jnp.int32)])  # 0: not expanded
        index = jnp.broadcast_to(jnp.arange(cand_scores.shape[1], dtype=jnp.int32),
                                 cand_scores.shape)
        # The best N - 1 (ties to the shallower: a parent before its children), then in depth
        # order (stable: by score within a depth).
        _, pick_depth, pick = jax.lax.sort((-cand_scores, cand_depth, index), num_keys=2)
        _, pick = jax.lax.sort((pick_depth[:, : N - 1], pick[:, : N - 1]), num_keys=1,
                               is_stable=True)

        def picked(x):
            return jnp.take_along_axis(x, pick, axis=1)

        pick_expanded = jnp.take(cand_expanded, pick)
        # Node of each expanded slot (the root: node 0; not picked: -1).
        node_of = jnp.full((B, E), -1, jnp.int32).at[:, 0].set(0).at[
            rows, jnp.where(pick_expanded > 0, pick_expanded, E)].set(
            jnp.broadcast_to(jnp.arange(1, N, dtype=jnp.int32), (B, N - 1)), mode="drop")
        valid = jnp.concatenate([jnp.ones((B, 1), bool), picked(cand_scores) > neg], axis=1)
        parents = jnp.concatenate([jnp.full((B, 1), -1, jnp.int32),
                                   jnp.take_along_axis(node_of, picked(cand_parents), axis=1)],
                                  axis=1)
        valid &= (parents >= 0) | (jnp.arange(N) == 0)[None, :]
        tree = TokenTree(
            tokens=jnp.concatenate([root_B[:, None].astype(jnp.int32), picked(cand_tokens)],
                                   axis=1),
            parents=parents,
            depth=jnp.concatenate([jnp.zeros((B, 1), jnp.int32), picked(cand_depth)], axis=1),
            valid=valid, ancestors=ancestor_mask(parents, valid))
        slots = jnp.concatenate([jnp.ones((B, 1), jnp.int32),
                                 jnp.where(pick_expanded > 0, 1 + pick_expanded, 0)], axis=1)
        return (Proposal(tree=tree, q=None, kind=ProposalKind.DETERMINISTIC, chain=False,
                         slots=slots),
                dataclasses.replace(state, cache=written))

    def _propose_chain(self, state: DraftState, root_B, lengths_B, key, topology: Topology,
                       kind: ProposalKind, sampler):
        """A chain, one token per level (see the module docstring). Node d sits at the
        target's slot and position length + d; the draft's cache is `pending` tokens behind.
        Near the end of the cache a level's slot may lie past it (a single row's one-token
        write is then shifted onto the last slot): only nodes past the end, never accepted,
        read that slot afterwards."""
        B, N, D = root_B.shape[0], topology.num_nodes, topology.max_depth
        V = self.target_vocab or self.model.config.vocab_size
        template = topology.template(B)
        pending = state.pending

        def draft(ell, logits_B1V, tokens, valid, q):
            # Node ell's child: node ell + 1 (written in place: one-column updates).
            cand, ok, probs = self._children(logits_B1V, jax.random.fold_in(key, ell), kind,
                                             1, sampler)
            parent_ok = jax.lax.dynamic_slice_in_dim(valid, ell, 1, axis=1)
            tokens = jax.lax.dynamic_update_slice_in_dim(tokens, cand[:, :, 0], ell + 1, axis=1)
            valid = jax.lax.dynamic_update_slice_in_dim(valid, ok[:, :, 0] & parent_ok, ell + 1,
                                                        axis=1)
            if probs is not None:
                q = jax.lax.dynamic_update_slice_in_dim(q, probs, ell, axis=1)
            return tokens, valid, q

        # The first level runs [held-back token, root] where one is pending, else [root, a
        # placeholder the root cannot see, past the draft's length: overwritten before any
        # forward sees it]; it reads the root's logits only.
        first = jnp.stack([jnp.where(pending == 1, state.previous, root_B), root_B], axis=1)
        positions = state.cache.lengths[:, None] + jnp.arange(2, dtype=jnp.int32)[None, :]
        logits, _, cache = forward_with_cache(
            self.model, first, positions, state.cache,
            logits_indices_BN=pending[:, None] if D else jnp.zeros((B, 0), jnp.int32))
        tokens = template.tokens.at[:, 0].set(root_B.astype(template.tokens.dtype))
        valid = template.valid
        q = jnp.zeros((B, N, V), jnp.float32) if kind != ProposalKind.DETERMINISTIC else None
        if D:
            tokens, valid, q = draft(0, logits, tokens, valid, q)

        def level(ell, carry):
            # Node ell alone, at slot length + ell: nodes 0..ell-1, written by the levels
            # before, are counted into the cache's length for this forward.
            tokens, valid, q, written = carry
            length = (lengths_B + ell).astype(state.cache.lengths.dtype)
            node = jax.lax.dynamic_slice_in_dim(tokens, ell, 1, axis=1)
            logits, _, written = forward_with_cache(self.model, node, length[:, None],
                                                    written.replace(lengths=length))
            tokens, valid, q = draft(ell, logits, tokens, valid, q)
            return tokens, valid, q, written

        tokens, valid, q, cache = jax.lax.fori_loop(1, D, level, (tokens, valid, q, cache))
        tree = dataclasses.replace(template, tokens=tokens, valid=valid)
        return (Proposal(tree=tree, q=q, kind=kind, chain=True),
                dataclasses.replace(state, cache=cache.replace(lengths=state.cache.lengths)))

    def update(self, state: DraftState, proposal, verdict, n_commit_B, emitted_BL):
        """Keeps every committed token but the last, which the next step runs (the new
        held-back token)."""
        del emitted_BL
        kept = n_commit_B > 0
        pending = state.pending
        if proposal.chain:  # the kept tokens are already at their slots: only lengths move
            last = jnp.maximum(n_commit_B - 1, 0)
            cache = state.cache.replace(lengths=jnp.where(
                kept, state.cache.lengths + pending + n_commit_B - 1, state.cache.lengths))
        else:  # the path's slots (node i at 1 + i), after the held-back token's (0)
            B = n_commit_B.shape[0]
            node_slots = (1 + verdict.path if proposal.slots is None else
                          jnp.take_along_axis(proposal.slots, verdict.path, axis=1))
            slots = jnp.where((pending == 1)[:, None],
                              jnp.concatenate([jnp.zeros((B, 1), node_slots.dtype),
                                               node_slots[:, :-1]], axis=1),
                              node_slots)
            cache = commit(state.cache, slots, jnp.where(kept, n_commit_B - 1 + pending, 0))
            last = jnp.take_along_axis(verdict.path, jnp.maximum(n_commit_B - 1, 0)[:, None],
                                       axis=1)[:, 0]
        previous = jnp.take_along_axis(proposal.tree.tokens, last[:, None], axis=1)[:, 0]
        return DraftState(cache=cache, pending=jnp.where(kept, 1, pending),
                          previous=jnp.where(kept, previous, state.previous))


def _resize_vocab(params: dict, rows: int, vocab: int) -> dict:
    """Pads or trims tp vocabulary padding when moving params to another mesh."""
    if rows == vocab:
        return params
    out = dict(params)

    def fit(x, axis):
        if x.shape[axis] > vocab:
            return np.take(x, np.arange(vocab), axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, vocab - x.shape[axis])
        return np.pad(x, pad)

    out["embed"] = fit(params["embed"], 0)
    if "lm_head" in params:
        out["lm_head"] = fit(params["lm_head"], 1)
    return out


def check_vocabularies(target: Model, draft: Model) -> None:
    """Draft and target must share a tokenizer (compared where both have one: a draft of
    another tokenizer drafts ids that mean other text, and is never right); their sizes may
    differ only by padding."""
    vt, vd = target.config.vocab_size, draft.config.vocab_size
    tt, td = target.tokenizer, draft.tokenizer
    if tt is not None and td is not None:
        if tt is not td and tt.get_vocab() != td.get_vocab():
            raise ValueError(
                f"the draft's tokenizer differs from the target's (vocabulary sizes {vd} and {vt})"
            )
        return
    if vt == vd:
        return
    if abs(vt - vd) > max(256, 0.01 * max(vt, vd)):
        raise ValueError(
            f"the draft's vocabulary ({vd}) and the target's ({vt}) differ by more than padding: "
            "they cannot share a tokenizer"
        )


def _unflatten(aux, children) -> DraftModel:
    draft = object.__new__(DraftModel)  # no validation: leaves may be tracers or placeholders
    (model,) = children
    proposal, target_vocab = aux
    draft._set_settings((model, proposal, None, target_vocab))
    draft._placed = PlacedCopies()
    return draft


# The default tree is not in the pytree's static data: the program is given its tree
# (`default_topology` is read on the host before), so drafters of other default trees share
# one compiled program; an unflattened copy (inside a program, after jax.tree.map) has none.
jax.tree_util.register_pytree_node(
    DraftModel, lambda d: ((d.model,), (d.proposal, d.target_vocab)), _unflatten)
