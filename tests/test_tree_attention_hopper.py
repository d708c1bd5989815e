"""The Hopper (Mosaic GPU) tree-attention kernel against the jnp reference.

In Mosaic GPU's interpreter (jax >= 0.11: the device's jax, or a Python 3.12 environment; 0.10's
interpreter cannot take a transposed wgmma operand, so CI's 0.10.2 skips these), lowered for
CUDA on any jax (layouts, shared-memory budget), refused with a clear error where it cannot
run, and compiled on a Hopper card (`TestHopperOnGPU`, the device's gpu-tests step).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from test_tree_attention_vs_reference import (
    _lower_cuda, abstract_args, make_case, reference_of, tolerance,
)

from jaxdec.pallas_kernels import tree_attention as TA
from jaxdec.pallas_kernels.tree_attention import hopper


def _on_hopper() -> bool:
    if jax.default_backend() not in ("gpu", "cuda"):
        return False
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


class HopperSuite:
    INTERPRET = True
    EXAMPLES = 3

    def check(self, case, sizes=None):
        got = TA.tree_attention(**case, impl=TA.Impl.MOSAIC_GPU, interpret=self.INTERPRET,
                                block_sizes=sizes)
        dtype = case["q_BTHD"].dtype
        assert got.dtype == dtype and got.shape == case["q_BTHD"].shape
        np.testing.assert_allclose(np.asarray(got, np.float32), reference_of(case),
                                   **tolerance(dtype))

    @pytest.mark.parametrize("B,T,K,G,D,S,splits", [
        (2, 16, 2, 4, 64, 200, 2),  # 64 rows: one compute warpgroup
        (1, 32, 2, 4, 64, 304, 3),  # 128 rows: two compute warpgroups
        (2, 64, 1, 4, 128, 264, 4),  # 256 rows: two row tiles of two warpgroups
        (1, 16, 1, 4, 64, 144, 5),  # more splits than the row's whole blocks
        (1, 16, 1, 4, 64, 600, 1),  # more blocks than ring slots: the ring refilled
    ])
    def test_named_shapes(self, B, T, K, G, D, S, splits):
        """Random trees, rows of different lengths (from none to several whole key blocks
        before the new tokens), the dense blocks split over programs."""
        case = make_case(B=B, T=T, K=K, G=G, D=D, S=S, tree="random", window=None,
                         dtype=jnp.bfloat16, seed=T + S)
        self.check(case, TA.HopperBlockSizes(num_splits=splits))

    @pytest.mark.parametrize("T,S,splits", [(32, 304, 3), (64, 200, 4), (64, 504, 1)])
    def test_pingpong(self, T, S, splits):
        """The two compute warpgroups alternating on a shared barrier: same results, no
        deadlock, also in programs whose split has no block (200 slots: at most 3 blocks for
        4 splits)."""
        case = make_case(B=2, T=T, K=1, G=4, D=64, S=S, tree="random", window=None,
                         dtype=jnp.bfloat16, seed=T)
        self.check(case, TA.HopperBlockSizes(num_splits=splits, pingpong=True))

    def test_lengths_at_block_edges_and_fp16(self):
        """Lengths 0, 64 (one whole block, no partial one) and 127 (one whole, one partial),
        a causal chain (no mask), fp16."""
        case = make_case(B=3, T=16, K=1, G=4, D=64, S=200, tree="chain", causal=True,
                         window=None, dtype=jnp.float16, seed=3)
        case["lengths_B"] = jnp.array([0, 64, 127], jnp.int32)
        case["positions_BT"] = case["lengths_B"][:, None] + jnp.arange(16, dtype=jnp.int32)[None, :]
        self.check(case, TA.HopperBlockSizes(num_splits=2))

    def test_hypothesis_shapes(self):
        # No shrinking: each example compiles a kernel (on the device a failing draw's
        # shrinking outran the gpu-tests step), and the failing draw is reported as drawn.
        @settings(max_examples=self.EXAMPLES, deadline=None, derandomize=True,
                  phases=(Phase.explicit, Phase.reuse, Phase.generate),
                  suppress_health_check=list(HealthCheck))
        @given(B=st.integers(1, 2), T=st.sampled_from([16, 24, 40, 64]),
               G=st.sampled_from([4, 8]),
               extra=st.integers(8, 37).map(lambda n: 8 * n),  # slot counts: multiples of 8
               tree=st.sampled_from(["chain", "star", "random"]),
               splits=st.sampled_from([None, 1, 3]), stages=st.sampled_from([2, 3]),
               pingpong=st.booleans(), seed=st.integers(0, 2**16))
        def prop(B, T, G, extra, tree, splits, stages, pingpong, seed):
            case = make_case(B=B, T=T, K=1, G=G, D=64, S=T + extra, tree=tree, window=None,
                             dtype=jnp.bfloat16, seed=seed)
            self.check(case, TA.HopperBlockSizes(num_splits=splits, num_stages=stages,
                                                 pingpong=pingpong))

        prop()


@pytest.mark.skipif(not hopper.interpret_supported(),
                    reason=f"Mosaic GPU's interpreter in jax {jax.__version__} cannot run the "
                           "kernel (jax >= 0.11 can)")
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="interpret mode: CPU runs")
class TestHopperInterpret(HopperSuite):
    @pytest.mark.parametrize("pingpong", [False, True])
    def test_no_shared_memory_races(self, pingpong):
        """Mosaic GPU's interpreter with race detection (vector clocks over every shared
        memory access, TMA copy and barrier): the key / value ring refilled several times,
        two compute warpgroups, with and without ping-pong. (The interpreter also fails a
        barrier phase that completes unobserved: the memory warpgroup waits for the last
        blocks' releases.)"""
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        case = make_case(B=1, T=64, K=1, G=4, D=64, S=520, tree="random", window=None,
                         dtype=jnp.bfloat16, seed=5)
        case["lengths_B"] = jnp.array([440], jnp.int32)  # 6 whole blocks through 2 slots
        case["positions_BT"] = 440 + (case["positions_BT"] - case["positions_BT"][:, :1])
        args = [case[k] for k in ("q_BTHD", "k_BSKD", "v_BSKD", "lengths_B", "positions_BT",
                                  "mask_BTT")]
        out = hopper.tree_attention_hopper(
            *args, sizes=TA.HopperBlockSizes(num_splits=1, num_stages=2, pingpong=pingpong),
            interpret=InterpretGPUParams(detect_races=True))
        np.testing.assert_allclose(np.asarray(out, np.float32), reference_of(case),
                                   **tolerance(jnp.bfloat16))
        assert not interpret_pallas_call.get_races().races_found


@pytest.mark.skipif(not hopper.interpret_supported(),
                    reason=f"Mosaic GPU's interpreter in jax {jax.__version__} cannot run the "
                           "kernel (jax >= 0.11 can)")
def test_interpreting_under_x64_is_refused_by_name():
    """jax 0.12's interpreter gave the memory warpgroup's loop int64 carries under x64: an
    MLIR verifier error from a callback thread; now a NotImplementedError saying so."""
    case = make_case(B=1, T=16, K=1, G=4, D=64, S=200, tree="random", window=None,
                     dtype=jnp.bfloat16, seed=0)
    args = [case[k] for k in ("q_BTHD", "k_BSKD", "v_BSKD", "lengths_B", "positions_BT")]
    with jax.enable_x64(True), pytest.raises(NotImplementedError,
                                             match="interpret mode fails under jax_enable_x64"):
        TA.tree_attention(*args, mask_BTT=case["mask_BTT"], impl="mosaic_gpu", interpret=True)


@pytest.mark.gpu_only
@pytest.mark.skipif(not _on_hopper(), reason="needs a Hopper GPU (compute capability 9.x)")
class TestHopperOnGPU(HopperSuite):
    INTERPRET = False
    EXAMPLES = 3  # each draw compiles its own kernel; the gpu-tests step has ~5 minutes

    @pytest.mark.parametrize("in_registers", [False, True])
    def test_llama3_8b_heads(self, in_registers):
        """32 query / 8 KV heads, head dim 128, T = 64, a 1K-slot cache, the default tiling,
        and the probabilities fed to the second product from registers (compiled only: the
        interpreter cannot run it)."""
        case = make_case(B=2, T=64, K=8, G=4, D=128, S=1104, tree="random", window=None,
                         dtype=jnp.bfloat16, seed=8)
        self.check(case, TA.HopperBlockSizes(probs_in_registers=in_registers))


@pytest.mark.parametrize("T", [16, 64])
def test_hopper_lowers_for_cuda(T):
    """The Mosaic GPU kernel (layouts, swizzles, the shared-memory budget), the Triton tail
    and the combine all lower for an H100, at Llama-3-8B heads."""
    def f(*args):
        return hopper.tree_attention_hopper(*args, sizes=TA.HopperBlockSizes())

    text = _lower_cuda(f, abstract_args(B=1, T=T, S=4160)).as_text()
    assert "mosaic_gpu" in text and "tree_attention_combine" in text


def test_hopper_lowers_in_x64_mode():
    """`jax_enable_x64` on: the kernel's index arithmetic stays int32 (a Python int divisor
    was an int64 operand of `lax.div` and failed to trace); strict dtype promotion as well."""
    with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
        _lower_cuda(lambda *a: hopper.tree_attention_hopper(*a, sizes=TA.HopperBlockSizes()),
                    abstract_args(B=1, T=16, S=4160))


@pytest.mark.parametrize("S", [4100, 4104, 1100])
def test_hopper_slot_rule_is_the_lowering_rule(S):
    """The kernel refuses a cache whose slot count its TMA copies cannot tile (a multiple of
    8: the first H200 run failed to compile there, which the interpreter never checks), and
    lowers every count it accepts: the refusal and Mosaic GPU's own rule agree."""
    args = abstract_args(B=1, T=16, S=S)
    reason = TA.unsupported_reason(TA.Impl.MOSAIC_GPU, args[0].shape, args[1].shape)

    def f(*args):
        return hopper.tree_attention_hopper(*args, sizes=TA.HopperBlockSizes())

    if S % 8:
        assert f"{S} slots" in reason
        with pytest.raises(ValueError, match="multiple of its tiling 8"):
            _lower_cuda(f, args)
    else:
        assert reason is None
        assert "mosaic_gpu" in _lower_cuda(f, args).as_text()


def test_hopper_splits_hand_computed():
    """One program per multiprocessor (132), partials up to a split's cache bytes. T = 64 at
    Llama-3-8B heads: 256 rows = 2 row tiles x 8 KV heads = 16 tiles; at 4K (65 blocks, at
    most 4160 / 256 = 16 splits) 7 splits fill 112 of 132 (0.85, within 85% of 8's 0.97);
    at 64K 8 (128 programs); at batch 8 the 128 tiles take one split."""
    rows = 256
    assert hopper.default_num_splits(1, 8, rows, 4160, 256, 64, 132) == 7
    assert hopper.default_num_splits(1, 8, rows, 65600, 256, 64, 132) == 8
    assert hopper.default_num_splits(8, 8, rows, 65600, 256, 64, 132) == 1


def test_hopper_refuses_what_it_cannot_run():
    q = jnp.zeros((1, 16, 4, 64), jnp.bfloat16)
    kv = jnp.zeros((1, 128, 1, 64), jnp.bfloat16)
    args = (jnp.array([8]), jnp.arange(8, 24)[None])
    run = lambda q, kv, **kw: TA.tree_attention(  # noqa: E731
        q, kv, kv, *args, impl=TA.Impl.MOSAIC_GPU, **kw)
    with pytest.raises(ValueError, match="float32: the Hopper kernel takes bfloat16 or float16"):
        run(q.astype(jnp.float32), kv.astype(jnp.float32))
    with pytest.raises(ValueError, match="sliding windows"):
        run(q, kv, window=16)
    with pytest.raises(ValueError, match="head_dim=32 must be a multiple of 64"):
        run(q[..., :32], kv[..., :32])
    with pytest.raises(ValueError, match="head_dim=192 must be a power of two"):  # the tail's
        run(jnp.zeros((1, 16, 4, 192), jnp.bfloat16), jnp.zeros((1, 128, 1, 192), jnp.bfloat16))
    with pytest.raises(ValueError, match="block_k=96 must be a positive multiple of 64"):
        run(q, kv, block_sizes=TA.HopperBlockSizes(block_k=96))
    with pytest.raises(ValueError, match="num_stages=1 must be at least 2"):
        run(q, kv, block_sizes=TA.HopperBlockSizes(num_stages=1))
    with pytest.raises(ValueError, match="fewer than block_k=128"):
        run(q, kv[:, :100], block_sizes=TA.HopperBlockSizes(block_k=128))
    with pytest.raises(TypeError, match="block_sizes must be a HopperBlockSizes"):
        run(q, kv, block_sizes=TA.BlockSizes())
    with pytest.raises(ValueError, match="130 slots: the Hopper kernel needs a multiple of 8"):
        run(q, jnp.zeros((1, 130, 1, 64), jnp.bfloat16))
    # Shared memory: 128-slot blocks in 3 stages at head dim 128 and 256 rows need ~330 KB
    # (the compiler's own count: 331,888 bytes), over Hopper's 227 KiB.
    reason = TA.unsupported_reason(TA.Impl.MOSAIC_GPU, (1, 64, 32, 128), (1, 4160, 8, 128),
                                   TA.HopperBlockSizes(block_k=128, num_stages=3))
    assert "shared memory" in reason
    assert TA.unsupported_reason(TA.Impl.MOSAIC_GPU, (1, 64, 32, 128), (1, 4160, 8, 128)) is None
    assert hopper.shared_memory_bytes(128, 256, TA.HopperBlockSizes()) <= 232448
    if not hopper.interpret_supported():
        with pytest.raises(NotImplementedError, match="needs jax >= 0.11"):
            run(q, kv, interpret=True)
    else:
        with pytest.raises(ValueError, match="probs_in_registers=True is compiled only"):
            run(q, kv, interpret=True, block_sizes=TA.HopperBlockSizes(probs_in_registers=True))
    # Without the probabilities' staging tiles the shared memory shrinks by their bytes.
    assert (hopper.shared_memory_bytes(128, 256, TA.HopperBlockSizes())
            - hopper.shared_memory_bytes(128, 256, TA.HopperBlockSizes(probs_in_registers=True))
            == 2 * 64 * 64 * 2)


def test_hopper_compiles_for_sm90a_without_spills(tmp_path):
    """jax's own Mosaic GPU pipeline compiles the kernel for an H100 on this machine (no GPU;
    needs jax >= 0.11 and the CUDA plugin, so CI's 0.10.2 skips it): at Llama-3-8B heads the
    default tiling spills nothing and fits Hopper's shared memory, for one compute warpgroup
    (T = 16) and two (T = 64). `python bench/ptx_report.py --mosaic` writes the full table.
    (In a fresh process: a compile-only device needs the CUDA plugin before any backend.)"""
    import json
    import subprocess
    import sys
    from pathlib import Path

    if not hopper.interpret_supported():
        pytest.skip(f"the Mosaic GPU compile is checked with jax >= 0.11 ({jax.__version__})")
    root = Path(__file__).resolve().parents[1]
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from bench import ptx_report\n"
        "from bench.kernels import PRESETS\n"
        "reason = ptx_report.mosaic_unavailable()\n"
        "records = [] if reason else [ptx_report.report_hopper(1, 4096, T, PRESETS['h100'], {})"
        " for T in (16, 64)]\n"
        f"open({str(tmp_path / 'out.json')!r}, 'w').write(json.dumps(dict(reason=reason, "
        "records=records)))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "JAX_PLATFORMS"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True)
    out = json.loads((tmp_path / "out.json").read_text())
    if out["reason"]:
        pytest.skip(out["reason"])
    for record, (T, warpgroups) in zip(out["records"], ((16, 2), (64, 3))):
        assert record["error"] is None, record["error"]
        assert record["T"] == T and record["warpgroups"] == warpgroups
        assert record["spill_bytes"] == 0 and 0 < record["registers"] <= 232
        rows = max(64, 4 * T)
        assert record["shared_bytes"] <= hopper.shared_memory_bytes(
            128, rows, TA.HopperBlockSizes()) <= hopper.MAX_SHARED_MEMORY
