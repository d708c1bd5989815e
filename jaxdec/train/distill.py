"""`jaxdec train draft`: a small draft model distilled from a target's distributions.

The draft shares the target's tokenizer and vocabulary and learns to match the target's
next-token distribution p with its own q on the training corpus, under one of two objectives:

- "kl": forward KL(p || q) = sum_v p (log p - log q), the usual distillation loss;
- "tv": total variation 1/2 sum_v |p - q| = 1 - sum_v min(p, q), which is one minus the
  expected acceptance rate of speculative sampling, so it optimises acceptance directly.

The held-out expected acceptance rate, the mean over tokens of sum_v min(p, q), is reported
before (at initialisation, or from `init`) and after distillation.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
from typing import Callable

import jax
import jax.numpy as jnp

from jaxdec import data, parallel
from jaxdec.checkpoint import checkpoint_dir, load_pretrained, save_pretrained
from jaxdec.checks import check_path
from jaxdec.model import Model, init_model
from jaxdec.train import loop
from jaxdec.train.lm import (attention_used, build_dataset, causal_logits, check_same_data,
                             default_corpus, evaluate_lm, heldout_batches, throughput,
                             train_params)
from jaxdec.train.presets import Preset

OBJECTIVES = ("kl", "tv")


def divergence(target_logits, draft_logits, objective: str) -> jax.Array:
    """Per-token distillation loss [...] between target and draft logits (fp32)."""
    log_p = jax.nn.log_softmax(target_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(draft_logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(log_p)
    if objective == "kl":
        return jnp.sum(p * (log_p - log_q), axis=-1)
    if objective == "tv":
        return 0.5 * jnp.sum(jnp.abs(p - jnp.exp(log_q)), axis=-1)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def acceptance(target_logits, draft_logits) -> jax.Array:
    """Expected acceptance of speculative sampling at temperature 1: sum_v min(p, q) [...]."""
    p = jax.nn.softmax(target_logits.astype(jnp.float32), axis=-1)
    q = jax.nn.softmax(draft_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.minimum(p, q), axis=-1)


@functools.partial(jax.jit,
                   static_argnames=("target_config", "draft_config", "mesh", "dtype"))
def _acceptance_sum(target_params, draft_params, batch, weights, *, target_config,
                    draft_config, mesh, dtype):
    """(summed expected acceptance, tokens) of one held-out batch. Module-level, so the
    evaluations before and after distillation share one compiled program."""
    inputs = batch[:, :-1]
    p_logits = causal_logits(target_params, inputs, config=target_config, mesh=mesh, dtype=dtype)
    q_logits = causal_logits(draft_params, inputs, config=draft_config, mesh=mesh, dtype=dtype)
    rate = acceptance(p_logits, q_logits)
    return jnp.sum(rate * weights[:, None]), jnp.sum(weights) * rate.shape[1]


def evaluate_acceptance(target: Model, draft_params, sequences, *, draft_config, mesh,
                        batch_size: int, dtype) -> float:
    """Mean expected acceptance over every held-out token."""
    total = count = 0.0
    for batch, weights in heldout_batches(sequences, batch_size, mesh):
        rate_sum, n = _acceptance_sum(target.params, draft_params, batch, weights,
                                      target_config=target.config, draft_config=draft_config,
                                      mesh=mesh, dtype=jnp.dtype(dtype))
        total, count = total + float(rate_sum), count + float(n)
    return total / count


def make_distill_step(target: Model, draft_config, mesh, optimizer, objective: str, dtype):
    """A pure step `(state, batch, target_params) -> (state, loss)` (`loop.run_steps` compiles
    it; the target's params are an argument, not constants of the program)."""
    def loss_fn(draft_params, target_params, batch):
        inputs = batch[:, :-1]
        # Logits in the compute dtype (the divergence reads them in fp32), as `make_lm_step`.
        p_logits = causal_logits(target_params, inputs, config=target.config, mesh=mesh,
                                 dtype=dtype, logits_dtype=dtype)
        q_logits = causal_logits(draft_params, inputs, config=draft_config, mesh=mesh,
                                 dtype=dtype, logits_dtype=dtype)
        return divergence(jax.lax.stop_gradient(p_logits), q_logits, objective).mean()

    def step(state, batch, target_params):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], target_params, batch)
        return loop.optimizer_step(optimizer, state, grads), loss

    return step


# The files that make a target what it is (its weights, config and tokenizer).
TARGET_FILES = ("config.json", "tokenizer.json", "*.safetensors", "*.safetensors.index.json")


def _target_record(target_dir: str) -> str:
    """How a run records its target: a directory's absolute path, or a Hugging Face cache id
    ("org/name") as given (its path relative to the working directory named nothing, and a
    resume from another directory was refused)."""
    return os.path.abspath(target_dir) if os.path.isdir(target_dir) else target_dir


def target_digest(target_dir) -> str:
    """A hash of a target checkpoint's files (`TARGET_FILES`): a resumed draft run must
    distill the target it started with."""
    digest = hashlib.sha256()
    paths = sorted({path for pattern in TARGET_FILES
                    for path in glob.glob(os.path.join(checkpoint_dir(target_dir), pattern))})
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def train_draft(
    target_dir: str | os.PathLike,
    preset: str | Preset,
    out: str | os.PathLike,
    *,
    objective: str = "tv",
    corpus: str | os.PathLike | None = None,
    steps: int | None = None,
    resume: bool = False,
    force: bool = False,
    seed: int = 0,
    dp: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Distils the preset's draft shape from the target at `target_dir`.

    Args:
      target_dir: an HF checkpoint directory with tokenizer.json (e.g. `jaxdec train lm`'s).
      preset: the preset whose draft shape, steps and batch to use.
      out: the run directory (becomes the draft's HF checkpoint directory).
      objective: "tv" (total variation, maximises acceptance) or "kl" (forward KL).
      corpus, steps, resume, force, seed, dp, log: as in `train_lm` (several processes too).
    Returns:
      The metrics written to metrics.json, including acceptance_before / acceptance_after.
    """
    preset, out, steps, seed = loop.check_run(preset, out, steps=steps,
                                              steps_field="draft_steps", resume=resume,
                                              force=force, seed=seed, log=log)
    # (`~` expanded as in out: compared with out below, a `~/lm` target read as `./~/lm`
    # was not found inside an out of the same name, which --force then deleted)
    target_dir = check_path("target_dir", target_dir)
    if corpus is not None:  # (`~` as out: recorded, and compared on resume, expanded)
        corpus = check_path("corpus", corpus)
    loop.check_apart(out, corpus)
    log = loop.lead_log(log)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if loop.within(target_dir, out):
        raise ValueError(f"out={os.fspath(out)} holds the target {os.fspath(target_dir)}: the "
                         "draft needs a run directory of its own (starting it over would "
                         "delete the target)")
    mesh = loop.train_mesh(dp, preset.batch_size, resume_from=out if resume else None)
    dtype = loop.compute_dtype()
    phases = loop.Phases()
    directory = os.fspath(target_dir)
    if (os.path.isfile(os.path.join(directory, loop.RUN_FILE))
            and not os.path.isfile(os.path.join(directory, "config.json"))):
        raise ValueError(f"the target {directory} is a training run that has not finished (it "
                         "exports its model when it does): continue it with --resume first")
    with phases("load target"):
        target = load_pretrained(target_dir, dtype=jnp.float32, mesh=mesh)
    if target.tokenizer is None:
        raise ValueError(f"the target {target_dir} has no tokenizer.json for the draft to share")
    # (before the run directory is made: a refused run leaves nothing behind)
    words = target.tokenizer.get_vocab_size(with_added_tokens=True)
    if words > target.config.vocab_size:
        raise ValueError(f"the target {target_dir}'s tokenizer has {words} tokens, more than "
                         f"its config.json's vocab_size={target.config.vocab_size}: ids past "
                         "it have no embedding (is tokenizer.json another model's?)")
    eot = data.end_of_text_id(target.tokenizer)
    if preset.seq_len > target.config.max_positions:
        # (the target would be run, and the draft trained, at positions the target has not)
        raise ValueError(f"preset {preset.name}'s sequences of {preset.seq_len} tokens are "
                         f"longer than the target's {target.config.max_positions} positions: "
                         "choose a preset of shorter sequences")
    with phases("corpus"):
        corpus_data = default_corpus(corpus, preset)
    run = {"kind": "draft", "preset": preset.name, "steps": steps, "seed": seed,
           "objective": objective, "target": _target_record(target_dir),
           # A target retrained (or given another tokenizer) in place is another target.
           "target_digest": target_digest(target_dir),
           "corpus": None if corpus is None else os.path.abspath(os.fspath(corpus)),
           "corpus_digest": loop.corpus_digest(corpus_data),
           "settings": loop.run_settings(preset),
           # (the gradients' sum is ordered by it: a resume with another warns)
           "dp": parallel.dp_size(mesh)}
    resuming = loop.prepare_run(out, resume=resume, force=force, run=run)
    finished = loop.finished_run(out, resuming=resuming, resume=resume, log=log)
    if finished is not None:
        return finished
    with phases("encode"):
        dataset = build_dataset(target.tokenizer, corpus_data, preset)
    check_same_data(dataset)
    # (the target's special ids: the draft shares its tokenizer; a target of other ids than
    # its end of text, bos 1 and pad 0 say, gave a draft whose ids were all the end of text)
    draft_config = preset.draft.config(
        target.config.vocab_size, target.config.max_position_embeddings, eot).replace(
            bos_token_id=target.config.bos_token_id, eos_token_ids=target.config.eos_token_ids,
            pad_token_id=target.config.pad_token_id)

    with phases("init"):
        draft = init_model(draft_config, jax.random.PRNGKey(seed + 1), mesh=mesh)
    evaluate = dict(draft_config=draft_config, mesh=mesh, batch_size=preset.batch_size, dtype=dtype)
    with phases("eval"):
        before = evaluate_acceptance(target, draft.params, dataset.heldout, **evaluate)
    log(f"held-out expected acceptance (temperature 1) before distillation: {before:.3f}")
    with phases("train"):
        state, stats = train_params(
            draft.params,
            lambda optimizer: make_distill_step(target, draft_config, mesh, optimizer, objective,
                                                dtype),
            preset=preset, learning_rate=preset.draft_learning_rate, steps=steps,
            dataset=dataset, out=out, mesh=mesh, seed=seed, resuming=resuming,
            label=f"train draft {preset.name} ({objective})", log=log,
            step_args=(target.params,))

    with phases("eval"):
        after = evaluate_acceptance(target, state["params"], dataset.heldout, **evaluate)
        draft_loss = evaluate_lm(state["params"], dataset.heldout, config=draft_config,
                                 mesh=mesh, batch_size=preset.batch_size, dtype=dtype)
    loop.warn_if_diverged(draft_loss, f"train draft {preset.name}")
    with phases("attention probe, matmul peak"):
        attention, peak = (attention_used(draft_config, mesh, dtype),
                           loop.measure_matmul_peak(dtype))
    # Each step runs the target forward and the draft forward + backward.
    flops = (loop.training_flops_per_token(draft_config, preset.seq_len)
             + loop.training_flops_per_token(target.config, preset.seq_len) / 3)
    metrics = {
        "kind": "draft", "preset": preset.name, "objective": objective,
        "params": int(sum(x.size for x in jax.tree.leaves(state["params"]))), "steps": steps,
        "acceptance_before": before, "acceptance_after": after, "heldout_loss": draft_loss,
        "attention": attention,
        "device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
        **throughput(stats, preset.batch_size * preset.seq_len, flops, peak,
                     mesh.devices.size, log),
    }
    with phases("export"):
        save_pretrained(Model(config=draft_config, params=state["params"], mesh=mesh,
                              tokenizer=target.tokenizer,
                              tokenizer_config=target.tokenizer_config), out, overwrite=True)
    metrics["phase_seconds"] = phases.as_dict()
    loop.write_json(os.path.join(out, loop.METRICS_FILE), metrics)
    log(f"held-out expected acceptance (temperature 1) after distillation: {after:.3f} "
        f"(before {before:.3f}); "
        f"exported to {out}")
    return metrics
