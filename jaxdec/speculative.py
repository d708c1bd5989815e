"""Speculative decoding: draft -> verify -> commit, the whole loop one jitted program.

Prefill writes every prompt token but the last into the target's cache; the last prompt token
is the root of the first tree. Each step the drafter proposes a tree per row, the target
runs once over all its nodes (ancestor mask, positions length + depth), `jaxdec.verify`
accepts a path and draws a bonus token, the path is committed to the cache, and the bonus
becomes the next root. Rows stop independently (stop tokens, max_new_tokens); output is
lossless: greedy matches `generate` token for token, sampling follows the target's processed
distribution exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxdec import parallel
from jaxdec.cache import Cache, as_bits, as_floats, carries_bits, commit, init_cache
from jaxdec.checks import check_bool, check_untraced
from jaxdec.drafters.base import Drafter, Proposal, check_drafter, prepared
from jaxdec.generate import (_host_clock, _padding_rows, after_clock, check_compile_only,
                             check_padded_call, on_model_devices,
                             output_capacity, own_arrays, prepare_batch, python_ints, read_timings,
                             registered_stream, token_logprobs)
from jaxdec.model import Model, forward_with_cache, param_dtype
from jaxdec.sampling import Greedy, Sampler, check_key, check_sampler
from jaxdec.tree import DynamicTree, Topology, TokenTree, ancestor_mask, as_topology
from jaxdec.verify import ProposalKind, as_kind, check_proposal, emitted_tokens, verify


@dataclasses.dataclass(frozen=True)
class SpecStats:
    """Statistics of a speculative run (over the real rows, while they were active).

    Attributes:
      steps: loop iterations (target forwards after the prefill).
      tau: mean tokens emitted per verification step and row (accepted drafts + 1; a step
        that max_new_tokens or a stop token cut short counts the tokens it kept).
      acceptance_by_depth: [D] fraction of row-steps that accepted and kept a node at depth
        d = 1..D (a draft that a stop token or max_new_tokens cut off does not count, as in
        tau: tau <= 1 + sum(acceptance_by_depth), equal where no step lost its bonus token).
      row_steps: [B] verification steps per row.
      draft_s, verify_s: seconds spent drafting (`propose`), and verifying with all that
        follows in a step (the target's forward, verification, the cache's commit, the
        drafter's `update`) (None unless profiled).
    """

    steps: int
    tau: float
    acceptance_by_depth: np.ndarray
    row_steps: np.ndarray
    draft_s: float | None = None
    verify_s: float | None = None

    def __post_init__(self):
        own_arrays(self, "acceptance_by_depth", "row_steps")


@dataclasses.dataclass(frozen=True)
class SpeculativeResult:
    """tokens [B, max_new_tokens] (pad_id after a row stops), lengths [B], stats; prefill_s
    and decode_s when timed (compile excluded); logprobs [B, max_new_tokens] float32 when
    asked for: each token's log-probability under the target (`jaxdec.generate.token_logprobs`
    of the target's logits where verification read them; 0 after a row stops)."""

    tokens: np.ndarray
    lengths: np.ndarray
    stats: SpecStats
    prefill_s: float | None = None
    decode_s: float | None = None
    logprobs: np.ndarray | None = None

    def __post_init__(self):
        own_arrays(self, "tokens", "lengths", "logprobs")

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Decode throughput over all rows (every token / decode_s: the prefill here stops
        before the prompts' last tokens, so the first new token is the loop's too; plain
        decoding's prefill makes it: `GenerateResult` counts the tokens after the first);
        None where untimed."""
        if not self.decode_s:
            return None
        return float(np.sum(self.lengths) / self.decode_s)

    def to_lists(self) -> list[list[int]]:
        """Each row's new tokens as a list (up to and with its stop token)."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _State:
    step: jax.Array
    root_B: jax.Array
    cache: Cache
    drafter_state: object
    out_BN: jax.Array
    n_gen_B: jax.Array
    done_B: jax.Array
    row_steps_B: jax.Array
    depth_hits_BD: jax.Array
    seconds: jax.Array  # [2]: drafting, verifying (timed runs)
    logprobs_BN: jax.Array | None  # [B, max_new_tokens] float32, when asked for


def _elapsed(start, end) -> jax.Array:
    whole = ((end[0] - start[0]) % 2**30).astype(jnp.float32)
    return whole + (end[1] - start[1]).astype(jnp.float32) * 1e-9


def _clock(*deps):
    """A host timestamp read once `deps` are computed. The callback is given one scalar of
    each (an array's largest: dp-split rows given whole were gathered onto one device first,
    with an XLA warning at every compile; a cache array's first element is what is passed)."""
    scalars = [jnp.max(d) if d.ndim else d for d in deps]
    return io_callback(_host_clock, jax.ShapeDtypeStruct((2,), jnp.int32), *scalars)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Resume:
    """What a continued run builds on (`jaxdec.PrefixCache`): the target's cache already
    holds each row's first `cache.lengths` prompt tokens, the program's tokens are the rest,
    and the drafter resumes from these (`Drafter.resume`): the whole prompts (tokens [B, T]
    right-padded, lengths [B]) and its state from the last run (None for a drafter that
    rebuilds its state from the prompts)."""

    tokens_BT: jax.Array
    lengths_B: jax.Array
    drafter_state: object = None


@parallel.runs_on_model_mesh(lambda a: a["target"].mesh)
def speculative_padded(
    target: Model,
    drafter: Drafter,
    tokens_BT: jax.Array,
    prompt_lengths_B: jax.Array,
    cache: Cache,
    key: jax.Array | None,
    stop_tokens_BM: jax.Array | None,
    *,
    max_new_tokens: int,
    sampler: Greedy | Sampler | None,
    topology: Topology | DynamicTree,
    pad_id: int = 0,
    stream: Callable | None = None,
    timed: bool = False,
    profile: bool = False,
    stream_args: tuple = (),
    return_logprobs: bool = False,
    resume: Resume | None = None,
    limit: jax.Array | None = None,
    rows: jax.Array | None = None,
):
    """The jittable speculative program on right-padded prompts (see `speculative_generate`).

    `drafter` must already be `prepare`d for the target. `stream`, when given, is called
    after every step as stream(*stream_args, step, tokens, counts) with jax Arrays (see
    `speculative_generate`; under your own jit it is static: a new function recompiles).
    `timed` reads two host timestamps
    (after the start and after the prefill); `profile` also times drafting and verifying in
    every step (a host round trip each: it slows the loop). `return_logprobs` also records
    each token's log-probability under the target. `resume` continues a cache that holds a
    prefix of the prompts: `tokens_BT` / `prompt_lengths_B` are then what follows it (see
    `Resume`). `limit` (traced, at most `max_new_tokens`, the output buffers' static width)
    is the tokens a row produces (None: max_new_tokens): one program serves every limit.
    `rows` (traced; None: all): the real rows, the first ones; the others (copies filling the
    batch to the mesh's dp) start stopped, so they never keep the loop running.
    `stop_tokens_BM`: int32 stop ids per row, padded with -1 (None: no stop tokens). The
    cache (`jaxdec.init_cache`) needs max_len >= T + max_new_tokens - 1; room for the tree
    past that (max_len + its nodes) saves the last steps from drafting into no slots.
    Returns ((tokens, lengths), statistics arrays, cache, the drafter's final state,
    timestamps or None); with `return_logprobs`, (tokens, lengths, logprobs) first.

    Its arguments are checked as `jaxdec.generate_padded`'s (their values too where it is
    called eagerly; `key` may be None for greedy decoding). Called outside jit without a
    stream, it runs one compiled program (compiled once per shapes and static arguments).
    """
    sampler, max_new_tokens, pad_id, key = check_padded_call(
        target, tokens_BT, prompt_lengths_B, cache, key, stop_tokens_BM, sampler=sampler,
        max_new_tokens=max_new_tokens, pad_id=pad_id)
    timed, profile, return_logprobs = (check_bool(name, value) for name, value in (
        ("timed", timed), ("profile", profile), ("return_logprobs", return_logprobs)))
    if stream is not None and not callable(stream):
        raise TypeError("stream must be callable")
    check_drafter(drafter)
    if not isinstance(topology, (Topology, DynamicTree)):
        raise TypeError("topology must be a jaxdec.tree Topology (chain, kary, from_choices) "
                        f"or DynamicTree (dynamic), got {topology!r}")
    check_proposal(proposal_kind(drafter, sampler, topology), topology)
    arrays = (target, drafter, tokens_BT, prompt_lengths_B, cache, key, stop_tokens_BM)
    settings = dict(max_new_tokens=max_new_tokens, sampler=sampler, topology=topology,
                    pad_id=pad_id, stream=stream, timed=timed, profile=profile,
                    stream_args=stream_args, return_logprobs=return_logprobs, resume=resume,
                    limit=limit, rows=rows)
    if stream is not None or any(isinstance(leaf, jax.core.Tracer)
                                 for leaf in jax.tree.leaves((arrays, resume, limit, rows))):
        return _speculative_padded(*arrays, **settings)
    # Called eagerly: one compiled program (op by op, the loop compiled anew in every call).
    del settings["stream"], settings["stream_args"]
    return _speculative_padded_program(*on_model_devices(target.mesh, *arrays), **settings)


def _speculative_padded(target, drafter, tokens_BT, prompt_lengths_B, cache, key,
                        stop_tokens_BM, *, max_new_tokens, sampler, topology, pad_id=0,
                        stream=None, timed=False, profile=False, stream_args=(),
                        return_logprobs=False, resume=None, limit=None, rows=None):
    """`speculative_padded` on checked arguments."""
    B, T = tokens_BT.shape
    N, depth = topology.num_nodes, topology.max_depth
    if limit is None and resume is None and cache.max_len < T + max_new_tokens - 1:
        # (static shapes; past the end, the committed tokens would be lost, not refused)
        raise ValueError(f"the cache's {cache.max_len} slots hold no prompt block of {T} "
                         f"tokens and {max_new_tokens} new tokens: it needs max_len >= "
                         f"{T + max_new_tokens - 1}")
    limit = max_new_tokens if limit is None else limit
    if stop_tokens_BM is None:
        stop_tokens_BM = jnp.full((B, 1), -1, jnp.int32)
    kind = proposal_kind(drafter, sampler, topology)
    # Ordered callbacks exist only on one device; elsewhere the step index tells the order.
    ordered = target.mesh.size == 1
    tokens_BT = tokens_BT.astype(jnp.int32)
    prompt_lengths_B = prompt_lengths_B.astype(jnp.int32)
    stamps = []
    if timed:
        start = _clock()
        tokens_BT = after_clock(start, tokens_BT)
        stamps.append(start)

    start_B = jnp.zeros((B,), jnp.int32) if resume is None else cache.lengths
    positions = start_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    _, _, cache = forward_with_cache(target, tokens_BT, positions, cache.replace(lengths=start_B),
                                     logits_indices_BN=jnp.zeros((B, 1), jnp.int32),
                                     fresh=resume is None, prefill=True)
    cache = cache.replace(lengths=start_B + prompt_lengths_B - 1)
    root = jnp.take_along_axis(tokens_BT, (prompt_lengths_B - 1)[:, None], axis=1)[:, 0]
    if resume is None:
        drafter_state = drafter.init(tokens_BT, prompt_lengths_B, max_len=cache.max_len)
    else:
        drafter_state = drafter.resume(resume.drafter_state, resume.tokens_BT.astype(jnp.int32),
                                       resume.lengths_B.astype(jnp.int32), tokens_BT, start_B,
                                       max_len=cache.max_len)
    _check_carried(drafter, "init" if resume is None else "resume", drafter_state)
    if timed:  # after both prefills: depend on one element of every cache array
        done = [x[(0,) * x.ndim] for x in jax.tree.leaves((cache, drafter_state))
                if getattr(x, "size", 0)]  # (no wait on an empty array or a number)
        stamps.append(_clock(*done))
        root = after_clock(stamps[-1], root)  # the loop waits on it (see generate's _program)

    # On a CPU the loop carries bf16 caches (the target's, a draft model's) as their bits
    # (see `jaxdec.cache.as_bits`).
    bits = parallel.platform(target.mesh) == "cpu"
    # (each handed back as it was given: the caller's own loop's dtype)
    given_bits = carries_bits(cache), carries_bits(drafter_state)
    if bits:
        cache, drafter_state = as_bits((cache, drafter_state))
    state = _State(
        step=jnp.int32(0), root_B=root, cache=cache, drafter_state=drafter_state,
        out_BN=jnp.full((B, max_new_tokens), pad_id, jnp.int32),
        n_gen_B=jnp.zeros((B,), jnp.int32), done_B=_padding_rows(B, rows),
        row_steps_B=jnp.zeros((B,), jnp.int32),
        depth_hits_BD=jnp.zeros((B, depth), jnp.int32), seconds=jnp.zeros((2,), jnp.float32),
        logprobs_BN=jnp.zeros((B, max_new_tokens), jnp.float32) if return_logprobs else None,
    )

    def cond(s: _State):
        return ~jnp.all(s.done_B)

    def body(s: _State):
        step_key = jax.random.fold_in(key, s.step)
        root = s.root_B
        if profile:
            t0 = _clock(root)
            root = after_clock(t0, root)
        proposal, dstate = _checked_proposal(drafter, drafter.propose(
            s.drafter_state, root, s.cache.lengths, jax.random.fold_in(step_key, 0),
            topology=topology, sampler=sampler), s.drafter_state, B, N, kind,
            target.config.vocab_size)
        if not _own_propose(drafter):
            proposal = _normalised_q(_consistent(proposal, topology))
        tree = proposal.tree
        # Nodes past the cache's end are never accepted: near the end the tree is shallower.
        room = s.cache.lengths[:, None] + jnp.arange(N, dtype=jnp.int32)[None, :] < s.cache.max_len
        tree = dataclasses.replace(tree, tokens=tree.tokens.at[:, 0].set(root),
                                   valid=tree.valid & room)
        if profile:
            t1 = _clock(tree.tokens)
            tree = dataclasses.replace(tree, tokens=after_clock(t1, tree.tokens))
        logits, _, written = forward_with_cache(
            target, tree.tokens, tree.positions(s.cache.lengths), s.cache,
            mask_BTT=tree.ancestors)
        verdict = verify(tree, logits, sampler=sampler, key=jax.random.fold_in(step_key, 1),
                         max_depth=depth, kind=kind, q_BNV=proposal.q, topology=topology)
        emitted = emitted_tokens(tree, verdict)  # [B, depth + 1]

        active = ~s.done_B
        index = jnp.arange(depth + 1, dtype=jnp.int32)[None, :]
        is_stop = jnp.any(emitted[:, :, None] == stop_tokens_BM[:, None, :], axis=2)
        is_stop &= index < verdict.n_path[:, None]
        stopped = jnp.any(is_stop, axis=1)
        first_stop = jnp.argmax(is_stop, axis=1).astype(jnp.int32)  # int64 under x64
        keep = jnp.where(stopped, first_stop + 1, verdict.n_path)
        keep = jnp.minimum(keep, limit - s.n_gen_B)
        keep = jnp.where(active, keep, 0)
        if stream is not None:
            new = jnp.where(index < keep[:, None], emitted, pad_id)
            parallel.host_callback(stream, target.mesh, *stream_args, s.step, new, keep,
                                   ordered=ordered)

        slots = s.n_gen_B[:, None] + index
        slots = jnp.where(index < keep[:, None], slots, max_new_tokens)
        rows = jnp.arange(B, dtype=jnp.int32)[:, None]
        out = s.out_BN.at[rows, slots].set(emitted, mode="drop")
        logprobs = s.logprobs_BN
        if logprobs is not None:  # token i follows path node i: the target's logits there
            path_logits = jnp.take_along_axis(logits, verdict.path[:, :, None], axis=1)
            logprobs = logprobs.at[rows, slots].set(token_logprobs(path_logits, emitted),
                                                    mode="drop")
        new_cache = commit(written, verdict.path, keep, prefix=proposal.chain)
        dstate = drafter.update(dstate, proposal, verdict, keep, emitted)
        _check_state(drafter, "update", dstate, s.drafter_state)
        last = jnp.take_along_axis(emitted, jnp.maximum(keep - 1, 0)[:, None], axis=1)[:, 0]
        n_gen = s.n_gen_B + keep
        done = s.done_B | (active & stopped & (keep > 0)) | (n_gen >= limit)
        seconds = s.seconds
        if profile:
            # After the commit and the drafter's update too (the step's whole rest).
            t2 = _clock(emitted, keep, *[x[(0,) * x.ndim]
                                         for x in jax.tree.leaves((new_cache, dstate))
                                         if getattr(x, "size", 0)])  # (see above)
            seconds = seconds + jnp.stack([_elapsed(t0, t1), _elapsed(t1, t2)])
            last = after_clock(t2, last)  # the next step waits on the stamp
        levels = jnp.arange(1, depth + 1, dtype=jnp.int32)
        # Depth d counts where its draft was accepted and kept (emitted token d - 1): as
        # tau, a step that a stop token or max_new_tokens cut short counts what it kept.
        hits = (active[:, None] & (verdict.n_path[:, None] > levels[None, :])
                & (keep[:, None] >= levels[None, :]))
        return _State(
            step=s.step + 1, root_B=jnp.where(keep > 0, last, s.root_B), cache=new_cache,
            drafter_state=dstate, out_BN=out, n_gen_B=n_gen, done_B=done,
            row_steps_B=s.row_steps_B + active.astype(jnp.int32),
            depth_hits_BD=s.depth_hits_BD + hits.astype(jnp.int32),
            seconds=seconds, logprobs_BN=logprobs,
        )

    s = jax.lax.while_loop(cond, body, state)
    stats = dict(steps=s.step, row_steps=s.row_steps_B,
                 depth_hits=s.depth_hits_BD, seconds=s.seconds)
    outputs = (s.out_BN, s.n_gen_B) + (() if s.logprobs_BN is None else (s.logprobs_BN,))
    cache, drafter_state = (
        part if given or not bits else as_floats(part)
        for part, given in zip((s.cache, s.drafter_state), given_bits))
    return outputs, stats, cache, drafter_state, (jnp.stack(stamps) if timed else None)


def _own_propose(drafter) -> bool:
    """Whether the drafter's `propose` is one of jaxdec's (whose trees are consistent by
    construction)."""
    return type(drafter).propose.__module__.startswith("jaxdec.drafters.")


def _consistent(proposal: Proposal, topology) -> Proposal:
    """A proposal from a drafter of your own, its tree's structure made consistent, so that
    verification stays exact whatever the drafter returned: verification reads a node's
    parent, depth (its position) and ancestors (its attention mask), and a commit trusts
    `chain`; only the parents (and `valid`) are taken from the drafter. Sampled children are
    verified on the static topology, whose structure replaces the tree's. Otherwise the
    depth and ancestors are derived from the parents (a node whose parent is not an earlier
    node is invalid: never accepted), and `chain` makes the tree the chain it claims to be."""
    tree = proposal.tree
    B, N = tree.tokens.shape
    index = jnp.arange(N, dtype=jnp.int32)[None, :]
    valid = tree.valid.astype(bool) & (index > 0) | (index == 0)
    if proposal.kind is not ProposalKind.DETERMINISTIC and isinstance(topology, Topology):
        template = topology.template(B)
        tree = dataclasses.replace(template, tokens=tree.tokens, valid=valid)
        return dataclasses.replace(proposal, tree=tree, chain=proposal.chain and topology.is_chain)
    parents = jnp.broadcast_to(index - 1, (B, N)) if proposal.chain else tree.parents
    earlier = (parents >= 0) & (parents < index)
    valid &= earlier | (index == 0)
    parents = jnp.where(earlier, parents, -1)
    ancestors = ancestor_mask(parents, valid)
    depth = jnp.sum(ancestors, axis=2, dtype=jnp.int32) - 1
    tree = TokenTree(tokens=tree.tokens, parents=parents, depth=depth, valid=valid,
                     ancestors=ancestors)
    return dataclasses.replace(proposal, tree=tree)


def _normalised_q(proposal: Proposal) -> Proposal:
    """A drafter of your own's q as distributions (each node's row non-negative, summing to 1
    where anything is drawable): top-k-masked probabilities left unnormalised had nearly every
    draft accepted, far from the target's distribution."""
    if proposal.q is None or proposal.kind is ProposalKind.DETERMINISTIC:
        return proposal
    q = jnp.maximum(proposal.q.astype(jnp.float32), 0.0)
    total = jnp.sum(q, axis=-1, keepdims=True)
    return dataclasses.replace(proposal, q=q / jnp.where(total > 0, total, 1.0))


def proposal_kind(drafter, sampler, topology) -> ProposalKind:
    """`drafter.proposal_kind(sampler, topology)` as a ProposalKind (its value too)."""
    return as_kind(drafter.proposal_kind(sampler, topology),
                   f"{type(drafter).__name__}.proposal_kind()")


def _checked_proposal(drafter, returned, state, B: int, N: int, kind, vocab_size: int):
    """What `drafter.propose` returned, checked while the loop traces: a drafter of your own
    that returns the wrong thing gets an error naming it and what was expected."""
    name = f"{type(drafter).__name__}.propose"
    if not (isinstance(returned, tuple) and len(returned) == 2):
        raise TypeError(f"{name} must return (Proposal, state), got {type(returned).__name__}")
    proposal, new_state = returned
    if not isinstance(proposal, Proposal):
        raise TypeError(f"{name} must return a jaxdec.drafters.Proposal first, got "
                        f"{type(proposal).__name__}")
    if not isinstance(proposal.tree, TokenTree):
        raise TypeError(f"{name}: Proposal.tree must be a jaxdec.tree.TokenTree (from "
                        f"from_candidates, or a topology's template), got "
                        f"{type(proposal.tree).__name__}")
    # (numpy fields, a fixed tree's, as the loop's arrays)
    proposal = dataclasses.replace(proposal, tree=jax.tree.map(jnp.asarray, proposal.tree))
    expected = dict(tokens=(B, N), parents=(B, N), depth=(B, N), valid=(B, N),
                    ancestors=(B, N, N))
    for field, shape in expected.items():
        got = tuple(getattr(proposal.tree, field).shape)
        if got != shape:
            raise ValueError(f"{name}: tree.{field} has shape {got}, expected {shape} "
                             f"({B} rows, the topology's {N} nodes)")
        dtype = getattr(proposal.tree, field).dtype
        masks = field in ("valid", "ancestors")
        if (dtype != jnp.bool_) if masks else not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(f"{name}: tree.{field} is {dtype}, expected "
                            f"{'bool' if masks else 'integers'}")
    returned_kind = as_kind(proposal.kind, f"{name}'s Proposal.kind")
    if returned_kind is not kind:
        raise ValueError(f"{name} returned a {returned_kind} proposal where its proposal_kind "
                         f"said {kind} (verification follows proposal_kind)")
    if kind is not ProposalKind.DETERMINISTIC and (
            proposal.q is None or tuple(proposal.q.shape) != (B, N, vocab_size)):
        raise ValueError(f"{name}: sampled children need q [{B}, {N}, {vocab_size}] (rows, "
                         f"the topology's nodes, the target's vocabulary), got "
                         f"{None if proposal.q is None else tuple(proposal.q.shape)}")
    _check_state(drafter, "propose", new_state, state)
    # Integer ids of any width (jax's default int is int64 with jax_enable_x64) as the
    # loop's int32.
    tree = dataclasses.replace(proposal.tree, tokens=proposal.tree.tokens.astype(jnp.int32),
                               parents=proposal.tree.parents.astype(jnp.int32),
                               depth=proposal.tree.depth.astype(jnp.int32))
    return dataclasses.replace(proposal, tree=tree, kind=returned_kind), new_state


def _check_carried(drafter, method: str, state) -> None:
    """The loop carries a drafter's state: its leaves must be arrays (or numbers)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex)):
            raise TypeError(f"{type(drafter).__name__}.{method} returned a state the loop cannot "
                            f"carry: its leaf {jax.tree_util.keystr(path) or '(the state)'} is "
                            f"a {type(leaf).__name__} (a state's leaves must be arrays)")


def _check_state(drafter, method: str, got, want) -> None:
    """The loop carries a drafter's state: each step's must be shaped like `init`'s."""
    def types(tree):
        return jax.tree.map(lambda x: f"{jnp.result_type(x)}{list(np.shape(x))}", tree)

    if (jax.tree.structure(got) != jax.tree.structure(want)
            or jax.tree.leaves(types(got)) != jax.tree.leaves(types(want))):
        raise TypeError(f"{type(drafter).__name__}.{method} returned a state unlike init's "
                        f"(the loop carries it): {types(got)} vs {types(want)}")


@functools.partial(
    jax.jit,
    static_argnames=("capacity", "sampler", "topology", "pad_id", "stream", "timed",
                     "profile", "logprobs"),
    donate_argnames=("cache", "drafter_state"),
)
def _program(target, drafter, tokens, lengths, cache, key, stop, limit, stream_id=None,
             prompts=None, drafter_state=None, *, capacity, sampler, topology, pad_id, timed,
             profile, stream=None, logprobs=False, rows=None):
    """`speculative_padded` producing `limit` tokens a row (traced) into buffers of
    `capacity` columns (`jaxdec.generate.output_capacity`); given the whole `prompts`
    (tokens, lengths), it resumes from them and `drafter_state` (donated: a draft model's
    cache is updated in place)."""
    resume = None if prompts is None else Resume(*prompts, drafter_state=drafter_state)
    return _speculative_padded(target, drafter, tokens, lengths, cache, key, stop,
                              max_new_tokens=capacity, sampler=sampler, topology=topology,
                              pad_id=pad_id, stream=stream, timed=timed, profile=profile,
                              stream_args=() if stream_id is None else (stream_id,),
                              return_logprobs=logprobs, resume=resume, limit=limit,
                              rows=rows)


_speculative_padded_program = jax.jit(
    _speculative_padded,
    static_argnames=("max_new_tokens", "sampler", "topology", "pad_id", "timed", "profile",
                     "return_logprobs"))


@parallel.runs_on_model_mesh(lambda a: a["target"].mesh)
def speculative_generate(
    target: Model,
    drafter: Drafter,
    prompts,
    *,
    max_new_tokens: int,
    sampler: Greedy | Sampler | None = None,
    key: jax.Array | None = None,
    tree: Topology | DynamicTree | None = None,
    stop_tokens=(),
    pad_id: int = 0,
    max_len: int | None = None,
    stream: Callable | None = None,
    return_timings: bool = False,
    profile: bool = False,
    return_logprobs: bool = False,
    compile_only: bool = False,
) -> SpeculativeResult | jax.stages.Compiled:
    """Generates with speculative decoding; same outputs as `jaxdec.generate` (greedy: the
    same tokens; sampling: the same distribution), fewer target forwards.

    Args:
      target: the Model whose distribution the output follows.
      drafter: `jaxdec.drafters.DraftModel(model)`, `PromptLookup()` or `Retrieval(...)`.
      prompts: a list of token-id lists (ragged), or a [batch, length] integer array.
      max_new_tokens: tokens to produce per row.
      sampler: Greedy() when None, or Sampler(...); verification is lossless for both.
      key: one PRNG key for drafting and verification, as in `generate` (default
        PRNGKey(0)).
      tree: a `jaxdec.tree` topology (chain(k), kary(d, w), from_choices(...)); None lets the
        drafter pick. For PromptLookup / Retrieval it is the node and depth budget.
      stop_tokens: ids that end a row (kept), as in `generate`: shared (one id or a list) or
        per row.
      pad_id: written after a row stops.
      max_len: cache capacity (default: prompt bucket + max_new_tokens + the tree's nodes,
        rounded up to a multiple of 8). As in `generate`, the program depends on max_len, not
        on max_new_tokens.
      stream: host function called after each step with (step, tokens[B, D + 1], counts[B])
        (numpy arrays; D = the tree's depth): row b's new tokens are tokens[b, :counts[b]],
        from 1 to D + 1 a step while the row runs, none once it has stopped (pad_id fills
        the rest). As in `generate`, a new function in every call does not recompile (with
        several processes it runs in the one holding the mesh's first device), and an
        exception it raises is raised here (as `generate` says).
      return_timings: also measure prefill and decode seconds (compile excluded).
      profile: also measure the seconds spent drafting and verifying (stats.draft_s,
        stats.verify_s); this adds a host round trip to every step, so it slows the run.
      return_logprobs: also return each token's log-probability under the target
        (`result.logprobs`), as `generate` does.
      compile_only: compile the program, run nothing and return the compiled program (see
        `generate`); the target and a DraftModel's model may be `jaxdec.abstract_model`s.
    Returns:
      SpeculativeResult with tokens [B, max_new_tokens], lengths [B] and stats (with
      compile_only, the compiled program).
    """
    check_untraced("jaxdec.speculative_generate", target=target, drafter=drafter,
                   prompts=prompts, key=key)
    sampler = check_sampler(sampler)
    key = check_key(key)
    max_new_tokens, pad_id, max_len = python_ints(max_new_tokens=max_new_tokens, pad_id=pad_id,
                                                  max_len=max_len)
    check_drafter(drafter)
    check_compile_only(compile_only, target=target, drafter=drafter)
    return_timings = check_bool("return_timings", return_timings)
    profile = check_bool("profile", profile)
    return_logprobs = check_bool("return_logprobs", return_logprobs)
    if stream is not None and not callable(stream):
        raise TypeError("stream must be callable")
    topology = as_topology(drafter.default_topology() if tree is None else tree)
    kind = proposal_kind(drafter, sampler, topology)
    check_proposal(kind, topology)
    batch = prepare_batch(target, prompts, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                          pad_id=pad_id, max_len=max_len, extra_slots=topology.num_nodes)
    drafter = prepared(drafter, target)
    drafter.check_reach(int(batch.lengths.max()) + max_new_tokens)
    cache = init_cache(target.config, batch.tokens.shape[0], batch.max_len,
                       dtype=param_dtype(target), mesh=target.mesh, abstract=compile_only)
    key = parallel.onto_mesh(jax.random.key(0) if key is None else key, target.mesh)
    with registered_stream(stream, batch, devices=target.mesh.size) as (dispatch, stream_id):
        args = (target, drafter, batch.tokens, batch.lengths, cache, key, batch.stop,
                np.int32(max_new_tokens), stream_id)
        settings = dict(capacity=output_capacity(batch, max_new_tokens), sampler=sampler,
                        topology=topology, pad_id=pad_id, stream=dispatch,
                        timed=return_timings, profile=profile, logprobs=return_logprobs,
                        rows=np.int32(batch.size))
        if compile_only:
            return _program.lower(*args, **settings).compile()
        outputs, stats, _, _, stamps = _program(*args, **settings)
        outputs = jax.block_until_ready(outputs)
    return spec_result(outputs, stats, stamps, rows=batch.size, columns=max_new_tokens,
                       profile=profile)


def spec_result(outputs, stats, stamps, *, rows: int, columns: int,
                profile: bool) -> SpeculativeResult:
    """The SpeculativeResult of the program's outputs, statistics and timestamps (the first
    `rows` rows, the real batch; the first `columns` tokens, max_new_tokens)."""
    rows = slice(0, rows)
    out, n_gen = outputs[:2]
    stats = {name: parallel.to_host(value) for name, value in stats.items()}
    row_steps = stats["row_steps"][rows]
    total_steps = max(int(row_steps.sum()), 1)
    seconds = stats["seconds"]
    spec_stats = SpecStats(
        steps=int(stats["steps"]),
        # Every token a row produced came from one of its steps (those max_new_tokens or a
        # stop token cut short too: their cut tokens are not counted).
        tau=float(parallel.to_host(n_gen)[rows].sum() / total_steps),
        acceptance_by_depth=stats["depth_hits"][rows].sum(axis=0) / total_steps,
        row_steps=row_steps,
        draft_s=float(seconds[0]) if profile else None,
        verify_s=float(seconds[1]) if profile else None,
    )
    return SpeculativeResult(tokens=parallel.to_host(out)[rows, :columns],
                             lengths=parallel.to_host(n_gen)[rows], stats=spec_stats,
                             logprobs=parallel.to_host(outputs[2])[rows, :columns]
                             if len(outputs) > 2 else None,
                             **read_timings(stamps))
