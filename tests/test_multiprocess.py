"""Several processes (`jax.distributed`), as on a multi-host TPU pod or GPU cluster: two
processes on this machine's CPU (gloo collectives), two devices each, one mesh over all four.
Loading, every generation method, streaming and export give what one process gives."""

import json
import os
import socket
import subprocess
import sys
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
    port = str(_free_port())
    workers = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, "multiprocess_worker.py"), str(i), port, checkpoint,
         export, str(work / f"out{i}.json")], env=user_env(), stdout=subprocess.PIPE,
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
    results = [json.loads((work / f"out{i}.json").read_text()) for i in range(2)]
    return results, export


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

