"""Corpora, the held-out split, the byte-level tokenizer and sequence packing."""

import os

import numpy as np
import pytest

from jaxdec import data


def _write(root, files):
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def test_stdlib_corpus_split():
    corpus = data.load_corpus()
    n = len(corpus.train_files) + len(corpus.heldout_files)
    assert n > 500 and all(f.endswith(".py") for f in corpus.train_files)
    assert not any("site-packages" in f for f in corpus.train_files + corpus.heldout_files)
    assert len(corpus.heldout_files) >= 0.02 * n
    assert not set(corpus.heldout_files) & set(corpus.train_files)
    # Deterministic, and a byte budget keeps the held-out set unchanged.
    small = data.load_corpus(max_train_bytes=100_000)
    assert small.heldout_files == corpus.heldout_files
    last = len(small.train_texts[-1].encode("utf-8"))
    assert small.train_bytes - last < 100_000 <= small.train_bytes
    assert small.train_files == corpus.train_files[: len(small.train_files)]


def test_directory_corpus_skips_unreadable_files(tmp_path):
    files = {f"doc{i}.txt": f"text number {i}\n" for i in range(60)}
    files.update({"binary.bin": b"\x00\x01\x02\xff" * 10, "latin1.txt": "caf\xe9".encode("latin-1"),
                  "empty.txt": "   \n", "sub/deep.md": "# nested file\n"})
    _write(tmp_path, files)
    corpus = data.load_corpus(tmp_path)
    names = {os.path.relpath(f, tmp_path) for f in corpus.train_files + corpus.heldout_files}
    assert names == {f"doc{i}.txt" for i in range(60)} | {"sub/deep.md"}
    assert len(corpus.heldout_files) == 2  # ceil(2% of 61)
    again = data.load_corpus(tmp_path)
    assert again.heldout_files == corpus.heldout_files


def test_odd_entries_in_a_corpus(tmp_path, monkeypatch):
    """A name that is not UTF-8 is read (its held-out key failed to encode), a named pipe is
    not opened (reading it waited for a writer for ever), and a directory that cannot be
    listed is named in a warning (it dropped out of the corpus silently)."""
    files = {f"doc{i}.txt": f"text number {i}\n" for i in range(4)}
    files["locked/secret.txt"] = "unseen\n"
    _write(tmp_path, files)
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.txt")  # (Latin-1 bytes)
    with open(odd, "w") as f:
        f.write("a latin-1 name\n")
    os.mkfifo(tmp_path / "pipe.txt")
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.warns(UserWarning, match=r"skipped .*locked \(it cannot be listed: "
                                         r"Permission denied\)") as caught:
        corpus = data.load_corpus(tmp_path)
    assert caught[0].filename == __file__
    names = {os.path.relpath(f, tmp_path) for f in corpus.train_files + corpus.heldout_files}
    assert names == {f"doc{i}.txt" for i in range(4)} | {os.fsdecode(b"caf\xe9.txt")}


def test_short_heldout_files_make_way_for_more(tmp_path):
    """With `min_chars` the held-out set grows, in path-hash order, until it holds that much
    text (the files first picked may be one-liners); a corpus too small for both sides is
    refused."""
    files = {f"doc{i}.txt": ("x" * 10 if i % 2 else "y" * 400) for i in range(60)}
    _write(tmp_path, files)
    first = data.load_corpus(tmp_path)
    grown = data.load_corpus(tmp_path, min_chars=1000)
    assert grown.heldout_files[: len(first.heldout_files)] == first.heldout_files
    held = sum(len(t) for t in grown.heldout_texts)
    assert held >= 1000 > held - len(grown.heldout_texts[-1])  # no more files than needed
    assert set(grown.train_files) == set(first.train_files) - set(grown.heldout_files)
    with pytest.raises(ValueError, match=r"is too small: its 60 files hold 12300 characters"):
        data.load_corpus(tmp_path, min_chars=7000)


def test_extra_dirs_only_add_training_files(tmp_path):
    _write(tmp_path / "main", {f"m{i}.txt": f"main {i}" for i in range(10)})
    _write(tmp_path / "extra", {"a.py": "x = 1\n", "b.py": "y = 2\n", "skip.txt": "not python"})
    corpus = data.load_corpus(tmp_path / "main", extra_dirs=(str(tmp_path / "extra"),))
    main, extra_dir = str(tmp_path / "main"), str(tmp_path / "extra")
    assert all(f.startswith(main) for f in corpus.heldout_files)
    extra = [os.path.basename(f) for f in corpus.train_files if f.startswith(extra_dir)]
    assert sorted(extra) == ["a.py", "b.py"]


@pytest.mark.parametrize("files,match", [
    ({}, "no readable text files"),
    ({"a.bin": b"\x00\xff\x00", "latin.txt": "caf\xe9".encode("latin-1")},
     r"no readable text files \(of its 2 files none is UTF-8 text with something besides "
     r"whitespace and no NUL bytes\)"),
    ({"empty.txt": "", "blank.txt": " \n\t\n"}, r"of its 2 files none is UTF-8 text with"),
    ({"only.txt": "one file"}, "at least 2 readable files"),
])
def test_bad_corpora(tmp_path, files, match):
    _write(tmp_path, files)
    with pytest.raises(ValueError, match=match):
        data.load_corpus(tmp_path)


def test_missing_corpus_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.load_corpus(tmp_path / "nope")
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(ValueError, match="a.txt is a file: give a directory"):
        data.load_corpus(tmp_path / "a.txt")


def test_byte_level_tokenizer_round_trips_anything():
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 20
    tokenizer = data.train_tokenizer(texts, 300)
    assert tokenizer.get_vocab_size() <= 300
    assert data.end_of_text_id(tokenizer) == 0
    for text in ["def g(y):  # unseen ✓ ünïcode\n\treturn {'k': [1, 2]}", "\x01\x7f"]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    with pytest.raises(ValueError, match="needs at least 258 entries"):
        data.train_tokenizer(texts, 100)


def test_tokenizer_trains_on_an_evenly_spaced_sample():
    """Beyond `sample_chars`, every k-th text: with texts alternating between two words and a
    budget of half of them, only the first word's merges are learnt."""
    texts = ["xyzw " * 40, "qkjv " * 40] * 10
    sampled = data.train_tokenizer(texts, 300, sample_chars=sum(map(len, texts)) // 2)
    assert len(sampled.encode("xyzw").ids) == 1 and len(sampled.encode("qkjv").ids) > 1
    full = data.train_tokenizer(texts, 300, sample_chars=None)
    assert len(full.encode("xyzw").ids) == len(full.encode("qkjv").ids) == 1


def test_encode_separates_documents():
    tokenizer = data.train_tokenizer(["ab cd"] * 10, 280)
    stream = data.encode(tokenizer, ["ab", "cd"])
    eot = data.end_of_text_id(tokenizer)
    assert stream.dtype == np.int32 and stream[-1] == eot
    assert list(stream).count(eot) == 2
    assert tokenizer.decode([t for t in stream.tolist() if t != eot]) == "abcd"
    # The fast batch encoder (no offsets) gives the ids the plain one gives.
    texts = ["def f(x):\n    return x  # café", "ab cd ab", ""]
    slow = [t for e in tokenizer.encode_batch(texts, add_special_tokens=False)
            for t in [*e.ids, eot]]
    assert data.encode(tokenizer, texts).tolist() == slow


def test_a_tokenizer_saved_with_truncation_and_padding_neither_cuts_nor_pads(tmp_path):
    """tokenizer.json may carry truncation and padding (tokenizers saves them): transformers
    applies them only to calls asking for them, so jaxdec's encodes never do, and the
    caller's tokenizer keeps its settings."""
    from jaxdec.checkpoint import load_tokenizer

    tokenizer = data.train_tokenizer(["ab cd ef gh"] * 10, 280)
    eot = data.end_of_text_id(tokenizer)
    text = "ab cd ef gh " * 4
    full = tokenizer.encode(text, add_special_tokens=False).ids
    tokenizer.enable_truncation(max_length=4)
    tokenizer.enable_padding(length=64, pad_id=eot, pad_token="<|endoftext|>")
    stream = data.encode(tokenizer, [text, "ab"])
    assert stream.tolist() == full + [eot] + tokenizer.encode("ab").ids[:1] + [eot]
    assert tokenizer.truncation is not None and tokenizer.padding is not None
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(str(tmp_path)).encode(text, add_special_tokens=False).ids == full


def test_encode_reuses_the_latest_streams():
    """A draft distilled after its target encodes the same corpus with the same tokenizer:
    the stream is reused (and read-only); other texts or another tokenizer are encoded."""
    tokenizer = data.train_tokenizer(["ab cd ef"] * 10, 280)
    first = data.encode(tokenizer, ["ab", "cd"])
    assert data.encode(tokenizer, ("ab", "cd")) is first and not first.flags.writeable
    assert data.encode(tokenizer, ["ab", "ce"]) is not first
    assert data.encode(tokenizer, ["abc", "d"]) is not first  # same characters, other texts
    other = data.train_tokenizer(["ab cd ef"] * 10, 270)
    assert data.encode(other, ["ab", "cd"]) is not first
    held = data.encode(tokenizer, ["ef"])
    data.encode(tokenizer, ["cd", "ab"])  # a third stream: only the latest two are kept
    assert data.encode(tokenizer, ["ef"]) is held
    assert data.encode(tokenizer, ["ab", "cd"]) is not first
    np.testing.assert_array_equal(data.encode(tokenizer, ["ab", "cd"]), first)


def test_encode_from_several_threads():
    """Its kept streams are shared by the process's threads (their reads and evictions raced:
    "dictionary changed size during iteration", KeyError)."""
    import concurrent.futures
    import sys

    from hf_models import make_tokenizer

    tokenizer = make_tokenizer()
    corpora = [[f"the quick brown fox {i} jumps over the lazy dog {j}" for j in range(3)]
               for i in range(8)]
    want = [data.encode(tokenizer, corpus).copy() for corpus in corpora]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: the race failed ~1 call in 250
    try:
        for _ in range(80):  # threads starting together, each time
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                got = list(pool.map(lambda i: data.encode(tokenizer, corpora[i % 8]), range(32)))
            for i, stream in enumerate(got):
                np.testing.assert_array_equal(stream, want[i % 8])
    finally:
        sys.setswitchinterval(interval)


def test_pack_hand_computed():
    packed = data.pack(np.arange(10, dtype=np.int32), 3)
    np.testing.assert_array_equal(packed, [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]])
    with pytest.raises(ValueError, match="do not fill one sequence"):
        data.pack(np.arange(3), 3)
