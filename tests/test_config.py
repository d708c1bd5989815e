"""ModelConfig from / to Hugging Face config.json."""

import dataclasses
import json
import os
import re
import warnings

import numpy as np
import pytest

from jaxdec import ModelConfig, RopeConfig

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2)


def test_llama_v4_layout_with_legacy_rope_scaling():
    hf = dict(BASE, model_type="llama", rope_theta=500000.0, torch_dtype="bfloat16",
              eos_token_id=[5, 6], rope_scaling={"type": "llama3", "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192})
    c = ModelConfig.from_hf(hf)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (3, 8, 2, 8)
    assert c.rope == RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0,
                                low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)
    assert c.dtype == "bfloat16" and c.eos_token_ids == (5, 6)
    assert not (c.qkv_bias or c.o_bias or c.mlp_bias or c.tie_word_embeddings)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_a_missing_max_position_embeddings_is_transformers_default(model_type):
    """transformers' per-model default (jaxdec read 4096 for all; llama3's and YaRN's
    original context followed it)."""
    import transformers

    hf = dict(BASE, model_type=model_type)
    config = ModelConfig.from_hf(hf)
    theirs = transformers.AutoConfig.for_model(**hf)
    assert config.max_positions == theirs.max_position_embeddings
    yarn = ModelConfig.from_hf(dict(hf, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    assert yarn.rope.original_max_position_embeddings == theirs.max_position_embeddings


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_missing_kv_heads_and_swish_read_as_transformers_reads_them(model_type):
    """A missing num_key_value_heads is the model type's default (Mistral's 8, Qwen2's 32;
    jaxdec read the query heads), a null one the query heads; "swish" is SiLU."""
    import transformers

    hf = dict(BASE, model_type=model_type, num_attention_heads=32, hidden_size=256)
    del hf["num_key_value_heads"]
    theirs = transformers.AutoConfig.for_model(**hf)
    assert ModelConfig.from_hf(hf).num_kv_heads == theirs.num_key_value_heads
    assert ModelConfig.from_hf(dict(hf, num_key_value_heads=None)).num_kv_heads == 32
    assert ModelConfig.from_hf(dict(BASE, model_type=model_type,
                                    hidden_act="swish")).hidden_act == "silu"


@pytest.mark.parametrize("field, value", [("theta", float("nan")), ("theta", float("inf")),
                                          ("factor", float("nan"))])
def test_non_finite_rope_settings_are_refused(field, value):
    with pytest.raises(ValueError, match="positive and finite"):
        RopeConfig(rope_type="linear", **{"factor": 2.0, field: value})


def test_v5_rope_parameters_and_explicit_head_dim():
    hf = dict(BASE, model_type="mistral", head_dim=32, sliding_window=4096,
              rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    c = ModelConfig.from_hf(hf)
    assert c.head_dim == 32 and c.rope.theta == 1e6
    assert c.layer_windows == (4096,) * 3


def test_qwen2_bias_and_sliding_layers():
    hf = dict(BASE, model_type="qwen2", tie_word_embeddings=True, sliding_window=16,
              use_sliding_window=True, max_window_layers=1)
    c = ModelConfig.from_hf(hf)
    assert c.qkv_bias and not c.o_bias and c.tie_word_embeddings
    assert c.layer_windows == (None, 16, 16)
    # Qwen2.5 releases ship a window that is off: use_sliding_window false.
    off = ModelConfig.from_hf(dict(hf, use_sliding_window=False,
                                   layer_types=["sliding_attention"] * 3))
    assert off.layer_windows == (None, None, None)


def test_missing_window_fields_take_transformers_defaults():
    """A field config.json lacks reads as transformers' class default (MistralConfig's and
    Qwen2Config's: a 4096-token window, max_window_layers 28), checked against transformers
    itself; a null window is none (they read as no window: other logits past 4096 tokens)."""
    import transformers

    mistral = dict(BASE, model_type="mistral")
    assert ModelConfig.from_hf(mistral).layer_windows == (4096,) * 3
    assert transformers.MistralConfig(**mistral).sliding_window == 4096
    assert ModelConfig.from_hf(dict(mistral, sliding_window=None)).layer_windows == (None,) * 3
    qwen2 = dict(BASE, model_type="qwen2", num_hidden_layers=30, use_sliding_window=True)
    windows = ModelConfig.from_hf(qwen2).layer_windows
    theirs = transformers.Qwen2Config(**qwen2)
    assert windows == tuple(theirs.sliding_window if t == "sliding_attention" else None
                            for t in theirs.layer_types)
    assert windows == (None,) * 28 + (4096,) * 2


@pytest.mark.parametrize("fields,message", [
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4),
          rope_scaling=dict(type="linear", factor=3.0)),
     r"rope_parameters \(default\) and rope_scaling \(linear\) disagree"),
    (dict(rope_parameters=dict(rope_type="linear", factor=2.0),
          rope_scaling=dict(rope_type="linear", factor=3.0)),
     "rope_parameters gives factor=2.0 where rope_scaling, which transformers reads, gives 3.0"),
    # What only rope_parameters says is ignored by transformers when rope_scaling is there:
    # a theta (it reads the top-level one, here its default) or an attention factor.
    (dict(rope_scaling=dict(rope_type="linear", factor=3.0),
          rope_parameters=dict(rope_type="linear", factor=3.0, rope_theta=5e5)),
     r"gives rope_theta=500000.0 where rope_scaling, which transformers reads, gives 10000.0 "
     r"\(the top-level rope_theta or its default\)"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=3.0),
          rope_parameters=dict(rope_type="yarn", factor=3.0, attention_factor=0.5)),
     "gives attention_factor=0.5 where rope_scaling, which transformers reads, gives nothing"),
    (dict(rope_parameters=dict(rope_type="default", partial_rotary_factor=0.5)),
     "partial_rotary_factor != 1 is not supported"),
    (dict(rope_theta=5e5, rope_scaling=dict(rope_type="linear", factor=2.0, rope_theta=1e4),
          rope_parameters=dict(rope_type="linear", factor=2.0)),
     r"rope_scaling gives rope_theta=10000.0 where the top level gives 500000.0"),
    (dict(rope_theta=1e4, rope_parameters=dict(rope_type="default", rope_theta=5e5)),
     r"rope_theta \(10000.0\) and rope_parameters' \(500000.0\) disagree"),
    (dict(rope_parameters=dict(full_attention=dict(rope_type="default", rope_theta=1e6))),
     r"rope_parameters per layer type \(full_attention\) are not supported"),
    # Scalings without their settings (transformers refuses them; they read as defaults).
    (dict(rope_scaling=dict(rope_type="llama3", factor=8.0)),
     "llama3 rope scaling lacks low_freq_factor, high_freq_factor"),
    (dict(rope_scaling=dict(type="linear")), "linear rope scaling lacks factor"),
])
def test_rope_settings_are_whole_and_agree(fields, message):
    """transformers 5 reads rope_scaling before rope_parameters, and the top-level theta;
    jaxdec read rope_parameters': a file whose two layouts disagree made two models."""
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(dict(BASE, model_type="llama", **fields))
    agreeing = dict(rope_parameters=dict(rope_type="linear", factor=3.0, rope_theta=1e4),
                    rope_scaling=dict(type="linear", factor=3.0), rope_theta=1e4)
    assert ModelConfig.from_hf(dict(BASE, model_type="llama", **agreeing)).rope.factor == 3.0


def test_architecture_found_from_architectures_list():
    """A model_type jaxdec does not know, with a class it does: loaded as that class, with a
    warning (transformers goes by model_type, and may build another model); no model_type at
    all takes the class silently."""
    with pytest.warns(UserWarning, match="model_type 'custom' is not one jaxdec implements; "
                                         "loading it as qwen2") as caught:
        c = ModelConfig.from_hf(dict(BASE, model_type="custom",
                                     architectures=["Qwen2ForCausalLM"]))
    assert c.model_type == "qwen2" and caught[0].filename == __file__  # the caller's line
    hf = {k: v for k, v in BASE.items() if k != "model_type"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ModelConfig.from_hf(dict(hf, architectures=["MistralForCausalLM"])).model_type \
            == "mistral"


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_to_hf_round_trip(model_type):
    extra = {"mistral": dict(sliding_window=8), "qwen2": dict(sliding_window=8,
             use_sliding_window=True, max_window_layers=2)}.get(model_type, {})
    c = ModelConfig.from_hf(dict(BASE, model_type=model_type, rope_scaling={
        "rope_type": "linear", "factor": 2.0}, **extra))
    assert ModelConfig.from_hf(json.loads(json.dumps(c.to_hf()))) == c


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported architecture.*gpt2.*llama.*mistral.*qwen2"):
        ModelConfig.from_hf(dict(BASE, model_type="gpt2", architectures=["GPT2LMHeadModel"]))


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="'longrope' is not supported.*yarn"):
        ModelConfig.from_hf(dict(BASE, model_type="llama", rope_scaling={
            "rope_type": "longrope", "factor": 4.0}))


def test_linear_and_dynamic_rope_limits_say_what_they_are():
    """Past max_position_embeddings: dynamic NTK's longer sequences are not implemented; a
    linear factor's checkpoint may have been trained longer than its config says (the error
    names how to say so)."""
    hf = dict(BASE, model_type="llama", max_position_embeddings=64)
    dynamic = ModelConfig.from_hf(dict(hf, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert dynamic.max_positions == 64 and dynamic.rope.factor == 2.0
    assert "dynamic NTK scaling past it" in dynamic.describe_max_positions()
    assert ModelConfig.from_hf(dynamic.to_hf()) == dynamic
    with pytest.raises(ValueError, match="dynamic rope scaling lacks factor"):
        ModelConfig.from_hf(dict(hf, rope_scaling={"rope_type": "dynamic"}))
    linear = ModelConfig.from_hf(dict(hf, rope_scaling={"rope_type": "linear", "factor": 4.0}))
    assert linear.max_positions == 64
    assert "linear RoPE factor 4" in linear.describe_max_positions()
    assert "max_position_embeddings=..." in linear.describe_max_positions()


def test_yarn_as_qwen25_documents_it():
    # Qwen2.5's long-context recipe: a 4.x-layout `rope_scaling` added to config.json.
    c = ModelConfig.from_hf(dict(BASE, model_type="qwen2", max_position_embeddings=32768,
                                 rope_scaling={"factor": 4.0, "type": "yarn",
                                               "original_max_position_embeddings": 32768}))
    assert c.rope == RopeConfig(rope_type="yarn", factor=4.0,
                                original_max_position_embeddings=32768)
    assert (c.rope.beta_fast, c.rope.beta_slow, c.rope.truncate) == (32.0, 1.0, True)
    assert c.rope.attention_scale == pytest.approx(1 + 0.1 * np.log(4.0))


@pytest.mark.parametrize("extra,rope", [
    # No original context anywhere: the model's own (none here: LlamaConfig's default).
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}),
     dict(factor=2.0, original_max_position_embeddings=2048)),
    # A top-level original context wins (transformers' order).
    (dict(original_max_position_embeddings=1024, rope_scaling={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048}),
     dict(factor=2.0, original_max_position_embeddings=1024)),
    # No factor: the ratio of the two contexts; mscale / mscale_all_dim give the attention
    # factor (DeepSeek-V3's convention).
    (dict(max_position_embeddings=16384, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "original_max_position_embeddings": 4096,
        "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "truncate": False}),
     dict(factor=4.0, original_max_position_embeddings=4096, beta_fast=16.0, truncate=False,
          attention_factor=(1 + 0.1 * np.log(4.0)) / (1 + 0.05 * np.log(4.0)))),
])
def test_yarn_settings_found(extra, rope):
    c = ModelConfig.from_hf(dict(BASE, model_type="llama", **extra))
    assert c.rope == RopeConfig(rope_type="yarn", **rope)
    _same_after_export(c)


def _same_after_export(c):
    """A YaRN config written for every transformers version (`to_hf`): the same rope and
    longest sequence back, whatever max_position_embeddings says."""
    hf = json.loads(json.dumps(c.to_hf()))
    back = ModelConfig.from_hf(hf)
    assert back.max_positions == c.max_positions
    assert dataclasses.replace(back, max_position_embeddings=c.max_position_embeddings) == c
    original = c.rope.original_max_position_embeddings
    assert hf["original_max_position_embeddings"] == original
    assert "original_max_position_embeddings" not in hf["rope_scaling"]
    if c.max_positions == int(c.rope.factor * original):  # 4.x's original: max_position_...
        assert hf["max_position_embeddings"] == original


def test_yarn_export_for_every_transformers_version():
    """Qwen2.5's recipe (max_position_embeddings = the original context) and DeepSeek's
    (max_position_embeddings = factor x original): written with max_position_embeddings = the
    original context, the factor in rope_scaling (4.46 and 4.51 read the original context
    from max_position_embeddings when rope_scaling does not name it; 4.51 would replace the
    factor by max_position_embeddings / original when it does)."""
    for max_pos in (32768, 131072):
        c = ModelConfig.from_hf(dict(BASE, model_type="qwen2", max_position_embeddings=max_pos,
                                     rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32768}))
        assert c.max_positions == 131072
        hf = c.to_hf()
        assert (hf["max_position_embeddings"], hf["rope_scaling"]["factor"]) == (32768, 4.0)
        _same_after_export(c)


@pytest.mark.parametrize("fields,message", [
    (dict(beta_fast=0.0), "beta_fast > 0"),
    (dict(beta_slow=-1.0), "beta_slow > 0"),
    (dict(attention_factor=0.0), "attention_factor must be positive"),
    (dict(original_max_position_embeddings=None), "needs original_max_position_embeddings"),
    (dict(original_max_position_embeddings=0), "original_max_position_embeddings must be >= 1"),
    (dict(theta=1.0), "theta != 1"),
])
def test_bad_yarn_settings_are_named(fields, message):
    good = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
    with pytest.raises(ValueError, match=message):
        RopeConfig(**{**good, **fields})


def test_missing_field_is_named():
    hf = dict(BASE, model_type="llama")
    del hf["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelConfig.from_hf(hf)
    # A field that is there but no integer is named too (int(None) named nothing).
    for bad in ("64", 64.5, True, 0):
        with pytest.raises(ValueError, match=f"config.json's vocab_size must be an integer "
                                             f">= 1, got {re.escape(repr(bad))}"):
            ModelConfig.from_hf(dict(BASE, model_type="llama", vocab_size=bad))
    with pytest.raises(ValueError, match="missing the required field 'vocab_size' .it is null"):
        ModelConfig.from_hf(dict(BASE, model_type="llama", vocab_size=None))
    assert ModelConfig.from_hf(dict(BASE, model_type="llama", vocab_size=64.0)).vocab_size == 64


@pytest.mark.parametrize("fields,message", [
    # A flag written as a string was truthy: "false" turned biases, tied embeddings and
    # Qwen2's sliding windows on.
    (dict(attention_bias="false"), "attention_bias must be true or false, got 'false'"),
    (dict(mlp_bias=0), "mlp_bias must be true or false, got 0"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
    (dict(model_type="qwen2", use_sliding_window="false", sliding_window=8),
     "use_sliding_window must be true or false"),
    # Sizes with a fraction or as strings were truncated or parsed (2.5 KV heads became 2).
    (dict(num_key_value_heads=2.5), "num_key_value_heads must be an integer >= 0, got 2.5"),
    (dict(num_key_value_heads="2"), "num_key_value_heads must be an integer"),
    (dict(head_dim=8.5), "head_dim must be an integer"),
    (dict(max_position_embeddings="4096"), "max_position_embeddings must be an integer"),
    (dict(model_type="mistral", sliding_window=2.5), "sliding_window must be an integer >= 1"),
    (dict(model_type="mistral", sliding_window="8"), "sliding_window must be an integer >= 1"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=8,
          max_window_layers="1"), "max_window_layers must be an integer"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, layer_types="ab"),
     "layer_types must be a list of .full_attention. and .sliding_attention."),
    (dict(bos_token_id="1"), "bos_token_id must be an integer, got '1'"),
    (dict(pad_token_id=1.5), "pad_token_id must be an integer"),
    # Numbers as strings failed inside float() without naming the field.
    (dict(rms_norm_eps="x"), "rms_norm_eps must be a finite number, got 'x'"),
    (dict(rope_theta="1e4"), "rope_theta must be a finite number"),
    (dict(partial_rotary_factor="0.5"), "partial_rotary_factor must be a finite number"),
    (dict(rope_scaling=[1]), "rope_scaling must be an object or null, got \\[1\\]"),
    (dict(rope_parameters="yarn"), "rope_parameters must be an object or null"),
    (dict(rope_scaling=dict(rope_type="yarn", factor="2")),
     "rope scaling factor must be a finite number, got '2'"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=2.0, mscale="1", mscale_all_dim=1)),
     "rope scaling mscale must be a finite number"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=2.0, truncate="no")),
     "rope scaling truncate must be true or false"),
    (dict(rope_scaling=dict(rope_type="llama3", factor=2, low_freq_factor="1",
                            high_freq_factor=4, original_max_position_embeddings=64)),
     "rope scaling low_freq_factor must be a finite number"),
    (dict(rope_scaling=dict(rope_type="llama3", factor=2, low_freq_factor=1,
                            high_freq_factor=4, original_max_position_embeddings=64.5)),
     "rope scaling original_max_position_embeddings must be an integer"),
    (dict(num_key_value_heads=0), "num_kv_heads must be an int >= 1, got 0"),
])
def test_malformed_config_fields_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**BASE, "model_type": "llama", **fields})


def test_a_dtype_that_names_no_float_is_read_as_float32():
    with pytest.warns(UserWarning, match="torch_dtype='auto' names no dtype jaxdec holds "
                                         "parameters in"):
        assert ModelConfig.from_hf({**BASE, "model_type": "llama",
                                    "torch_dtype": "auto"}).dtype == "float32"
    assert ModelConfig.from_hf({**BASE, "model_type": "llama",
                                "dtype": "torch.bfloat16"}).dtype == "bfloat16"
    # transformers' own reading of a null head_dim and a null KV head count.
    config = ModelConfig.from_hf({**BASE, "model_type": "llama", "head_dim": None,
                                  "num_key_value_heads": None})
    assert (config.head_dim, config.num_kv_heads) == (8, 8)


@pytest.mark.parametrize("change,match", [
    (dict(num_kv_heads=3), "not a multiple of num_kv_heads"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(layer_windows=(4,)), "layer_windows has 1 entries"),
    (dict(vocab_size=0), "vocab_size must be an int >= 1"),
    (dict(dtype="int8"), "dtype=int8 is not floating point"),
    (dict(dtype="fp8"), "dtype='fp8' is not a dtype"),
    (dict(rope={"theta": 1e4}), "rope must be a jaxdec.RopeConfig, got dict"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps must be a finite number > 0"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be a finite number > 0"),
    (dict(rms_norm_eps="1e-6"), "rms_norm_eps must be a finite number > 0"),
    (dict(qkv_bias="no"), "qkv_bias must be a bool, got 'no'"),  # (was truthy: biases)
    (dict(tie_word_embeddings=1), "tie_word_embeddings must be a bool"),
])
def test_invalid_configs(change, match):
    kwargs = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=4)
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        ModelConfig(**kwargs)


def test_rope_settings_are_stored_as_python_numbers():
    """0-d arrays (a setting computed with jnp) are stored as Python numbers: the config is
    a static argument (an array's hash failed at the first traced call); a non-number is
    named."""
    import jax.numpy as jnp

    rope = RopeConfig(theta=jnp.float32(1e4), rope_type="yarn", factor=np.float64(2.0),
                      original_max_position_embeddings=np.int64(64))
    assert rope == RopeConfig(theta=1e4, rope_type="yarn", factor=2.0,
                              original_max_position_embeddings=64)
    assert hash(rope) == hash(RopeConfig(theta=1e4, rope_type="yarn", factor=2.0,
                                         original_max_position_embeddings=64))
    with pytest.raises(ValueError, match="rope factor must be a number, got '2'"):
        RopeConfig(rope_type="linear", factor="2")
    with pytest.raises(TypeError, match="rope truncate must be a bool"):
        RopeConfig(truncate="no")


def test_dtype_is_stored_by_name():
    import jax.numpy as jnp

    kwargs = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=4)
    assert ModelConfig(dtype=jnp.bfloat16, **kwargs) == ModelConfig(dtype="bfloat16", **kwargs)


def test_numpy_integers_are_stored_as_python_ints():
    """Sizes read from arrays (numpy ints) make the same config, the same hash and so the same
    compiled programs; floats, strings and bools are refused naming the field."""
    kwargs = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=4, layer_windows=(8, None),
                  eos_token_ids=(2,))
    numpy = ModelConfig(**{k: np.int64(v) if isinstance(v, int) else v for k, v in kwargs.items()}
                        | dict(layer_windows=(np.int32(8), None), eos_token_ids=np.array([2])))
    assert numpy == ModelConfig(**kwargs) and hash(numpy) == hash(ModelConfig(**kwargs))
    assert type(numpy.hidden_size) is int and type(numpy.layer_windows[0]) is int
    assert type(numpy.eos_token_ids[0]) is int
    # one id, as config.json's eos_token_id often is
    for one in (np.int64(2), np.array(2), 2):
        assert ModelConfig(**kwargs | dict(eos_token_ids=one)) == ModelConfig(**kwargs)
    for change, match in [(dict(hidden_size=16.0), "hidden_size must be an int >= 1"),
                          (dict(num_layers=True), "num_layers must be an int >= 1"),
                          (dict(layer_windows=(0, None)), "sliding window"),
                          (dict(eos_token_ids=("2",)), "eos_token_ids entries must be an int")]:
        with pytest.raises(ValueError, match=match):
            ModelConfig(**kwargs | change)


def test_config_is_hashable_static_argument():
    c = ModelConfig.from_hf(dict(BASE, model_type="llama"))
    assert hash(c) == hash(ModelConfig.from_hf(dict(BASE, model_type="llama")))


def test_missing_and_corrupt_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf(tmp_path)
    # A Hugging Face cache's link to a pruned blob was "no config.json".
    os.symlink("../blobs/0123abcd", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"config.json is a broken link \(to "
                                                r"../blobs/0123abcd\): an interrupted"):
        ModelConfig.from_hf(tmp_path)
    os.remove(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)


def test_stop_ids_from_generation_config(tmp_path):
    """Llama 3 Instruct's layout: config.json names <|end_of_text|>, generation_config.json
    adds <|eot_id|>, which ends a chat turn; both stop, as in transformers' generate."""
    (tmp_path / "config.json").write_text(json.dumps(dict(BASE, model_type="llama",
                                                          eos_token_id=100)))
    assert ModelConfig.from_hf(tmp_path).eos_token_ids == (100,)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [127, 100], "temperature": 0.6}))
    assert ModelConfig.from_hf(tmp_path).eos_token_ids == (127, 100)
    assert ModelConfig.from_hf(tmp_path / "config.json").eos_token_ids == (127, 100)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 126}))
    assert ModelConfig.from_hf(tmp_path).eos_token_ids == (126, 100)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    assert ModelConfig.from_hf(tmp_path).eos_token_ids == (100,)
    # An id that is no integer was refused later, by ModelConfig, naming neither file.
    for where in ("config.json", "generation_config.json"):
        for bad in ("2", [126, None], 1.5, True):
            fields = {"eos_token_id": bad}
            (tmp_path / "generation_config.json").write_text(json.dumps(
                fields if where != "config.json" else {}))
            (tmp_path / "config.json").write_text(json.dumps(dict(
                BASE, model_type="llama", **(fields if where == "config.json" else {}))))
            with pytest.raises(ValueError, match=f"^{where}'s eos_token_id must be"):
                ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(BASE, model_type="llama",
                                                          eos_token_id=100)))
    for broken in ("{not json", "[1, 2]"):
        (tmp_path / "generation_config.json").write_text(broken)
        with pytest.warns(UserWarning, match="ignoring .*generation_config.json"):
            assert ModelConfig.from_hf(tmp_path).eos_token_ids == (100,)
