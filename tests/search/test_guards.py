"""What `hybridlab search` refuses before Ray starts, and the runner's rules tested in-process."""

import os
import threading
import tracemalloc
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import ray
from optuna.trial import TrialState

from hybridlab.cli import main
from hybridlab.search import runner
from hybridlab.search.space import describe_pruner, parse_space
from hybridlab.store import Candidate, Slot, make_engine, open_engine, session_scope

TINY_SPACE = (Path(__file__).parent / "tiny_space.yaml").read_text()


@pytest.fixture
def space_file(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(TINY_SPACE)
    return path


def search(capsys, *argv: str) -> tuple[int, str]:
    code = main(["search", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--trials", "--workers", "--heartbeat-interval",
                                  "--grace-period"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_counts_and_intervals_below_one_are_refused_naming_the_flag(space_file, capsys, flag,
                                                                    value):
    with pytest.raises(SystemExit) as exit_:
        main(["search", str(space_file), flag, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be at least 1, got {value}" in err


def test_run_search_refuses_zero_trials_instead_of_using_the_space_default(space_file, tmp_path):
    with pytest.raises(runner.ConfigError, match="--trials: must be at least 1, got 0"):
        runner.run_search(space_file, trials=0, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_claiming_a_slot_of_a_huge_study_does_not_list_free_slots(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    opts = runner.RunOptions(study="tiny", storage_url=url, trials=10**6, workers=1,
                             artifacts_dir=tmp_path)
    runner.prepare_study(parse_space(TINY_SPACE), TINY_SPACE, opts)
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            session.add_all([Slot(study="tiny", slot=i, owner="x") for i in (0, 1, 3)])
        tracemalloc.start()
        claimed = [runner._claim_slot(engine, opts), runner._claim_slot(engine, opts)]
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        engine.dispose()
    assert claimed == [2, 4]
    assert peak < 2 * 1024**2


@pytest.mark.parametrize("case", ["postgres-unreachable", "sqlite-unwritable", "runs-dir",
                                  "infinite-cpus"])
def test_unusable_storage_folder_or_space_is_refused_before_ray_starts(
        tmp_path, capsys, monkeypatch, space_file, case):
    monkeypatch.chdir(tmp_path)
    before = set(os.listdir(tmp_path))
    args = [str(space_file)]
    if case == "postgres-unreachable":
        # A port nothing listens on (the kernel refuses at once).
        url = "postgresql+psycopg://nobody@127.0.0.1:1/none"
        args += ["--storage", url]
        expected = "cannot use the study database postgresql+psycopg://nobody@127.0.0.1:1/none"
    elif case == "sqlite-unwritable":
        args += ["--storage", "sqlite:////proc/x.db"]
        expected = "cannot write the SQLite database sqlite:////proc/x.db"
    elif case == "runs-dir":
        args += ["--runs-dir", "/proc/hybridlab-runs"]
        expected = "--runs-dir: cannot write to /proc/hybridlab-runs/tiny"
    else:
        space_file.write_text(TINY_SPACE.replace("cpus_per_worker: 1", "cpus_per_worker: .inf"))
        expected = "resources.cpus_per_worker"
    code, err = search(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridlab search: error: "), err
    assert expected in lines[0]
    assert "Traceback" not in err
    assert not ray.is_initialized()
    assert set(os.listdir(tmp_path)) == before


def test_changed_space_is_refused_with_a_diff_unless_allowed(tmp_path, space_file, capsys,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    opts = runner.RunOptions(study="tiny", storage_url=f"sqlite:///{tmp_path / 'runs/tiny.db'}",
                             trials=4, workers=1, artifacts_dir=tmp_path)
    runner.prepare_study(parse_space(TINY_SPACE), TINY_SPACE, opts)
    # Comments, layout and how-to-run keys may change: the same search resumes.
    reformatted = "# resumed\n" + TINY_SPACE.replace("trials: 4", "trials: 9").replace(
        "mamba1: {d_state: [4, 8]}", "mamba1:\n    d_state: [4, 8]")
    runner.prepare_study(parse_space(reformatted), reformatted, opts)

    changed = TINY_SPACE.replace("d_model: 32", "d_model: 48")
    space_file.write_text(changed)
    code, err = search(capsys, str(space_file), "--runs-dir", str(tmp_path / "runs"))
    assert code == 2
    assert "study 'tiny'" in err and "--allow-space-change" in err
    assert "-  d_model: 32" in err and "+  d_model: 48" in err
    assert not ray.is_initialized()
    study = optuna.load_study(study_name="tiny", storage=opts.storage_url)
    assert study.user_attrs["space"] == reformatted

    allowed = runner.RunOptions(**{**opts.__dict__, "allow_space_change": True})
    runner.prepare_study(parse_space(changed), changed, allowed)
    study = optuna.load_study(study_name="tiny", storage=opts.storage_url)
    assert study.user_attrs["space"] == changed


def test_give_up_rule_counts_only_this_runs_failures(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    space = parse_space(TINY_SPACE)
    opts = runner.RunOptions(study="tiny", storage_url=url, trials=2, workers=1,
                             artifacts_dir=tmp_path, poll_seconds=0.01, heartbeat_interval=1,
                             grace_period=2)
    study = runner.prepare_study(space, TINY_SPACE, opts)
    # Four trials left FAIL by earlier, interrupted runs.
    for _ in range(4):
        trial = study.ask()
        trial.set_user_attr(runner.RUN_ATTR, "an-earlier-run")
        study.tell(trial, state=TrialState.FAIL)
    opts = runner.begin_run(opts)
    assert runner.worker_loop(TINY_SPACE, None, opts, 0) == 2
    assert len(study.get_trials(states=runner.FINISHED)) == 2


def test_each_run_of_a_study_seeds_its_workers_apart(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    opts = runner.RunOptions(study="tiny", storage_url=url, trials=4, workers=2,
                             artifacts_dir=tmp_path)
    runner.prepare_study(parse_space(TINY_SPACE), TINY_SPACE, opts)
    first, second = runner.begin_run(opts), runner.begin_run(replace(opts, run_id="another"))
    # A fresh study keeps ranks 0..workers-1 (seed + rank, as before); the next run starts after.
    assert (first.first_rank, second.first_rank) == (0, runner.RANKS_PER_RUN)
    # A retried call that had committed finds its run instead of recording a second one.
    assert runner.begin_run(first).first_rank == 0


def test_pruned_candidate_names_the_pruner_step_and_value(tmp_path, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    text = TINY_SPACE.replace("pruner: none", "pruner: median")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    opts = runner.RunOptions(study="tiny", storage_url=url, trials=1, workers=1,
                             artifacts_dir=tmp_path, poll_seconds=0.01)
    study = runner.prepare_study(parse_space(text), text, opts)
    assert runner.worker_loop(text, None, opts, 0) == 1
    (trial,) = study.get_trials()
    candidate = _candidate(url, "tiny", trial.number)
    assert trial.state == TrialState.PRUNED and candidate.status == "pruned"
    value = trial.intermediate_values[10]
    assert candidate.reason == (f"pruned by {describe_pruner(parse_space(text))} at step 10: "
                                f"accuracy {value:.4g}")


def test_corrupt_checkpoint_falls_back_and_the_trial_completes_saying_so(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"

    def one_trial(study_name: str) -> optuna.trial.FrozenTrial:
        opts = runner.RunOptions(study=study_name, storage_url=url, trials=1, workers=1,
                                 artifacts_dir=tmp_path / "artifacts", poll_seconds=0.01)
        study = runner.prepare_study(parse_space(TINY_SPACE), TINY_SPACE, opts)
        assert runner.worker_loop(TINY_SPACE, None, opts, 0) == 1
        return study.get_trials()[0]

    first = one_trial("first")
    (folder,) = (tmp_path / "artifacts" / "checkpoints").iterdir()
    newest = sorted(folder.glob("step_*"))[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    # Another study in the same artifacts folder trains the same genome (same seed, first
    # proposal) and finds the finished checkpoint corrupt.
    second = one_trial("second")
    assert second.params == first.params
    assert second.state == TrialState.COMPLETE
    (note,) = second.user_attrs["checkpoint_recovery"]
    assert newest.name in note and "failed verification" in note
    candidate = _candidate(url, "second", second.number)
    assert candidate.status == "trained" and note in candidate.reason


def test_worker_exits_when_every_slot_is_claimed_elsewhere(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    opts = runner.RunOptions(study="tiny", storage_url=url, trials=2, workers=2,
                             artifacts_dir=tmp_path, poll_seconds=0.01)
    runner.prepare_study(parse_space(TINY_SPACE), TINY_SPACE, opts)
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            session.add_all([Slot(study="tiny", slot=i, owner="another-worker") for i in (0, 1)])
    finally:
        engine.dispose()
    # Idling would hold this worker's CPUs while the other trials run; it returns at once.
    ran: list[int] = []
    worker = threading.Thread(target=lambda: ran.append(
        runner.worker_loop(TINY_SPACE, None, opts, 1)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert ran == [0]


def test_overhead_is_measured_over_worker_lifetimes():
    # Two workers: one lived 100 s, one exited after 20 s; 108 s of training in all.
    summary = runner.SearchSummary(study="s", storage_url="u", finished=2, complete=2, pruned=0,
                                   failed=0, wall_seconds=110.0, train_seconds=108.0, workers=2,
                                   worker_seconds=120.0)
    assert summary.overhead_share == pytest.approx(0.1)


def test_ctrl_c_outside_a_search_is_one_line_and_exit_130(monkeypatch, capsys):
    from hybridlab import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "status", interrupted)
    assert main(["status"]) == 130
    assert capsys.readouterr().err == "hybridlab status: interrupted\n"


def test_driver_starts_a_worker_again_only_while_a_slot_is_free(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    opts = runner.RunOptions(study="tiny", storage_url=url, trials=2, workers=2,
                             artifacts_dir=tmp_path)
    study = runner.prepare_study(parse_space(TINY_SPACE), TINY_SPACE, opts)
    opts = runner.begin_run(opts)
    assert runner._work_left(study, opts)
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            session.add_all([Slot(study="tiny", slot=i, owner="w") for i in (0, 1)])
        assert not runner._work_left(study, opts)
        with session_scope(engine) as session:
            session.delete(session.get(Slot, ("tiny", 1)))
        assert runner._work_left(study, opts)
        # This run failed too often: nothing is started any more.
        for _ in range(runner.max_failures(2)):
            trial = study.ask()
            trial.set_user_attr(runner.RUN_ATTR, opts.run_id)
            study.tell(trial, state=TrialState.FAIL)
        assert not runner._work_left(study, opts)
    finally:
        engine.dispose()


def test_progress_counts_a_rejection_once_its_trial_is_pruned(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'p.db'}")
    running = study.ask()
    # The objective records the rejection before the trial ends PRUNED.
    running.set_user_attr("rejected", "over budget")
    line = runner.progress_line(study, 3, 0.0)
    assert "(complete 0, pruned 0, rejected 0) running 1" in line
    study.tell(running, state=TrialState.PRUNED)
    study.tell(study.ask(), state=TrialState.PRUNED)
    line = runner.progress_line(study, 3, 0.0)
    assert "finished 2/3 (complete 0, pruned 1, rejected 1) running 0" in line


def _candidate(url: str, study: str, trial: int) -> Candidate | None:
    with open_engine(url) as engine, session_scope(engine) as session:
        return Candidate.get(session, study, trial)



def test_a_worker_called_outside_ray_starts_no_ray(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    opts = runner.RunOptions(study="tiny", storage_url=url, trials=1, workers=1,
                             artifacts_dir=tmp_path / "runs")
    runner.prepare_study(parse_space(TINY_SPACE), TINY_SPACE, opts)
    assert runner.worker_loop(TINY_SPACE, None, opts, 0) == 1
    assert not ray.is_initialized()
