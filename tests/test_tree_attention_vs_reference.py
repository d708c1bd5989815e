"""The tree-attention kernels against their jnp reference, and the reference against a
hand-computed case.

On a CPU the kernels run in Pallas's interpreter (generic for the Triton kernel,
`pltpu.InterpretParams` for the Mosaic one) and are also *lowered* for their real platforms,
so block-shape violations fail here. On a GPU, `TestTritonOnGPU` runs the same checks
compiled (bf16 and fp32): `python -m pytest tests/test_tree_attention_vs_reference.py`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jax._src.mesh import AbstractDevice, AbstractMesh
from jax.experimental.pallas import tpu as pltpu

import jaxdec
from jaxdec.models import layers as L
from jaxdec.pallas_kernels import tree_attention as TA
from jaxdec.pallas_kernels.tree_attention import common, gpu, tpu

ON_GPU = jax.default_backend() in ("gpu", "cuda")


# ----------------------------------------------------------------------------- test cases


def ancestor_mask(parents):
    """bool [T, T] from a parent list (-1 for the root): node t sees itself and its ancestors."""
    T = len(parents)
    mask = np.zeros((T, T), bool)
    for t in range(T):
        u = t
        while u >= 0:
            mask[t, u] = True
            u = parents[u]
    return mask


def tree_parents(kind, T, rng):
    if kind == "chain":
        return [t - 1 for t in range(T)]
    if kind == "star":
        return [-1] + [0] * (T - 1)
    if kind == "random":
        return [-1] + [int(rng.integers(0, t)) for t in range(1, T)]
    raise ValueError(kind)


def make_case(*, B, T, K, G, D, S, tree, window, dtype, seed, causal=False):
    """Random q/k/v, per-row lengths (different rows, different lengths) and per-row trees."""
    rng = np.random.default_rng(seed)
    H = K * G
    q = rng.normal(size=(B, T, H, D))
    k = rng.normal(size=(B, S, K, D))
    v = rng.normal(size=(B, S, K, D))
    lengths = rng.integers(0, S - T + 1, size=B)
    masks = np.stack([ancestor_mask(tree_parents(tree, T, rng)) for _ in range(B)])
    depth = masks.sum(-1) - 1
    positions = lengths[:, None] + (np.arange(T)[None] if causal else depth)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return dict(
        q_BTHD=cast(q), k_BSKD=cast(k), v_BSKD=cast(v), lengths_B=jnp.asarray(lengths, jnp.int32),
        positions_BT=jnp.asarray(positions, jnp.int32),
        mask_BTT=None if causal else jnp.asarray(masks), window=window,
    )


def reference_of(case):
    """The reference on the same (possibly bf16-rounded) inputs, computed in fp32."""
    f32 = {n: (x.astype(jnp.float32) if n[0] in "qkv" else x) for n, x in case.items()}
    return TA.tree_attention(**f32, impl=TA.Impl.REFERENCE)


def tolerance(dtype):
    """bf16 / fp16 round the probabilities before P V and the output (8 / 11 mantissa bits)."""
    return {jnp.dtype(jnp.bfloat16): dict(rtol=2e-2, atol=2e-2),
            jnp.dtype(jnp.float16): dict(rtol=4e-3, atol=4e-3)}.get(
                jnp.dtype(dtype), dict(rtol=1e-5, atol=1e-5))


# ------------------------------------------------------------------------- the reference


def test_reference_tree_hand_computed():
    """Two cached keys, then a root (slot 2) with two children (slots 3, 4); D = 1, H = K = 1.
    Child 2 sees slots 0, 1, 2 and itself, not its sibling."""
    q = jnp.array([0.0, 1.0, 2.0]).reshape(1, 3, 1, 1)
    keys = np.array([1.0, -1.0, 0.5, 2.0, 3.0])
    vals = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    k = jnp.asarray(keys).reshape(1, 5, 1, 1)
    v = jnp.asarray(vals).reshape(1, 5, 1, 1)
    mask = jnp.asarray(ancestor_mask([-1, 0, 0]))[None]
    positions = jnp.array([[2, 3, 3]])
    out = TA.tree_attention_reference(q, k, v, jnp.array([2]), positions, mask_BTT=mask)
    for t, slots in enumerate([[0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 4]]):
        scores = np.array([float(q[0, t, 0, 0]) * keys[s] for s in slots])
        p = np.exp(scores - scores.max())
        want = (p / p.sum()) @ vals[slots]
        np.testing.assert_allclose(out[0, t, 0, 0], want, rtol=1e-6)
    # With window 2 the root (position 2) sees slots 1 and 2; child 1 (position 3) sees the
    # root and itself.
    out = TA.tree_attention_reference(q, k, v, jnp.array([2]), positions, mask_BTT=mask, window=2)
    np.testing.assert_allclose(out[0, 0, 0, 0], (20.0 + 30.0) / 2, rtol=1e-6)  # q = 0: uniform
    s = np.array([0.5, 2.0])
    np.testing.assert_allclose(out[0, 1, 0, 0], (np.exp(s) / np.exp(s).sum()) @ [30.0, 40.0],
                               rtol=1e-6)


def test_mask_words_pack_every_bit():
    rng = np.random.default_rng(0)
    T, G = 40, 2  # two words per row
    mask = rng.random((1, T, T)) < 0.5
    positions = jnp.zeros((1, T), jnp.int32)
    words = np.asarray(common.mask_words(positions, jnp.asarray(mask), None, G, 128))
    assert words.shape == (1, 2, 128)
    unpacked = (words[0][:, :, None].view(np.uint32) >> np.arange(32, dtype=np.uint32)) & 1
    bits = unpacked.transpose(1, 0, 2).reshape(128, 64)[:, :T]  # [rows, u]
    np.testing.assert_array_equal(bits[: T * G], np.repeat(mask[0], G, axis=0))
    assert not bits[T * G:].any()


def test_combine_equals_one_softmax():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(6,))
    vals = rng.normal(size=(6, 3))
    parts = [(scores[:2], vals[:2]), (scores[2:], vals[2:]), (np.array([]), np.zeros((0, 3)))]
    o, m, l = [], [], []
    for s, x in parts:
        mx = s.max() if len(s) else -1e30
        p = np.exp(s - mx)
        o.append(p @ x), m.append(mx), l.append(p.sum())
    got = common.combine(jnp.asarray(np.array(o))[None, None, :, None],
                         jnp.asarray(np.array(m))[None, None, :, None],
                         jnp.asarray(np.array(l))[None, None, :, None])
    p = np.exp(scores - scores.max())
    np.testing.assert_allclose(got[0, 0, 0], (p / p.sum()) @ vals, rtol=1e-5)


@pytest.mark.parametrize("T,G,block_m,dtype", [(3, 2, 64, jnp.float32),  # 6 of 16 rows real
                                                 (32, 4, 32, jnp.bfloat16)])  # 4 row tiles
def test_gpu_one_split_writes_the_output_itself(T, G, block_m, dtype):
    """With one split the Triton kernel normalises and writes the output (padding rows
    left alone): no partials, no combine kernel, the reference's result."""
    case = make_case(B=2, T=T, K=2, G=G, D=16, S=100, tree="random", window=None,
                     dtype=dtype, seed=T)

    def run(case, splits):
        return TA.tree_attention(**case, impl=TA.Impl.TRITON, interpret=True,
                                 block_sizes=TA.BlockSizes(block_k=16, block_m=block_m,
                                                           num_splits=splits))

    got = run(case, 1)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), reference_of(case),
                               **tolerance(dtype))
    assert "tree_attention_combine" not in str(jax.make_jaxpr(run, static_argnums=1)(case, 1))
    assert "tree_attention_combine" in str(jax.make_jaxpr(run, static_argnums=1)(case, 2))


def test_combine_tiling_hand_computed():
    """A combine program loads all its tile's splits at once within `COMBINE_ELEMENTS` (8192
    fp32 values at head dim 128: tile x splits <= 64), its rows a power of two; past 64
    splits the tile is one row and the splits take several loads."""
    assert gpu.COMBINE_ELEMENTS == 8192
    assert gpu.combine_tiling((16,), 4, 128) == (4, (16,))  # decode, 4 heads a KV head
    assert gpu.combine_tiling((8,), 256, 128) == (8, (8,))  # T = 64: 32 programs a KV head
    assert gpu.combine_tiling((32,), 4, 128) == (2, (32,))
    assert gpu.combine_tiling((128,), 4, 128) == (1, (64,))  # two loads of 64 splits
    assert gpu.combine_tiling((8, 1), 64, 128) == (8, (8, 1))  # Hopper's dense part + tail
    assert gpu.combine_tiling((4,), 4, 16) == (4, (4,))


@pytest.mark.parametrize("elements", [None, 64], ids=["one-load", "chunked"])
@pytest.mark.parametrize("real_rows", [4, 20, 64])
def test_gpu_combine_kernel_ignores_what_was_never_written(real_rows, elements, monkeypatch):
    """The GPU combine (one Pallas kernel, interpret mode) equals `common.combine` on the
    written partials, whatever the splits past `num_splits` and the padding rows past the
    real ones hold (never written on the device: any bits); a split that saw no key (l = 0)
    adds nothing. `chunked`: a load budget of 64 values (4 splits of one row at D = 16), so
    the splits take two loads, the second with unwritten ones in it."""
    if elements is not None:
        monkeypatch.setattr(gpu, "COMBINE_ELEMENTS", elements)
    B, K, N, Np, rows, D = 2, 3, 5, 8, 64, 16
    rng = np.random.default_rng(2)
    o = rng.normal(size=(B, K, Np, rows, D)).astype(np.float32)
    m = rng.normal(size=(B, K, Np, rows)).astype(np.float32)
    l = rng.uniform(0.5, 2.0, size=(B, K, Np, rows)).astype(np.float32)
    o[:, :, 1], m[:, :, 1], l[:, :, 1] = 0.0, -1e30, 0.0  # a split that saw nothing
    # Unwritten splits: finite values that would win the max; padding rows: NaN and inf.
    o[:, :, N:], m[:, :, N:], l[:, :, N:] = 1e6, 50.0, 1.0
    o[:, :, :, real_rows:], m[:, :, :, real_rows:], l[:, :, :, real_rows:] = np.nan, np.inf, 1.0
    want = common.combine(*(jnp.asarray(x[:, :, :N, :real_rows]) for x in (o, m, l)))
    got = gpu._combine([(jnp.asarray(o), jnp.asarray(m), jnp.asarray(l), N)],
                       real_rows=real_rows, dtype=jnp.float32, interpret=True)
    assert got.shape == (B, K, common._next_pow2(real_rows), D)
    np.testing.assert_allclose(got[:, :, :real_rows], want, rtol=1e-5, atol=1e-6)
    # Two kernels' partials (as the Hopper kernel's dense part and the Triton tail), each
    # with its own unwritten splits: the same merge as their written splits side by side.
    parts = [(o[:, :, :4], m[:, :, :4], l[:, :, :4], 3), (o[:, :, 4:], m[:, :, 4:], l[:, :, 4:], 1)]
    written = [np.concatenate([p[i][:, :, :p[3], :real_rows] for p in parts], axis=2)
               for i in range(3)]
    want = common.combine(*(jnp.asarray(x) for x in written))
    got = gpu._combine([tuple(jnp.asarray(x) for x in p[:3]) + (p[3],) for p in parts],
                       real_rows=real_rows, dtype=jnp.float32, interpret=True)
    np.testing.assert_allclose(got[:, :, :real_rows], want, rtol=1e-5, atol=1e-6)


def test_default_splits_hand_computed():
    """Llama-3-8B heads (8 KV heads; 132 multiprocessors x 2 programs = waves of 264): the
    smallest split count whose last wave is within 85% of the best count's fill, among the
    counts that shorten the longest split, within the partial-bytes rule; and the Triton
    kernel's use of it, with at least 4 key blocks a split."""
    splits = common.default_num_splits
    # Decode at 2K (2176 slots, 34 blocks): 8 tiles; 17 splits (two blocks each, 136
    # programs, fill 0.515) is the best fill a shorter split allows (34 splits: 272 programs,
    # a second wave of 8).
    assert splits(1, 8, 1, 2176, 4, 64) == 17
    # Context 4K, T = 64: 256 rows in 4 tiles; the bytes rule allows 4160 // 1024 = 4.
    assert splits(1, 8, 4, 4160, 256, 64) == 4
    # Context 4K, T = 16 (65 blocks, the bytes rule allows 16): 13 splits of 5 blocks; 14 to
    # 16 would leave 5 blocks in the longest split, 11 (6 blocks, fill 0.333) falls below
    # 85% of 13's 0.394.
    assert splits(1, 8, 1, 4112, 64, 64) == 13
    # Context 64K at batch 8, T = 1: 64 tiles, 4 splits fill 256 of 264.
    assert splits(8, 8, 1, 65537, 4, 64) == 4
    # A short cache and many rows: the bytes rule leaves one split.
    assert splits(1, 8, 4, 1088, 256, 64) == 1
    # Enough tiles to nearly fill a wave (batch 32 x 8 heads = 256 of 264): one split.
    assert splits(32, 8, 1, 2176, 4, 64) == 1
    # A GPU with fewer multiprocessors (58: waves of 116): 2 splits fill 128 (1.10 waves),
    # 5 fill 320 of 348 (0.92) and are the smallest count within 85% of the best.
    assert splits(8, 8, 1, 65537, 4, 64, num_cores=58) == 5
    # 8 warps per program: one program per multiprocessor, waves of 132: 12 splits (3 blocks,
    # 96 programs, fill 0.73) beat 17 (136 programs: a second wave of 4).
    assert splits(1, 8, 1, 2176, 4, 64, programs_per_core=1) == 12
    # The Triton kernel's own rule: at least 4 key blocks a split (MIN_BLOCKS_PER_SPLIT).
    # Decode at 1K (17 blocks): 4 splits, not 17; at 2K (34 blocks, at most 8 splits): 6
    # (6 blocks each, fill 0.18, within 85% of 7's 0.21; 8 would not shorten 7's 5 blocks);
    # at 4K (65 blocks, at most 16): 13 splits of 5 blocks (16 would not shorten them); at
    # 64K (1025 blocks) and at batch 8 the floor does not bind (29 and 4 splits).
    triton = functools.partial(gpu.default_num_splits, block_sizes=TA.BlockSizes(),
                               num_cores=132)
    assert [triton(1, 8, 1, s, 4) for s in (1025, 2176, 4097, 65537)] == [4, 6, 13, 29]
    assert triton(8, 8, 1, 65537, 4) == 4 == splits(8, 8, 1, 65537, 4, 64)
    assert triton(1, 8, 1, 4112, 64) == 13 == splits(1, 8, 1, 4112, 64, 64)  # T = 16: as before
    # T = 64 (256 real rows, 4 row tiles: 32 tiles): the partials may take as many bytes as
    # the cache a split reads. At 1K (1088 slots, 17 blocks) 4 splits (128 programs), where a
    # quarter's share allowed 1; at 4K (65 blocks) 7 splits fill 224 of 264 (0.85, within 85%
    # of 8's 0.97), where a quarter allowed 4.
    assert triton(1, 8, 4, 1088, 256) == 4 and splits(1, 8, 4, 1088, 256, 64) == 1
    assert triton(1, 8, 4, 4160, 256) == 7
    # Without a GPU to ask (this machine, a compile-only device), an H100's count.
    if jax.default_backend() == "cpu":
        assert common.gpu_core_count() == 132


# ------------------------------------------------------------------ kernels vs reference


class TritonSuite:
    """Kernel-vs-reference checks for one implementation; subclasses set how it runs."""

    IMPL = TA.Impl.TRITON
    INTERPRET = True
    HEAD_DIMS = (16, 32)
    DTYPES = (jnp.float32,)
    EXAMPLES = 8

    def run(self, case, block_sizes=None):
        return TA.tree_attention(**case, impl=self.IMPL, interpret=self.INTERPRET,
                                 block_sizes=block_sizes)

    def check(self, case, block_sizes=None):
        got = self.run(case, block_sizes)
        dtype = case["q_BTHD"].dtype
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), reference_of(case),
                                   **tolerance(dtype))

    @pytest.mark.parametrize("tree,T", [("chain", 1), ("chain", 7), ("star", 9),
                                        ("chain-causal", 16), ("random", 33)])
    def test_named_shapes(self, tree, T):
        """T = 1 (decode), a chain given as a mask, a star, a causal block (no mask), a
        random tree spanning two mask words; rows of different lengths; GQA 4."""
        for dtype in self.DTYPES:
            case = make_case(B=3, T=T, K=2, G=4, D=self.HEAD_DIMS[-1], S=160,
                             tree=tree.split("-")[0], causal=tree.endswith("causal"),
                             window=None, dtype=dtype, seed=T)
            self.check(case, TA.BlockSizes(block_k=32, block_m=32, num_splits=3))

    def test_one_deep_path_with_window(self):
        for dtype in self.DTYPES:
            case = make_case(B=2, T=24, K=1, G=2, D=self.HEAD_DIMS[0], S=96, tree="chain",
                             window=20, dtype=dtype, seed=5)
            self.check(case, TA.BlockSizes(block_k=16, num_splits=2))

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    def test_half_precision_inputs(self, dtype):
        """bf16 / fp16 in, fp32 accumulation, output in the input dtype."""
        case = make_case(B=2, T=12, K=2, G=2, D=self.HEAD_DIMS[-1], S=96, tree="random",
                         window=None, dtype=dtype, seed=11)
        self.check(case, TA.BlockSizes(block_k=16, num_splits=2))

    def test_hypothesis_shapes(self):
        @settings(max_examples=self.EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(
            B=st.integers(1, 3), T=st.sampled_from([1, 2, 5, 16, 31, 40]),
            K=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 4, 8]),
            D=st.sampled_from(self.HEAD_DIMS), extra=st.integers(0, 100),
            tree=st.sampled_from(["chain", "star", "random"]),
            window=st.sampled_from([None, 3, 50]), splits=st.sampled_from([None, 1, 4]),
            seed=st.integers(0, 2**16), dtype=st.sampled_from(self.DTYPES),
        )
        def prop(B, T, K, G, D, extra, tree, window, splits, seed, dtype):
            S = self.round_slots(T + extra + 16)
            case = make_case(B=B, T=T, K=K, G=G, D=D, S=S, tree=tree, window=window,
                             dtype=dtype, seed=seed)
            self.check(case, TA.BlockSizes(block_k=16, num_splits=splits))

        prop()

    @staticmethod
    def round_slots(n):
        return n


class TestTritonInterpret(TritonSuite):
    pass


@pytest.mark.gpu_only
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
class TestTritonOnGPU(TritonSuite):
    INTERPRET = False
    HEAD_DIMS = (64, 128)
    # fp16 compiled by test_half_precision_inputs. Each case compiles its own kernel (seconds
    # each): with 20 drawn shapes and three dtypes per named shape this class and the cuDNN
    # tests did not finish in 120 s on the H200 (with 40 drawn shapes: 215 s), out of a
    # 15-minute device lease.
    DTYPES = (jnp.float32, jnp.bfloat16)
    EXAMPLES = 8

    @pytest.mark.parametrize("T", [1, 16, 64])
    def test_default_tiling_at_llama3_8b_heads(self, T):
        """The tiling and split count the model path runs (no block sizes given): 32 query /
        8 KV heads, head dim 128, bf16, a 1K-slot cache; T = 16 and 64 take three pipeline
        stages, decode and T = 64 several splits."""
        case = make_case(B=2, T=T, K=8, G=4, D=128, S=1104, tree="random", window=None,
                         dtype=jnp.bfloat16, seed=T)
        self.check(case)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="TPU interpret mode: CPU runs")
class TestMosaicInterpret(TritonSuite):
    IMPL = TA.Impl.MOSAIC
    HEAD_DIMS = (128,)
    EXAMPLES = 4

    def run(self, case, block_sizes=None):
        try:
            return TA.tree_attention(**case, impl=self.IMPL, interpret=True,
                                     block_sizes=block_sizes)
        finally:
            pltpu.reset_tpu_interpret_mode_state()

    @staticmethod
    def round_slots(n):
        return -(-n // 16) * 16  # TPU key blocks divide the cache

    @pytest.mark.parametrize("window", [None, 9])
    def test_row_tiles(self, window):
        """Packed rows past `tpu.MAX_ROWS` (here made 16) are split into tiles, each its own
        walk over the cache: 20 tokens x 2 heads = 40 rows, 64 padded, 4 tiles; a random
        tree, rows of different lengths, two splits."""
        case = make_case(B=2, T=20, K=2, G=2, D=128, S=96, tree="random", window=window,
                         dtype=jnp.float32, seed=3)
        args = [case[n] for n in ("q_BTHD", "k_BSKD", "v_BSKD", "lengths_B", "positions_BT",
                                  "mask_BTT")]
        try:
            got = tpu.tree_attention_tpu(*args, window=window, interpret=True, max_rows=16,
                                         block_sizes=TA.BlockSizes(block_k=16, num_splits=2))
        finally:
            pltpu.reset_tpu_interpret_mode_state()
        np.testing.assert_allclose(got, reference_of(case), **tolerance(jnp.float32))

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    def test_half_precision_inputs(self, dtype, monkeypatch):
        """bf16 in, fp32 accumulation, bf16 out. fp16: Mosaic TPU has no fp16 vectors (libtpu
        refuses the loads), so naming the kernel raises and AUTO on a TPU takes the reference
        (a TPU offered to AUTO here)."""
        case = make_case(B=2, T=12, K=2, G=2, D=128, S=96, tree="random", window=None,
                         dtype=dtype, seed=11)
        if dtype == jnp.bfloat16:
            return self.check(case, TA.BlockSizes(block_k=16, num_splits=2))
        with pytest.raises(ValueError, match="impl=mosaic: dtype float16 is not supported on "
                                             "TPUs .*: bfloat16 or float32"):
            self.run(case)
        monkeypatch.setattr(TA, "backend_kernel", lambda backend=None: TA.Impl.MOSAIC)
        monkeypatch.setattr(TA, "tree_attention_reference",
                            lambda *a, **k: "reference")  # what AUTO ran
        assert TA.tree_attention(**case) == "reference"
        assert TA.unsupported_reason(TA.Impl.MOSAIC, case["q_BTHD"].shape,
                                     case["k_BSKD"].shape) is None  # dtype not given


# ------------------------------------------------------------ lowering for real platforms

SD = jax.ShapeDtypeStruct


def abstract_args(B=2, T=16, H=32, K=8, D=128, S=256, dtype=jnp.bfloat16):
    return (SD((B, T, H, D), dtype), SD((B, S, K, D), dtype), SD((B, S, K, D), dtype),
            SD((B,), jnp.int32), SD((B, T), jnp.int32), SD((B, T, T), jnp.bool_))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("T,window", [(1, None), (16, None), (64, 100)])
def test_mosaic_lowers_for_tpu(dtype, T, window):
    def f(*args):
        return tpu.tree_attention_tpu(*args, window=window,
                                      block_sizes=TA.default_block_sizes(TA.Impl.MOSAIC, 256))

    jax.jit(f).trace(*abstract_args(T=T, dtype=dtype)).lower(lowering_platforms=("tpu",))


def _lower_cuda(fn, args):
    device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=device)):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("T,window", [(1, None), (16, None), (64, 100)])
@pytest.mark.parametrize("splits", [None, 2])  # 256 slots: the default is one split
def test_triton_lowers_for_cuda(dtype, T, window, splits):
    def f(*args):
        return gpu.tree_attention_gpu(*args, window=window,
                                      block_sizes=TA.BlockSizes(num_splits=splits))

    text = _lower_cuda(f, abstract_args(T=T, dtype=dtype)).as_text()
    assert "tree_attention" in text
    assert ("tree_attention_combine" in text) == (splits == 2)


def test_kernels_lower_in_x64_mode():
    """With `jax_enable_x64` on (a user's choice for their own code) the kernels' index
    arithmetic stays int32: a Python int divisor becomes an int64 operand of `lax.div` there,
    which failed to trace (both kernels). Under strict dtype promotion as well, nothing mixes
    types implicitly."""
    args = abstract_args(T=16)
    with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
        _lower_cuda(lambda *a: gpu.tree_attention_gpu(
            *a, window=None, block_sizes=TA.BlockSizes(num_splits=2)), args)
        jax.jit(lambda *a: tpu.tree_attention_tpu(
            *a, window=100, block_sizes=TA.default_block_sizes(TA.Impl.MOSAIC, 256))
        ).trace(*args).lower(lowering_platforms=("tpu",))


def test_triton_default_pipeline_depth():
    """Three stages where the packed query rows fill a 64-row tile and a key / value row
    takes at most 256 bytes (the H200 sweep's finding); two for decode, for fp32 at head dim
    128, and when the queries are not given."""
    def stages(T, D=128, dtype=jnp.bfloat16, H=32, K=8):
        return TA.default_block_sizes(TA.Impl.TRITON, 4160, q_shape=(1, T, H, D),
                                      num_kv_heads=K, dtype=dtype).num_stages

    assert stages(16) == stages(64) == stages(16, dtype=jnp.float16) == 3
    assert stages(1) == stages(8) == 2  # 4 and 32 rows
    assert stages(16, dtype=jnp.float32) == 2 and stages(16, D=64, dtype=jnp.float32) == 3
    assert stages(16, D=256) == 2
    assert TA.default_block_sizes(TA.Impl.TRITON, 4160).num_stages == 2
    assert TA.default_block_sizes(TA.Impl.MOSAIC, 4160, q_shape=(1, 64, 32, 128),
                                  num_kv_heads=8).num_stages == 2


def test_block_rule_violations_are_caught():
    # Mosaic: a key block of 12 rows breaks the (8, 128) tiling rule when lowering.
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        jax.jit(lambda *a: tpu.tree_attention_tpu(
            *a, window=None, block_sizes=TA.BlockSizes(block_k=12))
        ).trace(*abstract_args(S=48)).lower(lowering_platforms=("tpu",))
    # Triton: the wrapper's static check names the rule before anything is traced.
    q = jnp.zeros((1, 1, 4, 24))
    kv = jnp.zeros((1, 32, 2, 24))
    with pytest.raises(ValueError, match="head_dim=24 must be a power of two"):
        TA.tree_attention(q, kv, kv, jnp.array([0]), jnp.array([[0]]), impl=TA.Impl.TRITON)
    with pytest.raises(ValueError, match="block_k=8 must be a power of two >= 16"):
        TA.tree_attention(jnp.zeros((1, 1, 4, 32)), jnp.zeros((1, 32, 2, 32)),
                          jnp.zeros((1, 32, 2, 32)), jnp.array([0]), jnp.array([[0]]),
                          impl=TA.Impl.TRITON, block_sizes=TA.BlockSizes(block_k=8))
    with pytest.raises(ValueError, match="at most 128"):
        TA.tree_attention(jnp.zeros((1, 129, 4, 32)), jnp.zeros((1, 256, 2, 32)),
                          jnp.zeros((1, 256, 2, 32)), jnp.array([0]), jnp.zeros((1, 129), int),
                          impl=TA.Impl.MOSAIC)
    # A cache of 100 slots: the rule is the cache's, not a block_k nobody chose.
    with pytest.raises(ValueError, match="the cache's 100 slots must be a multiple of 8"):
        TA.tree_attention(jnp.zeros((1, 1, 4, 128)), jnp.zeros((1, 100, 2, 128)),
                          jnp.zeros((1, 100, 2, 128)), jnp.array([0]), jnp.array([[0]]),
                          impl=TA.Impl.MOSAIC)


# --------------------------------------------------------------------- dispatch and wiring


def test_auto_follows_the_platform_of_the_queries(monkeypatch):
    """Arrays on CPU devices run the reference whatever the default backend says (a GPU
    machine's CPU arrays); under a trace, the default backend decides."""
    case = make_case(B=1, T=2, K=1, G=2, D=16, S=32, tree="chain", window=None,
                     dtype=jnp.float32, seed=0)
    case = jax.device_put(case, jax.devices("cpu")[0])
    assert TA.platform_of(case["q_BTHD"]) == "cpu"
    assert TA.platform_of(np.zeros(2)) is None
    traced = []
    jax.jit(lambda q: traced.append(TA.platform_of(q)) or q)(case["q_BTHD"])
    assert traced == [None]
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert TA.backend_kernel() is TA.Impl.TRITON
    np.testing.assert_array_equal(TA.tree_attention(**case), reference_of(case))


def test_dispatch_and_bad_arguments():
    case = make_case(B=1, T=3, K=1, G=2, D=16, S=32, tree="star", window=None,
                     dtype=jnp.float32, seed=0)
    if jax.default_backend() == "cpu":  # AUTO is the reference on CPU
        np.testing.assert_array_equal(TA.tree_attention(**case), reference_of(case))
        with pytest.raises(ValueError, match="no Pallas kernel for the 'cpu' platform"):
            L.attention_kernel(L.AttentionImpl.PALLAS)
    with pytest.raises(TypeError, match="Impl or one of"):
        TA.tree_attention(**case, impl="flash")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="on a CPU pass interpret=True"):
            TA.tree_attention(**case, impl="triton")
    with pytest.raises(ValueError, match="window must be a positive int"):
        TA.tree_attention(**{**case, "window": 0})
    np.testing.assert_array_equal(TA.tree_attention(**{**case, "window": np.int64(4)}),
                                  TA.tree_attention(**{**case, "window": 4}))
    for sizes in (TA.BlockSizes, TA.HopperBlockSizes):  # 0 is no "choose for me"
        with pytest.raises(ValueError, match="num_splits must be an int >= 1 or None"):
            sizes(num_splits=0)
        assert sizes(num_splits=np.int64(2)).num_splits == 2   # a Python int
    with pytest.raises(ValueError, match="mask must be"):
        TA.tree_attention(**{**case, "mask_BTT": case["mask_BTT"][:, :2]})
    with pytest.raises(ValueError, match="not a multiple of KV heads"):
        TA.tree_attention(**{**case, "k_BSKD": jnp.zeros((1, 32, 3, 16)),
                             "v_BSKD": jnp.zeros((1, 32, 3, 16))})


def test_entry_point_inputs_and_edges():
    """What the entry point takes and refuses before tracing (dtypes, block sizes), and its
    edges: no new tokens, a window wider than any
    position, a query that sees nothing (zeros everywhere), new tokens past the cache's
    end (dropped, as the reference drops them: the Mosaic kernel read a block past it)."""
    case = make_case(B=2, T=3, K=1, G=2, D=16, S=32, tree="star", window=None,
                     dtype=jnp.float32, seed=0)
    impls = [dict(impl=TA.Impl.REFERENCE), dict(impl=TA.Impl.BLOCKED),
             dict(impl=TA.Impl.TRITON, interpret=True,
                  block_sizes=TA.BlockSizes(block_k=16, block_m=16))]
    # strings name implementations; lists are arrays
    np.testing.assert_array_equal(TA.tree_attention(**case, impl="blocked"),
                                  TA.tree_attention(**case, impl=TA.Impl.BLOCKED))
    np.testing.assert_array_equal(
        TA.tree_attention(**{**case, "lengths_B": case["lengths_B"].tolist()}),
        TA.tree_attention(**case))
    bad = [({"q_BTHD": case["q_BTHD"].astype(jnp.int8)}, TypeError, "q must be bf16"),
           ({"v_BSKD": case["v_BSKD"].astype(jnp.bfloat16)}, TypeError,
            "share one dtype, got q float32, k float32, v bfloat16"),
           ({"lengths_B": case["lengths_B"] + 0.5}, TypeError, "lengths must be integers"),
           ({"positions_BT": case["positions_BT"] * 1.0}, TypeError, "positions must be int"),
           ({"mask_BTT": case["mask_BTT"].astype(jnp.int32)}, TypeError, "mask must be bool")]
    for change, error, match in bad:
        with pytest.raises(error, match=match):
            TA.tree_attention(**{**case, **change})
    for field in ("block_k", "block_m", "num_warps", "num_stages"):
        with pytest.raises(ValueError, match=f"{field} must be an int >= 1"):
            TA.BlockSizes(**{field: 0})
    assert TA.BlockSizes(block_k=np.int64(128)) == TA.BlockSizes(block_k=128)
    empty = {**case, "q_BTHD": case["q_BTHD"][:, :0], "positions_BT": case["positions_BT"][:, :0],
             "mask_BTT": case["mask_BTT"][:, :0, :0]}
    for kw in impls:
        assert TA.tree_attention(**empty, **kw).shape == (2, 0, 2, 16)
    # No rows, or a cache of no slots (no key to see): zeros, as from the reference.
    no_rows = {name: x[:0] for name, x in case.items() if name != "window"}
    no_slots = {**case, "k_BSKD": case["k_BSKD"][:, :0], "v_BSKD": case["v_BSKD"][:, :0],
                "lengths_B": jnp.zeros(2, jnp.int32)}
    for kw in impls:
        assert TA.tree_attention(**no_rows, **kw).shape == (0, 3, 2, 16)
        np.testing.assert_array_equal(TA.tree_attention(**no_slots, **kw),
                                      np.zeros((2, 3, 2, 16)))
    # The models' entry point too, where AUTO walks a long cache in blocks on a CPU.
    long = jnp.zeros((2, L.BLOCKED_MIN_SLOTS, 1, 16))
    for q in (case["q_BTHD"][:0], case["q_BTHD"][:, :0]):
        B, T = q.shape[:2]
        out = L.attention(q, long[:B], long[:B], jnp.zeros(B, jnp.int32),
                          jnp.zeros((B, T), jnp.int32))
        assert out.shape == (B, T, 2, 16)
    # unsupported_reason names a kernel as tree_attention does (AUTO is none).
    assert "head_dim=24" in TA.unsupported_reason("triton", (1, 1, 8, 24), (1, 64, 2, 24))
    with pytest.raises(ValueError, match="not AUTO, which picks among them"):
        TA.unsupported_reason("auto", (1, 1, 8, 16), (1, 64, 2, 16))
    # A window past int32 is no window at all.
    for kw in impls:
        np.testing.assert_allclose(TA.tree_attention(**{**case, "window": 2**40}, **kw),
                                   TA.tree_attention(**case, **kw), rtol=1e-6, atol=1e-6)
    # Node 1 sees nothing (its own slot hidden, no cache): zeros in every implementation.
    lonely = {**case, "lengths_B": jnp.array([0, 5]),
              "positions_BT": jnp.array([[0, 1, 1], [5, 6, 6]]),
              "mask_BTT": jnp.array([[[1, 0, 0], [0, 0, 0], [1, 0, 1]]] * 2, bool)}
    want = np.asarray(TA.tree_attention(**lonely, impl=TA.Impl.REFERENCE))
    assert not want[0, 1].any() and want[1, 1].any() and want[0, [0, 2]].all()
    for kw in impls[1:]:
        np.testing.assert_allclose(TA.tree_attention(**lonely, **kw), want, rtol=1e-5, atol=1e-6)
    # New tokens past the end (length + T > S) under a window: what fits is attended.
    D = 128
    past = make_case(B=1, T=6, K=1, G=2, D=D, S=64, tree="chain", window=20,
                     dtype=jnp.float32, seed=1)
    past = {**past, "lengths_B": jnp.array([61]), "positions_BT": 61 + jnp.arange(6)[None]}
    want = TA.tree_attention(**past, impl=TA.Impl.REFERENCE)
    got = TA.tree_attention(**past, impl=TA.Impl.MOSAIC, interpret=True,
                            block_sizes=TA.BlockSizes(block_k=16))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_entry_point_gradients_through_a_kernel_are_the_references():
    """`tree_attention` itself differentiates (it crashed inside Pallas): a kernel's
    gradient is the reference's."""
    case = make_case(B=2, T=4, K=1, G=2, D=16, S=32, tree="random", window=None,
                     dtype=jnp.float32, seed=4)
    rest = {n: case[n] for n in ("lengths_B", "positions_BT", "mask_BTT")}

    def loss(q, k, v, **kw):
        return jnp.sum(jnp.sin(TA.tree_attention(q, k, v, **rest, **kw)))

    args = (case["q_BTHD"], case["k_BSKD"], case["v_BSKD"])
    got = jax.grad(functools.partial(loss, impl=TA.Impl.TRITON, interpret=True,
                                     block_sizes=TA.BlockSizes(block_k=16, block_m=16)),
                   argnums=(0, 1, 2))(*args)
    want = jax.grad(functools.partial(loss, impl=TA.Impl.REFERENCE), argnums=(0, 1, 2))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_entry_point_kernel_gradients_come_from_the_reference():
    case = make_case(B=2, T=5, K=2, G=2, D=16, S=32, tree="random", window=None,
                     dtype=jnp.float32, seed=3)
    rest = (case["lengths_B"], case["positions_BT"])

    def loss(impl, q, k, v):
        out = L.attention(q, k, v, *rest, mask_BTT=case["mask_BTT"], impl=impl)
        return jnp.sum(jnp.sin(out))

    args = (case["q_BTHD"], case["k_BSKD"], case["v_BSKD"])
    got = jax.value_and_grad(lambda *a: loss(L.AttentionImpl.PALLAS_INTERPRET, *a),
                             argnums=(0, 1, 2))(*args)
    want = jax.value_and_grad(lambda *a: loss(L.AttentionImpl.REFERENCE, *a),
                              argnums=(0, 1, 2))(*args)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_model_with_the_kernel_decodes_like_the_reference(loaded, monkeypatch):
    """Generate and tree speculative decoding with the (interpreted) kernel give the same
    greedy tokens as the reference path, on a ragged batch, with a sliding window (6 slots,
    head dim 16); the kernel really runs. A model whose heads the kernel cannot take is
    refused rather than quietly run through the reference."""
    traced = []

    def counted(*args, **kwargs):
        traced.append(args[0].shape)
        return kernel(*args, **kwargs)

    kernel = TA.gpu.tree_attention_gpu
    monkeypatch.setattr(TA.gpu, "tree_attention_gpu", counted)
    model = loaded("mistral-window")
    prompts = [[3, 17, 9, 22, 5], [8, 1], [40, 41, 42]]
    want = jaxdec.generate(model, prompts, max_new_tokens=6).tokens
    assert not traced
    kernel_model = model.with_attention("pallas_interpret")
    assert kernel_model.attention is jaxdec.AttentionImpl.PALLAS_INTERPRET
    np.testing.assert_array_equal(jaxdec.generate(kernel_model, prompts, max_new_tokens=6).tokens,
                                  want)
    assert len(traced) >= model.config.num_layers  # (the decode step's, and the prefill's)
    traced.clear()
    spec = jaxdec.speculative_generate(kernel_model, jaxdec.drafters.DraftModel(kernel_model),
                                       prompts, max_new_tokens=6, tree=jaxdec.tree.kary(2, 2))
    np.testing.assert_array_equal(spec.tokens, want)
    assert (1 + 2 + 4) in {shape[1] for shape in traced}  # the target verifying the tree
    with pytest.raises(ValueError, match="attention must be one of"):
        model.with_attention("flash")
    narrow = loaded("llama-gqa").with_attention("pallas_interpret")  # head dim 8
    for call in (lambda: jaxdec.generate(narrow, prompts, max_new_tokens=2),
                 lambda: jaxdec.forward(narrow, jnp.array(prompts[:1]))):
        with pytest.raises(ValueError, match=r"attention='pallas_interpret' for this model: the "
                           r"triton kernel cannot take it \(head_dim=8 must be a power of two"):
            call()
    with pytest.raises(ValueError, match=r"attention='pallas_interpret' for the draft model: "
                                         r"the triton kernel cannot take it \(head_dim=8"):
        jaxdec.speculative_generate(kernel_model, jaxdec.drafters.DraftModel(narrow), prompts,
                                    max_new_tokens=2)


def test_pallas_impl_is_refused_without_a_kernel_backend():
    if jax.default_backend() != "cpu":
        pytest.skip("CPU only")
    q = jnp.zeros((1, 1, 2, 16))
    kv = jnp.zeros((1, 16, 1, 16))
    with pytest.raises(ValueError, match="\"pallas_interpret\" to run the kernel interpreted; AttentionImpl.AUTO"):
        L.attention(q, kv, kv, jnp.array([0]), jnp.array([[0]]), impl=L.AttentionImpl.PALLAS)
    config = jaxdec.ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                                num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
    model = jaxdec.init_model(config, jax.random.key(0)).with_attention("pallas")
    with pytest.raises(ValueError, match="no Pallas kernel"):  # in generate's checks
        jaxdec.generate(model, [[1, 2]], max_new_tokens=2)
    assert math.isfinite(float(L.attention(q, kv, kv, jnp.array([0]), jnp.array([[0]]))[0, 0, 0, 0]))
