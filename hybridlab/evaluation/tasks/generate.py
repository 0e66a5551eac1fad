"""Generate the local lm-eval tasks' data: ``python -m hybridlab.evaluation.tasks.generate``.

Every text task is built from the held-out documents of the default corpus (the documents that
``CorpusTask`` keeps out of training at the default ``val_fraction``), so a model trained on the
default corpus never saw them. All randomness comes from seeds derived from ``SEED``; the same
corpus gives the same files byte for byte. ``data/manifest.json`` records the corpus hash (it
changes with the Python version, since the corpus is the standard library) and each file's
sha256.

- ``bpb.jsonl``: excerpts of whole lines, about 1 KB each, scored with ``loglikelihood_rolling``.
- ``cloze.jsonl``: LAMBADA-style prose passages (docstrings and pydoc topics) cut before a final
  word that already occurred in the passage, so the context determines it.
- ``nextline.jsonl``: code context and four candidate next lines (the true one and three lines
  from other documents, re-indented like the true one), multiple choice.
- ``mqar.jsonl``: MQAR examples (``hybridlab.data.synthetic.MQAR``) rendered as text,
  ``k=07`` key-value facts then queries; the model generates the value of the last query.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# _doc_is_val is CorpusTask's own split rule: held out here means held out from training.
from hybridlab.data.corpus import CorpusConfig, Document, _doc_is_val, default_corpus
from hybridlab.data.synthetic import MQAR, MQARConfig, derive_seed
from hybridlab.data.task import IGNORE
from hybridlab.evaluation.tasks import DATA_DIR

SEED = 0
VERSION = 1
TOPICS_PREFIX = "pydoc_data/topics.py:"
_WORD = re.compile(r"[A-Za-z]{4,}")

# MQAR rendered as text: key ids 1..26 are the letters a..z, value ids 27..53 are 00..26.
MQAR_CONFIG = MQARConfig(vocab_size=54, seq_len=64, num_kv_pairs=8, n_test=64)


def _rng(task: str) -> np.random.Generator:
    return np.random.default_rng(derive_seed("hybridlab-eval", task, SEED))


def bpb_records(
    docs: Sequence[Document], *, n: int = 32, target_bytes: int = 1000, max_bytes: int = 1400
) -> list[dict[str, Any]]:
    """``n`` excerpts of whole lines, at least ``target_bytes`` and at most ``max_bytes`` each."""
    rng = _rng("bpb")
    eligible = [d for d in docs if len(d.text) >= 2 * target_bytes]
    order = rng.permutation(len(eligible))
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for k in range(n * 4):
        if len(records) == n:
            break
        doc = eligible[order[k % len(eligible)]]
        lines = doc.text.decode().splitlines(keepends=True)
        sizes = np.array([len(line.encode()) for line in lines])
        after = np.cumsum(sizes[::-1])[::-1]  # bytes from each line to the end
        starts = np.flatnonzero(after >= target_bytes)
        start = int(rng.choice(starts))
        text, size = "", 0
        for line in lines[start:]:
            if size >= target_bytes or size + len(line.encode()) > max_bytes:
                break
            text += line
            size += len(line.encode())
        if size < target_bytes or text in seen:
            continue
        seen.add(text)
        records.append({"id": f"{doc.id}:{start + 1}", "text": text})
    if len(records) < n:
        raise ValueError(f"bpb: only {len(records)} distinct excerpts of the held-out text")
    return records


def _prose_blocks(doc: Document) -> list[str]:
    """Docstrings of a Python document, or the whole text of a pydoc topic."""
    text = doc.text.decode()
    if doc.id.startswith(TOPICS_PREFIX):
        return [text]
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [s for node in ast.walk(tree) if isinstance(node, kinds)
            if (s := ast.get_docstring(node, clean=True))]


def _cloze(paragraph: str, *, min_context: int, max_context: int) -> tuple[str, str] | None:
    """(context, word): cut before the last word of 4+ letters that occurred earlier in it."""
    seen: set[str] = set()
    best = None
    for m in _WORD.finditer(paragraph):
        word = m.group()
        whole = m.end() == len(paragraph) or not (paragraph[m.end()].isalnum()
                                                  or paragraph[m.end()] == "_")
        if word in seen and whole and m.start() >= min_context and paragraph[m.start() - 1] == " ":
            best = m
        seen.add(word)
    if best is None:
        return None
    context = paragraph[: best.start() - 1]
    if len(context) > max_context:
        cut = context.find(" ", len(context) - max_context)
        context = context[cut + 1 :]
    letters = sum(c.isalpha() or c == " " for c in context)
    if letters < 0.85 * len(context):
        return None
    return context, best.group()


def cloze_records(
    docs: Sequence[Document], *, n: int = 64, min_context: int = 80, max_context: int = 600
) -> list[dict[str, Any]]:
    """LAMBADA-style passages: ``context`` then " " and the one-word ``target``."""
    candidates = []
    for doc in docs:
        for b, block in enumerate(_prose_blocks(doc)):
            for p, paragraph in enumerate(re.split(r"\n\s*\n", block)):
                found = _cloze(" ".join(paragraph.split()), min_context=min_context,
                               max_context=max_context)
                if found is not None:
                    candidates.append({"id": f"{doc.id}:{b}:{p}", "context": found[0],
                                       "target": found[1]})
    if len(candidates) < n:
        raise ValueError(f"cloze: only {len(candidates)} passages qualify, {n} wanted")
    picks = _rng("cloze").choice(len(candidates), size=n, replace=False)
    return [candidates[i] for i in sorted(picks)]


def _context_start(lines: Sequence[str], i: int, max_bytes: int) -> int:
    """First line of the longest run of whole lines ending before line i within max_bytes."""
    size, j = 0, i
    while j > 0 and size + len(lines[j - 1].encode()) + 1 <= max_bytes:
        j -= 1
        size += len(lines[j].encode()) + 1
    return j


def nextline_records(
    docs: Sequence[Document], *, n: int = 64, n_choices: int = 4, min_line: int = 16,
    max_line: int = 60, min_context: int = 150, max_context: int = 500,
) -> list[dict[str, Any]]:
    """Code context and ``n_choices`` candidate next lines; ``label`` is the true one's index.

    Lines are at most ``max_line`` bytes, so a choice fits even a short model window.
    """
    rng = _rng("nextline")
    code = [d for d in docs if d.id.endswith(".py") and not d.id.startswith("encodings/")]
    lines = [d.text.decode().split("\n") for d in code]
    def usable(line: str) -> bool:
        return len(line.strip()) >= min_line and len(line.encode()) <= max_line

    pool = [(k, line.strip()) for k, doc_lines in enumerate(lines) for line in doc_lines
            if usable(line)]
    order = rng.permutation(len(code))
    records: list[dict[str, Any]] = []
    used: set[tuple[int, int]] = set()
    for step in range(n * 8):
        if len(records) == n:
            break
        k = int(order[step % len(code)])
        doc_lines = lines[k]
        positions = [
            i for i in range(1, len(doc_lines))
            if usable(doc_lines[i]) and (k, i) not in used
            and len("\n".join(doc_lines[_context_start(doc_lines, i, max_context):i]))
            >= min_context
        ]
        if not positions:
            continue
        i = int(rng.choice(positions))
        used.add((k, i))
        true = doc_lines[i]
        indent = true[: len(true) - len(true.lstrip())]
        others: list[str] = []
        while len(others) < n_choices - 1:
            other_doc, other = pool[int(rng.integers(len(pool)))]
            line = indent + other
            if (other_doc != k and other != true.strip() and line not in others
                    and len(line.encode()) <= max_line):
                others.append(line)
        choices = [true, *others]
        perm = rng.permutation(n_choices)
        start = _context_start(doc_lines, i, max_context)
        records.append({
            "id": f"{code[k].id}:{i + 1}",
            "context": "\n".join(doc_lines[start:i]) + "\n",
            "choices": [choices[p] for p in perm],
            "label": int(np.flatnonzero(perm == 0)[0]),
        })
    if len(records) < n:
        raise ValueError(f"nextline: only {len(records)} questions could be built, {n} wanted")
    return records


def _key(token: int) -> str:
    return chr(ord("a") + token - 1)


def _value(token: int) -> str:
    return f"{token - MQAR_CONFIG.vocab_size // 2:02d}"


def mqar_records(config: MQARConfig = MQAR_CONFIG) -> list[dict[str, Any]]:
    """MQAR test examples as text: facts, answered queries, then the last query to complete."""
    task = MQAR(config, seed=SEED)
    test = task.generate(config.n_test, derive_seed("hybridlab-eval", "mqar", SEED), test=True)
    records = []
    for row, (inputs, targets) in enumerate(zip(test.inputs.tolist(), test.targets.tolist(),
                                                strict=True)):
        pairs = 2 * config.num_kv_pairs
        facts = " ".join(f"{_key(inputs[i])}={_value(inputs[i + 1])}" for i in range(0, pairs, 2))
        queries = [(inputs[i], targets[i]) for i in range(pairs, config.seq_len)
                   if targets[i] != IGNORE]
        answered = "".join(f"{_key(k)}={_value(v)} " for k, v in queries[:-1])
        last_key, last_value = queries[-1]
        records.append({"id": f"mqar:{row}", "prompt": f"{facts}. {answered}{_key(last_key)}=",
                        "answer": _value(last_value)})
    return records


def _jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def generate(out_dir: str | Path = DATA_DIR) -> dict[str, Any]:
    """Write every task's JSONL and ``manifest.json`` into ``out_dir``; returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    val_fraction = CorpusConfig().val_fraction
    corpus = default_corpus()
    docs = [d for d in corpus.documents if _doc_is_val(d.id, val_fraction)]
    files = {
        "bpb.jsonl": bpb_records(docs),
        "cloze.jsonl": cloze_records(docs),
        "nextline.jsonl": nextline_records(docs),
        "mqar.jsonl": mqar_records(),
    }
    manifest: dict[str, Any] = {
        "version": VERSION, "seed": SEED,
        "corpus": {"name": corpus.name, "hash": corpus.hash, "val_fraction": val_fraction,
                   "held_out_documents": len(docs),
                   "python": ".".join(map(str, sys.version_info[:3]))},
        "mqar": {"vocab_size": MQAR_CONFIG.vocab_size, "seq_len": MQAR_CONFIG.seq_len,
                 "num_kv_pairs": MQAR_CONFIG.num_kv_pairs},
        "files": {},
    }
    for name, records in files.items():
        data = _jsonl(records)
        (out / name).write_bytes(data)
        manifest["files"][name] = {"records": len(records), "bytes": len(data),
                                   "sha256": hashlib.sha256(data).hexdigest()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DATA_DIR), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    manifest = generate(args.out)
    for name, info in manifest["files"].items():
        print(f"{name}: {info['records']} records, {info['bytes']:,} bytes")
    print(f"corpus {manifest['corpus']['hash'][:12]} (Python {manifest['corpus']['python']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
