"""Training with optax and orbax: language models from scratch (`train_lm`) and draft models
distilled from a target (`train_draft`), with presets sized for CPUs and one H100."""

from jaxdec.train.distill import train_draft
from jaxdec.train.lm import train_lm
from jaxdec.train.loop import Interrupted
from jaxdec.train.presets import PRESETS, Preset, Shape, get_preset

__all__ = ["PRESETS", "Interrupted", "Preset", "Shape", "get_preset", "train_draft", "train_lm"]
