"""Hugging Face checkpoints <-> jaxdec param pytrees, without torch.

`load_pretrained` reads a safetensors directory (one `model.safetensors`, or shards listed in
`model.safetensors.index.json`) into the param pytree: each tensor goes as it is from the
memory-mapped file onto the mesh's devices, where compiled programs cast it to the requested
dtype, transpose and fuse it into our layout and place it with its sharding (a 2.3 GB bf16
checkpoint of Llama layers loads in 2.9-3.1 s on a 2-core CPU, 6.5-7.4 s converted in numpy).
`save_pretrained` converts on the devices too, one tensor at a time (the same 2.3 GB written
in 3-4 s, 14-15 s with numpy; the first call also compiles), into a directory transformers
loads (`config.json`, safetensors, `generation_config.json`, `tokenizer.json` when the
model has a tokenizer and `tokenizer_config.json` with its chat template or special tokens),
written atomically.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxdec import parallel
from jaxdec.chat import (TEMPLATE_FILE, TOKENIZER_CONFIG, ChatTemplateError,
                         load_chat_template)
from jaxdec.checks import check_bool, check_int, check_model, check_param_dtype, check_path
from jaxdec.config import ModelConfig, read_generation_config, read_json_object, unreachable
from jaxdec.model import Model, check_runnable, param_shardings
from jaxdec.models import llama

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_), "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64), "C64": np.dtype(np.complex64),
}
# Other dtypes the format names (F8_E8M0, F4, F6_*: scales and packed quantized weights)
# have no numpy dtype: their tensors are listed with the dtype's name and refused only if a
# parameter is one of them. Their sizes in bits, to check the data offsets still.
_UNREADABLE_DTYPE_BITS = {"F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_MAX_HEADER_BYTES = 100 * 2**20
# Which axis of our layout is the vocabulary (padded to a multiple of tp).
_VOCAB_ROWS = {"model.embed_tokens.weight": 0, "lm_head.weight": 1}
# Tensors some checkpoints carry that the model recomputes or shares.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# What a parameter's tensor may hold: floats of 16 bits or more, cast to the requested dtype.
# Quantized checkpoints store 8-bit floats or packed integers whose scales sit in other
# tensors; a cast alone would load them as wrong weights, without an error.
_FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16))


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing pieces, corrupt, or does not fit the config."""


# --------------------------------------------------------------------- safetensors files


class _TensorInfo:
    """One tensor of a safetensors file: `dtype` is a numpy dtype, or the format's name for
    one numpy lacks (read() refuses those)."""

    __slots__ = ("path", "dtype", "shape", "offset", "nbytes")

    def __init__(self, path, dtype, shape, offset, nbytes):
        self.path, self.dtype, self.shape, self.offset, self.nbytes = path, dtype, shape, offset, nbytes

    def read(self) -> np.ndarray:
        """A read-only memory-mapped view of the tensor."""
        if not isinstance(self.dtype, np.dtype):
            raise CheckpointError(f"{self.path}: jaxdec cannot read {self.dtype} tensors")
        if self.nbytes == 0:
            return np.zeros(self.shape, self.dtype)
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset, shape=(self.nbytes,))
        return raw.view(self.dtype).reshape(self.shape)


def read_safetensors_index(path: str) -> dict[str, _TensorInfo]:
    """Parses one safetensors file's header, validating it against the file size."""
    try:
        size = os.path.getsize(path)
    except OSError:
        raise FileNotFoundError(f"missing checkpoint file {path}") from None

    def corrupt(why):
        return CheckpointError(f"corrupt safetensors file {path}: {why}")

    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise corrupt("shorter than its 8-byte header length")
        header_len = struct.unpack("<Q", prefix)[0]
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise corrupt(f"header length {header_len} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(header_len), object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError) as e:  # (JSON, UTF-8, a name twice, nesting)
            raise corrupt(f"header is not JSON of unique names ({_abridged(e)})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    data_start, data_size = 8 + header_len, size - 8 - header_len

    def naturals(values) -> tuple[int, ...]:  # JSON integers >= 0 (no floats, bools, text)
        if not (isinstance(values, list) and all(
                type(v) is int and v >= 0 for v in values)):
            raise TypeError
        return tuple(values)

    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"]) or info["dtype"]
            bits = dtype.itemsize * 8 if isinstance(dtype, np.dtype) else _UNREADABLE_DTYPE_BITS[
                dtype]
            shape = naturals(info["shape"])
            begin, end = naturals(info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad entry for tensor {name!r}: {_abridged(info)}") from None
        nbytes = -(-math.prod(shape) * bits // 8)
        if not 0 <= begin <= end <= data_size or end - begin != nbytes:
            raise corrupt(f"tensor {name!r} {shape} {info['dtype']} has data offsets "
                          f"{[begin, end]} outside the {data_size} data bytes or of the wrong size")
        tensors[name] = _TensorInfo(path, dtype, shape, data_start + begin, nbytes)
    # The tensors tile the data section, as the format (and the safetensors library) wants:
    # one overlapping another read its bytes as a tensor of its own, silently.
    covered = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].offset, item[1].nbytes)):
        if info.offset - data_start != covered:
            raise corrupt(f"tensor {name!r} starts at data byte {info.offset - data_start}, "
                          f"where the tensors before it end at {covered} (overlap or gap)")
        covered += info.nbytes
    if covered != data_size:
        raise corrupt(f"its tensors cover {covered} of its {data_size} data bytes")
    return tensors


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object's dict, or a ValueError for a name given twice (json keeps the last)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        names = [k for k, _ in pairs]
        raise ValueError(f"{next(k for k in names if names.count(k) > 1)!r} given twice")
    return out


def _abridged(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_stored_copy(head: _TensorInfo, embed: _TensorInfo, directory: str) -> None:
    """A CheckpointError unless a tied checkpoint's stored lm_head.weight is the embedding
    (compared a block of rows at a time: both are memory-mapped)."""
    same = head.shape == embed.shape and head.dtype == embed.dtype
    a, b = (head.read(), embed.read()) if same else (None, None)
    for start in range(0, head.shape[0] if same else 0, 4096):
        same = np.array_equal(a[start:start + 4096], b[start:start + 4096])
        if not same:
            break
    if not same:
        raise CheckpointError(
            f"{directory}: config.json ties the embeddings (tie_word_embeddings) but the "
            "checkpoint stores an lm_head.weight that differs from the embedding (transformers "
            "would use it): set tie_word_embeddings to false to load that head")


def _checkpoint_tensors(directory: str) -> dict[str, _TensorInfo]:
    index_path = os.path.join(directory, INDEX_FILE)
    single_path = os.path.join(directory, SINGLE_FILE)
    # (the one read: a single file wins over an index, even a broken link to one)
    for path in (single_path, index_path):
        if os.path.exists(path):
            break
        if os.path.islink(path):  # a cache's blob gone
            raise unreachable(path)
    # A single file wins over an index beside it, as transformers reads them (such a pair is
    # a copy's leftovers: jaxdec's export removes the other form).
    if os.path.exists(single_path):
        return read_safetensors_index(single_path)
    if os.path.exists(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"corrupt index {index_path}: {e!r}") from None
        if not (isinstance(weight_map, dict) and all(
                isinstance(f, str) and f and os.path.basename(f) == f
                for f in weight_map.values())):
            raise CheckpointError(
                f"corrupt index {index_path}: its weight_map must map tensor names to the "
                f"names of shard files in the same directory, got {_abridged(weight_map)}")
        tensors = {}
        for file in sorted(set(weight_map.values())):
            found = read_safetensors_index(os.path.join(directory, file))
            # A tensor from the shard the index names for it; one the index leaves out is
            # read too (as transformers reads every tensor of the shards it lists).
            tensors.update({k: v for k, v in found.items() if weight_map.get(k) == file
                            or (k not in weight_map and k not in tensors)})
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index_path} lists tensors its shards lack: {missing[:5]}")
        return tensors
    present = sorted(os.listdir(directory))
    hint = " (torch .bin checkpoints are not supported: convert to safetensors)" if any(
        p.endswith(".bin") for p in present) else ""
    raise FileNotFoundError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}; found {present}"
    )


# ------------------------------------------------------------------------- name mapping


class _Entry(NamedTuple):
    """One parameter: the HF tensors it is made of (names and shapes), how they become our
    array (`kind`), and our array's shape in one device's layout. HF Linear weights are
    [out, in]; ours are [in, out] with heads split out, and q|k|v and gate|up are one array
    each. Hashable: entries of the same shapes (every layer's) share one compiled conversion.

    kind: "vector" (a reshape), "linear" (a transpose), "qkv" (q, k, v weights or biases into
      the fused layout: weights [E, K (H/K + 2) D], biases [K, H/K + 2, D]; `heads` = K) or
      "gate_up" (stacked on a new first axis).
    """

    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple, ...]
    kind: str
    shape: tuple
    heads: int = 0


def _to_ours(entry: _Entry, arrays: list, groups: int) -> jax.Array:
    """Our array from the HF tensors, `_oriented` ([in, out]), qkv in `groups` groups
    (`llama.kv_groups`)."""
    kind, shape = entry.kind, entry.shape
    if kind in ("vector", "linear"):
        return arrays[0].reshape(shape)
    if kind == "gate_up":
        return jnp.stack(arrays)
    # qkv: weights [E, out] -> [E, heads, D], grouped, flattened; biases [out] -> [heads, D],
    # grouped
    D = entry.hf_shapes[1][0] // entry.heads  # k: K x D outputs
    fused = llama.group_qkv(*[w.reshape(*w.shape[:-1], -1, D) for w in arrays], groups)
    return fused.reshape(*fused.shape[:-3], -1) if len(shape) == 2 else fused


def _is_transposed(entry: _Entry, hf_shape: tuple) -> bool:
    """Whether an HF tensor of the entry is a Linear weight ([out, in], ours [in, out])."""
    return entry.kind != "vector" and len(hf_shape) == 2


@functools.partial(jax.jit, static_argnames="dtype")
def _oriented(hf_weight: jax.Array, dtype) -> jax.Array:
    """An HF Linear weight cast and transposed to [in, out], alone: a CPU compiles a transpose
    fused with the concatenation after it (q|k|v, gate|up) into a loop ~2.5x slower than the
    two apart (bf16, jax 0.10.2)."""
    return hf_weight.astype(dtype).T


def _to_hf(entry: _Entry, array: jax.Array) -> list[jax.Array]:
    """The HF tensors of our array (qkv in any number of groups: a KV head repeated in
    several is read from its first)."""
    kind, hf_shapes = entry.kind, entry.hf_shapes
    if kind == "vector":
        return [array.reshape(hf_shapes[0])]
    if kind == "linear":
        return [array.reshape(hf_shapes[0][::-1]).T]
    if kind == "gate_up":
        return [array[0].T, array[1].T]
    if array.ndim == 2:  # the flat weight [E, R (H/R + 2) D]: its grouped view
        D = hf_shapes[1][0] // entry.heads  # k: K x D outputs, q: H x D
        array = llama.qkv_view(array, hf_shapes[0][0] // D, D)
    parts = llama.split_qkv(array, entry.heads)
    return [p.reshape(s[::-1]).T for p, s in zip(parts, hf_shapes)]


def _param_table(config: ModelConfig) -> dict[str, _Entry]:
    """Our param path (jax keystr) -> _Entry, for every parameter of the config. Fused qkv
    arrays are in one device's layout (K groups); loading groups them for its mesh."""
    E, H, K, D, F, V = (config.hidden_size, config.num_heads, config.num_kv_heads,
                        config.head_dim, config.intermediate_size, config.vocab_size)
    table: dict[str, _Entry] = {}

    def one(path, hf_name, hf_shape, shape, kind):
        table[path] = _Entry((hf_name,), (hf_shape,), kind, shape)

    def qkv(path, names, lead):
        """q, k, v Linear weights (`lead` (E,)) or biases (`lead` ())."""
        shapes = [(n * D,) + lead for n in (H, K, K)]
        shape = lead + ((H + 2 * K) * D,) if lead else (K, H // K + 2, D)
        table[path] = _Entry(tuple(names), tuple(shapes), "qkv", shape, K)

    def gate_up(path, names, lead):
        """gate, up Linear weights [F, E] -> [2, E, F] (`lead` (E,)), or biases [F] -> [2, F]."""
        table[path] = _Entry(tuple(names), ((F,) + lead,) * 2, "gate_up", (2,) + lead + (F,))

    one("['embed']", "model.embed_tokens.weight", (V, E), (V, E), "vector")
    one("['final_norm']", "model.norm.weight", (E,), (E,), "vector")
    if not config.tie_word_embeddings:
        one("['lm_head']", "lm_head.weight", (V, E), (E, V), "linear")
    for i in range(config.num_layers):
        p, h = f"['layers'][{i}]", f"model.layers.{i}."
        one(p + "['attn_norm']", h + "input_layernorm.weight", (E,), (E,), "vector")
        one(p + "['mlp_norm']", h + "post_attention_layernorm.weight", (E,), (E,), "vector")
        proj = [h + f"self_attn.{x}_proj." for x in "qkv"]
        qkv(p + "['qkv']", [n + "weight" for n in proj], (E,))
        one(p + "['o']", h + "self_attn.o_proj.weight", (E, H * D), (H, D, E), "linear")
        mlp = [h + "mlp.gate_proj.", h + "mlp.up_proj."]
        gate_up(p + "['gate_up']", [n + "weight" for n in mlp], (E,))
        one(p + "['down']", h + "mlp.down_proj.weight", (E, F), (F, E), "linear")
        if config.qkv_bias:
            qkv(p + "['qkv_bias']", [n + "bias" for n in proj], ())
        if config.o_bias:
            one(p + "['o_bias']", h + "self_attn.o_proj.bias", (E,), (E,), "vector")
        if config.mlp_bias:
            gate_up(p + "['gate_up_bias']", [n + "bias" for n in mlp], ())
            one(p + "['down_bias']", h + "mlp.down_proj.bias", (E,), (E,), "vector")
    return table


def _resolve_dtype(dtype, config: ModelConfig):
    return check_param_dtype(config.dtype if dtype is None else dtype)


def load_tokenizer(directory: str):
    """`tokenizers.Tokenizer` from `tokenizer.json`, or None when the directory has none.

    Truncation and padding saved in the file are switched off: transformers applies them
    only to calls that ask for them, and a raw `encode` would otherwise cut prompts and
    corpora short or pad them (an export writes the file without them)."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own exception type
        raise CheckpointError(f"corrupt tokenizer file {path}: {e}") from None
    return plain_tokenizer(tokenizer)


def plain_tokenizer(tokenizer):
    """`tokenizer` without truncation and padding: itself when it has neither, else a copy
    with them switched off (the caller's object is left as it is)."""
    if tokenizer.truncation is None and tokenizer.padding is None:
        return tokenizer
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def hub_cache_dir() -> str:
    """Where Hugging Face tools keep downloaded models: $HF_HUB_CACHE (or its older name
    $HUGGINGFACE_HUB_CACHE), else $HF_HOME/hub, else ~/.cache/huggingface/hub
    (huggingface_hub's order, `~` and `$VARIABLES` expanded; nothing is created)."""
    def expand(path: str) -> str:
        return os.path.expandvars(os.path.expanduser(path))

    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if hub:
        return expand(hub)
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return os.path.join(expand(home), "hub")


def checkpoint_dir(path: str | os.PathLike) -> str:
    """The directory a checkpoint's files are in: `path` itself when it is a directory (a
    model's folder in the Hugging Face cache, `models--org--name`, resolves to the snapshot its
    `refs/main` names), else `path` read as a model id ("org/name") of a model already in the
    Hugging Face cache (`hub_cache_dir`): its main snapshot. jaxdec downloads nothing."""
    text = check_path("path", path)
    if os.path.isdir(text):
        return _snapshot(text) if _is_cached_repo(text) else text
    cache = hub_cache_dir()
    parts = text.split("/")
    is_id = bool(text) and not text.startswith((".", "~", "/")) and len(parts) <= 2 and all(parts)
    if is_id:
        repo = os.path.join(cache, "models--" + "--".join(parts))
        if _is_cached_repo(repo):
            return _snapshot(repo)
    if os.path.exists(text):
        raise NotADirectoryError(f"{text} is a file: a checkpoint is the directory holding "
                                 "config.json and the safetensors files")
    raise FileNotFoundError(
        f"checkpoint directory {text} does not exist" + (
            f", nor is {text!r} a model in the Hugging Face cache ({cache}); jaxdec downloads "
            f"nothing: fetch it first (e.g. `huggingface-cli download {text}`)"
            if is_id else ""))


def _is_cached_repo(directory: str) -> bool:
    return (os.path.basename(os.path.normpath(directory)).startswith("models--")
            and os.path.isdir(os.path.join(directory, "snapshots")))


def _snapshot(repo: str) -> str:
    """The snapshot of a cached model's folder that refs/main names, or its only snapshot."""
    snapshots = os.path.join(repo, "snapshots")
    ref = os.path.join(repo, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            commit = f.read().strip()
        if os.path.isdir(os.path.join(snapshots, commit)):
            return os.path.join(snapshots, commit)
        raise FileNotFoundError(f"{ref} names snapshot {commit!r}, which {snapshots} lacks "
                                "(an interrupted download?)")
    found = sorted(d for d in os.listdir(snapshots) if os.path.isdir(os.path.join(snapshots, d)))
    if len(found) == 1:
        return os.path.join(snapshots, found[0])
    raise FileNotFoundError(
        f"{repo} has no refs/main and {len(found)} snapshots ({', '.join(found) or 'none'}): "
        "pass the snapshot directory you want")


@parallel.runs_on_model_mesh(lambda a: a["mesh"])
def load_pretrained(path: str | os.PathLike, *, dtype=None, mesh=None) -> Model:
    """Loads an HF safetensors directory (Llama, Mistral, Qwen2 families).

    Args:
      path: directory with config.json and model.safetensors (or a sharded index); or the id
        ("org/name") of a model already in the Hugging Face cache (see `checkpoint_dir`).
      dtype: parameter dtype (e.g. jnp.bfloat16); None keeps the checkpoint's declared dtype.
      mesh: the mesh to shard over (`jaxdec.make_mesh(tp=...)`); None is one device.
    Returns:
      A Model whose params are placed with the mesh's sharding; `.tokenizer` is set when the
      directory has tokenizer.json, `.chat_template` when it has a chat template
      (`jaxdec.chat.load_chat_template`), `.generation_config` and `.tokenizer_config`
      (dicts) when it has generation_config.json and tokenizer_config.json
      (`save_pretrained` writes them back).
    """
    directory = checkpoint_dir(path)
    config = ModelConfig.from_hf(directory)
    dtype = _resolve_dtype(dtype, config)
    mesh = parallel.resolve_mesh(mesh)
    parallel.check_divisibility(config, mesh)
    tensors = _checkpoint_tensors(directory)
    table = _param_table(config)
    vocab = parallel.padded_vocab(config, mesh)
    groups = llama.kv_groups(config, parallel.tp_size(mesh))

    _refuse_quantized(directory, tensors, table)
    tied_head_only = (config.tie_word_embeddings and "lm_head.weight" in tensors
                      and "model.embed_tokens.weight" not in tensors)
    if tied_head_only:  # the shared matrix stored as the head alone (transformers takes it)
        tensors["model.embed_tokens.weight"] = tensors["lm_head.weight"]
    for entry in table.values():
        for name, shape in zip(entry.hf_names, entry.hf_shapes):
            info = tensors.get(name)
            if info is None:
                raise CheckpointError(f"tensor {name!r} is missing from {directory}")
            if info.shape != shape:
                raise CheckpointError(
                    f"tensor {name!r} has shape {info.shape}, expected {shape} from config.json"
                )
    known = {n for e in table.values() for n in e.hf_names}
    if config.tie_word_embeddings and "lm_head.weight" in tensors and not tied_head_only:
        # Some tied checkpoints store the shared matrix twice; one whose copy differs is two
        # models (transformers uses the stored head, jaxdec tied the embedding).
        _check_stored_copy(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"],
                           directory)
    if config.tie_word_embeddings:
        known.add("lm_head.weight")
    unexpected = sorted(n for n in tensors if n not in known and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        warnings.warn(f"ignoring {len(unexpected)} unexpected tensors in {directory}: {unexpected[:5]}")

    in_flight: list[jax.Array] = []

    def place(path, sharding) -> jax.Array:
        entry = table[jax.tree_util.keystr(path)]
        hf_arrays = [_on_mesh(tensors[n].read(), dtype, mesh) for n in entry.hf_names]
        hf_arrays = [_oriented(a, dtype) if _is_transposed(entry, a.shape) else a
                     for a in hf_arrays]
        vocab_axis = _VOCAB_ROWS.get(entry.hf_names[0])
        pad = 0 if vocab_axis is None else vocab - config.vocab_size
        array = _converter(entry._replace(hf_names=()), dtype, groups, vocab_axis, pad,
                           sharding)(*hf_arrays)
        # The previous parameter's conversion ends before this one's is left running, so the
        # host never runs ahead of the devices with more than two parameters' copies alive.
        if in_flight:
            in_flight.pop().block_until_ready()
        in_flight.append(array)
        return array

    # Parameter by parameter from the memory-mapped files onto the mesh, converted there.
    params = jax.tree_util.tree_map_with_path(place, param_shardings(config, mesh))
    tokenizer = load_tokenizer(directory)
    _warn_past_the_vocabulary(directory, config, tokenizer)
    return Model(config=config, params=params, mesh=mesh, tokenizer=tokenizer,
                 chat_template=_chat_template(directory),
                 generation_config=read_generation_config(directory, warn=False) or None,
                 tokenizer_config=_read_tokenizer_config(directory))


def _warn_past_the_vocabulary(directory: str, config: ModelConfig, tokenizer) -> None:
    """Warns where the checkpoint names ids its model has no row for: tokenizer tokens past
    config.json's vocab_size (a prompt holding one is refused), end-of-sequence ids past it
    (the model never emits them; the CLI then stops on the others). A vocabulary larger
    than the tokenizer's (Qwen2's padding) is fine."""
    V = config.vocab_size
    words = None if tokenizer is None else tokenizer.get_vocab_size(with_added_tokens=True)
    if words is not None and words > V:
        warnings.warn(f"{directory}: its tokenizer has {words} tokens, more than config.json's "
                      f"vocab_size {V}: text encoding to the ids past it cannot be given to "
                      "the model (was a token added without resizing the embeddings?)",
                      stacklevel=4)
    past = [t for t in config.eos_token_ids if t >= V]
    if past:
        warnings.warn(f"{directory}: its end-of-sequence ids {past} are past config.json's "
                      f"vocab_size {V}: the model never emits them (give stop_tokens without "
                      "them)", stacklevel=4)  # (the caller of load_pretrained)


def _read_tokenizer_config(directory: str) -> dict | None:
    """The directory's tokenizer_config.json, or None where it has none or it is no JSON
    object (loading the chat template names that)."""
    path = os.path.join(directory, TOKENIZER_CONFIG)
    try:
        return read_json_object(path) if os.path.isfile(path) else None
    except (OSError, ValueError):
        return None


def _refuse_quantized(directory: str, tensors: dict[str, _TensorInfo],
                      table: dict[str, _Entry]) -> None:
    """A CheckpointError for a quantized checkpoint (GPTQ, AWQ, bitsandbytes, FP8, ...):
    config.json's `quantization_config`, or a parameter tensor that is not a float of 16 bits
    or more (an FP8 checkpoint's weights would otherwise be cast without their scales)."""
    quantization = read_json_object(os.path.join(directory, "config.json")).get(
        "quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise CheckpointError(
            f"{directory} holds a quantized checkpoint (config.json has a quantization_config"
            + (f", quant_method={method!r}" if method else "") + "); jaxdec loads float "
            "weights (float32, bfloat16, float16): use the model's unquantized checkpoint")
    for entry in table.values():
        for name in entry.hf_names:
            info = tensors.get(name)
            if info is not None and info.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(
                    f"tensor {name!r} in {directory} is "
                    f"{getattr(info.dtype, 'name', info.dtype)}; jaxdec loads float "
                    "weights (float32, bfloat16, float16), not quantized ones: use the model's "
                    "unquantized checkpoint")


def _chat_template(directory: str):
    """The directory's chat template; one that cannot be read or compiled warns (the model
    loads without it: only chatting needs it)."""
    try:
        return load_chat_template(directory)
    except ChatTemplateError as e:
        warnings.warn(f"loading without a chat template: {e}")
        return None


def _on_mesh(hf_array: np.ndarray, dtype, mesh) -> jax.Array:
    """An HF tensor (a memory-mapped view) copied as it is onto the mesh, its first axis split
    over all the devices where it divides (whole on each where not), for its conversion there.
    64-bit tensors (which jax holds only with x64 on) are cast to `dtype` here first."""
    if hf_array.dtype.itemsize == 8:
        hf_array = hf_array.astype(dtype)
    devices = mesh.devices.size
    split = hf_array.ndim and hf_array.shape[0] % devices == 0
    spec = PartitionSpec(mesh.axis_names) if split else PartitionSpec()
    return parallel.put_on_mesh(hf_array, NamedSharding(mesh, spec))


@functools.lru_cache(maxsize=256)
def _converter(recipe: _Entry, dtype, groups: int, vocab_axis: int | None, vocab_pad: int,
               sharding) -> Callable:
    """The compiled conversion of one parameter's HF tensors (`_oriented`) into our array:
    cast, fused, the vocabulary padded, placed with `sharding`. It runs on the devices, as
    the transposes do (numpy transposes bf16 at ~0.15 GB/s on a CPU core); every layer's
    tensors share one (the recipe carries no names)."""

    def convert(*hf_arrays):
        array = _to_ours(recipe, [a.astype(dtype) for a in hf_arrays], groups)
        if vocab_pad:
            widths = [(0, 0)] * array.ndim
            widths[vocab_axis] = (0, vocab_pad)
            array = jnp.pad(array, widths)
        return array

    return jax.jit(convert, out_shardings=sharding)


def _check_kv_copies(model) -> None:
    """A ValueError where a KV head's copies differ: on a mesh of tp > KV heads each shard
    holds its own copy of a KV head's projection, gradients do not tie them (each copy gets
    its shard's share), and the export would keep the first copy of a model that no longer
    computes what any checkpoint can hold."""
    config = model.config
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]:
        name = jax.tree_util.keystr(path)
        if not llama.is_grouped(name):
            continue
        view = (llama.qkv_view(leaf, config.num_heads, config.head_dim) if leaf.ndim == 2
                else leaf)  # (the flat weight [E, R (H/R + 2) D]; a bias is [R, H/R + 2, D])
        groups, K = view.shape[-3], config.num_kv_heads
        if groups == K:
            return  # (every qkv leaf has the same groups)
        if not bool(_kv_copies_agree(view, K)):
            raise ValueError(
                f"model.params{name}: the copies of a KV head differ (on this mesh of tp="
                f"{model.tp} > {K} KV heads each shard keeps its own copy, and gradients do "
                "not tie them: each gets its shard's share), so no checkpoint holds this "
                f"model; train on a mesh of tp <= {K} (data parallelism is exact), or set "
                "each head's copies to their mean before saving")


@functools.partial(jax.jit, static_argnums=1)
def _kv_copies_agree(view, kv_heads: int) -> jax.Array:
    kv = view[..., view.shape[-2] - 2:, :]  # [..., R, 2, D]: each group's k and v
    kv = kv.reshape(*kv.shape[:-3], kv_heads, kv.shape[-3] // kv_heads, 2, kv.shape[-1])
    return jnp.all(kv == kv[..., :1, :, :])


@functools.lru_cache(maxsize=256)
def _exporter(recipe: _Entry, vocab_axis: int | None, vocab_size: int, dtype) -> Callable:
    """The compiled conversion of one parameter into its HF tensors: the vocabulary's padding
    rows dropped, cast to `dtype` (None: unchanged), transposed and split."""

    def convert(array):
        if vocab_axis is not None:
            array = jax.lax.slice_in_dim(array, 0, vocab_size, axis=vocab_axis)
        return _to_hf(recipe, array if dtype is None else array.astype(dtype))

    return jax.jit(convert)


# ------------------------------------------------------------------------------ export


@parallel.runs_on_model_mesh(lambda a: a["model"].mesh)
def save_pretrained(
    model: Model,
    path: str | os.PathLike,
    *,
    dtype=None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> str:
    """Writes `model` as an HF directory that transformers and `load_pretrained` both load.

    Files are written to a temporary folder first and flushed to the disk. A new directory
    appears atomically (the folder is renamed into place); into an existing one
    (`overwrite=True`) each file moves atomically, weights first, then config.json
    (`_move_files_into`; Ctrl-C waits for the moves), so that stopped at any point the
    directory loads as the old model or the new one, but for the moment between the weights'
    rename and config.json's: a crash there (a kill, a power cut) leaves the new weights
    beside the old config.json (an export of the same architecture loads as the new weights
    read with the old settings: export again, or into a new directory); the old weight files
    (transformers' names, and the shards the old index names) are removed, and other files
    (e.g. training checkpoints) are kept, as transformers' save_pretrained does. What an
    export killed midway left (its hidden `.jaxdec-export-*` folder, shards no index names)
    the next export into the same place removes.

    Args:
      model: the Model to export.
      path: target directory (`~` expanded); must not exist (or be empty) unless
        `overwrite`.
      dtype: dtype of the written tensors (default: the params' dtype).
      overwrite: write into an existing non-empty directory (see above).
      max_shard_bytes: above this size the weights are split into shards with an index (the
        host holds one tensor at a time either way).
    Returns:
      The directory path.

    With several processes (`jax.distributed`, a mesh over several hosts) every process calls
    it: the tensors are gathered from all of them, process 0 writes the directory (on its
    filesystem) and each call returns once it is written; where process 0 fails (an existing
    directory, a full disk) it raises its error and the others `parallel.ProcessFailed` saying so.
    """
    check_model(model)
    check_runnable(model, "be saved")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a directory path (str or os.PathLike), got {path!r}")
    if dtype is not None:
        dtype = check_param_dtype(dtype)
    overwrite = check_bool("overwrite", overwrite)
    target = os.path.abspath(os.path.expanduser(os.fspath(path)))  # (`~` as load_pretrained)
    if isinstance(max_shard_bytes, str):  # transformers' max_shard_size="5GB"
        raise TypeError(f"max_shard_bytes must be a number of bytes (an int), got "
                        f"{max_shard_bytes!r}")
    if isinstance(max_shard_bytes, float) and max_shard_bytes.is_integer():
        max_shard_bytes = int(max_shard_bytes)  # (5e9 is a number of bytes too)
    max_shard_bytes = check_int("max_shard_bytes", max_shard_bytes)
    _check_kv_copies(model)
    writer = jax.process_index() == 0  # the others gather with it and write nothing
    config = model.config
    # What process 0 refuses it refuses before any gather, and tells the others (who would
    # otherwise wait in their first gather for it).
    try:
        if writer and os.path.isdir(target):
            _remove_dead_staging(target)  # (a killed export's: the folder is empty without)
        if writer and os.path.exists(target) and os.listdir(target) and not overwrite:
            raise FileExistsError(f"{target} exists and is not empty (pass overwrite=True)")
        tokenizer_config = _tokenizer_config(model, target) if writer else None
        hf_config = config.to_hf()  # a config no checkpoint can express fails before the weights
    except Exception:
        _process_zero_succeeded(False)
        raise
    if not _process_zero_succeeded(True):
        raise parallel.ProcessFailed(f"process 0 refused to write {target} (its error says "
                                     "why)")
    table = _param_table(config)
    flat = {jax.tree_util.keystr(p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(model.params)[0]}
    # (check_model checked the params' structure, shapes and dtypes: a leaf of the right
    # size but the wrong shape would be reshaped into a checkpoint of scrambled weights.)
    # Every tensor's size is known before any is converted, so the shards (and their files'
    # headers) are planned first and each tensor is converted, written and let go in turn:
    # the host holds one tensor, never a shard or the whole model.
    owners, tensors = {}, {}  # HF name -> our param path, and (dtype, shape) as written
    for path_str, entry in table.items():
        written = np.dtype(dtype if dtype is not None else flat[path_str].dtype)
        for name, shape in zip(entry.hf_names, entry.hf_shapes):
            owners[name], tensors[name] = path_str, (written, tuple(shape))
    written_dtype = str(np.dtype(dtype if dtype is not None else flat["['embed']"].dtype))
    converted: dict[str, jax.Array] = {}  # an entry's other tensors, until their shard
    fetched: set[str] = set()

    def fetch(name: str) -> np.ndarray:
        fetched.add(name)
        if name not in converted:
            path_str = owners[name]
            entry = table[path_str]
            vocab_axis = _VOCAB_ROWS.get(entry.hf_names[0])
            arrays = _exporter(entry._replace(hf_names=()), vocab_axis, config.vocab_size,
                               dtype)(flat[path_str])
            converted.update(zip(entry.hf_names, arrays))
        return np.ascontiguousarray(parallel.to_host(converted.pop(name)))

    if not writer:
        for name in tensors:  # in the writer's order: each gather is a collective
            fetch(name)
        if not _process_zero_succeeded(True):
            raise parallel.ProcessFailed(f"process 0 failed to write {target} (its error "
                                         "says why)")
        return target
    staging = lock = None
    try:
        exists = os.path.isdir(target)
        parent = target if exists else os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        _remove_dead_staging(parent)
        staging, lock = _new_staging(parent)
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would go with it into place
        _write_weights(staging, tensors, fetch, max_shard_bytes)
        hf_config["torch_dtype"] = written_dtype
        _write_json(os.path.join(staging, "config.json"), hf_config)
        # The checkpoint's own settings (sampling defaults, ...) with the config's ids.
        # (Ids it names stay its own: transformers' generate reads them, not config.json's.)
        generation = dict(model.generation_config or {})
        for key, value in (("bos_token_id", config.bos_token_id),
                           ("pad_token_id", config.pad_token_id),
                           ("eos_token_id", hf_config["eos_token_id"])):
            if generation.get(key) is None and value is not None:
                generation[key] = value
        _write_json(os.path.join(staging, "generation_config.json"), generation)
        if model.tokenizer is not None:
            model.tokenizer.save(os.path.join(staging, "tokenizer.json"))
        if tokenizer_config is not None:
            _write_json(os.path.join(staging, TOKENIZER_CONFIG), tokenizer_config)
            # A template file in the target would be read before tokenizer_config.json's.
            if model.chat_template is not None and os.path.isfile(
                    os.path.join(target, TEMPLATE_FILE)):
                with open(os.path.join(staging, TEMPLATE_FILE), "w", encoding="utf-8") as f:
                    f.write(model.chat_template.source)
        # On the disk before any rename: a rename is atomic, but a crash soon after one may
        # otherwise leave the renamed files empty. (Still locked meanwhile: a kill during
        # the flush, minutes for a large model, leaves a folder the next export removes.)
        _flush_to_disk(staging)
        _unlock_staging(staging, lock)  # (its lock file is not the model's)
        lock = None
        if exists:
            with interrupts_deferred():  # (renames: Ctrl-C waits microseconds)
                _move_files_into(staging, target)
        else:
            try:
                os.replace(staging, target)
            except OSError as e:
                if not os.path.isdir(target):
                    raise
                raise FileExistsError(
                    f"{target} appeared while this export was writing (another save to the "
                    "same path?): it was left as the other one made it; save again with "
                    "overwrite=True to replace it") from e
        _flush_to_disk(target if exists else parent, files=False)
    except Exception:
        if jax.process_count() > 1:
            # The others gather every tensor with this process, in this order: the gathers
            # are finished with them, then they are told.
            for name in tensors:
                if name not in fetched:
                    fetch(name)
            _process_zero_succeeded(False)
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            _unlock_staging(staging, lock)
    _process_zero_succeeded(True)
    return target


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C (SIGINT) inside the block raises KeyboardInterrupt when the block ends, a
    second one at once (a save hung on its filesystem stays interruptible). Only in the main
    thread with Python's own SIGINT handler installed; elsewhere nothing changes."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received = []

    def note(*_):
        if received:
            raise KeyboardInterrupt
        received.append(True)

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _flush_to_disk(directory: str, *, files: bool = True) -> None:
    """The files in `directory` (with `files`), then its entries, written through to the disk
    (where the system allows fsync on a directory)."""
    for name in sorted(os.listdir(directory)) if files else ():
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # (Windows opens no directory)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """This process's file-mode creation mask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _process_zero_succeeded(ok: bool) -> bool:
    """Process 0's `ok` in every process of a multi-process run (a collective: every process
    calls it at the same point), `ok` itself with one process."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def _tokenizer_config(model: Model, target: str) -> dict | None:
    """What save_pretrained writes to tokenizer_config.json (where transformers 4.x and 5.x
    both read a chat template): the target's own file, else the model's `tokenizer_config`
    (the one it was loaded with: transformers' tokenizer settings, such as its padding side),
    with the model's chat template and special tokens over it. A model with neither file
    nor template but a tokenizer writes its config's special tokens (bos, eos, pad); a target
    with a file and a model without a template: None (the file is kept as it is)."""
    path = os.path.join(target, TOKENIZER_CONFIG)
    if model.chat_template is None:
        if os.path.exists(path):
            return None
        if isinstance(model.tokenizer_config, dict):
            # (a template it names is one the model was given without: not written back)
            return {k: v for k, v in _carried(model.tokenizer_config).items()
                    if k != "chat_template"}
        if model.tokenizer is None:
            return None
        # Without one (a model jaxdec trained), the config's special tokens, so that
        # transformers' tokenizer knows them (its eos, bos and pad tokens were None).
        config, special = model.config, {}
        for name, ids in (("bos_token", [config.bos_token_id]),
                          ("eos_token", list(config.eos_token_ids)[:1]),
                          ("pad_token", [config.pad_token_id])):
            token = None if ids in ([], [None]) else model.tokenizer.id_to_token(ids[0])
            if token is not None:
                special[name] = token
        return dict(special, tokenizer_class="PreTrainedTokenizerFast") if special else None
    existing = (_carried(model.tokenizer_config) if isinstance(model.tokenizer_config, dict)
                else {})
    if os.path.isfile(path):
        try:
            existing = read_json_object(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} exists and is not readable JSON ({e}): the chat template "
                             "would be written over it; move it away first") from None
    return dict(existing, **model.chat_template.special_tokens,
                chat_template=model.chat_template.source)


def _carried(tokenizer_config: dict) -> dict:
    """A loaded tokenizer_config.json as an export writes it: a tokenizer of custom code
    (`auto_map`), whose .py files the export does not hold (transformers then failed to load
    it), replaced by transformers' generic one, which reads tokenizer.json."""
    if "auto_map" not in tokenizer_config:
        return dict(tokenizer_config)
    # (transformers 4 without a class picks one by model_type, LlamaTokenizerFast, which
    # adds a bos of its own: the generic class reads tokenizer.json as it is)
    return dict({k: v for k, v in tokenizer_config.items() if k != "auto_map"},
                tokenizer_class="PreTrainedTokenizerFast")


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _write_weights(directory: str, tensors: dict[str, tuple[np.dtype, tuple]],
                   fetch: Callable[[str], np.ndarray], max_shard_bytes: int) -> None:
    """Writes the tensors named by `tensors` (name -> (dtype, shape), in order) as one
    safetensors file, or as shards of at most `max_shard_bytes` (a bigger tensor alone) with
    an index. Each file's header is written first (every size is known) and its tensors one
    at a time, each fetched (`fetch(name)`) when it is written and let go after: the host
    holds one tensor, not a shard (5 GiB by default)."""
    sizes = {name: math.prod(shape) * dtype.itemsize for name, (dtype, shape) in tensors.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards):
        _write_safetensors(os.path.join(directory, file), {n: tensors[n] for n in names}, fetch)
    if len(shards) > 1:
        weight_map = {name: file for file, names in zip(files, shards) for name in names}
        _write_json(os.path.join(directory, INDEX_FILE),
                    {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})


_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


def _write_safetensors(path: str, tensors: dict[str, tuple[np.dtype, tuple]],
                       fetch: Callable[[str], np.ndarray]) -> None:
    """One safetensors file (the format: an 8-byte little-endian header size, the JSON header
    padded with spaces to a multiple of 8 bytes, then the tensors' bytes at the offsets it
    names), written a tensor at a time in `tensors`' order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # (transformers wants "pt")
    offset = 0
    for name, (dtype, shape) in tensors.items():
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, (dtype, shape) in tensors.items():
            array = fetch(name)
            if array.dtype != dtype or array.shape != shape:  # (a bug: the header says so)
                raise AssertionError(f"{name}: planned {dtype}{list(shape)}, got "
                                     f"{array.dtype}{list(array.shape)}")
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
            del array  # before the next is fetched


# The weight files a save replaces (transformers' names, and the shards `_fresh_shard_names`
# tags: a move stopped midway left them unnamed by any index); other files stay.
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5}(\.\w+)?)?\.safetensors")


_STAGING = ".jaxdec-export-"  # an export's staging folder, beside or in its target
_STAGING_LOCK = ".lock"  # in it: locked (flock) while its export runs


def _new_staging(parent: str) -> tuple[str, int | None]:
    """(a new staging folder in `parent`, the descriptor of its lock file, locked): made
    under another name, locked, then renamed, so that no staging folder is seen without its
    lock held until `_unlock_staging` (without flock, as on Windows: no lock, and the
    folder is never taken for a killed export's)."""
    made = tempfile.mkdtemp(prefix=".jaxdec-new-", dir=parent)
    fd = None
    try:
        import fcntl

        fd = os.open(os.path.join(made, _STAGING_LOCK), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):  # (a filesystem without flock: some NFS and FUSE mounts)
        if fd is not None:
            os.close(fd)
            os.remove(os.path.join(made, _STAGING_LOCK))  # (it went into the export)
        fd = None
    staging = os.path.join(parent, _STAGING + os.path.basename(made)[len(".jaxdec-new-"):])
    os.rename(made, staging)
    return staging, fd


def _unlock_staging(staging: str, fd: int | None) -> None:
    """Removes the lock file (while it is held: a folder without one is never removed by
    another export) and releases the lock."""
    if fd is not None:
        try:
            os.remove(os.path.join(staging, _STAGING_LOCK))
        except FileNotFoundError:
            pass
        os.close(fd)


def _remove_dead_staging(parent: str) -> None:
    """Removes from `parent` the staging folders of exports killed before their folder was
    moved into place (a whole copy of the weights): those whose lock file no process holds.
    (A lock, not a process id: containers writing to one volume see other pid namespaces.)"""
    try:
        import fcntl
    except ImportError:
        return
    for name in os.listdir(parent):
        if not name.startswith(_STAGING):
            continue
        folder = os.path.join(parent, name)
        try:
            fd = os.open(os.path.join(folder, _STAGING_LOCK), os.O_RDWR)
        except OSError:  # none: an export finishing (or one of an older jaxdec)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: that export runs
            os.close(fd)
            continue
        if os.fstat(fd).st_nlink == 0:  # unlinked by its export as it unlocked: finishing
            os.close(fd)
            continue
        shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


def _move_files_into(staging: str, target: str) -> None:
    """Moves an export from `staging` into the existing directory `target` so that, stopped at
    any point, `target` loads as the old model or the new one, never a mix or nothing (but
    for the new weights beside the old config.json, after a crash between two renames):

    - new shards never take an old file's name (renamed in staging where they would), so
      the old index keeps reading old shards while the new ones arrive;
    - one rename commits the weights: `model.safetensors` (a single file wins over an index,
      for transformers and jaxdec), or the new index, then the old single file removed;
    - then config.json (the next rename: the weights' settings), the other files, and the
      old weights no longer named are removed.
    Files that are not transformers' weights stay (see `save_pretrained`)."""
    stale = {name for name in os.listdir(target) if _WEIGHT_FILE.fullmatch(name)}
    index = os.path.join(target, INDEX_FILE)
    if os.path.isfile(index):  # and the shards the old index names, whatever their names
        try:
            stale |= {os.path.basename(f) for f in read_json_object(index)
                      .get("weight_map", {}).values() if isinstance(f, str)}
        except (OSError, ValueError, AttributeError):
            pass
        stale.add(INDEX_FILE)
    if os.path.isfile(os.path.join(staging, INDEX_FILE)):
        shards = _fresh_shard_names(staging, set(os.listdir(target)))
        for name in shards:
            os.replace(os.path.join(staging, name), os.path.join(target, name))
        os.replace(os.path.join(staging, INDEX_FILE), index)
        if os.path.isfile(os.path.join(target, SINGLE_FILE)):
            os.remove(os.path.join(target, SINGLE_FILE))
        placed = set(shards) | {INDEX_FILE}
    else:
        os.replace(os.path.join(staging, SINGLE_FILE), os.path.join(target, SINGLE_FILE))
        placed = {SINGLE_FILE}
    rest = sorted(set(os.listdir(staging)) - placed, key=lambda name: name != "config.json")
    for name in rest:
        os.replace(os.path.join(staging, name), os.path.join(target, name))
    for name in sorted(stale - placed):
        if os.path.isfile(os.path.join(target, name)):
            os.remove(os.path.join(target, name))


def _fresh_shard_names(staging: str, taken: set[str]) -> list[str]:
    """The staged shards' names, each renamed (and the staged index rewritten) where the
    target already has a file of that name: `model-00001-of-00003.<tag>.safetensors`."""
    index_path = os.path.join(staging, INDEX_FILE)
    index = read_json_object(index_path)
    shards = sorted(set(index["weight_map"].values()))
    if not set(shards) & taken:
        return shards
    tag = os.path.basename(staging).rsplit("-", 1)[-1][:8]
    renamed = {name: name.replace(".safetensors", f".{tag}.safetensors") for name in shards}
    for old, new in renamed.items():
        os.replace(os.path.join(staging, old), os.path.join(staging, new))
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    _write_json(index_path, index)
    return sorted(renamed.values())
