"""The two data sets of the examples, both shipped with an installed package (no download):
scikit-learn's handwritten digits, and the English documentation inside CPython's
``pydoc_data.topics``. Everything here is NumPy and depends only on a seed and a step, so
a resumed run sees exactly the batches an uninterrupted run would have seen."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

PAD = 0  # token id of padding; characters start at 1


@dataclass(frozen=True)
class Digits:
    """The 8x8 digits, standardised with the training split's statistics."""

    x_train: np.ndarray  # (n, 64) float32
    y_train: np.ndarray  # (n,) int32
    x_val: np.ndarray
    y_val: np.ndarray


def load_digits(seed: int, val_fraction: float = 0.2) -> Digits:
    """The 1797 digits with a stratified held-out split of ``val_fraction``."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    x, y = sklearn_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=val_fraction, random_state=seed, stratify=y
    )
    mean, std = x_train.mean(0), x_train.std(0)
    # Some border pixels are always 0 in the training split; leave them at 0.
    std = np.where(std > 0, std, 1.0)
    return Digits(
        ((x_train - mean) / std).astype(np.float32),
        y_train.astype(np.int32),
        ((x_val - mean) / std).astype(np.float32),
        y_val.astype(np.int32),
    )


def epoch_batch(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the batch of training step ``step`` (1-based): shuffled epochs of ``n``
    items, the incomplete batch at the end of each epoch dropped."""
    if batch_size > n:
        raise ValueError(f"--batch-size {batch_size} is larger than the {n} training items.")
    per_epoch = n // batch_size
    epoch, index = divmod(step - 1, per_epoch)
    order = _permutation(n, seed, epoch)
    return order[index * batch_size : (index + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass(frozen=True)
class Corpus:
    """The pydoc topics as token arrays, split by whole documents."""

    chars: str  # id i + 1 is chars[i]; id 0 is padding
    train: tuple[np.ndarray, ...]
    val: tuple[np.ndarray, ...]
    val_names: tuple[str, ...]

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> np.ndarray:
        index = {c: i + 1 for i, c in enumerate(self.chars)}
        return np.array([index[c] for c in text], np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return "".join(self.chars[i - 1] for i in ids if i != PAD)


def load_corpus(seed: int, val_fraction: float = 0.1) -> Corpus:
    """CPython's documentation topics, whole documents held out until ``val_fraction`` of
    the characters is reached (in an order shuffled by ``seed``)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    # The alphabet of the whole corpus: a character seen only in validation still gets an
    # id (its embedding simply stays untrained), so no <unk> token is needed.
    chars = "".join(sorted(set("".join(topics.values()))))
    corpus = Corpus(chars, (), (), ())
    total = sum(len(t) for t in topics.values())
    val_names, held = [], 0
    for i in np.random.default_rng(seed).permutation(len(names)):
        if held >= val_fraction * total:
            break
        val_names.append(names[i])
        held += len(topics[names[i]])
    train = tuple(corpus.encode(topics[n]) for n in names if n not in val_names)
    val = tuple(corpus.encode(topics[n]) for n in sorted(val_names))
    return Corpus(chars, train, val, tuple(sorted(val_names)))


def chunk_documents(docs: tuple[np.ndarray, ...], seq_len: int, offset: int = 0) -> np.ndarray:
    """Every document cut into rows of ``seq_len + 1`` tokens, right-padded with ``PAD``.

    Consecutive rows of a document overlap by one token, so each character but a
    document's first is a prediction target exactly once. ``offset`` shifts the cuts
    (the first row of each document is then shorter), so each training epoch sees other
    contexts. Shape ``(rows, seq_len + 1)``, int32.
    """
    rows = []
    for doc in docs:
        for start in range(-offset, len(doc) - 1, seq_len):
            piece = doc[max(start, 0) : start + seq_len + 1]
            rows.append(np.pad(piece, (0, seq_len + 1 - len(piece)), constant_values=PAD))
    return np.stack(rows).astype(np.int32)


class TextBatches:
    """The token rows of each training step: every epoch cuts the documents at a new
    offset and shuffles the rows; the rows left over at an epoch's end are dropped."""

    def __init__(self, docs: tuple[np.ndarray, ...], seq_len: int, batch_size: int, seed: int):
        self.docs, self.seq_len, self.batch_size, self.seed = docs, seq_len, batch_size, seed
        # Epoch 0 cuts at offset 0, which gives the fewest rows of any offset.
        rows = len(self._rows(0))
        if batch_size > rows:
            raise ValueError(f"--batch-size {batch_size} exceeds the {rows} training rows.")
        self.per_epoch = rows // batch_size

    def __call__(self, step: int) -> np.ndarray:
        """Shape ``(batch_size, seq_len + 1)`` for training step ``step`` (1-based)."""
        epoch, index = divmod(step - 1, self.per_epoch)
        return self._rows(epoch)[index * self.batch_size : (index + 1) * self.batch_size]

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one instance per run)
    def _rows(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        offset = 0 if epoch == 0 else int(rng.integers(self.seq_len))
        rows = chunk_documents(self.docs, self.seq_len, offset)
        return rows[rng.permutation(len(rows))]


class Packed(NamedTuple):
    """Packed rows: documents back to back, each field ``(rows, seq_len)`` int32 (with a
    leading batch-stack axis when stacked for evaluation).

    ``segment_ids[r, i]`` is the index, from 1, within row ``r`` of the document that input
    ``tokens[r, i]`` belongs to, and 0 for the padding at the tail of the last row.
    ``targets[r, i]`` is the next token of the same document, or ``PAD`` (ignored by the
    loss) where the next token opens another document or is padding.
    """

    tokens: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray


def pack_documents(docs: tuple[np.ndarray, ...], seq_len: int) -> Packed:
    """The documents concatenated in the given order and cut into rows of ``seq_len``
    inputs, with no padding but at the tail of the last row.

    Row ``r`` holds the stream's tokens ``r L .. r L + L - 1`` as inputs and their
    successors as targets, so every token of the stream but the last (which predicts
    nothing) is an input exactly once, and every token but a document's first is a
    target exactly once (the same targets as
    :func:`chunk_documents`, hence as the bigram baseline). A target that would cross into
    the next document is ``PAD``: predicting a document's first character from the end
    of another is not the task, and attention never lets it see that document anyway.
    """
    stream = np.concatenate(docs).astype(np.int32)
    rows = max(1, -(-(len(stream) - 1) // seq_len))  # ceil: the last target needs a row
    tokens = np.full(rows * seq_len + 1, PAD, np.int32)
    owner = np.full(rows * seq_len + 1, -1)  # the document of each stream position
    tokens[: len(stream)] = stream
    owner[: len(stream)] = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    # Inputs and targets overlap by one position between consecutive rows.
    index = np.arange(rows)[:, None] * seq_len + np.arange(seq_len + 1)
    tok, own = tokens[index], owner[index]
    # Row r starts at stream position r L <= len(stream) - 2, a real token: own[:, :1] >= 0.
    # The stream's last token predicts nothing: as an input it is padding.
    is_input = index[:, :-1] < len(stream) - 1
    segments = np.where(is_input, own[:, :-1] - own[:, :1] + 1, 0)
    same_document = (own[:, 1:] == own[:, :-1]) & (own[:, 1:] >= 0)
    targets = np.where(same_document, tok[:, 1:], PAD)
    inputs = np.where(is_input, tok[:, :-1], PAD)
    return Packed(inputs, targets.astype(np.int32), segments.astype(np.int32))


class PackedBatches:
    """The packed rows of each training step, as :class:`TextBatches`: every epoch
    shuffles the documents before packing them (so rows are cut at other places) and
    then the rows; the rows left over at an epoch's end are dropped."""

    def __init__(self, docs: tuple[np.ndarray, ...], seq_len: int, batch_size: int, seed: int):
        self.docs, self.seq_len, self.batch_size, self.seed = docs, seq_len, batch_size, seed
        rows = len(self._rows(0).tokens)  # the same number every epoch
        if batch_size > rows:
            raise ValueError(f"--batch-size {batch_size} exceeds the {rows} training rows.")
        self.per_epoch = rows // batch_size

    def __call__(self, step: int) -> Packed:
        """Each field of shape ``(batch_size, seq_len)``, for step ``step`` (1-based)."""
        epoch, index = divmod(step - 1, self.per_epoch)
        part = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return Packed(*(field[part] for field in self._rows(epoch)))

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one instance per run)
    def _rows(self, epoch: int) -> Packed:
        rng = np.random.default_rng([self.seed, epoch])
        packed = pack_documents(tuple(self.docs[i] for i in rng.permutation(len(self.docs))),
                                self.seq_len)  # fmt: skip
        order = rng.permutation(len(packed.tokens))
        return Packed(*(field[order] for field in packed))


def fixed_packed_batches(packed: Packed, batch_size: int) -> Packed:
    """``packed`` in batches of exactly ``batch_size`` rows stacked along a new first axis
    (shape ``(batches, batch_size, seq_len)``), the last filled with rows of padding,
    segment 0 and no targets."""
    pad = -len(packed.tokens) % batch_size
    return Packed(
        *(
            np.concatenate([f, np.full((pad, f.shape[1]), PAD, f.dtype)]).reshape(
                -1, batch_size, f.shape[1]
            )
            for f in packed
        )
    )


def fixed_batches(rows: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``rows`` in batches of exactly ``batch_size``, the last one filled with all-``PAD``
    rows (which carry no targets), so that evaluation compiles once and shards evenly."""
    pad = -len(rows) % batch_size
    rows = np.concatenate([rows, np.full((pad, rows.shape[1]), PAD, rows.dtype)])
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


def bigram_loss(corpus: Corpus, alpha: float = 0.5) -> float:
    """Validation cross-entropy (nats per character) of a character bigram model counted
    on the training documents with add-``alpha`` smoothing: the baseline the transformer
    must beat. It predicts exactly the transformer's targets (every character of a
    validation document but the first)."""
    v = corpus.vocab_size
    counts = np.zeros((v, v))
    for doc in corpus.train:
        np.add.at(counts, (doc[:-1], doc[1:]), 1.0)
    log_p = np.log(counts + alpha) - np.log((counts + alpha).sum(1, keepdims=True))
    nll = [-log_p[doc[:-1], doc[1:]] for doc in corpus.val]
    return float(np.concatenate(nll).mean())
