"""`jaxdec demo`: jaxdec's own demo models, trained on first use, continuing held-out code.

The target and its distilled draft live under `$JAXDEC_HOME/demo/<preset>/{target,draft}`
(default `~/.cache/jaxdec`). Missing ones are trained (`cpu-tiny` on CPUs, `gpu-small` on
accelerators); an interrupted training resumes. The demo then continues the openings of
held-out standard-library files (never trained on), greedily, with plain decoding and with
each speculative method (draft model chain and tree, prompt lookup, retrieval from the
training corpus), and prints tokens/s, speedup, mean accepted length and whether the tokens
match plain decoding, then the target's held-out perplexity and a sampled completion.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np

from jaxdec import data, tree
from jaxdec.checkpoint import load_pretrained
from jaxdec.checks import check_int
from jaxdec.generate import generate
from jaxdec.drafters import DraftModel, PromptLookup, Retrieval
from jaxdec.sampling import Sampler
from jaxdec.speculative import speculative_generate
from jaxdec.train import loop
from jaxdec.train.distill import train_draft
from jaxdec.train.lm import train_lm
from jaxdec.train.presets import get_preset

METRICS = "metrics.json"
DEMO_TREE = tree.from_choices([[0], [1], [0, 0], [1, 0], [0, 1], [0, 0, 0], [0, 0, 0, 0]])


def jaxdec_home() -> str:
    return os.environ.get("JAXDEC_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "jaxdec")


def default_preset() -> str:
    return "cpu-tiny" if jax.default_backend() == "cpu" else "gpu-small"


def _trained(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, METRICS))


def ensure_demo_models(preset: str, home: str, log: Callable[[str], None] = print):
    """(target_dir, draft_dir), training whichever is missing (resuming a partial run)."""
    base = os.path.join(home, "demo", preset)
    target_dir, draft_dir = os.path.join(base, "target"), os.path.join(base, "draft")
    try:
        if not _trained(target_dir):
            partial = os.path.exists(os.path.join(target_dir, loop.RUN_FILE))
            log(f"training the {preset} demo target in {target_dir}"
                + (" (resuming)" if partial else ""))
            train_lm(preset, target_dir, resume=partial, log=log)
        if not _trained(draft_dir):
            partial = os.path.exists(os.path.join(draft_dir, loop.RUN_FILE))
            log(f"distilling the {preset} demo draft in {draft_dir}"
                + (" (resuming)" if partial else ""))
            train_draft(target_dir, preset, draft_dir, resume=partial, log=log)
    except loop.Interrupted as e:   # its advice is the train command's
        kept = (f"the checkpoint at step {e.step} is intact" if e.step is not None else
                "no checkpoint was written yet")
        raise loop.Interrupted(f"the demo's training was interrupted; {kept}: run jaxdec demo "
                               "again to continue", e.step) from None
    except ValueError as e:   # a cache the demo cannot continue (moved, edited)
        raise ValueError(f"{e} (the demo's models in {base}: delete that directory to train "
                         "them afresh)") from None
    return target_dir, draft_dir


def heldout_prompts(tokenizer, *, count: int, length: int) -> list[list[int]]:
    """The first `length` tokens of the first `count` held-out files that are long enough."""
    prompts = []
    for text in data.load_corpus().heldout_texts:
        ids = tokenizer.encode(text).ids
        if len(ids) > length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    if not prompts:
        raise ValueError(f"no held-out file has more than {length} tokens")
    return prompts


def run_demo(
    *,
    preset: str | None = None,
    home: str | None = None,
    max_new_tokens: int = 64,
    num_prompts: int = 4,
    prompt_tokens: int = 48,
    log: Callable[[str], None] = print,
) -> dict:
    """Trains the demo models if needed, decodes, prints a table; returns the figures."""
    if check_int("max_new_tokens", max_new_tokens) < 2:   # a decode speed needs a step
        raise ValueError(f"max_new_tokens must be >= 2 (the first token comes from the "
                         f"prefill), got {max_new_tokens}")
    positions = get_preset(preset or default_preset()).max_positions
    if prompt_tokens + max_new_tokens > positions:  # before minutes of training, not after
        raise ValueError(f"max_new_tokens={max_new_tokens} + the demo's {prompt_tokens}-token "
                         f"prompts exceed the {preset or default_preset()} models' {positions} "
                         f"positions")
    preset = get_preset(preset or default_preset()).name
    home = home or jaxdec_home()
    target_dir, draft_dir = ensure_demo_models(preset, home, log)
    target = load_pretrained(target_dir)
    target_metrics = _read_metrics(target_dir)
    draft_metrics = _read_metrics(draft_dir)
    prompts = heldout_prompts(target.tokenizer, count=num_prompts, length=prompt_tokens)

    plain = dict(max_new_tokens=max_new_tokens, stop_tokens=target.config.eos_token_ids)
    generate(target, prompts, **plain)  # compile
    result = generate(target, prompts, return_timings=True, **plain)
    base = result.decode_tokens_per_s
    rows = [("plain decoding (greedy)", base, 1.0, 1.0, True)]
    for name, drafter, topology in demo_methods(target, load_pretrained(draft_dir), preset):
        speculative_generate(target, drafter, prompts, tree=topology, **plain)  # compile
        spec = speculative_generate(target, drafter, prompts, tree=topology,
                                    return_timings=True, **plain)
        same = bool(np.array_equal(spec.tokens, result.tokens))
        rows.append((name, spec.decode_tokens_per_s, spec.decode_tokens_per_s / base,
                     spec.stats.tau, same))

    log("")
    log(f"jaxdec demo: {preset} target ({target_metrics['params'] / 1e6:.1f}M parameters, "
        f"held-out perplexity {target_metrics['heldout_ppl']:.1f}), draft "
        f"({draft_metrics['params'] / 1e6:.1f}M, held-out expected acceptance at temperature 1 "
        f"{draft_metrics['acceptance_after']:.2f}), {len(prompts)} held-out prompts of "
        f"{prompt_tokens} tokens, up to {max_new_tokens} new tokens, greedy, on "
        f"{jax.devices()[0].device_kind}")
    log("")
    log("| method | tokens/s | speedup | mean accepted length | same tokens as plain |")
    log("|---|---:|---:|---:|---|")
    for name, rate, speedup, accepted, same in rows:
        log(f"| {name} | {rate:.1f} | {speedup:.2f}x | {accepted:.2f} | {'yes' if same else 'NO'} |")
    log("")
    log("mean accepted length: tokens emitted per target forward (accepted drafts + 1)")
    sampled = generate(target, prompts[:1], sampler=Sampler(temperature=0.8, top_p=0.95),
                       key=jax.random.PRNGKey(0), **plain)
    sample = target.tokenizer.decode(prompts[0])
    completion = target.tokenizer.decode(sampled.to_lists()[0])
    log("")
    log("sample completion (temperature 0.8, top-p 0.95; the prompt, then >>> and the model's "
        "continuation):")
    log(sample + ">>>" + completion)
    return {"preset": preset, "heldout_ppl": target_metrics["heldout_ppl"],
            "acceptance": draft_metrics["acceptance_after"],
            "methods": [{"method": n, "tokens_per_s": r, "speedup": s, "mean_accepted": a,
                         "same_tokens": same} for n, r, s, a, same in rows],
            "sample": {"prompt": sample, "completion": completion},
            "tokens": np.asarray(result.tokens)}


def demo_methods(target, draft, preset: str):
    """(name, drafter, tree) for each speculative method the demo compares."""
    corpus = data.load_corpus(max_train_bytes=get_preset(preset).max_train_bytes)
    return [
        ("draft model, chain(4)", DraftModel(draft), tree.chain(4)),
        ("draft model, tree (8 nodes)", DraftModel(draft), DEMO_TREE),
        ("draft model, dynamic tree (16 nodes)", DraftModel(draft), tree.dynamic(4, 3, 16)),
        ("prompt lookup", PromptLookup(), None),
        ("retrieval (training corpus)", Retrieval.from_texts(corpus.train_texts, target.tokenizer),
         None),
    ]


def _read_metrics(directory: str) -> dict:
    return loop.read_json(os.path.join(directory, METRICS))
