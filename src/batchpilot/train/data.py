"""Training data with no download by default: documents, a deterministic split, tokenized storage.

``--data`` values::

    stdlib                   the running Python's standard library source (*.py, site-packages
                             excluded); one document per file — the offline default corpus
    notes.txt | ./corpus/    local text files or folders (every *.txt, *.md, *.py, *.rst, *.jsonl,
                             *.parquet underneath, sorted); a text file is one document
    rows.jsonl               one document per line, from the ``--text-field`` key (default ``text``)
    rows.parquet             one document per row of the ``--text-field`` column (needs pyarrow)
    hf:NAME[:SPLIT]          a Hugging Face ``datasets`` dataset by name, when it is reachable

Train/validation split: a document goes to validation when the first 8 bytes of
``sha256(key)`` (its relative path, ``path:line`` or ``name:row``) fall below ``val_fraction`` of 2^64 —
deterministic, independent of file order and of the seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batchpilot.errors import DataError
from batchpilot.train.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
TABLE_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True, kw_only=True, slots=True)
class Document:
    """One training document."""

    key: str
    """Stable identity: relative path, ``path:line`` or ``dataset:row`` (decides the split)."""
    text: str
    """The document's text."""


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_documents() -> Iterator[Document]:
    root = stdlib_root()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if {"site-packages", "dist-packages"} & set(rel.parts):
            continue
        try:
            yield Document(key=rel.as_posix(), text=path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue  # a handful of stdlib test files are deliberately not UTF-8


def _jsonl_documents(path: Path, key: str, text_field: str) -> Iterator[Document]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{str(path)!r} line {number} is not JSON: {exc.msg}") from None
            text = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{str(path)!r} line {number} has no string field {text_field!r}; "
                                f"pass --text-field")
            yield Document(key=f"{key}:{number}", text=text)


def _parquet_documents(path: Path, key: str, text_field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'batchpilot[data]'") from None
    try:
        column = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except (KeyError, ValueError, OSError) as exc:
        raise DataError(f"{str(path)!r}: cannot read column {text_field!r}: {' '.join(str(exc).split())[:160]}") from None
    for row, text in enumerate(column):
        if isinstance(text, str):
            yield Document(key=f"{key}:{row}", text=text)


def _file_documents(path: Path, key: str, text_field: str) -> Iterator[Document]:
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path, key, text_field)
    elif path.suffix == ".parquet":
        yield from _parquet_documents(path, key, text_field)
    else:
        try:
            yield Document(key=key, text=path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{str(path)!r} is not UTF-8 text; pass text, JSONL or Parquet files") from None


def _hf_documents(spec: str, text_field: str) -> Iterator[Document]:
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError("hf: data needs the datasets package: pip install 'batchpilot[data]'") from None
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its "Retrying in 8s [Retry 5/5]" warnings would be extra stderr lines
    try:
        table = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # offline, unknown name, gated: all one-line data errors
        raise DataError(f"dataset {name!r} is not reachable: {' '.join(str(exc).split())[:160]}") from None
    finally:
        hub_logger.setLevel(level)
    if text_field not in table.column_names:
        raise DataError(f"dataset {name!r} has no column {text_field!r} (has {table.column_names}); pass --text-field")
    for row, text in enumerate(table[text_field]):
        if isinstance(text, str):
            yield Document(key=f"{name}:{row}", text=text)


def load_documents(source: str, *, text_field: str = "text") -> list[Document]:
    """All non-empty documents of ``--data`` in a deterministic order (see the module docstring)."""
    if source == "stdlib":
        docs = list(_stdlib_documents())
    elif source.startswith("hf:"):
        docs = list(_hf_documents(source[3:], text_field))
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"data path {source!r} does not exist; pass a file, a folder, 'stdlib' or hf:NAME")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + TABLE_SUFFIXES)
            docs = [d for f in files for d in _file_documents(f, f.relative_to(path).as_posix(), text_field)]
        elif not path.is_file():  # /dev/zero, /dev/urandom, a FIFO: would read (or block) forever
            raise DataError(f"data path {source!r} is not a regular file or a folder; pass text, JSONL or Parquet "
                            f"files, a folder of them, 'stdlib' or hf:NAME")
        else:
            docs = list(_file_documents(path, path.name, text_field))
    docs = [d for d in docs if d.text]
    if not docs:
        raise DataError(f"data {source!r} holds no non-empty documents; point --data at text, JSONL or Parquet")
    return docs


def is_validation(key: str, val_fraction: float) -> bool:
    """The split rule: the top 64 bits of sha256(key), as a fraction of 2^64, below ``val_fraction``."""
    top = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return top < val_fraction * 2**64


def split_documents(docs: Sequence[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, validation) by :func:`is_validation`; a corpus too small to split keeps all for training."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"validation fraction {val_fraction} must be in [0, 1)")
    val = [d for d in docs if is_validation(d.key, val_fraction)]
    train = [d for d in docs if not is_validation(d.key, val_fraction)]
    if not train:
        raise DataError(f"all {len(docs)} documents fell into validation; lower the validation fraction")
    return train, val


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenizedCorpus:
    """Documents as one flat token array: document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``."""

    tokens: np.ndarray
    """All token ids, documents back to back (uint16 when the vocabulary fits, else int32)."""
    offsets: np.ndarray
    """``num_documents + 1`` int64 start offsets."""

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def tokenize(docs: Sequence[Document], tokenizer: Tokenizer, *, chunk: int = 256) -> TokenizedCorpus:
    """Tokenize ``docs`` in order (empty results dropped) into a :class:`TokenizedCorpus`; each document is
    framed by the tokenizer's ``prefix_ids``/``suffix_ids`` (BOS/EOS, :mod:`batchpilot.train.tokenizer`)."""
    arrays: list[np.ndarray] = []
    prefix = np.asarray(tokenizer.prefix_ids, dtype=np.int64)
    suffix = np.asarray(tokenizer.suffix_ids, dtype=np.int64)
    for start in range(0, len(docs), chunk):
        encoded = tokenizer.encode_batch([d.text for d in docs[start:start + chunk]])
        arrays.extend(np.concatenate([prefix, a, suffix]) if len(prefix) + len(suffix) else a
                      for a in encoded if len(a))
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype=dtype)
    return TokenizedCorpus(tokens=tokens, offsets=offsets)


def fingerprint(docs: Sequence[Document]) -> str:
    """A short hash of the documents' keys and sizes (cache key for a trained tokenizer)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(f"{d.key}\0{len(d.text)}\n".encode())
    return h.hexdigest()[:16]
