"""The GPU kernels compiled for an H100 on this machine (no GPU): `bench/ptx_report.py` lowers
the tree-attention call for CUDA, compiles its Triton programs for sm_90a with the `triton`
package and reads ptxas's resource report. What interpret mode cannot see (a program Triton
cannot compile, registers spilled, shared memory past the H100's, no tensor-core
instructions where the queries fill a Hopper matrix tile) fails here, before device time."""

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("triton", reason="the `ptx` extra (triton) compiles the kernels' IR")

from bench import ptx_report  # noqa: E402
from bench.kernels import PRESETS  # noqa: E402
from jaxdec.pallas_kernels import matvec as MV  # noqa: E402
from jaxdec.pallas_kernels.matvec import gpu  # noqa: E402


def test_cpu_tiny_preset_compiles_every_program(tmp_path):
    """Every case and swept tiling of the benchmarks' CPU presets (fp32: IEEE dots)
    compiles: both programs of a tree-attention call (the kernel and its combine) and the
    matrix-vector products; the report is written."""
    assert ptx_report.main(["--preset", "cpu-tiny", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "ptx-sm_90a-cpu-tiny.md").read_text()
    assert "0 failed to compile, 0 spill registers" in table
    assert "| tree_attention_combine |" in table
    assert "| qkv | 1 | 256 x 384 | default |" in table  # the matvec benchmark's cases too
    assert "| gate_up | 1 | 2 x 256 x 128 | default |" in table  # gate and up: one launch


@pytest.mark.parametrize("context,T", [(2048, 1), (4096, 64)])
def test_llama3_8b_heads_default_tiling(context, T):
    """Llama-3-8B heads in bf16 at the default tiling: decode (T = 1: 4 query rows of a KV
    head padded to 16, Ampere-style mma) and a 64-token tree (256 rows: Hopper's wgmma), no
    spills, within the H100's shared memory, at least two kernel programs per multiprocessor
    (the split rule's assumption for 4 warps)."""
    kernel, combine = ptx_report.report_case(1, context, T, PRESETS["h100"], {})
    assert kernel["program"] == "tree_attention" and combine["program"] == "tree_attention_combine"
    for record in (kernel, combine):
        assert record["error"] is None, record["error"]
        assert record["spill_bytes"] == 0
        assert record["shared_bytes"] <= ptx_report.SHARED_LIMIT
    assert kernel["shared_bytes"] > 0  # the key/value blocks are staged through it
    assert kernel["programs_per_core"] >= 2
    if T == 1:
        assert kernel["mma_sync"] > 0
    else:
        assert kernel["wgmma"] > 0


@pytest.mark.parametrize("rows", [1, 16])
def test_matvec_kernel_compiles_without_spills(rows):
    """The decode matrix-vector kernel at the Llama-3-8B q|k|v shape compiles without
    spills, its rows (one broadcast in the kernel, or 16) through Ampere-style mma tiles, x
    and the weight tiles copied asynchronously (Triton's software pipeline keeps the next
    tiles in flight: a bandwidth-bound kernel needs many bytes in flight), at least 4
    programs per multiprocessor."""
    def call(x, w):
        return gpu.matvec_gpu(x, w, block_sizes=MV.BlockSizes())

    with ptx_report.captured_programs() as programs, tempfile.TemporaryDirectory() as tmp:
        ptx_report.lower_for_cuda(call, jax.ShapeDtypeStruct((rows, 4096), jnp.bfloat16),
                                  jax.ShapeDtypeStruct((4096, 6144), jnp.bfloat16))
        (program,) = programs
        record = ptx_report.compile_program(program, Path(tmp))
    assert program["grid"] == [1, 48, 8] and record["spill_bytes"] == 0  # one matrix
    assert record["mma_sync"] > 0 and record["async_copies"] > 0
    assert record["programs_per_core"] >= 4


def test_programs_per_core_hand_computed():
    """CUDA's occupancy rules on an H100: registers go to warps in units of 256."""
    # 37 registers x 32 threads = 1184, rounded to 1280 per warp: 51 warps, 12 programs of 4
    # (not 65536 // (37 x 128) = 13).
    assert ptx_report.programs_per_core(37, 4, 0) == 12
    assert ptx_report.programs_per_core(32, 4, 0) == 16  # 64 warp slots / 4
    assert ptx_report.programs_per_core(16, 1, 0) == 32  # the program slots
    # 100 KiB of shared memory (+ 1 KiB the system keeps per program) of 228 KiB: 2.
    assert ptx_report.programs_per_core(32, 4, 100 * 1024) == 2
    assert ptx_report.programs_per_core(255, 8, 0) == 1  # 65536 // 8192 warps... / 8
