"""Training presets: a target shape, a draft shape and how long to train each.

`cpu-tiny` trains a target in under five minutes on two CPU cores (the demo's default).
`gpu-small` (~28M-parameter target) and `gpu-base` (~88M) are sized for one H100, target and
draft together within a single 10-minute device call (the step counts are the knob, `--steps`
overrides them). Measured on an H200, each trained alone (bench/results/train-h200.md):
gpu-small 100 s + 34 s, gpu-base 277 s + 65 s at MFU 0.35.
"""

from __future__ import annotations

import dataclasses

from jaxdec.checks import check_int
from jaxdec.data import MIN_VOCAB_SIZE
from jaxdec.config import ModelConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shape:
    """A Llama-family model shape (head_dim = hidden_size // num_heads; tied embeddings)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check_int(f"Shape.{field.name}", getattr(self, field.name))
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"Shape: num_heads={self.num_heads} must divide hidden_size="
                             f"{self.hidden_size}, and num_kv_heads={self.num_kv_heads} must "
                             "divide num_heads")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"Shape: the head dim, hidden_size / num_heads = {self.hidden_size}"
                             f" / {self.num_heads}, must be even (rotary embeddings rotate "
                             "pairs)")

    def config(self, vocab_size: int, max_positions: int, eos_token_id: int) -> ModelConfig:
        return ModelConfig(
            model_type="llama", vocab_size=vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.hidden_size // self.num_heads, max_position_embeddings=max_positions,
            tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=eos_token_id,
            eos_token_ids=(eos_token_id,), pad_token_id=eos_token_id,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preset:
    """Everything a `jaxdec train` run needs besides the corpus and the output directory."""

    name: str
    description: str
    vocab_size: int
    seq_len: int
    batch_size: int
    max_positions: int
    target: Shape
    target_steps: int
    target_learning_rate: float
    draft: Shape
    draft_steps: int
    draft_learning_rate: float
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    max_train_bytes: int | None = None
    site_packages: bool = False  # on accelerators: add site-packages sources to the corpus
    eval_tokens: int = 65536  # held-out tokens evaluated at the end

    def __post_init__(self):
        """Bad settings are named here, not found as a division by zero mid-run."""
        for name in ("vocab_size", "seq_len", "batch_size", "max_positions", "target_steps",
                     "draft_steps", "checkpoint_every", "eval_tokens"):
            check_int(f"Preset.{name}", getattr(self, name))
        if self.max_train_bytes is not None:
            check_int("Preset.max_train_bytes", self.max_train_bytes)
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"Preset.vocab_size must be >= {MIN_VOCAB_SIZE} (a byte-level "
                             f"vocabulary: 256 bytes, end-of-text and a merge), got "
                             f"{self.vocab_size}")
        if self.seq_len > self.max_positions:
            raise ValueError(f"Preset: seq_len={self.seq_len} is longer than max_positions="
                             f"{self.max_positions} (the model's position limit)")
        for name in ("target", "draft"):
            if not isinstance(getattr(self, name), Shape):
                raise TypeError(f"Preset.{name} must be a Shape, got {getattr(self, name)!r}")
        for name, low, high in (("target_learning_rate", 0.0, None),
                                ("draft_learning_rate", 0.0, None), ("grad_clip", 0.0, None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
                raise ValueError(f"Preset.{name} must be a number > {low}, got {value!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"Preset.warmup_fraction must be in [0, 1), got "
                             f"{self.warmup_fraction!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"Preset.weight_decay must be >= 0, got {self.weight_decay!r}")


PRESETS = {
    "cpu-tiny": Preset(
        name="cpu-tiny",
        description="~2M-parameter target, 0.5M draft; minutes on two CPU cores",
        vocab_size=2048, seq_len=128, batch_size=16, max_positions=1024,
        target=Shape(hidden_size=192, num_layers=4, num_heads=4, num_kv_heads=2,
                     intermediate_size=512),
        target_steps=500, target_learning_rate=3e-3,
        draft=Shape(hidden_size=128, num_layers=1, num_heads=4, num_kv_heads=2,
                    intermediate_size=384),
        draft_steps=200, draft_learning_rate=3e-3,
        checkpoint_every=40, max_train_bytes=6 * 2**20, eval_tokens=32768,
    ),
    "gpu-small": Preset(
        name="gpu-small",
        description="~28M-parameter target, ~4M draft; one H100, about 3 minutes for both",
        vocab_size=8192, seq_len=512, batch_size=64, max_positions=2048,
        target=Shape(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                     intermediate_size=1408),
        target_steps=1500, target_learning_rate=1e-3,
        draft=Shape(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=704),
        draft_steps=600, draft_learning_rate=2e-3,
        checkpoint_every=500, max_train_bytes=96 * 2**20, site_packages=True,
        eval_tokens=262144,
    ),
    "gpu-base": Preset(
        name="gpu-base",
        description="~88M-parameter target, ~10M draft; one H100, about 6 minutes for both",
        vocab_size=16384, seq_len=1024, batch_size=64, max_positions=4096,
        target=Shape(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                     intermediate_size=2048),
        target_steps=1300, target_learning_rate=6e-4,
        draft=Shape(hidden_size=384, num_layers=2, num_heads=6, num_kv_heads=2,
                    intermediate_size=1024),
        draft_steps=500, draft_learning_rate=1.5e-3,
        checkpoint_every=500, max_train_bytes=192 * 2**20, site_packages=True,
        eval_tokens=524288,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]
