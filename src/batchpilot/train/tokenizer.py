"""Tokenizers for the runner: byte-level (default), a local Hugging Face tokenizer, or a BPE trained here.

``--tokenizer`` values::

    bytes              UTF-8 bytes, ids 0–255 (fits tiny-llama-1m's 512-token vocabulary); nothing to load
    ./my-tokenizer/    a local Hugging Face tokenizer directory (tokenizer.json / tokenizer_config.json);
                       loaded with local_files_only=True and trust_remote_code=False
    bpe:8192           a byte-level BPE of 8192 tokens trained on the training split with ``tokenizers``
                       and cached under $BATCHPILOT_CACHE (default ~/.cache/batchpilot)/tokenizers/
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from batchpilot.errors import DataError

TOKEN_DTYPE = np.int32
"""One dtype for token ids everywhere in the runner (vocabularies up to 2^31)."""


class Tokenizer(Protocol):
    """What the runner needs from a tokenizer."""

    @property
    def name(self) -> str:
        """Shown in summaries."""
        ...

    @property
    def vocab_size(self) -> int:
        """Ids are in ``[0, vocab_size)``."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text (``TOKEN_DTYPE`` arrays)."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte value, so the vocabulary is 256 and nothing is ever unknown."""

    name: str = "bytes"
    """Shown in summaries."""
    vocab_size: int = 256
    """Byte values 0–255."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(TOKEN_DTYPE) for t in texts]


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (from a local directory or trained here), special tokens not added."""

    def __init__(self, backend: Any, name: str) -> None:
        self._backend = backend
        self.name = name
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=TOKEN_DTYPE) for e in encodings]


def cache_dir() -> Path:
    """``$BATCHPILOT_CACHE`` or ``~/.cache/batchpilot``."""
    return Path(os.environ.get("BATCHPILOT_CACHE", Path.home() / ".cache" / "batchpilot"))


def _load_directory(path: Path) -> HFTokenizer:
    from tokenizers import Tokenizer as RustTokenizer

    file = path / "tokenizer.json"
    try:  # the tokenizers library raises a bare Exception ("Model missing") for a file that is not one
        if file.is_file():
            return HFTokenizer(RustTokenizer.from_file(str(file)), name=str(path))
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its fallback warnings ("Could not extract SentencePiece…") are lines
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as exc:
        raise DataError(f"tokenizer directory {str(path)!r} cannot be loaded: {' '.join(str(exc).split())[:200]}; "
                        f"point --tokenizer at a folder with a valid tokenizer.json, or use bytes or bpe:VOCAB") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"tokenizer in {str(path)!r} has no fast (tokenizer.json) backend; convert it first")
    return HFTokenizer(backend, name=str(path))


def train_bpe(texts: Iterable[str], vocab_size: int, fingerprint: str) -> HFTokenizer:
    """Train (or load from the cache) a byte-level BPE of ``vocab_size`` on ``texts``.

    The cache key is ``fingerprint`` (the corpus identity) and the vocabulary size, so the same corpus
    always gets the same tokenizer file.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise DataError(f"bpe vocabulary {vocab_size} is too small; a byte-level BPE needs at least 257")
    key = hashlib.sha256(f"{fingerprint}|{vocab_size}".encode()).hexdigest()[:16]
    path = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{key}.json"
    if path.is_file():
        return HFTokenizer(RustTokenizer.from_file(str(path)), name=f"bpe:{vocab_size}")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: concurrent ranks or runs never see a half-written file
    return HFTokenizer(tok, name=f"bpe:{vocab_size}")


def resolve_tokenizer(spec: str) -> tuple[str, int | None, Path | None]:
    """Classify ``--tokenizer``: (kind, bpe vocabulary, directory)."""
    if spec == "bytes":
        return "bytes", None, None
    if spec.startswith("bpe:"):
        from batchpilot.units import parse_count

        return "bpe", parse_count(spec[4:], "bpe vocabulary size"), None
    path = Path(spec)
    if not path.is_dir():
        raise DataError(f"tokenizer {spec!r} is not 'bytes', 'bpe:VOCAB' or an existing directory")
    return "dir", None, path


def load_tokenizer(spec: str, corpus_texts: Iterable[str] | None = None, fingerprint: str = "") -> Tokenizer:
    """Build the tokenizer named by ``--tokenizer`` (``corpus_texts`` feed a ``bpe:`` training)."""
    kind, vocab, path = resolve_tokenizer(spec)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "bpe":
        assert vocab is not None
        return train_bpe(corpus_texts or [], vocab, fingerprint)
    assert path is not None
    return _load_directory(path)
