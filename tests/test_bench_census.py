"""bench/census.py: its HLO reading on a hand-written program, the cpu-tiny preset end to end
(the decode loop of generate's program, compiled for this CPU), and the target description
it hands the compiler."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import census  # noqa: E402

HLO = """\
HloModule jit_program

%fused_add (p0: f32[4], p1: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  %p1 = f32[4]{0} parameter(1)
  ROOT %add.1 = f32[4]{0} add(%p0, %p1)
}

%body (arg: (s32[], f32[4])) -> (s32[], f32[4]) {
  %arg = (s32[], f32[4]{0}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%arg), index=0
  %gte.1 = f32[4]{0} get-tuple-element(%arg), index=1
  %loop_add_fusion = f32[4]{0} fusion(%gte.1, %gte.1), kind=kLoop, calls=%fused_add
  %gemm_fusion_dot.3 = f32[4]{0} fusion(%loop_add_fusion, %gte.1), kind=kCustom, calls=%fused_add
  %pallas_call.2 = f32[4]{0} custom-call(%gemm_fusion_dot.3), custom_call_target="__gpu$xla.gpu.triton"
  %t0 = (s32[], f32[4]{0}) tuple(%gte.0, %gte.1)
  %levels = (s32[], f32[4]{0}) while(%t0), condition=%cond, body=%short, backend_config={"known_trip_count":{"n":"3"}}
  %open = (s32[], f32[4]{0}) while(%t0), condition=%cond, body=%short
  %bc = f32[4]{0} bitcast(%pallas_call.2)
  ROOT %t = (s32[], f32[4]{0}) tuple(%gte.0, %bc)
}

%short (arg: (s32[], f32[4])) -> (s32[], f32[4]) {
  %arg.1 = (s32[], f32[4]{0}) parameter(0)
  ROOT %copy.1 = (s32[], f32[4]{0}) copy(%arg.1)
}

%cond (arg: (s32[], f32[4])) -> pred[] {
  %arg.2 = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%arg.2), index=0
  %n = s32[] constant(8)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[4]) -> (s32[], f32[4]) {
  %x = f32[4]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4]{0}) tuple(%zero, %x)
  %w.0 = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%short
  ROOT %w.1 = (s32[], f32[4]{0}) while(%w.0), condition=%cond, body=%body
}
"""


def test_reads_the_busiest_loop_of_a_hand_written_program():
    loop = census.decode_loop(HLO)
    # A nested loop of known trip count counts its body's kernels that many times; one of
    # unknown count, once, as itself.
    assert loop == [("loop_add_fusion", "kLoop"), ("gemm_fusion_dot.3", "kCustom"),
                    ("pallas_call.2", "__gpu$xla.gpu.triton")] + [("copy.1", "copy")] * 3 + [
                        ("open", "while")]
    assert [census.category(*k) for k in loop[:3]] == ["element-wise", "matmul", "attention"]
    assert set(census.computations(HLO)) == {"fused_add", "body", "short", "cond", "main"}
    # The entry's kernels (its two loops) with their operands' and results' bytes: a
    # (s32, f32[4]) tuple is 4 + 16 bytes.
    assert census.entry_kernels(HLO) == [("w.0", "while", 40), ("w.1", "while", 40)]
    assert census.array_bytes("(bf16[2,3]{1,0}, pred[5], s32[])") == 12 + 5 + 4


def test_cpu_tiny_census(tmp_path):
    assert census.main(["--preset", "cpu-tiny", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "census-cpu.json").read_text())
    preset = census.presets()["cpu-tiny"]
    assert [(r["batch"], r["attention"]) for r in records] == [
        (b, a) for a in preset.attention for b in preset.batch_sizes]
    for r in records:
        # A layer is at least its 7 products (q, k, v, o, gate, up, down; the reference
        # attention's two may fuse); the counts add up.
        assert r["kernels_per_layer"] >= 7 and r["step_own_kernels"] >= 0
        assert sum(r["per_layer_by_category"].values()) == r["kernels_per_layer"]
        assert sum(r["per_layer_by_kind"].values()) == r["kernels_per_layer"]
        assert r["kernels_per_step"] == r["step_own_kernels"] + r["layers"] * r["kernels_per_layer"]
    table = (tmp_path / "census-cpu.md").read_text()
    assert table.count("\n| ") == 1 + len(records)  # header + one row per record
    # A speculative step's census joins the same file; the plain decoding records stay.
    assert census.main(["--preset", "cpu-tiny-lookup", "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "census-cpu.json").read_text())
    assert merged[: len(records)] == records
    lookup = merged[len(records):]
    assert [(r["preset"], r["program"]) for r in lookup] == [("cpu-tiny-lookup", "lookup")]
    # Speculation adds work to a step: drafting, the tree, acceptance, the cache commit.
    assert lookup[0]["kernels_per_step"] > records[0]["kernels_per_step"]
    # A draft model's step counts its levels' kernels (a nested loop) in the step's own: at
    # least its chain's 4 levels of 7 products each.
    assert census.main(["--preset", "cpu-tiny-draft", "--out", str(tmp_path)]) == 0
    (draft,) = json.loads((tmp_path / "census-cpu.json").read_text())[len(merged):]
    assert draft["program"] == "draft" and draft["step_own_kernels"] >= 4 * 7
    assert draft["kernels_per_layer"] >= records[0]["kernels_per_layer"]
    # A retrieval step compiles from a datastore of shapes only (RETRIEVAL_TOKENS of them).
    assert census.main(["--preset", "cpu-tiny-retrieval", "--out", str(tmp_path)]) == 0
    (retrieval,) = json.loads((tmp_path / "census-cpu.json").read_text())[len(merged) + 1:]
    assert retrieval["program"] == "retrieval"
    assert retrieval["kernels_per_step"] > records[0]["kernels_per_step"]


def test_cpu_tiny_training_step_census(tmp_path):
    """A training step's census: kernels and bytes per layer and per step, in a table of its
    own beside the decode rows."""
    assert census.main(["--preset", "cpu-tiny-train", "--out", str(tmp_path)]) == 0
    (r,) = json.loads((tmp_path / "census-cpu.json").read_text())
    assert r["program"] == "train" and (r["batch"], r["prompt_len"]) == (16, 128)
    # Forward, backward and the optimizer: more than a decode layer's seven products.
    assert r["kernels_per_layer"] > 7 and r["step_own_kernels"] > 0
    assert sum(r["per_layer_by_category"].values()) == r["kernels_per_layer"]
    assert r["kernels_per_step"] == r["step_own_kernels"] + r["layers"] * r["kernels_per_layer"]
    # A layer's activations alone (16 x 128 tokens x 192 wide, fp32) are 1.6 MB per array.
    assert sum(r["per_layer_gb"].values()) > 10 * 16 * 128 * 192 * 4 / 1e9
    assert sum(r["step_gb_by_category"].values()) > r["layers"] * sum(r["per_layer_gb"].values())
    table = (tmp_path / "census-cpu.md").read_text()
    assert "## Training steps" in table and "| cpu-tiny-train | 16 x 128 |" in table


def test_target_config_names_the_gpu():
    text = census.target_config("h100")
    assert "core_count: 132" in text and "major: 9" in text
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
