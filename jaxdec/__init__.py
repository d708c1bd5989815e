"""jaxdec: fast, exact LLM decoding in JAX.

Load a Hugging Face checkpoint and generate:

    model = jaxdec.load_pretrained("path/to/model", dtype="bfloat16")
    result = jaxdec.generate(model, [[1, 2, 3]], max_new_tokens=32)

Models and caches are pytrees; `generate_padded` is the pure, jittable form of `generate`.
"""

from jaxdec.cache import Cache, commit, init_cache
from jaxdec.checkpoint import load_pretrained, save_pretrained
from jaxdec.config import ModelConfig, RopeConfig
from jaxdec.generate import GenerateResult, generate, generate_padded
from jaxdec.model import Model, abstract_model, forward, init_model
from jaxdec.models.layers import AttentionImpl, MatmulImpl
from jaxdec.parallel import make_mesh
from jaxdec.prefix_cache import PrefixCache
from jaxdec.sampling import Greedy, Sampler
from jaxdec.speculative import SpecStats, SpeculativeResult, speculative_generate
from jaxdec.streaming import TextStream
from jaxdec import benchmark, chat, drafters, tree  # noqa: E402  (submodules)

__version__ = "0.1.0"

__all__ = [
    "AttentionImpl",
    "MatmulImpl",
    "Cache",
    "GenerateResult",
    "Greedy",
    "Model",
    "ModelConfig",
    "PrefixCache",
    "RopeConfig",
    "Sampler",
    "SpecStats",
    "SpeculativeResult",
    "TextStream",
    "abstract_model",
    "benchmark",
    "chat",
    "commit",
    "drafters",
    "forward",
    "generate",
    "generate_padded",
    "init_cache",
    "init_model",
    "load_pretrained",
    "make_mesh",
    "save_pretrained",
    "speculative_generate",
    "tree",
]
