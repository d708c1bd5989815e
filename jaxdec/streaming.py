"""Text as it is produced: a `stream` for `generate` and `speculative_generate`.

    stream = jaxdec.TextStream(model.tokenizer)          # prints row 0's text
    result = jaxdec.speculative_generate(model, drafter, [ids], max_new_tokens=64,
                                         stream=stream)
    stream.close()                                       # anything still held back

A new `TextStream` per call costs no compile (the program carries a number for its stream).
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

import numpy as np

from jaxdec.checks import check_int


def continuation(tokenizer, context, tokens) -> str:
    """The text of `tokens` continuing `context` (ids shown before them): what a `TextStream`
    with that context writes in all (a SentencePiece decoder would drop the leading space of
    `tokens` decoded alone)."""
    lead = [int(t) for t in np.asarray(context).reshape(-1)[-TextStream.CONTEXT_TOKENS:]]
    before, after = tokenizer.decode(lead), tokenizer.decode(lead + list(tokens))
    return after[len(before):] if after.startswith(before) else tokenizer.decode(list(tokens))


class TextStream:
    """Decodes one row's tokens as they arrive and hands the new text to `write` (by default
    printed to `file`, or stdout, and flushed).

    Takes both loops' callbacks: `generate`'s (step, tokens [B], active [B]) and
    `speculative_generate`'s (step, tokens [B, D + 1], counts [B]). Steps are put back in
    order (on a multi-device mesh the callbacks may come out of order). A piece whose text
    ends inside a character (an incomplete UTF-8 sequence decodes to U+FFFD) waits for the
    next one; `close()` writes what is still held back. Each step decodes a few tokens, not
    the whole row: the new text is the difference between decoding from the last piece's
    first token with and without the new tokens (so a decoder that treats a sequence's first
    token specially, as SentencePiece does its leading space, sees the same start both times).
    A stream passed to several calls in turn continues its text with each (a call's steps
    count from 0 again: jaxdec's calls tell it when one ends, `call_finished`).

    Args:
      tokenizer: anything with `decode(ids) -> str` (a `tokenizers.Tokenizer`, a model's
        `.tokenizer`).
      row: the batch row to show.
      write: called with each new piece of text (default: print it to `file`).
      file: where the default `write` prints (default: sys.stdout).
      context: the ids the text continues (the row's prompt), when it is shown before it: the
        first piece is then decoded after them (a SentencePiece decoder drops the leading
        space of a text's first word: "hello" + "world" where the whole reads "hello
        world"). None: the text stands alone (a chat's reply).
    """

    # Context tokens the first piece is decoded after (enough for a decoder's look-behind).
    CONTEXT_TOKENS = 4

    def __init__(self, tokenizer, *, row: int = 0, write: Callable[[str], object] | None = None,
                 file: TextIO | None = None, context=None):
        if not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(f"tokenizer must have a decode(ids) method, got {tokenizer!r}")
        self.tokenizer, self.row = tokenizer, check_int("row", row, minimum=0)
        ids = np.zeros((0,), np.int32) if context is None else (
            None if isinstance(context, (str, bytes)) else np.asarray(context))
        if ids is None or ids.size and (ids.dtype == bool
                                        or not np.issubdtype(ids.dtype, np.integer)):
            raise TypeError(f"context must be token ids (the prompt's), got {context!r:.60}")
        self._context = [int(t) for t in ids.reshape(-1)[-self.CONTEXT_TOKENS:]]
        if write is not None and not callable(write):
            raise TypeError(f"write must be callable (it gets each new piece of text), got "
                            f"{write!r:.60}")
        self._write = write or (lambda text: print(text, end="", flush=True,
                                                   file=file or sys.stdout))
        self.tokens: list[int] = []  # the row's tokens so far, in order
        self.text = ""  # the text written so far
        self._start = self._shown = 0  # the decoded window's first token; tokens written
        self._pending: dict[int, list[int]] = {}
        self._next_step = 0

    def __call__(self, step, tokens, counts) -> None:
        tokens, counts = np.asarray(tokens), np.asarray(counts)
        if self.row >= tokens.shape[0]:
            raise ValueError(f"TextStream(row={self.row}) shows a row of a batch of "
                             f"{tokens.shape[0]}")
        if tokens.ndim == 1:  # generate: one token, kept while the row is active
            new = [int(tokens[self.row])] if counts[self.row] else []
        else:
            new = tokens[self.row, : int(counts[self.row])].tolist()
        step = int(step)
        if step < self._next_step:  # a later call's step (under your own jit, where no call
            self._next_step = 0     # tells it one ended)
        self._pending[step] = new
        while self._next_step in self._pending:
            self.tokens += self._pending.pop(self._next_step)
            self._next_step += 1
        self._show()

    def call_finished(self) -> None:
        """A call's steps have all arrived (`generate` and `speculative_generate` call this
        when they return): anything still waiting for an earlier step is taken in step
        order, and the next call's steps count from 0."""
        self._take_waiting()
        self._next_step = 0
        self._show()

    def close(self) -> None:
        """Writes what is still held back (text ending inside a character, steps still out of
        order)."""
        self._take_waiting()
        self._show(last=True)

    def _take_waiting(self) -> None:
        """The steps still waiting for an earlier one, taken in step order."""
        for step in sorted(self._pending):
            self.tokens += self._pending.pop(step)

    def _show(self, last: bool = False) -> None:
        # The window of the first piece's tokens is decoded after the context too.
        lead = self._context if self._start == 0 else []
        before = self.tokenizer.decode(lead + self.tokens[self._start:self._shown])
        after = self.tokenizer.decode(lead + self.tokens[self._start:])
        if len(after) > len(before) and (last or not after.endswith("\ufffd")):
            piece = after[len(before):]
            self._write(piece)
            self.text += piece
            self._start, self._shown = self._shown, len(self.tokens)
