"""Search trials with ``resources.workers_per_trial > 1`` train data-parallel on Ray Train."""

import optuna
import pytest
from optuna.trial import TrialState

from hybridlab.config import ArchConfig, ConfigError
from hybridlab.data.tasks import make_task
from hybridlab.model import HybridLM
from hybridlab.search.runner import run_search
from hybridlab.search.space import parse_space
from hybridlab.store import Candidate, make_engine, transaction
from hybridlab.train import train
from tests.search.corpus_space import corpus_space, write_corpus


def space_text(corpus, cache) -> str:
    return corpus_space(
        name="parallel", corpus=corpus, cache=cache, trials=2, workers=1, eval_tokens=1024,
        train="{steps: 12, batch_size: 4, lr: 0.003, warmup_steps: 2, eval_every: 6, "
              "eval_batch_size: 16, checkpoint_every: 6}",
        tail="resources: {cpus_per_worker: 1, threads_per_worker: 1, workers_per_trial: 2}\n")


def test_workers_per_trial_is_checked_against_the_batch_and_the_pruner(tmp_path):
    text = space_text(tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="split evenly over 3 workers") as err:
        parse_space(text.replace("workers_per_trial: 2", "workers_per_trial: 3"),
                    check_task=False)
    assert err.value.field == "resources.workers_per_trial"
    with pytest.raises(ConfigError, match="use pruner: none"):
        parse_space(text.replace("pruner: none", "pruner: median"), check_task=False)


@pytest.mark.slow
def test_a_data_parallel_trial_matches_training_in_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    corpus = write_corpus(tmp_path / "corpus")
    space_file = tmp_path / "space.yaml"
    space_file.write_text(space_text(corpus, tmp_path / "cache"))
    url = f"sqlite:///{tmp_path / 'parallel.db'}"
    summary = run_search(space_file, storage_url=url, runs_dir=tmp_path / "runs",
                         echo=lambda _: None, heartbeat_interval=2, grace_period=20)
    assert summary.complete == 2
    study = optuna.load_study(study_name="parallel", storage=url)
    engine = make_engine(url)
    candidates = transaction(engine, lambda session: Candidate.of_study(session, "parallel"))
    engine.dispose()
    space = parse_space(space_file.read_text())
    task = make_task(space.task, seed=0, **dict(space.task_options))
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert len(t.user_attrs["train_nodes"]) == 2  # one entry per rank
        arch = ArchConfig.from_dict(candidates[t.number].arch)
        alone = train(HybridLM(arch, seed=0), task, space.train)
        # Equal global batch, same data stream: the same result up to float reduction order.
        assert t.value == pytest.approx(alone.metrics["bits_per_byte"], rel=1e-4)
