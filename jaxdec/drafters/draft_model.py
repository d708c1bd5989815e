"""`DraftModel`: a smaller jaxdec model drafts a chain or a tree, level by level.

Each level is one forward of the draft over all N tree slots under the ancestor mask (slots
not yet drafted hold placeholders that no drafted node can see), so every level has the same
shape and the levels run in one `lax.fori_loop`; a last pass (no logits) leaves every node's keys
and values in the draft's cache, and `update` keeps the accepted path with `commit`, exactly as
the target does. Children of a node are, by `proposal`:

- "topk": the node's most likely tokens (deterministic; always used with a greedy target);
- "iid": independent samples from the draft's processed distribution (SpecInfer);
- "without_replacement": distinct samples by Gumbel-top-k (Recursive Speculative Decoding);
- "auto" (default): topk for a greedy target, iid for chains, without_replacement for trees.

The draft may have a different vocabulary size when one only pads the other (same tokenizer,
extra unused rows): extra draft entries are masked, missing ones are never proposed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import parallel
from jaxdec.cache import commit, init_cache
from jaxdec.drafters.base import Drafter, Proposal
from jaxdec.model import (Model, family, forward_with_cache, is_abstract, param_dtype,
                          param_shardings)
from jaxdec.tree import Topology, chain
from jaxdec.verify import ProposalKind

PROPOSALS = ("auto", "topk", "iid", "without_replacement")


class DraftModel(Drafter):
    """Drafts with a (small) jaxdec Model that shares the target's tokenizer.

    Args:
      model: the draft Model (e.g. from `jaxdec train draft`). Load it on the target's mesh
        (`mesh=target.mesh`); otherwise every call copies it there first.
      proposal: how children are chosen (see the module docstring).
      tree: the default tree when `speculative_generate` gets none (chain(4)).
    """

    def __init__(self, model: Model, *, proposal: str = "auto", tree: Topology | None = None,
                 target_vocab: int | None = None):
        if not isinstance(model, Model):
            raise TypeError(f"DraftModel needs a jaxdec Model, got {type(model).__name__}")
        if proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
        self.model = model
        self.proposal = proposal
        self.tree = tree
        self.target_vocab = target_vocab

    def _replace(self, **changes) -> "DraftModel":
        fields = dict(model=self.model, proposal=self.proposal, tree=self.tree,
                      target_vocab=self.target_vocab)
        fields.update(changes)
        return DraftModel(fields.pop("model"), **fields)

    def default_topology(self) -> Topology:
        return self.tree or chain(4)

    def proposal_kind(self, sampler, topology: Topology) -> ProposalKind:
        if sampler.is_greedy or self.proposal == "topk":
            return ProposalKind.DETERMINISTIC
        if self.proposal == "iid":
            return ProposalKind.IID
        if self.proposal == "without_replacement":
            return ProposalKind.WITHOUT_REPLACEMENT
        return ProposalKind.IID if topology.max_children == 1 else ProposalKind.WITHOUT_REPLACEMENT

    def prepare(self, target: Model) -> "DraftModel":
        """Checks the vocabularies and places the draft on the target's mesh."""
        draft = self.model
        check_vocabularies(target, draft)
        if draft.mesh != target.mesh:
            if is_abstract(draft):
                raise ValueError("an abstract draft model (jaxdec.abstract_model) must be built "
                                 "on the target's mesh (mesh=target.mesh)")
            parallel.check_divisibility(draft.config, target.mesh)
            vocab = parallel.padded_vocab(draft.config, target.mesh)
            params = jax.tree.map(np.asarray, draft.params)
            rows = params["embed"].shape[0]
            params = _resize_vocab(params, rows, vocab)
            fam = family(draft.config)
            groups = fam.kv_groups(draft.config, parallel.tp_size(target.mesh))
            params = jax.tree_util.tree_map_with_path(
                lambda path, x: fam.regroup(jax.tree_util.keystr(path), x, draft.config, groups,
                                            xp=np), params)
            params = jax.device_put(params, param_shardings(draft.config, target.mesh))
            draft = Model(config=draft.config, params=params, mesh=target.mesh,
                          tokenizer=draft.tokenizer, attention=draft.attention,
                          matmul=draft.matmul)
        return self._replace(model=draft, target_vocab=target.config.vocab_size)

    def init(self, tokens_BT, prompt_lengths_B, *, max_len: int):
        """The draft's cache with every prompt token but the last (like the target's)."""
        B, T = tokens_BT.shape
        cache = init_cache(self.model.config, B, max_len, dtype=param_dtype(self.model),
                           mesh=self.model.mesh)
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        _, _, cache = forward_with_cache(self.model, tokens_BT, positions, cache,
                                         logits_indices_BN=jnp.zeros((B, 1), jnp.int32),
                                         fresh=True)
        return cache.replace(lengths=(prompt_lengths_B - 1).astype(jnp.int32))

    def _target_logits(self, logits_BNV):
        """Draft logits on the target's vocabulary: extra entries dropped, missing ones -inf."""
        V = self.target_vocab or logits_BNV.shape[-1]
        if logits_BNV.shape[-1] >= V:
            return logits_BNV[..., :V]
        pad = jnp.full(logits_BNV.shape[:-1] + (V - logits_BNV.shape[-1],), -jnp.inf,
                       logits_BNV.dtype)
        return jnp.concatenate([logits_BNV, pad], axis=-1)

    def propose(self, cache, root_B, lengths_B, key, *, topology: Topology, sampler):
        B, N = root_B.shape[0], topology.num_nodes
        kind = self.proposal_kind(sampler, topology)
        template = topology.template(B)
        depth = jnp.asarray(topology.depth)
        parents = np.maximum(np.asarray(topology.parents), 0)
        ranks = np.asarray(topology.ranks)
        K = topology.max_children
        positions = lengths_B[:, None] + template.depth
        V = self.target_vocab or self.model.config.vocab_size

        def level(ell, carry):
            # Each level writes all N slots' keys and values before reading them, so it can
            # overwrite the level before's in the carried cache (updated in place); a forward
            # over the loop-invariant `cache` would copy the whole cache every level.
            tokens, valid, q, written = carry
            logits, _, written = forward_with_cache(self.model, tokens, positions, written,
                                                    mask_BTT=template.ancestors)
            logits = self._target_logits(logits).astype(jnp.float32)
            level_key = jax.random.fold_in(key, ell)
            if kind == ProposalKind.DETERMINISTIC:
                scores, cand = jax.lax.top_k(logits, K)
                ok = scores > -jnp.inf
            else:
                probs = sampler.probs(logits)
                q = jnp.where((depth == ell)[None, :, None], probs, q)
                log_probs = jnp.log(probs)
                if kind == ProposalKind.IID:
                    cand = jax.random.categorical(level_key, log_probs[:, :, None, :],
                                                  shape=(B, N, K))
                else:  # Gumbel-top-k: K distinct draws in sampling order
                    gumbel = jax.random.gumbel(level_key, log_probs.shape)
                    cand = jax.lax.top_k(log_probs + gumbel, K)[1]
                ok = jnp.take_along_axis(probs, cand, axis=2) > 0
            child_tokens = cand[:, parents, ranks].astype(jnp.int32)
            child_ok = ok[:, parents, ranks] & valid[:, parents]
            is_next = (depth == ell + 1)[None, :]
            tokens = jnp.where(is_next, child_tokens, tokens)
            valid = jnp.where(is_next, child_ok, valid)
            return tokens, valid, q, written

        tokens = template.tokens.at[:, 0].set(root_B)
        q = jnp.zeros((B, N, V), jnp.float32) if kind != ProposalKind.DETERMINISTIC else None
        tokens, valid, q, written = jax.lax.fori_loop(
            0, topology.max_depth, level, (tokens, template.valid, q, cache))
        # The last pass drafts nothing: it writes the deepest tokens' keys and values, with no
        # logits (no output projection, no sampling).
        _, _, written = forward_with_cache(self.model, tokens, positions, written,
                                           mask_BTT=template.ancestors,
                                           logits_indices_BN=jnp.zeros((B, 0), jnp.int32))
        tree = dataclasses.replace(template, tokens=tokens, valid=valid)
        return Proposal(tree=tree, q=q, kind=kind, chain=topology.is_chain), written

    def update(self, cache, proposal, verdict, n_commit_B, emitted_BL):
        del emitted_BL
        return commit(cache, verdict.path, n_commit_B, prefix=proposal.chain)


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
    """Draft and target must share a tokenizer; their sizes may differ only by padding."""
    vt, vd = target.config.vocab_size, draft.config.vocab_size
    if vt == vd:
        return
    tt, td = target.tokenizer, draft.tokenizer
    if tt is not None and td is not None:
        if tt.get_vocab() != td.get_vocab():
            raise ValueError(
                f"the draft's tokenizer differs from the target's (vocabulary sizes {vd} and {vt})"
            )
        return
    if abs(vt - vd) > max(256, 0.01 * max(vt, vd)):
        raise ValueError(
            f"the draft's vocabulary ({vd}) and the target's ({vt}) differ by more than padding: "
            "they cannot share a tokenizer"
        )


def _unflatten(aux, children) -> DraftModel:
    draft = object.__new__(DraftModel)  # no validation: leaves may be tracers or placeholders
    (draft.model,) = children
    draft.proposal, draft.tree, draft.target_vocab = aux
    return draft


jax.tree_util.register_pytree_node(
    DraftModel, lambda d: ((d.model,), (d.proposal, d.tree, d.target_vocab)), _unflatten)
