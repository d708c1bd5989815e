"""Speculative decoding against plain decoding, on one machine, in one run.

Usage (on the lent GPU machine, one call per preset; results land in $OUT):

    python3 -m pip install --no-deps --no-build-isolation -e . && \\
        cp bench/results/speculative-h100.json $OUT/ 2>/dev/null; \\
        python3 bench/speculative.py --preset gpu-small --out $OUT

Presets:
  gpu-small, gpu-base   train the preset's target and distilled draft inside the call, then
                        decode held-out prompts with every method (draft-model chains 4..8,
                        k-ary and choices trees, prompt lookup, retrieval from the training
                        corpus) at batch 1 and 8, greedy and temperature 1.
  synthetic-8b          a Llama-3-8B-shaped bf16 target (random weights arranged so that
                        its greedy continuation is a known permutation of the vocabulary:
                        `permutation_target`) with a drafter that proposes the target's own
                        greedy continuation, each token corrupted with probability 1 - rate
                        (rates 0.6 / 0.8 / 0.9): the regime real deployments live in (a
                        cheap, good draft against a big target).
  cpu-tiny, synthetic-tiny   the same on CPU-sized models (tests run them).
`--target DIR --draft DIR` reuse trained models instead of training; when the call trains
both, it also writes the training record (`train-<device>.json/.md`, as bench/train.py does),
so one call measures training and decoding. `--attention` names the attention of target and
draft: `auto` (the default: on GPU/TPU the Pallas tree-attention kernel over caches of at
least `models.layers.AUTO_KERNEL_MIN_KV_BYTES` per layer, the jnp reference below), `pallas`
(the kernel wherever it takes the shapes) or `reference`; several, comma-separated (the device
plan runs synthetic-8b as `pallas,reference`: the kernel on and off), run side by side in one
call (each batch size and temperature on every path before the next). `--budget-s` overrides
the preset's time budget; runs it leaves out are recorded as skipped, and `--resume` runs only
what the output file does not hold yet, measured with the current code (`spec_sources`, a hash of
`SPECULATIVE_SOURCES`; training again: a trained preset's models do not outlive the call) and
the same `--max-new-tokens`, so calls cut short by the device's limits add up to the whole
table. It resumes a batch size and temperature whole: while any of its runs is missing, all
of them run again beside plain decoding, so a speedup never divides by another call's plain
run. Each record's speedup
compares runs of one process (same models, same prompts).

Programs compile ahead (`--compile-ahead THREADS`, on by default on an accelerator): every
program of the grid is compiled with `compile_only=True` on `jaxdec.abstract_model`s in worker
threads while the models train, and the timed runs start once those compiles are done, so no
compile overlaps a timed run and the first call of each finds its program ready (records:
`compile_ahead_s`, `first_call_compiles`).

Every speculative run is compared with `jaxdec.generate` on the same prompts, batch and
sampler in the same process: speedup_vs_ar = plain seconds / speculative seconds for the same
number of tokens (prefill + decode, compile excluded, best of `--repeats`). Greedy runs also
check that the tokens are identical. Writes `speculative-<device>.json` (records of other
runs already there are kept unless this run repeats them, so `--methods` subsets run in
separate calls accumulate) and `speculative-<device>.md` to `--out`.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxdec
from jaxdec import data, drafters
from jaxdec.drafters.base import Drafter, Proposal
from jaxdec.verify import ProposalKind

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    MODEL_SOURCES, RESULTS, CompileAhead, counting_compiles, default_compile_workers, device_slug,
    git_commit, newest, out_dir, runs_note, sources_digest, utc_now, versions, write_merged)

# The code a speculative run measures: decoding's and the loop's (drafters, verification,
# trees). Records carry its hash (`spec_sources`); `--resume` and the device plan measure
# rows taken with other code again.
SPECULATIVE_SOURCES = MODEL_SOURCES + ("jaxdec/speculative.py", "jaxdec/verify.py",
                                       "jaxdec/tree.py", "jaxdec/drafters")

TREES = {
    "chain:4": "chain(4)", "chain:6": "chain(6)", "chain:8": "chain(8)",
    "kary:3:2": "kary(3, 2)", "choices": "from_choices (8 nodes)",
    "dynamic:4:3:16": "dynamic(4, 3, 16)",
}
RECORD_KEY = ("preset", "attention", "method", "tree", "batch", "temperature")
METHODS = ("draft:chain:4", "draft:chain:6", "draft:chain:8", "draft:kary:3:2",
           "draft:choices", "draft:dynamic:4:3:16", "lookup", "retrieval")


@dataclasses.dataclass(frozen=True)
class Preset:
    kind: str  # "trained" or "synthetic"
    train_preset: str | None = None
    methods: tuple[str, ...] = METHODS
    batches: tuple[int, ...] = (1, 8)
    temperatures: tuple[float, ...] = (0.0, 1.0)
    max_new_tokens: int = 128
    prompt_tokens: int = 64
    rates: tuple[float, ...] = (0.6, 0.8, 0.9)
    chains: tuple[int, ...] = (4, 8)
    budget_s: float | None = 520.0


PRESETS = {
    "gpu-small": Preset(kind="trained", train_preset="gpu-small"),
    "gpu-base": Preset(kind="trained", train_preset="gpu-base",
                       methods=("draft:chain:4", "draft:chain:8", "draft:kary:3:2",
                                "draft:choices", "lookup", "retrieval",
                                "draft:dynamic:4:3:16")),
    "synthetic-8b": Preset(kind="synthetic", temperatures=(0.0,), prompt_tokens=128),
    "cpu-tiny": Preset(kind="trained", train_preset="cpu-tiny", batches=(1, 2),
                       max_new_tokens=24, prompt_tokens=32, budget_s=None),
    "synthetic-tiny": Preset(kind="synthetic", temperatures=(0.0,), batches=(1, 2),
                             max_new_tokens=24, prompt_tokens=16, chains=(4,), budget_s=None),
}


# --------------------------------------------------------------------- timing helpers


def best_time(run, repeats: int):
    """(best seconds of prefill + decode, the best run's result, XLA compiles during the
    first call) after one untimed run (which compiles, unless the program was compiled
    ahead)."""
    with counting_compiles() as compiles:
        run()
    best, result = float("inf"), None
    for _ in range(repeats):
        run_result = run()
        seconds = run_result.prefill_s + run_result.decode_s
        if seconds < best:
            best, result = seconds, run_result
    return best, result, compiles[0]


def step_fields(result, steps: int, plain_step_ms: float | None = None) -> dict:
    """Milliseconds per decode-loop iteration (the prefill apart): a plain step, or a
    speculative step (draft, verify, commit), and the latter against the former: the
    speedup is about tau / `step_vs_plain`."""
    step_ms = 1e3 * result.decode_s / max(1, steps)
    fields = dict(step_ms=step_ms)
    if plain_step_ms:
        fields["step_vs_plain"] = step_ms / plain_step_ms
    return fields


def compile_fields(ahead: CompileAhead, key, compiles: int) -> dict:
    """What a record says about its program's compile: the seconds its compile-ahead job took
    (None: compiled inline) and the compiles its first call still needed (0 when ahead)."""
    return dict(compile_ahead_s=ahead.seconds(key), first_call_compiles=compiles)


def record(common, **fields):
    return {**common, **fields}


# ------------------------------------------------------------------- trained targets


def method_label(method: str) -> tuple[str, str]:
    """(record method, record tree) of a --methods entry, e.g. 'draft:chain:4' ->
    ('draft', 'chain(4)'); a skipped run is recorded under the same key as a finished one."""
    if method.startswith("draft:"):
        return "draft", TREES[method.removeprefix("draft:")]
    if method == "lookup":
        return "lookup", "trie (3 x 6)"
    if method == "retrieval":
        return "retrieval", "trie (4 x 6)"
    raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")


def skipped(common, method: str, batch: int, temperature: float) -> dict:
    """The record of a run left out for time (keyed like its finished run)."""
    name, tree_name = method_label(method)
    return record(common, method=name, tree=tree_name, batch=batch, temperature=temperature,
                  error="skipped: time budget used up")


def _drafter_for(method, target, draft, corpus_texts):
    """(drafter, topology or None for the drafter's default)."""
    method_label(method)  # rejects unknown methods
    if method.startswith("draft:"):
        spec = method.removeprefix("draft:")
        topology = (jaxdec.tree.from_choices([[0], [1], [0, 0], [1, 0], [0, 1], [0, 0, 0],
                                              [0, 0, 0, 0]])
                    if spec == "choices" else jaxdec.tree.parse(spec))
        return drafters.DraftModel(draft), topology
    if method == "lookup":
        return drafters.PromptLookup(), None
    return drafters.Retrieval.from_texts(corpus_texts, target.tokenizer), None


def _planned_config(directory, shape, train_preset):
    """The config a model will load with: its directory's, or, for one this call trains, the
    one `jaxdec train` exports (the tokenizer's only special token, end-of-text, is id 0)."""
    if directory is not None:
        return jaxdec.ModelConfig.from_hf(directory)
    config = shape.config(train_preset.vocab_size, train_preset.max_positions, eos_token_id=0)
    return jaxdec.ModelConfig.from_hf(config.to_hf())


def _abstract(config):
    return jaxdec.abstract_model(config, dtype=jnp.dtype(config.dtype))


def _sampler(temperature: float):
    return jaxdec.Greedy() if temperature == 0 else jaxdec.Sampler(temperature=temperature)


def run_trained(preset: Preset, args, common, deadline, emit, measured):
    from jaxdec.demo import heldout_prompts
    from jaxdec.train import get_preset, train_draft, train_lm

    from bench import train as train_bench

    def pending(attention, batch, temperature):
        """A cell's methods, all of them while any is unmeasured: its speedups divide by the
        plain run measured beside them, in the same run."""
        if all((attention, *method_label(m), batch, temperature) in measured
               for m in preset.methods):
            return []
        return list(preset.methods)

    cells = [(t, b, a, pending(a, b, t)) for t in preset.temperatures for b in preset.batches
             for a in args.attention]
    if not any(methods for *_, methods in cells):
        print("every run of this preset is already measured (--resume)", flush=True)
        return
    train_preset = train_bench.shrunk(get_preset(preset.train_preset), args)
    work = Path(tempfile.mkdtemp(prefix="jaxdec-bench-spec-"))
    atexit.register(shutil.rmtree, work, True)  # the models trained here are not kept

    # Every program compiles in worker threads while the models train: only shapes are needed.
    ahead = CompileAhead(args.compile_ahead)
    atexit.register(ahead.close)
    planned = (_planned_config(args.target, train_preset.target, train_preset),
               _planned_config(args.draft, train_preset.draft, train_preset))
    gen = dict(max_new_tokens=preset.max_new_tokens, key=jax.random.PRNGKey(0),
               return_timings=True)
    for temperature, batch, attention, methods in cells if ahead.enabled else ():
        if not methods:
            continue
        target, draft = (_abstract(c).with_attention(attention) for c in planned)
        rows = [[1] * preset.prompt_tokens] * batch  # the shape of the held-out prompts
        at = dict(gen, sampler=_sampler(temperature), compile_only=True)
        ahead.submit(("plain", attention, batch, temperature),
                     functools.partial(jaxdec.generate, target, rows, **at))
        for method in methods:
            if method == "retrieval":  # its datastore's size is known once it is built: below
                continue
            drafter, topology = _drafter_for(method, target, draft, None)
            ahead.submit((method, attention, batch, temperature), functools.partial(
                jaxdec.speculative_generate, target, drafter, rows, tree=topology, **at))

    target_dir, draft_dir = args.target, args.draft
    if target_dir is None and draft_dir is None:
        # Both trained here: the training figures (bench/train.py's record) come for free,
        # the target's as soon as it is trained.
        def write_train_record(record):
            record["compile_ahead_workers"] = args.compile_ahead  # they ran beside it
            path = args.out / f"train-{device_slug(record['device'])}.json"
            train_bench.write_outputs(path, record)

        train_record = train_bench.run(train_preset, work, on_target=write_train_record)
        write_train_record(train_record)
        target_dir, draft_dir = str(work / "target"), str(work / "draft")
        print(json.dumps(train_record), flush=True)
    if target_dir is None:
        target_dir = str(work / "target")
        train_lm(train_preset, target_dir)
    if draft_dir is None:
        draft_dir = str(work / "draft")
        train_draft(target_dir, train_preset, draft_dir)
    models = {attention: (jaxdec.load_pretrained(target_dir).with_attention(attention),
                          jaxdec.load_pretrained(draft_dir).with_attention(attention))
              for attention in args.attention}
    loaded = models[args.attention[0]]
    for name, config, model in zip(("target", "draft"), planned, loaded):
        if ahead.enabled and config != model.config:
            print(f"compile-ahead planned the {name} as {config}, it loaded as {model.config}: "
                  "its programs compile inline", flush=True)
    tokenizer = loaded[0].tokenizer
    prompts = heldout_prompts(tokenizer, count=max(preset.batches), length=preset.prompt_tokens)
    prompts = (prompts * max(preset.batches))[: max(preset.batches)]
    corpus = data.load_corpus(max_train_bytes=train_preset.max_train_bytes).train_texts
    built = {}  # drafters are built once (retrieval encodes and indexes the whole corpus)

    def drafter_for(method, attention, target, draft):
        key = method if method == "retrieval" else (method, attention)
        if key not in built:
            built[key] = _drafter_for(method, target, draft, corpus)
        return built[key]

    def out_of_time():
        return deadline is not None and time.monotonic() > deadline

    # The retrieval programs' shapes (the datastore's size) are known only now: they join
    # the pool side by side rather than compiling one by one inside the timed loop.
    for temperature, batch, attention, methods in cells if ahead.enabled else ():
        if "retrieval" in methods:
            target, draft = models[attention]
            drafter, topology = drafter_for("retrieval", attention, target, draft)
            ahead.submit(("retrieval", attention, batch, temperature), functools.partial(
                jaxdec.speculative_generate, target, drafter, prompts[:batch], tree=topology,
                **gen, sampler=_sampler(temperature), compile_only=True))
    ahead.wait(deadline)  # nothing compiles beside a timed run
    for temperature, batch, attention, methods in cells:
        target, draft = models[attention]
        rows = prompts[:batch]
        run_gen = dict(gen, sampler=_sampler(temperature))
        at = dict(common, attention=attention)
        # Both attention paths for one (temperature, batch) before the next (the cells' order),
        # so a run cut short by its budget still has side-by-side figures.
        if out_of_time():
            for method in methods:
                emit(skipped(at, method, batch, temperature))
            continue
        if not methods:
            continue
        plain_s, plain, compiles = best_time(lambda: jaxdec.generate(target, rows, **run_gen),
                                             args.repeats)
        plain_step = step_fields(plain, preset.max_new_tokens - 1)
        emit(record(at, method="plain", tree=None, batch=batch, temperature=temperature,
                    tau=1.0, tokens_per_s=int(plain.lengths.sum()) / plain_s,
                    speedup_vs_ar=1.0, seconds=plain_s, **plain_step,
                    **compile_fields(ahead, ("plain", attention, batch, temperature), compiles)))
        for method in methods:
            if out_of_time():
                emit(skipped(at, method, batch, temperature))
                continue
            name, tree_name = method_label(method)
            drafter, topology = drafter_for(method, attention, target, draft)
            spec_s, spec, compiles = best_time(lambda: jaxdec.speculative_generate(
                target, drafter, rows, tree=topology, **run_gen), args.repeats)
            same = (token_agreement(spec.tokens, plain.tokens) if temperature == 0
                    else dict(same_tokens_as_ar=None))
            emit(record(at, method=name, tree=tree_name, batch=batch,
                        temperature=temperature, tau=spec.stats.tau,
                        acceptance_by_depth=spec.stats.acceptance_by_depth.tolist(),
                        tokens_per_s=int(spec.lengths.sum()) / spec_s,
                        speedup_vs_ar=plain_s / spec_s, seconds=spec_s, **same,
                        **step_fields(spec, spec.stats.steps, plain_step["step_ms"]),
                        **compile_fields(ahead, (method, attention, batch, temperature),
                                         compiles)))


# --------------------------------------------------------------- the synthetic regime


def _synthetic_config(name: str):
    if name == "synthetic-8b":
        return jaxdec.ModelConfig(
            model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
            num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
            rope=jaxdec.RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0,
                                   low_freq_factor=1.0, high_freq_factor=4.0,
                                   original_max_position_embeddings=8192),
            max_position_embeddings=131072, dtype="bfloat16")
    return jaxdec.ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                              max_position_embeddings=1024)


def run_synthetic(preset: Preset, args, common, deadline, emit, measured):
    config = _synthetic_config(args.preset)
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (max(preset.batches), preset.prompt_tokens))
    longest_chain = max(preset.chains)
    gen = dict(max_new_tokens=preset.max_new_tokens, return_timings=True)
    # (batch, attention, runs to measure) in timing order: both paths per batch size. A
    # group is measured whole while any of its runs is missing: its speedups divide by the
    # plain run measured beside them, in the same run.
    every = [(chain, rate) for chain in preset.chains for rate in preset.rates]
    groups = [(batch, attention,
               [] if all((attention, f"oracle@{rate}", f"chain({chain})", batch, 0.0)
                         in measured for chain, rate in every) else every)
              for batch in preset.batches for attention in args.attention]
    if not any(cells for *_, cells in groups):
        print("every run of this preset is already measured (--resume)", flush=True)
        return

    # The programs compile side by side (the rate is an argument: one program per chain).
    ahead = CompileAhead(args.compile_ahead)
    atexit.register(ahead.close)
    for batch, attention, cells in groups if ahead.enabled else ():
        if not cells:
            continue
        target = jaxdec.abstract_model(config, dtype=dtype).with_attention(attention)
        rows = prompts[:batch].tolist()
        ahead.submit(("plain", attention, batch), functools.partial(
            jaxdec.generate, target, rows, compile_only=True, **gen))
        ahead.submit(("reference", attention, batch), functools.partial(
            jaxdec.generate, target, rows, compile_only=True,
            max_new_tokens=preset.max_new_tokens + longest_chain))
        blank = np.zeros((batch, preset.max_new_tokens + longest_chain), np.int32)
        for chain in sorted({chain for chain, _ in cells}):
            drafter = CorruptedOracle(blank, 0.5, vocab_size=config.vocab_size)
            ahead.submit((f"chain({chain})", attention, batch), functools.partial(
                jaxdec.speculative_generate, target, drafter, rows,
                tree=jaxdec.tree.chain(chain), compile_only=True, **gen))
    base, permutation = permutation_target(
        jaxdec.init_model(config, jax.random.PRNGKey(0), dtype=dtype), jax.random.PRNGKey(1))

    def out_of_time():
        return deadline is not None and time.monotonic() > deadline

    ahead.wait(deadline)  # nothing compiles beside a timed run
    for batch, attention, cells in groups:
        rows = prompts[:batch].tolist()
        at = dict(common, attention=attention)

        def skip(chain, rate):
            emit(record(at, method=f"oracle@{rate}", tree=f"chain({chain})", batch=batch,
                        temperature=0.0, error="skipped: time budget used up"))

        if out_of_time():
            for chain, rate in cells:
                skip(chain, rate)
            continue
        if not cells:
            continue
        target = base.with_attention(attention)
        plain_s, plain, compiles = best_time(lambda: jaxdec.generate(target, rows, **gen),
                                             args.repeats)
        plain_step = step_fields(plain, preset.max_new_tokens - 1)
        emit(record(at, method="plain", tree=None, batch=batch, temperature=0.0, tau=1.0,
                    tokens_per_s=int(plain.lengths.sum()) / plain_s, speedup_vs_ar=1.0,
                    seconds=plain_s, **plain_step,
                    **compile_fields(ahead, ("plain", attention, batch), compiles)))
        # The continuation the oracle drafts from, on this attention path (bf16 paths may
        # round differently).
        reference = jaxdec.generate(target, rows,
                                    max_new_tokens=preset.max_new_tokens + longest_chain)
        follows = follows_permutation(rows, reference.tokens, permutation)
        if not follows:
            print(f"[speculative] warning: the synthetic target's greedy tokens ({attention}, "
                  f"batch {batch}) left its permutation: the oracle's rates do not hold",
                  flush=True)
        for chain, rate in cells:
            if out_of_time():
                skip(chain, rate)
                continue
            drafter = CorruptedOracle(reference.tokens, rate, vocab_size=config.vocab_size)
            spec_s, spec, compiles = best_time(lambda: jaxdec.speculative_generate(
                target, drafter, rows, tree=jaxdec.tree.chain(chain), **gen), args.repeats)
            emit(record(at, method=f"oracle@{rate}", tree=f"chain({chain})",
                        batch=batch, temperature=0.0, tau=spec.stats.tau,
                        acceptance_by_depth=spec.stats.acceptance_by_depth.tolist(),
                        tokens_per_s=int(spec.lengths.sum()) / spec_s,
                        speedup_vs_ar=plain_s / spec_s, seconds=spec_s,
                        **step_fields(spec, spec.stats.steps, plain_step["step_ms"]),
                        **token_agreement(spec.tokens, plain.tokens),
                        oracle_target=ORACLE_TARGET, target_follows_permutation=follows,
                        **compile_fields(ahead, (f"chain({chain})", attention, batch),
                                         compiles)))


# How the synthetic target is built (records without it drafted a continuation the target's
# bf16 verification did not reproduce: see permutation_target).
ORACLE_TARGET = "permutation"


def permutation_target(model, key) -> tuple["jaxdec.Model", np.ndarray]:
    """`model` with weights whose greedy continuation is known and robust: (the model, the
    permutation `perm` whose greedy next token after token t is the v with perm[v] == t).

    Random weights predict almost uniformly: over a 128k vocabulary the two best logits are
    typically a fifth of a standard deviation apart and often far less, so a verification
    forward and a one-token step (matrix products of different shapes, bf16) break some
    near-tie differently within a few tokens, and from there an oracle drafting plain
    decoding's continuation drafts tokens the speculative run no longer wants (acceptance ~0,
    whatever its rate: the H200 run of commit bff28a8). Here the embedding rows get unit
    scale, the layers' output projections (o, down) are scaled by 1e-2 so the residual stream
    stays near the current token's embedding, and lm_head column v is the embedding row of
    perm[v] (times 0.02): the right logit leads the rest by about sqrt(hidden size) standard
    deviations. Shapes, dtypes and shardings are unchanged, so every step costs what it costs
    with any weights of this config."""
    if model.config.tie_word_embeddings:
        raise ValueError("permutation_target needs a separate lm_head (tie_word_embeddings "
                         "is set)")
    vocab = model.config.vocab_size
    perm = jax.random.permutation(key, vocab)

    def build(params, perm):
        embed = params["embed"].astype(jnp.float32)
        embed = embed / jnp.sqrt(jnp.mean(jnp.square(embed[:vocab])))  # unit scale
        head = 0.02 * embed[perm].T  # [E, V]: column v scores the embedding of perm[v]
        head = jnp.pad(head, ((0, 0), (0, params["lm_head"].shape[1] - vocab)))
        layers = [dict(layer, o=layer["o"] * 1e-2, down=layer["down"] * 1e-2)
                  for layer in params["layers"]]
        dtype = params["embed"].dtype
        return dict(params, embed=embed.astype(dtype), lm_head=head.astype(dtype),
                    layers=layers)

    shardings = jax.tree.map(lambda x: x.sharding, model.params)
    params = jax.jit(build, out_shardings=shardings, donate_argnums=0)(model.params, perm)
    return dataclasses.replace(model, params=params), np.asarray(perm)


STALE_ORACLE_NOTE = (
    "The oracle rows of this run drafted plain decoding's continuation of random weights, "
    "which the bf16 verification forward rounded away from within a few tokens (random "
    "weights predict almost uniformly): tau ~1 and the speedups say nothing about speculative "
    "decoding; the step costs (ms/step, step cost) stand. `permutation_target` fixes the "
    "target; the next device run replaces these rows.")


def stale_oracle(record: dict) -> bool:
    """A synthetic oracle record measured before the permutation target (rerun it)."""
    return (record.get("method", "").startswith("oracle@")
            and record.get("oracle_target") != ORACLE_TARGET)


def follows_permutation(prompts, tokens, perm) -> bool:
    """Whether every row's greedy tokens step through `perm` (each the v with perm[v] equal
    to the token before it) from the prompt's last token."""
    tokens = np.asarray(tokens)
    last = np.array([row[-1] for row in prompts])[:, None]
    previous = np.concatenate([last, tokens[:, :-1]], axis=1)
    return bool((perm[tokens] == previous).all())


class CorruptedOracle(Drafter):
    """Drafts the target's own greedy continuation (known in advance), each drafted token
    replaced by a random one with probability 1 - rate: a drafter of set quality and no cost
    (for greedy decoding)."""

    def __init__(self, continuation, rate, *, vocab_size: int):
        self.continuation = jnp.asarray(continuation, jnp.int32)
        self.rate = jnp.asarray(rate, jnp.float32)  # a leaf: new rates do not recompile
        self.vocab_size = vocab_size

    def default_topology(self):
        return jaxdec.tree.chain(4)

    def init(self, tokens_BT, prompt_lengths_B, *, max_len):
        return jnp.zeros(tokens_BT.shape[:1], jnp.int32)  # tokens produced so far

    def propose(self, produced_B, root_B, lengths_B, key, *, topology, sampler):
        B, N = root_B.shape[0], topology.num_nodes
        template = topology.template(B)
        index = jnp.clip(produced_B[:, None] + template.depth - 1, 0,
                         self.continuation.shape[1] - 1)
        truth = jnp.take_along_axis(self.continuation, index, axis=1)
        noise = jax.random.randint(key, (B, N), 0, self.vocab_size)
        keep = jax.random.uniform(jax.random.fold_in(key, 1), (B, N)) < self.rate
        tokens = jnp.where(keep, truth, noise).at[:, 0].set(root_B)
        return Proposal(tree=template.with_tokens(tokens), q=None,
                        kind=ProposalKind.DETERMINISTIC), produced_B

    def update(self, produced_B, proposal, verdict, n_commit_B, emitted_BL):
        return produced_B + n_commit_B


def _unflatten_oracle(vocab_size, children):
    oracle = object.__new__(CorruptedOracle)  # leaves may be tracers or placeholders
    oracle.continuation, oracle.rate = children
    oracle.vocab_size = vocab_size
    return oracle


jax.tree_util.register_pytree_node(
    CorruptedOracle, lambda d: ((d.continuation, d.rate), d.vocab_size), _unflatten_oracle)


# ------------------------------------------------------------------------- output


def token_agreement(spec_tokens, plain_tokens) -> dict:
    """How a greedy speculative run's tokens compare with plain decoding's: equal, or how
    many rows differ and the first token index where any does (a late, isolated difference
    is the mark of two forwards of different shapes rounding a near-tie apart)."""
    spec_tokens, plain_tokens = np.asarray(spec_tokens), np.asarray(plain_tokens)
    differ = spec_tokens != plain_tokens
    if not differ.any():
        return dict(same_tokens_as_ar=True)
    return dict(same_tokens_as_ar=False, rows_differing=int(differ.any(axis=1).sum()),
                first_difference=int(np.argmax(differ.any(axis=0))))


def render_markdown(records: list[dict]) -> str:
    devices = sorted({r["device"] for r in records if r.get("device")})
    lines = [f"# Speculative decoding vs plain decoding on {', '.join(devices)}", "",
             "speedup = plain seconds / speculative seconds for the same tokens (prefill + "
             "decode, compile excluded, same process); tau = tokens per target forward. "
             "ms/step: milliseconds per decode-loop iteration (plain: one token; "
             "speculative: draft, verify, commit); step cost: a speculative step against a "
             "plain one (speedup ~ tau / step cost). "
             "same tokens (greedy): the speculative run's tokens against plain decoding's. "
             "Exact equality is tested on CPUs in fp32 (tests/test_speculative.py); on an "
             "accelerator a verification forward and a one-token step are matrix products of "
             "different shapes (TF32 or bf16 arithmetic), so a near-tie can round apart: a "
             "difference says how many rows and from which token.", ""]
    groups = sorted({(r["preset"], r.get("attention", "auto")) for r in records})
    for preset, attention in groups:
        rows = [r for r in records
                if r["preset"] == preset and r.get("attention", "auto") == attention]
        first = newest(rows)
        lines += [f"## {preset}, attention {attention} ({first.get('date')}, "
                  f"jax {first.get('jax_version')}, {first.get('max_new_tokens')} new tokens)",
                  ""]
        merged = runs_note(rows, lambda r: f"{r.get('date')} (jax {r.get('jax_version')}, "
                                           f"commit {r.get('commit')}, "
                                           f"{r.get('max_new_tokens')} new tokens)")
        if merged:
            lines += [merged.strip() + " Speedups compare runs of one cell (batch, "
                      "temperature) measured in the same run.", ""]
        notes = dict.fromkeys(r["attention_note"] for r in rows if r.get("attention_note"))
        if any(stale_oracle(r) for r in rows):
            notes[STALE_ORACLE_NOTE] = None
        if any(r.get("target_follows_permutation") is False for r in rows):
            notes["Warning: the synthetic target's greedy tokens left its permutation in this "
                  "run (see `permutation_target`), so the oracle's rates did not hold."] = None
        lines += [*notes, ""] if notes else []
        lines += ["| method | tree | batch | temperature | tau | tokens/s | speedup "
                  "| ms/step | step cost | same tokens |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if r.get("error"):
                lines.append(f"| {r['method']} | {r.get('tree') or '–'} | {r['batch']} | "
                             f"{r['temperature']} | "
                             f"{r['error']} | | | | | |")
                continue
            same = {True: "yes", False: "NO", None: "–"}[r.get("same_tokens_as_ar")]
            if r.get("first_difference") is not None:
                same += f" ({r['rows_differing']} rows, from token {r['first_difference']})"
            lines.append(f"| {r['method']} | {r['tree'] or '–'} | {r['batch']} | "
                         f"{r['temperature']} | {r['tau']:.2f} | {r['tokens_per_s']:.1f} | "
                         f"{r['speedup_vs_ar']:.2f}x | {_num(r.get('step_ms'), '.3f')} | "
                         f"{_num(r.get('step_vs_plain'), '.2f', 'x')} | {same} |")
        best = max((r for r in rows if r.get("speedup_vs_ar") and r["batch"] == 1
                    and r["temperature"] == 0 and r["method"] != "plain"),
                   key=lambda r: r["speedup_vs_ar"], default=None)
        if best is not None:
            met = "met" if best["speedup_vs_ar"] >= 2 else "not met"
            lines += ["", f"Goal (>= 2x over plain decoding at batch 1, greedy, best method): "
                          f"{best['speedup_vs_ar']:.2f}x with {best['method']} "
                          f"{best['tree'] or ''}: {met}."]
        lines.append("")
    return "\n".join(lines)


def _num(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def _csv(kind):
    return lambda text: tuple(kind(v) for v in text.split(",") if v.strip())


ATTENTION_CHOICES = ("auto", "pallas", "reference")


def _attention_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not names or any(n not in ATTENTION_CHOICES for n in names):
        raise argparse.ArgumentTypeError(
            f"expected one or more of {', '.join(ATTENTION_CHOICES)} (comma-separated); "
            f"got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--target", help="a trained target directory (skip training)")
    parser.add_argument("--draft", help="a trained draft directory (skip distillation)")
    parser.add_argument("--methods", type=_csv(str), help=f"among {', '.join(METHODS)}")
    parser.add_argument("--batches", type=_csv(int))
    parser.add_argument("--temperatures", type=_csv(float))
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--attention", type=_attention_list, default=("auto",),
                        help="attention of target and draft, comma-separated choices of "
                             "auto,pallas,reference: auto = the Pallas tree-attention kernel on "
                             "GPU/TPU over caches large enough for it to pay, pallas = the "
                             "kernel wherever it takes the shapes, reference = the jnp path "
                             "(several: side by side, the models trained once)")
    parser.add_argument("--compile-ahead", type=int, metavar="THREADS",
                        help="threads that compile the programs before they are timed, "
                             "beside training (0: each compiles at its first call; default: "
                             "half the CPU cores up to 8 on an accelerator, 0 on a CPU, whose "
                             "cores the runs themselves use)")
    parser.add_argument("--budget-s", type=float,
                        help="stop starting runs after this many seconds, training included "
                             "(default: the preset's)")
    parser.add_argument("--resume", action="store_true",
                        help="skip the runs already measured without error in the output file "
                             "with the same code and --max-new-tokens (a call cut short by its "
                             "budget is finished by the next; a batch size and temperature "
                             "with any run missing is measured again whole, plain decoding "
                             "beside it)")
    from bench.train import add_shrink_arguments

    add_shrink_arguments(parser)  # for the trained presets' training
    parser.add_argument("--out", type=out_dir, default=RESULTS)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    overrides = {"methods": args.methods, "batches": args.batches,
                 "temperatures": args.temperatures, "max_new_tokens": args.max_new_tokens}
    preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    for flag, values, lowest in (("--batches", preset.batches, 1),
                                 ("--max-new-tokens", (preset.max_new_tokens,), 2),
                                 ("--repeats", (args.repeats,), 1),
                                 ("--temperatures", preset.temperatures, 0)):
        if not values or min(values) < lowest:
            parser.error(f"{flag} must be {'one or more values ' if len(values) != 1 else ''}"
                         f">= {lowest}, got {','.join(map(str, values)) or 'none'}")
    if not preset.methods:
        parser.error("--methods names no method")
    if preset.kind == "synthetic":  # random weights, an oracle drafter, greedy: no training
        from bench.train import SHRINK_FLAGS

        ignored = [name for name in ("methods", "temperatures", "target", "draft", *SHRINK_FLAGS)
                   if getattr(args, name) is not None]
        if ignored:
            parser.error(f"{', '.join('--' + n.replace('_', '-') for n in ignored)} do not apply "
                         f"to the synthetic preset {args.preset} (random weights, oracle "
                         f"drafters, greedy decoding)")
    for flag, directory in (("--target", args.target), ("--draft", args.draft)):
        if directory is not None and not (Path(directory).expanduser() / "config.json").is_file():
            parser.error(f"{flag} {directory}: no config.json there (a trained model directory)")
    if args.budget_s is not None and not args.budget_s >= 0:  # 0: every run recorded skipped
        parser.error(f"--budget-s must be >= 0, got {args.budget_s}")
    if args.compile_ahead is None:
        args.compile_ahead = default_compile_workers()
    elif args.compile_ahead < 0:
        parser.error(f"--compile-ahead must be >= 0, got {args.compile_ahead}")
    unknown = [m for m in preset.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; methods: {', '.join(METHODS)}")

    common = dict(preset=args.preset, device=jax.devices()[0].device_kind, date=utc_now(),
                  commit=git_commit(), max_new_tokens=preset.max_new_tokens,
                  spec_sources=sources_digest(SPECULATIVE_SOURCES), **versions())
    budget_s = args.budget_s if args.budget_s is not None else preset.budget_s
    deadline = None if budget_s is None else time.monotonic() + budget_s
    records = []
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"speculative-{device_slug(common['device'])}.json"

    def emit(rec):  # rewrite the outputs after every record: a cut-off run keeps its results
        records.append(rec)
        write_merged(path, records, RECORD_KEY, render_markdown)
        print(json.dumps(rec), flush=True)

    measured = set()
    if args.resume and path.exists():
        measured = {(r.get("attention", "auto"), r["method"], r.get("tree"), r["batch"],
                     r["temperature"]) for r in json.loads(path.read_text())
                    if r.get("preset") == args.preset and not r.get("error")
                    and r.get("max_new_tokens") == preset.max_new_tokens
                    and not stale_oracle(r) and r.get("spec_sources") == common["spec_sources"]}
    run = run_trained if preset.kind == "trained" else run_synthetic
    run(preset, args, common, deadline, emit, measured)
    if not records and path.exists():  # all measured before: the table from the JSON alone
        write_merged(path, [], RECORD_KEY, render_markdown)
    if path.with_suffix(".md").exists():
        print(path.with_suffix(".md").read_text())
    return 0 if all(not r.get("error") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
