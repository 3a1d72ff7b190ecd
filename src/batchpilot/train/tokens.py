"""Pre-tokenized, memory-mapped training data: written once, read by every rank without a copy.

Examples::

    batchpilot tokenize --data corpus/ --tokenizer bpe:8192 --out tokens/   # write it
    batchpilot train --data tokens/ --tokenizer bpe:8192 ...                # train on it (any number of ranks)

A token dataset is a directory::

    batchpilot-tokens.json   format, tokenizer (name, vocabulary, BOS/EOS ids), source, split rule, counts
    train.bin / val.bin      token ids of every document back to back (uint16 when the vocabulary fits, else
                             int32; raw little-endian, ``numpy.memmap``)
    train.idx / val.idx      ``documents + 1`` int64 start offsets (``.npy``, memory-mapped)

the layout of nanoGPT's ``train.bin`` and Megatron-LM's ``.bin``/``.idx`` pairs (tokens + document offsets),
read as :class:`~batchpilot.train.data.TokenizedCorpus` whose arrays are memory maps: the pages are shared by
every process of a node through the page cache, and nothing is held per rank.

Every run reads its data this way. With ``--data`` a token dataset, it is used as it is (``--tokenizer``
must name the tokenizer that wrote it). Otherwise rank 0 alone loads the documents, trains a ``bpe:``
tokenizer if asked, tokenizes and writes ``OUT/tokens/`` while the other ranks wait at a barrier, then every
rank maps it; a resumed or restarted run whose documents, split and tokenizer are unchanged reuses it.
Multi-node runs need ``OUT`` on a shared filesystem (as the checkpoints do). Writing is atomic (a temporary
directory renamed into place).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchpilot.errors import DataError
from batchpilot.train.data import (
    Document,
    TokenizedCorpus,
    fingerprint,
    load_documents,
    split_documents,
    tokenize,
)
from batchpilot.train.tokenizer import Tokenizer, load_tokenizer

META = "batchpilot-tokens.json"
FORMAT = 1
SPLITS = ("train", "val")


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenDatasetInfo:
    """What ``batchpilot-tokens.json`` records."""

    format: int
    tokenizer: str
    """The ``--tokenizer`` spec that wrote the tokens."""
    tokenizer_name: str
    vocab_size: int
    prefix_ids: tuple[int, ...]
    """Tokens opening every document (BOS)."""
    suffix_ids: tuple[int, ...]
    """Tokens closing every document (EOS)."""
    dtype: str
    """``uint16`` or ``int32``."""
    source: str
    """The ``--data`` the documents came from."""
    text_field: str
    val_fraction: float
    fingerprint: str
    """sha256 of every document's key and size (:func:`batchpilot.train.data.fingerprint`)."""
    documents: dict[str, int]
    """Documents per split."""
    tokens: dict[str, int]
    """Tokens per split."""

    @classmethod
    def read(cls, directory: Path) -> TokenDatasetInfo:
        try:
            raw = json.loads((directory / META).read_text(encoding="utf-8"))
            raw["prefix_ids"], raw["suffix_ids"] = tuple(raw["prefix_ids"]), tuple(raw["suffix_ids"])
            info = cls(**raw)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise DataError(f"token dataset {str(directory)!r} cannot be read ({' '.join(str(exc).split())[:120]}); "
                            f"write it again with batchpilot tokenize") from None
        if info.format != FORMAT or info.dtype not in ("uint16", "int32"):
            raise DataError(f"token dataset {str(directory)!r} has format {info.format} / dtype {info.dtype!r}; this "
                            f"batchpilot reads format {FORMAT}: write it again with batchpilot tokenize")
        return info


def is_token_dataset(path: str | Path) -> bool:
    """Whether ``--data`` names a directory written by :func:`write_token_dataset`."""
    return (Path(path) / META).is_file()


def _write_split(directory: Path, split: str, corpus: TokenizedCorpus) -> None:
    corpus.tokens.tofile(directory / f"{split}.bin")
    with (directory / f"{split}.idx").open("wb") as handle:
        np.save(handle, corpus.offsets.astype(np.int64))


def write_token_dataset(out: Path, *, train: Sequence[Document], val: Sequence[Document], tokenizer: Tokenizer,
                        tokenizer_spec: str, source: str, text_field: str, val_fraction: float,
                        docs_fingerprint: str) -> TokenDatasetInfo:
    """Tokenize ``train`` and ``val`` with ``tokenizer`` (BOS/EOS framed) and write them to ``out`` atomically."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    documents, counts, dtype = {}, {}, "uint16"
    for split, docs in (("train", train), ("val", val)):
        corpus = tokenize(docs, tokenizer)
        dtype = str(corpus.tokens.dtype)
        _write_split(tmp, split, corpus)
        documents[split], counts[split] = corpus.num_documents, corpus.num_tokens
    info = TokenDatasetInfo(
        format=FORMAT, tokenizer=tokenizer_spec, tokenizer_name=tokenizer.name, vocab_size=tokenizer.vocab_size,
        prefix_ids=tuple(int(i) for i in tokenizer.prefix_ids), suffix_ids=tuple(int(i) for i in tokenizer.suffix_ids),
        dtype=dtype, source=source, text_field=text_field, val_fraction=val_fraction, fingerprint=docs_fingerprint,
        documents=documents, tokens=counts)
    (tmp / META).write_text(json.dumps(asdict(info), indent=1), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return info


@dataclass(frozen=True, kw_only=True, slots=True)
class RecordedTokenizer:
    """The tokenizer as a token dataset records it (ranks that did not build it need no more)."""

    name: str
    vocab_size: int
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]

    @classmethod
    def of(cls, info: TokenDatasetInfo) -> RecordedTokenizer:
        return cls(name=info.tokenizer_name, vocab_size=info.vocab_size, prefix_ids=info.prefix_ids,
                   suffix_ids=info.suffix_ids)


@dataclass(frozen=True, kw_only=True, slots=True)
class Prepared:
    """Documents tokenized for a run: where they are, and the tokenizer when this process built it."""

    directory: Path
    info: TokenDatasetInfo
    tokenizer: Tokenizer | None
    """The tokenizer object (rank 0, or whoever prepared the data); None when the data came ready."""


def prepare(data: str, *, tokenizer_spec: str, text_field: str, val_fraction: float, out: Path) -> Prepared:
    """Load ``data``, split it, build the tokenizer (training a ``bpe:``), and write the token dataset to
    ``out`` — unless ``out`` already holds one made from the same documents, split and tokenizer."""
    docs = load_documents(data, text_field=text_field)
    train, val = split_documents(docs, val_fraction)
    tokenizer = load_tokenizer(tokenizer_spec, (d.text for d in train), fingerprint(train))
    docs_fingerprint = fingerprint(docs)
    if is_token_dataset(out):
        info = TokenDatasetInfo.read(out)
        if (info.fingerprint, info.tokenizer, info.tokenizer_name, info.val_fraction, info.text_field) == (
                docs_fingerprint, tokenizer_spec, tokenizer.name, val_fraction, text_field):
            return Prepared(directory=out, info=info, tokenizer=tokenizer)
    info = write_token_dataset(out, train=train, val=val, tokenizer=tokenizer, tokenizer_spec=tokenizer_spec,
                               source=data, text_field=text_field, val_fraction=val_fraction,
                               docs_fingerprint=docs_fingerprint)
    return Prepared(directory=out, info=info, tokenizer=tokenizer)


def open_split(directory: Path, split: str, info: TokenDatasetInfo) -> TokenizedCorpus | None:
    """The memory-mapped corpus of ``split`` (None when it has no document)."""
    if not info.documents.get(split):
        return None
    try:
        offsets = np.load(directory / f"{split}.idx", mmap_mode="r", allow_pickle=False)
        tokens: Any = np.memmap(directory / f"{split}.bin", dtype=np.dtype(info.dtype), mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"token dataset {str(directory)!r}: {split} cannot be read "
                        f"({' '.join(str(exc).split())[:120]}); write it again with batchpilot tokenize") from None
    if len(offsets) != info.documents[split] + 1 or not int(offsets[-1]) == len(tokens) == info.tokens[split]:
        raise DataError(f"token dataset {str(directory)!r}: {split} holds {len(tokens)} tokens and {len(offsets) - 1} "
                        f"documents, its record says {info.tokens[split]} and {info.documents[split]}; write it again")
    return TokenizedCorpus(tokens=tokens, offsets=offsets)
