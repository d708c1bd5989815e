"""The `jaxdec generate` command."""

import dataclasses
import io
import json
import os
import subprocess
import sys

import jax
import pytest

import jaxdec
from jaxdec.cli import main
from runenv import user_env


def test_generate_prints_the_continuation_and_speed(tokenized, tokenized_checkpoint, capsys):
    """Through the (interpreted) attention kernel (a model of head dim 16; the kernel cannot
    take 8): the reference path's continuation."""
    checkpoint = tokenized("mistral-window")
    assert main(["generate", "--model", checkpoint, "--prompt", "hello the fox",
                 "--max-new-tokens", "6", "--ignore-eos", "--attention", "pallas_interpret"]) == 0
    captured = capsys.readouterr()
    text, stats = captured.out.strip().split("\n")[-1], captured.err.strip().split("\n")[-1]
    assert captured.out == text + "\n"  # the text alone (the numbers on standard error)
    assert main(["generate", "--model", tokenized_checkpoint, "--prompt", "x",
                 "--attention", "pallas_interpret"]) == 2
    assert ("attention='pallas_interpret' for this model: the triton kernel cannot take it "
            "(head_dim=8") in capsys.readouterr().err
    # A draft the kernel cannot take attends with "auto"; the target keeps the kernel.
    with pytest.warns(UserWarning, match=r"--attention pallas_interpret: the triton kernel "
                      r"cannot take the draft \(head_dim=8.*; the draft attends with \"auto\""):
        assert main(["generate", "--model", checkpoint, "--prompt", "hello the fox",
                     "--max-new-tokens", "6", "--ignore-eos", "--attention", "pallas_interpret",
                     "--draft", tokenized_checkpoint]) == 0
    assert capsys.readouterr().out.strip() == text
    model = jaxdec.load_pretrained(checkpoint)
    ids = model.tokenizer.encode("hello the fox").ids
    expected = jaxdec.generate(model, [ids], max_new_tokens=6).tokens[0]
    assert text == "hello the fox" + model.tokenizer.decode(expected.tolist())
    assert "6 tokens" in stats and "tokens/s decode" in stats


def test_generate_sampling_with_tp(tokenized_checkpoint, capsys):
    assert main(["generate", "--model", tokenized_checkpoint, "--prompt", "quick brown",
                 "--max-new-tokens", "4", "--temperature", "0.8", "--top-p", "0.9",
                 "--top-k", "20", "--tp", "2", "--seed", "3"]) == 0
    assert "tokens/s" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    # (said of the flags: "top_p must be in (0, 1]" named Sampler's argument)
    (["--temperature", "-1"], "--temperature must be"),
    (["--temperature", "1", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--temperature", "1", "--top-k", "0"], "--top-k must be"),
    (["--tp", "3"], "tp=3 does not divide"),
    # Greedy decoding would ignore them (silently: the output was the greedy text).
    (["--top-p", "0.9"], "--top-p shapes sampling: give --temperature > 0 too"),
    (["--top-k", "5", "--min-p", "0.1"], "--top-k, --min-p shape sampling"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
     "--coordinator must be HOST:PORT, got 'localhost'"),
])
def test_bad_arguments(tokenized_checkpoint, capsys, args, message):
    assert main(["generate", "--model", tokenized_checkpoint, "--prompt", "x", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_draft_that_does_not_load_is_named(tokenized_checkpoint, tmp_path, capsys):
    """The draft's errors say they are the draft's (a tp not dividing its heads read as the
    target's)."""
    assert main(["generate", "--model", tokenized_checkpoint, "--prompt", "x",
                 "--draft", str(tmp_path / "nope")]) == 2
    assert f"--draft {tmp_path / 'nope'}: " in capsys.readouterr().err


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU has no Pallas kernel")
def test_pallas_attention_is_refused_on_cpu(tokenized_checkpoint, capsys):
    assert main(["generate", "--model", tokenized_checkpoint, "--prompt", "x",
                 "--attention", "pallas"]) == 2
    assert "no Pallas kernel for the 'cpu' platform" in capsys.readouterr().err


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    """A model or batch too big for the machine: one line and exit code 2 (a traceback and
    exit code 1 before); other runtime errors stay tracebacks (they are bugs)."""
    import jaxdec.cli as cli

    def oom(args):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory allocating 8405385924 bytes.\nmore detail")

    monkeypatch.setattr(cli, "_generate", oom)
    assert main(["generate", "--model", "x", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxdec: error: out of device memory (RESOURCE_EXHAUSTED: Out of "
                          "memory allocating 8405385924 bytes.): try a smaller model")
    def host_oom(args):
        raise MemoryError

    monkeypatch.setattr(cli, "_generate", host_oom)
    assert main(["generate", "--model", "x", "--prompt", "x"]) == 2
    assert "out of host memory (MemoryError)" in capsys.readouterr().err

    def bug(args):
        raise RuntimeError("something else")

    monkeypatch.setattr(cli, "_generate", bug)
    with pytest.raises(RuntimeError, match="something else"):
        main(["generate", "--model", "x", "--prompt", "x"])

    # An interrupted training run (a RuntimeError too) is one line and exit code 130.
    from jaxdec.train import Interrupted

    def interrupted(args):
        raise Interrupted("train lm cpu-tiny interrupted; the checkpoint at step 40 is intact")

    monkeypatch.setattr(cli, "_train", interrupted)
    assert main(["train", "lm", "--preset", "cpu-tiny", "--out", "o"]) == 130
    assert capsys.readouterr().err == ("jaxdec: train lm cpu-tiny interrupted; the checkpoint "
                                       "at step 40 is intact\n")


def test_missing_model_and_tokenizer(hf_checkpoints, tokenized_checkpoint, tmp_path, capsys,
                                     monkeypatch):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    config = os.path.join(hf_checkpoints("llama-gqa")[0], "config.json")
    assert main(["generate", "--model", config, "--prompt", "x"]) == 2
    assert "config.json is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # (argparse: named with the choices)
        main(["generate", "--model", tokenized_checkpoint, "--prompt", "x", "--dtype", "bf"])
    assert refused.value.code == 2
    assert ("argument --dtype: expected float32, bfloat16 or float16 (or fp32, bf16, fp16), "
            "got 'bf'") in capsys.readouterr().err
    # What the model, draft and corpus lack is said before any checkpoint loads (an 8B
    # model loads for minutes first).
    monkeypatch.setattr(jaxdec, "load_pretrained", lambda *a, **k: pytest.fail("loaded"))
    for command in ("generate", "chat"):
        prompt = ["--prompt", "x"] if command == "generate" else []
        assert main([command, "--model", hf_checkpoints("llama-gqa")[0], *prompt]) == 2
        assert "no tokenizer.json" in capsys.readouterr().err
        (tmp_path / "binary").mkdir(exist_ok=True)  # (said after the model loaded)
        (tmp_path / "binary" / "a.bin").write_bytes(b"\xff\x00" * 8)
        for flags, said in ((["--retrieval", str(tmp_path / "corpus")], "does not exist"),
                            (["--retrieval", config], "is a file: give a directory"),
                            (["--retrieval", str(tmp_path / "binary")],
                             "has no readable text files"),
                            (["--draft", str(tmp_path / "d")], "does not exist")):
            assert main([command, "--model", tokenized_checkpoint, *prompt, *flags]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"jaxdec: error: {flags[0]} {flags[1]}") and said in err, err


def test_seeds_are_32_bit(tokenized_checkpoint, capsys):
    """jax's keys take 32 bits: seed 2**32 gave seed 0's key, larger ones an OverflowError."""
    for seed in ("-1", str(2**32), str(10**20)):
        with pytest.raises(SystemExit):
            main(["generate", "--model", tokenized_checkpoint, "--prompt", "x", "--seed", seed])
        assert "--seed: must be in [0, 2**32)" in capsys.readouterr().err


def test_max_new_tokens_must_be_positive(tokenized_checkpoint):
    with pytest.raises(SystemExit):
        main(["generate", "--model", tokenized_checkpoint, "--prompt", "x", "--max-new-tokens", "0"])


@pytest.mark.parametrize("method", [["--draft", "SELF", "--tree", "kary:2:2"], ["--prompt-lookup"],
                                    ["--retrieval", "CORPUS", "--tree", "chain:3"],
                                    ["--draft", "SELF", "--tree", "dynamic:3:2"]])
def test_generate_speculative_methods(tokenized_checkpoint, tmp_path, capsys, method,
                                     monkeypatch):
    monkeypatch.setenv("JAXDEC_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text("hello the fox jumps over the lazy dog " * 3)
    method = [{"SELF": tokenized_checkpoint, "CORPUS": str(corpus)}.get(a, a) for a in method]
    base = ["generate", "--model", tokenized_checkpoint, "--prompt", "hello the fox",
            "--max-new-tokens", "6", "--ignore-eos"]
    assert main(base) == 0
    plain_text = capsys.readouterr().out.strip().split("\n")[-1]
    assert main(base + method) == 0
    captured = capsys.readouterr()
    text, stats = captured.out.strip().split("\n")[-1], captured.err.strip().split("\n")[-1]
    assert text == plain_text  # greedy: the same continuation
    assert "tokens per target forward" in stats
    if "--retrieval" in method:  # the datastore is kept for the next run
        assert len(os.listdir(tmp_path / "home" / "retrieval")) == 1


@pytest.mark.parametrize("method", [[], ["--prompt-lookup"]], ids=["plain", "speculative"])
def test_streamed_text_is_the_printed_text(tokenized_checkpoint, capsys, monkeypatch, method):
    base = ["generate", "--model", tokenized_checkpoint, "--prompt", "hello the fox",
            "--max-new-tokens", "8", "--ignore-eos", *method]
    assert main(base) == 0
    printed = capsys.readouterr().out.strip().split("\n")[-1]
    pieces = []
    real_print = print

    def spy(*args, **kwargs):  # each piece as the stream prints it
        pieces.append(args[0] if args else "")
        real_print(*args, **kwargs)

    monkeypatch.setattr("builtins.print", spy)
    assert main(base + ["--stream"]) == 0
    captured = capsys.readouterr()
    text, stats = captured.out.strip().split("\n")[-1], captured.err.strip().split("\n")[-1]
    assert text == printed and "8 tokens" in stats
    assert len([piece for piece in pieces if piece]) > 2  # the prompt, then piece by piece


def test_tree_needs_a_method_and_a_valid_spec(tokenized_checkpoint, capsys):
    base = ["generate", "--model", tokenized_checkpoint, "--prompt", "x"]
    assert main(base + ["--tree", "chain:3"]) == 2
    assert "--tree needs a speculative method" in capsys.readouterr().err
    assert main(base + ["--prompt-lookup", "--tree", "star"]) == 2
    assert "bad tree spec" in capsys.readouterr().err
    assert main(base + ["--prompt-lookup", "--tree", ""]) == 2  # (an empty $TREE: no tree)
    assert "bad tree spec ''" in capsys.readouterr().err
    # Sampled children of a tree that skips a rank: refused before loading (it was after
    # both models loaded, in the library's words).
    assert main(["generate", "--model", "/nonexistent", "--draft", "/nonexistent", "--prompt",
                 "x", "--tree", "[[1]]", "--temperature", "0.7"]) == 2
    assert "--tree [[1]]: at --temperature > 0 the draft model samples" in \
        capsys.readouterr().err



def test_prompt_from_a_file_or_stdin(tokenized_checkpoint, tmp_path, capsys, monkeypatch):
    """A long prompt (a document for prompt lookup) comes from a file; only the continuation
    is printed: the same as the continuation of --prompt with that text."""
    # (The second's continuation begins with a word: decoded alone, a SentencePiece decoder
    # dropped its leading space, "the quickfox" for "the quick fox".)
    for text in ("hello the fox\nquick brown", "the quick"):
        assert main(["generate", "--model", tokenized_checkpoint, "--prompt", text,
                     "--max-new-tokens", "5", "--ignore-eos"]) == 0
        echoed = capsys.readouterr().out
        continuation = echoed[:-1][len(text):]
        path, bom = tmp_path / "prompt.txt", tmp_path / "bom.txt"
        path.write_text(text)
        bom.write_bytes(b"\xef\xbb\xbf" + text.encode())  # (a BOM is not the prompt's text)
        for source, given, stream in ((str(path), text, []), (str(bom), text, ["--stream"]),
                                      ("-", text, []), ("-", "\ufeff" + text, [])):
            monkeypatch.setattr("sys.stdin", io.StringIO(given))
            assert main(["generate", "--model", tokenized_checkpoint, "--prompt-file", source,
                         "--max-new-tokens", "5", "--ignore-eos", *stream]) == 0
            captured = capsys.readouterr()
            assert captured.out[:-1] == continuation and "5 tokens" in captured.err


def test_an_end_of_sequence_token_not_marked_special_is_not_printed(tokenized_checkpoint,
                                                                   tmp_path, capsys):
    """A tokenizer.json that does not mark the end-of-sequence token special (as some
    fine-tunes ship it; transformers skips it, its configs naming it): the reply ended on
    it printed its text, streamed or not."""
    model = jaxdec.load_pretrained(tokenized_checkpoint)
    eos = model.config.eos_token_ids[0]
    prompt = model.tokenizer.encode("the quick").ids
    greedy = jaxdec.generate(model, [prompt], max_new_tokens=4).to_lists()[0]
    head = model.params["lm_head"]  # (eos swapped with the greedy second token: it ends there)
    params = dict(model.params, lm_head=head.at[:, [eos, greedy[1]]].set(
        head[:, [greedy[1], eos]]))
    directory = tmp_path / "eos"
    jaxdec.save_pretrained(dataclasses.replace(model, params=params), directory)
    spec = json.loads((directory / "tokenizer.json").read_text())
    for token in spec["added_tokens"]:
        token["special"] = token["id"] != eos and token["special"]
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    reply = jaxdec.generate(jaxdec.load_pretrained(directory), [prompt], max_new_tokens=4,
                            stop_tokens=[eos]).to_lists()[0]
    assert reply[-1] == eos
    for stream in ([], ["--stream"]):
        assert main(["generate", "--model", str(directory), "--prompt", "the quick",
                     "--max-new-tokens", "4", *stream]) == 0
        captured = capsys.readouterr()
        assert "</s>" not in captured.out and f"{len(reply)} tokens" in captured.err


def test_ids_past_the_models_vocabulary_are_named_at_load(tokenized_checkpoint, tmp_path,
                                                            capsys):
    """A tokenizer of more tokens than config.json's vocab_size, an eos id past it: named
    when loaded (the CLI said "stop_tokens has ids outside [0, 97)" of a stop list the user
    never gave); the CLI stops on the ids the model can emit."""
    import shutil

    from tokenizers import Tokenizer

    directory = shutil.copytree(tokenized_checkpoint, tmp_path / "ckpt")
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.add_tokens(["<extra0>", "<extra1>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = json.loads((directory / "config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], 98]
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text("{}")
    with pytest.warns(UserWarning) as warned:
        jaxdec.load_pretrained(directory)
    messages = [str(w.message) for w in warned]
    assert any("its tokenizer has 99 tokens, more than config.json's vocab_size 97" in m
               for m in messages)
    assert any("its end-of-sequence ids [98] are past config.json's vocab_size 97" in m
               for m in messages)
    with pytest.warns(UserWarning):
        assert main(["generate", "--model", str(directory), "--prompt", "the quick",
                     "--max-new-tokens", "3"]) == 0
    assert "3 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"), (b"\xff\xfe\x00", "is not UTF-8 text"), (b"", "encodes to no tokens")])
def test_bad_prompt_file(tokenized_checkpoint, tmp_path, capsys, content, message):
    path = tmp_path / "prompt.txt"
    if content is not None:
        path.write_bytes(content)
    assert main(["generate", "--model", tokenized_checkpoint, "--prompt-file", str(path)]) == 2
    assert f"--prompt-file {path}" in (err := capsys.readouterr().err) and message in err


def test_text_that_is_not_utf8_is_named(tokenized_checkpoint, capsys, monkeypatch):
    """Undecodable bytes (the command line and, in some locales, standard input keep them as
    escapes) get an error naming where they came from, not the tokenizer's TypeError."""
    monkeypatch.setattr("sys.stdin", io.StringIO("caf\udce9 au lait"))
    for args, source in ((["--prompt-file", "-"], "the standard input"),
                         (["--prompt", "caf\udce9"], "--prompt"),
                         (["--prompt", "x", "--chat", "--system", "caf\udce9"], "--system")):
        assert main(["generate", "--model", tokenized_checkpoint, *args]) == 2
        assert f"{source} is not UTF-8 text" in capsys.readouterr().err


def test_prompt_and_prompt_file_exclude_one_another(tokenized_checkpoint, tmp_path):
    for args in ([], ["--prompt", "x", "--prompt-file", str(tmp_path)]):
        with pytest.raises(SystemExit):
            main(["generate", "--model", tokenized_checkpoint, *args])


def test_a_closed_pipe_ends_quietly(tokenized_checkpoint):
    """`jaxdec generate ... | head` whose reader has gone: exit 141 (as SIGPIPE would), no
    traceback (a BrokenPipeError's, also from the stream's callback and at exit)."""
    for extra in ([], ["--stream"]):
        proc = subprocess.Popen(
            [sys.executable, "-m", "jaxdec.cli", "generate", "--model", tokenized_checkpoint,
             "--prompt", "quick brown", "--max-new-tokens", "8", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=user_env())
        proc.stdout.close()   # the reader is gone before anything is written
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == 141, err
        assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_os_errors_and_ctrl_c_are_one_line(tokenized_checkpoint, tmp_path, capsys,
                                           monkeypatch):
    """An OSError (a file that cannot be read) is `jaxdec: error: ...`; Ctrl-C outside
    training (chat waiting for a line, say) is `jaxdec: interrupted`, exit 130."""
    from jaxdec import cli

    def unreadable(args):
        raise PermissionError(13, "Permission denied", "prompt.txt")

    monkeypatch.setattr(cli, "_generate", unreadable)
    assert main(["generate", "--model", tokenized_checkpoint, "--prompt", "x"]) == 2
    assert capsys.readouterr().err == ("jaxdec: error: [Errno 13] Permission denied: "
                                       "'prompt.txt'\n")

    def ctrl_c(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_chat", ctrl_c)
    assert main(["chat", "--model", tokenized_checkpoint]) == 130
    assert capsys.readouterr().err.endswith("jaxdec: interrupted\n")


def test_ctrl_c_stops_a_streamed_decode_within_a_step(tokenized_checkpoint):
    """Ctrl-C while the text streams: the decode ends at once, one line, exit 130 (it ran on
    to --max-new-tokens, Python's handler waiting for XLA; or, landing in the stream's
    callback, gave XLA's traceback and exit 1)."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    worker = subprocess.Popen(
        [sys.executable, "-m", "jaxdec.cli", "generate", "--model", tokenized_checkpoint,
         "--prompt", "hello the fox", "--max-new-tokens", "2000", "--ignore-eos", "--stream"],
        env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    printed = bytearray()
    reader = threading.Thread(target=lambda: [printed.extend(chunk) for chunk in iter(
        lambda: worker.stdout.read1(64), b"")], daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while len(printed) < 40:  # well into the decode (the prompt is 13 characters)
            assert time.monotonic() < deadline and worker.poll() is None, worker.stderr.read()
            time.sleep(0.01)
        at_signal = len(printed)
        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=60) == 130
        reader.join(timeout=10)
        err = worker.stderr.read().decode()
    finally:
        worker.kill()
    assert err.strip().splitlines()[-1] == "jaxdec: interrupted" and "Traceback" not in err, err
    assert len(printed) - at_signal < 200, (at_signal, len(printed))  # a few steps at most


def test_a_warning_is_one_line(tokenized_checkpoint, tmp_path):
    """A library's warning reads as the errors do (it showed jaxdec's source file and line)."""
    import shutil
    import subprocess
    import sys

    directory = tmp_path / "model"
    shutil.copytree(tokenized_checkpoint, directory)
    (directory / "generation_config.json").write_text("{not json")
    done = subprocess.run(
        [sys.executable, "-m", "jaxdec.cli", "generate", "--model", str(directory), "--prompt",
         "hello", "--max-new-tokens", "2"], env=user_env(), capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "generation_config.json" in line]
    assert warned and all(line.startswith("jaxdec: warning: ignoring ") for line in warned), \
        done.stderr
    assert ".py:" not in done.stderr, done.stderr


def test_ctrl_c_is_seen_at_steps_that_print_nothing():
    """The stop is asked at every step, not only where text is printed (special tokens, a
    character's first bytes: a decode of them ran on to its end)."""
    import signal

    import numpy as np

    from hf_models import make_tokenizer
    from jaxdec import cli

    ctrl_c = cli._CtrlC(stop=True)
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c:
            stream = cli._text_stream(make_tokenizer(), ctrl_c)
            stream(np.int32(0), np.array([4]), np.array([True]))  # "a"
            os.kill(os.getpid(), signal.SIGINT)  # (the handler notes it; nothing raised)
            with pytest.raises(cli._Stopped):
                stream(np.int32(1), np.array([0]), np.array([True]))  # a special token: ""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
