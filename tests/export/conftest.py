"""A trained tiny candidate and study databases built row by row, as the search records them."""

from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch

from hybridlab.checkpoint import MODEL_FILE, save_checkpoint
from hybridlab.config import ArchConfig, AttentionSpec, Mamba2Spec, MLPSpec
from hybridlab.data.tasks import make_task
from hybridlab.export.common import sha256_file
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

TASK_OPTIONS = {"vocab_size": 64, "seq_len": 32, "num_kv_pairs": 2, "n_test": 32}


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[HybridLM, Path, dict]:
    """M-M-*- (one setting per layer kind, so mamba_ssm and Megatron fit it) trained a few steps
    on MQAR: (model, checkpoint folder, task fingerprint)."""
    task = make_task("mqar", seed=0, **TASK_OPTIONS)
    arch = ArchConfig.from_pattern(
        "M-M-*-", d_model=64, vocab_size=64,
        mamba2=Mamba2Spec(d_state=16, headdim=16, chunk_size=16),
        attention=AttentionSpec(n_heads=4, n_kv_heads=2),
        mlp=MLPSpec(multiplier=2.0, multiple_of=16),
    )
    model = HybridLM(arch, seed=0)
    cfg = TrainConfig(steps=4, batch_size=8, lr=3e-3, warmup_steps=1, eval_every=4,
                      eval_batch_size=32)
    folder = tmp_path_factory.mktemp("train")
    # A model this small trains fastest on one thread; more only contend for shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(model, task, cfg, checkpoint_dir=folder)
    finally:
        torch.set_num_threads(threads)
    assert result.checkpoint is not None
    return model.eval(), result.checkpoint, task.fingerprint()


@pytest.fixture
def checkpoint_of(tmp_path):
    """Write an (untrained) model's checkpoint as the trainer does; returns its folder."""
    def write(model: HybridLM) -> Path:
        return save_checkpoint(tmp_path / "ckpt" / model.config.canonical_hash(), 1,
                               model=model, train_state={"step": 1})
    return write


@dataclass
class TrialRow:
    """One trial to record: its objective values, and what hybridlab's tables say about it."""

    values: list[float]
    status: str = "trained"
    arch: ArchConfig | None = None
    checkpoint: Path | None = None
    reused_from: int | None = None
    reason: str | None = None
    fingerprint: dict | None = None


def _make_study(
    tmp_path: Path, rows: list[TrialRow], *, directions: list[str], name: str = "s",
) -> str:
    """A SQLite study database holding ``rows`` as finished trials; returns its URL."""
    url = f"sqlite:///{tmp_path / f'{name}.db'}"
    engine = make_engine(url)
    create_tables(engine)
    metrics = ["accuracy", "params"][: len(directions)]
    study = optuna.create_study(study_name=name, storage=url, directions=directions)
    study.set_user_attr("objectives", metrics)
    for number, row in enumerate(rows):
        state = (optuna.trial.TrialState.PRUNED if row.status in ("pruned", "rejected")
                 else optuna.trial.TrialState.COMPLETE)
        values = row.values if state == optuna.trial.TrialState.COMPLETE else None
        study.add_trial(optuna.trial.create_trial(state=state, values=values))
        arch = row.arch
        with session_scope(engine) as session:
            session.add(Candidate(
                study=name, trial=number, status=row.status, reason=row.reason,
                genome_hash=arch.canonical_hash() if arch else None,
                pattern=arch.pattern if arch else None, arch=arch.to_dict() if arch else None,
                params=1000, state_context=256, task="mqar",
                task_fingerprint=row.fingerprint or {"name": "mqar", "params": {"seq_len": 32}},
                corpus_hash=None, code_version="0.1.0+test", reused_from=row.reused_from,
                objectives=dict(zip(metrics, row.values, strict=False)),
            ))
            if row.checkpoint is not None:
                session.add(Artifact(study=name, trial=number, kind="checkpoint:mqar",
                                     path=str(row.checkpoint),
                                     sha256=sha256_file(row.checkpoint / MODEL_FILE)))
                session.add(Evaluation(study=name, trial=number, task="mqar",
                                       metric="accuracy", value=row.values[0], stderr=None,
                                       harness="hybridlab-proxy", harness_version="test"))
    engine.dispose()
    return url


@pytest.fixture
def make_study(tmp_path):
    """make_study(rows, directions=[...]) -> URL of a study database holding ``rows``."""
    def make(rows: list[TrialRow], *, directions: list[str], name: str = "s") -> str:
        return _make_study(tmp_path, rows, directions=directions, name=name)
    return make


@pytest.fixture
def row():
    """The TrialRow class, for tests to describe trials."""
    return TrialRow


@pytest.fixture
def logits():
    """logits(model) on fixed random tokens."""
    def run(model: HybridLM) -> torch.Tensor:
        tokens = torch.randint(model.config.vocab_size, (2, 24),
                               generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return model.eval()(tokens)
    return run
