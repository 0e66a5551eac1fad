import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from hybridlab.checkpoint import MODEL_FILE
from hybridlab.config import ArchConfig, AttentionSpec, Mamba2Spec
from hybridlab.data.corpus import CorpusConfig, CorpusTask
from hybridlab.model import HybridLM
from hybridlab.store import (
    Artifact,
    Candidate,
    Evaluation,
    create_tables,
    make_engine,
    session_scope,
)
from hybridlab.train import TrainConfig, train

# No test may reach the Hub; datasets and huggingface_hub read these once, at import.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
# lm-eval bootstraps perplexity stderrs in a process pool unless told not to.
os.environ["DISABLE_MULTIPROC"] = "1"

SEQ_LEN = 64


def tiny_arch(pattern: str = "M*", vocab_size: int = 257) -> ArchConfig:
    return ArchConfig.from_pattern(
        pattern, d_model=32, vocab_size=vocab_size,
        mamba2=Mamba2Spec(d_state=8, headdim=16, chunk_size=16), attention=AttentionSpec(n_heads=2),
    )


@pytest.fixture
def make_arch():
    return tiny_arch


@pytest.fixture
def random_model() -> HybridLM:
    return HybridLM(tiny_arch(), seed=1).eval()


@dataclass(frozen=True)
class Trained:
    model: HybridLM
    arch: ArchConfig
    run_dir: Path  # holds arch.yaml and step_* folders, as `hybridlab train` leaves them
    checkpoint: Path
    fingerprint: dict


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    """A tiny hybrid trained for a few dozen steps on the start of the default corpus."""
    root = tmp_path_factory.mktemp("trained")
    task = CorpusTask(None, CorpusConfig(seq_len=SEQ_LEN, max_bytes=400_000,
                                         max_eval_tokens=2048, cache_dir=str(root / "tokens")))
    arch = tiny_arch()
    model = HybridLM(arch, seed=0)
    cfg = TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup_steps=4, eval_every=40,
                      eval_batch_size=32)
    result = train(model, task, cfg, checkpoint_dir=root / "run")
    arch.save(root / "run" / "arch.yaml")
    return Trained(model.eval(), arch, root / "run", result.checkpoint, task.fingerprint())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def study_db(storage_url, trained):
    """A study database: trial 0 (value 0.5) trained, trial 1 (value 0.9) reusing its genome
    and holding one proxy-task evaluation."""
    url = storage_url
    engine = make_engine(url)
    create_tables(engine)
    study = optuna.create_study(study_name="evalstudy", storage=url, direction="maximize")
    for value in (0.5, 0.9):
        trial = study.ask()
        study.tell(trial, value)
    arch = trained.arch
    common = dict(study="evalstudy", genome_hash=arch.canonical_hash(), pattern=arch.pattern,
                  arch=arch.to_dict(), task="corpus", code_version="test",
                  task_fingerprint=dict(trained.fingerprint))
    with session_scope(engine) as session:
        session.add(Candidate(trial=0, status="trained", **common))
        session.add(Candidate(trial=1, status="reused", reused_from=0, **common))
        session.add(Evaluation(study="evalstudy", trial=1, task="corpus", metric="bits_per_byte",
                               value=2.5, stderr=None, harness="hybridlab-proxy",
                               harness_version="test"))
        session.add(Artifact(study="evalstudy", trial=0, kind="checkpoint:corpus",
                             path=str(trained.checkpoint),
                             sha256=sha256(trained.checkpoint / MODEL_FILE)))
    engine.dispose()
    return url
