"""Tokenizers for the runner: byte-level (default), a local Hugging Face tokenizer, or a BPE trained here.

``--tokenizer`` values::

    bytes              UTF-8 bytes, ids 0–255 (fits tiny-llama-1m's 512-token vocabulary); nothing to load
    ./my-tokenizer/    a local Hugging Face tokenizer directory (tokenizer.json / tokenizer_config.json);
                       loaded with local_files_only=True and trust_remote_code=False
    bpe:8192           a byte-level BPE of 8192 tokens (``<|endoftext|>`` included) trained on the training split
                       with ``tokenizers`` and cached under $BATCHPILOT_CACHE (default ~/.cache/batchpilot)/tokenizers/

Document boundaries, as the tokenizer defines them: every document is ``prefix_ids + ids + suffix_ids``.
A directory tokenizer's prefix and suffix are the special tokens its own post-processor adds around a text
(``tokenizer.json``'s template: Llama 3 and Llama 2 add ``<|begin_of_text|>``/``<s>``, GPT-2 and Qwen2 add
nothing); when it adds no closing token and ``tokenizer_config.json`` names an ``eos_token``, that token
ends every document (torchtitan encodes documents with ``bos=True, eos=True``; nanoGPT and llm-foundry
append the end-of-text token), so packed documents are separated as in framework runs. A ``bpe:`` tokenizer
ends documents with ``<|endoftext|>`` (GPT-2's convention). ``bytes`` has no room for special tokens (its 256
ids are the byte values): no boundary tokens.
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

    @property
    def prefix_ids(self) -> tuple[int, ...]:
        """Special tokens that open every document (BOS), as the tokenizer defines them."""
        ...

    @property
    def suffix_ids(self) -> tuple[int, ...]:
        """Special tokens that close every document (EOS)."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text (``TOKEN_DTYPE`` arrays), without special tokens."""
        ...


@dataclass(frozen=True, kw_only=True, slots=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte value, so the vocabulary is 256 and nothing is ever unknown."""

    name: str = "bytes"
    """Shown in summaries."""
    vocab_size: int = 256
    """Byte values 0–255."""
    prefix_ids: tuple[int, ...] = ()
    """No special tokens: every id is a byte."""
    suffix_ids: tuple[int, ...] = ()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(TOKEN_DTYPE) for t in texts]


EOS_TEXT = "<|endoftext|>"
"""The end-of-document token of the BPEs trained here (GPT-2's)."""


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (from a local directory or trained here); :meth:`encode_batch` adds no special
    tokens, :attr:`prefix_ids`/:attr:`suffix_ids` are the document boundaries (module docstring)."""

    def __init__(self, backend: Any, name: str, *, eos_token: str | None = None, path: Path | None = None) -> None:
        self._backend = backend
        self.name = name
        self.path = path
        """The file or directory it was loaded from (copied into a Hugging Face export)."""
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        self.prefix_ids, self.suffix_ids = _boundaries(backend, eos_token)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=TOKEN_DTYPE) for e in encodings]


def _boundaries(backend: Any, eos_token: str | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(prefix, suffix): what the post-processor adds around a text, and ``eos_token`` when it closes nothing."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    prefix, suffix = tuple(full[:start]), tuple(full[start + len(plain):])
    if not suffix and eos_token:
        eos = backend.token_to_id(eos_token)
        suffix = (int(eos),) if eos is not None else ()
    return prefix, suffix


def _config_eos(path: Path) -> str | None:
    """``eos_token`` of ``tokenizer_config.json`` (a string or ``{"content": …}``), or None."""
    import json

    config = path / "tokenizer_config.json"
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("eos_token") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def cache_dir() -> Path:
    """``$BATCHPILOT_CACHE`` or ``~/.cache/batchpilot``."""
    return Path(os.environ.get("BATCHPILOT_CACHE", Path.home() / ".cache" / "batchpilot"))


def _load_directory(path: Path) -> HFTokenizer:
    from tokenizers import Tokenizer as RustTokenizer

    file = path / "tokenizer.json"
    try:  # the tokenizers library raises a bare Exception ("Model missing") for a file that is not one
        if file.is_file():
            return HFTokenizer(RustTokenizer.from_file(str(file)), name=str(path), eos_token=_config_eos(path),
                               path=path)
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
    return HFTokenizer(backend, name=str(path), eos_token=getattr(tok, "eos_token", None), path=path)


def train_bpe(texts: Iterable[str], vocab_size: int, fingerprint: str) -> HFTokenizer:
    """Train (or load from the cache) a byte-level BPE of ``vocab_size`` on ``texts``.

    The cache key is ``fingerprint`` (the corpus identity) and the vocabulary size, so the same corpus
    always gets the same tokenizer file.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise DataError(f"bpe vocabulary {vocab_size} is too small; a byte-level BPE needs at least 257")
    key = hashlib.sha256(f"{fingerprint}|{vocab_size}|{EOS_TEXT}".encode()).hexdigest()[:16]
    path = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{key}.json"
    if path.is_file():
        return HFTokenizer(RustTokenizer.from_file(str(path)), name=f"bpe:{vocab_size}", eos_token=EOS_TEXT, path=path)
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[EOS_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: concurrent ranks or runs never see a half-written file
    return HFTokenizer(tok, name=f"bpe:{vocab_size}", eos_token=EOS_TEXT, path=path)


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
