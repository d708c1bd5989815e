"""Differential fuzz: speculative decoding and `PrefixCache` against plain decoding, on random
tiny models, drafters, trees, batches and stop tokens. Everything is greedy (or, for
PrefixCache, seeded), so every case must give exactly the tokens plain decoding gives.

    python tests/fuzz_speculative.py --cases 200                # cases 0 to 199
    python tests/fuzz_speculative.py --prefix --start 500 --cases 50

A case is a function of its number alone (numpy's RandomState(number)), so a failure names
the number and reruns alone with `--start N --cases 1`. Models are random Llama / Qwen2
configs (GQA / MQA, sliding windows, qkv bias, tied embeddings) in fp32 at tp 1 or 2 (fake
CPU devices); drafters: the target itself, another random model (sometimes with a padded
vocabulary), prompt lookup and retrieval; trees: none (the drafter's), chains, k-ary trees,
random Medusa-style choices and dynamic trees; some runs end at the cache's last slot.
`test_fuzz_speculative.py` runs a few cases in the suite.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__":  # before jax starts: fake CPU devices for tp 2
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=2").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxdec  # noqa: E402
from jaxdec import tree  # noqa: E402
from jaxdec.drafters import DraftModel, PromptLookup, Retrieval  # noqa: E402


def random_config(rs: np.random.RandomState, vocab: int) -> jaxdec.ModelConfig:
    kv, group, layers = int(rs.choice([1, 2, 4])), int(rs.choice([1, 2, 3])), int(rs.choice([1, 2]))
    windows = None
    if rs.rand() < 0.3:
        windows = tuple(int(rs.choice([4, 8, 16])) if rs.rand() < 0.7 else None
                        for _ in range(layers))
    return jaxdec.ModelConfig(
        model_type="qwen2" if rs.rand() < 0.3 else "llama", vocab_size=vocab, hidden_size=32,
        intermediate_size=48, num_layers=layers, num_heads=kv * group, num_kv_heads=kv,
        head_dim=int(rs.choice([8, 16])), layer_windows=windows,
        qkv_bias=bool(rs.rand() < 0.3), tie_word_embeddings=bool(rs.rand() < 0.3),
        max_position_embeddings=512)


def random_tree(rs: np.random.RandomState):
    """(a tree or None, its description)."""
    kind = rs.randint(5)
    if kind == 0:
        return None, "the drafter's"
    if kind == 1:
        k = int(rs.randint(1, 6))
        return tree.chain(k), f"chain({k})"
    if kind == 2:
        depth, width = int(rs.randint(1, 4)), int(rs.randint(1, 4))
        return tree.kary(depth, width), f"kary({depth}, {width})"
    if kind == 3:  # random parents; a node's path is its parent's plus its rank among siblings
        paths, children = [()], [0]
        for _ in range(rs.randint(1, 12)):
            parent = int(rs.randint(len(paths)))
            if len(paths[parent]) < 4:
                paths.append(paths[parent] + (children[parent],))
                children[parent] += 1
                children.append(0)
        choices = sorted((list(p) for p in paths[1:]), key=lambda p: (len(p), p))
        return tree.from_choices(choices), f"from_choices({choices})"
    depth, width = int(rs.randint(1, 4)), int(rs.randint(1, 4))
    nodes = int(rs.randint(2, depth * width + 2))
    return tree.dynamic(depth, width, nodes), f"dynamic({depth}, {width}, {nodes})"


def _mesh(rs: np.random.RandomState, config: jaxdec.ModelConfig):
    tp = 2 if len(jax.devices()) >= 2 and config.num_heads % 2 == 0 and rs.rand() < 0.5 else 1
    return tp, jaxdec.make_mesh(tp=tp)


def _prompts(rs: np.random.RandomState, vocab: int, rows: int) -> list[list[int]]:
    prompts = []
    for _ in range(rows):
        length = int(rs.randint(1, 40))
        if rs.rand() < 0.5:  # repetitive, so that prompt lookup and retrieval find matches
            prompts.append((rs.randint(0, vocab, rs.randint(1, 6)).tolist() * 40)[:length])
        else:
            prompts.append(rs.randint(0, vocab, length).tolist())
    return prompts


def speculative_case(number: int) -> tuple[str, str | None]:
    """(the case's description, None or what differed from `generate`)."""
    rs = np.random.RandomState(number)
    vocab = int(rs.choice([64, 100, 128]))
    config = random_config(rs, vocab)
    tp, mesh = _mesh(rs, config)
    model = jaxdec.init_model(config, jax.random.PRNGKey(number), mesh=mesh,
                              std=float(rs.choice([0.02, 0.2, 0.5])))
    prompts = _prompts(rs, vocab, int(rs.randint(1, 5)))
    new_tokens = int(rs.randint(1, 30))
    stop = tuple(int(t) for t in rs.randint(0, vocab, rs.randint(0, 3)))
    which = rs.randint(4)
    if which == 0:
        drafter, name = DraftModel(model), "itself"
    elif which == 1:
        other = random_config(rs, vocab if rs.rand() < 0.7 else vocab + 16)
        if other.num_heads % tp:
            other = other.replace(num_heads=2, num_kv_heads=2)
        drafter = DraftModel(jaxdec.init_model(other, jax.random.PRNGKey(number + 1),
                                               mesh=mesh, std=0.3))
        name = f"another model (vocabulary {other.vocab_size})"
    elif which == 2:
        longest = int(rs.randint(1, 4))
        shortest, depth, candidates = (int(rs.randint(1, longest + 1)), int(rs.randint(1, 7)),
                                       int(rs.randint(1, 4)))
        drafter = PromptLookup(max_ngram=longest, min_ngram=shortest, depth=depth,
                               num_candidates=candidates)
        name = (f"prompt lookup ({shortest}- to {longest}-grams, depth {depth}, {candidates} "
                "candidates)")
    else:
        corpus = np.concatenate([np.array(p) for p in prompts] + [rs.randint(0, vocab, 50)])
        drafter, name = Retrieval(corpus, depth=int(rs.randint(1, 7))), "retrieval"
    topology, shape = random_tree(rs)
    max_len = None
    if rs.rand() < 0.4:  # to the cache's end: the prompt bucket and the new tokens, no more
        bucket = max(16, 1 << (max(len(p) for p in prompts) - 1).bit_length())
        max_len = bucket + new_tokens + int(rs.randint(0, 3))
    description = (f"case {number}: tp {tp}, {config.model_type} with {config.num_layers} "
                   f"layers, heads {config.num_heads}/{config.num_kv_heads}, windows "
                   f"{config.layer_windows}; {len(prompts)} prompts, {new_tokens} new tokens, "
                   f"stop {stop}, max_len {max_len}; draft: {name}; tree: {shape}")
    plain = jaxdec.generate(model, prompts, max_new_tokens=new_tokens, stop_tokens=stop)
    spec = jaxdec.speculative_generate(model, drafter, prompts, max_new_tokens=new_tokens,
                                       tree=topology, stop_tokens=stop, max_len=max_len)
    if np.array_equal(spec.tokens, plain.tokens) and np.array_equal(spec.lengths, plain.lengths):
        return description, None
    return description, f"generate {plain.tokens.tolist()}, speculative {spec.tokens.tolist()}"


def prefix_case(number: int) -> tuple[str, str | None]:
    """Four turns of a `PrefixCache` session of 1 to 3 rows (each row's prompt continuing its
    last, cut back, unrelated, or the same again), each against `generate` /
    `speculative_generate` from scratch: (the description, None or the first turn that
    differed)."""
    rs = np.random.RandomState(number)
    rows = 1 + np.random.RandomState([number, 1]).randint(3)  # (one row: the draws as before)
    vocab = 64
    config = random_config(rs, vocab)
    tp, mesh = _mesh(rs, config)
    model = jaxdec.init_model(config, jax.random.PRNGKey(number), mesh=mesh, std=0.3)
    which = rs.randint(4)
    drafter = [None, DraftModel(model), PromptLookup(), DraftModel(jaxdec.init_model(
        config, jax.random.PRNGKey(number + 1), mesh=mesh, std=0.3))][which]
    topology = None
    if drafter is not None and rs.rand() < 0.5:
        topology = [tree.chain(3), tree.kary(2, 2), tree.dynamic(2, 2, 4)][rs.randint(3)]
    sampled = rs.rand() < 0.3
    max_len = int(rs.choice([64, 96, 160]))
    session = jaxdec.PrefixCache(model, max_len=max_len, drafter=drafter, tree=topology,
                                 rows=rows)
    description = (f"prefix case {number}: {rows} row(s), tp {tp}, drafter "
                   f"{type(drafter).__name__ if drafter else None}, tree "
                   f"{topology}, windows {config.layer_windows}, max_len {max_len}, "
                   f"sampled {sampled}")
    histories = [rs.randint(0, vocab, rs.randint(1, 10)).tolist() for _ in range(rows)]
    for turn in range(4):
        prompts = []
        for history in histories:
            mode = rs.randint(4)
            if mode == 0:
                prompt = history + rs.randint(0, vocab, rs.randint(1, 12)).tolist()
            elif mode == 1:
                prompt = (history[: rs.randint(1, len(history) + 1)]
                          + rs.randint(0, vocab, rs.randint(0, 5)).tolist())
            elif mode == 2:
                prompt = rs.randint(0, vocab, rs.randint(1, 20)).tolist()
            else:
                prompt = list(history)
            prompts.append(prompt[-(max_len // 2):])
        new_tokens = int(rs.randint(1, 16))
        settings = dict(max_new_tokens=new_tokens,
                        stop_tokens=tuple(int(t) for t in rs.randint(0, vocab, rs.randint(0, 2))))
        if sampled:
            settings.update(sampler=jaxdec.Sampler(temperature=0.8, top_k=int(rs.choice([5, 20]))),
                            key=jax.random.key(turn))
        got = session.generate(prompts[0] if rows == 1 else prompts, **settings)
        if drafter is None:
            want = jaxdec.generate(model, prompts, **settings)
        else:
            want = jaxdec.speculative_generate(model, drafter, prompts, tree=topology,
                                               max_len=max_len, **settings)
        if not (np.array_equal(got.tokens, want.tokens)
                and np.array_equal(got.lengths, want.lengths)):
            return description, (f"turn {turn}: PrefixCache {got.tokens.tolist()}, from "
                                 f"scratch {want.tokens.tolist()}")
        histories = [prompt + out for prompt, out in zip(prompts, got.to_lists())]
    return description, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=int, default=0, help="the first case's number")
    parser.add_argument("--cases", type=int, default=100, help="how many cases")
    parser.add_argument("--prefix", action="store_true",
                        help="PrefixCache sessions instead of speculative_generate runs")
    args = parser.parse_args(argv)
    run = prefix_case if args.prefix else speculative_case
    failures = 0
    for number in range(args.start, args.start + args.cases):
        # Every case compiles new programs: thousands in one process exhaust the kernel's
        # memory maps (vm.max_map_count) unless jax lets the old ones go.
        jax.clear_caches()
        start = time.perf_counter()
        description, failure = run(number)
        failures += failure is not None
        print(f"{'FAIL' if failure else 'ok'} ({time.perf_counter() - start:.1f} s) "
              f"{description}" + (f"\n    {failure}" if failure else ""), flush=True)
    print(f"{failures} of {args.cases} cases failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
