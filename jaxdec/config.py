"""Model configuration: one frozen, hashable dataclass (a static argument to `jax.jit`).

`ModelConfig.from_hf` reads a Hugging Face `config.json` (both the transformers 4.x layout with
`rope_theta` / `rope_scaling` and the 5.x layout with `rope_parameters`); `to_hf` writes one
back that both versions read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import warnings
from typing import Any, Mapping

import numpy as np

from jaxdec.checks import check_bool, check_int, check_param_dtype, concrete_scalar, warn_caller

# model_type -> HF architecture class name. The Llama family shares one implementation.
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")
SUPPORTED_ACTIVATIONS = ("silu",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary embedding parameters.

    `rope_type` is one of SUPPORTED_ROPE_TYPES: "default" (plain RoPE), "linear" (positions
    divided by `factor`), "llama3" (Llama 3.1 frequency-dependent scaling, with
    `low_freq_factor` and `high_freq_factor`) or "yarn" (YaRN, as in Qwen2.5's long-context
    configs: frequencies turning fewer than `beta_slow` times over the original context are
    divided by `factor`, those turning more than `beta_fast` times are kept, a linear ramp
    between (its ends rounded outwards when `truncate`); cos and sin are multiplied by
    `attention_factor`, by default 0.1 ln(factor) + 1). "llama3" and "yarn" need
    `original_max_position_embeddings`, the context the model was trained at. "dynamic"
    (dynamic NTK) is plain RoPE up to max_position_embeddings, the longest sequence served
    (transformers raises theta by `factor` only for longer ones); `factor` is kept for export.
    """

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        # Numbers as Python numbers (a 0-d array is unhashable: the config is a static
        # argument, and failed only at the first traced call).
        for name in ("theta", "factor", "low_freq_factor", "high_freq_factor", "beta_fast",
                     "beta_slow", "attention_factor"):
            value = concrete_scalar(name, getattr(self, name))
            if value is None and name == "attention_factor":
                continue
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise ValueError(f"rope {name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.original_max_position_embeddings is not None:
            object.__setattr__(self, "original_max_position_embeddings", check_int(
                "original_max_position_embeddings", self.original_max_position_embeddings,
                minimum=0))
        object.__setattr__(self, "truncate", check_bool("rope truncate", self.truncate))
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type={self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )
        if not (math.isfinite(self.theta) and self.theta > 0):
            raise ValueError(f"rope theta must be positive and finite, got {self.theta}")
        if self.rope_type != "default" and not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"rope scaling factor must be positive and finite, got "
                             f"{self.factor}")
        if self.rope_type in ("llama3", "yarn"):
            if self.original_max_position_embeddings is None:
                raise ValueError(f"{self.rope_type} rope scaling needs "
                                 "original_max_position_embeddings")
            if self.original_max_position_embeddings < 1:
                raise ValueError("original_max_position_embeddings must be >= 1, got "
                                 f"{self.original_max_position_embeddings}")
        if self.rope_type == "llama3":
            if self.high_freq_factor <= self.low_freq_factor:
                raise ValueError(
                    "llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                    f"{self.high_freq_factor} <= {self.low_freq_factor}"
                )
        if self.rope_type == "yarn":
            if self.theta == 1:
                raise ValueError("yarn rope scaling needs theta != 1")
            for name in ("beta_fast", "beta_slow"):
                if getattr(self, name) <= 0:
                    raise ValueError(f"yarn rope scaling needs {name} > 0, got "
                                     f"{getattr(self, name)}")
            if self.attention_factor is not None and self.attention_factor <= 0:
                raise ValueError(
                    f"rope attention_factor must be positive, got {self.attention_factor}")

    @property
    def attention_scale(self) -> float:
        """What cos and sin are multiplied by: YaRN's attention factor, 1 for other types."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        return _yarn_mscale(self.factor)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched `factor`-fold."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only Llama-family transformer (Llama 1/2/3, Mistral, Qwen2/2.5).

    Attributes:
      model_type: "llama", "mistral" or "qwen2" (the HF `model_type`).
      vocab_size, hidden_size, intermediate_size, num_layers: the usual sizes.
      num_heads, num_kv_heads, head_dim: attention geometry; any GQA/MQA ratio.
      layer_windows: per layer, the sliding-window size (a query at position p sees keys at
        positions > p - window) or None for full causal attention.
      qkv_bias / o_bias / mlp_bias: which projections carry a bias.
      rms_norm_eps: the RMSNorm epsilon.
      rope: the rotary embedding (`RopeConfig`: theta and scaling).
      max_position_embeddings: the positions the model serves (`max_positions` adds what
        rope scaling extends).
      tie_word_embeddings: the output projection is the embedding matrix (no `lm_head`).
      hidden_act: the MLP's activation ("silu"; HF's name).
      bos_token_id, pad_token_id: the checkpoint's ids, or None.
      eos_token_ids: the checkpoint's end-of-sequence ids (the CLI's default stop tokens):
        `from_hf` of a directory takes those of its generation_config.json and config.json.
      dtype: the checkpoint's dtype name, the default dtype when `load_pretrained` reads it
        (`init_model` takes its own `dtype` argument).
    """

    model_type: str = "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    layer_windows: tuple[int | None, ...] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            # numpy ints (sizes read from arrays) taken, stored as Python ints: a config is a
            # static argument, hashed and compared by value and type.
            object.__setattr__(self, name, check_int(name, getattr(self, name)))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; supported: {SUPPORTED_ACTIVATIONS}"
            )
        windows = (None,) * self.num_layers if self.layer_windows is None else tuple(
            None if w is None else check_int("a layer's sliding window (or None)", w)
            for w in self.layer_windows)
        object.__setattr__(self, "layer_windows", windows)
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(
                f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} "
                "layers (config.replace(num_layers=...) keeps a uniform window)"
            )
        for name in ("qkv_bias", "o_bias", "mlp_bias", "tie_word_embeddings"):
            # (a string "no" was truthy: a model with biases)
            object.__setattr__(self, name, check_bool(name, getattr(self, name)))
        eos = () if self.eos_token_ids is None else self.eos_token_ids
        if np.ndim(eos) == 0 and not isinstance(eos, (str, bytes)):
            eos = (eos,)  # one id, as config.json's eos_token_id often is
        elif isinstance(eos, (str, bytes)) or not hasattr(eos, "__iter__"):
            raise TypeError(f"eos_token_ids must be token ids (a tuple of ints), got {eos!r}")
        object.__setattr__(self, "eos_token_ids", tuple(
            check_int("eos_token_ids entries", t, minimum=0) for t in eos))
        if not isinstance(self.rope, RopeConfig):
            raise TypeError(f"rope must be a jaxdec.RopeConfig, got {type(self.rope).__name__}")
        eps = self.rms_norm_eps
        if (isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps)
                or eps <= 0):
            # 0 divides a zero row by zero; a negative value can take a root of a negative
            raise ValueError(f"rms_norm_eps must be a finite number > 0, got {eps!r}")
        object.__setattr__(self, "rms_norm_eps", float(eps))
        # The name of a floating-point dtype ("bfloat16"; a dtype object is taken by its name).
        object.__setattr__(self, "dtype", check_param_dtype(self.dtype, held=False).name)

    @property
    def max_positions(self) -> int:
        """The longest sequence the model takes: `max_position_embeddings`, or with YaRN
        `factor` x `original_max_position_embeddings` where that is longer (Qwen2.5's
        long-context recipe adds YaRN with factor 4 to a config whose max_position_embeddings
        stays at the original 32768)."""
        rope = self.rope
        if rope.rope_type == "yarn":
            stretched = int(rope.factor * rope.original_max_position_embeddings)
            return max(self.max_position_embeddings, stretched)
        return self.max_position_embeddings

    def describe_max_positions(self) -> str:
        """Where `max_positions` comes from, for error messages."""
        if self.max_positions == self.max_position_embeddings:
            said = f"max_position_embeddings={self.max_position_embeddings}"
            if self.rope.rope_type == "dynamic":
                said += ("; dynamic NTK scaling past it, a theta that changes with the "
                         "sequence's length, is not implemented")
            elif self.rope.rope_type == "linear":
                # (some long-context checkpoints keep the original context there, the
                # trained one in another field)
                said += (f"; a checkpoint trained longer with its linear RoPE factor "
                         f"{self.rope.factor:g} takes more positions once its config says so: "
                         f"dataclasses.replace(model, config=model.config.replace("
                         f"max_position_embeddings=...))")
            return said
        return (f"YaRN's factor {self.rope.factor:g} x original_max_position_embeddings "
                f"{self.rope.original_max_position_embeddings}")

    @property
    def q_per_kv(self) -> int:
        """Query heads per KV head (the GQA group size)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        """A copy with `changes`; a new num_layers keeps a uniform sliding window."""
        if "num_layers" in changes and "layer_windows" not in changes:
            if len(set(self.layer_windows)) > 1:
                raise ValueError("changing num_layers needs new layer_windows (they differ per layer)")
            changes["layer_windows"] = self.layer_windows[:1] * changes["num_layers"]
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF conversion

    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from an HF `config.json` (a path, a model directory or a dict)."""
        hf = _read_hf_config(source) if not isinstance(source, Mapping) else dict(source)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            archs = hf.get("architectures") or []
            by_arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            model_type = next((by_arch[a] for a in archs if a in by_arch), model_type)
            named = hf.get("model_type")
            if named is not None and model_type in SUPPORTED_ARCHITECTURES:
                # (a fine-tune's renamed model_type, or another model transformers builds
                # differently: what it computes beyond the named class is not reproduced)
                warn_caller(
                    f"config.json's model_type {named!r} is not one jaxdec implements; loading "
                    f"it as {model_type} because its architectures name "
                    f"{SUPPORTED_ARCHITECTURES[model_type]} (transformers builds models by "
                    f"model_type: where {named!r} computes something else, the logits differ)")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture: model_type={hf.get('model_type')!r}, "
                f"architectures={hf.get('architectures')!r}; supported: "
                + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
            )
        def required_int(field: str) -> int:
            if hf.get(field) is None:
                raise ValueError(f"config.json is missing the required field {field!r}"
                                 + (" (it is null)" if field in hf else ""))
            return _hf_int(hf, field, minimum=1)

        hidden = required_int("hidden_size")
        heads = required_int("num_attention_heads")
        required = {
            "vocab_size": required_int("vocab_size"),
            "intermediate_size": required_int("intermediate_size"),
            "num_layers": required_int("num_hidden_layers"),
        }
        # (transformers' attention reads `head_dim or hidden // heads`)
        head_dim = _hf_int(hf, "head_dim", None) or hidden // heads
        if _hf_number(hf, "partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        num_layers = required["num_layers"]
        if model_type == "llama":
            qkv_bias = o_bias = _hf_bool(hf, "attention_bias", False)
            mlp_bias = _hf_bool(hf, "mlp_bias", False)
        elif model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:  # mistral
            qkv_bias = o_bias = mlp_bias = False
        eos = _ids(hf, "eos_token_id")
        if not isinstance(source, Mapping):
            # What transformers' generate stops at: generation_config.json's ids (Llama 3
            # Instruct's end of turn, <|eot_id|>, is listed only there), then config.json's.
            generation_eos = _ids(read_generation_config(source), "eos_token_id",
                                  label="generation_config.json's")
            eos = generation_eos + tuple(t for t in eos if t not in generation_eos)
        dtype = _hf_dtype(hf)
        hidden_act = hf.get("hidden_act", "silu")
        hidden_act = "silu" if hidden_act == "swish" else hidden_act  # transformers' other name
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            num_heads=heads,
            # transformers: a missing field is the model type's default (Mistral's 8,
            # Qwen2's 32), a null one the query heads.
            num_kv_heads=(_hf_int(hf, "num_key_value_heads", heads)
                          if "num_key_value_heads" in hf
                          else DEFAULT_KV_HEADS.get(model_type, heads)),
            head_dim=head_dim,
            rms_norm_eps=_hf_number(hf, "rms_norm_eps", 1e-6),
            rope=_rope_from_hf(hf),
            max_position_embeddings=_max_positions(hf, model_type),
            layer_windows=_windows_from_hf(hf, model_type, num_layers),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            tie_word_embeddings=_hf_bool(hf, "tie_word_embeddings", False),
            hidden_act=hidden_act,
            bos_token_id=_hf_int(hf, "bos_token_id", None, minimum=None),
            eos_token_ids=eos,
            pad_token_id=_hf_int(hf, "pad_token_id", None, minimum=None),
            dtype=dtype,
            **required,
        )

    def to_hf(self) -> dict[str, Any]:
        """An HF `config.json` dict that transformers 4.x and 5.x both load, to the same model.

        YaRN: transformers versions disagree on where the original context comes from (4.46:
        max_position_embeddings, the rope_scaling key unknown to it; 4.51: rope_scaling's
        original_max_position_embeddings, which then also replaces `factor` by the ratio of
        max_position_embeddings to it; 5.x: the top-level key, then rope_scaling's, then
        max_position_embeddings). Written as max_position_embeddings = the top-level
        original_max_position_embeddings = the original context, with `factor` in rope_scaling,
        every version computes this config's frequencies and scale, and the longest sequence
        (`max_positions`, factor x original) is unchanged. (A max_position_embeddings beyond
        factor x original stays as it is, the original context at the top level only: then
        only transformers 5.x reads it as jaxdec does.)"""
        windows = {w for w in self.layer_windows if w is not None}
        if len(windows) > 1:
            raise ValueError(f"cannot express several window sizes {sorted(windows)} in HF config")
        window = windows.pop() if windows else None
        hf: dict[str, Any] = {
            "architectures": [SUPPORTED_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                             else (self.eos_token_ids[0] if self.eos_token_ids else None)),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.dtype,
            "rope_theta": self.rope.theta,
            "rope_scaling": _rope_to_hf(self.rope),
        }
        if self.rope.rope_type == "yarn":
            original = self.rope.original_max_position_embeddings
            hf["original_max_position_embeddings"] = original
            if self.max_positions == int(self.rope.factor * original):
                hf["max_position_embeddings"] = original
        if self.model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise ValueError("Llama checkpoints have one attention_bias for q, k, v and o")
            hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif (self.qkv_bias, self.o_bias, self.mlp_bias) != (self.model_type == "qwen2", False, False):
            raise ValueError(f"{self.model_type} checkpoints cannot express these bias settings")
        if self.model_type == "mistral":
            hf["sliding_window"] = window
            if window is not None and None in self.layer_windows:
                # Read by transformers 5 as a Ministral config (4.x reads no layer_types).
                hf["layer_types"] = ["full_attention" if w is None else "sliding_attention"
                                     for w in self.layer_windows]
        elif self.model_type == "qwen2":
            hf["sliding_window"] = window
            hf["use_sliding_window"] = window is not None
            hf["layer_types"] = [
                "full_attention" if w is None else "sliding_attention" for w in self.layer_windows
            ]
            # transformers 4.x derives the layer types from max_window_layers instead.
            first = next((i for i, w in enumerate(self.layer_windows) if w is not None), self.num_layers)
            if any(w is None for w in self.layer_windows[first:]):
                raise ValueError("Qwen2 sliding layers must be a suffix of the layer stack")
            hf["max_window_layers"] = first
        elif window is not None:
            raise ValueError("Llama checkpoints have no sliding window")
        return hf


def _ids(hf: Mapping[str, Any], field: str, *, label: str = "config.json's") -> tuple:
    """hf[field], a token id or a list of them (null: none), as a tuple of ints."""
    value = hf.get(field)
    if value is None:
        return ()
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if any(v is None for v in values):
        raise ValueError(f"{label} {field} must be a token id (an integer >= 0) or a list of "
                         f"them, got {value!r}")
    return tuple(_hf_int({field: v}, field, label=label) for v in values)


# Typed reads of config.json fields. transformers keeps what it reads as given, so a string
# "false" or a fractional head count fails (or, as a truthy flag, silently changes the model)
# only far from the file; here it is a ValueError naming the field.
_MISSING = object()


def _hf_value(hf: Mapping[str, Any], field: str, default):
    value = hf.get(field)
    if value is None:
        if default is _MISSING:
            raise ValueError(f"config.json is missing the required field {field!r}")
        return default, False
    return value, True


def _hf_int(hf: Mapping[str, Any], field: str, default=_MISSING, *, minimum: int | None = 0,
            label: str = "config.json's"):
    """hf[field] as an int (a JSON number with no fraction), `default` when absent or null."""
    value, present = _hf_value(hf, field, default)
    if not present:
        return value
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not value.is_integer())
            or (minimum is not None and value < minimum)):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{label} {field} must be an integer{bound}, got {value!r}")
    return int(value)


def _hf_number(hf: Mapping[str, Any], field: str, default=_MISSING, *,
               label: str = "config.json's"):
    """hf[field] as a finite float, `default` when absent or null."""
    value, present = _hf_value(hf, field, default)
    if not present:
        return value
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value)):
        raise ValueError(f"{label} {field} must be a finite number, got {value!r}")
    return float(value)


def _hf_bool(hf: Mapping[str, Any], field: str, default: bool, *,
             label: str = "config.json's") -> bool:
    """hf[field] as a bool (JSON true/false), `default` when absent or null."""
    value, present = _hf_value(hf, field, default)
    if present and not isinstance(value, bool):
        raise ValueError(f"{label} {field} must be true or false, got {value!r}")
    return value


def _hf_dtype(hf: Mapping[str, Any]) -> str:
    """The checkpoint's declared dtype name ("dtype", or transformers 4's "torch_dtype"),
    float32 when there is none; one that names no float dtype ("auto") is warned about and
    read as float32, what transformers loads by default."""
    value = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    name = str(value).replace("torch.", "")
    try:
        return check_param_dtype(name, held=False).name
    except (TypeError, ValueError):
        field = "dtype" if hf.get("dtype") else "torch_dtype"
        warnings.warn(f"config.json's {field}={value!r} names no dtype jaxdec holds parameters "
                      "in (float32, bfloat16, float16): the default dtype is float32 "
                      "(load_pretrained's dtype= chooses another)")
        return "float32"


def read_generation_config(source, *, warn: bool = True) -> dict[str, Any]:
    """The generation_config.json beside a config.json, or {} when there is none or it is not
    a JSON object (transformers falls back to the model config then too: a warning here,
    unless not `warn`)."""
    path = os.fspath(source)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    path = os.path.join(directory, "generation_config.json")
    if not os.path.exists(path):
        return {}
    try:
        return read_json_object(path)
    except (OSError, ValueError) as e:
        if warn:
            warnings.warn(f"ignoring {e}")
        return {}


def _read_hf_config(source) -> dict[str, Any]:
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise unreachable(path) or FileNotFoundError(f"no config.json at {path}")
    return read_json_object(path)


def unreachable(path: str) -> OSError | None:
    """Why a path that `os.path.exists` denies is there but cannot be read (a broken link: a
    pruned cache's blob; a folder on the way that may not be searched), or None: absent."""
    if os.path.islink(path):
        return FileNotFoundError(f"{path} is a broken link (to {os.readlink(path)}): an "
                                 "interrupted download, or a pruned cache?")
    try:
        os.stat(path)
    except PermissionError as e:
        return PermissionError(f"{path} cannot be reached ({e.strerror}): check the "
                               "permissions of the folders on its way")
    except OSError:
        pass
    return None


def read_json_object(path: str) -> dict[str, Any]:
    """The JSON object in a file (config.json, tokenizer_config.json, ...), or a ValueError
    naming the file when it is not valid UTF-8 JSON or not an object (OSError as raised)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return value


# transformers' defaults where a config.json leaves max_position_embeddings out (LlamaConfig,
# MistralConfig, Qwen2Config).
DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768}
# ... and num_key_value_heads (LlamaConfig's is the query heads').
DEFAULT_KV_HEADS = {"mistral": 8, "qwen2": 32}


def _max_positions(hf: Mapping[str, Any], model_type) -> int:
    return _hf_int(hf, "max_position_embeddings", DEFAULT_MAX_POSITIONS.get(model_type, 2048))


_ROPE = "config.json's rope scaling"


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
    # transformers 5 keeps theta and scaling together in `rope_parameters`; 4.x has top-level
    # `rope_theta` and an optional `rope_scaling` dict whose type key is `rope_type` or `type`.
    params, scaling = ({} if hf.get(name) is None else hf[name]
                       for name in ("rope_parameters", "rope_scaling"))
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, Mapping):
            raise ValueError(f"config.json's {name} must be an object or null, got {value!r}")
    nested = sorted(k for k, v in params.items() if isinstance(v, Mapping))
    if nested:   # (read flat, they were ignored: default rope at theta 1e4)
        raise ValueError(f"rope_parameters per layer type ({', '.join(nested)}) are not "
                         "supported")
    # Both layouts in one file must agree (transformers 5 reads rope_scaling first and the
    # top-level theta; an earlier jaxdec read rope_parameters': two models from one file).
    kind = {name: d.get("rope_type") or d.get("type") or "default"
            for name, d in (("rope_parameters", params), ("rope_scaling", scaling)) if d}
    if len(set(kind.values())) > 1:
        raise ValueError(f"config.json's rope_parameters ({kind['rope_parameters']}) and "
                         f"rope_scaling ({kind['rope_scaling']}) disagree: keep one")
    if params and scaling:
        # transformers reads rope_scaling and the top-level theta then (4.x knows no
        # rope_parameters; 5.x takes `rope_scaling or rope_parameters`): whatever
        # rope_parameters says beyond them would be ignored there, so it must agree.
        top = hf.get("rope_theta")
        merged = {**scaling, "rope_theta": 10000.0 if top is None else top}
        if scaling.get("rope_theta", merged["rope_theta"]) != merged["rope_theta"]:
            raise ValueError(f"config.json's rope_scaling gives rope_theta="
                             f"{scaling['rope_theta']!r} where the top level gives "
                             f"{merged['rope_theta']!r} (or its default): keep one")
        for key in sorted(set(params) - {"rope_type", "type"}):
            if key not in merged or params[key] != merged[key]:
                said = (f"{merged[key]!r}" if key in merged else "nothing") + (
                    " (the top-level rope_theta or its default)" if key == "rope_theta" else "")
                raise ValueError(
                    f"config.json's rope_parameters gives {key}={params[key]!r} where "
                    f"rope_scaling, which transformers reads, gives {said}: keep one")
    else:
        if ("rope_theta" in params and "rope_theta" in hf
                and params["rope_theta"] != hf["rope_theta"]):
            raise ValueError(f"config.json's rope_theta ({hf['rope_theta']!r}) and "
                             f"rope_parameters' ({params['rope_theta']!r}) disagree: keep one")
        merged = {**scaling, **params}
    if _hf_number(merged, "partial_rotary_factor", 1.0, label=_ROPE) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    theta = _hf_number(merged, "rope_theta", None, label=_ROPE)
    theta = _hf_number(hf, "rope_theta", 10000.0) if theta is None else theta
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    kwargs: dict[str, Any] = {"theta": theta, "rope_type": rope_type}
    required = {"linear": ("factor",), "dynamic": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(rope_type, ())
    missing = [key for key in required if merged.get(key) is None]
    if missing:   # (transformers refuses them too; they were read as defaults)
        raise ValueError(f"config.json's {rope_type} rope scaling lacks {', '.join(missing)}")
    if rope_type in ("linear", "llama3", "dynamic"):
        kwargs["factor"] = _hf_number(merged, "factor", label=_ROPE)
    if rope_type in ("llama3", "yarn"):
        # transformers' order: a top-level value (as Phi-3 writes it), the scaling dict's, the
        # model's context.
        kwargs["original_max_position_embeddings"] = (
            _hf_int(hf, "original_max_position_embeddings", None)
            or _hf_int(merged, "original_max_position_embeddings", None, label=_ROPE)
            or _max_positions(hf, hf.get("model_type")))
    if rope_type == "llama3":
        kwargs.update(
            low_freq_factor=_hf_number(merged, "low_freq_factor", label=_ROPE),
            high_freq_factor=_hf_number(merged, "high_freq_factor", label=_ROPE),
        )
    if rope_type == "yarn":
        factor = _hf_number(merged, "factor", None, label=_ROPE)
        if factor is None:  # DeepSeek-V3's way: the ratio of the two contexts
            factor = (_max_positions(hf, hf.get("model_type"))
                      / kwargs["original_max_position_embeddings"])
        attention_factor, mscale, mscale_all_dim = (
            _hf_number(merged, name, None, label=_ROPE)
            for name in ("attention_factor", "mscale", "mscale_all_dim"))
        if attention_factor is None and mscale and mscale_all_dim:
            attention_factor = (_yarn_mscale(factor, mscale)
                                / _yarn_mscale(factor, mscale_all_dim))
        kwargs.update(
            factor=factor,
            beta_fast=_hf_number(merged, "beta_fast", None, label=_ROPE) or 32.0,
            beta_slow=_hf_number(merged, "beta_slow", None, label=_ROPE) or 1.0,
            attention_factor=attention_factor,
            truncate=_hf_bool(merged, "truncate", True, label=_ROPE),
        )
    return RopeConfig(**kwargs)


def _rope_to_hf(rope: RopeConfig) -> dict[str, Any] | None:
    if rope.rope_type == "default":
        return None
    out: dict[str, Any] = {"rope_type": rope.rope_type, "factor": rope.factor}
    if rope.rope_type == "llama3":
        out.update(
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
        )
    if rope.rope_type == "yarn":  # the original context goes at the top level (`to_hf`)
        out.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow)
        if rope.attention_factor is not None:
            out["attention_factor"] = rope.attention_factor
        if not rope.truncate:  # written only when set: older transformers do not know the key
            out["truncate"] = False
    return out


# transformers' defaults where config.json lacks a field (MistralConfig's and Qwen2Config's):
# a missing field means these, a null one no window.
DEFAULT_SLIDING_WINDOW = 4096
DEFAULT_QWEN2_MAX_WINDOW_LAYERS = 28


def _windows_from_hf(hf: Mapping[str, Any], model_type: str, num_layers: int):
    window = hf.get("sliding_window", DEFAULT_SLIDING_WINDOW)
    if model_type == "llama" or window is None:
        return (None,) * num_layers
    window = _hf_int({"sliding_window": window}, "sliding_window", minimum=1)
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        if not (isinstance(layer_types, list)
                and all(t in ("full_attention", "sliding_attention") for t in layer_types)):
            raise ValueError(f"config.json's layer_types must be a list of 'full_attention' and "
                             f"'sliding_attention', got {layer_types!r}")
        if len(layer_types) != num_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    if model_type == "mistral":
        # With layer_types, transformers 5 reads a Mistral config as Ministral's (the same
        # layers, the window on the layers it names); without, every layer has the window.
        if layer_types is None:
            return (window,) * num_layers
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    # qwen2: the window applies only with use_sliding_window, to the layers named by
    # layer_types (transformers 5) or else to those from max_window_layers on.
    if not _hf_bool(hf, "use_sliding_window", False):
        return (None,) * num_layers
    if layer_types is not None:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    first = _hf_int(hf, "max_window_layers", DEFAULT_QWEN2_MAX_WINDOW_LAYERS)
    return tuple(window if i >= first else None for i in range(num_layers))
