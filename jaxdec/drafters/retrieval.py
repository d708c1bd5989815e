"""`Retrieval`: training-free drafts from a token datastore built from your own corpus.

The datastore is one token stream (documents separated by the end-of-text token) plus its
suffix order (positions sorted by their next `max_ngram` tokens), built on the host. Each
step the row's last n tokens (longest first) are found by binary search, and the
continuations of up to `num_candidates` occurrences, spread over all of them so frequent
continuations are picked more often, are merged into one tree by shared prefix.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxdec.drafters.base import (History, LookupDrafter, PlacedCopies, Proposal,
                                  lookup_settings)
from jaxdec.parallel import put_on_mesh
from jaxdec.tree import Topology, from_candidates
from jaxdec.verify import ProposalKind


class Retrieval(LookupDrafter):
    """Args:
      tokens: the datastore, a 1-D array of token ids (see `from_texts`, `from_directory`).
      max_ngram, min_ngram: the context n-gram lengths looked up, longest first.
      depth: tokens per candidate continuation.
      num_candidates: occurrences whose continuations are merged into the tree.

    depth and num_candidates shape the default tree (`default_topology`); a `tree=` given
    to the call replaces it: the candidates then fill its nodes, as deep as it goes.
    The settings are fixed once made (a new drafter changes one).

    The datastore is copied onto a target's devices by the first `speculative_generate` on
    its mesh and kept there for the calls after it (those of the two meshes used last).
    """

    def __init__(self, tokens, *, max_ngram: int = 4, min_ngram: int = 1, depth: int = 6,
                 num_candidates: int = 4, _suffixes=None, _max_id: int | None = None):
        # `_suffixes` (and `_max_id`, the largest id) are given only when the suffix order is
        # already built (see `prepare`).
        self._set_settings(lookup_settings(max_ngram, min_ngram, depth, num_candidates))
        if _suffixes is None:  # built on the host from a token stream
            stream = np.asarray(tokens)
            if stream.ndim != 1 or stream.size < 2 or not np.issubdtype(stream.dtype, np.integer):
                raise ValueError("the datastore must be a 1-D integer token stream of >= 2 tokens")
            if stream.min() < 0:
                raise ValueError("datastore token ids must be >= 0")
            _max_id = int(stream.max())
            # A -1 sentinel tail, so reading past the end never matches a token.
            padded = np.concatenate([stream.astype(np.int32),
                                     np.full(self.max_ngram + self.depth, -1, np.int32)])
            _suffixes = _suffix_order(padded, stream.size, self.max_ngram)
            tokens = padded
        self.tokens = tokens
        self.suffixes = _suffixes
        self._max_id = _max_id
        self._placed = PlacedCopies()  # mesh -> this datastore on its devices

    @classmethod
    def from_texts(cls, texts, tokenizer, *, cache_dir: str | os.PathLike | None = None,
                   **kwargs) -> "Retrieval":
        """A datastore of `texts` encoded with `tokenizer` (end-of-text between documents).

        With `cache_dir`, the encoded stream and its suffix order are kept there (in a folder
        named by a digest of the texts, the tokenizer and the settings they depend on) and
        read back by a later call with the same ones, instead of encoding and sorting again
        (the CLI keeps them under `$JAXDEC_HOME/retrieval`)."""
        from tokenizers import Tokenizer

        from jaxdec import data

        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be a list of documents (strings), got one string: "
                            "wrap it in a list")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of documents (strings)")
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError("tokenizer must be a tokenizers.Tokenizer (the target's: "
                            f"model.tokenizer), got {type(tokenizer).__name__}")
        # The settings before the encoding (minutes on a large corpus).
        try:
            settings = inspect.signature(cls).bind(None, **kwargs)
        except TypeError as e:
            raise TypeError(f"Retrieval.from_texts: {e}") from None
        settings.apply_defaults()
        lookup_settings(*(settings.arguments[name] for name in (
            "max_ngram", "min_ngram", "depth", "num_candidates")))
        if cache_dir is None:
            return cls(_encoded(texts, tokenizer), **kwargs)
        width, tail = settings.arguments["max_ngram"], settings.arguments["depth"]
        digest = data.texts_digest(texts, hashlib.sha256(
            f"{CACHE_FORMAT} {width} {tail} ".encode() + tokenizer.to_str().encode("utf-8")))
        folder = os.path.join(os.fspath(cache_dir), digest.hexdigest()[:32])
        cached = _read_cached(folder)
        if cached is not None:
            return cls(cached["tokens"], _suffixes=cached["suffixes"],
                       _max_id=cached["max_id"], **kwargs)
        drafter = cls(_encoded(texts, tokenizer), **kwargs)
        _write_cached(folder, drafter)
        return drafter

    @classmethod
    def from_directory(cls, path, tokenizer, **kwargs) -> "Retrieval":
        """A datastore of every readable text file under `path` (`.py` files of the standard
        library when path is None); `kwargs` as `from_texts` takes them."""
        from jaxdec import data

        _, texts = data.read_texts(None if path is None else os.fspath(path))
        return cls.from_texts(list(texts.values()), tokenizer, **kwargs)

    @property
    def size(self) -> int:
        return int(self.suffixes.shape[0])

    def __repr__(self) -> str:
        return (f"Retrieval(<{self.size:,} tokens>, max_ngram={self.max_ngram}, "
                f"min_ngram={self.min_ngram}, depth={self.depth}, "
                f"num_candidates={self.num_candidates})")

    def prepare(self, target) -> "Retrieval":
        """Checks the ids against the target and copies the datastore onto its mesh, once
        per mesh (later calls get the same copy; a copy already there is not copied again).
        A datastore of shapes only (`jax.ShapeDtypeStruct` leaves: programs compiled ahead
        with `compile_only=True`) is given the mesh's replicated sharding."""
        replicated = NamedSharding(target.mesh, PartitionSpec())
        if isinstance(self.tokens, jax.ShapeDtypeStruct):
            return jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), self)
        max_id = self._max_id
        if max_id is None:  # a datastore rebuilt from its leaves
            max_id = int(np.max(np.asarray(self.tokens)))
        if max_id >= target.config.vocab_size:
            raise ValueError(
                f"the datastore has token ids >= the target's vocabulary size "
                f"{target.config.vocab_size}: was it encoded with the target's tokenizer?"
            )
        placed = self._placed.get(target.mesh)
        if placed is None:
            placed = Retrieval(put_on_mesh(self.tokens, replicated), max_ngram=self.max_ngram,
                               min_ngram=self.min_ngram, depth=self.depth,
                               num_candidates=self.num_candidates,
                               _suffixes=put_on_mesh(self.suffixes, replicated),
                               _max_id=max_id)
            self._placed[target.mesh] = placed
        return placed

    def init(self, tokens_BT, prompt_lengths_B, *, max_len: int) -> History:
        return History.from_prompts(tokens_BT, prompt_lengths_B, max_len + 1)

    def propose(self, history: History, root_B, lengths_B, key, *, topology: Topology, sampler):
        del lengths_B, key, sampler
        B = root_B.shape[0]
        # Every n-gram's range [first suffix >= it, first suffix > it), all in one search.
        ngrams = range(self.max_ngram, self.min_ngram - 1, -1)
        queries = jnp.stack([jnp.pad(history.last(n), ((0, 0), (0, self.max_ngram - n)))
                             for n in ngrams])  # [Q, B, max_ngram]
        widths = jnp.array(list(ngrams), jnp.int32)
        bounds = _search(self.tokens, self.suffixes, jnp.concatenate([queries, queries]),
                         jnp.concatenate([widths, widths]),
                         strict=jnp.arange(2 * len(widths), dtype=jnp.int32) >= len(widths))
        lo = jnp.zeros((B,), jnp.int32)
        hi = jnp.zeros((B,), jnp.int32)
        n_used = jnp.zeros((B,), jnp.int32)
        for i, n in enumerate(ngrams):  # the longest n-gram that occurs wins
            lo_n, hi_n = bounds[i], bounds[len(widths) + i]
            # An occurrence that ends the datastore has nothing to draft: left out, so a
            # shorter n-gram with a continuation is tried instead. It is the suffix at
            # size - n, first in its range (the sentinel sorts first) or, for the longest
            # n-gram (ties ordered by position), last.
            nonempty = hi_n > lo_n
            ending = self.size - n
            drop_lo = nonempty & (jnp.take(self.suffixes, jnp.clip(lo_n, 0, self.size - 1))
                                  == ending)
            drop_hi = nonempty & ~drop_lo & (
                jnp.take(self.suffixes, jnp.clip(hi_n - 1, 0, self.size - 1)) == ending)
            lo_n = lo_n + drop_lo.astype(jnp.int32)
            hi_n = hi_n - drop_hi.astype(jnp.int32)
            take = (n_used == 0) & (hi_n > lo_n) & (history.length >= n)
            lo, hi = jnp.where(take, lo_n, lo), jnp.where(take, hi_n, hi)
            n_used = jnp.where(take, n, n_used)
        picks, have = spread_picks(lo, hi - lo, self.num_candidates)
        starts = jnp.take(self.suffixes, jnp.clip(picks, 0, self.size - 1))
        # The continuation follows the matched n-gram: "ends" is the n-gram's last token.
        pos = (starts[:, :, None] + n_used[:, None, None]
               + jnp.arange(topology.max_depth, dtype=jnp.int32)[None, None])
        cand = jnp.take(self.tokens, jnp.minimum(pos, self.tokens.shape[0] - 1))
        valid = have[:, :, None] & (cand >= 0)  # -1: the sentinel tail
        tree = from_candidates(root_B, cand, valid, topology.num_nodes)
        # One candidate's trie is a chain in node order, whatever the node budget.
        return Proposal(tree=tree, q=None, kind=ProposalKind.DETERMINISTIC,
                        chain=self.num_candidates == 1), history

    def update(self, history: History, proposal, verdict, n_commit_B, emitted_BL) -> History:
        del proposal, verdict
        return history.append(emitted_BL, n_commit_B)


CACHE_FORMAT = "jaxdec-retrieval-1"  # names what a cached datastore's files hold


def _encoded(texts, tokenizer) -> np.ndarray:
    from jaxdec import data

    stream = data.encode(tokenizer, texts)
    if stream.size < 2:
        raise ValueError("the retrieval corpus encodes to fewer than 2 tokens")
    return stream


def _read_cached(folder: str) -> dict | None:
    """A datastore `_write_cached` wrote to `folder` (memory-mapped), or None where there is
    none or it is not whole (then it is built again)."""
    try:
        with open(os.path.join(folder, "datastore.json")) as f:
            meta = json.load(f)
        if (not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT
                or not isinstance(meta.get("max_id"), int)):
            return None
        tokens = np.load(os.path.join(folder, "tokens.npy"), mmap_mode="r")
        suffixes = np.load(os.path.join(folder, "suffixes.npy"), mmap_mode="r")
    except (OSError, ValueError, EOFError):  # (EOFError: an empty file)
        return None
    if (tokens.dtype != np.int32 or suffixes.dtype != np.int32 or tokens.ndim != 1
            or suffixes.shape != (meta.get("size"),)):
        return None
    return dict(tokens=tokens, suffixes=suffixes, max_id=meta["max_id"])


def _write_cached(folder: str, drafter: "Retrieval") -> None:
    """Writes the datastore into `folder`, whole or not at all (a folder renamed into place);
    a cache that cannot be written (a read-only disk) is only a slower next call."""
    parent = os.path.dirname(folder)
    staging = None
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
        np.save(os.path.join(staging, "tokens.npy"), np.asarray(drafter.tokens, np.int32))
        np.save(os.path.join(staging, "suffixes.npy"), np.asarray(drafter.suffixes, np.int32))
        with open(os.path.join(staging, "datastore.json"), "w") as f:
            json.dump({"format": CACHE_FORMAT, "size": drafter.size,
                       "max_id": drafter._max_id}, f)
        if os.path.isdir(folder):  # not whole (`_read_cached` read none from it)
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)  # (another process may have written it first)
        staging = None
    except OSError:
        pass
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def spread_picks(lo_B, count_B, C: int):
    """([B, C] suffix indices, [B, C] which are real) of `C` occurrences spread evenly over
    each row's range [lo, lo + count): all of them when count <= C, else the middles of C
    equal parts, floor((2c + 1) count / 2C), computed without overflowing int32 however
    large the datastore."""
    c = jnp.arange(C, dtype=jnp.int32)[None, :]
    count = count_B[:, None]
    whole, part = count // (2 * C), count % (2 * C)  # count = whole * 2C + part
    spread = (2 * c + 1) * whole + ((2 * c + 1) * part) // (2 * C)
    return lo_B[:, None] + jnp.where(count <= C, c, spread), c < count


def _suffix_order(padded: np.ndarray, size: int, width: int) -> np.ndarray:
    """Positions 0..size-1 sorted by their next `width` tokens (lexicographically; equal ones
    by position).

    The tokens (-1 sentinels included, shifted to >= 0) are packed into as few 64-bit keys as
    they fit, the first token in the highest bits: one stable sort of 4 tokens per key where
    ids are at most 65534 (3x faster than a lexsort of one key per token on 25M tokens), two
    keys for larger vocabularies (1.6x).
    """
    bits = int(padded.max() + 1).bit_length()
    per_key = max(1, 64 // bits)
    shifted = (padded + 1).astype(np.uint64)
    keys = []
    for start in range(0, width, per_key):
        key = np.zeros(size, np.uint64)
        for j in range(start, min(start + per_key, width)):
            key = (key << np.uint64(bits)) | shifted[j:j + size]
        keys.append(key)
    if len(keys) == 1:
        return np.argsort(keys[0], kind="stable").astype(np.int32)
    return np.lexsort(keys[::-1]).astype(np.int32)


# Probes per search step: a step narrows the range 8-fold, so a 25M-token datastore takes 9
# steps (one kernel each on a GPU) instead of a binary search's 25.
SEARCH_BRANCHES = 8
# The longest n-gram a search compares token by token (unrolled: one fusion per probe on a
# GPU); beyond it XLA's optimised program grew quadratically (max_ngram=32: 45 s to compile
# on a CPU, 64: 9 minutes), so longer ones compare as one vector.
UNROLLED_WIDTH = 8


def _search(tokens, suffixes, query_QBn, width_Q, *, strict):
    """Per query and row, the first suffix index whose first `width` tokens are >= the query's
    (> where `strict`): Q searches side by side ([Q, B] results).

    Branch-free and unrolled, `SEARCH_BRANCHES`-ary: the count of suffixes below the query
    grows, at each step, by the stride (a power of SEARCH_BRANCHES, largest first) times the
    number of the step's probes (count + j * stride - 1, j = 1..SEARCH_BRANCHES - 1) still
    below it. Each step is element-wise (gathers, compares, selects: one fusion on a GPU, and
    its probes' memory reads overlap), and a device loop is avoided (on a GPU it launches
    each iteration's kernels from the host, one iteration at a time)."""
    Q, B, n = query_QBn.shape
    size = suffixes.shape[0]
    compared = jnp.arange(n, dtype=jnp.int32)[None, :] < width_Q[:, None]  # [Q, n]
    strict = jnp.asarray(strict)[:, None]

    def read(array, index):
        # Indices here are in bounds (clamped; the sentinel tail covers start + j): a plain
        # take's out-of-bounds fill puts a compare and select around every read, and XLA's
        # CPU fusion emitters then took minutes to compile a 1000-token datastore's search.
        return jnp.asarray(array).at[index].get(mode="promise_in_bounds")

    def below(index):  # the suffix at `index` < the query on its width (<= where strict)
        start = read(suffixes, jnp.minimum(index, size - 1))
        # Short n-grams token by token from the last: an earlier difference overrides a
        # later one (no reduction over the n-gram, which would end a fusion). Longer ones as
        # one vector, the first difference found by a reduction.
        if n <= UNROLLED_WIDTH:
            order = jnp.zeros((Q, B), jnp.int32)
            for j in reversed(range(n)):
                diff = jnp.sign(read(tokens, start + j) - query_QBn[..., j])
                order = jnp.where(compared[:, j, None] & (diff != 0), diff, order)
        else:
            diff = jnp.sign(read(tokens, start[..., None]
                                 + jnp.arange(n, dtype=jnp.int32)[None, None])
                            - query_QBn)
            diff = jnp.where(compared[:, None, :], diff, 0)  # [Q, B, n]
            first = jnp.argmax(diff != 0, axis=-1)  # 0 where all are equal, and so is diff
            order = jnp.take_along_axis(diff, first[..., None], axis=-1)[..., 0]
        return (index < size) & jnp.where(strict, order <= 0, order < 0)

    count = jnp.zeros((Q, B), jnp.int32)
    stride = 1
    while stride * SEARCH_BRANCHES <= size:
        stride *= SEARCH_BRANCHES
    while stride:  # the answer lies in [count, count + SEARCH_BRANCHES * stride)
        passed = sum(below(count + j * stride - 1).astype(jnp.int32)
                     for j in range(1, SEARCH_BRANCHES))
        count = count + passed * stride
        stride //= SEARCH_BRANCHES
    return count


def _unflatten(aux, children) -> Retrieval:
    drafter = object.__new__(Retrieval)  # no validation: leaves may be tracers or placeholders
    drafter.tokens, drafter.suffixes = children
    drafter._set_settings(aux)
    drafter._max_id, drafter._placed = None, PlacedCopies()
    return drafter


jax.tree_util.register_pytree_node(
    Retrieval, lambda d: ((d.tokens, d.suffixes), d._settings()), _unflatten)
