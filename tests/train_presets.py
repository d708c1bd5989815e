"""A micro training preset for tests: seconds on a CPU, on a slice of the standard library."""

from jaxdec.train import Preset, Shape

MICRO = Preset(
    name="test-micro",
    description="test preset",
    vocab_size=320, seq_len=32, batch_size=8, max_positions=256,
    target=Shape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
    target_steps=24, target_learning_rate=5e-3,
    draft=Shape(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64),
    draft_steps=24, draft_learning_rate=5e-3,
    warmup_fraction=0.1, checkpoint_every=8, max_train_bytes=120_000, eval_tokens=2048,
)
