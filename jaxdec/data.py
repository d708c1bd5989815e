"""Training data from an offline corpus: by default the running interpreter's own standard
library sources, which every Python installation carries.

- `load_corpus` lists the files (the standard library's `.py` files, or every readable text
  file under a directory), splits them deterministically by file into train and held-out
  sets, and reads them.
- `train_tokenizer` trains a byte-level BPE `tokenizers.Tokenizer` on the training texts.
- `encode` turns texts into one token stream (documents separated by the end-of-text token);
  `pack` cuts the stream into fixed-length training sequences.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sysconfig
import threading

import numpy as np

END_OF_TEXT = "<|endoftext|>"
HELDOUT_FRACTION = 0.02


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Texts split by file. `heldout_*` files are never trained on."""

    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]
    train_texts: tuple[str, ...]
    heldout_texts: tuple[str, ...]

    @property
    def train_bytes(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.train_texts)


def stdlib_dir() -> str:
    """The running interpreter's standard library directory."""
    return sysconfig.get_paths()["stdlib"]


def site_packages_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


def _walk(root: str, suffix: str | None, skip_dirs: set[str]) -> list[str]:
    """The regular files under `root` (links to them too; not named pipes or devices, whose
    reads wait for a writer), in path order, with `suffix` where given; hidden directories,
    `skip_dirs` and links to directories are not entered, and a directory that cannot be
    listed is skipped with a warning naming it."""
    from jaxdec.checks import warn_caller

    def unlisted(error: OSError) -> None:
        warn_caller(f"skipped {error.filename} (it cannot be listed: {error.strerror})")

    found = []
    for directory, subdirs, files in os.walk(root, onerror=unlisted):
        subdirs[:] = sorted(d for d in subdirs if d not in skip_dirs and not d.startswith("."))
        found += [path for f in sorted(files) if suffix is None or f.endswith(suffix)
                  if os.path.isfile(path := os.path.join(directory, f))]
    return found


def _file_key(path: str, root: str) -> str:
    """A stable pseudo-random sort key: the hash of the path relative to its corpus root (a
    name's bytes that are not UTF-8 as they are)."""
    relative = os.path.relpath(path, root).encode("utf-8", "surrogateescape")
    return hashlib.sha1(relative).hexdigest()


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.strip() and "\x00" not in text else None


def split_heldout(files: list[str], root: str, fraction: float = HELDOUT_FRACTION, *,
                  sizes: dict[str, int] | None = None, min_chars: int = 0):
    """(train, heldout): the `ceil(fraction * n)` files (at least one) with the smallest path
    hashes are held out, and more in the same order until they hold `min_chars` characters
    (`sizes`: each file's; a few short files picked by their hashes would otherwise hold too
    little to evaluate on). Deterministic, and independent of which machine lists the files.
    A ValueError when the files left to train on hold fewer than `min_chars`."""
    if not 0 < fraction < 1:
        raise ValueError(f"heldout fraction must be in (0, 1), got {fraction}")
    if len(files) < 2:
        raise ValueError(f"the corpus needs at least 2 readable files to hold one out, got {len(files)}")
    ordered = sorted(files, key=lambda f: _file_key(f, root))
    n_heldout = max(1, math.ceil(fraction * len(files)))
    if min_chars:
        held = sum(sizes[f] for f in ordered[:n_heldout])
        while held < min_chars and n_heldout < len(ordered) - 1:
            held += sizes[ordered[n_heldout]]
            n_heldout += 1
        left = sum(sizes[f] for f in ordered[n_heldout:])
        if held < min_chars or left < min_chars:
            raise ValueError(f"the corpus {root} is too small: its {len(files)} files hold "
                             f"{held + left} characters, and its held-out and training files "
                             f"need at least {min_chars} each")
    return ordered[n_heldout:], ordered[:n_heldout]


def check_corpus_dir(root: str, name: str, *, texts: bool = False) -> None:
    """A ValueError, saying `name` (how the caller calls the corpus), unless `root` is a
    directory (with `texts`: one holding a readable text file, found without reading the
    rest)."""
    if not os.path.isdir(root):
        raise ValueError(f"{name} is a file: give a directory of text files"
                         if os.path.exists(root) else f"{name} does not exist")
    if texts and not any(_read_text(f) is not None for f in _walk(root, None, {"__pycache__"})):
        raise ValueError(f"{name} has no readable text files (none is UTF-8 text with "
                         "something besides whitespace and no NUL bytes)")


def read_texts(corpus: str | os.PathLike | None = None) -> tuple[str, dict[str, str]]:
    """(the corpus's root, {path: text} of its files, in path order): every file under
    `corpus` readable as UTF-8 text, or the interpreter's standard-library `.py` files
    (site-packages excluded) for None. A ValueError when there are none."""
    if corpus is None:
        root = stdlib_dir()
        files = _walk(root, ".py", {"site-packages", "dist-packages", "__pycache__"})
    else:
        root = os.path.expanduser(os.fspath(corpus))
        check_corpus_dir(root, f"corpus {root}")
        files = _walk(root, None, {"__pycache__"})
    texts = {f: t for f in sorted(files) if (t := _read_text(f)) is not None}
    if not texts:
        raise ValueError(f"the corpus {root} has no readable text files (of its {len(files)} "
                         "files none is UTF-8 text with something besides whitespace and no "
                         "NUL bytes)")
    return root, texts


def load_corpus(
    corpus: str | os.PathLike | None = None,
    *,
    extra_dirs: tuple[str, ...] = (),
    max_train_bytes: int | None = None,
    heldout_fraction: float = HELDOUT_FRACTION,
    min_chars: int = 0,
) -> Corpus:
    """Lists, splits and reads a corpus.

    Args:
      corpus: a directory of text files (every file readable as UTF-8 text counts; hidden
        directories and links to directories are not entered), or None
        for the interpreter's standard-library `.py` files (site-packages excluded).
      extra_dirs: more directories whose `.py` files join the training set only (e.g. the
        site-packages sources on accelerators); the held-out files come from `corpus` alone.
      max_train_bytes: keep training files (in path-hash order) up to about this many bytes.
      min_chars: the least characters the held-out files, and the training files, hold (more
        files are held out where the first picked are short; see `split_heldout`).
    Returns:
      A Corpus; raises ValueError when no readable files are found.
    """
    root, texts = read_texts(corpus)
    train, heldout = split_heldout(sorted(texts), root, heldout_fraction,
                                   sizes={f: len(t) for f, t in texts.items()},
                                   min_chars=min_chars)
    train = sorted(train, key=lambda f: _file_key(f, root))
    for directory in extra_dirs:
        extra = _walk(directory, ".py", {"__pycache__"})
        extra = sorted(extra, key=lambda f: _file_key(f, directory))
        texts.update({f: t for f in extra if f not in texts and (t := _read_text(f)) is not None})
        train += [f for f in extra if f in texts and f not in heldout]
    if max_train_bytes is not None:
        kept, size = [], 0
        for f in train:
            if size >= max_train_bytes:
                break
            kept.append(f)
            size += len(texts[f].encode("utf-8"))
        train = kept
    return Corpus(
        train_files=tuple(train), heldout_files=tuple(heldout),
        train_texts=tuple(texts[f] for f in train), heldout_texts=tuple(texts[f] for f in heldout),
    )


# A tokenizer trains on at most about this many characters of the corpus: an evenly spaced
# sample of its texts. On the gpu presets' ~100 MB corpus (two CPU cores, 8192 tokens): 3.8 s
# instead of 27 s, for 3.5% more tokens per byte on a sample of the training files (3.37 bytes
# per token against 3.49) and 0.6% more on the held-out files (3.36 against 3.38).
TOKENIZER_SAMPLE_CHARS = 16 * 2**20


# The smallest byte-level vocabulary: the 256 bytes, END_OF_TEXT and one merge.
MIN_VOCAB_SIZE = 258


def train_tokenizer(texts, vocab_size: int, *, sample_chars: int | None = TOKENIZER_SAMPLE_CHARS):
    """A byte-level BPE tokenizer (every byte sequence encodes; id 0 is END_OF_TEXT), trained
    on every k-th text, k the smallest stride that brings the texts within `sample_chars`
    characters (all of them when None)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"a byte-level vocabulary needs at least {MIN_VOCAB_SIZE} entries (256 "
                         f"bytes, end-of-text and a merge), got {vocab_size}")
    texts = list(texts)
    total = sum(map(len, texts))
    if sample_chars is not None and total > sample_chars:
        texts = texts[::math.ceil(total / sample_chars)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def end_of_text_id(tokenizer, *, required: bool = True) -> int | None:
    """The tokenizer's document separator: END_OF_TEXT, or another common end-of-sequence
    token ("</s>", "<|end_of_text|>", "<eos>"); None (or a ValueError) when it has none."""
    for token in (END_OF_TEXT, "</s>", "<|end_of_text|>", "<eos>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    if required:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT} (or other end-of-text) token")
    return None


_ENCODED: dict[str, np.ndarray] = {}  # the latest `encode` results, by content digest
_ENCODED_LOCK = threading.Lock()  # (threads encoding at once raced its reads and evictions)
_ENCODED_KEPT = 2  # a corpus's training and held-out streams
ENCODE_BATCH = 256  # texts handed to the tokenizer at once (its threads share them)


def texts_digest(texts, digest):
    """`digest` (a hashlib object) updated with each text, its length first (so ["ab", "c"]
    and ["a", "bc"] differ); returns it."""
    for text in texts:
        raw = text.encode("utf-8", "surrogatepass")
        digest.update(len(raw).to_bytes(8, "little") + raw)
    return digest


def encode(tokenizer, texts) -> np.ndarray:
    """One int32 token stream (read-only): each text followed by the end-of-text token (when
    the tokenizer has one).

    The latest two streams stay in memory, keyed by a digest of the tokenizer and the texts,
    so a draft distilled right after its target in the same process (the benchmarks do this)
    does not encode the same corpus again (about a minute for ~100 MB on two cores)."""
    from jaxdec.checkpoint import plain_tokenizer

    texts = list(texts)
    tokenizer = plain_tokenizer(tokenizer)  # never truncated or padded (a tokenizer.json may ask)
    key = texts_digest(texts, hashlib.sha256(tokenizer.to_str().encode("utf-8"))).hexdigest()
    with _ENCODED_LOCK:
        if key in _ENCODED:
            return _ENCODED[key]
    eot = end_of_text_id(tokenizer, required=False)
    pieces = []
    # `encode_batch_fast` (tokenizers >= 0.20) skips the character offsets we never read:
    # the same ids, ~40% faster on this machine's stdlib corpus.
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    # A batch of texts at a time: an Encoding takes ~100 bytes a token, 25 times its ids
    # (a whole standard library at once held ~850 MiB).
    for first in range(0, len(texts), ENCODE_BATCH):
        for encoding in encode_batch(texts[first:first + ENCODE_BATCH], add_special_tokens=False):
            pieces.append(np.asarray(encoding.ids, np.int32))
            if eot is not None:
                pieces.append(np.array([eot], np.int32))
    tokens = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
    tokens.flags.writeable = False
    with _ENCODED_LOCK:
        _ENCODED[key] = tokens
        while len(_ENCODED) > _ENCODED_KEPT:
            del _ENCODED[next(iter(_ENCODED))]
    return tokens


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """[N, seq_len + 1] windows with stride seq_len: inputs [:, :-1] predict [:, 1:], and every
    token after the first is a target exactly once."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(tokens)} tokens do not fill one sequence of {seq_len + 1}")
    # (a strided view, copied once: an index array took twice the result again)
    windows = np.lib.stride_tricks.sliding_window_view(tokens[: n * seq_len + 1], seq_len + 1)
    return np.array(windows[::seq_len])
