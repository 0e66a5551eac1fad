import random
import sys

import numpy as np
import pytest

from hybridlab.data.tokenizer import (
    ENDOFTEXT,
    BPETokenizer,
    ByteTokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
)

TEXTS = [
    "",
    "hello world",
    "def f(x):\n\treturn x  # ünïcödé\r\n",
    "日本語のテキスト 🙂 and emoji 👩‍👩‍👧",
    f"a literal {ENDOFTEXT} inside text is data",
]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("length", [0, 1, 7, 255, 4096])
def test_byte_round_trip_on_random_bytes(seed: int, length: int) -> None:
    data = random.Random(seed * 7919 + length).randbytes(length)
    tok = ByteTokenizer()
    ids = tok.encode(data)
    assert len(ids) == length
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode_bytes(ids) == data


def test_byte_round_trip_on_invalid_utf8_and_text() -> None:
    tok = ByteTokenizer()
    for data in [b"\xff\xfe\x80abc\xc3", b"\xc3(", b"\xed\xa0\x80", b"\x00\x00"]:
        assert tok.decode_bytes(tok.encode(data)) == data
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.eot_id not in tok.encode(f"x{ENDOFTEXT}y")
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"


def test_byte_special_tokens_and_vocab() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eot_id == 256
    assert tok.decode([104, 105, tok.eot_id]) == f"hi{ENDOFTEXT}"
    assert tok.token_byte_lengths().tolist() == [1] * 256 + [0]
    with pytest.raises(ValueError, match="257"):
        tok.decode([257])


def test_fingerprint_is_kind_and_stable_hash() -> None:
    a, b = tokenizer_fingerprint(ByteTokenizer()), tokenizer_fingerprint(ByteTokenizer())
    assert a == b
    assert a["kind"] == "byte" and len(a["hash"]) == 64
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="byte"):
        load_tokenizer("no/such/tokenizer.json")


def _train_docs() -> list[bytes]:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "λambda", "ε", "def", "return", "\n", "    "]
    return [" ".join(rng.choice(words) for _ in range(300)).encode() for _ in range(20)]


def test_bpe_trains_offline_saves_by_hash_and_round_trips(tmp_path) -> None:
    pytest.importorskip("tokenizers")
    a = BPETokenizer.train(_train_docs(), vocab_size=300, out_dir=tmp_path / "a")
    b = BPETokenizer.train(_train_docs(), vocab_size=300, out_dir=tmp_path / "b")
    fp = tokenizer_fingerprint(a)
    assert fp == tokenizer_fingerprint(b) and fp["kind"] == "bpe"
    (saved,) = (tmp_path / "a").iterdir()
    assert saved.name == f"bpe-{fp['hash'][:16]}.json"
    loaded = load_tokenizer(str(saved))
    assert tokenizer_fingerprint(loaded) == fp
    lengths = a.token_byte_lengths()
    assert lengths.shape == (a.vocab_size,) and lengths[a.eot_id] == 0
    for text in TEXTS:
        ids = a.encode(text)
        assert a.decode(ids) == text and a.decode_bytes(ids) == text.encode()
        assert loaded.encode(text) == ids
        assert int(np.sum(lengths[ids])) == len(text.encode())
        assert a.eot_id not in ids
    # Merges were learnt: common words take fewer tokens than bytes.
    assert len(a.encode("alpha beta gamma")) < len(b"alpha beta gamma")
    with pytest.raises(ValueError, match="UTF-8"):
        a.encode(b"\xff")


def test_bpe_without_tokenizers_package_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        BPETokenizer("{}")
