"""Small random Hugging Face checkpoints for parity tests (written with transformers).

`initializer_range=0.25` gives logits with clear margins, so greedy argmax comparisons are
not decided by rounding.
"""

from __future__ import annotations

import torch
import transformers

_COMMON = dict(
    vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=8, initializer_range=0.25, pad_token_id=0, bos_token_id=1,
    eos_token_id=2,
)

# name -> (config class, model class, extra config)
VARIANTS = {
    # GQA: 8 query heads over 2 KV heads.
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    # Llama 3.1 rope scaling with a tiny original context, so tests run past it.
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=4, max_position_embeddings=1024, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # qkv bias, tied embeddings, MQA (one KV head).
    "qwen2-mqa-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_key_value_heads=1, tie_word_embeddings=True)),
    # A sliding window much shorter than the test sequences.
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(
        num_key_value_heads=2, sliding_window=6, head_dim=16)),
    # Qwen2 with its window on some layers only (use_sliding_window, max_window_layers).
    "qwen2-window-layers": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_key_value_heads=2, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    # Linear rope scaling (positions divided by 4), and one KV head per query head (MHA).
    "llama-linear-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=8, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    # YaRN (Qwen2.5's long-context setting) over an original context of 32 (the tests run
    # past it); betas chosen so the ramp between kept and scaled frequencies has a middle
    # step (weights 0, 0.5, 1, 1 over head dim 8's four frequencies).
    "qwen2-yarn": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_key_value_heads=2, max_position_embeddings=128,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                      "beta_fast": 2.0, "beta_slow": 0.25})),
    # Llama with a bias on every projection (`attention_bias`, `mlp_bias`), 2 query heads
    # per KV head.
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
}


def build(name: str, seed: int = 0):
    config_cls, model_cls, extra = VARIANTS[name]
    config = getattr(transformers, config_cls)(**_COMMON, **extra)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    # Random biases (transformers initialises them to zero) so the bias paths are tested.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.5)
    return model


def write_checkpoint(name: str, directory) -> torch.nn.Module:
    model = build(name)
    model.save_pretrained(str(directory), safe_serialization=True)
    return model


def hf_greedy(model, prompts, max_new_tokens: int):
    """HF greedy continuation of a left-padded batch (no stop token)."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    return out[:, longest:].numpy()


def make_tokenizer(vocab_size: int = 97):
    """A small BPE `tokenizers.Tokenizer` with ids 0/1/2 = <pad>/<s>/</s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    corpus = ["the quick brown fox jumps over the lazy dog " * 3,
              "hello world of fast decoding in jax",
              "speculative decoding verifies draft tokens"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    assert tokenizer.get_vocab_size() == vocab_size
    return tokenizer
