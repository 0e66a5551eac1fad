import hashlib
import json
import math

import lm_eval
import pytest
from lm_eval.tasks import TaskManager

from hybridlab.data.corpus import default_corpus
from hybridlab.evaluation.hub import local_task_names
from hybridlab.evaluation.lm_eval import HybridLabLM
from hybridlab.evaluation.run import scores
from hybridlab.evaluation.task_manager import resolve_data_paths
from hybridlab.evaluation.tasks import DATA_DIR, LOCAL_GROUP, LOCAL_TASKS, TASKS_DIR
from hybridlab.evaluation.tasks.generate import generate

EXPECTED_METRICS = {
    "hybridlab_bpb": {"bits_per_byte", "byte_perplexity", "word_perplexity"},
    "hybridlab_cloze": {"acc", "perplexity"},
    "hybridlab_mqar": {"exact_match"},
    "hybridlab_nextline": {"acc", "acc_norm"},
}


def test_every_local_task_ships_small_data_matching_its_manifest():
    assert local_task_names() == {*LOCAL_TASKS, LOCAL_GROUP}
    manifest = json.loads((DATA_DIR / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        data = (DATA_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"], name
        assert 1_000 < len(data) < 64_000, name
    referenced = {line.split()[-1] for path in TASKS_DIR.glob("*.yaml")
                  for line in path.read_text().splitlines() if "data/" in line}
    assert referenced == {f"data/{name}" for name in manifest["files"]}


def test_generator_reproduces_the_shipped_data(tmp_path):
    manifest = json.loads((DATA_DIR / "manifest.json").read_text())
    if default_corpus().hash != manifest["corpus"]["hash"]:
        pytest.skip(f"the default corpus differs from the one the data came from "
                    f"(Python {manifest['corpus']['python']})")
    generate(tmp_path)
    for name in manifest["files"]:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


def test_simple_evaluate_runs_every_local_task_offline(trained, monkeypatch, tmp_path):
    # Relative paths must not depend on where lm-eval runs.
    monkeypatch.chdir(tmp_path)
    lm = HybridLabLM(trained.model, max_length=128, batch_size=8)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[LOCAL_GROUP], limit=4, bootstrap_iters=100, log_samples=False,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    found = {}
    for score in scores(results):
        found.setdefault(score.task, set()).add(score.metric)
        assert math.isfinite(score.value), score
    assert found == EXPECTED_METRICS
    bpb = next(s.value for s in scores(results) if s.metric == "bits_per_byte")
    # A byte model that learnt anything beats the uniform 8 bits per byte.
    assert bpb < 7.5
    assert results["config"]["genome_hash"] == trained.arch.canonical_hash()


def test_task_data_paths_resolve_against_the_yaml_folder(tmp_path):
    folder = tmp_path / "tasks"
    config = {
        "task": "t", "dataset_path": "./local_dataset",
        "dataset_kwargs": {
            "data_files": {"test": "data/test.jsonl",
                           "train": ["a/*.jsonl", "/abs/b.jsonl", "hf://datasets/x/y.json"]},
            "data_dir": "more",
        },
    }
    assert resolve_data_paths(config, folder) == {
        "task": "t", "dataset_path": str(folder / "local_dataset"),
        "dataset_kwargs": {
            "data_files": {"test": str(folder / "data/test.jsonl"),
                           "train": [str(folder / "a/*.jsonl"), "/abs/b.jsonl",
                                     "hf://datasets/x/y.json"]},
            "data_dir": str(folder / "more"),
        },
    }
    # Hub datasets and builder names stay as they are; the given config is not changed.
    hub = {"task": "h", "dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Easy"}
    assert resolve_data_paths(hub, folder) == hub
    assert config["dataset_kwargs"]["data_dir"] == "more"
    single = {"dataset_path": "json", "dataset_kwargs": {"data_files": "rows.jsonl"}}
    assert resolve_data_paths(single, folder)["dataset_kwargs"] == {
        "data_files": str(folder / "rows.jsonl")}
