"""`jaxdec demo` end to end with the micro preset: trains once, reuses the cached models,
resumes an interrupted training, prints the table and the held-out perplexity."""

import os

import pytest

from jaxdec import demo
from jaxdec.train import presets
from train_presets import MICRO


@pytest.fixture
def micro(monkeypatch):
    monkeypatch.setitem(presets.PRESETS, MICRO.name, MICRO)
    return MICRO.name


def test_demo_trains_once_then_reuses(micro, tmp_path):
    lines = []
    figures = demo.run_demo(preset=micro, home=str(tmp_path), max_new_tokens=8, num_prompts=2,
                            prompt_tokens=16, log=lines.append)
    text = "\n".join(lines)
    assert "training the test-micro demo target" in text and "distilling" in text
    assert "| plain decoding (greedy) |" in text and "held-out perplexity" in text
    assert figures["heldout_ppl"] > 1 and figures["methods"][0]["tokens_per_s"] > 0
    names = [m["method"] for m in figures["methods"]]
    assert names[1:] == ["draft model, chain(4)", "draft model, tree (8 nodes)",
                         "draft model, dynamic tree (16 nodes)", "prompt lookup",
                         "retrieval (training corpus)"]
    for method in figures["methods"]:  # greedy speculative decoding changes nothing
        assert method["same_tokens"] and method["mean_accepted"] >= 1
    assert figures["tokens"].shape == (2, 8)
    assert ">>>" in text and figures["sample"]["prompt"] in text

    lines.clear()
    again = demo.run_demo(preset=micro, home=str(tmp_path), max_new_tokens=8, num_prompts=2,
                          prompt_tokens=16, log=lines.append)
    assert not any(line.startswith(("training the", "distilling the")) for line in lines)
    assert (again["tokens"] == figures["tokens"]).all()


def test_demo_resumes_an_interrupted_training(micro, tmp_path, monkeypatch):
    target = os.path.join(str(tmp_path), "demo", micro, "target")
    calls = []
    real = demo.train_lm

    def interrupted_once(preset, out, resume, log):
        calls.append(resume)
        if len(calls) == 1:
            os.makedirs(out)
            open(os.path.join(out, "train.json"), "w").write(
                '{"kind": "lm", "preset": "earlier", "steps": 1}')
            raise demo.loop.Interrupted("train lm interrupted; ...: rerun with --resume", 40)
        return real(preset, out, resume=resume, log=log)

    monkeypatch.setattr(demo, "train_lm", interrupted_once)
    # The advice is the demo's (the demo has no --resume: it resumes when run again).
    with pytest.raises(demo.loop.Interrupted, match="the demo's training was interrupted; the "
                       "checkpoint at step 40 is intact: run jaxdec demo again to continue"):
        demo.ensure_demo_models(micro, str(tmp_path), log=lambda _: None)
    assert os.path.exists(target)
    # It resumes (and checks) it; a cache it cannot continue says how to start afresh.
    with pytest.raises(ValueError, match="run settings changed.*the demo's models in .*: "
                                         "delete that directory to train them afresh"):
        demo.ensure_demo_models(micro, str(tmp_path), log=lambda _: None)
    assert calls == [False, True]
    with pytest.raises(ValueError, match="max_new_tokens must be >= 2"):
        demo.run_demo(preset=micro, home=str(tmp_path), max_new_tokens=1)


def test_home_and_preset_defaults(monkeypatch):
    monkeypatch.setenv("JAXDEC_HOME", "/somewhere")
    assert demo.jaxdec_home() == "/somewhere"
    monkeypatch.delenv("JAXDEC_HOME")
    assert demo.jaxdec_home().endswith(os.path.join(".cache", "jaxdec"))
    assert demo.default_preset() == "cpu-tiny"


def test_a_continuation_past_the_models_positions_is_refused_before_training(micro, tmp_path,
                                                                             monkeypatch):
    """(It was refused by generate, after minutes of training.)"""
    monkeypatch.setattr(demo, "ensure_demo_models", lambda *a: pytest.fail("trained"))
    with pytest.raises(ValueError, match=f"max_new_tokens=300 \\+ the demo's 48-token prompts "
                                         f"exceed the {micro} models' 256 positions"):
        demo.run_demo(preset=micro, home=str(tmp_path), max_new_tokens=300, log=lambda _: None)
