"""jaxdec: fast, exact LLM decoding in JAX."""

from jaxdec.config import ModelConfig, RopeConfig
from jaxdec.parallel import make_mesh
from jaxdec.model import Model, forward, init_model
from jaxdec.cache import Cache, init_cache, commit
from jaxdec.checkpoint import load_pretrained, save_pretrained
from jaxdec.sampling import Greedy, Sampler
from jaxdec.generate import generate, generate_padded, GenerateResult
