"""Samplers: frozen, hashable dataclasses (static arguments to jit) with one interface.

- `probs(logits)`: the processed distribution [..., V] in fp32 that a token is drawn from.
  Lossless speculative verification needs exactly this distribution.
- `sample(logits, key)`: draws token ids [...] from `probs(logits)`. For batched logits
  each row gets its own key split from `key`, so rows draw independent randomness.

`Sampler` applies, in order: temperature, top-k, top-p (nucleus), min-p. Ties at a top-k or
top-p boundary are all kept, so the distribution does not depend on sort order.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jaxdec.checks import check_int, concrete_scalar


# Draws take jax.random's "high" mode (two 32-bit words a uniform): with one word, float32
# Gumbel noise never reaches tokens of probability below ~1e-7 (a tail of 20000 such tokens
# holding 3e-4 of the mass was drawn once in 200k draws, not ~60 times), so draws would
# not follow `probs` (which lossless verification assumes of every draw).
DRAW_MODE = "high"


def draw(key: jax.Array, log_probs: jax.Array, **kwargs) -> jax.Array:
    """`jax.random.categorical` over the last axis, exact also for tiny probabilities."""
    return jax.random.categorical(key, log_probs, mode=DRAW_MODE, **kwargs)


def fine_uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 uniforms in [0, 1) on a grid of 2**-46 (rounded to float32 above 2**-23), from
    two words each as DRAW_MODE's draws: `jax.random.uniform`'s grid of 2**-23 makes
    `u < t` hold with probability 2**-23 for every 0 < t < 2**-23 (a draft token the
    target gives a millionth of the draft's probability was accepted at 1.2e-7, not 1e-12)."""
    coarse, fine = jax.random.uniform(key, (2, *shape), jnp.float32)
    return jnp.minimum(coarse + fine * jnp.float32(2.0**-23),  # (the sum may round up to 1)
                       jnp.nextafter(jnp.float32(1), jnp.float32(0)))


def _logits(logits) -> jax.Array:
    """`logits` as an array with a vocabulary axis (a ValueError naming it otherwise)."""
    logits = jnp.asarray(logits)
    if logits.ndim == 0:
        raise ValueError("logits must have a vocabulary axis (the last), got a scalar")
    return logits


def _sample_rows(probs_fn, logits: jax.Array, key: jax.Array) -> jax.Array:
    logits = _logits(logits)
    if key is None:
        raise ValueError("key is needed to sample (jax.random.key(seed))")

    def one(row, k):
        p = probs_fn(row)
        return draw(k, jnp.log(p)).astype(jnp.int32)

    if logits.ndim == 1:
        return one(logits, key)
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    keys = jax.random.split(key, flat.shape[0])
    return jax.vmap(one)(flat, keys).reshape(lead)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Greedy:
    """Always the most likely token (the first one on ties, as `argmax`)."""

    def probs(self, logits: jax.Array) -> jax.Array:
        logits = _logits(logits)
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)

    def sample(self, logits: jax.Array, key: jax.Array | None = None) -> jax.Array:
        del key
        return jnp.argmax(_logits(logits), axis=-1).astype(jnp.int32)

    @property
    def is_greedy(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampler:
    """Temperature sampling with optional top-k, top-p and min-p truncation.

    Args:
      temperature: >= 0; 0 means greedy (the argmax).
      top_k: keep the k most likely tokens (>= 1), or None.
      top_p: keep the smallest set of most likely tokens whose mass reaches top_p, in (0, 1],
        or None.
      min_p: keep tokens with probability >= min_p * (the top probability), in [0, 1], or None.

    Settings that change nothing are dropped (top_p=1 and min_p=0 become None; at temperature
    0 the truncations do), so samplers of one distribution are equal: a static argument, a
    Sampler compiles a program per distinct value.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self):
        # Python and numpy numbers alike (a Sampler is a static argument: its fields are
        # stored as Python floats and ints); bools are refused.
        def real(x):
            return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))

        for name in ("temperature", "top_k", "top_p", "min_p"):
            value = concrete_scalar(name, getattr(self, name))
            if isinstance(value, np.generic) and jnp.issubdtype(value.dtype, jnp.floating):
                value = float(value)  # (bf16 scalars are no numbers.Real)
            object.__setattr__(self, name, value)
        t = self.temperature
        if not real(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        k = None if self.top_k is None else check_int("top_k", self.top_k)
        if self.top_p is not None and (not real(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if self.min_p is not None and (not real(self.min_p) or not 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1] or None, got {self.min_p!r}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_k", k)
        for name in ("top_p", "min_p"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        no_op = {"top_p": 1.0, "min_p": 0.0}
        for name in ("top_k", "top_p", "min_p"):
            if self.temperature == 0 or (name in no_op and getattr(self, name) == no_op[name]):
                object.__setattr__(self, name, None)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: jax.Array) -> jax.Array:
        """The processed distribution [..., V] (fp32, sums to 1)."""
        logits = _logits(logits).astype(jnp.float32)
        if self.is_greedy:
            return Greedy().probs(logits)
        # Shifted by the row's max before the division: compiled, x / t and max(x / t) may
        # round apart, and at a tiny temperature that gap overflows exp (NaN probabilities).
        # A temperature below fp32's smallest normal number would be flushed to 0.
        t = max(self.temperature, float(np.finfo(np.float32).tiny))
        raw = logits
        logits = (raw - jnp.max(raw, axis=-1, keepdims=True)) / t
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            # The cut on the logits as given: the shift can round two of them to one value
            # (3, 1 and 1 - 2**-24 all but the first become -2), and the tie rule then kept
            # a token outside the top k.
            kth = jax.lax.top_k(raw, self.top_k)[0][..., -1:]
            logits = jnp.where(raw >= kth, logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        if self.top_p is not None and self.top_p < 1:
            desc = -jnp.sort(-probs, axis=-1)
            # A token is kept while the mass from it on (summed smallest first, as
            # transformers sums: the mass before it, summed largest first, rounds by a few
            # ulp near 1 and moved the cut-off by a token or more in large vocabularies)
            # exceeds 1 - top_p; the first is always kept.
            mass_from = jnp.cumsum(desc[..., ::-1], axis=-1)[..., ::-1]
            n_kept = jnp.maximum(jnp.sum(mass_from > jnp.float32(1 - self.top_p), axis=-1,
                                         keepdims=True), 1)
            # The smallest kept probability: the last token needed to reach top_p.
            threshold = jnp.take_along_axis(desc, n_kept - 1, axis=-1)
            probs = jnp.where(probs >= threshold, probs, 0.0)
        if self.min_p is not None and self.min_p > 0:
            top = jnp.max(probs, axis=-1, keepdims=True)
            probs = jnp.where(probs >= self.min_p * top, probs, 0.0)
        return probs / jnp.sum(probs, axis=-1, keepdims=True)

    def sample(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """Token ids [...] drawn from `probs(logits)`; batch rows use independent keys."""
        if self.is_greedy:
            return Greedy().sample(logits)
        return _sample_rows(self.probs, logits, key)


def check_sampler(sampler) -> Greedy | Sampler:
    """`sampler` itself (Greedy when None, or a Sampler at temperature 0: the same tokens, one
    compiled program); a TypeError for anything else."""
    if sampler is None:
        return Greedy()
    if not isinstance(sampler, (Greedy, Sampler)):
        raise TypeError(
            f"sampler must be jaxdec.Greedy() or jaxdec.Sampler(...), got {type(sampler).__name__}"
        )
    return Greedy() if sampler.is_greedy else sampler


def row_keys(key: jax.Array, batch: int) -> jax.Array:
    """[batch] keys, row b's from (key, b) alone: a row draws the same numbers whatever the
    batch it runs in (and whatever jax_threefry_partitionable says, unlike a split of
    `batch` keys)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(batch, dtype=jnp.int32))


def check_key(key, *, required: bool = False) -> jax.Array | None:
    """`key` as a typed PRNG key (None stays None unless `required`): a typed key
    (`jax.random.key(seed)`) as it is, a raw one (`jax.random.PRNGKey(seed)`: the default
    implementation's uint32 data) wrapped, so that both are one key and one compiled program;
    a TypeError naming the argument for anything else (an int seed, a batch of keys). The
    caller makes its default key after its other checks: making one runs a (first time:
    compiled) program."""
    if key is None and not required:
        return None
    shape, dtype = getattr(key, "shape", None), getattr(key, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape == ():
            return key
    elif dtype == jnp.uint32 and shape is not None and len(shape) == 1:
        try:  # the data of one key of the default implementation ((2,) for threefry)
            return jax.random.wrap_key_data(key)
        except (TypeError, ValueError):
            pass
    what = (f"an array of shape {shape} and dtype {dtype}" if dtype is not None
            else type(key).__name__)
    raise TypeError("key must be one PRNG key, jax.random.key(seed) or "
                    f"jax.random.PRNGKey(seed), got {what}")
