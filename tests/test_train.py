"""Training: loss goes down, resume is exact (also after a kill during a save), exports load
in transformers, distillation raises acceptance, and bad input is refused."""

import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.experimental import io_callback

import jaxdec
from jaxdec import parallel
from jaxdec.train import Interrupted, loop, train_draft, train_lm
from train_presets import MICRO

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted micro run: (directory, metrics). It runs under strict dtype
    promotion (optax's update once failed there); the resume tests compare it with runs under
    standard promotion, bit for bit."""
    out = tmp_path_factory.mktemp("train") / "lm"
    with jax.numpy_dtype_promotion("strict"):
        metrics = train_lm(MICRO, out, log=lambda _: None)
    return str(out), metrics


def test_training_lowers_heldout_loss(trained):
    out, metrics = trained
    assert metrics["heldout_loss"] < metrics["heldout_loss_before"] - 0.5
    assert metrics["heldout_ppl"] == pytest.approx(np.exp(metrics["heldout_loss"]))
    assert metrics["tokens_per_s"] > 0 and 0 < metrics["mfu"] < 1.5
    assert json.load(open(os.path.join(out, "metrics.json"))) == metrics
    expected = {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                "checkpoints", "train.json", "metrics.json"}
    assert expected <= set(os.listdir(out))


def test_export_loads_in_transformers_with_equal_logits(trained):
    out, _ = trained
    model = jaxdec.load_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.array([model.tokenizer.encode("import os\nprint(os.getcwd())\n").ids])
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(jaxdec.forward(model, tokens))
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4
    # transformers' tokenizer knows the special tokens (they were None: no padding).
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs.eos_token == theirs.bos_token == theirs.pad_token == "<|endoftext|>"
    text = "import os\nprint(os.getcwd())\n"
    assert theirs(text)["input_ids"] == model.tokenizer.encode(text).ids
    assert len(set(map(len, theirs([text, "x"], padding=True)["input_ids"]))) == 1


_KILL_DURING_SAVE = """
import os, signal, sys
from jaxdec.train import loop, train_lm
from train_presets import MICRO

original = loop.Checkpoints.save

def save_then_die(self, step, state):
    original(self, step, state)  # the asynchronous write has started, not finished
    if step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)

loop.Checkpoints.save = save_then_die
train_lm(MICRO, sys.argv[1], log=lambda _: None)
"""


def test_kill_during_save_then_resume_is_exact(trained, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(out), "16"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    # The save of step 16 never completed: step 8 is the latest loadable checkpoint.
    with loop.Checkpoints(str(out)) as checkpoints:
        assert checkpoints.latest_step() == 8
    with pytest.raises(ValueError, match="--resume"):
        train_lm(MICRO, out, log=lambda _: None)
    resumed = train_lm(MICRO, out, resume=True, log=lambda _: None)
    uninterrupted = jaxdec.load_pretrained(trained[0]).params
    for a, b in zip(jax.tree.leaves(jaxdec.load_pretrained(out).params),
                    jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed["heldout_loss"] == trained[1]["heldout_loss"]


def test_resume_on_a_data_parallel_mesh(tmp_path):
    """dp = 2: a resumed state's step counts come back replicated over the mesh, as the
    parameters' shards do (they once came back on one device, which jit refused beside the
    parameters); the resumed run ends with the uninterrupted run's weights."""
    import shutil

    out = tmp_path / "dp2"
    first = train_lm(MICRO, out, dp=2, log=lambda _: None)
    weights = [np.asarray(x) for x in jax.tree.leaves(jaxdec.load_pretrained(out).params)]
    shutil.rmtree(out / "checkpoints" / str(MICRO.target_steps))
    os.remove(out / "metrics.json")   # (written last: a finished run is not resumed)
    lines = []
    with warnings.catch_warnings():  # (no dp given: the run's own, not the CPU default of 1,
        warnings.simplefilter("error", RuntimeWarning)  # which warned and was inexact)
        again = train_lm(MICRO, out, resume=True, log=lines.append)
    assert f"resuming from step {MICRO.target_steps - MICRO.checkpoint_every} on dp=2" in lines
    for a, b in zip(jax.tree.leaves(jaxdec.load_pretrained(out).params), weights):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert again["heldout_loss"] == first["heldout_loss"]


def test_distillation_raises_acceptance(trained, tmp_path):
    for objective, promotion in (("tv", "standard"), ("kl", "strict")):
        with jax.numpy_dtype_promotion(promotion):
            metrics = train_draft(trained[0], MICRO, tmp_path / objective, objective=objective,
                                  log=lambda _: None)
        assert metrics["acceptance_after"] > metrics["acceptance_before"] + 0.05
        draft = jaxdec.load_pretrained(tmp_path / objective)
        assert draft.config.num_layers == 1
        assert draft.config.vocab_size == jaxdec.load_pretrained(trained[0]).config.vocab_size
        assert draft.tokenizer is not None


def test_divergences_hand_computed():
    from jaxdec.train.distill import acceptance, divergence

    p = jnp.log(jnp.array([0.5, 0.5, 0.0 + 1e-30]))
    q = jnp.log(jnp.array([0.25, 0.25, 0.5]))
    assert float(acceptance(p, q)) == pytest.approx(0.5)
    assert float(divergence(p, q, "tv")) == pytest.approx(0.5)
    assert float(divergence(p, q, "kl")) == pytest.approx(np.log(2), rel=1e-5)
    with pytest.raises(ValueError, match="objective"):
        divergence(p, q, "js")


def test_seconds_per_pass_drops_the_fixed_cost():
    """A loop whose passes each sleep 20 ms on the host, behind a 200 ms fixed cost per call:
    the per-pass time excludes the fixed cost (an average over one call would not)."""
    def nap(seconds):
        time.sleep(float(seconds))
        return np.float32(0)

    def sleep(seconds, x):
        return x + io_callback(nap, jax.ShapeDtypeStruct((), jnp.float32), seconds + 0 * x)

    @jax.jit
    def program(n, x):
        x = sleep(jnp.float32(0.2), x)  # the fixed cost
        return jax.lax.fori_loop(0, n, lambda _, x: sleep(jnp.float32(0.02), x), x)

    seconds = loop.seconds_per_pass(program, jnp.float32(0), passes=2, trials=2)
    # 20 ms per pass; averaging one call of 4 passes would give (200 + 80) / 4 = 70 ms. The
    # difference of two timed calls carries both calls' noise (a loaded CI machine measured
    # 17.9 ms once, and over 30 ms beside a 60 ms fixed cost), hence the wide bounds.
    assert 0.012 < seconds < 0.045


def test_ctrl_c_keeps_the_last_checkpoint(tmp_path):
    """KeyboardInterrupt mid-run: Interrupted, and the last finished checkpoint restores."""
    state = {"step": jnp.int32(0), "params": {"w": jnp.zeros(3)}}

    def step_fn(state, batch):
        return {"step": state["step"] + 1, "params": {"w": state["params"]["w"] + batch}}, \
            jnp.float32(0)

    def batch_at(step):
        if step == 5:
            raise KeyboardInterrupt
        return jnp.ones(3)

    checkpoints = loop.Checkpoints(str(tmp_path))
    with pytest.raises(Interrupted, match="step 4 is intact"):
        loop.run_steps(state, step_fn, batch_at, total_steps=10, checkpoints=checkpoints,
                       checkpoint_every=2, tokens_per_step=1, label="toy")
    with loop.Checkpoints(str(tmp_path)) as checkpoints:
        restored = checkpoints.restore(state)
    assert int(restored["step"]) == 4
    fresh = {"step": jnp.int32(0), "params": {"w": jnp.zeros(3)}}   # (state was donated)
    with pytest.raises(Interrupted, match="no checkpoint was written yet") as raised:
        loop.run_steps(fresh, step_fn, batch_at, total_steps=10,
                       checkpoints=loop.Checkpoints(str(tmp_path / "none")),
                       checkpoint_every=8, tokens_per_step=1, label="toy")
    assert raised.value.step is None
    np.testing.assert_array_equal(restored["params"]["w"], 4)
    other = {"step": jnp.int32(0), "params": {"w": jnp.zeros(4)}}  # e.g. another layout
    with loop.Checkpoints(str(tmp_path)) as checkpoints, \
            pytest.raises(ValueError, match=r"(?s)step 4 in .* holds arrays of other shapes.*"
                          r"at params/w it holds shape \[3\], this run shape \[4\]"):
        checkpoints.restore(other)   # (found before orbax reads an array)
    renamed = {"step": jnp.int32(0), "params": {"v": jnp.zeros(3)}}
    with loop.Checkpoints(str(tmp_path)) as checkpoints, \
            pytest.raises(ValueError, match=r"at params/v it holds no array, this run shape"):
        checkpoints.restore(renamed)


def test_ctrl_c_during_a_save_waits_for_it(tmp_path):
    """Ctrl-C inside a checkpoint's save is raised once orbax has taken the save (cut part
    way, orbax logged a failed finalize and forgot the step it then wrote all the same), and
    the step an interruption names is read from the disk."""
    import signal

    state = {"step": jnp.int32(0), "params": {"w": jnp.zeros(3)}}
    with loop.Checkpoints(str(tmp_path)) as checkpoints:
        save = checkpoints.manager.save

        def interrupted_save(*args, **kwargs):
            signal.raise_signal(signal.SIGINT)   # (Python runs the handler right here)
            return save(*args, **kwargs)

        checkpoints.manager.save = interrupted_save
        with pytest.raises(KeyboardInterrupt):
            checkpoints.save(4, state)

        def hung_save(*args, **kwargs):   # a second Ctrl-C ends a save that does not return
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            pytest.fail("the second Ctrl-C did not interrupt")

        checkpoints.manager.save = hung_save
        with pytest.raises(KeyboardInterrupt):
            checkpoints.save(6, state)
        checkpoints.manager.save = save
        checkpoints.manager.wait_until_finished()
        with loop.Checkpoints(str(tmp_path)) as other:  # a save this manager did not see
            other.save(8, state)
        assert checkpoints.saved_step() == 8
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with loop.Checkpoints(str(tmp_path)) as checkpoints:
        assert checkpoints.manager.all_steps() == [4, 8]


def test_a_diverged_run_is_said_and_its_metrics_stay_json(tmp_path):
    """A non-finite held-out loss warns, its perplexity does not overflow math.exp, and the
    metrics file holds null for it (strict JSON readers refuse NaN)."""
    import math

    assert loop.perplexity(1.0) == pytest.approx(math.e)
    assert loop.perplexity(1e4) == math.inf and math.isnan(loop.perplexity(math.nan))
    with pytest.warns(RuntimeWarning, match="train lm p: the held-out loss is nan: the training "
                                            "diverged .* a lower learning rate"):
        loop.warn_if_diverged(math.nan, "train lm p")
    path = str(tmp_path / "metrics.json")
    loop.write_json(path, {"loss": math.nan, "ppl": math.inf, "rows": [1.5, -math.inf]})
    assert json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(c)) == {
        "loss": None, "ppl": None, "rows": [1.5, None]}


def test_a_corpus_short_in_tokens_is_named(tmp_path):
    """Text that encodes to fewer tokens than the size check's guess (4 characters a token):
    the split, its files and what to do are named (it was `data.pack`'s bare count)."""
    from jaxdec import data
    from jaxdec.train.lm import build_dataset

    for i in range(6):
        (tmp_path / f"notes{i}.rst").write_text(("=" * 76 + "\n") * 10)
    corpus = data.load_corpus(tmp_path)
    tokenizer = data.train_tokenizer(corpus.train_texts, 1024)
    with pytest.raises(ValueError, match=r"the corpus's held-out text \(1 file\) encodes to "
                       r"\d+ tokens, fewer than one sequence of 33: give a corpus of more text"):
        build_dataset(tokenizer, corpus, MICRO)


def test_mfu_is_over_every_device_of_the_run():
    """tokens/s is the whole mesh's, the peak one device's: MFU divides by peak x devices (it
    was overstated dp-fold); a call that ran no step says its throughput is unmeasured."""
    from jaxdec.train.lm import throughput

    stats = loop.LoopStats(timed_steps=10, timed_seconds=2.0, compile_seconds=1.234)
    said = []
    got = throughput(stats, 100, 6.0, 1000.0, 2, said.append)
    assert got == {"tokens_per_s": 500.0, "mfu": 1.5, "matmul_peak_tflops": 1e-9,
                   "devices": 2, "compile_seconds": 1.23}
    assert throughput(loop.LoopStats(), 100, 6.0, 1000.0, 2, said.append) == {
        "tokens_per_s": None, "mfu": None}
    assert said == ["tokens/s and MFU not measured: this call ran no training step"]


def test_cross_entropy_matches_optax_values_and_gradients():
    """The hand-written gradient ((softmax - onehot) * g) equals autodiff of optax's loss."""
    import optax

    from jaxdec.train.lm import token_cross_entropy

    logits = 3 * jax.random.normal(jax.random.PRNGKey(0), (2, 5, 11), jnp.float32)
    labels = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 11)
    weights = jax.random.uniform(jax.random.PRNGKey(2), (2, 5))
    reference = optax.softmax_cross_entropy_with_integer_labels
    np.testing.assert_allclose(token_cross_entropy(logits, labels), reference(logits, labels),
                               rtol=1e-6)
    ours = jax.grad(lambda x: jnp.sum(token_cross_entropy(x, labels) * weights))(logits)
    theirs = jax.grad(lambda x: jnp.sum(reference(x, labels) * weights))(logits)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
    with jax.numpy_dtype_promotion("strict"):  # no implicit bool -> float in the gradient
        strict = jax.grad(lambda x: jnp.sum(token_cross_entropy(x, labels) * weights))(logits)
    np.testing.assert_array_equal(strict, ours)
    # bf16 logits (what the training step passes on accelerators) are read in fp32: the loss
    # is fp32, the gradient has the logits' dtype.
    low = logits.astype(jnp.bfloat16)
    assert token_cross_entropy(low, labels).dtype == jnp.float32
    np.testing.assert_allclose(token_cross_entropy(low, labels),
                               reference(low.astype(jnp.float32), labels), rtol=1e-6)
    low_grad = jax.grad(lambda x: jnp.sum(token_cross_entropy(x, labels) * weights))(low)
    assert low_grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(low_grad.astype(jnp.float32), theirs, atol=0.02)
    # Hand-computed: uniform logits over 4 classes, label 2: loss log 4, gradient 1/4 - onehot.
    loss, grad = jax.value_and_grad(lambda x: token_cross_entropy(x, jnp.array(2)))(jnp.zeros(4))
    assert float(loss) == pytest.approx(np.log(4))
    np.testing.assert_allclose(grad, [0.25, 0.25, -0.75, 0.25])


def test_heldout_evaluations_share_one_compiled_program():
    """The held-out loss before and after training (and the acceptance before and after
    distillation) compile once: on the H200 each evaluation phase took ~13 s, mostly
    compiling."""
    from jaxdec.train.distill import evaluate_acceptance
    from jaxdec.train.lm import evaluate_lm

    config = jaxdec.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                                max_position_embeddings=64)
    target = jaxdec.init_model(config, jax.random.PRNGKey(0))
    draft = jaxdec.init_model(config, jax.random.PRNGKey(1))
    sequences = np.random.default_rng(0).integers(0, 64, (5, 9)).astype(np.int32)
    compiles = []

    def listener(event, duration, **_):
        if event.endswith("backend_compile_duration"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        args = dict(mesh=target.mesh, batch_size=2, dtype=jnp.float32)
        losses = [evaluate_lm(params, sequences, config=config, **args)
                  for params in (target.params, draft.params, target.params)]
        assert len(compiles) == 1
        rates = [evaluate_acceptance(target, params, sequences, draft_config=config, **args)
                 for params in (draft.params, target.params, draft.params)]
        assert len(compiles) == 2
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert losses[0] == losses[2] != losses[1]
    assert rates[0] == rates[2] and 0 < rates[0] < 1 and rates[1] == pytest.approx(1.0)


def test_chunk_lengths_stop_at_checkpoints_and_the_end():
    assert loop.chunk_lengths(0, 30, per_call=10, checkpoint_every=10) == [10, 10, 10]
    assert loop.chunk_lengths(0, 24, per_call=10, checkpoint_every=8) == [8, 8, 8]
    assert loop.chunk_lengths(5, 23, per_call=4, checkpoint_every=10) == [4, 1, 4, 4, 2, 3]
    assert loop.chunk_lengths(7, 7, per_call=4, checkpoint_every=10) == []


def test_steps_run_in_chunks_as_one_by_one(tmp_path):
    """`run_steps` with several steps per call: the same state as one step per call (the
    batches in step order, the extra arguments passed), checkpoints where asked."""
    def step_fn(state, batch, scale):
        w = state["params"]["w"] * 0.5 + batch * scale
        return {"step": state["step"] + 1, "params": {"w": w}}, jnp.sum(w)

    def batch_at(step):
        return np.full((3,), step, np.float32)

    def run(per_call, out):
        state = {"step": jnp.int32(0), "params": {"w": jnp.zeros(3)}}
        checkpoints = loop.Checkpoints(str(out))
        state, stats = loop.run_steps(state, step_fn, batch_at, total_steps=11,
                                      checkpoints=checkpoints, checkpoint_every=4,
                                      tokens_per_step=1, label="toy", step_args=(jnp.float32(2),),
                                      steps_per_call=per_call)
        return state, stats, sorted(checkpoints.manager.all_steps())

    one, _, saved_one = run(1, tmp_path / "one")
    chunked, stats, saved_chunked = run(3, tmp_path / "three")  # calls of 3, 1, 3, 1, 3 steps
    assert int(one["step"]) == int(chunked["step"]) == 11
    np.testing.assert_allclose(one["params"]["w"], chunked["params"]["w"], rtol=1e-6)
    assert saved_one == saved_chunked == [8, 11]  # the two latest of 4, 8, 11
    assert stats.steps_run == stats.timed_steps == 11
    assert stats.compile_seconds > 0 and stats.last_loss == pytest.approx(
        float(jnp.sum(chunked["params"]["w"])))


def test_batch_order_depends_only_on_seed_and_step():
    a = [loop.batch_indices(i, num_sequences=10, batch_size=3, seed=1) for i in range(7)]
    b = [loop.batch_indices(i, num_sequences=10, batch_size=3, seed=1) for i in range(7)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    first_epoch = np.concatenate(a[:3])
    assert len(set(first_epoch.tolist())) == 9  # no repeats within an epoch
    with pytest.raises(ValueError, match="fewer than one batch"):
        loop.batch_indices(0, num_sequences=2, batch_size=3, seed=0)


# ----------------------------------------------------------------------------- bad input


def test_output_directory_rules(trained, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="exists and is not empty"):
        train_lm(MICRO, foreign, log=lambda _: None)
    with pytest.raises(ValueError, match="refusing to delete"):
        train_lm(MICRO, foreign, force=True, log=lambda _: None)
    with pytest.raises(ValueError, match="not a jaxdec training directory"):
        train_lm(MICRO, foreign, resume=True, log=lambda _: None)
    assert (foreign / "notes.txt").read_text() == "precious"
    # A train.json of the user's own (a dataset's) does not make the directory jaxdec's.
    for record in ('[{"text": "a"}]', '{"split": "train"}', '{"kind": "lm"', "\xff"):
        (foreign / "train.json").write_text(record)
        for flags, match in ((dict(force=True), "refusing to delete .* not a jaxdec run record"),
                             (dict(resume=True), "not a jaxdec training directory")):
            with pytest.raises(ValueError, match=match):
                train_lm(MICRO, foreign, log=lambda _: None, **flags)
    assert (foreign / "notes.txt").read_text() == "precious"
    with pytest.raises(ValueError, match="notes.txt is a file: the run directory"):
        train_lm(MICRO, foreign / "notes.txt", force=True, log=lambda _: None)
    with pytest.raises(ValueError, match="out='' names no directory"):
        train_lm(MICRO, "", log=lambda _: None)
    with pytest.raises(ValueError, match=r"settings changed \(steps: 24 in the run, 99 now\): "
                                         "resume with the run's own"):
        train_lm(MICRO, trained[0], steps=99, resume=True, log=lambda _: None)
    # Another dp (another machine): a warning, then the run (here finished: its metrics).
    with pytest.warns(RuntimeWarning, match=r"resuming .* with dp: 1 in the run, 2 now: the "
                      "gradients' sums are ordered by it"):
        assert train_lm(MICRO, trained[0], dp=2, resume=True, log=lambda _: None) == \
            trained[1]
    with pytest.raises(ValueError, match="resume=True continues the run in out, force=True"):
        train_lm(MICRO, trained[0], resume=True, force=True, log=lambda _: None)
    # A preset of the same name with other settings does not continue the run silently.
    retuned = dataclasses.replace(MICRO, target_learning_rate=0.5, batch_size=4)
    with pytest.raises(ValueError, match=r"settings changed \(settings.batch_size: 8 in the "
                                         r"run, 4 now; settings.target_learning_rate: 0.005 "
                                         r"in the run, 0.5 now\)"):
        train_lm(retuned, trained[0], resume=True, log=lambda _: None)
    run_file = os.path.join(trained[0], loop.RUN_FILE)
    assert json.load(open(run_file))["settings"] == loop.run_settings(MICRO)
    assert len(json.load(open(run_file))["corpus_digest"]) == 16
    # A finished run resumed: its metrics as they were (they were measured again, as null).
    said = []
    metrics = os.path.join(trained[0], "metrics.json")
    before = open(metrics).read()
    assert train_lm(MICRO, trained[0], resume=True, log=said.append) == trained[1]
    assert open(metrics).read() == before and "nothing to resume" in said[0]
    (foreign / "cut.json").write_text('{"steps": ')
    with pytest.raises(ValueError, match=r"cut.json is not valid JSON \(Expecting value"):
        loop.read_json(str(foreign / "cut.json"))
    (foreign / "list.json").write_text('[1, 2]')
    with pytest.raises(ValueError, match=r"list.json is not a jaxdec run file \(it holds a "
                                         r"JSON list"):
        loop.read_json(str(foreign / "list.json"))


def test_a_damaged_checkpoint_is_named(trained, tmp_path):
    """Its array data gone (a disk error, a partial copy): a ValueError naming the step and
    what to do, not orbax's bare Exception and traceback."""
    import glob
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    os.remove(run / "metrics.json")
    latest = max(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())
    data_dirs = glob.glob(str(run / "checkpoints" / str(latest) / "**" / "d"), recursive=True)
    assert data_dirs
    for d in data_dirs:
        shutil.rmtree(d)
    with pytest.raises(ValueError, match=f"checkpoint of step {latest} .* cannot be read .* "
                                         f"delete its directory"):
        train_lm(MICRO, run, resume=True, log=lambda _: None)


def test_all_process_checks_name_the_processes_that_differ(tmp_path, monkeypatch):
    """Training's checks across processes (the two-process test runs their passing paths):
    three processes faked, each check's gather replaced by what the processes would send."""
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    sent = []

    def gathered(others):
        def gather(value):
            sent.append(int(value))
            return np.array([value, *others(value)], np.int32)
        return gather

    monkeypatch.setattr(parallel, "from_every_process", gathered(lambda v: [v, v]))
    loop.check_same_everywhere(b"the corpus", "the training data")
    monkeypatch.setattr(parallel, "from_every_process", gathered(lambda v: [v, v + 1]))
    with pytest.raises(ValueError, match=r"the training data differs between processes "
                                         r"\(process 0's and those of processes \[2\]\): "
                                         r"every host must read the same corpus"):
        loop.check_same_everywhere(b"the corpus", "the training data")
    assert sent[0] == sent[1]  # a checksum of the value, the same in every call

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setattr(parallel, "from_every_process", gathered(lambda v: [0, v]))
    with pytest.raises(ValueError, match=r"process\(es\) \[0, 1, 2\] do not see"):
        loop.check_shared_directory(str(run))  # nobody sees it: process 0 prepared nothing
    (run / loop.RUN_FILE).write_text("{}")
    with pytest.raises(ValueError, match=r"process\(es\) \[1\] do not see the run directory"):
        loop.check_shared_directory(str(run))
    monkeypatch.setattr(parallel, "from_every_process", gathered(lambda v: [v, v]))
    loop.check_shared_directory(str(run))


def test_a_corpus_given_from_home_is_recorded_whole(tmp_path, monkeypatch):
    """`~/texts` was read (expanded) but recorded as `<cwd>/~/texts`: a resume naming the
    same corpus another way was refused as another corpus."""
    import json as json_module
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(os.path.dirname(json_module.__file__), tmp_path / "texts",
                    ignore=shutil.ignore_patterns("__pycache__"))
    first = train_lm(MICRO, tmp_path / "run", corpus="~/texts", steps=1, log=lambda _: None)
    record = json.loads((tmp_path / "run" / loop.RUN_FILE).read_text())
    assert record["corpus"] == str(tmp_path / "texts")
    assert train_lm(MICRO, tmp_path / "run", corpus=tmp_path / "texts", steps=1, resume=True,
                    log=lambda _: None) == first


def test_unknown_preset_and_bad_corpus(tmp_path):
    with pytest.raises(ValueError, match="valid presets: cpu-tiny, gpu-small, gpu-base"):
        train_lm("huge", tmp_path / "a")
    (tmp_path / "corpus").mkdir()
    with pytest.raises(ValueError, match="no readable text files"):
        train_lm(MICRO, tmp_path / "b", corpus=tmp_path / "corpus")
    assert not (tmp_path / "b").exists()
    (tmp_path / "corpus" / "a.py").write_text("x = 1\n" * 50)
    (tmp_path / "corpus" / "b.py").write_text("y = 2\n")
    with pytest.raises(ValueError, match="corpus .* is too small: its 2 files hold 306 char"):
        train_lm(MICRO, tmp_path / "b", corpus=tmp_path / "corpus")
    (tmp_path / "small").mkdir()  # one file held out, one to train on: no batch of 8 in it
    for name in ("a.py", "b.py"):
        (tmp_path / "small" / name).write_text("x = 1\n" * 117)
    with pytest.raises(ValueError, match="about 5 sequences .* fewer than one batch of 8"):
        train_lm(MICRO, tmp_path / "b", corpus=tmp_path / "small")
    with pytest.raises(ValueError, match="a.py is a file: give a directory"):
        train_lm(MICRO, tmp_path / "b", corpus=tmp_path / "corpus" / "a.py")
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        train_lm(MICRO, tmp_path / "c", steps=0)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(preset=3), TypeError, r"preset must be a preset name \(cpu-tiny, gpu-small, gpu-base\)"),
    (dict(out=None), TypeError, "out must be a directory path"),
    (dict(resume="yes"), TypeError, "resume must be a bool"),
    (dict(force=1), TypeError, "force must be a bool"),
    (dict(seed=-1), ValueError, "seed must be an int >= 0"),
    (dict(seed=2**32), ValueError, r"seed must be < 2\*\*32"),   # its key would be seed 0's
    (dict(corpus="."), ValueError, "is inside the corpus"),   # out = tmp_path / "run"
    (dict(corpus=5), TypeError, r"corpus must be a str or os.PathLike \(a path\), got int"),
    (dict(out="."), ValueError, "starting the run over .* would delete it"),
    (dict(dp=0), ValueError, "dp must be an int >= 1"),
    (dict(dp=3), ValueError, "dp=3 does not divide the batch of 8 sequences"),
    (dict(log="print"), TypeError, "log must be callable"),
])
def test_bad_training_arguments_touch_nothing(tmp_path, kwargs, error, match, monkeypatch):
    """Refused before the corpus is read or the run directory made (both commands). A run
    directory and a corpus must not overlap: the run's files joined the corpus (a resumed run
    read other text), or --force deleted the corpus."""
    monkeypatch.chdir(tmp_path)
    if kwargs.get("out") == ".":
        kwargs = kwargs | {"corpus": tmp_path / "run" / "texts"}
    for train, args in ((train_lm, ()), (train_draft, (tmp_path / "no-target",))):
        call = {"preset": MICRO, "out": tmp_path / "run"} | kwargs
        with pytest.raises(error, match=match):
            train(*args, call.pop("preset"), call.pop("out"), **call)
        assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("change, match", [
    (dict(checkpoint_every=0), "Preset.checkpoint_every must be an int >= 1"),
    (dict(batch_size=0), "Preset.batch_size must be an int >= 1"),
    (dict(seq_len=512), "seq_len=512 is longer than max_positions=256"),
    (dict(warmup_fraction=1.0), r"warmup_fraction must be in \[0, 1\)"),
    (dict(draft_learning_rate=-1e-3), "draft_learning_rate must be a number > 0"),
    (dict(vocab_size=200), "vocab_size must be >= 258"),  # (found after out was written)
])
def test_bad_presets_are_named_when_made(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(MICRO, **change)
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads"):
        dataclasses.replace(MICRO.target, num_kv_heads=3)
    with pytest.raises(ValueError, match="hidden_size / num_heads = 36 / 4, must be even"):
        dataclasses.replace(MICRO.target, hidden_size=36, num_kv_heads=1)


def test_a_one_step_schedule():
    """One step (its warmup is the whole run) builds and updates: the cosine part once asked
    optax for zero decay steps."""
    optimizer = loop.make_optimizer(learning_rate=1e-3, steps=1, warmup_steps=0,
                                    weight_decay=0.1, grad_clip=1.0)
    params = {"w": jnp.ones((2, 2))}
    updates, _ = optimizer.update({"w": jnp.ones((2, 2))}, optimizer.init(params), params)
    # The first (here only) step learns at the full rate: Adam's first step moves each weight
    # by the rate, and decoupled weight decay by rate x 0.1 x w (at rate 0 it moved nothing,
    # and a one-step run exported its initialisation).
    np.testing.assert_allclose(np.asarray(updates["w"]), -1e-3 * 1.1, rtol=1e-4)
    # A longer run's first step warms up at rate / warmup_steps.
    optimizer = loop.make_optimizer(learning_rate=1e-3, steps=10, warmup_steps=4,
                                    weight_decay=0.0, grad_clip=1.0)
    updates, _ = optimizer.update({"w": jnp.ones((2, 2))}, optimizer.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["w"]), -1e-3 / 4, rtol=1e-4)


def test_a_draft_of_an_unfinished_target_says_so(tmp_path):
    """It said "no config.json" of a target still training (or stopped)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train.json").write_text('{"kind": "lm", "preset": "x", "steps": 9}')
    with pytest.raises(ValueError, match="is a training run that has not finished"):
        train_draft(tmp_path / "run", MICRO, tmp_path / "d", log=lambda _: None)
    assert not (tmp_path / "d").exists()


def test_draft_needs_a_tokenizer(hf_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        train_draft(hf_checkpoints("llama-gqa")[0], MICRO, tmp_path / "d")
    with pytest.raises(ValueError, match="objective"):
        train_draft(hf_checkpoints("llama-gqa")[0], MICRO, tmp_path / "d", objective="js")


def test_a_draft_is_not_trained_past_its_targets_positions(trained, tmp_path):
    """A preset of sequences longer than the target's positions is refused (the target ran,
    and the draft was trained, past them; the draft was exported claiming the shorter
    context), as train_lm refuses one longer than its own model's."""
    import shutil

    target = shutil.copytree(trained[0], tmp_path / "short")
    config = json.loads((target / "config.json").read_text())
    config["max_position_embeddings"] = MICRO.seq_len - 1
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"preset {MICRO.name}'s sequences of {MICRO.seq_len} "
                                         "tokens are longer than the target's"):
        train_draft(target, MICRO, tmp_path / "d", log=lambda _: None)
    assert not (tmp_path / "d").exists()


def test_a_draft_carries_its_targets_special_ids(trained, tmp_path):
    """A target whose bos, eos and pad ids are not all its end of text (an HF checkpoint's
    1, 2 and 0 say) gave a draft whose three ids were the end of text; the draft shares the
    target's tokenizer, and now its ids and tokenizer settings."""
    import shutil

    target = shutil.copytree(trained[0], tmp_path / "target",
                             ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((target / "config.json").read_text())
    config.update(bos_token_id=1, pad_token_id=0, eos_token_id=[config["eos_token_id"], 3])
    (target / "config.json").write_text(json.dumps(config))
    (target / "tokenizer_config.json").write_text(json.dumps({"padding_side": "left"}))
    train_draft(target, MICRO, tmp_path / "d", steps=1, log=lambda _: None)
    draft, wanted = jaxdec.load_pretrained(tmp_path / "d"), jaxdec.load_pretrained(target)
    assert (draft.config.bos_token_id, draft.config.pad_token_id, draft.config.eos_token_ids) \
        == (1, 0, wanted.config.eos_token_ids) and 3 in wanted.config.eos_token_ids
    assert draft.tokenizer_config["padding_side"] == "left"


def test_a_draft_resumes_only_against_the_target_it_started_with(trained, tmp_path):
    """A target retrained in place is another target: resuming its draft's run is refused
    (it continued, distilling the new target into a draft half trained on the old one). A
    tokenizer with more tokens than the target's vocabulary is refused before the run
    directory is made (ids past it were trained on, the loss NaN)."""
    import shutil

    target = shutil.copytree(trained[0], tmp_path / "target",
                             ignore=shutil.ignore_patterns("checkpoints"))
    first = train_draft(target, MICRO, tmp_path / "d", steps=2, log=lambda _: None)
    assert train_draft(target, MICRO, tmp_path / "d", steps=2, resume=True,
                       log=lambda _: None) == first
    # A record from before the digest resumes (against what the target is now).
    written = (tmp_path / "d" / "train.json").read_text()
    record = json.loads(written)
    del record["target_digest"]
    (tmp_path / "d" / "train.json").write_text(json.dumps(record))
    assert train_draft(target, MICRO, tmp_path / "d", steps=2, resume=True,
                       log=lambda _: None) == first
    (tmp_path / "d" / "train.json").write_text(written)
    model = jaxdec.load_pretrained(target)
    retrained = dataclasses.replace(model, params=jax.tree.map(lambda x: x * 1.01, model.params))
    jaxdec.save_pretrained(retrained, target, overwrite=True)
    with pytest.raises(ValueError, match=r"settings changed \(target_digest: \""):
        train_draft(target, MICRO, tmp_path / "d", steps=2, resume=True, log=lambda _: None)

    model.tokenizer.add_tokens([f"<extra{i}>" for i in range(3)])
    words = model.tokenizer.get_vocab_size(with_added_tokens=True)
    model.tokenizer.save(str(target / "tokenizer.json"))
    with pytest.raises(ValueError, match=f"tokenizer has {words} tokens, more than its "
                                         f"config.json's vocab_size={words - 3}"), \
            pytest.warns(UserWarning, match="its tokenizer has .* more than config.json's"):
        train_draft(target, MICRO, tmp_path / "e", steps=2, log=lambda _: None)
    assert not (tmp_path / "e").exists()


def test_a_draft_never_runs_in_its_targets_directory(trained):
    """Starting a draft's run over (force) deletes its directory: one that holds the target
    (the target's own, or a parent of it) is refused before anything is read or written."""
    target = trained[0]
    before = sorted(os.listdir(target))
    for out in (target, os.path.dirname(target)):
        with pytest.raises(ValueError, match="holds the target"):
            train_draft(target, MICRO, out, force=True, log=lambda _: None)
    # Both given from `~` (out was expanded, the target not: the run deleted the target).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", os.path.dirname(target))
        with pytest.raises(ValueError, match="holds the target"):
            train_draft(f"~/{os.path.basename(target)}", MICRO,
                        f"~/{os.path.basename(target)}", force=True, log=lambda _: None)
    assert sorted(os.listdir(target)) == before


def test_cli_wiring(monkeypatch, tmp_path, capsys):
    from jaxdec import cli, train

    calls = []
    monkeypatch.setattr(train, "train_lm", lambda *a, **k: calls.append(("lm", a, k)))
    monkeypatch.setattr(train, "train_draft", lambda *a, **k: calls.append(("draft", a, k)))
    assert cli.main(["train", "lm", "--preset", "cpu-tiny", "--out", "o", "--steps", "5",
                     "--resume"]) == 0
    assert cli.main(["train", "draft", "--target", "t", "--preset", "gpu-small", "--out", "d",
                     "--objective", "kl", "--force"]) == 0
    assert calls[0] == ("lm", ("cpu-tiny", "o"), dict(corpus=None, steps=5, resume=True,
                                                     force=False, seed=0, dp=None))
    assert calls[1][0] == "draft" and calls[1][1] == ("t", "gpu-small", "d")
    assert calls[1][2]["objective"] == "kl" and calls[1][2]["force"]
    with pytest.raises(SystemExit):
        cli.main(["train", "lm", "--preset", "cpu-tiny", "--out", "o", "--resume", "--force"])
    monkeypatch.undo()
    assert cli.main(["train", "lm", "--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "valid presets" in capsys.readouterr().err
