from pathlib import Path

import pytest
import torch

from hybridlab.data import (
    MQAR,
    SPECS,
    CorpusTask,
    FuzzyInContextRecall,
    SelectiveCopying,
    make_task,
    task_knobs,
)
from hybridlab.data.task import TaskData


def _check_protocol(task: TaskData) -> None:
    for attr in ("name", "vocab_size", "seq_len", "metric", "bytes_per_token"):
        assert hasattr(task, attr), attr
    batch = task.train_batch(2, torch.Generator().manual_seed(0))
    assert batch.inputs.shape == (2, task.seq_len)
    assert next(iter(task.eval_batches(2))).inputs.shape[1] == task.seq_len
    assert task.fingerprint()["name"] == task.name


@pytest.mark.parametrize("spec", [s for s in SPECS if s.startswith(("mqar", "mad:"))])
def test_every_synthetic_spec_builds(spec: str) -> None:
    task = make_task(spec, seed=3, n_test=4)
    assert task.name == spec and task.metric == "accuracy"
    assert task.fingerprint()["seed"] == 3
    _check_protocol(task)


def test_overrides_set_knobs_and_mad_lab_spellings_work() -> None:
    task = make_task("mqar", seed=0, num_kv_pairs=8, seq_len=128)
    assert isinstance(task, MQAR)
    assert task.config.num_kv_pairs == 8 and task.seq_len == 128
    assert isinstance(make_task("mad:fuzzy-in-context-recall", seed=0), FuzzyInContextRecall)
    copy = make_task("mad:selective_copying", seed=0, num_tokens_to_copy=4, seq_len=32)
    assert isinstance(copy, SelectiveCopying) and copy.config.num_tokens_to_copy == 4


def test_unknown_task_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'mad:recall'.*mad:in_context_recall"):
        make_task("mad:recall", seed=0)
    with pytest.raises(ValueError, match=r"unknown task 'zoology'.*mqar.*corpus:<path>"):
        make_task("zoology", seed=0)


def test_unknown_or_invalid_knob_names_it() -> None:
    with pytest.raises(ValueError, match=r"unknown knob 'num_pairs'.*num_kv_pairs"):
        make_task("mqar", seed=0, num_pairs=4)
    with pytest.raises(ValueError, match=r"unknown knob 'frac_noise'.*vocab_size"):
        make_task("mad:in_context_recall", seed=0, frac_noise=0.5)
    with pytest.raises(ValueError, match=r"unknown knob 'num_kv_pairs'.*val_fraction"):
        make_task("corpus", seed=0, num_kv_pairs=4)
    with pytest.raises(ValueError, match=r"'mad:selective_copying'.*num_tokens_to_copy"):
        make_task("mad:selective_copying", seed=0, num_tokens_to_copy=200)


def test_task_knobs_lists_defaults() -> None:
    assert task_knobs("mqar") == {"vocab_size": 8192, "seq_len": 64, "num_kv_pairs": 4,
                                  "power_a": 0.01, "n_train": None, "n_test": 3000}
    assert "frac_noise" in task_knobs("mad:noisy_in_context_recall")
    assert "val_fraction" in task_knobs("corpus:anything")


def test_corpus_specs(tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(30):
        (folder / f"{i:02d}.md").write_text(f"document {i}\n" * 200)
    task = make_task(f"corpus:{folder}", seed=0, seq_len=32, cache_dir=str(tmp_path / "c"))
    assert isinstance(task, CorpusTask) and task.metric == "bits_per_byte"
    assert task.name == f"corpus:{folder}"
    _check_protocol(task)
    default = make_task("corpus", seed=0, seq_len=32, max_bytes=100_000,
                        cache_dir=str(tmp_path / "c"))
    assert default.name == "corpus"
    _check_protocol(default)
    with pytest.raises(ValueError, match="path"):
        make_task("corpus:", seed=0)
    with pytest.raises(ValueError, match="no such file"):
        make_task(f"corpus:{tmp_path / 'missing'}", seed=0)
