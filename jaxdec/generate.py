"""Autoregressive generation: prefill + one `lax.while_loop`, compiled as one program.

Two layers:

- `generate_padded(model, tokens, prompt_lengths, cache, key, ...)` is pure and jittable:
  right-padded prompts in, tokens out. Jit it yourself (donating the cache) to embed
  generation in your own programs.
- `generate(model, prompts, ...)` takes ragged Python token lists, validates them before
  anything is traced, pads prompts to a length bucket (so a new length within a bucket does
  not recompile), allocates and donates the cache, and runs the compiled program.

Sampling keys: row b uses `fold_in(key, b)` and step i `fold_in(row_key, i)`, so rows draw
independent randomness and a run is reproducible from its key.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import logging
import operator
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxdec import parallel, sampling
from jaxdec.cache import Cache, as_bits, as_floats, carries_bits, init_cache
from jaxdec.checks import (check_bool, check_ids, check_int, check_model, check_untraced,
                           concrete_scalar)
from jaxdec.model import (Model, check_attention, check_cache, forward_with_cache, is_abstract,
                          param_dtype)
from jaxdec.sampling import Greedy, Sampler, check_key, check_sampler

MIN_BUCKET = 16
# A default cache's slots are a multiple of this: the Hopper kernel's copies need it, and the
# TPU kernel's key blocks (which must divide the cache) get at least 8 slots. Not more: on the
# compile-only H100 the gpu-small lookup step's reference attention took 2 more kernels per
# layer with a 448-slot cache (64 x 7) than with 403 or 408 (XLA's untuned split-K choices).
CACHE_SLOT_MULTIPLE = 8
_POW2_BUCKETS_UP_TO = 1024  # powers of two up to here, then multiples of this


def bucket_length(n: int) -> int:
    """The padded prompt length for a prompt of n tokens: the next power of two >= 16 up to
    1024, then the next multiple of 1024 (at most ~2x padding for short prompts, < 1024 extra
    tokens for long ones)."""
    if n <= _POW2_BUCKETS_UP_TO:
        return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
    return -(-n // _POW2_BUCKETS_UP_TO) * _POW2_BUCKETS_UP_TO


def own_arrays(result, *names: str) -> None:
    """A result's numpy fields as arrays of its own, writable (a jax array's host value is a
    read-only view of it: replacing the pad ids in place failed)."""
    for name in names:
        value = getattr(result, name)
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            object.__setattr__(result, name, value.copy())


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """Output of `generate`.

    Attributes:
      tokens: int32 [B, max_new_tokens]; after a row stops, `pad_id`.
      lengths: int32 [B], generated tokens per row (a stop token counts).
      prefill_s, decode_s: seconds from the program's start to the first token, and from the
        first token to the last (None unless `return_timings=True`; compile time excluded).
      logprobs: float32 [B, max_new_tokens], each token's log-probability under the model
        (`token_logprobs`); 0 after a row stops (None unless `return_logprobs=True`).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    prefill_s: float | None = None
    decode_s: float | None = None
    logprobs: np.ndarray | None = None

    def __post_init__(self):
        own_arrays(self, "tokens", "lengths", "logprobs")

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Decode throughput over all rows (tokens after the first / decode_s); None where
        untimed or no row decoded past its first token (nothing to measure)."""
        decoded = int(np.sum(np.maximum(self.lengths - 1, 0)))
        if self.decode_s is None or self.decode_s <= 0 or decoded == 0:
            return None
        return float(decoded / self.decode_s)

    def to_lists(self) -> list[list[int]]:
        """Each row's generated tokens, without padding."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _LoopState:
    step: jax.Array  # scalar int32: index of the next token to produce
    last_BT: jax.Array  # [B, 1] the last produced token, fed next
    cache: Cache
    out_BN: jax.Array  # [B, N]: N >= the tokens a row may produce (see `_decode`)
    n_gen_B: jax.Array  # [B] tokens produced per row
    done_B: jax.Array  # [B] bool
    logprobs_BN: jax.Array | None  # [B, N] float32, when asked for


def _step_keys(row_keys: jax.Array, step: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)


def token_logprobs(logits_BNV: jax.Array, tokens_BN: jax.Array) -> jax.Array:
    """float32 [B, N]: log p(token) under the model's distribution, log_softmax of its logits
    (temperature 1, before any top-k / top-p / min-p: the figure scoring and perplexity use,
    the same for every sampler)."""
    logits = logits_BNV.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens_BN[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _draw(sampler, logits_BV: jax.Array, keys_B: jax.Array) -> jax.Array:
    if sampler.is_greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.vmap(sampler.sample)(logits_BV, keys_B)


def _is_stop(tokens_B: jax.Array, stop_BM: jax.Array) -> jax.Array:
    return jnp.any(tokens_B[:, None] == stop_BM, axis=-1)


@parallel.runs_on_model_mesh(lambda a: a["model"].mesh)
def generate_padded(
    model: Model,
    tokens_BT: jax.Array,
    prompt_lengths_B: jax.Array,
    cache: Cache,
    key: jax.Array,
    stop_tokens_BM: jax.Array | None = None,
    *,
    max_new_tokens: int,
    sampler: Greedy | Sampler | None = None,
    pad_id: int = 0,
    stream: Callable | None = None,
    return_logprobs: bool = False,
):
    """Generates from right-padded prompts; pure and jittable (jit with the cache donated).
    Called outside jit without a stream it runs one compiled program too (compiled once per
    shapes and static arguments; the cache is then not donated); with a stream, outside jit,
    it runs op by op and its decode loop compiles in every call (jit it with the stream
    static, or use `generate`).

    Args:
      model: the Model (a pytree; its config and mesh are static).
      tokens_BT: int32 prompts, right-padded to a common length T.
      prompt_lengths_B: int32 true prompt lengths (>= 1).
      cache: an empty cache (`jaxdec.init_cache`) with max_len >= T + max_new_tokens - 1.
      key: PRNG key (unused by greedy sampling, which also takes None).
      stop_tokens_BM: int32 stop ids per row, padded with -1 (None: no stop tokens).
      max_new_tokens: static number of tokens to produce per row.
      sampler: Greedy() (the default) or Sampler(...).
      pad_id: written after a row stops.
      stream: optional host function called after every step as stream(step, tokens[B],
        active[B]) (through `jax.debug.callback`, with jax Arrays; in step order on one
        device, possibly out of order on a multi-device mesh, where `step` tells the order).
        Under your own `jax.jit` it is a static argument: a new function recompiles (keep one
        function, or use `generate`, whose streams do not).
      return_logprobs: static; also return each token's log-probability (`token_logprobs`).
    Returns:
      ((tokens [B, max_new_tokens], lengths [B]), cache), with `return_logprobs`
      ((tokens, lengths, logprobs [B, max_new_tokens] float32), cache): the cache holds every
      produced token except the last one of each row (a cache given as bits, `as_bits`,
      comes back as bits).
    """
    sampler, max_new_tokens, pad_id, key = check_padded_call(
        model, tokens_BT, prompt_lengths_B, cache, key, stop_tokens_BM, sampler=sampler,
        max_new_tokens=max_new_tokens, pad_id=pad_id)
    return_logprobs = check_bool("return_logprobs", return_logprobs)
    if cache.max_len < tokens_BT.shape[1] + max_new_tokens - 1:  # static shapes
        raise ValueError(f"the cache's {cache.max_len} slots hold no prompt block of "
                         f"{tokens_BT.shape[1]} tokens and {max_new_tokens} new tokens: "
                         f"it needs max_len >= {tokens_BT.shape[1] + max_new_tokens - 1}")
    arrays = (model, tokens_BT, prompt_lengths_B, cache, key, stop_tokens_BM)
    settings = dict(max_new_tokens=max_new_tokens, sampler=sampler, pad_id=pad_id,
                    stream=stream, return_logprobs=return_logprobs)
    if stream is not None or any(isinstance(leaf, jax.core.Tracer)
                                 for leaf in jax.tree.leaves(arrays)):
        # (a stream would be a static argument of the eager program: one compiled program
        # kept per function, and a function that cannot be hashed refused)
        return _generate_padded(*arrays, **settings)
    # Called eagerly: one compiled program (op by op, the loop's while was compiled anew in
    # every call: its body is a new function each time).
    return _generate_padded_program(*on_model_devices(model.mesh, *arrays), **settings)


def check_padded_call(model, tokens_BT, prompt_lengths_B, cache, key, stop_tokens_BM, *,
                      sampler, max_new_tokens, pad_id):
    """The checks `generate_padded` and `jaxdec.speculative.speculative_padded` share:
    (sampler, max_new_tokens, pad_id, key) checked, the key made for greedy decoding without
    one (typed, as `check_key` makes every key: one program)."""
    sampler = check_sampler(sampler)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens)
    pad_id = _check_pad_id(pad_id)
    if getattr(tokens_BT, "ndim", None) != 2:
        raise ValueError(f"tokens_BT must be [batch, length], got "
                         f"{getattr(tokens_BT, 'shape', type(tokens_BT).__name__)}")
    _check_padded_prompts(model, tokens_BT, prompt_lengths_B, stop_tokens_BM)
    key = check_key(key)
    check_cache(model, cache, tokens_BT.shape[0])
    if key is None:
        if not sampler.is_greedy:
            raise ValueError("key is needed to sample (greedy decoding takes None)")
        key = jax.random.key(0)
    return sampler, max_new_tokens, pad_id, key


def on_model_devices(mesh, *arrays):
    """`arrays` with each jax Array that lies on other devices than the mesh's (another
    model's output on one device) as its host copy (a small array of ids) or, for a key,
    replicated over the mesh: a program over the mesh refused it."""
    devices = set(mesh.devices.flat)

    def placed(x):
        if (not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer)
                or x.sharding.device_set == devices or not x.is_fully_addressable):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return parallel.onto_mesh(x, mesh)
        return np.asarray(x)

    return tuple(map(placed, arrays))


def _generate_padded(model, tokens_BT, prompt_lengths_B, cache, key, stop_tokens_BM, *,
                     max_new_tokens, sampler, pad_id, stream, return_logprobs):
    """`generate_padded` on checked arguments."""
    row_keys = sampling.row_keys(key, tokens_BT.shape[0])
    first, first_logprob, cache = _prefill(model, tokens_BT, prompt_lengths_B, cache, row_keys,
                                           sampler, return_logprobs)
    return _decode(model, first, cache, row_keys, stop_tokens_BM, max_new_tokens=max_new_tokens,
                   sampler=sampler, pad_id=pad_id, stream=stream, first_logprob_B=first_logprob)


_generate_padded_program = jax.jit(
    _generate_padded,
    static_argnames=("max_new_tokens", "sampler", "pad_id", "stream", "return_logprobs"))


def _check_padded_prompts(model, tokens_BT, prompt_lengths_B, stop_tokens_BM) -> None:
    """generate_padded's arrays: shapes and integer dtypes always; where they hold values
    (called eagerly), lengths in [1, T] (a length of 0 or past T ran and returned tokens from
    no prompt or from padding) and the prompts' and stop ids inside the vocabulary."""
    B, T = tokens_BT.shape
    for name, array, shape in (("tokens_BT", tokens_BT, (B, T)),
                               ("prompt_lengths_B", prompt_lengths_B, (B,)),
                               ("stop_tokens_BM", stop_tokens_BM, None)):
        if array is None and name == "stop_tokens_BM":
            continue
        dtype, got = getattr(array, "dtype", None), getattr(array, "shape", None)
        if dtype is None or dtype == bool or not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array, got "
                            f"{type(array).__name__}{'' if dtype is None else f' of {dtype}'}")
        if (got != shape) if shape else (len(got) != 2 or got[0] != B):
            raise ValueError(f"{name} must be {list(shape) if shape else f'[{B}, M]'} "
                             f"(tokens_BT is [{B}, {T}]), got shape {tuple(got)}")
    try:
        ids, lengths = np.asarray(tokens_BT), np.asarray(prompt_lengths_B)
    except jax.errors.TracerArrayConversionError:  # under the caller's jit
        return
    if lengths.size and (lengths.min() < 1 or lengths.max() > T):
        raise ValueError(f"prompt_lengths_B must be in [1, {T}] (tokens_BT's length), got "
                         f"{lengths.tolist()}")
    # (the padding may be anything)
    check_ids("tokens_BT", ids[np.arange(T)[None, :] < lengths[:, None]],
              model.config.vocab_size)
    if stop_tokens_BM is not None:
        try:
            stops = np.asarray(stop_tokens_BM)
        except jax.errors.TracerArrayConversionError:
            return
        check_ids("stop_tokens_BM", stops[stops != -1], model.config.vocab_size)  # (-1 pads)


def _check_pad_id(pad_id) -> int:
    if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)):
        raise TypeError(f"pad_id must be an int, got {pad_id!r}")
    if not -2**31 <= pad_id < 2**31:  # the output buffers are int32
        raise ValueError(f"pad_id must fit int32, got {pad_id}")
    return int(pad_id)


def _padding_rows(batch: int, rows) -> jax.Array:
    """[batch] bool: the rows past the first `rows` (the copies filling a batch to the mesh's
    dp; none when `rows` is None)."""
    if rows is None:
        return jnp.zeros((batch,), bool)
    return jnp.arange(batch, dtype=jnp.int32) >= rows


def _prefill(model, tokens_BT, prompt_lengths_B, cache, row_keys, sampler, logprobs=False,
             continued=False):
    """Writes the whole padded block, keeps only the true lengths, and draws the first token
    from each row's last prompt position (with `logprobs`, also its log-probability, else
    None). Padding slots past a row's length are overwritten by later tokens. `continued`
    (static): the block follows what the cache already holds (its lengths), instead of
    starting an empty cache."""
    B, T = tokens_BT.shape
    prompt_lengths_B = prompt_lengths_B.astype(jnp.int32)
    start_B = cache.lengths if continued else jnp.zeros((B,), jnp.int32)
    positions_BT = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    cache = cache.replace(lengths=start_B)
    logits, _, cache = forward_with_cache(
        model, tokens_BT.astype(jnp.int32), positions_BT, cache,
        logits_indices_BN=(prompt_lengths_B - 1)[:, None], fresh=not continued, prefill=True,
    )
    first = _draw(sampler, logits[:, 0], _step_keys(row_keys, jnp.int32(0)))
    first_logprob = token_logprobs(logits, first[:, None])[:, 0] if logprobs else None
    return first, first_logprob, cache.replace(lengths=start_B + prompt_lengths_B)


def _decode(model, first_B, cache, row_keys, stop_tokens_BM, *, max_new_tokens, sampler, pad_id,
            stream, stream_args=(), first_logprob_B=None, limit=None, rows=None):
    """The decode `lax.while_loop`: runs until every row stopped or produced `limit` tokens
    (a traced int of at most N = `max_new_tokens`, the output buffers' static width: one
    program serves every limit; None: N). `rows` (traced; None: all): the real rows, the
    first ones; the others (copies filling the batch to the mesh's dp) start stopped, so
    they never keep the loop running.
    `stream` is called as stream(*stream_args, step, tokens, active). With `first_logprob_B`
    (the first token's log-probability) the loop records every token's and returns
    (tokens, lengths, logprobs)."""
    B, N = first_B.shape[0], max_new_tokens
    limit = N if limit is None else limit
    if stop_tokens_BM is None:
        stop_tokens_BM = jnp.full((B, 1), -1, jnp.int32)
    # Ordered callbacks exist only on one device; elsewhere the step index tells the order.
    ordered = model.mesh.size == 1
    if stream is not None:
        parallel.host_callback(stream, model.mesh, *stream_args, jnp.int32(0), first_B,
                               jnp.ones((B,), bool), ordered=ordered)
    # On a CPU the loop carries a bf16 cache as its bits (see `jaxdec.cache.as_bits`).
    bits = parallel.platform(model.mesh) == "cpu"
    given_bits = carries_bits(cache)  # (handed back as bits: the caller's own loop's dtype)
    state = _LoopState(
        step=jnp.int32(1), last_BT=first_B[:, None], cache=as_bits(cache) if bits else cache,
        out_BN=jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(first_B),
        n_gen_B=jnp.ones((B,), jnp.int32),
        done_B=_is_stop(first_B, stop_tokens_BM) | (limit <= 1) | _padding_rows(B, rows),
        logprobs_BN=None if first_logprob_B is None else
        jnp.zeros((B, N), jnp.float32).at[:, 0].set(first_logprob_B),
    )

    def cond(s: _LoopState):
        return (s.step < limit) & ~jnp.all(s.done_B)

    def body(s: _LoopState):
        active = ~s.done_B
        logits, _, cache = forward_with_cache(model, s.last_BT, s.cache.lengths[:, None], s.cache)
        # Stopped rows keep their length, so their (ignored) writes stay in range.
        cache = cache.replace(lengths=s.cache.lengths + active.astype(jnp.int32))
        token = _draw(sampler, logits[:, 0], _step_keys(row_keys, s.step))
        token = jnp.where(active, token, pad_id)
        if stream is not None:
            parallel.host_callback(stream, model.mesh, *stream_args, s.step, token, active,
                                   ordered=ordered)
        done = s.done_B | _is_stop(token, stop_tokens_BM) | (s.step + 1 >= limit)
        logprobs = s.logprobs_BN
        if logprobs is not None:
            logprob = jnp.where(active, token_logprobs(logits, token[:, None])[:, 0], 0.0)
            logprobs = logprobs.at[:, s.step].set(logprob)
        return _LoopState(
            step=s.step + 1, last_BT=token[:, None], cache=cache,
            out_BN=s.out_BN.at[:, s.step].set(token),
            n_gen_B=s.n_gen_B + active.astype(jnp.int32), done_B=done, logprobs_BN=logprobs,
        )

    state = jax.lax.while_loop(cond, body, state)
    outputs = (state.out_BN, state.n_gen_B)
    if state.logprobs_BN is not None:
        outputs += (state.logprobs_BN,)
    return outputs, as_floats(state.cache) if bits and not given_bits else state.cache


# -------------------------------------------------------------------- the host-side API


def python_ints(**values):
    """The values, in order, numpy integers and 0-d integer arrays as Python ints (a computed
    max_new_tokens, say; static arguments are hashed and compared by value and type; a traced
    one is a TypeError naming it); anything else as it is, for the checks."""
    values = [concrete_scalar(name, v) for name, v in values.items()]
    return tuple(int(v) if isinstance(v, np.integer) else v for v in values)


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (np.ndarray, jax.Array)):  # [batch, length]: every row whole
        if prompts.ndim != 2:
            raise TypeError(f"prompts as an array must be [batch, length] token ids, got shape "
                            f"{prompts.shape} (one prompt is [ids])")
        prompts = list(np.asarray(prompts))
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError("prompts must be a non-empty list of token-id lists")
    checked = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)):
            raise TypeError(f"prompts[{i}] is a string; tokenize it first (token-id lists)")
        try:
            row = np.asarray(prompt)
        except ValueError:  # ragged: a list inside a prompt
            raise TypeError(f"prompts[{i}] must be a flat list of integer token ids") from None
        if row.ndim == 0 and np.issubdtype(row.dtype, np.integer):  # one prompt, unwrapped
            raise TypeError(f"prompts must be a list of prompts, each a list of token ids; got "
                            f"a list of ints (one prompt is [ids]: prompts=[{str(prompts)[:30]}])")
        if row.ndim != 1 or not (row.size == 0 or np.issubdtype(row.dtype, np.integer)):
            raise TypeError(f"prompts[{i}] must be a flat list of integer token ids")
        if row.size == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        check_ids(f"prompts[{i}]", row, vocab_size)
        checked.append(row.tolist())
    return checked


def _check_stop_tokens(stop_tokens, batch: int, vocab_size: int) -> np.ndarray:
    """Shared ids (one id or a flat list) or one list per row -> int32 [B, M] padded with -1."""
    if isinstance(stop_tokens, (str, bytes)):
        raise TypeError("stop_tokens must be token ids, or one list of ids per prompt; got a "
                        "string (tokenize it first)")
    if isinstance(stop_tokens, (np.ndarray, jax.Array)):
        array = np.asarray(stop_tokens)
        stop_tokens = array.tolist()  # an int, a list or a list of lists
        if array.ndim in (1, 2) and np.issubdtype(array.dtype, np.integer):
            # -1 pads rows with fewer ids (as `generate_padded`'s stop_tokens_BM)
            stop_tokens = ([[t for t in row if t != -1] for row in stop_tokens] if array.ndim == 2
                           else [t for t in stop_tokens if t != -1])
    if isinstance(stop_tokens, (int, np.integer)) and not isinstance(stop_tokens, bool):
        stop_tokens = [stop_tokens]  # one id (as a config's eos_token_id often is)
    try:
        stop_tokens = list(stop_tokens) if stop_tokens is not None else []
    except TypeError:
        raise TypeError("stop_tokens must be token ids, or one list of ids per prompt, got "
                        f"{type(stop_tokens).__name__}") from None
    def ids(values) -> list[int]:
        try:  # integers only: no strings, floats or bools
            if any(isinstance(t, bool) for t in values):
                raise TypeError
            return [operator.index(t) for t in values]
        except TypeError:
            raise TypeError("stop_tokens must be token ids, or one list of ids per prompt") from None

    per_row = bool(stop_tokens) and all(isinstance(s, (list, tuple, np.ndarray)) for s in stop_tokens)
    if per_row:
        if len(stop_tokens) != batch:
            raise ValueError(
                f"stop_tokens has {len(stop_tokens)} per-row lists for {batch} prompts"
            )
        rows = [ids(s) for s in stop_tokens]
    else:
        rows = [ids(stop_tokens)] * batch
    for row in rows:
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_tokens has ids outside [0, {vocab_size}): {bad[:5]}")
    # Padded to a power of two >= 8, so a few more or fewer stop ids do not recompile.
    width = max(8, 1 << (max(len(r) for r in rows) - 1).bit_length())
    out = np.full((batch, width), -1, np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def check_compile_only(compile_only, **models) -> None:
    """Abstract models (shapes only) can compile programs, never run them."""
    check_bool("compile_only", compile_only)
    for name, model in models.items():
        if not compile_only and is_abstract(model):
            raise ValueError(f"the {name}'s params are shapes only (jaxdec.abstract_model): it "
                             "can compile programs (compile_only=True), not run them")


def _host_clock(*_dependencies) -> np.ndarray:
    """perf_counter_ns as int32 [seconds mod 2**30, nanoseconds] (x64 is off by default)."""
    ns = time.perf_counter_ns()
    return np.array([(ns // 10**9) % 2**30, ns % 10**9], np.int32)


def after_clock(stamp: jax.Array, x: jax.Array) -> jax.Array:
    """`x`, made to depend on the value of a `_host_clock` stamp: work on the result starts
    only once the clock was read. (A select that is never taken: the seconds field is >= 0.
    An optimization barrier alone orders the HLO, not the runtime: jax 0.11's CPU runtime ran
    a prefill beside the clock's callback and stamped the start after the first tokens.)"""
    return jnp.where(stamp[0] < 0, jnp.zeros_like(x), x)


def _seconds_between(start: np.ndarray, end: np.ndarray) -> float:
    return float((int(end[0]) - int(start[0])) % 2**30 + (int(end[1]) - int(start[1])) * 1e-9)


def read_timings(stamps) -> dict:
    """{prefill_s, decode_s} from a timed program's [start, first token] stamps (read once
    its output is ready), or {} for an untimed run."""
    if stamps is None:
        return {}
    end = _host_clock()
    stamps = np.asarray(stamps)
    return dict(prefill_s=_seconds_between(stamps[0], stamps[1]),
                decode_s=_seconds_between(stamps[1], end))


@functools.partial(
    jax.jit,
    static_argnames=("capacity", "sampler", "pad_id", "stream", "timed", "logprobs",
                     "continued"),
    donate_argnames=("cache",),
)
def _program(model, tokens, lengths, cache, key, stop, stream_id, limit, *, capacity, sampler,
             pad_id, stream, timed, logprobs=False, continued=False, rows=None):
    """`generate_padded` producing `limit` tokens a row (traced) into buffers of `capacity`
    columns (`output_capacity`), optionally with two host timestamps read from inside the program:
    the prefill waits on the first, the second waits on the first tokens and the decode loop
    on it (data dependencies both ways, so no ordered effect is needed), and compile and
    dispatch time are excluded. `continued`: the prompts follow the cache's contents (see
    `_prefill`)."""
    row_keys = sampling.row_keys(key, tokens.shape[0])
    clock = jax.ShapeDtypeStruct((2,), jnp.int32)
    stamps = None
    if timed:
        start = io_callback(_host_clock, clock)
        tokens = after_clock(start, tokens)
    first, first_logprob, cache = _prefill(model, tokens, lengths, cache, row_keys, sampler,
                                           logprobs, continued)
    if timed:
        # (on the first tokens' largest: one scalar however the rows are laid out; the rows
        # themselves, dp-sharded, were gathered whole for the callback, which XLA warned of)
        stamps = jnp.stack([start, io_callback(_host_clock, clock, jnp.max(first))])
        # The decode loop waits on that stamp too: with nothing depending on it, the GPU
        # runtime ran the callback after the loop (decode_s was then ~0, prefill_s the total).
        first = after_clock(stamps[1], first)
    result = _decode(model, first, cache, row_keys, stop, max_new_tokens=capacity,
                     sampler=sampler, pad_id=pad_id, stream=stream,
                     stream_args=() if stream_id is None else (stream_id,),
                     first_logprob_B=first_logprob, limit=limit, rows=rows)
    return result, stamps


@parallel.runs_on_model_mesh(lambda a: a["model"].mesh)
def generate(
    model: Model,
    prompts: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    *,
    max_new_tokens: int,
    sampler: Greedy | Sampler | None = None,
    key: jax.Array | None = None,
    stop_tokens=(),
    pad_id: int = 0,
    max_len: int | None = None,
    stream: Callable | None = None,
    return_timings: bool = False,
    return_logprobs: bool = False,
    compile_only: bool = False,
) -> GenerateResult | jax.stages.Compiled:
    """Generates continuations of ragged prompts with one compiled program.

    Args:
      model: a Model from `load_pretrained` or `init_model`.
      prompts: a list of token-id lists (lengths may differ; none empty), or a [batch, length]
        integer array whose rows are whole prompts.
      max_new_tokens: tokens to produce per row (>= 1); the longest prompt and its new
        tokens must fit in the model's positions (its context length).
      sampler: Greedy() when None, or Sampler(temperature=..., top_k=..., top_p=..., min_p=...).
      key: one PRNG key for sampling, `jax.random.key(seed)` or `jax.random.PRNGKey(seed)`
        (default PRNGKey(0)); rows draw independent randomness from it.
      stop_tokens: ids that end a row (the stop token is kept): one id or a list shared by
        all rows, or one list per row (a [batch, M] array too, padded with -1 where rows
        have fewer ids).
      pad_id: written after a row stops.
      max_len: cache capacity, at least the longest prompt + max_new_tokens - 1 (the last
        new token is never fed back) (default: the prompt bucket + max_new_tokens, rounded up
        to a multiple of 8). The program depends on max_len, not on max_new_tokens: with max_len
        given, every max_new_tokens it has room for runs one compiled program.
      stream: host function called after each step with (step, tokens[B], active[B]) (numpy
        arrays; the first call, step 0, gets the prefill's tokens): a row's new token, and
        whether the row produced it (a row that stopped gets pad_id and False). The program
        carries a number standing for it, not the function: a new function in every call
        (a closure over one request's state) does not recompile. With several processes it
        runs in the one holding the mesh's first device. An exception it raises is raised by
        `generate` (the tokens are lost); on one device it ends the program at once, on a
        multi-device mesh the program first runs its remaining steps, unstreamed.
      return_timings: also measure prefill and decode seconds (compile excluded).
      return_logprobs: also return each token's log-probability under the model
        (`result.logprobs`; see `token_logprobs`).
      compile_only: compile the program for these prompts' shapes and these settings, run
        nothing and return the compiled program (a `jax.stages.Compiled`: its `as_text()`,
        `cost_analysis()`, `memory_analysis()`); a later call with the same shapes and
        settings starts at once. The model may be `jaxdec.abstract_model(config, ...)`
        (shapes only), so programs can compile before the weights exist, several at a time in
        threads.
    Returns:
      GenerateResult with tokens [B, max_new_tokens] and lengths [B] (with compile_only, the
      compiled program).
    """
    check_untraced("jaxdec.generate", model=model, prompts=prompts, key=key)
    sampler = check_sampler(sampler)
    key = check_key(key)
    max_new_tokens, pad_id, max_len = python_ints(max_new_tokens=max_new_tokens, pad_id=pad_id,
                                                  max_len=max_len)
    check_compile_only(compile_only, model=model)
    return_timings = check_bool("return_timings", return_timings)
    return_logprobs = check_bool("return_logprobs", return_logprobs)
    if stream is not None and not callable(stream):
        raise TypeError("stream must be callable")
    batch = prepare_batch(model, prompts, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                          pad_id=pad_id, max_len=max_len)
    cache = init_cache(model.config, batch.tokens.shape[0], batch.max_len,
                       dtype=param_dtype(model), mesh=model.mesh, abstract=compile_only)
    key = parallel.onto_mesh(jax.random.key(0) if key is None else key, model.mesh)
    with registered_stream(stream, batch, devices=model.mesh.size) as (dispatch, stream_id):
        args = (model, batch.tokens, batch.lengths, cache, key, batch.stop, stream_id,
                np.int32(max_new_tokens))
        settings = dict(capacity=output_capacity(batch, max_new_tokens), sampler=sampler,
                        pad_id=pad_id, stream=dispatch, timed=return_timings,
                        logprobs=return_logprobs, rows=np.int32(batch.size))
        if compile_only:
            return _program.lower(*args, **settings).compile()
        (outputs, _), stamps = _program(*args, **settings)
        outputs = jax.block_until_ready(outputs)
    rows = (slice(0, batch.size), slice(0, max_new_tokens))
    return GenerateResult(
        tokens=parallel.to_host(outputs[0])[rows], lengths=parallel.to_host(outputs[1])[rows[0]],
        logprobs=parallel.to_host(outputs[2])[rows] if return_logprobs else None,
        **read_timings(stamps))


def output_capacity(batch: "Batch", max_new_tokens: int, prompt_width: int | None = None) -> int:
    """The output buffers' columns for a program over `batch`'s cache and prompts of
    `prompt_width` slots (default: the batch's bucket): as many tokens as the cache has room
    for after the shortest prompt this width serves, so the program does not depend on
    `max_new_tokens` (the loop's bound is traced): every `max_new_tokens` the cache has room
    for fits (`prepare_batch` checked the room for the longest prompt)."""
    width = batch.tokens.shape[1] if prompt_width is None else prompt_width
    return max(max_new_tokens, batch.max_len - shortest_for_width(width) + 1)


def shortest_for_width(width: int) -> int:
    """The shortest prompt whose block is `width` slots wide: the least n whose bucket is at
    least `width` (a width capped at max_len serves the prompts of the bucket past it)."""
    lo, hi = 1, max(1, width)
    while lo < hi:  # bucket_length grows with n
        mid = (lo + hi) // 2
        if bucket_length(mid) >= width:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclasses.dataclass(frozen=True)
class Batch:
    """Validated prompts ready for a compiled program: tokens [B', T] right-padded to a bucket,
    lengths [B'], stop ids [B', M] (-1 padded); B' is the batch padded to a multiple of the
    mesh's dp with copies of the first row, `size` the real batch."""

    tokens: np.ndarray
    lengths: np.ndarray
    stop: np.ndarray
    size: int
    max_len: int


# The host functions of the calls streaming now, by a number the compiled program carries
# (a traced int32), so the program is the same for every function.
_STREAMS: dict[int, Callable] = {}
_STREAM_IDS = itertools.count(1)


def _call_stream(stream_id, *args) -> None:
    # jax.debug.callback hands over jax Arrays; the user's function gets numpy arrays, so its
    # own array operations neither dispatch to a device nor compile.
    _STREAMS[int(stream_id)](*(np.asarray(x) for x in args))


class _StreamRaised(Exception):
    """Stands in, inside jax's callback machinery, for what the user's stream raised."""


def _not_stream_raised(record) -> bool:
    # jax logs a failed callback with its traceback; the caller gets the exception itself.
    return not (record.exc_info and isinstance(record.exc_info[1], _StreamRaised))


@contextlib.contextmanager
def registered_stream(stream: Callable | None, batch: Batch, *, devices: int):
    """For one call: (the program's static host function, the traced number it is called
    with), or (None, None) without a stream. The user's `stream` sees the caller's rows only
    (not the rows `prepare_batch` adds to fill the mesh's dp axis); it is forgotten when the
    call ends.

    An exception the stream raises reaches the caller as itself (jax would turn it into a
    runtime error of its own). On one device it ends the program there and then; on a mesh
    of `devices` > 1 the program runs to its end with the stream silent, and the exception
    is raised then: a callback failing on one device leaves the others waiting in a
    collective, and the process is aborted (seen with jax 0.10.2's CPU devices). A stream
    with a `call_finished()` method has it called once the call's steps were all delivered
    (`TextStream` then knows the next call's steps count from 0 again, whatever order a
    mesh delivers them in). The stream runs in the caller's context variables
    (`contextvars`: a server's request-scoped state), though on a thread of the runtime's,
    not the caller's (a `threading.local` is not there); it must not itself run jax
    computations (jaxdec's calls among them): with several threads' calls, the runtime's
    threads may all be waiting for each other."""
    if stream is None:
        yield None, None
        return
    stream_id = next(_STREAM_IDS) % (2**31 - 1)
    size = batch.size
    raised: list[BaseException] = []
    context = contextvars.copy_context()

    def call(step, *rows):
        if raised:
            return
        try:
            context.copy().run(stream, step, *(x[:size] for x in rows))
        except BaseException as error:  # (KeyboardInterrupt to cancel, too)
            raised.append(error)
            if devices == 1:
                raise _StreamRaised from None

    _STREAMS[stream_id] = call
    # (kept: removed at a call's end, it went while other threads' calls still needed it)
    logging.getLogger("jax._src.debugging").addFilter(_not_stream_raised)
    try:
        yield _call_stream, np.int32(stream_id)
    except Exception:
        if raised:
            raise raised[0] from None
        raise
    finally:
        del _STREAMS[stream_id]
    if raised:
        raise raised[0]
    finished = getattr(stream, "call_finished", None)
    if callable(finished):  # every step of this call was delivered (a TextStream's cue)
        finished()


def prepare_batch(model: Model, prompts, *, max_new_tokens: int, stop_tokens, pad_id: int,
                  max_len: int | None, extra_slots: int = 0) -> Batch:
    """Validates everything before tracing and lays the prompts out.

    The cache needs (longest prompt + max_new_tokens - 1) slots; by default it gets the
    prompt bucket + max_new_tokens + `extra_slots` (room a speculative tree writes ahead),
    rounded up to a multiple of `CACHE_SLOT_MULTIPLE`.
    """
    check_model(model)
    config = model.config
    # An unavailable kernel is refused before tracing.
    check_attention(model)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    _check_pad_id(pad_id)
    prompts = _check_prompts(prompts, config.vocab_size)
    longest = max(len(p) for p in prompts)
    needed = longest + max_new_tokens
    if needed > config.max_positions:
        raise ValueError(
            f"the longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) = {needed} "
            f"exceeds the model's {config.max_positions} positions "
            f"({config.describe_max_positions()})"
        )
    bucket = bucket_length(longest)
    if max_len is None:
        max_len = bucket + max_new_tokens + extra_slots
        max_len = -(-max_len // CACHE_SLOT_MULTIPLE) * CACHE_SLOT_MULTIPLE
    elif isinstance(max_len, bool) or not isinstance(max_len, int):
        raise TypeError(f"max_len must be an int, got {max_len!r}")
    elif max_len < needed - 1:
        raise ValueError(
            f"max_len={max_len!r} is too small: the longest prompt ({longest}) + max_new_tokens "
            f"({max_new_tokens}) needs {needed - 1} cache slots"
        )
    bucket = min(bucket, max_len)
    stop = _check_stop_tokens(stop_tokens, len(prompts), config.vocab_size)
    size = len(prompts)
    dp = parallel.dp_size(model.mesh)
    padded = -(-size // dp) * dp
    rows = prompts + [prompts[0]] * (padded - size)
    tokens = np.zeros((padded, bucket), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return Batch(tokens=tokens, lengths=np.array([len(r) for r in rows], np.int32),
                 stop=np.concatenate([stop, np.repeat(stop[:1], padded - size, axis=0)]),
                 size=size, max_len=max_len)

