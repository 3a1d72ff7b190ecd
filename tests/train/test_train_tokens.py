"""Pre-tokenized, memory-mapped data; document boundaries (BOS/EOS) as the tokenizer defines them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from train_helpers import small_config
from typer.testing import CliRunner

from batchpilot.cli import app
from batchpilot.errors import DataError
from batchpilot.train.data import Document, load_documents, split_documents, tokenize
from batchpilot.train.metrics import read_metrics
from batchpilot.train.runner import run
from batchpilot.train.tokenizer import EOS_TEXT, ByteTokenizer, load_tokenizer
from batchpilot.train.tokens import META, TokenDatasetInfo, is_token_dataset, open_split, prepare


def _llama_style_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer whose post-processor adds ``<s>`` before a text (Llama 2's template) and whose
    tokenizer_config names ``</s>`` as EOS — the two ways a Hugging Face tokenizer defines boundaries."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    return folder


def test_documents_are_framed_as_the_tokenizer_defines(tmp_path: Path) -> None:
    tok = load_tokenizer(str(_llama_style_tokenizer(tmp_path / "tok")))
    assert (tok.prefix_ids, tok.suffix_ids) == ((1,), (2,))  # the template's <s>, the config's </s>
    corpus = tokenize([Document(key="a", text="hello world"), Document(key="b", text="world")], tok)
    assert corpus.tokens.tolist() == [1, 3, 4, 2, 1, 4, 2] and corpus.offsets.tolist() == [0, 4, 7]
    plain = ByteTokenizer()  # bytes: 256 ids, no room for special tokens
    assert (plain.prefix_ids, plain.suffix_ids) == ((), ())


def test_a_bpe_trained_here_ends_documents_with_endoftext(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHPILOT_CACHE", str(tmp_path))
    docs = [Document(key=f"{i}", text="def f(x):\n    return x * 2\n" * 4) for i in range(10)]
    tok = load_tokenizer("bpe:300", [d.text for d in docs], "fp")
    assert tok.prefix_ids == () and len(tok.suffix_ids) == 1
    corpus = tokenize(docs[:2], tok)
    ends = corpus.tokens[corpus.offsets[1:] - 1]
    assert ends.tolist() == list(tok.suffix_ids) * 2
    assert tok.vocab_size <= 300 and EOS_TEXT in tok._backend.get_vocab()  # counted in the vocabulary


def test_token_dataset_round_trip_is_memory_mapped(corpus_dir: Path, tmp_path: Path) -> None:
    prepared = prepare(str(corpus_dir), tokenizer_spec="bytes", text_field="text", val_fraction=0.1,
                       out=tmp_path / "tokens")
    assert is_token_dataset(tmp_path / "tokens") and (tmp_path / "tokens" / META).is_file()
    info = TokenDatasetInfo.read(tmp_path / "tokens")
    train = open_split(tmp_path / "tokens", "train", info)
    assert train is not None and isinstance(train.tokens, np.memmap)
    train_docs, _ = split_documents(load_documents(str(corpus_dir)), 0.1)
    reference = tokenize(train_docs, ByteTokenizer())
    assert np.array_equal(np.asarray(train.tokens), reference.tokens)
    assert np.array_equal(np.asarray(train.offsets), reference.offsets)
    assert prepared.info.documents["train"] == len(train_docs) and info == prepared.info
    stamp = (tmp_path / "tokens" / "train.bin").stat().st_mtime_ns
    prepare(str(corpus_dir), tokenizer_spec="bytes", text_field="text", val_fraction=0.1, out=tmp_path / "tokens")
    assert (tmp_path / "tokens" / "train.bin").stat().st_mtime_ns == stamp  # same documents: reused, not rewritten


def test_training_on_a_token_dataset_equals_training_on_the_text(corpus_dir: Path, tmp_path: Path) -> None:
    """``batchpilot tokenize`` writes it; ``--data TOKENS`` trains exactly as ``--data TEXT`` (same rows)."""
    result = CliRunner().invoke(app, ["tokenize", "--data", str(corpus_dir), "--out", str(tmp_path / "tok"),
                                      "--val-fraction", "0.1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["documents"]["train"] > 0
    text = small_config(corpus_dir, tmp_path / "text", run={"steps": 2})
    run(text)
    tokens = text.replace(data={"data": str(tmp_path / "tok")}, run={"out": str(tmp_path / "tokens")})
    run(tokens)
    assert ([r["loss"] for r in read_metrics(tmp_path / "text" / "metrics.jsonl")]
            == [r["loss"] for r in read_metrics(tmp_path / "tokens" / "metrics.jsonl")])
    assert (tmp_path / "text" / "tokens" / META).is_file()  # a text run tokenizes into OUT/tokens
    with pytest.raises(DataError, match="were made with --tokenizer bytes; pass --tokenizer bytes"):
        run(tokens.replace(data={"tokenizer": "bpe:300"}, run={"out": str(tmp_path / "other")}))
