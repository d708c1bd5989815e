"""Argument checks shared by the public entry points (run before anything is traced)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def concrete_scalar(name: str, value):
    """A 0-d array (numpy, or a jax Array holding a value) as its numpy scalar, for the checks
    of a number that shapes a program (a size, a sampler's setting); anything else as it is. A
    traced value is a TypeError naming `name`: such a number must be known before tracing."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a concrete number, got a traced value: it fixes the "
                        "compiled program, so it cannot be computed inside jit (pass a Python "
                        "number, or compute it outside)")
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == ():
        return np.asarray(value)[()]
    return value


def check_untraced(function: str, **arguments) -> None:
    """A TypeError naming `function` and the argument when any argument (a pytree: a model,
    prompts, a key) holds a traced value: a function that compiles and runs its own program
    and reads its results on the host cannot run inside jit (or vmap, grad)."""
    advice = ("It compiles and runs its own program and reads the results on the host: call "
              "it outside (it is one compiled program already), or jit its pure form: "
              "jaxdec.generate_padded for plain decoding, jaxdec.speculative.speculative_padded "
              "for speculative decoding")
    for name, value in arguments.items():
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value)):
            raise TypeError(
                f"{function} cannot run inside a jax transformation (jit, vmap, grad): its "
                f"argument {name!r} is traced. {advice}")
    # Arguments closed over by a jitted function are not traced, but an array made here is
    # (iota: made on the device, no host transfer).
    if isinstance(jax.lax.iota(jnp.int32, 1), jax.core.Tracer):
        raise TypeError(f"{function} cannot run inside jax.jit (or another trace: "
                        f"eval_shape, ...; the call is traced, closed over arguments too). "
                        f"{advice}")


def warn_caller(message: str, category=UserWarning) -> None:
    """`warnings.warn(message)` attributed to the first frame outside jaxdec (and Python's
    frozen modules, `os.walk`'s calling back): the user's line whichever of jaxdec's
    functions (and how many) lie between."""
    import os
    import sys
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def inside(frame) -> bool:
        name = frame.f_code.co_filename
        return name.startswith("<frozen ") or os.path.abspath(name).startswith(package)

    frame, level = sys._getframe(1), 2  # (stacklevel 2: the frame calling this function)
    while frame is not None and inside(frame):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def check_path(name: str, value) -> str:
    """`value` (a str or os.PathLike naming a file or directory) as a str with `~` expanded, or
    a TypeError naming `name` (`os.fspath`'s own error named no argument)."""
    import os

    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str or os.PathLike (a path), got "
                        f"{type(value).__name__}")
    return os.path.expanduser(text)


def check_int(name: str, value, minimum: int = 1) -> int:
    """`value` as a Python int (numpy integers and 0-d integer arrays too: sizes and static
    arguments are hashed and compared by value and type), or a ValueError naming `name` for
    anything else (a bool, a float, a string) or a value below `minimum`."""
    value = concrete_scalar(name, value)
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


def check_ids(name: str, ids: np.ndarray, vocab_size: int) -> None:
    """A ValueError naming `name` and the first offenders where the host ids `ids` (any
    integer width) fall outside [0, vocab_size)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        raise ValueError(f"{name} has ids outside [0, {vocab_size}): {bad[:5].tolist()}")


def _describe(value) -> str:
    dtype = getattr(value, "dtype", None)
    return f"{type(value).__name__} of {dtype}" if dtype is not None else repr(value)


def check_model(model) -> None:
    """A TypeError unless `model` is a `jaxdec.Model` (what `load_pretrained` returns), and
    `jaxdec.model.check_params`'s errors for params that do not fit its config."""
    from jaxdec.model import Model, check_params

    if not isinstance(model, Model):
        raise TypeError(f"model must be a jaxdec Model, got {type(model).__name__}")
    check_params(model)


def check_config(config) -> None:
    """A TypeError unless `config` is a `jaxdec.ModelConfig` (a model's `.config`)."""
    from jaxdec.config import ModelConfig

    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a jaxdec ModelConfig, got {type(config).__name__}")


def check_param_dtype(dtype, *, held: bool = True) -> np.dtype:
    """`dtype` (a name or a type) as the floating-point dtype parameters or a cache are held
    in: a TypeError for what is no dtype, a ValueError for one that is not floating point
    (integer weights or keys would truncate every value), a float8/float4 format or, for
    arrays to be `held` in it,
    a 64-bit one without jax's 64-bit mode (jax would quietly hold float32)."""
    if dtype is None:  # (jnp.dtype(None) is float64)
        raise TypeError("dtype=None is not a dtype: pass float32, bfloat16 or float16")
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype={dtype!r} is not a dtype") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"dtype={resolved.name} is not floating point (float32, bfloat16 or "
                         "float16)")
    if resolved.name not in ("float32", "bfloat16", "float16", "float64"):
        # (float8 and float4 formats: quantizations, which a checkpoint exported in them
        # cannot even express to transformers)
        raise ValueError(f"dtype={resolved.name} is no dtype jaxdec holds parameters or "
                         "caches in: pass float32, bfloat16 or float16")
    if held and resolved.itemsize == 8 and not jax.config.jax_enable_x64:
        raise ValueError(f"dtype={resolved.name} needs jax's 64-bit mode (jax.config.update("
                         "'jax_enable_x64', True)), without which arrays are float32: pass "
                         "float32, bfloat16 or float16")
    return resolved
