"""jaxdec quickstart: build a checkpoint, load it, generate, and jit generation yourself.

No model hub is needed: the script writes a small randomly initialised Llama-family model as
a Hugging Face safetensors directory and uses it like any downloaded checkpoint. (Random
weights produce arbitrary tokens; `jaxdec demo` trains and runs real models.)

    python examples/quickstart.py [--layers N] [--width E] [--tp N]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdec


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args(argv)

    # 1. A checkpoint on disk, in the Hugging Face layout (config.json + model.safetensors).
    config = jaxdec.ModelConfig(
        model_type="llama", vocab_size=1024, hidden_size=args.width,
        intermediate_size=4 * args.width, num_layers=args.layers, num_heads=8, num_kv_heads=2,
        head_dim=args.width // 8, max_position_embeddings=2048, eos_token_ids=(2,),
    )
    with tempfile.TemporaryDirectory(prefix="jaxdec-quickstart-") as workdir:
        run_demo(config, workdir + "/model", args)


def run_demo(config: jaxdec.ModelConfig, directory: str, args) -> None:
    jaxdec.save_pretrained(jaxdec.init_model(config, jax.random.PRNGKey(0), std=0.1), directory)
    print(f"wrote a {config.num_layers}-layer Llama checkpoint to {directory}")

    # 2. Load it (sharded over `tp` devices when asked) and generate for a ragged batch.
    model = jaxdec.load_pretrained(directory, mesh=jaxdec.make_mesh(tp=args.tp))
    prompts = [[1, 17, 300, 42], [1, 5], [1, 900, 901, 902, 903, 904, 905]]
    greedy = jaxdec.generate(model, prompts, max_new_tokens=args.new_tokens, return_timings=True)
    for prompt, tokens in zip(prompts, greedy.to_lists()):
        print(f"greedy  {prompt} -> {tokens[:10]}...")
    print(f"decode: {greedy.decode_tokens_per_s:.0f} tokens/s over {len(prompts)} rows, "
          f"prefill {greedy.prefill_s * 1e3:.1f} ms")

    sampled = jaxdec.generate(
        model, prompts, max_new_tokens=args.new_tokens,
        sampler=jaxdec.Sampler(temperature=0.8, top_p=0.95), key=jax.random.PRNGKey(1),
        stop_tokens=[2],
    )
    print(f"sampled {prompts[0]} -> {sampled.to_lists()[0][:10]}...")

    # 3. The same program inside your own jit: right-padded prompts, a donated cache.
    tokens = np.zeros((len(prompts), 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    run = jax.jit(functools.partial(jaxdec.generate_padded, max_new_tokens=args.new_tokens),
                  donate_argnames="cache")
    cache = jaxdec.init_cache(config, len(prompts), 16 + args.new_tokens,
                              dtype=model.dtype, mesh=model.mesh)
    (out, n_generated), cache = run(model, tokens, lengths, cache, jax.random.PRNGKey(0))
    start = time.perf_counter()
    cache = jaxdec.init_cache(config, len(prompts), 16 + args.new_tokens,
                              dtype=model.dtype, mesh=model.mesh)
    (out, n_generated), cache = run(model, tokens, lengths, cache, jax.random.PRNGKey(0))
    jax.block_until_ready(out)
    print(f"your own jit: {time.perf_counter() - start:.3f} s for {int(jnp.sum(n_generated))} tokens, "
          f"same tokens as generate(): {bool(np.array_equal(out, greedy.tokens))}")


if __name__ == "__main__":
    main()
