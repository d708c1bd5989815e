"""The pieces every jaxdec training run shares: the optimizer, the output directory rules,
orbax checkpoints, a deterministic batch order, the step loop with its progress bar, and the
FLOP accounting behind MFU.

Resume determinism: the batch of step i depends only on (seed, i) and the train state holds
everything else (params, optimizer state, step), so a run resumed from its last checkpoint
ends with the same parameters as one that was never interrupted.

Several processes (`jax.distributed`, a multi-host TPU slice or GPU cluster) run the same
training call: every process reads the corpus and builds the same batches (checked), each
places its own devices' rows; process 0 alone prepares the run directory, trains the
tokenizer, writes the metrics and the export (orbax checkpoints are written by all, as orbax
does), and logs. The run directory must be one every host sees (NFS, a mounted bucket).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdec import data, parallel
from jaxdec.checkpoint import interrupts_deferred
from jaxdec.checks import check_bool, check_int
from jaxdec.train.presets import PRESETS, Preset, get_preset

RUN_FILE = "train.json"  # marks a directory as a jaxdec training run
CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.json"  # written last: the run is finished


class Interrupted(RuntimeError):
    """Training stopped early (Ctrl-C); the last finished checkpoint is intact. `step`: its
    step, None when there was none yet."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def within(path, directory) -> bool:
    """Whether `path` is `directory` or inside it (`~` expanded, links resolved)."""
    path, directory = (os.path.realpath(os.path.expanduser(os.fspath(p)))
                       for p in (path, directory))
    return path == directory or path.startswith(directory + os.sep)


def check_apart(out: str, corpus) -> None:
    """A ValueError when the run directory and the corpus directory overlap: the run's own
    files (its tokenizer, settings, checkpoints) would join the corpus, so a resumed run read
    other text than the first; a corpus inside the run directory would go with --force."""
    if corpus is None:
        return
    if within(out, corpus):
        raise ValueError(f"out={os.fspath(out)} is inside the corpus {os.fspath(corpus)}: the "
                         "run's own files would be read as text (give the run a directory "
                         "outside it)")
    if within(corpus, out):
        raise ValueError(f"the corpus {os.fspath(corpus)} is inside out={os.fspath(out)}: "
                         "starting the run over (--force) would delete it")


# --------------------------------------------------------------------------- set-up


def make_optimizer(*, learning_rate: float, steps: int, warmup_steps: int,
                   weight_decay: float, grad_clip: float) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay (to 10%), after global-norm clipping.
    Weight decay applies to matrices only (not to norms and biases)."""
    warmup_steps = max(1, warmup_steps)
    warmup_cosine = optax.warmup_cosine_decay_schedule(  # (decay_steps counts the warmup's)
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=max(steps, warmup_steps + 1), end_value=0.1 * learning_rate,
    )

    def schedule(count):
        # optax reads the rate before counting the update: step n takes the schedule's value
        # at n + 1, so the first step learns (at learning_rate / warmup_steps; at 0 it was
        # lost, and a one-step run exported its initialisation) and the last reaches the
        # decay's end.
        return warmup_cosine(count + 1)

    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=weight_decay,
                    mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)),
    )


def optimizer_step(optimizer: optax.GradientTransformation, state: dict, grads) -> dict:
    """The train state after one optimizer update from `grads`.

    optax mixes Python floats with its int32 step count (the schedule), which jax's strict
    dtype promotion refuses; the update runs under standard promotion whatever the user's
    setting (jaxdec's own code is written to run under either)."""
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}


def check_run(preset, out, *, steps, steps_field: str, resume, force, seed, log):
    """The arguments `train_lm` and `train_draft` share, checked before anything is read or
    written: (the Preset, `out` as a string, the step count: `steps` or the preset's
    `steps_field`, the seed)."""
    if isinstance(preset, str):
        preset = get_preset(preset)
    elif not isinstance(preset, Preset):
        raise TypeError(f"preset must be a preset name ({', '.join(PRESETS)}) or a Preset, "
                        f"got {preset!r}")
    steps = check_int("steps", getattr(preset, steps_field) if steps is None else steps)
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a directory path (str or os.PathLike), got {out!r}")
    if not os.fspath(out):
        raise ValueError("out='' names no directory: pass the run directory's path")
    out = os.path.expanduser(os.fspath(out))  # (`~` as load_pretrained reads the result)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out={os.fspath(out)} is a file: the run directory must be a "
                         "directory (new, or an earlier run's)")
    check_bool("resume", resume)
    check_bool("force", force)
    if resume and force:
        raise ValueError("resume=True continues the run in out, force=True deletes it: pass "
                         "one of them")
    seed = check_int("seed", seed, minimum=0)
    if seed >= 2**32:   # jax's keys take 32 bits: larger seeds would repeat smaller ones
        raise ValueError(f"seed must be < 2**32, got {seed}")
    if not callable(log):
        raise TypeError(f"log must be callable (it is given each progress line), got {log!r}")
    return preset, out, steps, seed


def is_lead() -> bool:
    """Whether this process logs and writes the run's files (process 0)."""
    return jax.process_index() == 0


def lead_log(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` in process 0, nothing in the others (every process runs the same lines)."""
    return log if is_lead() else (lambda _: None)


def on_lead(fn: Callable[[], int | None], what: str) -> int:
    """`fn()` (an int, a bool or None) run by process 0 alone, its result handed to every
    process (with one process: just `fn()`). Every process waits for it and learns whether
    it failed, so an error there (a directory that exists, say) raises in every process
    instead of leaving the others waiting in the next collective."""
    if jax.process_count() == 1:
        return int(fn() or 0)
    from jax.experimental import multihost_utils

    result, error = 0, None
    if is_lead():
        try:
            result = int(fn() or 0)
        except Exception as e:  # noqa: BLE001 (re-raised below, after telling the others)
            error = e
    failed, result = (int(x) for x in np.asarray(multihost_utils.broadcast_one_to_all(
        np.array([error is not None, result], np.int32))))
    if error is not None:
        raise error
    if failed:
        raise parallel.ProcessFailed(f"process 0 failed while {what} (its output says why)")
    return result


def check_same_everywhere(value: bytes, what: str) -> None:
    """Raises in every process unless all processes hold the same `value` (by checksum)."""
    parallel.check_same_everywhere(value, what, "every host must read the same corpus (the "
                                                "same Python, or --corpus on a shared directory)")


def check_shared_directory(out: str) -> None:
    """Raises in every process unless each sees the run directory process 0 prepared."""
    if jax.process_count() == 1:
        return
    sees = parallel.from_every_process(os.path.exists(os.path.join(out, RUN_FILE)))
    blind = [i for i, s in enumerate(sees) if not s]
    if blind:
        raise ValueError(f"process(es) {blind} do not see the run directory {out} that process "
                         "0 prepared: with several processes it must be a directory every host "
                         "shares (NFS, a mounted bucket)")


def train_mesh(dp: int | None, batch_size: int, *, resume_from: str | None = None):
    """A data-parallel mesh whose devices each take an equal share of a batch of `batch_size`
    sequences. By default: a run resumed (`resume_from`, its directory) on one process, the
    dp it recorded where the machine has the devices (a resume on another dp is exact only
    up to rounding); with several processes every device (each process holding a part of
    every batch); on one process's accelerators as many as divide the batch (all of them,
    unless their count does not divide it); one CPU device."""
    if dp is None and resume_from is not None and jax.process_count() == 1:
        dp = _recorded_dp(resume_from, batch_size)
    if dp is not None:
        dp = check_int("dp", dp)
    else:
        devices = len(jax.devices())
        if jax.process_count() > 1:
            dp = devices
        elif jax.default_backend() == "cpu":
            dp = 1
        else:
            dp = max(n for n in range(1, devices + 1) if batch_size % n == 0)
    if batch_size % dp:
        raise ValueError(f"dp={dp} does not divide the batch of {batch_size} sequences (each "
                         "data-parallel device takes an equal share): pass a dp that does")
    return parallel.make_mesh(dp=dp)


def _recorded_dp(out: str, batch_size: int) -> int | None:
    """The dp the run in `out` recorded, where this machine can take it; else None."""
    try:
        recorded = read_json(os.path.join(out, RUN_FILE)).get("dp")
    except (OSError, ValueError):
        return None
    if (isinstance(recorded, int) and not isinstance(recorded, bool)
            and 1 <= recorded <= jax.device_count() and batch_size % recorded == 0):
        return recorded
    return None


RUN_KINDS = ("lm", "draft")
# Run-record fields added after runs were made with records without them.
ADDED_LATER = ("target_digest", "dp")
# Run-record fields of the machine, not the run: a resume with others warns (exact only with
# the same ones) rather than refuses (a run may move to a machine of fewer devices).
LAYOUT = ("dp",)


def is_run_record(path: str) -> bool:
    """Whether `path` is a run record jaxdec wrote: a JSON object of a known kind and preset
    (a directory is deleted with --force only then)."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (isinstance(value, dict) and value.get("kind") in RUN_KINDS
            and isinstance(value.get("preset"), str) and "steps" in value)


def read_json(path: str) -> dict:
    """A JSON object file of a run, or a ValueError naming it when it is not one (a file
    edited by hand, or cut short)."""
    try:
        with open(path) as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not a jaxdec run file (it holds a JSON "
                         f"{type(value).__name__}, not an object)")
    return value


def run_settings(preset) -> dict:
    """What a run record keeps of its preset beyond the name: every field a resumed run must
    share (a preset of the same name with another rate or batch size, a jaxdec that retuned
    it, would otherwise continue silently), and the learning-rate schedule's version."""
    fields = dataclasses.asdict(preset)
    fields.pop("description", None)
    return json.loads(json.dumps(dict(fields, schedule=SCHEDULE)))  # as train.json reads back


# Which learning-rate schedule a run follows (`make_optimizer`): runs of another never resume.
SCHEDULE = "warmup-cosine, step n at n + 1"


def corpus_digest(corpus) -> str:
    """A hash of a corpus's training and held-out texts (a resumed run must train on the same
    data: the standard library of another Python is other data under the same name)."""
    digest = hashlib.sha256()
    for texts in (corpus.train_texts, corpus.heldout_texts):
        digest.update(len(texts).to_bytes(8, "little"))
        data.texts_digest(texts, digest)
    return digest.hexdigest()[:16]


def prepare_run(out: str, *, resume: bool, force: bool, run: dict) -> bool:
    """`prepare_output_dir` in process 0 (all processes wait for it, and then check that they
    see the directory); True in every process when resuming."""
    resuming = on_lead(lambda: prepare_output_dir(out, resume=resume, force=force, run=run),
                       f"preparing the run directory {out}")
    check_shared_directory(out)
    return bool(resuming)


def finished_run(out: str, *, resuming: bool, resume: bool, log) -> dict | None:
    """The metrics of a run resumed after it finished (nothing is run or written again), else
    None; says so where --resume found no run to continue (it starts one)."""
    metrics = os.path.join(out, METRICS_FILE)
    if resuming and os.path.exists(metrics):
        log(f"{out} has finished its training (its {METRICS_FILE} is kept): nothing to resume")
        return read_json(metrics)
    if resume and not resuming:
        log(f"no run to resume in {out}: starting one")
    return None


def compute_dtype():
    """bf16 compute on accelerators (fp32 master weights), fp32 on CPUs."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _changed(earlier: dict, run: dict, prefix: str = "") -> list[str]:
    """The settings whose values differ, each as `settings.batch_size: 16 in the run, 8 now`."""
    def shown(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:37] + "..."

    changed = []
    for key in sorted(set(earlier) | set(run)):
        a, b = earlier.get(key), run.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {shown(a)} in the run, {shown(b)} now")
    return changed


def prepare_output_dir(out: str, *, resume: bool, force: bool, run: dict) -> bool:
    """Creates or validates the run directory; returns True when resuming an earlier run.

    An existing non-empty directory needs `resume` (same run settings) or `force` (start over;
    only a directory jaxdec created is ever deleted).
    """
    run_file = os.path.join(out, RUN_FILE)
    if os.path.isdir(out) and os.listdir(out):
        if resume:
            if not os.path.exists(run_file):
                raise ValueError(f"{out} is not a jaxdec training directory (no {RUN_FILE})")
            if not is_run_record(run_file):
                raise ValueError(f"{out} is not a jaxdec training directory (its {RUN_FILE} "
                                 "is not a jaxdec run record)")
            earlier = read_json(run_file)
            # (a field records gained later is no change where an older record lacks it)
            run = {k: v for k, v in run.items() if k in earlier or k not in ADDED_LATER}
            moved = {k: run.pop(k) for k in LAYOUT if k in run}
            layout = {k: earlier.pop(k) for k in LAYOUT if k in earlier}
            if earlier != run:
                raise ValueError(f"cannot resume {out}: the run settings changed "
                                 f"({'; '.join(_changed(earlier, run))}): resume with the "
                                 "run's own")
            if any(k in layout and layout[k] != v for k, v in moved.items()):
                warnings.warn(f"resuming {out} with {'; '.join(_changed(layout, moved))}: "
                              "the gradients' sums are ordered by it, so the parameters "
                              "differ from an uninterrupted run's by rounding",
                              RuntimeWarning, stacklevel=2)
            return True
        if not force:
            raise ValueError(
                f"output directory {out} exists and is not empty; pass --resume to continue "
                "its training or --force to start over"
            )
        if not os.path.exists(run_file):
            raise ValueError(f"refusing to delete {out}: jaxdec did not create it (no {RUN_FILE})")
        if not is_run_record(run_file):  # (a dataset's train.json, say)
            raise ValueError(f"refusing to delete {out}: jaxdec did not create it (its "
                             f"{RUN_FILE} is not a jaxdec run record)")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    tmp = run_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(run, f, indent=2)
    os.replace(tmp, run_file)
    return False


# --------------------------------------------------------------------------- batches


def batch_indices(step: int, *, num_sequences: int, batch_size: int, seed: int) -> np.ndarray:
    """Sequence indices of step `step`: epochs are seeded permutations, consumed in order.
    A function of (seed, step) only, so resumed runs see the same batches."""
    if num_sequences < batch_size:
        raise ValueError(
            f"the training data holds {num_sequences} sequences, fewer than one batch of "
            f"{batch_size}: use a larger corpus or a smaller batch"
        )
    per_epoch = num_sequences // batch_size
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_sequences)
    return order[index * batch_size:(index + 1) * batch_size]


def shard_batch(batch: np.ndarray, mesh, axis: int = 0) -> jax.Array:
    """Places a host batch with its `axis` (the batch axis) split over the mesh's dp axis."""
    dp = parallel.DP if parallel.DP in mesh.axis_names else None
    return parallel.put_on_mesh(batch, NamedSharding(mesh, P(*(None,) * axis, dp)))


# --------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """orbax checkpoints of a train state under `<out>/checkpoints`.

    orbax writes each step to a temporary directory and renames it when complete, so a kill
    during a save leaves the previous checkpoint as the latest one. orbax runs threads of its
    own: `close()` (or a `with` block) finishes a save under way and ends them.
    """

    def __init__(self, out: str, *, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(out, CHECKPOINTS)),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True),
            item_handlers=ocp.StandardCheckpointHandler(),  # (which lets item_metadata read)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        # Ctrl-C waits for the save's start (orbax's save, cut part way, logs a failed
        # finalize and forgets the step, whose checkpoint is then written all the same).
        with interrupts_deferred():
            self.manager.save(step, args=self._ocp.args.StandardSave(state))

    def saved_step(self) -> int | None:
        """The latest complete checkpoint on disk, read again (after `close`: a save that was
        finishing when the run stopped counts)."""
        self.manager.reload()
        return self.manager.latest_step()

    def restore(self, like: Any) -> Any:
        """The latest checkpoint, with the structure, dtypes and shardings of `like`."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        step = self.latest_step()
        try:
            saved = _leaf_shapes(self.manager.item_metadata(step).tree)
        except Exception as e:  # no or damaged metadata
            raise self._unreadable(step, e) from e
        # Checked before orbax reads any array: a restore that fails part way leaves reads of
        # the other arrays pending in orbax's threads.
        wanted = _leaf_shapes(target)
        if saved != wanted:
            leaf = min(set(saved.items()) ^ set(wanted.items()))[0]
            raise self._other_shapes(step, f"at {leaf} it holds "
                                     f"{_described(saved.get(leaf))}, this run "
                                     f"{_described(wanted.get(leaf))}")
        try:
            return self.manager.restore(step, args=self._ocp.args.StandardRestore(target))
        except ValueError as e:
            if "shape" not in str(e):
                raise self._unreadable(step, e) from e
            raise self._other_shapes(step, f"orbax: {e}") from e
        except Exception as e:  # orbax raises bare Exceptions for missing or cut array data
            raise self._unreadable(step, e) from e

    def _other_shapes(self, step: int, detail: str) -> ValueError:
        return ValueError(
            f"the checkpoint of step {step} in {self.manager.directory} holds arrays of other "
            "shapes than this run's train state (another model config, or an older jaxdec, "
            "whose gate_up was [E, 2, F] and qkv [E, R, H/R + 2, D]); start the run in a new "
            f"directory ({detail})")

    def _unreadable(self, step: int, error: Exception) -> ValueError:
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        return ValueError(
            f"the checkpoint of step {step} in {self.manager.directory} cannot be read "
            f"({type(error).__name__}: {first}): its files are damaged or missing; delete its "
            f"directory ({step}) to resume from the checkpoint before it, or start the run over")

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{path: shape} of a pytree's arrays, with paths spelt alike for a train state and the
    metadata orbax keeps of it (which holds the state's named tuples as dicts)."""
    def name(key):
        for field in ("key", "name", "idx"):
            if hasattr(key, field):
                return str(getattr(key, field))
        return str(key)
    return {"/".join(map(name, path)): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _described(shape: tuple[int, ...] | None) -> str:
    return "no array" if shape is None else f"shape {list(shape)}"


# --------------------------------------------------------------------------- the loop


class Progress:
    """One status line: step, loss, tokens/s and ETA (redrawn on a terminal, printed every
    ~10% otherwise)."""

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total = label, total
        # (with several processes, process 0's alone is shown)
        self.stream = stream or (sys.stderr if is_lead() else io.StringIO())
        self.live = self.stream.isatty()
        self._printed = -1

    def update(self, step: int, loss: float, tokens_per_s: float | None, eta_s: float | None):
        rate = f"{tokens_per_s / 1e3:.1f}k tok/s" if tokens_per_s else "compiling"
        eta = f"ETA {_duration(eta_s)}" if eta_s is not None else ""
        line = f"{self.label} step {step}/{self.total} loss {loss:.3f} {rate} {eta}".rstrip()
        if self.live:
            self.stream.write("\r" + line.ljust(78))
        elif step == self.total or step * 10 // self.total > self._printed:
            self._printed = step * 10 // self.total
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclasses.dataclass
class LoopStats:
    steps_run: int = 0
    compile_seconds: float = 0.0  # compiling the step programs (not in timed_seconds)
    timed_steps: int = 0  # every step this process ran
    timed_seconds: float = 0.0
    last_loss: float = float("nan")


class Phases:
    """Wall seconds per named phase of a run (`with phases("tokenizer"): ...`), so a record
    says where a run's time went, not only its training throughput."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        return {name: round(s, 2) for name, s in self.seconds.items()}


STEPS_PER_CALL = 10  # training steps per dispatched program (`run_steps`)


def chunk_lengths(start: int, total: int, *, per_call: int, checkpoint_every: int) -> list[int]:
    """How `run_steps` splits steps [start, total) into calls: `per_call` steps each, never
    across a checkpoint (a multiple of `checkpoint_every`) or the end, so that every step a
    checkpoint names has run and nothing after it. Each distinct length is a compile of its
    own: the presets' step counts and checkpoint intervals are multiples of `per_call`, so
    theirs all have one length."""
    lengths, step = [], start
    while step < total:
        boundary = min(total, (step // checkpoint_every + 1) * checkpoint_every)
        lengths.append(min(per_call, boundary - step))
        step += lengths[-1]
    return lengths


def run_steps(
    state: dict,
    step_fn: Callable,
    batch_at: Callable[[int], np.ndarray],
    *,
    total_steps: int,
    checkpoints: Checkpoints,
    checkpoint_every: int,
    tokens_per_step: int,
    label: str,
    place: Callable[[np.ndarray], jax.Array] = jnp.asarray,
    step_args: tuple = (),
    steps_per_call: int = STEPS_PER_CALL,
    progress_every: int = 10,
) -> tuple[dict, LoopStats]:
    """Runs `state, loss = step_fn(state, batch_at(step), *step_args)` from the state's step
    to `total_steps`, saving a checkpoint every `checkpoint_every` steps and at the end.

    `step_fn` is pure (it is traced here). Up to `steps_per_call` steps run as one compiled
    program (`lax.scan` over their batches, stacked on the host by `batch_at` and placed by
    `place`, the state donated): one dispatch per call instead of one per step, so a busy host
    (another thread tracing and compiling holds Python's interpreter lock) cannot leave the
    device waiting between steps. `step_args` are passed to every step as arguments (not baked
    into the program as constants). Losses are read back about every `progress_every` steps.
    Ctrl-C waits for any checkpoint being written and raises `Interrupted`.
    """
    def chunk(state, batches, *args):
        state, losses = jax.lax.scan(lambda s, b: step_fn(s, b, *args), state, batches)
        return state, losses[-1]

    run_chunk = jax.jit(chunk, donate_argnums=0)
    programs = {}  # chunk length -> compiled program

    def program(length, *args):
        if length not in programs:
            compile_start = time.perf_counter()
            programs[length] = run_chunk.lower(*args).compile()
            stats.compile_seconds += time.perf_counter() - compile_start
        return programs[length]

    stats = LoopStats()
    progress = Progress(label, total_steps)
    start = done = int(state["step"])
    try:
        for length in chunk_lengths(start, total_steps, per_call=steps_per_call,
                                    checkpoint_every=checkpoint_every):
            batches = place(np.stack([np.asarray(batch_at(step))
                                      for step in range(done, done + length)]))
            run = program(length, state, batches, *step_args)
            if stats.steps_run == 0:  # the clock starts once the first program is compiled
                clock, compiled_before = time.perf_counter(), stats.compile_seconds
            state, loss = run(state, batches, *step_args)
            last, done = done, done + length
            stats.steps_run += length
            if done % checkpoint_every == 0 or done == total_steps:
                checkpoints.save(done, state)
            if done // progress_every > last // progress_every or done == total_steps:
                stats.last_loss = float(loss)  # waits for the device
                elapsed = time.perf_counter() - clock - (stats.compile_seconds - compiled_before)
                rate = stats.steps_run * tokens_per_step / elapsed
                progress.update(done, stats.last_loss, rate, elapsed / stats.steps_run
                                * (total_steps - done))
        if stats.steps_run:
            jax.block_until_ready(state)
            stats.timed_steps = stats.steps_run
            stats.timed_seconds = (time.perf_counter() - clock
                                   - (stats.compile_seconds - compiled_before))
    except KeyboardInterrupt:
        progress.close()
        try:   # the program in flight finishes before the process may end (a teardown
            jax.block_until_ready(state)   # under a running program crashed it at times)
        except Exception:   # its input, donated: nothing runs
            pass
        checkpoints.close()
        step = checkpoints.saved_step()
        kept = (f"the checkpoint at step {step} is intact" if step is not None else
                "no checkpoint was written yet")
        raise Interrupted(f"{label} interrupted; {kept}: rerun with --resume to continue",
                          step) from None
    except BaseException:
        # orbax's threads end (a checkpoint being written is finished) before the error
        # reaches the caller: left running, they log tracebacks at the interpreter's exit.
        progress.close()
        try:
            checkpoints.close()
        except Exception:  # the first error is the one to report
            pass
        raise
    progress.close()
    checkpoints.close()
    return state, stats


def perplexity(loss: float) -> float:
    """exp(loss), inf past a float's range (math.exp raises there)."""
    return math.exp(loss) if loss < 709 else (loss if math.isnan(loss) else math.inf)


def warn_if_diverged(loss: float, label: str) -> None:
    """A RuntimeWarning where the trained model's held-out loss is not finite."""
    if not math.isfinite(loss):
        warnings.warn(f"{label}: the held-out loss is {loss}: the training diverged (the "
                      "exported parameters are what it left); train again with a lower "
                      "learning rate", RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- FLOPs and MFU


def training_flops_per_token(config, seq_len: int) -> float:
    """Model FLOPs per trained token: 6 per matmul weight (forward + backward; the output
    projection counts, the embedding gather does not) plus 12 * layers * seq_len * (heads x
    head_dim) for attention scores and values (the PaLM accounting)."""
    E, F, L = config.hidden_size, config.intermediate_size, config.num_layers
    qkvo = E * config.head_dim * (2 * config.num_heads + 2 * config.num_kv_heads)
    matmul_weights = L * (qkvo + 3 * E * F) + E * config.vocab_size
    attention = 12 * L * seq_len * config.num_heads * config.head_dim
    return 6.0 * matmul_weights + attention


def seconds_per_pass(program: Callable, *args, passes: int, trials: int) -> float:
    """Seconds per pass of `program(n, *args)`, a jitted loop running `n` dependent passes (`n`
    an argument, so never unrolled): the difference of the best of `trials` times of 2n and n
    passes over n, so dispatch and synchronization drop out (the plain average when noise
    exceeds the difference)."""
    def best(n: int) -> float:
        jax.block_until_ready(program(jnp.int32(n), *args))  # compile, warm up
        times = []
        for _ in range(trials):
            start = time.perf_counter()
            jax.block_until_ready(program(jnp.int32(n), *args))
            times.append(time.perf_counter() - start)
        return min(times)

    once, twice = best(passes), best(2 * passes)
    return (twice - once) / passes if twice > once else twice / (2 * passes)


def measure_matmul_peak(dtype=None, *, size: int | None = None) -> float:
    """Measured dense matmul FLOP/s on the default device (bf16 on accelerators).

    `size`^3 products on random data (zeros and ones can multiply faster than real data,
    overstating the peak), chained inside one jitted loop and timed per product by
    `seconds_per_pass` (timing one dispatched product would understate the peak and so
    overstate MFU)."""
    dtype = dtype or compute_dtype()
    accelerator = jax.default_backend() != "cpu"
    size = size or (8192 if accelerator else 512)
    passes, trials = (4, 3) if accelerator else (2, 2)
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (size, size), dtype)
    # Scaled so the chained products keep their magnitude (no overflow in bf16).
    b = (jax.random.normal(key_b, (size, size), jnp.float32) / math.sqrt(size)).astype(dtype)

    @jax.jit
    def chain(n, x, y):
        return jax.lax.fori_loop(0, n, lambda _, x: x @ y, x)

    return 2.0 * size**3 / seconds_per_pass(chain, a, b, passes=passes, trials=trials)


def write_json(path: str, obj: Any) -> None:
    """Atomically (a temporary file renamed into place); with several processes, process 0
    writes. Non-finite numbers (a diverged run's loss) are written as null: strict JSON."""
    if not is_lead():
        return

    def strict(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(v) for v in value]
        return value

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(strict(obj), f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
