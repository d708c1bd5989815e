"""jaxdec inside a caller's own mesh context (`jax.set_mesh`), on random models of its own (no
transformers: CI also runs this file under the newest jax, where arrays made under a mesh
carry that mesh in their type)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxdec

CONFIG = jaxdec.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                            num_heads=2, num_kv_heads=2, head_dim=8)
PROMPTS = [[1, 2, 3], [4, 5]]
SAMPLER = jaxdec.Sampler(temperature=1.0)


def test_calls_under_a_callers_mesh_give_what_they_give_outside_it():
    """Models, caches and keys made inside the caller's mesh context, and every entry point
    run there, on one device and on a tp = 2 mesh: the tokens of the same calls outside it
    (every call failed inside: "the context mesh ... should match the mesh passed to
    shard_map"; under jax 0.12 a key made there failed too)."""
    one = jaxdec.init_model(CONFIG, jax.random.key(0))
    want = jaxdec.generate(one, PROMPTS, max_new_tokens=4, sampler=SAMPLER,
                           key=jax.random.key(3)).tokens
    greedy = jaxdec.generate(one, PROMPTS, max_new_tokens=4).tokens
    user = jax.make_mesh((4,), ("data",))  # Explicit axes, jax.make_mesh's default
    with jax.set_mesh(user):
        two = jaxdec.init_model(CONFIG, jax.random.key(0), mesh=jax.make_mesh((1, 2),
                                                                              ("dp", "tp")))
        key = jax.random.key(3)
        for model in (one, two):
            np.testing.assert_array_equal(
                jaxdec.generate(model, PROMPTS, max_new_tokens=4, sampler=SAMPLER,
                                key=key).tokens, want)
            np.testing.assert_array_equal(jaxdec.speculative_generate(
                model, jaxdec.drafters.PromptLookup(), PROMPTS, max_new_tokens=4).tokens,
                greedy)
            assert jaxdec.forward(model, np.array(PROMPTS[:1])).shape == (1, 3, 32)
        session = jaxdec.PrefixCache(two, 32)
        assert len(session.generate(PROMPTS[0], max_new_tokens=4).tokens[0]) == 4
        with pytest.raises(ValueError, match="forward runs on its model's mesh .* traced under "
                                             "jax.jit with another context mesh"):
            jax.jit(lambda t: jaxdec.forward(one, t))(jnp.ones((1, 3), jnp.int32))
    # Inside a shard_map of one's own (even over the model's mesh, whose context the advice
    # above sets already): said so.
    inner = jax.jit(jax.shard_map(lambda t: jaxdec.forward(two, t), mesh=two.mesh,
                                  in_specs=P(), out_specs=P()))
    with pytest.raises(ValueError, match=r"forward cannot run inside a shard_map \(here over "
                                         r"the manual axes"):
        inner(jnp.ones((1, 3), jnp.int32))
