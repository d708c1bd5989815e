"""Parity with Hugging Face transformers on random checkpoints: fp32 logits and greedy
continuations of a ragged batch (HF runs the left-padded batch)."""

import dataclasses

import numpy as np
import pytest
import torch
import transformers

import jaxdec
from hf_models import VARIANTS, hf_greedy
from jaxdec.models import layers as L

# Past llama3-rope's and qwen2-yarn's original contexts (16, 32) and several mistral
# windows (6).
SEQ_LEN = 40


def _tokens(batch, length, seed=0):
    return np.random.RandomState(seed).randint(3, 97, (batch, length))


def _relative_error(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_vs_hf(variant, hf_checkpoints, loaded):
    _, hf_model = hf_checkpoints(variant)
    tokens = _tokens(2, SEQ_LEN)
    ours = np.asarray(jaxdec.forward(loaded(variant), tokens))
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens)).logits.numpy()
    assert ours.shape == ref.shape == (2, SEQ_LEN, 97)
    assert _relative_error(ours, ref) < 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_ragged_batch_vs_hf(variant, hf_checkpoints, loaded):
    _, hf_model = hf_checkpoints(variant)
    rs = np.random.RandomState(1)
    prompts = [rs.randint(3, 97, n).tolist() for n in (7, 19, 2, 12)]
    new = 24  # 19 + 24 > 16: llama3 scaling and the mistral window both matter
    ours = jaxdec.generate(loaded(variant), prompts, max_new_tokens=new)
    np.testing.assert_array_equal(ours.lengths, new)
    np.testing.assert_array_equal(ours.tokens, hf_greedy(hf_model, prompts, new))


def test_config_features_are_parsed(loaded):
    assert loaded("llama-gqa").config.num_kv_heads == 2
    rope = loaded("llama3-rope").config.rope
    assert (rope.rope_type, rope.factor, rope.original_max_position_embeddings) == ("llama3", 8.0, 16)
    qwen = loaded("qwen2-mqa-tied").config
    assert qwen.qkv_bias and qwen.tie_word_embeddings and qwen.num_kv_heads == 1
    assert "lm_head" not in loaded("qwen2-mqa-tied").params
    assert loaded("mistral-window").config.layer_windows == (6, 6)
    assert loaded("mistral-window").config.head_dim == 16
    # HF's Qwen2: the layers from max_window_layers (1) on slide.
    assert loaded("qwen2-window-layers").config.layer_windows == (None, 5)
    linear = loaded("llama-linear-rope").config
    assert (linear.rope.rope_type, linear.rope.factor, linear.num_kv_heads) == ("linear", 4.0, 8)
    yarn = loaded("qwen2-yarn").config.rope
    assert (yarn.rope_type, yarn.factor, yarn.original_max_position_embeddings,
            yarn.beta_fast, yarn.beta_slow) == ("yarn", 4.0, 32, 2.0, 0.25)
    np.testing.assert_allclose(L.rope_inv_freq(yarn, 8) / L.rope_inv_freq(
        jaxdec.RopeConfig(theta=yarn.theta), 8), [1, 1 - 0.5 * 0.75, 0.25, 0.25], rtol=1e-6)
    biased = loaded("llama-bias")
    assert biased.config.qkv_bias and biased.config.o_bias and biased.config.mlp_bias
    for name in ("qkv_bias", "o_bias", "gate_up_bias", "down_bias"):  # random, not zero
        assert np.all(np.asarray(biased.params["layers"][0][name]) != 0), name


@pytest.mark.parametrize("variant,change", [
    ("mistral-window", dict(layer_windows=(None, None))),
    ("qwen2-window-layers", dict(layer_windows=(None, None))),
    ("llama-linear-rope", dict(rope=jaxdec.RopeConfig(theta=10000.0))),
    ("llama3-rope", dict(rope=jaxdec.RopeConfig(theta=500000.0))),
    ("qwen2-yarn", dict(rope=jaxdec.RopeConfig(theta=10000.0))),
    ("qwen2-yarn", dict(rope=jaxdec.RopeConfig(  # the same frequencies, cos and sin unscaled
        theta=10000.0, rope_type="yarn", factor=4.0, original_max_position_embeddings=32,
        beta_fast=2.0, beta_slow=0.25, attention_factor=1.0))),
])
def test_the_parity_cases_exercise_their_feature(variant, change, loaded):
    """Dropping the window / the rope scaling changes the logits: the parity tests above
    would catch an implementation that ignored them."""
    model = loaded(variant)
    altered = jaxdec.Model(config=model.config.replace(**change), params=model.params, mesh=model.mesh)
    tokens = _tokens(1, SEQ_LEN)
    ours = np.asarray(jaxdec.forward(model, tokens))
    other = np.asarray(jaxdec.forward(altered, tokens))
    assert _relative_error(other, ours) > 1e-2


@pytest.mark.parametrize("variant", ["mistral-window", "llama3-rope"])
def test_long_prefill_in_query_chunks_vs_hf(variant, hf_checkpoints, loaded):
    """700 tokens exceed the attention entry point's 512-query chunk."""
    _, hf_model = hf_checkpoints(variant)
    tokens = _tokens(1, 700, seed=2)
    ours = np.asarray(jaxdec.forward(loaded(variant), tokens))
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens)).logits.numpy()
    assert _relative_error(ours, ref) < 1e-4
    prompt = tokens[0, :600].tolist()
    ours = jaxdec.generate(loaded(variant), [prompt, prompt[:40]], max_new_tokens=8)
    np.testing.assert_array_equal(ours.tokens, hf_greedy(hf_model, [prompt, prompt[:40]], 8))


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
     "beta_fast": 8, "beta_slow": 2, "truncate": False},
    {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096,
     "mscale": 0.707, "mscale_all_dim": 0.707},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192,
     "attention_factor": 0.9},
])
def test_yarn_frequencies_and_scale_vs_transformers(rope_scaling):
    """A head dim of 128 and theta 5e5 (Llama 3's), so the ramp spans many frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = dict(model_type="llama", vocab_size=97, hidden_size=1024, intermediate_size=64,
              num_hidden_layers=1, num_attention_heads=8, rope_theta=500000.0,
              max_position_embeddings=4 * rope_scaling["original_max_position_embeddings"],
              rope_scaling=rope_scaling)
    inv_freq, scale = ROPE_INIT_FUNCTIONS["yarn"](transformers.LlamaConfig(**hf), "cpu")
    rope = jaxdec.ModelConfig.from_hf(hf).rope
    np.testing.assert_allclose(L.rope_inv_freq(rope, 128), inv_freq.numpy(), rtol=1e-6)
    assert rope.attention_scale == pytest.approx(scale, rel=1e-6)


def test_mistral_config_with_layer_types_vs_transformers(tmp_path):
    """A Mistral config.json with layer_types (transformers 5 reads it as Ministral's: the
    window on the layers named "sliding_attention") computes transformers' logits, and
    exports so that transformers reads the same model back (jaxdec gave every layer the
    window: logits off by ~1)."""
    import json

    config = transformers.MinistralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "full_attention"],
        initializer_range=0.25, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = transformers.MinistralForCausalLM(config).eval()
    reference.save_pretrained(str(tmp_path / "ckpt"), safe_serialization=True)
    path = tmp_path / "ckpt" / "config.json"
    hf = json.loads(path.read_text())
    hf.update(model_type="mistral", architectures=["MistralForCausalLM"])
    path.write_text(json.dumps(hf))

    model = jaxdec.load_pretrained(tmp_path / "ckpt")
    assert model.config.layer_windows == (None, 4, None)
    tokens = _tokens(2, 12)
    with torch.no_grad():
        ref = reference(torch.tensor(tokens)).logits.numpy()
    assert _relative_error(np.asarray(jaxdec.forward(model, tokens)), ref) < 1e-4
    out = jaxdec.save_pretrained(model, tmp_path / "export")
    again = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(again).__name__ == "MinistralForCausalLM"
    with torch.no_grad():
        assert _relative_error(again(torch.tensor(tokens)).logits.numpy(), ref) < 1e-4
    assert jaxdec.load_pretrained(out).config.layer_windows == (None, 4, None)
    # A uniform window exports as plain Mistral (transformers 4.x reads no layer_types).
    uniform = dataclasses.replace(model.config, layer_windows=(4, 4, 4))
    assert "layer_types" not in uniform.to_hf()
    # Types transformers does not know are refused, not read as full attention.
    hf["layer_types"] = ["full_attention", "chunked_attention", "full_attention"]
    path.write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="layer_types must be a list of 'full_attention' and"):
        jaxdec.load_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("rope_scaling", [{"rope_type": "dynamic", "factor": 4.0},
                                          {"rope_type": "linear", "factor": 4.0}])
def test_dynamic_and_linear_rope_at_their_limits_vs_transformers(rope_scaling, tmp_path):
    """Dynamic NTK up to max_position_embeddings (16) is plain RoPE: transformers' logits.
    A linear-factor checkpoint trained past its config's max_position_embeddings (as some
    long-context ones are) runs longer once its config says so, as the limit's error tells."""
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        rope_scaling=rope_scaling, initializer_range=0.25)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.save_pretrained(str(tmp_path), safe_serialization=True)
    model = jaxdec.load_pretrained(tmp_path)
    assert model.config.rope.rope_type == rope_scaling["rope_type"]
    tokens = _tokens(2, 16)
    with torch.no_grad():
        ref = reference(torch.tensor(tokens)).logits.numpy()
    assert _relative_error(np.asarray(jaxdec.forward(model, tokens)), ref) < 1e-4
    longer = _tokens(2, 40)
    with pytest.raises(ValueError, match="exceeds the model's 16 positions") as refused:
        jaxdec.forward(model, longer)
    if rope_scaling["rope_type"] == "linear":
        assert "model.config.replace(max_position_embeddings=...)" in str(refused.value)
        model = dataclasses.replace(model, config=model.config.replace(
            max_position_embeddings=64))
        with torch.no_grad():
            ref = reference(torch.tensor(longer)).logits.numpy()
        assert _relative_error(np.asarray(jaxdec.forward(model, longer)), ref) < 1e-4
