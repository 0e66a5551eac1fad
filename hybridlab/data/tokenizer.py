"""Tokenizers: byte-level by default, optionally a BPE trained offline with ``tokenizers``.

Both satisfy ``Tokenizer``. A tokenizer is identified by ``tokenizer_fingerprint`` (its kind and
the sha256 of its serialised form), which keys the token caches and is stored with results.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from hybridlab.files import write_text_atomic

ENDOFTEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    eot_id: int  # separates documents in a token stream

    def encode(self, text: str | bytes) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str:
        """UTF-8 text; invalid byte sequences become U+FFFD."""
        ...

    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...

    def token_byte_lengths(self) -> np.ndarray:
        """(vocab_size,) int64: corpus bytes each id stands for (0 for special tokens)."""
        ...

    def to_json(self) -> str:
        """Everything that determines the id mapping, serialised (what the fingerprint hashes)."""
        ...


def tokenizer_fingerprint(tokenizer: Tokenizer) -> dict[str, str]:
    """Kind and sha256 of the serialised tokenizer, e.g. ``{"kind": "byte", "hash": "9f2c..."}``."""
    digest = hashlib.sha256(tokenizer.to_json().encode()).hexdigest()
    return {"kind": tokenizer.kind, "hash": digest}


class ByteTokenizer:
    """Ids 0..255 are the bytes themselves; 256 is ``<|endoftext|>``; ``vocab_size`` is 257.

    ``encode`` never produces special ids (the text ``<|endoftext|>`` stays bytes), so
    ``decode_bytes(encode(b)) == b`` for any bytes ``b``. Decoding renders a special id as its name.
    """

    kind = "byte"
    eot_id = 256
    vocab_size = 257
    special_tokens: ClassVar[dict[str, int]] = {ENDOFTEXT: 256}

    def encode(self, text: str | bytes) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return list(data)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        names = {i: name.encode() for name, i in self.special_tokens.items()}
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i in names:
                out += names[i]
            else:
                raise ValueError(f"token id {i} is outside the vocabulary 0..{self.vocab_size - 1}")
        return bytes(out)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[256:] = 0
        return lengths

    def to_json(self) -> str:
        spec = {"kind": self.kind, "special_tokens": self.special_tokens}
        return json.dumps(spec, sort_keys=True)


@cache
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel BPE vocabularies hold)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars: dict[str, int] = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            "BPETokenizer needs the optional package 'tokenizers' (pip install tokenizers); "
            "the default ByteTokenizer needs nothing"
        ) from e
    return tokenizers


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) from the ``tokenizers`` package.

    Trained offline on local documents and saved as ``bpe-<hash16>.json``, the hash being that of
    the file's content; nothing is ever downloaded. It encodes UTF-8 text: ``encode`` rejects
    bytes that are not valid UTF-8. Special tokens in the input text are encoded as plain text.
    """

    kind = "bpe"

    def __init__(self, serialized: str) -> None:
        tokenizers = _import_tokenizers()
        self._json = serialized
        self._tok = tokenizers.Tokenizer.from_str(serialized)
        # "<|endoftext|>" in a document is data, not a document boundary.
        self._tok.encode_special_tokens = True
        eot = self._tok.token_to_id(ENDOFTEXT)
        if eot is None:
            raise ValueError(f"BPE tokenizer has no {ENDOFTEXT} token")
        self.eot_id: int = eot
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self._special = {t.content for t in self._tok.get_added_tokens_decoder().values()}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        return cls(Path(path).read_text(encoding="utf-8"))

    @classmethod
    def train(
        cls,
        documents: Iterable[str | bytes],
        *,
        vocab_size: int = 4096,
        out_dir: str | os.PathLike[str],
    ) -> BPETokenizer:
        """Train on ``documents`` (UTF-8) and save under ``out_dir`` (reused if already there)."""
        tokenizers = _import_tokenizers()
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[ENDOFTEXT],
            # Every byte is in the vocabulary, so any text encodes without unknown tokens.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        texts = (d.decode("utf-8") if isinstance(d, bytes) else d for d in documents)
        tok.train_from_iterator(texts, trainer=trainer)
        serialized = tok.to_str()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"bpe-{hashlib.sha256(serialized.encode()).hexdigest()[:16]}.json"
        if not path.exists():
            write_text_atomic(path, serialized)
        return cls(serialized)

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"BPETokenizer encodes UTF-8 text only: {e}") from e
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        alphabet = byte_level_alphabet()
        out = bytearray()
        for i in ids:
            token = self._tok.id_to_token(int(i))
            if token is None:
                raise ValueError(f"token id {i} is outside the vocabulary 0..{self.vocab_size - 1}")
            out += token.encode() if token in self._special else bytes(alphabet[c] for c in token)
        return bytes(out)

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            if token is not None and token not in self._special:
                lengths[i] = len(token)
        return lengths

    def to_json(self) -> str:
        return self._json


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` for the ByteTokenizer, else the path of a saved BPE tokenizer JSON file."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"tokenizer {spec!r}: expected 'byte' or the path of a BPE tokenizer JSON file")
    return BPETokenizer.load(path)


def tokenizer_of(fingerprint: dict | None, spec: str | None) -> tuple[Tokenizer | None, str | None]:
    """The tokenizer a task fingerprint names, and a note when it cannot be had.

    ``spec`` is the task's ``tokenizer`` option ("byte" or a BPE file), which the fingerprint
    alone does not hold; the tokenizer is returned only when its fingerprint matches. A task
    without text (MQAR, MAD, a suite of them) has none.
    """
    named = (fingerprint or {}).get("tokenizer")
    if not named:
        return None, "no tokenizer: the task's tokens are not text (a synthetic task)"
    try:
        tokenizer = load_tokenizer(spec or "byte")
    except (ValueError, ImportError) as err:
        return None, f"the task's tokenizer could not be loaded ({err})"
    if tokenizer_fingerprint(tokenizer) != named:
        return None, (f"the tokenizer {spec or 'byte'!r} is not the one the model was trained "
                      f"with (fingerprint {named}); the export has none")
    return tokenizer, None

