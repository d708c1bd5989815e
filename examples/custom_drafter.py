"""Write your own drafter: a phrase book.

A drafter proposes a token tree per row and step; `jaxdec.speculative_generate` verifies the
trees with the target inside one jitted loop, so whatever a drafter proposes, greedy output
is exactly `jaxdec.generate`'s (and sampled output follows the target's distribution, for
children drafted deterministically as here, or drawn from the `q` the drafter returns). This
one drafts from a fixed list of phrases: wherever a phrase holds the row's latest token, the
tokens after it there are a candidate continuation. Here the phrases are answers the model
gave before (a cache of past answers), so asking again is drafted almost whole.

    python examples/custom_drafter.py

The interface (`jaxdec.drafters.Drafter`): `init` builds the drafter's state from the
prompts, `propose` returns a `Proposal` (a tree per row) and the state, `update` sees what
the target accepted. A drafter is a pytree: its arrays are leaves (traced), its settings
static.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import jaxdec
from jaxdec.drafters import Drafter, Proposal, ProposalKind, candidates_topology


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PhraseBook(Drafter):
    """book: int32 [phrases, width], each phrase's tokens then -1 (at least `depth` of them,
    so `depth` tokens can be read after any place of a phrase)."""

    book: jax.Array
    depth: int = dataclasses.field(default=4, metadata=dict(static=True))
    num_candidates: int = dataclasses.field(default=2, metadata=dict(static=True))

    @classmethod
    def from_phrases(cls, phrases, *, depth: int = 4, num_candidates: int = 2) -> "PhraseBook":
        book = np.full((len(phrases), max(map(len, phrases)) + depth), -1, np.int32)
        for i, phrase in enumerate(phrases):
            book[i, :len(phrase)] = phrase
        return cls(jnp.asarray(book), depth, num_candidates)

    def default_topology(self):
        # num_candidates disjoint chains of `depth` tokens under the root: the node budget.
        return candidates_topology(self.num_candidates, self.depth)

    def init(self, tokens_BT, prompt_lengths_B, *, max_len: int):
        return ()  # nothing to carry from step to step

    def propose(self, state, root_B, lengths_B, key, *, topology, sampler):
        del lengths_B, key, sampler  # deterministic drafts need no randomness
        B, D = root_B.shape[0], min(topology.max_depth, self.depth)
        P, W = self.book.shape
        starts = W - D  # the places with D readable tokens after them
        holds = (self.book[None, :, :starts] == root_B[:, None, None]).reshape(B, P * starts)
        place = jnp.argsort(~holds, axis=1, stable=True)[:, :self.num_candidates]  # first ones
        found = jnp.take_along_axis(holds, place, axis=1)
        phrase, at = place // starts, place % starts
        cand = self.book[phrase[..., None], at[..., None] + 1 + jnp.arange(D)[None, None]]
        tree = jaxdec.tree.from_candidates(root_B, cand, found[..., None] & (cand >= 0),
                                           topology.num_nodes)
        return Proposal(tree=tree, q=None, kind=ProposalKind.DETERMINISTIC), state

    def update(self, state, proposal, verdict, n_commit_B, emitted_BL):
        return state


def main() -> None:
    config = jaxdec.ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    model = jaxdec.init_model(config, jax.random.PRNGKey(0))
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    earlier = jaxdec.generate(model, prompts, max_new_tokens=32)
    book = PhraseBook.from_phrases([p + out for p, out in zip(prompts, earlier.to_lists())])

    for name, asked in (("asked again", prompts), ("a new prompt", [[40, 41, 42]])):
        plain = jaxdec.generate(model, asked, max_new_tokens=32)
        drafted = jaxdec.speculative_generate(model, book, asked, max_new_tokens=32)
        assert np.array_equal(drafted.tokens, plain.tokens), "verification is lossless"
        print(f"{name}: {drafted.stats.tau:.2f} tokens per target forward, "
              f"{drafted.stats.steps} steps for {int(plain.lengths.max())} tokens, "
              "the same tokens as generate")


if __name__ == "__main__":
    main()
