"""jaxdec.benchmark (decode speed against the memory-bandwidth limit) and `jaxdec bench`."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

import jaxdec
from jaxdec import benchmark
from jaxdec.cli import main

TINY = benchmark.SHAPES["tiny"]


def test_step_bytes_of_the_tiny_shape_by_hand():
    # Per layer: qkv 64 x (4 + 2 + 2) x 16, o 4 x 16 x 64, gate|up and down 3 x 64 x 128, two
    # norms of 64: 36992 values; two layers, embedding 256 x 64, final norm, lm_head 64 x 256.
    params = 2 * 36992 + 256 * 64 + 64 + 64 * 256
    need = benchmark.decode_step_bytes(TINY, batch=3, context=100)
    # Of the embedding only the 3 rows looked up; bf16.
    assert need.weights == (params - 256 * 64 + 3 * 64) * 2
    # 2 layers x (k, v) x 3 rows x 100 tokens x 2 heads x 16.
    assert need.kv == 2 * 2 * 3 * 100 * 2 * 16 * 2
    assert need.total == need.weights + need.kv
    assert benchmark.decode_step_bytes(TINY, 3, 100, dtype=jnp.float32).weights == \
        2 * need.weights


@pytest.mark.parametrize("changes,tp", [
    ({}, 1),
    ({}, 2),
    (dict(tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True,
          vocab_size=255), 4),  # padded vocabulary, every bias
    (dict(num_kv_heads=1, tie_word_embeddings=True), 4),  # the one KV head repeated 4 ways
])
def test_step_bytes_count_the_params_and_cache_jaxdec_allocates(changes, tp):
    config = dataclasses.replace(TINY, **changes)
    mesh = jaxdec.make_mesh(tp=tp)
    model = jaxdec.abstract_model(config, dtype=jnp.bfloat16, mesh=mesh)
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    embed = model.params["embed"]
    lookup = 0 if config.tie_word_embeddings else embed.size * 2 - 5 * config.hidden_size * 2
    cache = jaxdec.init_cache(config, 5, 40, dtype=jnp.bfloat16, mesh=mesh, abstract=True)
    kv = sum(x.size * x.dtype.itemsize for layer in cache.layers for x in (layer.k, layer.v))
    need = benchmark.decode_step_bytes(config, batch=5, context=40, tp=tp)
    assert (need.weights, need.kv) == (params - lookup, kv)


def test_sliding_window_layers_read_their_window():
    config = dataclasses.replace(TINY, model_type="mistral", layer_windows=(16, None))
    full = benchmark.decode_step_bytes(TINY, 1, 64)
    assert benchmark.decode_step_bytes(config, 1, 64).kv == full.kv * (16 + 64) // 128
    assert benchmark.decode_step_bytes(config, 1, 8).kv == \
        benchmark.decode_step_bytes(TINY, 1, 8).kv


@pytest.mark.parametrize("name,params", [
    ("llama3-70b", 70_553_706_496), ("llama3.2-1b", 1_235_814_400),
    ("qwen2.5-0.5b", 494_032_768), ("qwen2.5-7b", 7_615_616_512),
    ("mistral-7b", 7_248_023_552)])
def test_shapes_have_their_checkpoints_parameter_counts(name, params):
    model = jaxdec.abstract_model(benchmark.SHAPES[name], dtype=jnp.bfloat16)
    assert sum(x.size for x in jax.tree.leaves(model.params)) == params


def test_llama3_8b_shape():
    model = jaxdec.abstract_model(benchmark.SHAPES["llama3-8b"], dtype=jnp.bfloat16)
    assert sum(x.size for x in jax.tree.leaves(model.params)) == 8_030_261_248
    need = benchmark.decode_step_bytes(benchmark.SHAPES["llama3-8b"], 1, 2048)
    assert need.kv == 2 * 32 * 2048 * 8 * 128 * 2  # 268 MB
    assert round(need.total / 1e9, 2) == 15.28


@pytest.mark.parametrize("call,message", [
    (lambda: benchmark.decode_step_bytes({"hidden_size": 1}, 1, 1), "config must be"),
    (lambda: benchmark.decode_step_bytes(TINY, 0, 1), "batch"),
    (lambda: benchmark.decode_step_bytes(TINY, 1, 1, tp=3), "tp=3 does not divide"),
    (lambda: benchmark.memory_bandwidth(2), "nbytes must be >= 4"),
    (lambda: benchmark.prompt_length(4, 8), "context=4 leaves no prompt"),
])
def test_bad_arguments(call, message):
    with pytest.raises((TypeError, ValueError), match=message):
        call()


@pytest.fixture(scope="module")
def tiny_model():
    return jaxdec.init_model(TINY, jax.random.PRNGKey(0), dtype=jnp.bfloat16)


def test_decode_speed_records(tiny_model):
    records = benchmark.decode_speed(tiny_model, (1, 2), context=24, new_tokens=6, repeats=2,
                                     bandwidth_gbps=10.0)
    assert [r["batch"] for r in records] == [1, 2]
    for r in records:
        need = benchmark.decode_step_bytes(TINY, r["batch"], 24)
        assert r["prompt_len"] == 21 and r["bytes_per_step"] == need.total
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 5 / r["decode_s"])
        assert r["step_ms"] == pytest.approx(r["decode_s"] / 5 * 1e3)
        assert r["achieved_gbps"] == pytest.approx(need.total / (r["step_ms"] / 1e3) / 1e9)
        assert r["fraction"] == pytest.approx(r["achieved_gbps"] / 10.0)
        assert r["roofline_tokens_per_s"] == pytest.approx(r["batch"] * 10e9 / need.total)
        assert r["tokens_per_s"] / r["roofline_tokens_per_s"] == pytest.approx(r["fraction"])
        assert r["prefill_s"] > 0 and r["compile_s"] >= 0
        assert (r["device"], r["devices"], r["dtype"]) == ("cpu", 1, "bfloat16")
    assert benchmark.format_table(records).count("\n") == 2


def test_decode_speed_counts_padded_rows_and_windows_over_the_steps():
    """On a dp mesh the batch is padded to a multiple of dp (rows that decode and read too:
    the roofline of batch 1 on dp=2 was 41% too high at a long context); a window's keys
    are averaged over the steps (the window of the average context counted up to 14% more)."""
    config = dataclasses.replace(TINY, layer_windows=(4, None))
    model = jaxdec.init_model(config, jax.random.PRNGKey(0), dtype=jnp.bfloat16,
                              mesh=jaxdec.make_mesh(dp=2))
    (r,) = benchmark.decode_speed(model, (1,), context=24, new_tokens=6, repeats=1,
                                  bandwidth_gbps=10.0)
    # Steps attend to 22 .. 26 keys: layer 0 reads its 4, layer 1 24 on average; 2 rows.
    per_key = 2 * 2 * TINY.num_kv_heads * TINY.head_dim * 2  # k and v, 2 rows, bf16
    assert r["kv_bytes"] == pytest.approx((4 + 24) * per_key)
    one = benchmark.decode_step_bytes(config, 2, 24)
    assert r["weight_bytes"] == 2 * one.weights - 2 * TINY.hidden_size * 2  # 2 replicas
    assert r["roofline_tokens_per_s"] == pytest.approx(
        1 * 10e9 * 2 / (r["weight_bytes"] + r["kv_bytes"]))
    assert benchmark._mean_kv_bytes(config, 1, 2048, 4096, dtype=jnp.bfloat16, tp=1) \
        == pytest.approx((4 + 2048 + 2048) * per_key / 2)


def test_format_table_of_nothing_and_of_small_figures():
    assert benchmark.format_table([]).split() == [
        "batch", "context", "tokens/s", "step", "ms", "prefill", "ms", "GB/step", "GB/s", "of",
        "limit", "limit", "tokens/s"]  # (it raised TypeError)
    assert benchmark._figure(0.000181) == "0.000181" and benchmark._figure(2451.3) == "2451"


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_sizes=()), "batch_sizes must be a non-empty sequence"),
    (dict(batch_sizes=(1, 0)), "batch_sizes must be an int >= 1"),
    (dict(new_tokens=1), "new_tokens must be >= 2"),
    (dict(context=3, new_tokens=8), "context=3 leaves no prompt"),
    (dict(context=8192), "beyond the model's 8192"),
    (dict(bandwidth_gbps=0), "bandwidth_gbps must be a number > 0"),
])
def test_decode_speed_bad_arguments(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmark.decode_speed(tiny_model, **kwargs)


def test_decode_speed_needs_weights():
    with pytest.raises(ValueError, match="shapes only"):
        benchmark.decode_speed(jaxdec.abstract_model(TINY))
    with pytest.raises(TypeError, match="model must be"):
        benchmark.decode_speed(TINY)


def test_memory_bandwidth_probes():
    probes = benchmark.memory_bandwidth(1 << 20, passes=2, trials=1)
    assert sorted(probes) == ["sum", "x + 1"] and all(v > 0 for v in probes.values())
    # (-1 gave negative bandwidths, 2.5 ran 2 passes counted as 2.5, 0 divided by zero)
    for kwargs, message in ((dict(passes=-1), "passes must be an int >= 1"),
                            (dict(passes=2.5), "passes must be an int"),
                            (dict(trials=0), "trials must be an int >= 1")):
        with pytest.raises(ValueError, match=message):
            benchmark.memory_bandwidth(1 << 20, **kwargs)


def test_cli_bench_from_a_config(tmp_path, capsys):
    config_dir = tmp_path / "shape"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(TINY.to_hf()))
    out = tmp_path / "records.json"
    assert main(["bench", "--config", str(config_dir), "--batch-sizes", "1,2", "--context",
                 "24", "--new-tokens", "6", "--repeats", "1", "--tp", "2",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "random bfloat16 weights; 2 x cpu" in text and "memory bandwidth" in text
    records = json.loads(out.read_text())
    assert [r["batch"] for r in records] == [1, 2]
    assert all(r["devices"] == 2 and r["context"] == 24 and "x + 1" in r["bandwidths_gbps"]
               for r in records)
    assert records[0]["bytes_per_step"] == benchmark.decode_step_bytes(TINY, 1, 24, tp=2).total


@pytest.mark.parametrize("args,message", [
    (["--shape", "tiny", "--new-tokens", "1"], "argument --new-tokens: must be >= 2, got 1"),
    (["--shape", "tiny", "--context", "3", "--new-tokens", "8"], "context=3 leaves no prompt"),
    (["--shape", "tiny", "--tp", "3"], "tp=3 does not divide"),
    (["--config", "/nonexistent/dir"], "nonexistent"),
    (["--model", "/nonexistent/dir"], "does not exist"),
    (["--shape", "tiny", "--dtype", "int8"], "argument --dtype: expected float32, bfloat16 or "
                                             "float16 (or fp32, bf16, fp16), got 'int8'"),
])
def test_cli_bench_bad_arguments(capsys, args, message):
    try:
        code = main(["bench", *args])
    except SystemExit as e:  # (argparse's refusals)
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--json", "/nonexistent/x.json"], "--json /nonexistent/x.json: /nonexistent is not a "
                                        "writable directory"),
    (["--json", "."], "--json . is a directory"),
    (["--json", "-"], "--json -: give a file path"),
    (["--context", "100000"], "positions, beyond the model's"),
])
def test_cli_bench_refuses_before_measuring(capsys, monkeypatch, args, message):
    """Where the records would go, and whether the context fits: checked before anything is
    measured (the records of a whole benchmark were lost to a bad --json)."""
    def measured():
        raise AssertionError("measured before the arguments were checked")

    monkeypatch.setattr(benchmark, "memory_bandwidth", measured)
    assert main(["bench", "--shape", "tiny", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_bench_fits_its_default_context_to_the_models_positions(tmp_path, capsys):
    """The default --context is 2048 where the positions allow: a model of 2048 positions
    (Llama 1, TinyLlama) was refused the benchmark its README command names."""
    config_dir = tmp_path / "shape"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(
        dataclasses.replace(TINY, max_position_embeddings=64).to_hf()))
    out = tmp_path / "records.json"
    assert main(["bench", "--config", str(config_dir), "--new-tokens", "7", "--repeats", "1",
                 "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    assert record["context"] == 64 - 4 and record["prompt_len"] + 7 == 64
    assert benchmark.default_context(TINY.replace(max_position_embeddings=10**6), 128) == 2048
    assert main(["bench", "--config", str(config_dir), "--new-tokens", "120"]) == 2
    assert ("--new-tokens 120 leaves no room for a prompt in the model's 64 positions"
            in capsys.readouterr().err)


def test_cli_bench_unknown_shape(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--shape", "llama-9000"])
    assert "invalid choice" in capsys.readouterr().err


def test_cli_bench_a_checkpoint(tokenized_checkpoint, capsys):
    assert main(["bench", "--model", tokenized_checkpoint, "--context", "16", "--new-tokens",
                 "4", "--repeats", "1", "--attention", "reference"]) == 0
    header, bandwidth, table, first, note = capsys.readouterr().out.strip().split("\n")
    assert f"{tokenized_checkpoint} (float32 weights); 1 x cpu" in header
    assert table.split()[:3] == ["batch", "context", "tokens/s"]
    assert first.split()[:2] == ["1", "16"]
