"""The decode matrix-vector kernel (`jaxdec.pallas_kernels.matvec`): the kernel in interpret
mode against the jnp reference on drawn shapes, the reference against numpy, the split rule
by hand, bad input, and the kernel lowered for CUDA (an H100 described to jax)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jax._src.mesh import AbstractDevice, AbstractMesh

from jaxdec.pallas_kernels import matvec as MV
from jaxdec.pallas_kernels.matvec import gpu


def test_reference_against_numpy():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(3, 40)), rng.normal(size=(40, 24))
    got = MV.matvec_reference(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-5)
    # bf16 inputs accumulate in fp32: a sum no bf16 accumulator could hold exactly
    ones = jnp.ones((1, 4096), jnp.bfloat16)
    assert float(MV.matvec_reference(ones, jnp.ones((4096, 16), jnp.bfloat16))[0, 0]) == 4096.0
    # several matrices: x times each
    ws = rng.normal(size=(2, 40, 24))
    got = MV.matvec_reference(jnp.asarray(x, jnp.float32), jnp.asarray(ws, jnp.float32))
    assert got.shape == (2, 3, 24)
    np.testing.assert_allclose(got, np.stack([x @ ws[0], x @ ws[1]]), rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 16), k_steps=st.sampled_from([2, 4, 8]),
       n_tiles=st.integers(1, 3), block_n=st.sampled_from([16, 32]),
       block_k=st.sampled_from([16, 32]), splits=st.sampled_from([None, 1, 2]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), seed=st.integers(0, 99),
       groups=st.sampled_from([None, 1, 2, 3]))
def test_kernel_matches_reference(rows, k_steps, n_tiles, block_n, block_k, splits, dtype,
                                  seed, groups):
    K, N = k_steps * block_k * (splits or 1), n_tiles * block_n
    lead = () if groups is None else (groups,)  # None: one matrix [K, N]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(rows, K)), dtype)
    w = jnp.asarray(rng.normal(size=lead + (K, N)) * K**-0.5, dtype)
    sizes = MV.BlockSizes(block_n=block_n, block_k=block_k, num_splits=splits)
    got = MV.matvec(x, w, impl="triton", interpret=True, block_sizes=sizes)
    want = MV.matvec(x, w, impl="reference")
    assert got.shape == lead + (rows, N) and got.dtype == jnp.float32
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: the same products, summed in order
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_default_splits_hand_computed():
    sizes = MV.BlockSizes()  # block_n 128, block_k 64
    # Llama-3-8B q|k|v (48 column tiles): 8 splits make 384 programs, two per H100 SM.
    assert MV.default_num_splits(4096, 6144, sizes) == 8
    # gate and up, two matrices of 112 tiles each: 2 splits.
    assert MV.default_num_splits(4096, 14336, sizes, groups=2) == 2
    assert MV.default_num_splits(4096, 14336, sizes) == 4  # one of them alone: 4
    # down (32 tiles, K = 14336): 16 splits of 896 rows (14 steps each).
    assert MV.default_num_splits(14336, 4096, sizes) == 16
    # A short K: no split shorter than two steps (256 rows: at most 2 splits).
    assert MV.default_num_splits(256, 128, sizes) == 2
    # K not divisible further: 3 x 64 rows allow one split only.
    assert MV.default_num_splits(192, 128, sizes) == 1


def test_bad_input():
    x, w = jnp.ones((1, 64), jnp.float32), jnp.ones((64, 32), jnp.float32)
    with pytest.raises(ValueError, match="do not share K"):
        MV.matvec(x, jnp.ones((32, 64), jnp.float32))
    with pytest.raises(ValueError, match=r"must be \[M, K\]"):
        MV.matvec(jnp.ones((64,)), w)
    with pytest.raises(ValueError, match=r"\[G, K, N\]"):
        MV.matvec(x, jnp.ones((1, 2, 64, 32), jnp.float32))
    with pytest.raises(ValueError, match="do not share K"):
        MV.matvec(x, jnp.ones((2, 32, 64), jnp.float32))
    with pytest.raises(TypeError, match="one dtype"):
        MV.matvec(x.astype(jnp.bfloat16), w)
    with pytest.raises(ValueError, match="at most 16"):
        MV.matvec(jnp.ones((17, 64)), w, impl="triton", interpret=True,
                  block_sizes=MV.BlockSizes(block_n=32, block_k=16))
    with pytest.raises(ValueError, match="multiple of block_n"):
        MV.matvec(x, w, impl="triton", interpret=True, block_sizes=MV.BlockSizes(block_n=64))
    with pytest.raises(ValueError, match="power of two"):
        MV.matvec(x, w, impl="triton", interpret=True,
                  block_sizes=MV.BlockSizes(block_n=32, block_k=24))
    with pytest.raises(ValueError, match="not a multiple of num_splits"):
        MV.matvec(x, w, impl="triton", interpret=True,
                  block_sizes=MV.BlockSizes(block_n=32, block_k=16, num_splits=3))
    with pytest.raises(ValueError, match="auto"):
        MV.matvec(x, w, impl="cublas")
    for field in ("block_n", "block_k", "num_warps", "num_stages"):  # (0 divided by)
        with pytest.raises(ValueError, match=f"{field} must be an int >= 1"):
            MV.BlockSizes(**{field: 0})
    with pytest.raises(ValueError, match="num_splits must be an int >= 1 or None"):
        MV.BlockSizes(num_splits=0)  # 0 is no "choose for me"
    assert MV.BlockSizes(block_n=np.int64(64)) == MV.BlockSizes(block_n=64)
    assert type(MV.BlockSizes(num_splits=np.int64(2)).num_splits) is int
    with pytest.raises(ValueError, match=r"x \[1, 0\] @ w \[0, 32\] is empty"):
        MV.matvec(x[:, :0], w[:0], impl="triton", interpret=True)


def test_auto_is_the_reference_without_a_gpu_or_where_the_kernel_does_not_tile():
    x, w = jnp.ones((2, 64), jnp.float32), jnp.ones((64, 32), jnp.float32)
    if jax.default_backend() == "cpu":
        assert "pallas" not in str(jax.make_jaxpr(lambda x, w: MV.matvec(x, w))(x, w))
    # AUTO with interpret=True (a GPU's choices): the kernel where it tiles the shapes,
    # the reference for 17 rows, N = 48 or K = 0 (explicit TRITON refuses those).
    sizes = MV.BlockSizes(block_n=32, block_k=16)
    assert "pallas" in str(jax.make_jaxpr(lambda x, w: MV.matvec(
        x, w, interpret=True, block_sizes=sizes))(x, w))
    for x, w in [(jnp.ones((17, 64)), w), (x, jnp.ones((64, 48))), (x[:, :0], w[:0])]:
        jaxpr = str(jax.make_jaxpr(lambda x, w: MV.matvec(x, w, interpret=True,
                                                          block_sizes=sizes))(x, w))
        assert "pallas" not in jaxpr
        np.testing.assert_array_equal(MV.matvec(x, w, interpret=True, block_sizes=sizes),
                                      MV.matvec_reference(x, w))


@pytest.mark.parametrize("rows,K,N,lead", [(1, 4096, 6144, ()), (16, 14336, 4096, ()),
                                          (1, 4096, 14336, (2,))])
def test_lowers_for_cuda(rows, K, N, lead):
    device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    args = (jax.ShapeDtypeStruct((rows, K), jnp.bfloat16),
            jax.ShapeDtypeStruct(lead + (K, N), jnp.bfloat16))
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=device)):
        text = jax.jit(lambda x, w: gpu.matvec_gpu(x, w, block_sizes=MV.BlockSizes())
                       ).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "matvec" in text


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "cuda"), reason="needs a CUDA device")
class TestMatvecOnGPU:
    """The kernel compiled on the card (`bench/device.py`'s gpu-tests step): what interpret
    mode cannot show (a dot's contraction below 16 gives wrong bf16 results only there)."""

    @pytest.mark.parametrize("rows", [1, 4, 16])
    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
    def test_against_reference(self, rows, dtype):
        rng = np.random.default_rng(rows)
        for K, N, lead, sizes in (
                (1024, 512, (), MV.BlockSizes()),
                (512, 256, (), MV.BlockSizes(block_n=32, block_k=16, num_splits=4)),
                (4096, 6144, (), MV.BlockSizes()),
                (1024, 768, (2,), MV.BlockSizes())):  # gate and up
            x = jnp.asarray(rng.normal(size=(rows, K)), dtype)
            w = jnp.asarray(rng.normal(size=lead + (K, N)) * K**-0.5, dtype)
            got = MV.matvec(x, w, impl="triton", block_sizes=sizes)
            want = MV.matvec(x, w, impl="reference")
            tol = 1e-4 if dtype == jnp.float32 else 2e-2
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
