import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridlab.data.corpus import (
    CorpusConfig,
    CorpusTask,
    default_corpus,
    load_corpus,
    tokenize_corpus,
)
from hybridlab.data.tokenizer import ByteTokenizer


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _write(tmp_path / "docs", {
        "a.txt": b"first document\n",
        "sub/b.md": b"# second\n",
        "sub/deeper/c.py": b"print('third')\n",
        "dup.txt": b"first document\n",
        "empty.txt": b"",
        "latin1.txt": b"caf\xe9\n",
        "image.png": b"\x89PNG",
        ".hidden.txt": b"hidden\n",
        ".git/config.txt": b"git\n",
    })


def test_folder_manifest_is_sorted_deduplicated_and_stable(folder: Path) -> None:
    a, b = load_corpus(folder), load_corpus(folder)
    assert a.manifest == b.manifest and a.hash == b.hash
    # dup.txt repeats a.txt; empty, hidden, non-UTF-8 and non-text files are left out.
    assert list(a.manifest) == ["a.txt", "sub/b.md", "sub/deeper/c.py"]
    assert a.skipped == ("latin1.txt",)
    assert re.fullmatch(r"[0-9a-f]{64}", a.hash)
    assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in a.manifest.values())


def test_corpus_hash_changes_when_a_file_changes(folder: Path) -> None:
    before = load_corpus(folder)
    (folder / "sub" / "b.md").write_bytes(b"# second, edited\n")
    after = load_corpus(folder)
    assert after.hash != before.hash
    assert after.manifest["a.txt"] == before.manifest["a.txt"]
    assert after.manifest["sub/b.md"] != before.manifest["sub/b.md"]


def test_folder_options_suffixes_and_max_bytes(folder: Path) -> None:
    assert list(load_corpus(folder, suffixes=(".md",)).manifest) == ["sub/b.md"]
    # None selects every UTF-8 file, whatever its name.
    everything = load_corpus(folder, suffixes=None)
    assert "image.png" not in everything.manifest and "latin1.txt" in everything.skipped
    capped = load_corpus(folder, max_bytes=len(b"first document\n") + len(b"# second\n"))
    assert list(capped.manifest) == ["a.txt", "sub/b.md"]


def test_default_corpus_loads_offline_with_a_hash() -> None:
    corpus = default_corpus()
    ids = list(corpus.manifest)
    assert ids == sorted(ids)
    assert 2_000_000 < corpus.n_bytes < 100_000_000
    assert re.fullmatch(r"[0-9a-f]{64}", corpus.hash)
    assert "os.py" in corpus.manifest
    assert any(i.startswith("pydoc_data/topics.py:") for i in ids)
    assert "pydoc_data/topics.py" not in corpus.manifest
    for doc_id in ids:
        parts = doc_id.split("/")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), doc_id
    shas = [d.sha256 for d in corpus.documents]
    assert len(shas) == len(set(shas))


def test_default_corpus_cap_is_a_deterministic_prefix() -> None:
    small = default_corpus(max_bytes=200_000)
    assert small.hash == default_corpus(max_bytes=200_000).hash
    assert 0 < small.n_bytes <= 200_000
    full_ids = list(default_corpus().manifest)
    assert list(small.manifest) == full_ids[: len(small.manifest)]


def test_jsonl_documents_and_field(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n{"body": "three"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:4: no field 'text'"):
        load_corpus(path)
    path.write_text('{"body": "one"}\n{"body": "two"}\n')
    corpus = load_corpus(path, text_field="body")
    assert list(corpus.manifest) == ["data.jsonl:1", "data.jsonl:2"]
    assert [d.text for d in corpus.documents] == [b"one", b"two"]


def test_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    folder = _write(tmp_path / "shards", {
        "ok.jsonl": b'{"text": "fine"}\n',
        "bad.jsonl": b'{"text": "fine"}\n{"text": "fine too"}\n{"text": broken\n',
    })
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        load_corpus(folder)
    (folder / "bad.jsonl").write_bytes(b'{"text": "a"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'text' is int"):
        load_corpus(folder)
    (folder / "bad.jsonl").write_bytes(b'["not", "an", "object"]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: no field 'text'"):
        load_corpus(folder)


def test_missing_path_and_non_utf8_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_corpus(tmp_path / "nope")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match=r"bad\.txt"):
        load_corpus(bad)


class CountingByteTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        self.calls = 0

    def encode(self, text: str | bytes) -> list[int]:
        self.calls += 1
        return super().encode(text)


def test_token_cache_is_written_once_and_reused(folder: Path, tmp_path: Path) -> None:
    corpus = load_corpus(folder)
    tok = CountingByteTokenizer()
    cache = tmp_path / "cache"
    first = tokenize_corpus(corpus, tok, cache_dir=cache)
    assert tok.calls == len(corpus.documents)
    second = tokenize_corpus(corpus, tok, cache_dir=cache)
    assert tok.calls == len(corpus.documents), "second call re-tokenised"
    assert second.path == first.path and first.tokens.dtype == np.uint16
    assert isinstance(second.tokens, np.memmap)
    expected = b"".join(d.text + b"\x00" for d in corpus.documents)
    tokens = np.asarray(second.tokens)
    assert len(tokens) == len(expected)
    eots = second.offsets[1:] - 1
    assert (tokens[eots] == tok.eot_id).all()
    assert bytes(np.delete(tokens, eots).astype(np.uint8)) == expected.replace(b"\x00", b"")
    assert second.doc_ids == tuple(corpus.manifest)
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".tokens"]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in cache.iterdir()), "shared cache"


def test_interrupted_or_truncated_cache_is_never_read(folder: Path, tmp_path: Path) -> None:
    corpus = load_corpus(folder)
    cache = tmp_path / "cache"

    class Failing(ByteTokenizer):
        def encode(self, text: str | bytes) -> list[int]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(corpus, Failing(), cache_dir=cache)
    assert list(cache.iterdir()) == []
    good = tokenize_corpus(corpus, ByteTokenizer(), cache_dir=cache)
    with open(good.path, "r+b") as f:
        f.truncate(3)
    tok = CountingByteTokenizer()
    again = tokenize_corpus(corpus, tok, cache_dir=cache)
    assert tok.calls == len(corpus.documents)
    assert len(again.tokens) == len(good.tokens)


def test_large_vocabularies_use_uint32(folder: Path, tmp_path: Path) -> None:
    class Wide(ByteTokenizer):
        vocab_size = 70_000

        def to_json(self) -> str:
            return json.dumps({"kind": "wide"})

    tokens = tokenize_corpus(load_corpus(folder), Wide(), cache_dir=tmp_path)
    assert tokens.tokens.dtype == np.uint32


def _tagged_folder(root: Path, n_docs: int = 60, size: int = 3000) -> Path:
    """Documents made of their own tag, so any window tells which documents it came from."""
    files = {}
    for i in range(n_docs):
        tag = f"<{i:03d}>"
        files[f"d{i:03d}.txt"] = (tag * (size // len(tag))).encode()
    return _write(root, files)


def _tags(batch_tokens: torch.Tensor) -> set[int]:
    tags: set[int] = set()
    for row in batch_tokens.tolist():
        text = bytes(t for t in row if t < 256).decode()
        tags |= {int(m) for m in re.findall(r"\d{3}", text)}
    return tags


def test_document_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    folder = _tagged_folder(tmp_path / "tagged")
    config = CorpusConfig(seq_len=32, val_fraction=0.2, cache_dir=str(tmp_path / "cache"),
                          max_eval_tokens=4096)
    a, b = CorpusTask(folder, config), CorpusTask(folder, config)
    assert a.split == "document"
    assert a.fingerprint() == b.fingerprint()
    eval_a = list(a.eval_batches(16))
    eval_b = list(b.eval_batches(16))
    assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(eval_a, eval_b, strict=True))
    assert sum(x.inputs.numel() for x in eval_a) <= 4096
    val_tags = set().union(*(_tags(x.inputs) | _tags(x.targets) for x in eval_a))
    gen = torch.Generator().manual_seed(0)
    train_tags = set().union(*(_tags(a.train_batch(32, gen).targets) for _ in range(20)))
    assert val_tags and train_tags
    assert not val_tags & train_tags


def test_document_split_is_stable_when_documents_are_added(tmp_path: Path) -> None:
    folder = _tagged_folder(tmp_path / "tagged")
    config = CorpusConfig(seq_len=32, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))

    def held_out() -> set[int]:
        task = CorpusTask(folder, config)
        return set().union(*(_tags(b.inputs) for b in task.eval_batches(64)))

    before = held_out()
    _write(folder, {f"e{i:03d}.txt": f"<{100 + i:03d}>".encode() * 600 for i in range(20)})
    after = held_out()
    assert before and before == {t for t in after if t < 100}


def test_windows_shift_and_bytes_per_token(tmp_path: Path) -> None:
    folder = _tagged_folder(tmp_path / "tagged")
    task = CorpusTask(folder, CorpusConfig(seq_len=16, cache_dir=str(tmp_path / "c")))
    assert task.metric == "bits_per_byte" and task.vocab_size == 257
    batch = task.train_batch(8, torch.Generator().manual_seed(3))
    assert batch.inputs.shape == batch.targets.shape == (8, 16)
    assert batch.inputs.dtype == torch.int64
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert batch.mask.all()
    same = task.train_batch(8, torch.Generator().manual_seed(3))
    assert torch.equal(batch.inputs, same.inputs)
    targets = torch.cat([b.targets for b in task.eval_batches(64)])
    eot_share = (targets == 256).float().mean().item()
    assert task.bytes_per_token == pytest.approx(1 - eot_share)
    assert 0.99 < task.bytes_per_token <= 1.0


def test_single_file_splits_its_tail(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_bytes(bytes(range(32, 127)) * 50)
    config = CorpusConfig(seq_len=32, val_fraction=0.1, cache_dir=str(tmp_path / "c"))
    task = CorpusTask(path, config)
    assert task.split == "tail" and task.name == f"corpus:{path}"
    n = len(task.tokens.tokens)
    assert task._val_ranges.tolist() == [[n - round(0.1 * n), n]]
    assert task._train_ranges.tolist() == [[0, n - round(0.1 * n)]]
    with pytest.raises(ValueError, match="split='tail'"):
        CorpusTask(path, CorpusConfig(seq_len=32, split="document", cache_dir=str(tmp_path)))


def test_fingerprint_names_corpus_tokenizer_split_and_seq_len(tmp_path: Path) -> None:
    folder = _tagged_folder(tmp_path / "tagged")
    task = CorpusTask(folder, CorpusConfig(seq_len=16, cache_dir=str(tmp_path / "c")))
    fp = task.fingerprint()
    assert fp["corpus_hash"] == load_corpus(folder).hash
    assert fp["tokenizer"]["kind"] == "byte"
    assert fp["split"] == "document" and fp["seq_len"] == 16
    other = CorpusTask(folder, CorpusConfig(seq_len=24, cache_dir=str(tmp_path / "c")))
    assert other.fingerprint() != fp


def test_default_corpus_task_with_a_cap(tmp_path: Path) -> None:
    config = CorpusConfig(seq_len=64, max_bytes=300_000, cache_dir=str(tmp_path))
    task = CorpusTask(None, config)
    assert task.name == "corpus"
    assert task.fingerprint()["corpus_hash"] == default_corpus(max_bytes=300_000).hash
    assert next(task.eval_batches(4)).inputs.shape == (4, 64)


@pytest.mark.parametrize(("knob", "value"), [
    ("seq_len", 0), ("val_fraction", 1.0), ("split", "random"), ("max_eval_tokens", 3),
    ("max_bytes", 0), ("tokenizer", 3),
])
def test_config_errors_name_the_knob(knob: str, value: object) -> None:
    with pytest.raises(ValueError, match=knob):
        CorpusConfig(**{knob: value})
