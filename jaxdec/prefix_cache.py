"""One conversation's caches kept between calls (`PrefixCache`): a prompt that begins with what
the cache holds prefills only the rest, with plain or speculative decoding."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec import parallel
from jaxdec.cache import init_cache
from jaxdec.checks import check_bool, check_model
from jaxdec.drafters.base import Drafter, check_drafter
from jaxdec.generate import (GenerateResult, _program, bucket_length, output_capacity,
                             prepare_batch, python_ints, read_timings, registered_stream)
from jaxdec.model import Model, param_dtype
from jaxdec.sampling import Greedy, Sampler, check_key, check_sampler
from jaxdec.speculative import SpeculativeResult, spec_result
from jaxdec.speculative import _program as _spec_program
from jaxdec.tree import Topology, as_topology
from jaxdec.verify import check_proposal


class PrefixCache:
    """One conversation's KV cache, kept between `generate` calls: a prompt that begins with
    what the cache holds (the previous prompt and its output, as a chat's next turn does, or
    a document asked about again) prefills only the rest.

        session = jaxdec.PrefixCache(model, max_len=4096)
        first = session.generate(prompt, max_new_tokens=128)
        again = session.generate(prompt + first.to_lists()[0] + more, max_new_tokens=128)

    Each call returns what `jaxdec.generate(model, [prompt], ...)` returns for the same
    arguments (greedy: the same tokens; the same key: the same samples). The cache keeps the
    longest common beginning of the new prompt and the tokens it holds (at most all but the
    prompt's last token, whose logits the first new token needs); the rest is prefilled on
    top (a prompt that shares nothing is prefilled whole, as `generate` does). The cache has
    `max_len` slots: a prompt and its new tokens must fit in them. One row; the model's mesh
    may be tensor-parallel, not data-parallel.

    With a `drafter` (`jaxdec.drafters.DraftModel`, `PromptLookup`, `Retrieval` or your own)
    each call decodes speculatively and returns what `jaxdec.speculative_generate(model,
    drafter, [prompt], tree=tree, max_len=max_len, ...)` returns (a `SpeculativeResult`;
    greedy: `generate`'s tokens); a draft model keeps its own cache between calls too
    (`Drafter.resume`).

    Attributes:
      tokens: the token ids the cache holds, in order (the last call's prompt and its output
        but the last token, which was never fed back).
    """

    def __init__(self, model: Model, max_len: int, *, drafter: Drafter | None = None,
                 tree: Topology | None = None):
        check_model(model)
        if parallel.dp_size(model.mesh) != 1:
            raise ValueError("PrefixCache keeps one row: the model's mesh must have dp = 1")
        max_len, = python_ints(max_len)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
        if max_len > model.config.max_positions:
            raise ValueError(f"max_len={max_len} exceeds the model's {model.config.max_positions} "
                             f"positions ({model.config.describe_max_positions()})")
        check_drafter(drafter, optional=True)
        if drafter is None and tree is not None:
            raise ValueError("tree is the shape of a drafter's proposals: it needs a drafter")
        self.model, self.max_len = model, max_len
        self.drafter = None if drafter is None else drafter.prepare(model)
        self.topology = None if drafter is None else (
            drafter.default_topology() if tree is None else as_topology(tree))
        self.tokens: list[int] = []
        self._reset()

    def _reset(self) -> None:
        """An empty cache (and no drafter state): the next call prefills its prompt whole."""
        self.cache = init_cache(self.model.config, 1, self.max_len,
                                dtype=param_dtype(self.model), mesh=self.model.mesh)
        self.tokens = []
        self._drafter_state, self._drafter_held = None, None

    def generate(self, prompt: Sequence[int], *, max_new_tokens: int,
                 sampler: Greedy | Sampler | None = None, key: jax.Array | None = None,
                 stop_tokens=(), pad_id: int = 0, stream: Callable | None = None,
                 return_timings: bool = False, return_logprobs: bool = False,
                 profile: bool = False) -> GenerateResult | SpeculativeResult:
        """`jaxdec.generate(model, [prompt], ...)` (with a drafter, `speculative_generate`),
        prefilling only what the cache lacks (see the class). `prompt` is one list of token
        ids; `profile` (speculative only) times drafting and verifying as
        `speculative_generate` does."""
        sampler = check_sampler(sampler)
        key = check_key(key)
        max_new_tokens, pad_id = python_ints(max_new_tokens, pad_id)
        return_timings = check_bool("return_timings", return_timings)
        return_logprobs = check_bool("return_logprobs", return_logprobs)
        profile = check_bool("profile", profile)
        if profile and self.drafter is None:
            raise ValueError("profile times a drafter's steps: this PrefixCache has no drafter")
        if stream is not None and not callable(stream):
            raise TypeError("stream must be callable")
        if isinstance(prompt, jax.Array):
            prompt = np.asarray(prompt)
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, (Sequence, np.ndarray)) \
                or any(isinstance(t, (Sequence, np.ndarray)) for t in prompt):
            raise TypeError("prompt must be one list of token ids (PrefixCache keeps one row), "
                            f"got {type(prompt).__name__}: {str(prompt)[:40]}")
        if self.drafter is not None:
            check_proposal(self.drafter.proposal_kind(sampler, self.topology), self.topology)
        batch = prepare_batch(self.model, [prompt], max_new_tokens=max_new_tokens,
                              stop_tokens=stop_tokens, pad_id=pad_id, max_len=self.max_len)
        ids = batch.tokens[0, : batch.lengths[0]].tolist()
        # The prompt's last token is fed anew (its logits give the first new token); a draft
        # model's cache may hold fewer tokens than the target's.
        reusable = len(ids) - 1
        if self._drafter_held is not None:
            reusable = min(reusable, self._drafter_held)
        kept = 0
        for cached, new in zip(self.tokens[:reusable], ids):
            if cached != new:
                break
            kept += 1
        rest = ids[kept:]
        # prepare_batch checked len(ids) + max_new_tokens - 1 <= max_len: the rest fits.
        width = min(bucket_length(len(rest)), self.max_len - kept)
        tokens = np.zeros((1, width), np.int32)
        tokens[0, : len(rest)] = rest
        cache = self.cache.replace(lengths=jnp.full((1,), kept, jnp.int32))
        drafter_state = self._drafter_state
        # Until the call returns: the caches are donated to it.
        self.tokens, self._drafter_state, self._drafter_held = [], None, None
        key = jax.random.key(0) if key is None else key
        # The session's programs depend on the suffix's width, not on max_new_tokens.
        limit, capacity = np.int32(max_new_tokens), output_capacity(batch, max_new_tokens, width)
        try:
            with registered_stream(stream, batch) as (dispatch, stream_id):
                if self.drafter is None:
                    ((outputs, cache), stamps) = _program(
                        self.model, tokens, np.array([len(rest)], np.int32), cache, key,
                        batch.stop, stream_id, limit, capacity=capacity, sampler=sampler,
                        pad_id=pad_id, stream=dispatch, timed=return_timings,
                        logprobs=return_logprobs, continued=kept > 0)
                else:
                    prompts = (batch.tokens, batch.lengths) if kept else None
                    outputs, stats, cache, drafter_state, stamps = _spec_program(
                        self.model, self.drafter, tokens, np.array([len(rest)], np.int32),
                        cache, key, batch.stop, limit, stream_id, prompts,
                        drafter_state if kept else None, capacity=capacity, sampler=sampler,
                        topology=self.topology, pad_id=pad_id, stream=dispatch,
                        timed=return_timings, profile=profile, logprobs=return_logprobs)
                outputs = jax.block_until_ready(outputs)
        except BaseException:  # the donated caches may be gone: start the next call afresh
            self._reset()
            raise
        self.cache = cache
        produced, n = np.asarray(outputs[0])[0], int(np.asarray(outputs[1])[0])
        # The cache holds the prompt and every new token but the last.
        held = int(np.asarray(cache.lengths)[0])
        self.tokens = (ids + produced[:n].tolist())[:held]
        if self.drafter is not None:
            drafter_held = self.drafter.held_length(drafter_state)
            if drafter_held is not None:
                self._drafter_state = drafter_state
                self._drafter_held = int(np.asarray(drafter_held)[0])
            return spec_result(outputs, stats, stamps, rows=1, columns=max_new_tokens,
                               profile=profile)
        return GenerateResult(tokens=np.asarray(outputs[0])[:, :max_new_tokens],
                              lengths=np.asarray(outputs[1]),
                              logprobs=np.asarray(outputs[2])[:, :max_new_tokens]
                              if return_logprobs else None,
                              **read_timings(stamps))
