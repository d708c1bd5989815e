"""Conversations' caches kept between calls (`PrefixCache`): a prompt that begins with what
its cache holds prefills only the rest, with plain or speculative decoding."""

from __future__ import annotations

import copy
import functools
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import parallel
from jaxdec.cache import init_cache
from jaxdec.checks import check_bool, check_model, check_untraced
from jaxdec.drafters.base import Drafter, check_drafter, prepared
from jaxdec.generate import (GenerateResult, _program, bucket_length, output_capacity,
                             prepare_batch, python_ints, read_timings, registered_stream)
from jaxdec.model import Model, is_abstract, param_dtype
from jaxdec.sampling import Greedy, Sampler, check_key, check_sampler
from jaxdec.speculative import SpeculativeResult, proposal_kind, spec_result
from jaxdec.speculative import _program as _spec_program
from jaxdec.tree import DynamicTree, Topology, as_topology
from jaxdec.verify import check_proposal


def _one_call_at_a_time(method):
    """A session's calls read and replace its cache: a second call while one runs (another
    thread's) is refused, not run against a cache the first one is changing (errors from
    deep inside, a reset session, or another conversation's tokens, silently)."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this PrefixCache is decoding another call: a session decodes one "
                               "call at a time (one session per thread, or wait for the call)")
        try:
            return method(self, *args, **kwargs)
        finally:
            self._busy.release()

    return guarded


class PrefixCache:
    """One conversation's KV cache (or one per row, `rows`), kept between `generate` calls: a
    prompt that begins with what the cache holds (the previous prompt and its output, as a
    chat's next turn does, or a document asked about again) prefills only the rest.

        session = jaxdec.PrefixCache(model, max_len=4096)
        first = session.generate(prompt, max_new_tokens=128)
        again = session.generate(prompt + first.to_lists()[0] + more, max_new_tokens=128)

    Each call returns what `jaxdec.generate(model, [prompt], ...)` returns for the same
    arguments (greedy: the same tokens; the same key: the same samples). The cache keeps the
    longest common beginning of the new prompt and the tokens it holds (at most all but the
    prompt's last token, whose logits the first new token needs); the rest is prefilled on
    top (a prompt that shares nothing is prefilled whole, as `generate` does). The cache has
    `max_len` slots: a prompt and its new tokens but the last (never fed back) must fit in
    them, and the prompt and all its new tokens in the model's positions (as in `generate`).

    With `rows` = R > 1 the session holds R conversations decoded together: each call takes
    R prompts (a list of token-id lists) and returns what `jaxdec.generate(model, prompts,
    ...)` returns, each row keeping what it shares with its own cache. On a mesh with
    data parallelism (dp > 1) the cache holds R rounded up to a multiple of dp rows, as
    `generate` pads its batch: the extra rows prefill one token and decode nothing.

    With a `drafter` (`jaxdec.drafters.DraftModel`, `PromptLookup`, `Retrieval` or your own)
    each call decodes speculatively and returns what `jaxdec.speculative_generate(model,
    drafter, [prompt], tree=tree, max_len=max_len, ...)` returns (a `SpeculativeResult`;
    greedy: `generate`'s tokens); a draft model keeps its own cache between calls too
    (`Drafter.resume`).

    A session decodes one call at a time: a call while another runs (from another thread)
    raises RuntimeError. `copy.deepcopy(session)` (or `copy.copy`) branches the conversation:
    a session of its own caches and record, sharing the model and drafter.

    Attributes:
      tokens: the conversation's token ids, in order (the last completed call's prompt and
        its output but the last token, which was never fed back: what the cache holds); with
        `rows` > 1 one such list a row. A call that fails part way leaves the record and
        empties the caches (the next call prefills its prompt whole).
    """

    @parallel.runs_on_model_mesh(lambda a: a["model"].mesh)
    def __init__(self, model: Model, max_len: int, *, drafter: Drafter | None = None,
                 tree: Topology | DynamicTree | None = None, rows: int = 1):
        check_model(model)
        max_len, rows = python_ints(max_len=max_len, rows=rows)
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be an int >= 1, got {rows!r}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
        if max_len > model.config.max_positions:
            raise ValueError(f"max_len={max_len} exceeds the model's {model.config.max_positions} "
                             f"positions ({model.config.describe_max_positions()})")
        check_drafter(drafter, optional=True)
        for name, value in (("model", model), ("drafter", drafter)):
            if value is not None and is_abstract(value):
                raise ValueError(f"the {name}'s params are shapes only (jaxdec.abstract_model): "
                                 "a PrefixCache runs its calls (compile programs ahead with "
                                 "generate's or speculative_generate's compile_only=True)")
        if drafter is None and tree is not None:
            raise ValueError("tree is the shape of a drafter's proposals: it needs a drafter")
        self.model, self.max_len, self.rows = model, max_len, rows
        # Each data-parallel device holds an equal share of the cache's rows.
        dp = parallel.dp_size(model.mesh)
        self._slots = -(-rows // dp) * dp
        self.drafter = None if drafter is None else prepared(drafter, model)
        self.topology = None if drafter is None else as_topology(
            drafter.default_topology() if tree is None else tree)
        self._busy = threading.Lock()
        self._reset()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_busy"]  # a lock is no state: the copy gets its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._busy = threading.Lock()

    def __deepcopy__(self, memo: dict) -> "PrefixCache":
        """A branch of the conversation: its own caches and record, the same model and
        drafter (a copy of their weights was a whole model's more memory per branch)."""
        for shared in (self.model, self.drafter, self.topology):
            memo[id(shared)] = shared
        branch = object.__new__(type(self))
        memo[id(self)] = branch
        branch.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return branch

    def __copy__(self) -> "PrefixCache":
        """As `copy.deepcopy`: two sessions cannot share caches (each call donates its own;
        the other's next call failed inside XLA on a deleted buffer)."""
        return self.__deepcopy__({})

    def __repr__(self) -> str:
        held = [len(t) for t in self._tokens]
        return (f"PrefixCache(max_len={self.max_len}, rows={self.rows}, "
                f"holding={held[0] if self.rows == 1 else held} tokens, "
                f"drafter={self.drafter!r})")

    @property
    def tokens(self) -> list[int] | list[list[int]]:
        """The conversation so far (a list of ids; with `rows`, one per row): the last
        completed call's prompt and its output but the last token, which is what the cache
        holds. A copy, so a next turn built on it (`prompt = session.tokens; prompt += ...`)
        leaves the record alone. A call that fails part way (a `stream` raising to cancel,
        Ctrl-C) loses the caches it was given: the record stays, and the next call prefills
        its prompt whole."""
        return list(self._record[0]) if self.rows == 1 else [list(t) for t in self._record]

    def _reset(self) -> None:
        """Empty caches (and no drafter state): the next call prefills its prompts whole."""
        self.cache = init_cache(self.model.config, self._slots, self.max_len,
                                dtype=param_dtype(self.model), mesh=self.model.mesh)
        self._tokens: list[list[int]] = [[] for _ in range(self.rows)]  # what the cache holds
        self._record = self._tokens  # (`tokens`)
        self._drafter_state, self._drafter_held = None, None

    def _prompts(self, prompt) -> list:
        """The call's prompts, one per row (checked for shape here; ids by prepare_batch)."""
        if isinstance(prompt, jax.Array):
            prompt = np.asarray(prompt)

        def is_row(p):
            return not isinstance(p, (str, bytes)) and isinstance(p, (Sequence, np.ndarray)) \
                and not any(isinstance(t, (Sequence, np.ndarray)) for t in p)

        if self.rows == 1:
            if not is_row(prompt):
                raise TypeError("prompt must be one list of token ids (this PrefixCache keeps "
                                f"one row), got {type(prompt).__name__}: {str(prompt)[:40]}")
            return [prompt]
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (Sequence, np.ndarray)) \
                or len(prompt) != self.rows or not all(is_row(p) for p in prompt):
            raise TypeError(f"prompts must be {self.rows} lists of token ids (this PrefixCache "
                            f"keeps {self.rows} rows), got {type(prompt).__name__}: "
                            f"{str(prompt)[:40]}")
        return list(prompt)

    @parallel.runs_on_model_mesh(lambda a: a["self"].model.mesh)
    def generate(self, prompt: Sequence[int] | Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampler: Greedy | Sampler | None = None, key: jax.Array | None = None,
                 stop_tokens=(), pad_id: int = 0, stream: Callable | None = None,
                 return_timings: bool = False, return_logprobs: bool = False,
                 profile: bool = False) -> GenerateResult | SpeculativeResult:
        """`jaxdec.generate(model, [prompt], ...)` (with a drafter, `speculative_generate`),
        prefilling only what the cache lacks (see the class). `prompt` is one list of token
        ids (with `rows` > 1, a list of `rows` of them, `generate`'s prompts); `profile`
        (speculative only) times drafting and verifying as `speculative_generate` does."""
        check_untraced("PrefixCache.generate", prompt=prompt, key=key)
        sampler = check_sampler(sampler)
        key = check_key(key)
        max_new_tokens, pad_id = python_ints(max_new_tokens=max_new_tokens, pad_id=pad_id)
        return_timings = check_bool("return_timings", return_timings)
        return_logprobs = check_bool("return_logprobs", return_logprobs)
        profile = check_bool("profile", profile)
        if profile and self.drafter is None:
            raise ValueError("profile times a drafter's steps: this PrefixCache has no drafter")
        if stream is not None and not callable(stream):
            raise TypeError("stream must be callable")
        prompts = self._prompts(prompt)
        if self.drafter is not None:
            check_proposal(proposal_kind(self.drafter, sampler, self.topology), self.topology)
        batch = prepare_batch(self.model, prompts, max_new_tokens=max_new_tokens,
                              stop_tokens=stop_tokens, pad_id=pad_id, max_len=self.max_len)
        if self.drafter is not None:  # (here: its warnings name this method's caller)
            self.drafter.check_reach(int(batch.lengths.max()) + max_new_tokens)
        return self._run(batch, max_new_tokens=max_new_tokens, sampler=sampler, key=key,
                         pad_id=pad_id, stream=stream, return_timings=return_timings,
                         return_logprobs=return_logprobs, profile=profile)

    @_one_call_at_a_time
    def _run(self, batch, *, max_new_tokens, sampler, key, pad_id, stream, return_timings,
             return_logprobs, profile):
        """`generate` on its checked arguments and prepared batch, against the caches."""
        ids = [batch.tokens[b, : batch.lengths[b]].tolist() for b in range(self.rows)]
        kept = [self._kept(b, row) for b, row in enumerate(ids)]
        # The rows filling the cache to the mesh's dp prefill one token afresh and start
        # stopped (the programs' `rows`): they never widen the block or run the loop.
        filler = self._slots - self.rows
        ids, kept = ids + [ids[0][-1:]] * filler, kept + [0] * filler
        # One block of the rows' rest, as wide as `generate`'s prompt block for the longest
        # rest (its bucket, at most max_len), so a session compiles no more programs than
        # `generate` does. A row whose kept tokens leave the block less room prefills more of
        # its prompt again (columns the block computes for every row anyway), so the block's
        # writes stay in the cache.
        longest = max(len(row) - k for row, k in zip(ids, kept))
        width = min(bucket_length(longest), self.max_len)
        kept = [min(k, self.max_len - width) for k in kept]
        tokens = np.zeros((self._slots, width), np.int32)
        for b, (row, k) in enumerate(zip(ids, kept)):
            tokens[b, : len(row) - k] = row[k:]
        rest = np.array([len(row) - k for row, k in zip(ids, kept)], np.int32)
        continued = any(kept)
        cache = self.cache.replace(lengths=jnp.asarray(kept, jnp.int32))
        drafter_state = self._drafter_state
        # Until the call returns: the caches are donated to it.
        self._tokens = [[] for _ in range(self.rows)]
        self._drafter_state, self._drafter_held = None, None
        key = parallel.onto_mesh(jax.random.key(0) if key is None else key, self.model.mesh)
        # The session's programs depend on the rest's width, not on max_new_tokens.
        limit, capacity = np.int32(max_new_tokens), output_capacity(batch, max_new_tokens, width)
        try:
            devices = self.model.mesh.size
            with registered_stream(stream, batch, devices=devices) as (dispatch, stream_id):
                if self.drafter is None:
                    ((outputs, cache), stamps) = _program(
                        self.model, tokens, rest, cache, key, batch.stop, stream_id, limit,
                        capacity=capacity, sampler=sampler, pad_id=pad_id, stream=dispatch,
                        timed=return_timings, logprobs=return_logprobs, continued=continued,
                        rows=np.int32(self.rows))
                else:
                    # The whole prompts the drafter resumes from, max_len wide: one program
                    # whatever the conversation's length (its bucket recompiled it).
                    padded = np.zeros((self._slots, self.max_len), np.int32)
                    for b, row in enumerate(ids):
                        padded[b, :len(row)] = row
                    lengths = np.array([len(row) for row in ids], np.int32)
                    whole = (padded, lengths) if continued else None
                    outputs, stats, cache, drafter_state, stamps = _spec_program(
                        self.model, self.drafter, tokens, rest, cache, key, batch.stop, limit,
                        stream_id, whole, drafter_state if continued else None,
                        capacity=capacity, sampler=sampler, topology=self.topology,
                        pad_id=pad_id, stream=dispatch, timed=return_timings,
                        profile=profile, logprobs=return_logprobs, rows=np.int32(self.rows))
                outputs = jax.block_until_ready(outputs)
        except BaseException:  # the donated caches may be gone: start the next call afresh
            record = self._record
            self._reset()
            self._record = record
            raise
        self.cache = cache
        produced, counts = parallel.to_host(outputs[0]), parallel.to_host(outputs[1])
        # Each cache holds its row's prompt and every new token but the last.
        held = parallel.to_host(cache.lengths)
        self._tokens = [(row + produced[b, :counts[b]].tolist())[:held[b]]
                        for b, row in enumerate(ids[:self.rows])]
        self._record = self._tokens
        if self.drafter is not None:
            drafter_held = self.drafter.held_length(drafter_state)
            if drafter_held is not None:
                held = np.asarray(parallel.to_host(drafter_held))
                if held.shape != (cache.batch_size,) or not np.issubdtype(held.dtype,
                                                                          np.integer):
                    record = self._record
                    self._reset()  # (the next call starts afresh)
                    self._record = record
                    raise TypeError(
                        f"{type(self.drafter).__name__}.held_length must return int [rows] = "
                        f"[{cache.batch_size}] (each row's tokens its state holds), got "
                        f"{held.dtype} {list(held.shape)}")
                self._drafter_state = drafter_state
                self._drafter_held = held.tolist()
            return spec_result(outputs, stats, stamps, rows=self.rows, columns=max_new_tokens,
                               profile=profile)
        columns = (slice(0, self.rows), slice(0, max_new_tokens))
        return GenerateResult(tokens=produced[columns], lengths=counts[:self.rows],
                              logprobs=parallel.to_host(outputs[2])[columns]
                              if return_logprobs else None,
                              **read_timings(stamps))

    def _kept(self, b: int, ids: list[int]) -> int:
        """How many of row b's cached tokens the new prompt `ids` begins with, at most all but
        its last (whose logits give the first new token) and what a draft model's cache holds
        of them."""
        reusable = len(ids) - 1
        if self._drafter_held is not None:
            reusable = min(reusable, self._drafter_held[b])
        kept = 0
        for cached, new in zip(self._tokens[b][:reusable], ids):
            if cached != new:
                break
            kept += 1
        return kept
