"""Argument checks shared by the public entry points (run before anything is traced)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_int(name: str, value, minimum: int = 1) -> int:
    """`value` as a Python int (numpy integers too: sizes and static arguments are hashed and
    compared by value and type), or a ValueError naming `name` for anything else (a bool, a
    float, a string) or a value below `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_bool(name: str, value) -> bool:
    """`value` if it is a bool (numpy's too), or a TypeError naming `name`: a flag given as a
    string or a number is a mistake, not a truth value."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_int_array(name: str, value) -> jax.Array:
    """`value` (an array, a tracer, nested lists) as an int32 array, or a TypeError naming
    `name` when its values are not integers (None, strings, floats: an int32 cast would
    truncate 0.5 to 0)."""
    array = value if isinstance(value, jax.Array) else np.asarray(value)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got {_describe(value)}")
    return jnp.asarray(array, jnp.int32)


def _describe(value) -> str:
    dtype = getattr(value, "dtype", None)
    return f"{type(value).__name__} of {dtype}" if dtype is not None else repr(value)


def check_model(model) -> None:
    """A TypeError unless `model` is a `jaxdec.Model` (what `load_pretrained` returns)."""
    from jaxdec.model import Model

    if not isinstance(model, Model):
        raise TypeError(f"model must be a jaxdec Model, got {type(model).__name__}")


def check_config(config) -> None:
    """A TypeError unless `config` is a `jaxdec.ModelConfig` (a model's `.config`)."""
    from jaxdec.config import ModelConfig

    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a jaxdec ModelConfig, got {type(config).__name__}")


def check_param_dtype(dtype) -> np.dtype:
    """`dtype` (a name or a type) as the floating-point dtype parameters or a cache are held
    in: a TypeError for what is no dtype, a ValueError for one that is not floating point
    (integer weights or keys would truncate every value)."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype={dtype!r} is not a dtype") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"dtype={resolved.name} is not floating point (float32, bfloat16 or "
                         "float16)")
    return resolved
