import argparse
import json
import os
import subprocess
import sys
import time

import lm_eval
import optuna
import pytest
import sqlalchemy as sa

from hybridlab.checkpoint import MODEL_FILE
from hybridlab.evaluation import lm_eval_cli
from hybridlab.evaluation.hub import HubDatasetUnavailable, check_hub_tasks, scan_lm_eval_tasks
from hybridlab.evaluation.lm_eval import HybridLabLM
from hybridlab.evaluation.loading import EvalError, resolve_device, resolve_trial, top_trials
from hybridlab.evaluation.run import HARNESS, add_eval_arguments, eval_command, run_lm_eval
from hybridlab.evaluation.tasks import LOCAL_TASKS, TASKS_DIR
from hybridlab.store import Evaluation, make_engine, session_scope


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hybridlab eval")
    add_eval_arguments(parser)
    return parser.parse_args(argv)


def stored(url: str, trial: int) -> list[Evaluation]:
    engine = make_engine(url)
    with session_scope(engine) as session:
        rows = session.scalars(sa.select(Evaluation).where(Evaluation.trial == trial)).all()
    engine.dispose()
    return list(rows)


def test_eval_command_stores_scores_and_trial_user_attrs(study_db, capsys):
    args = parse("--study", "evalstudy", "--storage", study_db, "--top", "1",
                 "--tasks", "hybridlab_local", "--limit", "3", "--device", "cpu")
    assert eval_command(args) == 0
    out = capsys.readouterr().out
    # Trial 1 has the better value; it reused trial 0's genome, so trial 0's checkpoint loads.
    assert "trial 1 of study 'evalstudy'" in out and "stored in" in out
    proxy = [r for r in stored(study_db, 1) if r.harness != HARNESS]
    assert [(r.task, r.value) for r in proxy] == [("corpus", 2.5)]
    rows = [r for r in stored(study_db, 1) if r.harness == HARNESS]
    assert {r.task for r in rows} == set(LOCAL_TASKS)
    assert {r.harness_version for r in rows} == {lm_eval.__version__}
    by_metric = {(r.task, r.metric): r for r in rows}
    assert by_metric[("hybridlab_nextline", "acc")].stderr is not None
    assert by_metric[("hybridlab_bpb", "bits_per_byte")].stderr is None
    attrs = optuna.load_study(study_name="evalstudy", storage=study_db).trials[1].user_attrs
    assert attrs["lm_eval/hybridlab_bpb/bits_per_byte"] == pytest.approx(
        by_metric[("hybridlab_bpb", "bits_per_byte")].value)

    # Evaluating again replaces the trial's rows instead of adding to them.
    assert eval_command(parse("--study", "evalstudy", "--storage", study_db, "--trial", "1",
                              "--tasks", "hybridlab_mqar", "--limit", "2")) == 0
    rows = [r for r in stored(study_db, 1) if r.harness == HARNESS]
    assert len(rows) == len(by_metric)
    assert sum(r.task == "hybridlab_mqar" for r in rows) == 1


def test_trials_resolve_to_their_recorded_checkpoint(study_db, trained, tmp_path):
    assert top_trials(study_db, "evalstudy", 2) == [1, 0]
    own, reused = resolve_trial(study_db, "evalstudy", 0), resolve_trial(study_db, "evalstudy", 1)
    assert own.checkpoint == reused.checkpoint == trained.checkpoint
    assert reused.seq_len == 64 and reused.arch == trained.arch
    with pytest.raises(EvalError, match="study 'evalstudy' has no trial 7"):
        resolve_trial(study_db, "evalstudy", 7)
    with pytest.raises(EvalError, match="no study 'other'"):
        resolve_trial(study_db, "other", 0)
    with pytest.raises(EvalError, match="no database file"):
        top_trials(f"sqlite:///{tmp_path / 'missing.db'}", "evalstudy", 1)


def test_a_changed_checkpoint_is_refused(study_db, trained, tmp_path):
    weights = trained.checkpoint / MODEL_FILE
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(EvalError, match="modified after training"):
            resolve_trial(study_db, "evalstudy", 0)
    finally:
        weights.write_bytes(original)


def test_eval_command_rejects_mixed_or_missing_selectors(trained):
    with pytest.raises(EvalError, match="--trial go with --study"):
        eval_command(parse("--checkpoint", str(trained.run_dir), "--trial", "1",
                           "--tasks", "hybridlab_bpb"))
    with pytest.raises(EvalError, match="either --trial N or --top K"):
        eval_command(parse("--study", "s", "--tasks", "hybridlab_bpb"))
    with pytest.raises(SystemExit):
        parse("--tasks", "hybridlab_bpb")


def test_unknown_task_is_named(random_model):
    started = time.perf_counter()
    with pytest.raises(EvalError, match="unknown task 'hybridlab_nope'"):
        check_hub_tasks(["hybridlab_bpb", "hybridlab_nope"])
    assert time.perf_counter() - started < 5
    # A word lm-eval's task files contain without it naming a task: lm-eval's index decides.
    lm = HybridLabLM(random_model, max_length=64)
    with pytest.raises(EvalError, match="unknown task 'doc_to_text'"):
        run_lm_eval(lm, ["doc_to_text", "hybridlab_bpb"])


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def test_hub_task_offline_fails_fast_naming_the_task(trained, empty_hf_cache):
    started = time.perf_counter()
    with pytest.raises(HubDatasetUnavailable) as err:
        eval_command(parse("--checkpoint", str(trained.run_dir),
                           "--tasks", "hybridlab_bpb,hellaswag", "--device", "cpu"))
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert "'hellaswag'" in message and "Rowan/hellaswag" in message
    assert "not cached" in message and "offline mode" in message


def test_hub_task_without_network_fails_fast(empty_hf_cache, monkeypatch):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    # A closed local port: the probe is refused at once, as when there is no network.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    started = time.perf_counter()
    with pytest.raises(HubDatasetUnavailable, match=r"'arc_easy'.*cannot be reached"):
        check_hub_tasks(["arc_easy"])
    assert time.perf_counter() - started < 5


def test_hub_tasks_resolve_to_their_datasets():
    found, unmentioned = scan_lm_eval_tasks(["lambada_openai", "hellaswag", "piqa", "arc_easy",
                                             "arc_challenge", "winogrande"])
    assert not unmentioned
    assert found == {
        "lambada_openai": ("EleutherAI/lambada_openai", "default"),
        "hellaswag": ("Rowan/hellaswag", None),
        "piqa": ("baber/piqa", None),
        "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
        "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
        "winogrande": ("allenai/winogrande", "winogrande_xl"),
    }


def test_a_cached_hub_dataset_passes_the_check(empty_hf_cache, tmp_path):
    prepared = tmp_path / "hf" / "datasets" / "allenai___ai2_arc" / "ARC-Easy" / "0.0.0" / "abc"
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text("{}")
    assert check_hub_tasks(["arc_easy", "hybridlab_bpb"]) == ["arc_easy"]


def test_importing_the_eval_command_does_not_import_lm_eval():
    code = ("import sys, hybridlab.evaluation.run, hybridlab.evaluation.hub; "
            "print('lm_eval' in sys.modules, 'datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_lm_eval_command_line_runs_the_registered_model(trained, tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "hybridlab.evaluation.lm_eval_cli", "--model", "hybridlab",
         "--model_args", f"checkpoint={trained.run_dir},max_length=128", "--device", "cpu",
         "--batch_size", "4", "--include_path", str(TASKS_DIR), "--tasks", "hybridlab_mqar",
         "--limit", "2"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hybridlab_mqar" in result.stdout and "exact_match" in result.stdout


@pytest.mark.parametrize("device_arg", [None, "device=cpu"])
def test_lm_eval_command_line_picks_hybridlabs_device(trained, tmp_path, monkeypatch, device_arg):
    """Without --device lm-eval would send its own default, cuda:0; a model argument device=
    must not collide with the --device that lm-eval always passes."""
    model_args = ",".join(filter(None, [f"checkpoint={trained.run_dir}", "max_length=128",
                                        device_arg]))
    monkeypatch.setattr(sys, "argv", [
        "lm_eval_cli", "--model", "hybridlab", "--model_args", model_args, "--batch_size", "4",
        "--include_path", str(TASKS_DIR), "--tasks", "hybridlab_mqar", "--limit", "2",
        "--output_path", str(tmp_path / "out")])
    monkeypatch.chdir(tmp_path)
    lm_eval_cli.main()
    (written,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(written.read_text())
    expected = "cpu" if device_arg else str(resolve_device(None))
    assert results["config"]["device"] == expected
    assert "exact_match,none" in results["results"]["hybridlab_mqar"]


@pytest.mark.parametrize(("cli", "config", "expected"), [
    ({"model": "hybridlab"}, None, str(resolve_device(None))),
    ({"model": "hybridlab", "device": "cuda:1"}, None, "cuda:1"),
    ({"model": "hybridlab", "model_args": {"device": "cpu"}}, None, "cpu"),
    ({}, "model: hybridlab\nmodel_args: device=cpu\n", "cpu"),
    # Set in the config file: lm-eval takes it from there.
    ({"model": "hybridlab"}, "device: cuda:1\n", None),
    # Another model keeps lm-eval's defaults.
    ({"model": "hf"}, None, None),
])
def test_lm_eval_command_line_device_default(cli, config, expected, tmp_path):
    path = tmp_path / "config.yaml"
    if config is not None:
        path.write_text(config)
    args = argparse.Namespace(**{"command": "run", "model": None, "model_args": None,
                                 "device": None, "config": str(path) if config else None, **cli})
    lm_eval_cli.default_device(args)
    assert args.device == expected


CUSTOM_TASK = """\
task: my_completion
dataset_path: json
dataset_kwargs:
  data_files:
    test: data/rows.jsonl
output_type: loglikelihood
test_split: test
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


@pytest.fixture
def custom_task(tmp_path):
    """A user's task folder: a task YAML and its JSONL data, named relative to the YAML."""
    folder = tmp_path / "my_tasks"
    (folder / "data").mkdir(parents=True)
    (folder / "my_task.yaml").write_text(CUSTOM_TASK)
    rows = [{"context": f"def f{i}(x):\n    return", "target": f"x + {i}"} for i in range(3)]
    (folder / "data" / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_a_task_file_runs_from_any_folder(trained, custom_task, tmp_path, monkeypatch, capsys):
    # From the folder above the YAML: the data file is named relative to the YAML, not to here.
    monkeypatch.chdir(tmp_path)
    assert eval_command(parse("--checkpoint", str(trained.run_dir), "--tasks",
                              "my_tasks/my_task.yaml,hybridlab_mqar", "--limit", "2",
                              "--device", "cpu")) == 0
    out = capsys.readouterr().out
    assert "my_completion" in out and "acc" in out and "hybridlab_mqar" in out
    # By name, through --include-path, from an unrelated folder.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert eval_command(parse("--checkpoint", str(trained.run_dir), "--include-path",
                              str(custom_task), "--tasks", "my_completion", "--limit", "2",
                              "--device", "cpu")) == 0
    assert "my_completion" in capsys.readouterr().out


def test_missing_task_folders_and_files_are_named(trained, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(EvalError, match=f"--include-path {missing}: no such folder"):
        eval_command(parse("--checkpoint", str(trained.run_dir), "--include-path", str(missing),
                           "--tasks", "hybridlab_bpb"))
    with pytest.raises(EvalError, match=r"--tasks: no task file .*mine\.yaml"):
        eval_command(parse("--checkpoint", str(trained.run_dir),
                           "--tasks", str(tmp_path / "mine.yaml")))
