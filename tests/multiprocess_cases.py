"""What test_multiprocess.py runs both in one process and across two (multiprocess_worker.py):
every generation method on one model, the results as plain lists."""

import jax
import numpy as np

import jaxdec
from jaxdec import tree
from jaxdec.drafters import DraftModel, PromptLookup, Retrieval

PROMPTS = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46, 26, 43, 38], [32, 79, 50, 28, 84, 19]]


def run_cases(model, draft) -> dict:
    """Tokens (and lengths) of plain greedy and sampled decoding and of speculative decoding
    with a draft model (on its own mesh: moved onto the target's), prompt lookup and retrieval,
    and of a two-row PrefixCache's two turns; the sampled run's log-probabilities and
    speculative statistics too."""
    new = dict(max_new_tokens=6)
    sampled = jaxdec.generate(model, PROMPTS, sampler=jaxdec.Sampler(temperature=0.8),
                              key=jax.random.key(1), return_logprobs=True, **new)
    spec = jaxdec.speculative_generate(model, DraftModel(draft), PROMPTS, tree=tree.kary(2, 2),
                                       **new)
    corpus = np.array(sum(PROMPTS, []) * 2)
    # Two conversations in one PrefixCache (a row a data-parallel shard), the draft model's
    # cache resumed per row in the second turn.
    session = jaxdec.PrefixCache(model, max_len=64, drafter=DraftModel(draft),
                                 tree=tree.chain(3), rows=2)
    first = session.generate(PROMPTS[:2], **new).to_lists()
    second = session.generate([PROMPTS[0] + first[0] + PROMPTS[2], PROMPTS[1] + first[1]],
                              **new).to_lists()
    return {
        "prefix_rows": first + second,
        "greedy": jaxdec.generate(model, PROMPTS, **new).tokens.tolist(),
        "sampled": sampled.tokens.tolist(),
        "sampled_logprobs": np.round(sampled.logprobs, 4).tolist(),
        "draft_model": spec.tokens.tolist(),
        "draft_model_row_steps": spec.stats.row_steps.tolist(),
        "prompt_lookup": jaxdec.speculative_generate(model, PromptLookup(), PROMPTS,
                                                     **new).tokens.tolist(),
        "retrieval": jaxdec.speculative_generate(model, Retrieval(corpus), PROMPTS,
                                                 **new).tokens.tolist(),
        "lengths": sampled.lengths.tolist(),
    }


def prefix_turns(model) -> list:
    """Two turns of a `PrefixCache` conversation (the second reuses the first's cache)."""
    session = jaxdec.PrefixCache(model, max_len=64)
    first = session.generate(PROMPTS[0], max_new_tokens=4).to_lists()[0]
    second = session.generate(PROMPTS[0] + first + PROMPTS[1], max_new_tokens=4)
    return [first, second.to_lists()[0]]
