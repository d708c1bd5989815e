"""`jaxdec.TextStream`: one row's text as the loops produce it, in step order, whole
characters only, decoding a few tokens a step."""

import numpy as np
import pytest

import jaxdec
from jaxdec import TextStream
from jaxdec.drafters import PromptLookup


class Bytes:
    """A tokenizer whose tokens are UTF-8 bytes."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_steps_out_of_order_and_characters_split_between_steps():
    """Callbacks out of step order (a multi-device mesh) and characters split between
    steps: the text comes out in order, never with a replacement character."""
    text = "añb€c"
    ids = list(text.encode())  # a, 2 bytes, b, 3 bytes, c
    pieces, written = [ids[0:2], ids[2:5], ids[5:7], ids[7:8]], []
    stream = TextStream(Bytes(), write=written.append)
    for step in (1, 0, 3, 2):  # speculative_generate's form: tokens [1, 3] and a count
        piece = pieces[step]
        stream(step, np.array([piece + [0] * (3 - len(piece))]), np.array([len(piece)]))
        assert "\ufffd" not in "".join(written)
    assert "".join(written) == stream.text == text and stream.tokens == ids
    stream.close()
    assert "".join(written) == text  # nothing was held back


def test_one_row_of_generates_form(capsys):
    """generate's form (a token and an active flag per row), row 1 of 2; a character cut
    off at the end is written by close()."""
    ids = list("x€".encode())[:-1]  # ends inside "€"
    stream = TextStream(Bytes(), row=1)
    for step, token in enumerate(ids):
        stream(step, np.array([0, token]), np.array([False, True]))
    stream(len(ids), np.array([0, 0]), np.array([True, False]))  # row 1 has stopped
    assert capsys.readouterr().out == "x"
    stream.close()
    assert capsys.readouterr().out == "\ufffd" and stream.text == Bytes().decode(ids)


def test_a_decoder_that_strips_the_first_space():
    """SentencePiece-style decoding drops the leading space of a sequence's first token: the
    pieces still add up to the whole row decoded at once."""
    pieces = ["\u2581the", "\u2581qu", "ick", "\u2581brown", "\u2581", "fox", "."]

    class Metaspace:
        def decode(self, ids):
            return "".join(pieces[i] for i in ids).replace("\u2581", " ").lstrip(" ")

    ids = [0, 1, 2, 3, 4, 5, 6, 1, 2]
    written = []
    stream = TextStream(Metaspace(), write=written.append)
    for step, token in enumerate(ids):
        stream(step, np.array([token]), np.array([True]))
    stream.close()
    assert "".join(written) == Metaspace().decode(ids)


def test_a_continuation_shown_after_its_prompt_keeps_its_leading_space():
    """With the prompt's ids as context the first word's space stays ("hello world", where
    the CLI printed the prompt and then "world"); the pieces add up to the whole decoded
    after the prompt, as `continuation` gives it, also when the steps bring several tokens."""
    from jaxdec.streaming import continuation

    pieces = ["\u2581hello", "\u2581world", "\u2581of", "\u2581f", "ast", "<s>"]

    class Metaspace:
        def decode(self, ids):
            return "".join(pieces[i] for i in ids if i != 5).replace("\u2581", " ").lstrip(" ")

    prompt, new = [5, 0], [1, 2, 3, 4]
    whole = Metaspace().decode(prompt + new)
    assert whole == "hello world of fast"
    assert continuation(Metaspace(), prompt, new) == " world of fast"
    for chunks in ([[t] for t in new], [new[:3], new[3:]]):
        written = []
        stream = TextStream(Metaspace(), write=written.append, context=prompt)
        for step, chunk in enumerate(chunks):
            stream(step, np.array([chunk + [0] * (3 - len(chunk))]), np.array([len(chunk)]))
        stream.close()
        assert "hello" + "".join(written) == whole
    alone = TextStream(Metaspace(), write=written.append)  # a reply standing alone
    written.clear()
    alone(0, np.array([new[:1]]), np.array([1]))
    assert written == ["world"]


def test_with_both_loops(tokenized_checkpoint):
    """A new TextStream per call: each shows its own call's text, the row's decoded output."""
    model = jaxdec.load_pretrained(tokenized_checkpoint)
    ids = model.tokenizer.encode("hello the fox").ids
    for run in (jaxdec.generate, lambda *a, **k: jaxdec.speculative_generate(
            a[0], PromptLookup(), *a[1:], **k)):
        for prompt in (ids, ids[:2]):
            written = []
            stream = TextStream(model.tokenizer, write=written.append)
            result = run(model, [prompt], max_new_tokens=12, stream=stream)
            stream.close()
            assert "".join(written) == model.tokenizer.decode(result.to_lists()[0])


def test_one_stream_over_several_calls():
    """A stream given to a second call (its steps count from 0 again, here out of order)
    continues the text (a character split between the calls comes out whole)."""
    first, second = list("añ".encode())[:-1], list("ñb€".encode())[1:]  # ñ split between
    written = []
    stream = TextStream(Bytes(), write=written.append)
    for step, token in enumerate(first):
        stream(step, np.array([token]), np.array([True]))
    for step in (1, 0, *range(2, len(second))):
        stream(step, np.array([second[step]]), np.array([True]))
    stream.close()
    assert stream.tokens == first + second
    assert "".join(written) == stream.text == "añb€"


@pytest.mark.parametrize("first, second, order", [("a", "cde", (1, 0, 2)),
                                                  ("ab", "cdef", (2, 0, 1, 3))])
def test_a_call_ends_the_steps_of_the_one_before(first, second, order):
    """On a mesh a second call's step can arrive before its step 0, with a number the first
    call also reached: without the end of the first call told (`call_finished`, which
    jaxdec's calls send) it was taken as the first call's, and text came out reordered or
    lost ('adc' for 'acde')."""
    written = []
    stream = TextStream(Bytes(), write=written.append)
    for step, char in enumerate(first):
        stream(step, np.array([ord(char)]), np.array([True]))
    stream.call_finished()
    for step in order:
        stream(step, np.array([ord(second[step])]), np.array([True]))
    stream.call_finished()
    stream.close()
    assert "".join(written) == first + second


def test_jaxdec_calls_tell_a_stream_when_they_end(loaded):
    model = loaded("llama-gqa")
    events = []

    class Recorder:
        def __call__(self, step, tokens, active):
            events.append(int(step))

        def call_finished(self):
            events.append("end")

    with pytest.raises(ValueError, match=r"TextStream\(row=3\) shows a row of a batch of 1"):
        jaxdec.generate(model, [[5, 9, 2]], max_new_tokens=3,
                        stream=TextStream(Bytes(), row=3))
    jaxdec.generate(model, [[5, 9, 2]], max_new_tokens=3, stream=Recorder())
    jaxdec.speculative_generate(model, jaxdec.drafters.PromptLookup(), [[5, 9, 2]],
                                max_new_tokens=3, stream=Recorder())
    assert events.count("end") == 2 and events[:4] == [0, 1, 2, "end"] and events[-1] == "end"


def test_bad_arguments():
    with pytest.raises(TypeError, match="decode"):
        TextStream(object())
    for row in (-1, 1.0, "1", True):
        with pytest.raises(ValueError, match="row must be an int >= 0"):
            TextStream(Bytes(), row=row)
    assert type(TextStream(Bytes(), row=np.int64(1)).row) is int  # a numpy row index: taken
    # A context of text (a digit string was read as one id) or of floats (truncated)
    for context in ("hello", "123", [1.9, 2.7]):
        with pytest.raises(TypeError, match="context must be token ids"):
            TextStream(Bytes(), context=context)
    assert TextStream(Bytes(), context=[]).tokens == []
    with pytest.raises(TypeError, match="write must be callable"):  # (not at the first step)
        TextStream(Bytes(), write="out.txt")
