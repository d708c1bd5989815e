"""TPU programs compiled by libtpu's own compiler, on a machine without a TPU.

The interpret-mode tests run the Mosaic kernel's logic and the lowering tests check its block
shapes against Pallas's rules; neither runs Mosaic's compiler, which has rules of its own
(what each TPU generation has vectors of, how blocks tile its registers). With `libtpu`
installed (`pip install "jax[tpu]==<your jax>"`; `.ci/run` installs it for these tests) jax
describes TPU chips it does not have (`jax.experimental.topologies`, compile-only devices),
and XLA compiles whole programs for them: the kernel for each generation, and generate and
speculative programs with the kernel in them, at tp 1 and 2. Without libtpu these tests skip.
"""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("libtpu", reason="compiling for a TPU without one needs libtpu")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jaxdec  # noqa: E402
from bench.census import decode_loop  # noqa: E402
from bench.tpu_compile import devices_for  # noqa: E402
from jaxdec.drafters import DraftModel, PromptLookup  # noqa: E402
from jaxdec.pallas_kernels import tree_attention as TA  # noqa: E402

@functools.cache
def tpu_devices(generation: str) -> list:
    """Compile-only devices of a TPU generation's topology (bench.tpu_compile's: no TPU
    needed, libtpu compiles)."""
    return devices_for(generation)


def kernel_args(device, *, B, T, H, K, D, S, dtype):
    sharding = jax.sharding.SingleDeviceSharding(device)
    sd = functools.partial(jax.ShapeDtypeStruct, sharding=sharding)
    return (sd((B, T, H, D), dtype), sd((B, S, K, D), dtype), sd((B, S, K, D), dtype),
            sd((B,), jnp.int32), sd((B, T), jnp.int32), sd((B, T, T), jnp.bool_))


def compile_kernel(device, window, **shape):
    args = kernel_args(device, **shape)
    fn = lambda q, k, v, n, p, m: TA.tree_attention(  # noqa: E731
        q, k, v, n, p, mask_BTT=m, window=window, impl=TA.Impl.MOSAIC)
    return jax.jit(fn).trace(*args).lower().compile()


# (B, T, H, K, D, S, window): decode and verification at Llama-3-8B's heads, MQA, no GQA,
# a 256-wide head, caches whose key blocks are 512 / 256 / 8 slots (136 = 17 x 8), a window.
KERNEL_CASES = [
    (1, 1, 32, 8, 128, 4096, None),
    (2, 16, 32, 8, 128, 1024, None),
    (2, 64, 32, 8, 128, 256, 100),
    (3, 128, 12, 1, 128, 512, None),
    (2, 5, 8, 8, 256, 136, 7),
    (8, 31, 28, 4, 128, 32768, 4000),
]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("case", KERNEL_CASES,
                         ids=lambda c: "B{}-T{}-H{}-K{}-D{}-S{}-w{}".format(*c))
def test_mosaic_kernel_compiles_for_tpu_v5e(case, dtype):
    B, T, H, K, D, S, window = case
    compiled = compile_kernel(tpu_devices("v5e")[0], window, B=B, T=T, H=H, K=K, D=D, S=S,
                              dtype=dtype)
    assert "tree_attention" in compiled.as_text()


@pytest.mark.parametrize("generation", ["v6e", "v5p", "v4"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_mosaic_kernel_compiles_for_other_generations(generation, dtype):
    compile_kernel(tpu_devices(generation)[0], 50, B=2, T=16, H=32, K=8, D=128, S=1024,
                   dtype=dtype)


def test_fp16_is_refused_before_libtpu_would_fail():
    """libtpu's compiler has no fp16 vectors (checked here: the kernel is made to compile
    with the dispatcher's check skipped); the dispatcher refuses fp16 with a clear error."""
    device = tpu_devices("v5e")[0]
    shape = dict(B=1, T=4, H=8, K=2, D=128, S=256)
    with pytest.raises(ValueError, match="dtype float16 is not supported on TPUs"):
        compile_kernel(device, None, dtype=jnp.float16, **shape)
    args = kernel_args(device, dtype=jnp.float16, **shape)
    fn = lambda q, k, v, n, p, m: TA.tpu.tree_attention_tpu(  # noqa: E731
        q, k, v, n, p, m, window=None, block_sizes=TA.BlockSizes(block_k=256))
    with pytest.raises(Exception, match="Mosaic failed to compile"):
        jax.jit(fn).trace(*args).lower().compile()


# A small model whose heads the kernel takes (head dim 128) and whose KV heads split over tp 2.
CONFIG = jaxdec.ModelConfig(
    model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096,
    tie_word_embeddings=False, rope=jaxdec.RopeConfig(theta=10000.0))
PROMPTS = [[5, 6, 7, 8, 9] * 20, [1, 2, 3] * 11]


def tpu_model(tp: int, dtype=jnp.bfloat16, attention="pallas", config=CONFIG):
    mesh = jaxdec.make_mesh(tp=tp, devices=tpu_devices("v5e")[:tp])
    return jaxdec.abstract_model(config, dtype=dtype, mesh=mesh).with_attention(attention)


def kernel_calls(compiled) -> int:
    """How many times one step of the program's decode loop calls a Mosaic kernel."""
    return sum(kind == "tpu_custom_call" for _, kind in decode_loop(compiled.as_text()))


@pytest.mark.parametrize("tp", [1, 2])
def test_generate_compiles_with_the_kernel(tp):
    compiled = jaxdec.generate(tpu_model(tp), PROMPTS, max_new_tokens=32, compile_only=True)
    assert kernel_calls(compiled) == CONFIG.num_layers


@pytest.mark.parametrize("drafter,tree", [
    ("self", "kary:2:2"), ("small", "dynamic:3:2:6"), ("lookup", None)])
def test_speculative_programs_compile_with_the_kernel(drafter, tree):
    model = tpu_model(2)
    if drafter == "lookup":
        drafter = PromptLookup()
    else:
        draft = model if drafter == "self" else tpu_model(2, config=CONFIG.replace(num_layers=1))
        drafter = DraftModel(draft)
    compiled = jaxdec.speculative_generate(
        model, drafter, PROMPTS, max_new_tokens=32, compile_only=True,
        tree=jaxdec.tree.parse(tree) if tree else None,
        sampler=jaxdec.Sampler(temperature=0.8, top_p=0.9))
    # The target's layers, and the draft's at each of its levels.
    assert kernel_calls(compiled) >= CONFIG.num_layers


def test_fp16_model_compiles_through_the_reference():
    """AUTO on a TPU: an fp16 model's attention is the reference, the program compiles."""
    compiled = jaxdec.generate(tpu_model(1, jnp.float16, "auto"), PROMPTS, max_new_tokens=8,
                               compile_only=True)
    assert kernel_calls(compiled) == 0
    # The kernel named: refused before tracing, not quietly replaced by the reference.
    with pytest.raises(ValueError, match=r"for this model: the mosaic kernel cannot take it "
                       r"\(dtype "
                       "float16 is not supported on TPUs"):
        jaxdec.generate(tpu_model(1, jnp.float16, "pallas"), PROMPTS, max_new_tokens=8,
                        compile_only=True)


def test_programs_compile_for_a_slice_of_four_hosts():
    """A v5e-16 slice's chips sit on four hosts: a mesh over one chip of each (dp 2 x tp 2)
    is what each host's process compiles under `jax.distributed`, with the kernel in every
    decode step of generate and of a speculative program."""
    devices = devices_for("v5e-16")
    one_a_host = [next(d for d in devices if d.process_index == host) for host in range(4)]
    mesh = jaxdec.make_mesh(tp=2, dp=2, devices=one_a_host)
    model = jaxdec.abstract_model(CONFIG, dtype=jnp.bfloat16, mesh=mesh).with_attention("pallas")
    compiled = jaxdec.generate(model, PROMPTS, max_new_tokens=32, compile_only=True)
    assert kernel_calls(compiled) == CONFIG.num_layers
    compiled = jaxdec.speculative_generate(model, DraftModel(model), PROMPTS, max_new_tokens=32,
                                           compile_only=True, tree=jaxdec.tree.kary(2, 2))
    assert kernel_calls(compiled) >= CONFIG.num_layers
