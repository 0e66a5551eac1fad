"""A small seeded text corpus and a search space of tiny language models over it, shared by the
promotion, data-parallel and cluster tests."""

import random
from pathlib import Path

WORDS = ("state", "space", "model", "attention", "scan", "token", "layer", "mamba", "hybrid",
         "kernel", "chunk", "decay", "head", "query", "key", "value")


def write_corpus(folder: Path, *, seed: int = 0, words: int = 6000) -> Path:
    """Four documents of seeded random words."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for doc in range(4):
        text = " ".join(rng.choice(WORDS) for _ in range(words // 4))
        (folder / f"doc{doc}.txt").write_text(text + "\n")
    return folder


def corpus_space(*, name: str, corpus: Path, cache: Path, trials: int, workers: int, train: str,
                 depth: tuple[int, int] = (1, 2), eval_tokens: int = 2048, tail: str = "") -> str:
    """Space YAML: ``train`` is the flow mapping of train settings, ``tail`` more top-level
    sections (resources, promotion)."""
    return f"""
name: {name}
seed: 0
trials: {trials}
workers: {workers}
task:
  name: corpus:{corpus}
  options: {{seq_len: 32, max_eval_tokens: {eval_tokens}, cache_dir: {cache}}}
train: {train}
model:
  d_model: 32
  depth: {{low: {depth[0]}, high: {depth[1]}}}
  layer_types: [mamba2, attention]
  rules: {{mlp_after_mixer: always}}
  mamba2: {{d_state: 8, headdim: 16, chunk_size: 16}}
  attention: {{n_heads: 2}}
objectives:
  - {{metric: bits_per_byte, direction: minimize}}
sampler: random
pruner: none
{tail}"""
