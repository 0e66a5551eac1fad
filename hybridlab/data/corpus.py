"""Text corpora for held-out bits per byte: offline default corpus, user files, token memmaps.

A ``Corpus`` is a sorted list of UTF-8 documents, identical contents kept once, frozen by a
manifest (document id -> sha256) whose own sha256 is the corpus hash recorded with every result.
The default corpus is the running CPython's standard library (*.py, no tests, no site-packages)
plus the prose of ``pydoc_data/topics.py``, one document per topic: about 11 MB on every
machine, offline; its hash changes with the Python version.

``tokenize_corpus`` writes each document's tokens followed by ``<|endoftext|>`` into one flat
uint16 (uint32 for vocabularies over 65536) file under a cache folder, named by the corpus hash
and the tokenizer fingerprint, written to a temporary file and renamed so a reader never sees a
partial file, and reused by later calls.

``CorpusTask`` splits by document: a document is held out when the sha256 of its id (relative
path, or ``file:line`` for JSONL) falls below ``val_fraction``, so a document stays on its side
when others are added or edited. A corpus too small for that (a single file) splits its token
stream instead: the last ``val_fraction`` is held out.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from hybridlab.data.task import Batch
from hybridlab.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_fingerprint

DEFAULT_CACHE_DIR = Path("runs/cache/tokens")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl")
# Folder names pruned from the default corpus: installed packages, test suites, bytecode.
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                          "__pycache__"})
_TOPICS = "pydoc_data/topics.py"


@dataclass(frozen=True)
class Document:
    id: str  # relative POSIX path, "topics.py:<topic>" or "<file>.jsonl:<line>"
    text: bytes  # valid UTF-8

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.text).hexdigest()


@dataclass(frozen=True)
class Corpus:
    """Documents sorted by id, each content once; ``skipped``: unreadable or non-UTF-8 files."""

    name: str
    documents: tuple[Document, ...]
    skipped: tuple[str, ...] = ()

    @cached_property
    def manifest(self) -> dict[str, str]:
        """Document id -> sha256 of its content, sorted by id."""
        return {d.id: d.sha256 for d in self.documents}

    @cached_property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    @property
    def n_bytes(self) -> int:
        return sum(len(d.text) for d in self.documents)


def _build(name: str, candidates: Iterable[Document], skipped: list[str],
           max_bytes: int | None) -> Corpus:
    """Sort by id, drop empty and repeated contents, keep the longest prefix within max_bytes."""
    docs: list[Document] = []
    seen: set[str] = set()
    total = 0
    for doc in sorted(candidates, key=lambda d: d.id):
        if not doc.text or doc.sha256 in seen:
            continue
        if max_bytes is not None and total + len(doc.text) > max_bytes:
            break
        seen.add(doc.sha256)
        docs.append(doc)
        total += len(doc.text)
    if not docs:
        raise ValueError(f"corpus {name!r} has no documents"
                         + (f" within max_bytes={max_bytes}" if max_bytes is not None else ""))
    return Corpus(name, tuple(docs), tuple(sorted(skipped)))


def _read_utf8(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return data


def _topics(source: bytes) -> dict[str, str]:
    """The ``topics`` dict literal of pydoc_data/topics.py, parsed without executing it."""
    for node in ast.parse(source).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "topics"):
            topics = ast.literal_eval(node.value)
            if isinstance(topics, dict):
                return {str(k): str(v) for k, v in topics.items()}
    raise ValueError("no topics dict")


def default_corpus(*, max_bytes: int | None = None) -> Corpus:
    """The running CPython's standard library source and pydoc topics (about 11 MB)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[Document] = []
    skipped: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP)
        for file in sorted(files):
            if not file.endswith(".py"):
                continue
            path = Path(folder, file)
            rel = path.relative_to(root).as_posix()
            data = _read_utf8(path)
            if data is None:
                skipped.append(rel)
            elif rel == _TOPICS:
                try:
                    topics = _topics(data)
                except (SyntaxError, ValueError):
                    skipped.append(rel)
                    continue
                docs += [Document(f"{rel}:{k}", v.encode()) for k, v in topics.items()]
            else:
                docs.append(Document(rel, data))
    return _build("stdlib", docs, skipped, max_bytes)


def _jsonl_documents(path: Path, rel: str, text_field: str) -> Iterator[Document]:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON line: {e}") from e
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{lineno}: no field {text_field!r} in this JSON line")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {text_field!r} is "
                                 f"{type(text).__name__}, expected a string")
            yield Document(f"{rel}:{lineno}", text.encode())


def load_corpus(
    path: str | os.PathLike[str],
    *,
    text_field: str = "text",
    suffixes: tuple[str, ...] | None = TEXT_SUFFIXES,
    max_bytes: int | None = None,
) -> Corpus:
    """A text file, a JSONL file (``text_field`` of each line) or a folder of them.

    Folders are read recursively in sorted order, hidden entries skipped; ``suffixes`` selects
    files (None: every file that is UTF-8 text). Folder files that are not UTF-8 are skipped and
    listed in ``Corpus.skipped``; a single file that is not is an error.
    """
    root = Path(path)
    if root.is_file():
        if root.suffix == ".jsonl":
            docs = list(_jsonl_documents(root, root.name, text_field))
        else:
            data = _read_utf8(root)
            if data is None:
                raise ValueError(f"{root}: not a readable UTF-8 text file")
            docs = [Document(root.name, data)]
        return _build(str(root), docs, [], max_bytes)
    if not root.is_dir():
        raise ValueError(f"{root}: no such file or folder")
    docs = []
    skipped: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(files):
            if file.startswith(".") or (suffixes is not None and not file.endswith(suffixes)):
                continue
            file_path = Path(folder, file)
            rel = file_path.relative_to(root).as_posix()
            if file.endswith(".jsonl"):
                docs += _jsonl_documents(file_path, rel, text_field)
                continue
            data = _read_utf8(file_path)
            if data is None:
                skipped.append(rel)
            else:
                docs.append(Document(rel, data))
    return _build(str(root), docs, skipped, max_bytes)


@dataclass(frozen=True)
class TokenFile:
    """A tokenised corpus: ``tokens[offsets[i]:offsets[i + 1]]`` is document i and its EOT."""

    path: Path
    tokens: np.memmap  # (n_tokens,) uint16 or uint32
    doc_ids: tuple[str, ...]
    offsets: np.ndarray  # (n_docs + 1,) int64
    corpus_hash: str
    tokenizer: dict[str, str]


def _atomic_write(path: Path, chunks: Iterable[bytes]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private; a shared cache must be readable by other workers.
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _open_cached(meta_path: Path, bin_path: Path, corpus: Corpus,
                 fingerprint: dict[str, str]) -> TokenFile | None:
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        if (meta["corpus_hash"] != corpus.hash or meta["tokenizer"] != fingerprint
                or bin_path.stat().st_size != meta["n_tokens"] * dtype.itemsize):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))
    return TokenFile(bin_path, tokens, tuple(meta["doc_ids"]),
                     np.asarray(meta["offsets"], dtype=np.int64), corpus.hash, fingerprint)


def tokenize_corpus(
    corpus: Corpus,
    tokenizer: Tokenizer,
    *,
    cache_dir: str | os.PathLike[str] = DEFAULT_CACHE_DIR,
) -> TokenFile:
    """Tokenise once into ``<cache_dir>/<key>.tokens`` (+ ``.json``); later calls reuse it."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    key = hashlib.sha256(
        f"{corpus.hash}/{fingerprint['kind']}/{fingerprint['hash']}".encode()).hexdigest()[:24]
    folder = Path(cache_dir)
    bin_path, meta_path = folder / f"{key}.tokens", folder / f"{key}.json"
    cached = _open_cached(meta_path, bin_path, corpus, fingerprint)
    if cached is not None:
        return cached
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    lengths: list[int] = []

    def chunks() -> Iterator[bytes]:
        for doc in corpus.documents:
            ids = np.asarray([*tokenizer.encode(doc.text), tokenizer.eot_id], dtype=dtype)
            lengths.append(len(ids))
            yield ids.tobytes()

    # The token file goes first and the metadata last: a cache entry counts only once both exist.
    _atomic_write(bin_path, chunks())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    meta = {"corpus_hash": corpus.hash, "tokenizer": fingerprint, "dtype": dtype.name,
            "n_tokens": int(offsets[-1]), "doc_ids": [d.id for d in corpus.documents],
            "offsets": offsets.tolist()}
    _atomic_write(meta_path, [json.dumps(meta).encode()])
    opened = _open_cached(meta_path, bin_path, corpus, fingerprint)
    assert opened is not None
    return opened


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """Knobs of a corpus task.

    ``seq_len``: tokens per window. ``val_fraction``: share held out. ``split``: "document",
    "tail" or "auto" (document, unless that leaves either side without a full window).
    ``max_eval_tokens``: cap on the validation windows' tokens (evenly spread when capped).
    ``max_bytes``: corpus size cap (sorted-prefix of documents). ``text_field``: JSONL field.
    ``tokenizer``: "byte" or a BPE tokenizer JSON path. ``cache_dir``: token memmap cache.
    """

    seq_len: int = 256
    val_fraction: float = 0.05
    split: Literal["auto", "document", "tail"] = "auto"
    max_eval_tokens: int = 1 << 17
    max_bytes: int | None = None
    text_field: str = "text"
    tokenizer: str = "byte"
    cache_dir: str = str(DEFAULT_CACHE_DIR)

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len: must be an int >= 1, got {self.seq_len!r}")
        if not isinstance(self.val_fraction, int | float) or not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction: must be in (0, 1), got {self.val_fraction!r}")
        if self.split not in ("auto", "document", "tail"):
            raise ValueError(f"split: must be auto, document or tail, got {self.split!r}")
        if not isinstance(self.max_eval_tokens, int) or self.max_eval_tokens < self.seq_len:
            raise ValueError(f"max_eval_tokens: must be an int >= seq_len, "
                             f"got {self.max_eval_tokens!r}")
        if self.max_bytes is not None and (not isinstance(self.max_bytes, int)
                                           or self.max_bytes < 1):
            raise ValueError(f"max_bytes: must be None or an int >= 1, got {self.max_bytes!r}")
        for name in ("text_field", "tokenizer", "cache_dir"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: must be a string, got {getattr(self, name)!r}")


def _doc_is_val(doc_id: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return h < val_fraction * 2**64


def _segments(mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(S, 2) token ranges of the maximal runs of consecutive documents where ``mask`` is set."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[0::2], edges[1::2]
    return np.stack([offsets[starts], offsets[ends]], axis=1)


class CorpusTask:
    """Next-token prediction on a corpus, scored in bits per byte on held-out text.

    Training windows of seq_len + 1 tokens start uniformly at random inside the training ranges
    (runs of consecutive training documents; a window never crosses into held-out text, and a run
    shorter than a window is unused). Validation windows tile the held-out ranges with stride
    seq_len, so each held-out token is a target once; past ``max_eval_tokens`` an evenly spaced
    subset is kept. ``bytes_per_token`` is the UTF-8 bytes per target token over exactly those
    windows (``<|endoftext|>`` counts as a token of 0 bytes).
    """

    VERSION = 1
    metric: Literal["accuracy", "bits_per_byte"] = "bits_per_byte"

    def __init__(
        self,
        source: Corpus | str | os.PathLike[str] | None = None,
        config: CorpusConfig | None = None,
        *,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """``source``: a Corpus, a file or folder path, or None for the default corpus."""
        self.config = config = config or CorpusConfig()
        if isinstance(source, Corpus):
            corpus = source
        elif source is None:
            corpus = default_corpus(max_bytes=config.max_bytes)
        else:
            corpus = load_corpus(source, text_field=config.text_field, max_bytes=config.max_bytes)
        self.corpus = corpus
        self.name = "corpus" if source is None else f"corpus:{corpus.name}"
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
        self.vocab_size: int = self.tokenizer.vocab_size
        self.seq_len: int = config.seq_len
        self.tokens = tokenize_corpus(corpus, self.tokenizer, cache_dir=config.cache_dir)
        self.split, self._train_ranges, self._val_ranges = self._split()
        self._eval_starts = self._validation_starts()
        window_lengths = self._train_ranges[:, 1] - self._train_ranges[:, 0] - self.seq_len
        self._train_counts = np.cumsum(np.maximum(window_lengths, 0))
        targets = self._windows(self._eval_starts)[:, 1:]
        byte_lengths = self.tokenizer.token_byte_lengths()
        self.bytes_per_token = float(byte_lengths[targets].sum() / targets.size)

    def _split(self) -> tuple[str, np.ndarray, np.ndarray]:
        """The split used, and (S, 2) token ranges of training and validation text."""
        cfg, offsets = self.config, self.tokens.offsets
        window = self.seq_len + 1
        if cfg.split in ("auto", "document"):
            val = np.array([_doc_is_val(d, cfg.val_fraction) for d in self.tokens.doc_ids])
            train_r, val_r = _segments(~val, offsets), _segments(val, offsets)

            def fits(ranges: np.ndarray) -> bool:
                return bool(len(ranges)) and int((ranges[:, 1] - ranges[:, 0]).max()) >= window

            if fits(train_r) and fits(val_r):
                return "document", train_r, val_r
            if cfg.split == "document":
                raise ValueError(
                    f"{self.name}: a split by document at val_fraction={cfg.val_fraction} leaves "
                    f"no {window}-token window on one side ({len(offsets) - 1} documents); "
                    "use split='tail'")
        n = int(offsets[-1])
        cut = n - max(window, round(n * cfg.val_fraction))
        if cut < window:
            raise ValueError(f"{self.name}: {n} tokens are too few for a training and a "
                             f"validation window of {window} tokens")
        return "tail", np.array([[0, cut]]), np.array([[cut, n]])

    def _validation_starts(self) -> np.ndarray:
        starts = np.concatenate([np.arange(a, b - self.seq_len, self.seq_len)
                                 for a, b in self._val_ranges])
        keep = max(1, self.config.max_eval_tokens // self.seq_len)
        if len(starts) > keep:
            starts = starts[(np.arange(keep) * len(starts)) // keep]
        return starts.astype(np.int64)

    def _windows(self, starts: np.ndarray) -> np.ndarray:
        """(len(starts), seq_len + 1) int64 token windows."""
        tokens = self.tokens.tokens
        return np.stack([tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)

    @staticmethod
    def _batch(windows: np.ndarray) -> Batch:
        w = torch.from_numpy(windows)
        return Batch(w[:, :-1].contiguous(), w[:, 1:].contiguous())

    def fingerprint(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "name": self.name, "version": self.VERSION, "corpus_hash": self.corpus.hash,
            "tokenizer": self.tokens.tokenizer, "split": self.split,
            "val_fraction": cfg.val_fraction, "seq_len": self.seq_len,
            "max_eval_tokens": cfg.max_eval_tokens, "n_eval_windows": len(self._eval_starts),
        }

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        """(batch_size, seq_len) windows starting uniformly in the training ranges."""
        picks = torch.randint(int(self._train_counts[-1]), (batch_size,), generator=generator)
        picks = picks.numpy()
        segment = np.searchsorted(self._train_counts, picks, side="right")
        before = np.concatenate([[0], self._train_counts])[segment]
        starts = self._train_ranges[segment, 0] + (picks - before)
        return self._batch(self._windows(starts))

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(0, len(self._eval_starts), batch_size):
            yield self._batch(self._windows(self._eval_starts[i : i + batch_size]))
