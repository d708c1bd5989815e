"""`jaxdec train lm`: a Llama-family language model trained from scratch on a corpus.

The output directory is itself a Hugging Face checkpoint when training ends (config.json,
model.safetensors, tokenizer.json, generation_config.json, loadable by `jaxdec.load_pretrained`
and transformers), plus `checkpoints/` (orbax, for --resume), `train.json` (the run settings)
and `metrics.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdec import data, parallel
from jaxdec.checkpoint import load_tokenizer, save_pretrained
from jaxdec.checks import check_path
from jaxdec.model import Model, cache_free_attention, forward_with_cache, init_model
from jaxdec.models.layers import AttentionImpl, use_platform
from jaxdec.train import loop
from jaxdec.train.presets import Preset

MIN_SEQUENCES = 4  # of held-out and of training text a corpus must hold, at least


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Packed token sequences [N, seq_len + 1] for training and held-out evaluation."""

    train: np.ndarray
    heldout: np.ndarray
    train_files: int
    heldout_files: int


def build_dataset(tokenizer, corpus: data.Corpus, preset: Preset) -> Dataset:
    def packed(texts, split: str, files) -> np.ndarray:
        tokens = data.encode(tokenizer, texts)
        if len(tokens) <= preset.seq_len:  # (the size check before guessed 4 characters a
            raise ValueError(                # token; repetitive text encodes to fewer)
                f"the corpus's {split} text ({len(files)} file{'s' * (len(files) != 1)}) "
                f"encodes to {len(tokens)} "
                f"tokens, fewer than one sequence of {preset.seq_len + 1}: give a corpus of "
                "more text, and start the run over (--force)")
        return data.pack(tokens, preset.seq_len)

    heldout = packed(corpus.heldout_texts, "held-out", corpus.heldout_files)
    return Dataset(
        train=packed(corpus.train_texts, "training", corpus.train_files),
        heldout=heldout[: max(1, preset.eval_tokens // preset.seq_len)],
        train_files=len(corpus.train_files), heldout_files=len(corpus.heldout_files),
    )


def check_same_data(dataset: Dataset) -> None:
    """With several processes: each built the same sequences (each places its own devices'
    rows of every batch from its copy)."""
    if jax.process_count() == 1:  # (its bytes are a copy of the whole dataset)
        return
    loop.check_same_everywhere(dataset.train.tobytes() + dataset.heldout.tobytes(),
                               "the training data")


def default_corpus(corpus, preset: Preset) -> data.Corpus:
    """The given directory, or the standard library (plus site-packages on accelerators when
    the preset asks for more data; held-out files always come from the standard library)."""
    extra = ()
    if corpus is None and preset.site_packages and jax.default_backend() != "cpu":
        extra = tuple(data.site_packages_dirs())
    # Held-out and training text for a few sequences each (~4 characters a token), and
    # training text for a batch, so a small corpus fails here, before the run directory is
    # touched, not after.
    chars_per_sequence = 4 * (preset.seq_len + 1)
    loaded = data.load_corpus(corpus, extra_dirs=extra, max_train_bytes=preset.max_train_bytes,
                              min_chars=MIN_SEQUENCES * chars_per_sequence)
    train_chars = sum(len(t) for t in loaded.train_texts)
    if train_chars < preset.batch_size * chars_per_sequence:
        raise ValueError(
            f"the corpus {corpus} is too small for the {preset.name} preset: its training files "
            f"hold {train_chars} characters, about {train_chars // chars_per_sequence} "
            f"sequences of {preset.seq_len} tokens, fewer than one batch of "
            f"{preset.batch_size} (about {preset.batch_size * chars_per_sequence} characters)")
    return loaded


def causal_logits(params, tokens_BT, *, config, mesh, dtype, logits_dtype=jnp.float32
                  ) -> jax.Array:
    """Logits [B, T, V] of a full causal forward computing in `dtype`, rounded to
    `logits_dtype` (the training step takes them in its compute dtype: the output matmul
    then writes bf16, and the loss reads them in fp32; fp32 logits of a gpu-base batch are
    4.3 GB, each pass over them ~1.3 ms)."""
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    model = Model(config=config, params=params, mesh=mesh)
    positions = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
    logits, _, _ = forward_with_cache(model, tokens_BT, positions, None)
    return logits.astype(logits_dtype)


@jax.custom_vjp
def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """-log softmax(logits)[label] per token (fp32): logits [..., V] (any float dtype, read
    in fp32; the gradient in their dtype), int labels [...].

    The same values as `optax.softmax_cross_entropy_with_integer_labels`, with a gradient
    written out as one element-wise pass, (softmax(logits) - onehot(label)) * g, instead of
    what autodiff makes of it (the label's logit picked by `take_along_axis`, whose transpose
    scatters into a logits-sized array of zeros, then two more logits-sized passes): the
    logits of a training batch are the step's largest array (gpu-base: 4.3 GB in fp32)."""
    return _cross_entropy_fwd(logits, labels)[0]


def _cross_entropy_fwd(logits, labels):
    logits32 = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits32, axis=-1)
    picked = jnp.take_along_axis(logits32, labels[..., None], axis=-1)[..., 0]
    return lse - picked, (logits, labels, lse)


def _cross_entropy_bwd(residuals, g):
    logits, labels, lse = residuals
    onehot = labels[..., None] == jax.lax.broadcasted_iota(labels.dtype, logits.shape,
                                                           logits.ndim - 1)
    grad = ((jnp.exp(logits.astype(jnp.float32) - lse[..., None]) - onehot.astype(jnp.float32))
            * g[..., None])
    return grad.astype(logits.dtype), None


token_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def make_lm_step(config, mesh, optimizer: optax.GradientTransformation, dtype) -> Callable:
    """A pure training step `(state, batch) -> (state, loss)` (`loop.run_steps` compiles it)."""
    def loss_fn(params, batch):
        logits = causal_logits(params, batch[:, :-1], config=config, mesh=mesh, dtype=dtype,
                               logits_dtype=dtype)
        return token_cross_entropy(logits, batch[:, 1:]).mean()

    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        return loop.optimizer_step(optimizer, state, grads), loss

    return step


def heldout_batches(sequences: np.ndarray, batch_size: int, mesh):
    """(batch, weights) pairs covering every held-out sequence; the last batch is padded with
    zero-weight rows so every batch has the same shape (one compile)."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        weights = np.ones((batch_size,), np.float32)
        if len(chunk) < batch_size:
            weights[len(chunk):] = 0
            chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:],
                                                    chunk.dtype)])
        yield loop.shard_batch(chunk, mesh), loop.shard_batch(weights, mesh)


@functools.partial(jax.jit, static_argnames=("config", "mesh", "dtype"))
def _heldout_loss_sum(params, batch, weights, *, config, mesh, dtype):
    """(summed cross-entropy, tokens) of one held-out batch. Module-level, so the evaluations
    before and after a training run share one compiled program."""
    logits = causal_logits(params, batch[:, :-1], config=config, mesh=mesh, dtype=dtype)
    losses = token_cross_entropy(logits, batch[:, 1:])
    return jnp.sum(losses * weights[:, None]), jnp.sum(weights) * losses.shape[1]


def evaluate_lm(params, sequences: np.ndarray, *, config, mesh, batch_size: int, dtype) -> float:
    """Mean next-token cross-entropy (nats) over the held-out sequences."""
    total = count = 0.0
    for batch, weights in heldout_batches(sequences, batch_size, mesh):
        loss_sum, n = _heldout_loss_sum(params, batch, weights, config=config, mesh=mesh,
                                        dtype=jnp.dtype(dtype))
        total, count = total + float(loss_sum), count + float(n)
    return total / count


def new_train_state(params, optimizer, mesh) -> dict:
    """Step 0's train state, every leaf on the mesh: the step counts (which no parameter lays
    out) replicated over it, as a state restored from a checkpoint then has them too (orbax
    gives each leaf the sharding it had here: a count left on one device would meet the
    parameters' devices in one program, which jit refuses wherever dp > 1)."""
    state = {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding)
                        else parallel.put_on_mesh(np.asarray(x), replicated), state)


def train_params(params, make_step: Callable, *, preset: Preset, learning_rate: float, steps: int,
                 dataset: Dataset, out: str, mesh, seed: int, resuming: bool, label: str,
                 log: Callable[[str], None], step_args: tuple = ()):
    """The shared training run: the preset's optimizer, a fresh or resumed train state, and
    `make_step(optimizer)` (a pure `(state, batch, *step_args) -> (state, loss)`) applied to
    batches in seed order, with checkpoints in `out`. `params` are donated to the run."""
    optimizer = loop.make_optimizer(
        learning_rate=learning_rate, steps=steps, warmup_steps=int(preset.warmup_fraction * steps),
        weight_decay=preset.weight_decay, grad_clip=preset.grad_clip)
    state = new_train_state(params, optimizer, mesh)
    checkpoints = loop.Checkpoints(out)
    if resuming and checkpoints.latest_step() is not None:
        try:
            state = checkpoints.restore(state)
        except BaseException:
            checkpoints.close()   # orbax's threads, ended before the error reaches the user
            raise
        # (dp: the run's own by default, where the machine has the devices; see train_mesh)
        log(f"resuming from step {int(state['step'])} on dp={parallel.dp_size(mesh)}")

    def batch_at(step: int):
        rows = loop.batch_indices(step, num_sequences=len(dataset.train),
                                  batch_size=preset.batch_size, seed=seed)
        return dataset.train[rows]

    return loop.run_steps(state, make_step(optimizer), batch_at, total_steps=steps,
                          checkpoints=checkpoints, checkpoint_every=preset.checkpoint_every,
                          tokens_per_step=preset.batch_size * preset.seq_len, label=label,
                          place=lambda batches: loop.shard_batch(batches, mesh, axis=1),
                          step_args=step_args)


def attention_used(config, mesh, dtype) -> str:
    """The attention a training step of `config` ran: "cudnn" (fused) or "reference"."""
    with use_platform(parallel.platform(mesh)):
        fused = cache_free_attention(config, parallel.tp_size(mesh), dtype) is AttentionImpl.CUDNN
    return "cudnn" if fused else "reference"


def throughput(stats: loop.LoopStats, tokens_per_step: int, flops_per_token: float,
               peak: float, devices: int, log: Callable[[str], None]) -> dict:
    """The run's tokens/s (all its devices together) and MFU: model FLOPs per second over
    the `devices`' peak (`peak` is one device's, measured); None where this call ran no step
    (a resume of a run whose steps were all done)."""
    if not stats.timed_steps:
        log("tokens/s and MFU not measured: this call ran no training step")
        return {"tokens_per_s": None, "mfu": None}
    tokens_per_s = stats.timed_steps * tokens_per_step / stats.timed_seconds
    return {"tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_token / (peak * devices),
            "matmul_peak_tflops": peak / 1e12, "devices": devices,
            "compile_seconds": round(stats.compile_seconds, 2)}


def train_lm(
    preset: str | Preset,
    out: str | os.PathLike,
    *,
    corpus: str | os.PathLike | None = None,
    steps: int | None = None,
    resume: bool = False,
    force: bool = False,
    seed: int = 0,
    dp: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Trains a preset's target model; returns the metrics also written to metrics.json.

    Args:
      preset: a preset name ("cpu-tiny", "gpu-small", "gpu-base") or a Preset.
      out: the run directory (becomes an HF checkpoint directory).
      corpus: a directory of text files (default: the standard library's sources).
      steps: override the preset's step count.
      resume: continue the run in `out` from its last checkpoint.
      force: delete an earlier run in `out` and start over.
      seed: initialisation and data-order seed.
      dp: data-parallel degree, a divisor of the preset's batch size (default: a resumed
        run's own where this machine has the devices; every device of several processes;
        on one process's accelerators as many as divide the batch; 1 on CPUs).
      log: called with each progress line (with several processes, in process 0 only).

    With several processes (`jax.distributed`) every process makes the same call; `out` must
    be a directory all of them see (see `jaxdec.train.loop`).
    """
    preset, out, steps, seed = loop.check_run(preset, out, steps=steps,
                                              steps_field="target_steps", resume=resume,
                                              force=force, seed=seed, log=log)
    if corpus is not None:  # (`~` as out: recorded, and compared on resume, expanded)
        corpus = check_path("corpus", corpus)
    loop.check_apart(out, corpus)
    log = loop.lead_log(log)
    mesh = loop.train_mesh(dp, preset.batch_size, resume_from=out if resume else None)
    phases = loop.Phases()
    with phases("corpus"):
        corpus_data = default_corpus(corpus, preset)  # validate it before touching `out`
    run = {"kind": "lm", "preset": preset.name, "steps": steps, "seed": seed,
           "corpus": None if corpus is None else os.path.abspath(os.fspath(corpus)),
           "corpus_digest": loop.corpus_digest(corpus_data),
           "settings": loop.run_settings(preset),
           # (the gradients' sum is ordered by it: a resume with another warns)
           "dp": parallel.dp_size(mesh)}
    resuming = loop.prepare_run(out, resume=resume, force=force, run=run)
    finished = loop.finished_run(out, resuming=resuming, resume=resume, log=log)
    if finished is not None:
        return finished
    dtype = loop.compute_dtype()

    tokenizer = load_tokenizer(out) if resuming else None
    if tokenizer is None:
        log(f"training a {preset.vocab_size}-token byte-level BPE tokenizer on "
            f"{len(corpus_data.train_files)} files ({corpus_data.train_bytes / 1e6:.1f} MB)")
        with phases("tokenizer"):
            trained = []  # process 0 trains it; the others read its file

            def train_tokenizer():
                trained.append(data.train_tokenizer(corpus_data.train_texts, preset.vocab_size))
                path = os.path.join(out, "tokenizer.json")   # whole, or not there: a
                trained[0].save(path + ".tmp")                # resumed run reads it
                os.replace(path + ".tmp", path)

            loop.on_lead(train_tokenizer, "training the tokenizer")
            tokenizer = trained[0] if trained else load_tokenizer(out)
    with phases("encode"):
        dataset = build_dataset(tokenizer, corpus_data, preset)
    check_same_data(dataset)
    eot = data.end_of_text_id(tokenizer)
    config = preset.target.config(tokenizer.get_vocab_size(), preset.max_positions, eot)
    log(f"{len(dataset.train)} training sequences of {preset.seq_len} tokens, "
        f"{len(dataset.heldout)} held-out sequences from {dataset.heldout_files} files")

    with phases("init"):
        model = init_model(config, jax.random.PRNGKey(seed), mesh=mesh)
        n_params = sum(x.size for x in jax.tree.leaves(model.params))
    evaluate = dict(config=config, mesh=mesh, batch_size=preset.batch_size, dtype=dtype)
    with phases("eval"):
        initial_loss = evaluate_lm(model.params, dataset.heldout, **evaluate)
    with phases("train"):
        state, stats = train_params(
            model.params, lambda optimizer: make_lm_step(config, mesh, optimizer, dtype),
            preset=preset, learning_rate=preset.target_learning_rate, steps=steps,
            dataset=dataset, out=out, mesh=mesh, seed=seed, resuming=resuming,
            label=f"train lm {preset.name}", log=log)

    with phases("eval"):
        heldout_loss = evaluate_lm(state["params"], dataset.heldout, **evaluate)
    loop.warn_if_diverged(heldout_loss, f"train lm {preset.name}")
    flops = loop.training_flops_per_token(config, preset.seq_len)
    with phases("attention probe, matmul peak"):
        attention, peak = attention_used(config, mesh, dtype), loop.measure_matmul_peak(dtype)
    metrics = {
        "kind": "lm", "preset": preset.name, "params": int(n_params), "steps": steps,
        "train_tokens_seen": steps * preset.batch_size * preset.seq_len,
        "heldout_loss_before": initial_loss, "heldout_loss": heldout_loss,
        "heldout_ppl": loop.perplexity(heldout_loss),
        "heldout_tokens": int(dataset.heldout[:, 1:].size),
        "attention": attention,
        "device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
        **throughput(stats, preset.batch_size * preset.seq_len, flops, peak,
                     mesh.devices.size, log),
    }
    with phases("export"):
        save_pretrained(Model(config=config, params=state["params"], mesh=mesh,
                              tokenizer=tokenizer), out, overwrite=True)
    metrics["phase_seconds"] = phases.as_dict()
    loop.write_json(os.path.join(out, loop.METRICS_FILE), metrics)
    log(f"held-out loss {heldout_loss:.3f} (perplexity {metrics['heldout_ppl']:.1f}); "
        f"exported to {out}")
    return metrics
