"""The `jaxdec` console script.

    jaxdec demo [--preset P] [--max-new-tokens N]
    jaxdec generate --model DIR (--prompt TEXT | --prompt-file PATH) [--max-new-tokens N]
                    [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--tp N]
                    [--dtype D] [--seed S]
                    [--draft DIR | --prompt-lookup | --retrieval CORPUS] [--tree SPEC]
                    [--stream] [--chat [--system TEXT]]
                    [--distributed | --coordinator HOST:PORT --num-processes N --process-id I]
    jaxdec chat --model DIR [--system TEXT] [--max-context N] [--max-new-tokens N]
                [sampling, speculative and cluster options as for generate]
    jaxdec bench (--model DIR | --shape NAME | --config PATH) [--batch-sizes 1,16]
                 [--context N] [--new-tokens N] [--dtype D] [--tp N] [--attention A]
                 [--repeats N] [--json PATH] [--distributed | --coordinator ... (as generate)]
    jaxdec train lm --preset P --out DIR [--corpus DIR] [--steps N] [--resume | --force]
                    [cluster options as for generate]
    jaxdec train draft --target DIR --preset P --out DIR [--objective tv|kl] [...]
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import signal
import sys
import threading
import time


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # (argparse said "invalid _positive_int value")
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _positive_int(text: str, minimum: int = 1) -> int:
    value = _int(text)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def _process_id(text: str) -> int:
    return _positive_int(text, minimum=0)


def _new_tokens(text: str) -> int:  # (the first comes from the prefill)
    return _positive_int(text, minimum=2)


# The parameter dtypes the commands take, and the short names people write for them.
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
           "fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
           "f16": "float16", "half": "float16"}


def _dtype(text: str) -> str:
    if text not in _DTYPES:
        raise argparse.ArgumentTypeError(
            f"expected float32, bfloat16 or float16 (or fp32, bf16, fp16), got {text!r}")
    return _DTYPES[text]


def _seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value < 2**32:   # jax's keys take 32 bits: 2**32 would be seed 0's key
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxdec", description="Fast, exact LLM decoding in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="continue a prompt with a Hugging Face checkpoint")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text to continue")
    source.add_argument("--prompt-file", metavar="PATH",
                        help="continue the text of this file ('-': standard input); only the "
                        "continuation is printed")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message through the checkpoint's chat "
                     "template (instruction-tuned models) and print only the reply")
    gen.add_argument("--system", default=None, metavar="TEXT",
                     help="with --chat: a system message before the user's")
    gen.add_argument("--stream", action="store_true",
                     help="print the text as it is produced (a host round trip every step, "
                     "included in the tokens/s)")
    _decoding_options(gen, max_new_tokens=64)
    _cluster_options(gen)

    chat = commands.add_parser(
        "chat", help="talk to an instruction-tuned checkpoint (its chat template), turn by turn",
        description="Reads your messages from standard input, one per line, and streams the "
        "model's replies; the conversation so far goes through the checkpoint's chat template "
        "every turn. End with Ctrl-D (end of input). With several processes, process 0 reads "
        "the messages and prints the replies.")
    chat.add_argument("--system", default=None, metavar="TEXT",
                      help="a system message opening the conversation")
    chat.add_argument("--max-context", type=_positive_int, default=8192, metavar="N",
                      help="tokens of conversation kept (and cache slots; default 8192, at "
                      "most the model's positions): older exchanges are dropped")
    _decoding_options(chat, max_new_tokens=512)
    _cluster_options(chat)

    bench = commands.add_parser(
        "bench", help="greedy decode speed on this machine, against its memory bandwidth",
        description="Greedy decode speed (tokens/s) of a model on this machine, and the "
        "fraction it reaches of the limit memory bandwidth sets (the bytes a step must read "
        "over the bandwidth measured in the same run). See jaxdec.benchmark.")
    what = bench.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="an HF checkpoint directory or cached model id (its own "
                      "weights)")
    what.add_argument("--shape", choices=_shape_names(),
                      help="random weights of a public checkpoint's shape")
    what.add_argument("--config", metavar="PATH",
                      help="random weights of the shape an HF config.json (or its directory) "
                      "describes")
    bench.add_argument("--batch-sizes", type=_positive_ints, default=(1,),
                       help="rows decoded together, e.g. 1,16 (default 1)")
    bench.add_argument("--context", type=_positive_int, default=None,
                       help="average cached tokens a decode step attends to (default 2048, "
                       "or as many as the model's positions leave room for)")
    bench.add_argument("--new-tokens", type=_new_tokens, default=128,
                       help="tokens produced per row (default 128)")
    bench.add_argument("--dtype", type=_dtype, default=None,
                       help="parameter dtype: float32, bfloat16 or float16 (default: the "
                       "checkpoint's; bfloat16 for random weights)")
    bench.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel degree")
    bench.add_argument("--attention", choices=("auto", "reference", "pallas", "pallas_interpret"),
                       default="auto", help="attention implementation (default auto)")
    bench.add_argument("--repeats", type=_positive_int, default=3,
                       help="timed runs after one warm-up (the median is reported; default 3)")
    bench.add_argument("--json", metavar="PATH", help="also write the records to this file")
    _cluster_options(bench)

    demo = commands.add_parser("demo", help="train (once) and run jaxdec's demo models")
    demo.add_argument("--preset", default=None,
                      help="cpu-tiny on CPUs, gpu-small on accelerators (default)")
    demo.add_argument("--max-new-tokens", type=_new_tokens, default=64,
                      help="tokens each continuation produces (default 64)")

    train = commands.add_parser("train", help="train a language model or distil a draft")
    kinds = train.add_subparsers(dest="kind", required=True)
    lm = kinds.add_parser("lm", help="a Llama-family model from scratch")
    draft = kinds.add_parser("draft", help="a small draft distilled from a target")
    draft.add_argument("--target", required=True, help="the target's HF directory")
    draft.add_argument("--objective", choices=("tv", "kl"), default="tv",
                       help="total variation (maximises acceptance) or forward KL")
    for sub in (lm, draft):
        sub.add_argument("--preset", required=True, help="cpu-tiny, gpu-small or gpu-base")
        sub.add_argument("--out", required=True, help="run directory (becomes an HF checkpoint)")
        sub.add_argument("--corpus", default=None,
                         help="directory of text files (default: the standard library's sources)")
        sub.add_argument("--steps", type=_positive_int, default=None)
        sub.add_argument("--seed", type=_seed, default=0)
        sub.add_argument("--dp", type=_positive_int, default=None,
                         help="data-parallel devices (default: a resumed run's own where "
                         "the machine has them; as many of one process's accelerators as "
                         "divide the batch, or with several processes every device; 1 CPU)")
        again = sub.add_mutually_exclusive_group()
        again.add_argument("--resume", action="store_true", help="continue the run in --out")
        again.add_argument("--force", action="store_true", help="delete the run in --out first")
        _cluster_options(sub)
    return parser


def _cluster_options(command: argparse.ArgumentParser) -> None:
    cluster = command.add_argument_group(
        "several processes (a multi-host TPU slice or GPU cluster: the same command on every "
        "host, one mesh over all their devices; process 0 prints)")
    cluster.add_argument("--distributed", action="store_true",
                         help="join the other processes (jax.distributed.initialize), which "
                         "are found from the cluster: a Cloud TPU slice, SLURM, Open MPI, "
                         "Kubernetes, or JAX_COORDINATOR_ADDRESS")
    cluster.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                         help="process 0's address (implies --distributed; with "
                         "--num-processes and --process-id, for clusters jax does not detect)")
    cluster.add_argument("--num-processes", type=_positive_int, default=None, metavar="N")
    cluster.add_argument("--process-id", type=_process_id, default=None, metavar="I")


def _decoding_options(gen: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """The options `generate` and `chat` share: the model, sampling, parallelism, attention
    and speculative decoding."""
    gen.add_argument("--model", required=True,
                     help="HF safetensors directory with tokenizer.json, or the id (org/name) "
                     "of a model in the Hugging Face cache")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens,
                     help=f"tokens to produce (default {max_new_tokens})")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 (the default) decodes greedily")
    gen.add_argument("--top-p", type=float, default=None,
                     help="sample from the smallest set of tokens of this total probability "
                     "(with --temperature)")
    gen.add_argument("--top-k", type=int, default=None,
                     help="sample from the k most likely tokens (with --temperature)")
    gen.add_argument("--min-p", type=float, default=None,
                     help="drop tokens less likely than this fraction of the most likely one "
                     "(with --temperature)")
    gen.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel degree")
    gen.add_argument("--dtype", type=_dtype, default=None,
                     help="parameter dtype: float32, bfloat16 or float16 (default: the "
                     "checkpoint's)")
    gen.add_argument("--seed", type=_seed, default=0, help="sampling seed (default 0)")
    gen.add_argument("--attention", choices=("auto", "reference", "pallas", "pallas_interpret"),
                     default="auto", help="attention implementation (auto, the default: the "
                     "Pallas tree-attention kernel on GPU/TPU for decode and verification "
                     "where a layer's cache holds at least 4 MiB, cuDNN's for a GPU's prompt; "
                     "on a CPU a cache of 512 slots or more walked in blocks; else the jnp "
                     "reference: see jaxdec.AttentionImpl)")
    gen.add_argument("--ignore-eos", action="store_true",
                     help="do not stop at the checkpoint's end-of-sequence ids (those of its "
                     "generation_config.json and config.json)")
    method = gen.add_mutually_exclusive_group()
    method.add_argument("--draft", default=None,
                        help="speculative decoding with this draft model (HF directory or "
                        "cached model id)")
    method.add_argument("--prompt-lookup", action="store_true",
                        help="speculative decoding with drafts copied from the prompt")
    method.add_argument("--retrieval", default=None, metavar="CORPUS",
                        help="speculative decoding with drafts retrieved from a directory of text")
    gen.add_argument("--tree", default=None,
                     help="draft tree: chain:K, kary:DEPTH:WIDTH, dynamic:DEPTH[:WIDTH[:NODES]] "
                          "(each row's own, EAGLE-2) or a JSON choices list")



def _generate(args) -> None:
    import jax

    import numpy as np

    import jaxdec
    from jaxdec import parallel
    from jaxdec.streaming import continuation

    distributed = _join_processes(args)  # before anything starts jax's backends
    # (With several processes, an error in one raises in all: `parallel.together`.)
    with parallel.together("checking its options and files"):
        sampler, topology = _decoding_settings(args)  # checked before loading anything
        if args.system is not None and not args.chat:
            raise ValueError("--system needs --chat")
        if args.system is not None:
            _utf8(args.system, "--system")
        if distributed and args.prompt_file == "-":
            raise ValueError("--prompt-file -: several processes cannot share standard input; "
                             "give every process the prompt (--prompt, or a file each can read)")
        text, echo, source = _prompt_text(args)
        _check_files(args, f"to encode {source} with")
    mesh = jaxdec.make_mesh(tp=args.tp)
    model = jaxdec.load_pretrained(args.model, dtype=args.dtype, mesh=mesh)
    model = model.with_attention(args.attention)
    with parallel.together("encoding the prompt"):
        if model.tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer.json to encode {source} with")
        if args.chat:
            _template_unreadable(args.model, model)
            messages = [{"role": "user", "content": text}]
            if args.system is not None:
                messages.insert(0, {"role": "system", "content": args.system})
            prompt, echo = jaxdec.chat.encode_chat(model, messages), ""
        else:
            prompt = model.tokenizer.encode(text).ids
        if not prompt:
            raise ValueError(f"{source} encodes to no tokens")
    # Each process places its own part of the inputs: another prompt would decode nonsense.
    parallel.check_same_everywhere(np.asarray(prompt, np.int64).tobytes(), "the prompt")
    common = dict(max_new_tokens=args.max_new_tokens, sampler=sampler,
                  key=jax.random.PRNGKey(args.seed),
                  stop_tokens=() if args.ignore_eos else _eos_ids(model),
                  return_timings=True)
    drafter = _drafter(args, model)
    # Every process runs the program; process 0 prints (a stream's calls come to the process
    # holding the mesh's first device: where each process has a mesh of its own devices,
    # every process's).
    say = _printer()
    stream = None
    # The continuation of a prompt (shown before it, or the user's file) is decoded after
    # the prompt's ids (a SentencePiece decoder drops a text's leading space: "hello"
    # "world"); a chat reply, as transformers' chat decodes it, alone.
    context = None if args.chat else prompt
    ctrl_c = _CtrlC(stop=not distributed)
    shown = _Shown(model.tokenizer, common["stop_tokens"])
    if args.stream:
        say(echo, end="", flush=True)
        stream = _text_stream(shown, ctrl_c, context=context)
    started = time.perf_counter()
    with ctrl_c:
        if drafter is None:
            result = jaxdec.generate(model, [prompt], stream=stream, **common)
        else:
            result = jaxdec.speculative_generate(model, drafter, [prompt], tree=topology,
                                                 stream=stream, **common)
    wall = time.perf_counter() - started
    tokens = result.to_lists()[0]
    if stream is None:
        say(echo + (continuation(shown, context, tokens) if context else shown.decode(tokens)))
    else:
        stream.close()
        say(flush=True)
    rate = result.decode_tokens_per_s
    facts = [f"{len(tokens)} tokens",
             f"{rate:.1f} tokens/s decode" if rate is not None else "decode: 1 token"]
    if drafter is not None:
        facts.append(f"{result.stats.tau:.2f} tokens per target forward")
    facts += [f"prefill {result.prefill_s * 1e3:.1f} ms",
              f"{wall:.1f} s wall including compilation"]
    if distributed:
        facts.append(_processes_note(mesh))
    say("[" + ", ".join(facts) + "]", file=sys.stderr)  # (the text alone on stdout)


def _printer():
    """`print` in process 0, nothing in the others (with several processes, process 0 prints)."""
    import jax

    return print if jax.process_index() == 0 else (lambda *args, **kwargs: None)


def _eos_ids(model) -> tuple[int, ...]:
    """The checkpoint's end-of-sequence ids that the model can emit (load_pretrained warned of
    the others, past its vocabulary, which `generate` refuses as stop tokens)."""
    return tuple(t for t in model.config.eos_token_ids if t < model.config.vocab_size)


class _Shown:
    """A tokenizer as the CLI prints with it: the stop ids a reply ends on left out (a
    tokenizer.json that does not mark the end-of-sequence token special printed its text,
    where transformers, which the configs name it to, skips it)."""

    def __init__(self, tokenizer, stop_ids):
        self._tokenizer, self._stop = tokenizer, frozenset(int(t) for t in stop_ids)

    def decode(self, ids, **kwargs) -> str:
        return self._tokenizer.decode([int(t) for t in ids if int(t) not in self._stop],
                                      **kwargs)


def _text_stream(tokenizer, ctrl_c: "_CtrlC", **kwargs):
    """A `TextStream` printing in process 0 (nothing in the others) that asks `ctrl_c`
    whether to stop at every step (steps that print nothing, too: special tokens, a
    character's first bytes)."""
    import jax

    import jaxdec

    class Stream(jaxdec.TextStream):
        def __call__(self, *args):
            ctrl_c.check()
            return super().__call__(*args)

    lead = jax.process_index() == 0
    return Stream(tokenizer, write=None if lead else (lambda text: None), **kwargs)


class _Stopped(Exception):
    """Raised in a stream's writer to end a decode Ctrl-C interrupted."""


class _CtrlC:
    """Ctrl-C during a decode (a context). Python runs its SIGINT handler in the main thread,
    which waits in XLA until the whole decode ends (a streamed reply went on to
    --max-new-tokens); the signal's wakeup fd, though, is written at once: a stream, called
    from the decode's callbacks, reads it and, with `stop`, raises to end the decode within
    a step (on one device: on a mesh of several, jaxdec runs the program to its end with the
    stream silent). Leaving the context after a Ctrl-C raises KeyboardInterrupt (one line,
    exit 130). With several processes `stop` is False (the others would wait in the
    decode's collectives): the decode ends, then the interrupt."""

    def __init__(self, stop: bool, listen: bool = True):
        self.stop, self.listen, self.hit, self._fds = stop, listen, False, None

    def __enter__(self) -> "_CtrlC":
        self.hit = False
        if self.listen and threading.current_thread() is threading.main_thread():  # (main only)
            self._fds = os.pipe()
            for fd in self._fds:
                os.set_blocking(fd, False)
            self._old_fd = signal.set_wakeup_fd(self._fds[1], warn_on_full_buffer=False)
            self._old_handler = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum, frame) -> None:
        self.hit = True

    def check(self) -> None:
        if self._fds is not None:
            try:
                if signal.SIGINT in os.read(self._fds[0], 512):  # (signal numbers, as bytes)
                    self.hit = True
            except BlockingIOError:
                pass
        if self.hit and self.stop:
            raise _Stopped("interrupted")

    def __exit__(self, kind, error, traceback) -> bool:
        if self._fds is not None:
            try:
                self.stop = False
                self.check()
            finally:
                signal.set_wakeup_fd(self._old_fd)
                signal.signal(signal.SIGINT, self._old_handler)
                for fd in self._fds:
                    os.close(fd)
                self._fds = None
        if self.hit:  # (in place of the decode's error: the stop raised in its callback)
            raise KeyboardInterrupt from None
        return False


def _processes_note(mesh) -> str:
    """How the processes shared the work: one mesh over them, or each a mesh of its own
    devices (where --tp fits one process's devices: each decodes alone)."""
    import jax

    if len(mesh.local_devices) == mesh.devices.size:
        return (f"{jax.process_count()} processes, each decoding alone on {mesh.devices.size} "
                f"of its own devices")
    return f"{jax.process_count()} processes, {mesh.devices.size} devices"


def _join_processes(args) -> bool:
    """`jax.distributed.initialize` as the cluster options ask (True), or nothing (False)."""
    import jax

    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and explicit == (None, None, None):
        return False
    if args.coordinator is not None and not args.coordinator.rpartition(":")[2].isdigit():
        raise ValueError(f"--coordinator must be HOST:PORT, got {args.coordinator!r}")
    if args.coordinator is not None and None in explicit:
        raise ValueError("--coordinator needs --num-processes and --process-id (the same "
                         "--num-processes everywhere, --process-id 0 to N - 1)")
    if args.process_id is not None and args.num_processes is not None and not (
            0 <= args.process_id < args.num_processes):
        raise ValueError(f"--process-id must be in [0, {args.num_processes}), "
                         f"got {args.process_id}")
    given = [flag for flag, value in (("--coordinator", args.coordinator),
                                      ("--num-processes", args.num_processes),
                                      ("--process-id", args.process_id)) if value is not None]
    try:
        jax.distributed.initialize(*explicit)
    except ValueError as e:
        raise ValueError(
            f"{' '.join(given) or '--distributed'}: {e} jax found no cluster to read the rest "
            "from (a Cloud TPU slice, SLURM, Open MPI, Kubernetes, JAX_COORDINATOR_ADDRESS): "
            "give --coordinator, --num-processes and --process-id") from e
    return True


def _decoding_settings(args):
    """(sampler, tree topology or None) from the shared options, checked."""
    import jaxdec

    filters = [flag for flag, value in (("--top-p", args.top_p), ("--top-k", args.top_k),
                                        ("--min-p", args.min_p)) if value is not None]
    if args.temperature == 0 and filters:
        raise ValueError(f"{', '.join(filters)} shape{'s' if len(filters) == 1 else ''} "
                         "sampling: give --temperature > 0 too (0, the default, decodes "
                         "greedily)")
    if args.temperature == 0:
        sampler = jaxdec.Greedy()
    else:
        try:
            sampler = jaxdec.Sampler(temperature=args.temperature, top_k=args.top_k,
                                     top_p=args.top_p, min_p=args.min_p)
        except ValueError as e:  # said of the flags ("top_p must be ..." of --top-p)
            raise ValueError(re.sub(r"\b(temperature|top_k|top_p|min_p)\b",
                                    lambda m: "--" + m[1].replace("_", "-"),
                                    str(e).replace(" or None", ""))) from None
    topology = jaxdec.tree.parse(args.tree) if args.tree is not None else None
    if topology is not None and not (args.draft or args.prompt_lookup or args.retrieval):
        raise ValueError("--tree needs a speculative method: --draft, --prompt-lookup or --retrieval")
    if (args.draft and args.temperature > 0 and isinstance(topology, jaxdec.tree.Topology)
            and not topology.ranks_contiguous):  # (refused before the models load)
        raise ValueError(f"--tree {args.tree}: at --temperature > 0 the draft model samples "
                         "each node's children, which must then be ranked 0..m-1 (this tree "
                         "skips a rank); give such a tree, or --temperature 0")
    return sampler, topology


def _chat(args) -> None:
    import jax

    import jaxdec
    from jaxdec import parallel

    distributed = _join_processes(args)  # before anything starts jax's backends
    with parallel.together("checking its options and files"):
        sampler, topology = _decoding_settings(args)
        if args.system is not None:
            _utf8(args.system, "--system")
        _check_files(args)
    model = jaxdec.load_pretrained(args.model, dtype=args.dtype,
                                   mesh=jaxdec.make_mesh(tp=args.tp))
    model = model.with_attention(args.attention)
    with parallel.together("checking the model"):
        if model.tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer.json")
        _template_unreadable(args.model, model)
        if model.chat_template is None:
            raise ValueError(f"{args.model} has no chat template (chat_template.jinja, or "
                             "chat_template in tokenizer_config.json): `jaxdec chat` needs an "
                             "instruction-tuned checkpoint; `jaxdec generate` continues text")
        limit = min(args.max_context, model.config.max_positions)
        if limit <= args.max_new_tokens:
            what = (f"--max-context {limit}" if limit == args.max_context else
                    f"the model's {limit} positions")
            raise ValueError(f"{what} leave{'s' if limit == args.max_context else ''} no room "
                             f"for a message beside --max-new-tokens {args.max_new_tokens}")
        opening = [] if args.system is None else [{"role": "system", "content": args.system}]
        # A template refusing the opening (roles without a system one) is told now, not once
        # the first message is typed.
        jaxdec.chat.encode_chat(model, opening + [{"role": "user", "content": "Hello"}])
    drafter = _drafter(args, model)
    # The conversation's caches (a draft model's too) are kept between turns: each turn
    # prefills only its own tokens (and the last reply's again where its text encodes to
    # other tokens than the model produced: the template renders text).
    session = jaxdec.PrefixCache(model, max_len=limit, drafter=drafter, tree=topology)
    stop = () if args.ignore_eos else _eos_ids(model)
    turns: list[dict] = []  # the user's and the model's messages, in order
    # Process 0 reads the messages and prints (a stream's calls come to the process holding
    # the mesh's first device: process 0's); every process runs every turn's program.
    lead = jax.process_index() == 0
    say = _printer()
    interactive = lead and sys.stdin.isatty()
    _keep_undecodable_bytes(sys.stdin)
    # With several processes, process 0 reads the messages and takes Ctrl-C, and the others
    # end when it hands them the end of the input (a terminal's Ctrl-C reaches every
    # process: one ending alone left the others waiting in a collective). In process 0 it
    # ends the chat at once while it reads, else once the others can be told: the turn ends.
    deferred = {"reading": False, "hit": False}
    if distributed and threading.current_thread() is threading.main_thread():
        def on_ctrl_c(signum, frame):
            if deferred["reading"]:
                raise KeyboardInterrupt
            deferred["hit"] = True

        signal.signal(signal.SIGINT, on_ctrl_c if lead else signal.SIG_IGN)
    for turn in itertools.count():
        if interactive:
            print("> ", end="", flush=True)
        try:
            if deferred["hit"]:
                raise KeyboardInterrupt
            deferred["reading"] = True
            line = sys.stdin.readline() if lead else None
            deferred["reading"] = False
        except KeyboardInterrupt:  # the others wait for the next message: they end too
            deferred["reading"] = False
            if distributed:
                _from_process_0("")
            raise
        if turn == 0 and line:
            line = line.removeprefix("\ufeff")  # (a byte-order mark is no text)
        if line and not _is_utf8(line):  # refused (a blank line: every process skips it)
            say("[not UTF-8 text: the message is skipped]", file=sys.stderr, flush=True)
            line = "\n"
        if distributed:
            line = _from_process_0(line)
        if not line:
            break
        if not line.strip():
            continue
        message = {"role": "user", "content": line.rstrip("\r\n")}
        prompt = jaxdec.chat.encode_chat(model, opening + turns + [message])
        if len(prompt) + args.max_new_tokens > limit:
            alone = len(jaxdec.chat.encode_chat(model, opening + [message]))
            if alone + args.max_new_tokens > limit:  # refused: the conversation stays whole
                with_ = "the system message's and the template's" if opening else \
                    "the template's"
                say(f"[too long: the message takes {alone} tokens (with {with_}), + "
                    f"--max-new-tokens {args.max_new_tokens} exceed "
                    f"the {limit} kept (--max-context, the model's positions)]",
                    file=sys.stderr, flush=True)
                continue
        turns.append(message)
        # The oldest exchanges make way when the conversation outgrows the limit.
        while len(prompt) + args.max_new_tokens > limit:
            del turns[:2]
            say("[the oldest exchange no longer fits: dropped]", file=sys.stderr)
            prompt = jaxdec.chat.encode_chat(model, opening + turns)
        # (with several processes the handler above notes a Ctrl-C: the chat ends at the
        # next message)
        ctrl_c = _CtrlC(stop=True, listen=not distributed)
        stream = _text_stream(_Shown(model.tokenizer, stop), ctrl_c)
        common = dict(max_new_tokens=args.max_new_tokens, sampler=sampler, stop_tokens=stop,
                      key=jax.random.fold_in(jax.random.PRNGKey(args.seed), turn),
                      stream=stream, return_timings=True)
        with ctrl_c:
            result = session.generate(prompt, **common)
        stream.close()
        say(flush=True)
        tokens = result.to_lists()[0]
        if tokens and tokens[-1] in stop:
            tokens = tokens[:-1]
        turns.append({"role": "assistant", "content": model.tokenizer.decode(tokens)})
        rate = result.decode_tokens_per_s
        say(f"[{len(tokens)} tokens" + (f", {rate:.1f} tokens/s]" if rate else "]"),
            file=sys.stderr, flush=True)


def _keep_undecodable_bytes(stream) -> None:
    """A text stream's bytes that are not text (in its encoding) read as surrogate escapes, as
    the command line's are, instead of raising mid-read: `_is_utf8` then tells. Piped or
    redirected it is read as UTF-8, as files are (a Windows pipe's cp1252 turned messages into
    other text); a terminal keeps its own encoding (what its keyboard types)."""
    if not hasattr(stream, "reconfigure"):
        return
    try:
        piped = not stream.isatty()
    except (OSError, ValueError):
        piped = True
    try:
        stream.reconfigure(errors="surrogateescape", **({"encoding": "utf-8"} if piped else {}))
    except (OSError, ValueError):  # (io.UnsupportedOperation: some of it already read)
        stream.reconfigure(errors="surrogateescape")


def _is_utf8(text: str) -> bool:
    """False for text holding undecodable bytes (surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _utf8(text: str, what: str) -> str:
    """`text`, or a ValueError naming `what` when it holds undecodable bytes."""
    if not _is_utf8(text):
        raise ValueError(f"{what} is not UTF-8 text")
    return text


def _from_process_0(text: str | None) -> str:
    """Process 0's `text` in every process (the others pass None): its UTF-8 bytes' count,
    then the bytes, each broadcast (`multihost_utils.broadcast_one_to_all`)."""
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer((text or "").encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    if size == 0:
        return ""
    if text is None:
        data = np.zeros(size, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(data))).decode()


def _prompt_text(args) -> tuple[str, str, str]:
    """(the text to continue, what to print before the continuation, its name in errors)."""
    if args.prompt is not None:
        return _utf8(args.prompt, "--prompt"), args.prompt, "--prompt"
    if args.prompt_file == "-":
        _keep_undecodable_bytes(sys.stdin)
        text = _utf8(sys.stdin.read(), "the standard input").removeprefix("\ufeff")  # (BOM)
        return text, "", "the standard input"
    try:
        with open(args.prompt_file, encoding="utf-8-sig") as f:  # (a BOM is no text)
            return f.read(), "", f"--prompt-file {args.prompt_file}"
    except FileNotFoundError:
        raise FileNotFoundError(f"--prompt-file {args.prompt_file} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {args.prompt_file} is not UTF-8 text: {e}") from None
    except IsADirectoryError:
        raise ValueError(f"--prompt-file {args.prompt_file} is a directory") from None


def _template_unreadable(path: str, model) -> None:
    """A ValueError saying why when the checkpoint has a chat template that would not load
    (load_pretrained loads the model without it, warning; it read as no template at all)."""
    if model.chat_template is not None:
        return
    from jaxdec.chat import ChatTemplateError, load_chat_template
    from jaxdec.checkpoint import checkpoint_dir

    try:
        load_chat_template(checkpoint_dir(path))
    except ChatTemplateError as e:
        raise ValueError(f"{path}'s chat template cannot be used: {e}") from None


def _check_files(args, purpose: str = "") -> None:
    """What the model, the draft and the retrieval corpus lack, said before any checkpoint is
    loaded (an 8B model loads for minutes)."""
    from jaxdec import data
    from jaxdec.checkpoint import checkpoint_dir

    directory = checkpoint_dir(args.model)
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise ValueError(f"{args.model} has no tokenizer.json" + (f" {purpose}" if purpose else ""))
    if args.draft:
        try:
            checkpoint_dir(args.draft)
        except (ValueError, TypeError, OSError) as e:
            raise ValueError(f"--draft {args.draft}: {e}") from None
    if args.retrieval:  # (`~` as Retrieval.from_directory: --retrieval=~/x, unexpanded)
        args.retrieval = os.path.expanduser(args.retrieval)
        data.check_corpus_dir(args.retrieval, f"--retrieval {args.retrieval}", texts=True)


def _drafter(args, model):
    import jaxdec
    from jaxdec import drafters

    if args.draft:
        try:
            draft = jaxdec.load_pretrained(args.draft, dtype=args.dtype, mesh=model.mesh)
        except (ValueError, TypeError, OSError) as e:  # said of the draft, not the model
            raise ValueError(f"--draft {args.draft}: {e}") from None
        return drafters.DraftModel(_draft_attention(draft, model.attention))
    if args.prompt_lookup:
        return drafters.PromptLookup()
    if args.retrieval:
        from jaxdec.demo import jaxdec_home

        # (kept between runs: a large corpus takes a minute to encode and sort)
        return drafters.Retrieval.from_directory(
            args.retrieval, model.tokenizer, cache_dir=os.path.join(jaxdec_home(), "retrieval"))
    return None


def _draft_attention(draft, attention):
    """The draft with the target's attention, or with "auto" (with a warning) where that
    names a kernel which cannot take the draft's heads (a TPU target of head dim 128, a draft
    of 64): the target keeps its kernel."""
    import warnings

    from jaxdec.model import attention_refusal

    refusal = attention_refusal(draft.with_attention(attention))
    if refusal is not None:
        refusal = refusal.replace("take it", "take the draft")
        warnings.warn(f"--attention {attention.value}: {refusal}; the draft attends with "
                      "\"auto\"", stacklevel=2)
        return draft.with_attention("auto")
    return draft.with_attention(attention)


def _shape_names() -> list[str]:
    from jaxdec.benchmark import SHAPES

    return sorted(SHAPES)


def _bench(args) -> None:
    import json

    import jax

    import jaxdec
    from jaxdec import benchmark, parallel
    from jaxdec.checkpoint import checkpoint_dir
    from jaxdec.checks import check_param_dtype
    from jaxdec.model import param_dtype
    from jaxdec.parallel import check_divisibility

    distributed = _join_processes(args)  # before anything starts jax's backends
    with parallel.together("checking its options and files"):
        if args.context is not None:  # a clear error before loading
            benchmark.prompt_length(args.context, args.new_tokens)
        # Checked before the benchmark runs (its records would be lost), where it is written.
        if args.json == "-":  # (a file named "-" was written)
            raise ValueError("--json -: give a file path (the table goes to standard output)")
        if args.json and (not distributed or jax.process_index() == 0):
            folder = os.path.dirname(os.path.abspath(args.json))
            if os.path.isdir(args.json):
                raise ValueError(f"--json {args.json} is a directory: give a file path")
            if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
                raise ValueError(f"--json {args.json}: {folder} is not a writable directory")
        mesh = jaxdec.make_mesh(tp=args.tp)
        if args.model:
            directory = checkpoint_dir(args.model)
            config = jaxdec.ModelConfig.from_hf(directory)
        elif args.shape:
            config, name = benchmark.SHAPES[args.shape], f"{args.shape} shape"
        else:
            config, name = jaxdec.ModelConfig.from_hf(args.config), f"shape of {args.config}"
        check_divisibility(config, mesh)
        if args.context is None:  # (a model of 2048 positions cannot take 2048 and more)
            args.context = benchmark.default_context(config, args.new_tokens)
            if args.context <= args.new_tokens // 2:
                raise ValueError(f"--new-tokens {args.new_tokens} leaves no room for a prompt "
                                 f"in the model's {config.max_positions} positions: give "
                                 "fewer")
        benchmark.check_positions(config, args.context, args.new_tokens)
        if args.dtype is not None:
            check_param_dtype(args.dtype)
    # Every process measures and decodes; process 0 prints and writes --json.
    say = _printer()
    # Measured first, while the weights do not yet take the devices' memory.
    bandwidths = benchmark.memory_bandwidth()
    if args.model:
        model = jaxdec.load_pretrained(directory, dtype=args.dtype, mesh=mesh)
        what = f"{args.model} ({param_dtype(model)} weights)"
    else:
        model = jaxdec.init_model(config, jax.random.PRNGKey(0), dtype=args.dtype or "bfloat16",
                                  mesh=mesh)
        what = f"{name}, random {param_dtype(model)} weights"
    model = model.with_attention(args.attention)
    devices = jax.devices()[0]
    hosts = f" in {jax.process_count()} processes" if distributed else ""
    say(f"jaxdec bench: {what}; {mesh.devices.size} x {devices.device_kind} "
        f"({devices.platform}){hosts}, jax {jax.__version__}")
    say("memory bandwidth measured per device: "
        + ", ".join(f"{name} {gbps:.0f} GB/s" for name, gbps in bandwidths.items())
        + " (the limit: the larger, times the devices)", flush=True)
    records = benchmark.decode_speed(
        model, args.batch_sizes, context=args.context, new_tokens=args.new_tokens,
        repeats=args.repeats, bandwidth_gbps=max(bandwidths.values()))
    say(benchmark.format_table(records))
    say("tokens/s: decode tokens over all rows; GB/step: the weights and KV cache a step "
        "must read; of limit: their rate over the bandwidth limit")
    if args.json and jax.process_index() == 0:
        for record in records:
            record.update(model=what, bandwidths_gbps=bandwidths)
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, args.json)


def _train(args) -> None:
    from jaxdec.train import train_draft, train_lm

    _join_processes(args)  # before anything starts jax's backends
    common = dict(corpus=args.corpus, steps=args.steps, resume=args.resume, force=args.force,
                  seed=args.seed, dp=args.dp)
    if args.kind == "lm":
        train_lm(args.preset, args.out, **common)
    else:
        train_draft(args.target, args.preset, args.out, objective=args.objective, **common)


def _demo(args) -> None:
    from jaxdec.demo import run_demo

    run_demo(preset=args.preset, max_new_tokens=args.max_new_tokens)


def _out_of_memory(error: RuntimeError) -> bool:
    """Whether a runtime error is XLA's failed allocation (a JaxRuntimeError saying so)."""
    text = str(error)
    return type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and (
        "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text)


def main(argv: list[str] | None = None) -> int:
    from jaxdec.parallel import ProcessFailed
    from jaxdec.train.loop import Interrupted

    args = _parser().parse_args(argv)
    run = {"generate": _generate, "chat": _chat, "bench": _bench, "train": _train,
           "demo": _demo}[args.command]
    import warnings

    # A library's warning in one line, as the errors are (not its source file and line).
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"jaxdec: warning: {message}\n"
    if hasattr(sys.stdout, "reconfigure"):
        # Text the output's encoding cannot hold (an emoji on a cp1252 pipe) printed as "?"
        # rather than ending the command (a chat's whole conversation) mid-reply.
        sys.stdout.reconfigure(errors="replace")
    try:
        run(args)
        sys.stdout.flush()   # here, where a closed pipe can be told from an error
    except BrokenPipeError:
        # The reader stopped reading (`| head`): end quietly, as other tools do. Python's
        # own flush at exit would fail again: stdout goes nowhere from here on.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    except (ValueError, TypeError, OSError) as e:
        print(f"jaxdec: error: {e}", file=sys.stderr)
        return 2
    except ProcessFailed as e:  # (a RuntimeError: before the memory errors' clause)
        print(f"jaxdec: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:  # (a RuntimeError: before the memory errors' clause)
        print(f"jaxdec: {e}", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        if "KeyboardInterrupt" in str(e):  # Ctrl-C inside a callback, which XLA wrapped
            print("\njaxdec: interrupted", file=sys.stderr)
            return 130
        # A model or batch too big for the machine: a common mistake, not a crash.
        if not (isinstance(e, MemoryError) or _out_of_memory(e)):
            raise
        where = "host" if isinstance(e, MemoryError) else "device"
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        print(f"jaxdec: error: out of {where} memory ({first}): try a smaller model, batch "
              "or context, or --tp over more devices", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\njaxdec: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning
    return 0


if __name__ == "__main__":
    sys.exit(main())
