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
  synthetic-8b          a Llama-3-8B-shaped random bf16 target with a drafter that proposes
                        the target's own greedy continuation, each token corrupted with
                        probability 1 - rate (rates 0.6 / 0.8 / 0.9): the regime real
                        deployments live in (a cheap, good draft against a big target).
  cpu-tiny, synthetic-tiny   the same on CPU-sized models (tests run them).
`--target DIR --draft DIR` reuse trained models instead of training. `--attention reference`
runs target and draft on the jnp attention path instead of the Pallas tree-attention kernel
(the default on GPU/TPU); records of both accumulate side by side.

Every speculative run is compared with `jaxdec.generate` on the same prompts, batch and
sampler in the same process: speedup_vs_ar = plain seconds / speculative seconds for the same
number of tokens (prefill + decode, compile excluded, best of `--repeats`). Greedy runs also
check that the tokens are identical. Writes `speculative-<device>.json` (records of other
runs already there are kept unless this run repeats them, so `--methods` subsets run in
separate calls accumulate) and `speculative-<device>.md` to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from bench.common import RESULTS, device_slug, git_commit, merge_records, utc_now, versions  # noqa: E402

TREES = {
    "chain:4": "chain(4)", "chain:6": "chain(6)", "chain:8": "chain(8)",
    "kary:3:2": "kary(3, 2)", "choices": "from_choices (8 nodes)",
}
RECORD_KEY = ("preset", "attention", "method", "tree", "batch", "temperature")
METHODS = ("draft:chain:4", "draft:chain:6", "draft:chain:8", "draft:kary:3:2",
           "draft:choices", "lookup", "retrieval")


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
                                "draft:choices", "lookup", "retrieval")),
    "synthetic-8b": Preset(kind="synthetic", temperatures=(0.0,), prompt_tokens=128),
    "cpu-tiny": Preset(kind="trained", train_preset="cpu-tiny", batches=(1, 2),
                       max_new_tokens=24, prompt_tokens=32, budget_s=None),
    "synthetic-tiny": Preset(kind="synthetic", temperatures=(0.0,), batches=(1, 2),
                             max_new_tokens=24, prompt_tokens=16, chains=(4,), budget_s=None),
}


# --------------------------------------------------------------------- timing helpers


def best_time(run, repeats: int):
    """(best seconds of prefill + decode, last result) after one untimed compile run."""
    run()
    best, result = float("inf"), None
    for _ in range(repeats):
        result = run()
        best = min(best, result.prefill_s + result.decode_s)
    return best, result


def record(common, **fields):
    return {**common, **fields}


# ------------------------------------------------------------------- trained targets


def _drafter_for(method, target, draft, corpus_texts):
    if method.startswith("draft:"):
        spec = method.removeprefix("draft:")
        topology = (jaxdec.tree.from_choices([[0], [1], [0, 0], [1, 0], [0, 1], [0, 0, 0],
                                              [0, 0, 0, 0]])
                    if spec == "choices" else jaxdec.tree.parse(spec))
        return drafters.DraftModel(draft), topology, TREES[spec]
    if method == "lookup":
        d = drafters.PromptLookup()
        return d, None, "trie (3 x 6)"
    if method == "retrieval":
        d = drafters.Retrieval.from_texts(corpus_texts, target.tokenizer)
        return d, None, "trie (4 x 6)"
    raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")


def run_trained(preset: Preset, args, common, deadline, emit):
    from jaxdec.demo import heldout_prompts
    from jaxdec.train import get_preset, train_draft, train_lm

    train_preset = get_preset(preset.train_preset)
    work = Path(tempfile.mkdtemp(prefix="jaxdec-bench-spec-"))
    target_dir, draft_dir = args.target, args.draft
    if target_dir is None:
        target_dir = str(work / "target")
        train_lm(train_preset, target_dir)
    if draft_dir is None:
        draft_dir = str(work / "draft")
        train_draft(target_dir, train_preset, draft_dir)
    target = jaxdec.load_pretrained(target_dir).with_attention(args.attention)
    draft = jaxdec.load_pretrained(draft_dir).with_attention(args.attention)
    prompts = heldout_prompts(target.tokenizer, count=max(preset.batches),
                              length=preset.prompt_tokens)
    prompts = (prompts * max(preset.batches))[: max(preset.batches)]
    corpus = data.load_corpus(max_train_bytes=train_preset.max_train_bytes).train_texts
    for temperature in preset.temperatures:
        sampler = jaxdec.Greedy() if temperature == 0 else jaxdec.Sampler(temperature=temperature)
        for batch in preset.batches:
            rows = prompts[:batch]
            gen = dict(max_new_tokens=preset.max_new_tokens, sampler=sampler,
                       key=jax.random.PRNGKey(0), return_timings=True)
            plain_s, plain = best_time(lambda: jaxdec.generate(target, rows, **gen), args.repeats)
            tokens = int(plain.lengths.sum())
            emit(record(common, method="plain", tree=None, batch=batch, temperature=temperature,
                        tau=1.0, tokens_per_s=tokens / plain_s, speedup_vs_ar=1.0,
                        seconds=plain_s))
            for method in preset.methods:
                if deadline is not None and time.monotonic() > deadline:
                    emit(record(common, method=method, batch=batch, temperature=temperature,
                                error="skipped: time budget used up"))
                    continue
                drafter, topology, tree_name = _drafter_for(method, target, draft, corpus)
                spec_s, spec = best_time(lambda: jaxdec.speculative_generate(
                    target, drafter, rows, tree=topology, **gen), args.repeats)
                same = bool(np.array_equal(spec.tokens, plain.tokens)) if temperature == 0 else None
                emit(record(common, method=method.split(":")[0], tree=tree_name, batch=batch,
                            temperature=temperature, tau=spec.stats.tau,
                            acceptance_by_depth=spec.stats.acceptance_by_depth.tolist(),
                            tokens_per_s=int(spec.lengths.sum()) / spec_s,
                            speedup_vs_ar=plain_s / spec_s, seconds=spec_s,
                            same_tokens_as_ar=same))


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


def run_synthetic(preset: Preset, args, common, deadline, emit):
    config = _synthetic_config(args.preset)
    dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    target = jaxdec.init_model(config, jax.random.PRNGKey(0), dtype=dtype)
    target = target.with_attention(args.attention)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (max(preset.batches), preset.prompt_tokens))
    longest_chain = max(preset.chains)
    for batch in preset.batches:
        rows = prompts[:batch].tolist()
        gen = dict(max_new_tokens=preset.max_new_tokens, return_timings=True)
        plain_s, plain = best_time(lambda: jaxdec.generate(target, rows, **gen), args.repeats)
        emit(record(common, method="plain", tree=None, batch=batch, temperature=0.0, tau=1.0,
                    tokens_per_s=int(plain.lengths.sum()) / plain_s, speedup_vs_ar=1.0,
                    seconds=plain_s))
        reference = jaxdec.generate(target, rows,
                                    max_new_tokens=preset.max_new_tokens + longest_chain)
        for chain in preset.chains:
            for rate in preset.rates:
                if deadline is not None and time.monotonic() > deadline:
                    emit(record(common, method=f"oracle@{rate}", batch=batch, temperature=0.0,
                                error="skipped: time budget used up"))
                    continue
                drafter = CorruptedOracle(reference.tokens, rate, vocab_size=config.vocab_size)
                spec_s, spec = best_time(lambda: jaxdec.speculative_generate(
                    target, drafter, rows, tree=jaxdec.tree.chain(chain), **gen), args.repeats)
                emit(record(common, method=f"oracle@{rate}", tree=f"chain({chain})",
                            batch=batch, temperature=0.0, tau=spec.stats.tau,
                            acceptance_by_depth=spec.stats.acceptance_by_depth.tolist(),
                            tokens_per_s=int(spec.lengths.sum()) / spec_s,
                            speedup_vs_ar=plain_s / spec_s, seconds=spec_s,
                            same_tokens_as_ar=bool(np.array_equal(spec.tokens, plain.tokens))))


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


def render_markdown(records: list[dict]) -> str:
    devices = sorted({r["device"] for r in records if r.get("device")})
    lines = [f"# Speculative decoding vs plain decoding on {', '.join(devices)}", "",
             "speedup = plain seconds / speculative seconds for the same tokens (prefill + "
             "decode, compile excluded, same process); tau = tokens per target forward.", ""]
    groups = sorted({(r["preset"], r.get("attention", "auto")) for r in records})
    for preset, attention in groups:
        rows = [r for r in records
                if r["preset"] == preset and r.get("attention", "auto") == attention]
        first = rows[0]
        lines += [f"## {preset}, attention {attention} ({first.get('date')}, "
                  f"jax {first.get('jax_version')})", "",
                  "| method | tree | batch | temperature | tau | tokens/s | speedup | same tokens |",
                  "|---|---|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if r.get("error"):
                lines.append(f"| {r['method']} | – | {r['batch']} | {r['temperature']} | "
                             f"{r['error']} | | | |")
                continue
            same = {True: "yes", False: "NO", None: "–"}[r.get("same_tokens_as_ar")]
            lines.append(f"| {r['method']} | {r['tree'] or '–'} | {r['batch']} | "
                         f"{r['temperature']} | {r['tau']:.2f} | {r['tokens_per_s']:.1f} | "
                         f"{r['speedup_vs_ar']:.2f}x | {same} |")
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


def _csv(kind):
    return lambda text: tuple(kind(v) for v in text.split(",") if v.strip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--target", help="a trained target directory (skip training)")
    parser.add_argument("--draft", help="a trained draft directory (skip distillation)")
    parser.add_argument("--methods", type=_csv(str), help=f"among {', '.join(METHODS)}")
    parser.add_argument("--batches", type=_csv(int))
    parser.add_argument("--temperatures", type=_csv(float))
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--attention", choices=("auto", "reference"), default="auto",
                        help="attention of target and draft: auto = the Pallas tree-attention "
                             "kernel on GPU/TPU; reference = the jnp path")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    overrides = {"methods": args.methods, "batches": args.batches,
                 "temperatures": args.temperatures, "max_new_tokens": args.max_new_tokens}
    preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v})
    unknown = [m for m in preset.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; methods: {', '.join(METHODS)}")

    common = dict(preset=args.preset, attention=args.attention,
                  device=jax.devices()[0].device_kind, date=utc_now(),
                  commit=git_commit(), max_new_tokens=preset.max_new_tokens, **versions())
    deadline = None if preset.budget_s is None else time.monotonic() + preset.budget_s
    records = []
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"speculative-{device_slug(common['device'])}.json"

    def emit(rec):  # rewrite the outputs after every record: a cut-off run keeps its results
        records.append(rec)
        merged = merge_records(path, records, key=RECORD_KEY)
        path.write_text(json.dumps(merged, indent=2) + "\n")
        path.with_suffix(".md").write_text(render_markdown(merged))
        print(json.dumps(rec), flush=True)

    run = run_trained if preset.kind == "trained" else run_synthetic
    run(preset, args, common, deadline, emit)
    print(path.with_suffix(".md").read_text())
    return 0 if all(not r.get("error") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
