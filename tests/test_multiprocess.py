"""Several processes (`jax.distributed`), as on a multi-host TPU pod or GPU cluster: two
processes on this machine's CPU (gloo collectives), two devices each, one mesh over all four.
Loading, every generation method, streaming, export and training give what one process
gives; the CLI's generate, bench and chat print from process 0 alone."""

import json
import re
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import jaxdec
from multiprocess_cases import PROMPTS, prefix_turns, run_cases
from runenv import user_env

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT = "llama-gqa"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(hf_checkpoints, tmp_path_factory):
    """Each process's results (multiprocess_worker.py), and the directory they exported."""
    checkpoint = hf_checkpoints(CHECKPOINT)[0]
    work = tmp_path_factory.mktemp("multiprocess")
    export = str(work / "export")
    return _two_workers("multiprocess_worker.py", [checkpoint, export], work), export


def _two_workers(script: str, args: list[str], work) -> list[dict]:
    """`script` (beside this file) as processes 0 and 1 of one run, each given
    `PROCESS_ID PORT *args OUT_JSON`; the results each wrote to its OUT_JSON (in `work`)."""
    port = str(_free_port())
    workers = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, script), str(i), port, *args,
         str(work / f"out{i}.json")], env=user_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    deadline = time.monotonic() + 600  # a process whose peer died may wait on it a while
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for worker in workers:
            worker.kill()
    for i, (worker, log) in enumerate(zip(workers, logs)):
        assert worker.returncode == 0, f"process {i} failed:\n{log[-3000:]}"
    return [json.loads((work / f"out{i}.json").read_text()) for i in range(2)]


@pytest.fixture(scope="module")
def one_process(hf_checkpoints):
    """The same cases in this process, on the same mesh shape over its own fake devices."""
    checkpoint = hf_checkpoints(CHECKPOINT)[0]
    model = jaxdec.load_pretrained(checkpoint, mesh=jaxdec.make_mesh(tp=2, dp=2))
    results = run_cases(model, jaxdec.load_pretrained(checkpoint))
    results["prefix_turns"] = prefix_turns(jaxdec.load_pretrained(checkpoint,
                                                                  mesh=jaxdec.make_mesh(tp=4)))
    calls = []
    jaxdec.generate(model, PROMPTS, max_new_tokens=4, stream=lambda *args: calls.append(1))
    return model, results, len(calls)


def test_every_method_gives_what_one_process_gives(two_processes, one_process):
    results, _ = two_processes
    _, expected, _ = one_process
    for got in results:  # each process receives the whole batch's results
        logprobs = got.pop("sampled_logprobs"), expected["sampled_logprobs"]
        np.testing.assert_allclose(*logprobs, rtol=1e-4, atol=1e-4)
        for name in expected:
            if name != "sampled_logprobs":
                assert got[name] == expected[name], name


def test_the_stream_runs_in_the_process_holding_the_first_device(two_processes, one_process):
    results, _ = two_processes
    assert [r["stream_calls"] for r in results] == [one_process[2], 0]


def test_export_is_written_once_and_equals_one_process_export(two_processes, one_process,
                                                              tmp_path):
    from safetensors.numpy import load_file

    results, export = two_processes
    model = one_process[0]
    expected = jaxdec.save_pretrained(model, tmp_path / "one")
    assert results[0]["export_listed"] == sorted(os.listdir(expected))
    assert [r["export_failures"] for r in results] == [["FileExistsError", "OSError"],
                                                       ["ProcessFailed", "ProcessFailed"]]
    assert results[0]["export_listed_after_failures"] == results[0]["export_listed"]
    for name in os.listdir(expected):
        if name.endswith(".safetensors"):
            got = load_file(os.path.join(export, name))
            want = load_file(os.path.join(expected, name))
            assert sorted(got) == sorted(want)
            for tensor in want:
                np.testing.assert_array_equal(got[tensor], want[tensor])
        else:
            with open(os.path.join(export, name)) as a, open(os.path.join(expected, name)) as b:
                assert a.read() == b.read(), name



def test_training_over_two_processes(tmp_path):
    """`train_lm` then `train_draft` in two processes, dp 4 over both (each places its own
    devices' rows of every batch): the same weights and metrics as one process on four
    devices, also after the target resumes from its next-to-last checkpoint (the export
    compared is the resumed run's); process 0 alone logs; an error in process 0 (a run
    directory that exists) is raised in both."""
    from safetensors.numpy import load_file

    from jaxdec.train import train_draft, train_lm
    from train_presets import MICRO

    results = _two_workers("multiprocess_train.py", [str(tmp_path / "two")], tmp_path)

    one = tmp_path / "one"
    expected = {"lm": train_lm(MICRO, one / "lm", dp=4, log=lambda _: None)}
    expected["draft"] = train_draft(one / "lm", MICRO, one / "draft", dp=4, log=lambda _: None)
    for kind, figures in (("lm", ("heldout_loss_before", "heldout_loss")),
                          ("draft", ("acceptance_before", "acceptance_after", "heldout_loss"))):
        for got in results:
            for figure in figures:
                assert got[kind][figure] == pytest.approx(expected[kind][figure], rel=1e-4), \
                    (kind, figure)
        ours = load_file(str(tmp_path / "two" / kind / "model.safetensors"))
        theirs = load_file(str(one / kind / "model.safetensors"))
        assert sorted(ours) == sorted(theirs)
        for name in theirs:
            np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-3, atol=1e-5,
                                       err_msg=f"{kind} {name}")
        assert sorted(os.listdir(tmp_path / "two" / kind)) == sorted(os.listdir(one / kind))
    assert f"resuming from step {MICRO.target_steps - MICRO.checkpoint_every} on dp=4" in \
        results[0]["lines"]
    assert results[0]["resumed"]["heldout_loss"] == pytest.approx(
        expected["lm"]["heldout_loss"], rel=1e-4)
    assert any("exported to" in line for line in results[0]["lines"])
    assert results[1]["lines"] == []
    assert results[0]["again"].startswith("ValueError: output directory")
    assert results[1]["again"].startswith("ProcessFailed: process 0 failed while preparing")


def _cli_workers(args_of, stdin) -> list[subprocess.Popen]:
    """`jaxdec` (`python -m jaxdec.cli`) started in two processes joined by --coordinator,
    two CPU devices each; `args_of(i)`: process i's arguments; `stdin`: process 0's standard
    input (a file, or subprocess.PIPE; process 1's is empty)."""
    port = str(_free_port())
    env = dict(user_env(), JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
    return [subprocess.Popen(
        [sys.executable, "-m", "jaxdec.cli", *args_of(i), "--coordinator",
         f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=stdin if i == 0 else subprocess.DEVNULL, text=True) for i in range(2)]


def _cli_in_two_processes(args_of, stdin: str | None = None, returncodes=(0, 0),
                          timeout: float = 300, both: bool = False
                          ) -> list[str] | list[tuple[str, str]]:
    """`_cli_workers` run to their end (`stdin`: process 0's standard input text): their
    standard outputs; with `both` or other `returncodes` than success, (stdout, stderr)
    each."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as messages:
        messages.write(stdin or "")
        messages.seek(0)
        workers = _cli_workers(args_of, messages)
    try:
        outputs = [worker.communicate(timeout=timeout) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for i, (worker, (_, err), want) in enumerate(zip(workers, outputs, returncodes)):
        assert worker.returncode == want, f"process {i}: rc {worker.returncode}:\n{err[-3000:]}"
    # gloo's C++ logs its connections to standard output (from threads: pieces of its lines
    # interleave), all before jaxdec prints
    return [out for out, _ in outputs] if tuple(returncodes) == (0, 0) and not both else outputs


@pytest.mark.parametrize("stream", [False, True])
def test_cli_generate_over_two_processes(tokenized_checkpoint, capsys, stream):
    """`jaxdec generate --coordinator ...` in two processes, tp 4 over both: process 0 prints
    what one process prints on a tp 4 mesh of its own; process 1 prints nothing."""
    from jaxdec.cli import main

    args = ["generate", "--model", tokenized_checkpoint, "--prompt", "hello the fox",
            "--max-new-tokens", "6", "--ignore-eos", "--tp", "4", "--temperature", "0.7",
            "--seed", "2"] + ["--stream"] * stream
    outputs = _cli_in_two_processes(lambda i: args, both=True)
    assert main(args) == 0
    text = capsys.readouterr().out.strip().split("\n")[-1]
    got_text, got_stats = outputs[0][0].splitlines()[-1], outputs[0][1].splitlines()[-1]
    assert got_text == text and "6 tokens" in got_stats, outputs[0]
    assert "2 processes, 4 devices" in got_stats
    assert "tokens" not in "".join(outputs[1]) and text not in outputs[1][0], outputs[1]


def test_cli_bench_over_two_processes(tokenized_checkpoint, tmp_path):
    """`jaxdec bench` in two processes, tp 4 over both: process 0 prints the table and writes
    --json, process 1 neither."""
    outputs = _cli_in_two_processes(lambda i: [
        "bench", "--model", tokenized_checkpoint, "--batch-sizes", "2", "--context", "40",
        "--new-tokens", "4", "--repeats", "1", "--tp", "4", "--json",
        str(tmp_path / "0.json") if i == 0 else "/nonexistent/1.json"])
    assert "in 2 processes" in outputs[0] and "tokens/s" in outputs[0], outputs[0]
    assert "tokens" not in outputs[1], outputs[1]
    (record,) = json.loads((tmp_path / "0.json").read_text())
    assert record["devices"] == 4 and record["batch"] == 2
    # (Process 1 writes no --json: its own, a folder only process 0's host has, is not
    # checked there; it refused it, and process 0 waited 2 minutes for it.)


def test_cli_an_error_in_one_process_ends_every_process(tokenized_checkpoint, tmp_path):
    """A check that fails in one process only (a model directory its host lacks, a prompt
    another process was not given) ends every process at once with an error: the other
    waited in jax's next collective (2 minutes, then jax's traceback; or for ever)."""
    base = ["generate", "--prompt", "hello the fox", "--max-new-tokens", "2", "--tp", "4"]
    outputs = _cli_in_two_processes(lambda i: base + [
        "--model", tokenized_checkpoint if i == 0 else str(tmp_path / "nope")],
        returncodes=(1, 2), timeout=90)
    assert "process 1 failed while checking its options and files" in outputs[0][1]
    assert "nope does not exist" in outputs[1][1]
    outputs = _cli_in_two_processes(lambda i: base[:2] + ["hello the fox" if i == 0 else
                                                          "the lazy dog"] + base[3:] + [
        "--model", tokenized_checkpoint], returncodes=(2, 2), timeout=240)
    for _, err in outputs:
        assert "the prompt differs between processes (process 0's and those of processes [1])" \
            in err, err


def test_cli_processes_decoding_alone_print_once(tokenized_checkpoint):
    """--tp within one process's devices: each process decodes on a mesh of its own; process
    0 alone prints (process 1 printed the streamed text too) and says so."""
    outputs = _cli_in_two_processes(lambda i: [
        "generate", "--model", tokenized_checkpoint, "--prompt", "hello the fox",
        "--max-new-tokens", "4", "--ignore-eos", "--tp", "1", "--stream"], both=True)
    assert "2 processes, each decoding alone on 1 of its own devices" in outputs[0][1]
    assert "hello the fox" in outputs[0][0]
    assert "hello the fox" not in outputs[1][0] and "tokens" not in "".join(outputs[1])


@pytest.mark.parametrize("where", ["process 0, waiting", "every process, mid-reply"])
def test_cli_chat_interrupted_ends_every_process(tokenized_checkpoint, tmp_path, where):
    """Ctrl-C while process 0 waits for a message: the others, waiting for it, end too (they
    waited 5 minutes, then aborted). Ctrl-C to every process (a terminal's process group)
    during a reply: process 0 ends after it, and the others with it (process 1 ended alone,
    process 0 waited for it for ever)."""
    import shutil
    import signal
    import time

    from test_chat import HEADERS, SPECIAL

    directory = tmp_path / "chat"
    shutil.copytree(tokenized_checkpoint, directory)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        dict(SPECIAL, chat_template=HEADERS)))
    waiting = where == "process 0, waiting"
    workers = _cli_workers(lambda i: ["chat", "--model", str(directory), "--max-new-tokens",
                                      "2" if waiting else "200", "--ignore-eos", "--tp", "4",
                                      "--max-context", "512"], subprocess.PIPE)
    try:
        # (a second message waits in the input: its reply decodes while the first's summary
        # is read)
        workers[0].stdin.write("the fox\n" if waiting else "the fox\nhello\n")
        workers[0].stdin.flush()
        deadline = time.monotonic() + 240
        while "tokens" not in workers[0].stderr.readline():  # the first reply's summary
            assert time.monotonic() < deadline and workers[0].poll() is None
        for worker in workers[:1] if waiting else workers:
            worker.send_signal(signal.SIGINT)
        codes = [worker.wait(timeout=180) for worker in workers]
        errors = [worker.stderr.read() for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert codes == [130, 0] and "jaxdec: interrupted" in errors[0], errors


def test_cli_chat_over_two_processes(tokenized_checkpoint, tmp_path, capsys, monkeypatch):
    """`jaxdec chat` in two processes, tp 4 over both: process 0 reads the messages (a blank
    line and a non-ASCII one among them) and prints what one process prints; process 1,
    whose standard input is empty, follows every turn and prints nothing."""
    import io
    import shutil

    from jaxdec.cli import main
    from test_chat import HEADERS, SPECIAL

    directory = tmp_path / "chat"
    shutil.copytree(tokenized_checkpoint, directory)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        dict(SPECIAL, chat_template=HEADERS)))
    args = ["chat", "--model", str(directory), "--max-new-tokens", "4", "--ignore-eos",
            "--tp", "4", "--temperature", "0.8", "--max-context", "256"]
    messages = "the fox\n\nhello wörld\n"
    outputs = _cli_in_two_processes(lambda i: args, stdin=messages)
    monkeypatch.setattr("sys.stdin", io.StringIO(messages))
    assert main(args) == 0
    replies = capsys.readouterr().out.split("\n")[:2]
    assert outputs[0].split("\n")[-3:-1] == replies, outputs[0]
    assert not any(reply in outputs[1] for reply in replies if reply), outputs[1]


@pytest.mark.parametrize("command", ["generate", "chat", "train"])
def test_cli_cluster_options_are_checked(tokenized_checkpoint, tmp_path, capsys, command):
    from jaxdec.cli import main

    base = {"generate": ["generate", "--model", tokenized_checkpoint, "--prompt", "x"],
            "chat": ["chat", "--model", tokenized_checkpoint],
            "train": ["train", "lm", "--preset", "cpu-tiny", "--out", str(tmp_path / "run")],
            }[command]
    for extra, message in ((["--coordinator", "localhost:1"], "needs --num-processes"),
                           (["--coordinator", "localhost:1", "--num-processes", "2",
                             "--process-id", "2"], r"--process-id must be in \[0, 2\)")):
        assert main(base + extra) == 2
        assert re.search(message, capsys.readouterr().err)
    # A flag given alone, where jax finds no cluster for the rest: named (the error named
    # --distributed, which was not given). (jax's own refusal, its backend already started
    # by earlier tests, stands in: raised where jax's detection would fail.)
    import jax

    def no_cluster(*args, **kwargs):
        raise ValueError("coordinator_address should be defined.")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jax.distributed, "initialize", no_cluster)
        assert main(base + ["--process-id", "0"]) == 2
    assert re.search("--process-id: coordinator_address should be defined. jax found no "
                     "cluster", capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "run")
