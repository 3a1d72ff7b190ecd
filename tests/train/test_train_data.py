"""Documents, the deterministic split, tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from batchpilot.errors import DataError
from batchpilot.train.data import (
    Document,
    fingerprint,
    is_validation,
    load_documents,
    split_documents,
    stdlib_root,
    tokenize,
)
from batchpilot.train.tokenizer import ByteTokenizer, load_tokenizer


def test_stdlib_corpus_is_python_source_split_by_file() -> None:
    docs = load_documents("stdlib")
    keys = [d.key for d in docs]
    assert keys == sorted(keys) and all(k.endswith(".py") for k in keys)
    assert "os.py" in keys and (stdlib_root() / "os.py").read_text(encoding="utf-8") == docs[keys.index("os.py")].text
    train, val = split_documents(docs, 0.02)
    assert len(train) + len(val) == len(docs) and 0 < len(val) < 0.05 * len(docs)
    assert {d.key for d in val} == {k for k in keys if is_validation(k, 0.02)}  # by file, not by order


def test_local_text_jsonl_parquet_and_folders(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p0", "p1", "p2"]}), tmp_path / "t.parquet")
    (tmp_path / "skip.bin").write_bytes(b"\x00\xff")
    docs = load_documents(str(tmp_path))
    assert [d.key for d in docs] == ["a.txt", "rows.jsonl:1", "rows.jsonl:3", "t.parquet:0", "t.parquet:1",
                                     "t.parquet:2"]
    assert [d.text for d in load_documents(str(tmp_path / "rows.jsonl"))] == ["one", "two"]


def test_bad_data_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_documents(str(tmp_path / "missing"))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no non-empty documents"):
        load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="--text-field"):
        load_documents(str(tmp_path / "bad.jsonl"))


def test_byte_tokenizer_and_flat_corpus() -> None:
    corpus = tokenize([Document(key="a", text="hé"), Document(key="b", text="!")], ByteTokenizer())
    assert corpus.tokens.tolist() == [104, 0xC3, 0xA9, 33] and corpus.offsets.tolist() == [0, 3, 4]
    assert corpus.tokens.dtype == np.uint16


def test_bpe_is_trained_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHPILOT_CACHE", str(tmp_path))
    docs = [Document(key=f"{i}", text="def foo(bar):\n    return bar + 1\n" * 3) for i in range(20)]
    tok = load_tokenizer("bpe:300", [d.text for d in docs], fingerprint(docs))
    assert tok.vocab_size <= 300
    files = list((tmp_path / "tokenizers").glob("bpe-300-*.json"))
    assert len(files) == 1
    again = load_tokenizer("bpe:300", [], fingerprint(docs))  # from the cache: no texts needed
    ids = tok.encode_batch([docs[0].text])[0]
    assert np.array_equal(ids, again.encode_batch([docs[0].text])[0])
    assert len(ids) < len(docs[0].text.encode())  # merges learned on this corpus compress it
    with pytest.raises(DataError, match="not 'bytes', 'bpe:VOCAB' or an existing directory"):
        load_tokenizer(str(tmp_path / "nope"))


def test_unreachable_hf_dataset_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="dataset 'no-such-org/no-such-dataset' is not reachable"):
        load_documents("hf:no-such-org/no-such-dataset")
