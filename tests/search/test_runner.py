"""End-to-end searches with real Ray workers and real databases (SQLite and PostgreSQL)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from hybridlab.search.runner import run_search
from hybridlab.search.status import study_table
from hybridlab.store import Artifact, Candidate, CurvePoint, Slot, make_engine

pytestmark = pytest.mark.slow
FAST_HEARTBEAT = {"heartbeat_interval": 1, "grace_period": 4}

TINY_SPACE = (Path(__file__).parent / "tiny_space.yaml").read_text()


def write_space(folder: Path, text: str = TINY_SPACE) -> Path:
    path = folder / "space.yaml"
    path.write_text(text)
    return path



def rows(url: str, model, study: str):
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(model).where(model.study == study)).all()
    finally:
        engine.dispose()


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def test_two_worker_search_finishes_exactly_the_requested_trials(tmp_path, storage_url):
    space = write_space(tmp_path)
    summary = run_search(space, storage_url=storage_url, runs_dir=tmp_path / "runs",
                         echo=lambda line: None, **FAST_HEARTBEAT)
    study = optuna.load_study(study_name="tiny", storage=storage_url)
    done = finished(study)
    assert summary.finished == len(done) == 4
    candidates = {c.trial: c for c in rows(storage_url, Candidate, "tiny")}
    assert set(candidates) >= {t.number for t in done}
    for t in done:
        c = candidates[t.number]
        if t.state == TrialState.COMPLETE:
            assert c.status in ("trained", "reused")
            assert c.objectives["accuracy"] == pytest.approx(t.value)
            assert c.pattern == t.user_attrs["pattern"] and c.params > 0
        else:
            assert c.status in ("rejected", "pruned", "failed")
    trained = [t for t in done if candidates[t.number].status == "trained"]
    assert trained
    curve_trials = {p.trial for p in rows(storage_url, CurvePoint, "tiny")}
    artifact_trials = {a.trial for a in rows(storage_url, Artifact, "tiny")}
    assert {t.number for t in trained} <= curve_trials & artifact_trials
    assert len(rows(storage_url, Slot, "tiny")) == 4
    assert "tiny" in study_table("tiny", storage_url)


def run_cli(space: Path, runs: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "hybridlab.cli", "search", str(space), "--runs-dir",
               str(runs), "--heartbeat-interval", "1", "--grace-period", "4", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"search ended early:\n{proc.stdout.read()}")
        time.sleep(0.5)
    raise AssertionError("timed out waiting")


SLOW_SPACE = TINY_SPACE.replace("steps: 20", "steps: 60").replace(
    "checkpoint_every: 5", "checkpoint_every: 4").replace("trials: 4", "trials: 3")
# Trials long enough that the signal lands mid-training: the driver notices it within its 2 s
# poll, and a 60-step trial can finish in that time, leaving nothing to interrupt.
LONG_SPACE = SLOW_SPACE.replace("steps: 60", "steps: 400").replace(
    "checkpoint_every: 4", "checkpoint_every: 20")


def test_killed_worker_trial_is_retried_from_its_checkpoint(tmp_path):
    space = write_space(tmp_path, SLOW_SPACE)
    runs = tmp_path / "runs"
    url = f"sqlite:///{runs / 'tiny.db'}"
    proc = run_cli(space, runs)

    def running_with_checkpoint():
        if not (runs / "tiny.db").exists():
            return None
        try:
            slots = {s.trial: s.owner for s in rows(url, Slot, "tiny") if s.trial is not None}
            for c in rows(url, Candidate, "tiny"):
                folder = runs / "tiny" / "checkpoints"
                if c.status == "running" and c.trial in slots and any(
                        folder.glob(f"{c.genome_hash}-*/step_*/COMPLETE")):
                    return c.trial, int(slots[c.trial].rsplit(":", 1)[1])
        except sa.exc.OperationalError:
            return None
        return None

    victim, pid = wait_for(running_with_checkpoint, 240, proc)
    os.kill(pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output

    study = optuna.load_study(study_name="tiny", storage=url)
    assert len(finished(study)) == 3
    assert study.trials[victim].state == TrialState.FAIL
    # Its worker died mid-training: the candidate says failed, not running.
    (victim_candidate,) = [c for c in rows(url, Candidate, "tiny") if c.trial == victim]
    assert victim_candidate.status == "failed" and "worker died" in victim_candidate.reason
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry.params == study.trials[victim].params
    # The victim's checkpoint is picked up by the retry, or by a trial of the same genome that
    # was waiting for the checkpoint folder's lock (the retry then reuses its result).
    genome = study.trials[victim].user_attrs["genome_hash"]
    same = [t for t in study.trials if t.user_attrs.get("genome_hash") == genome
            and t.number != victim]
    assert any(t.user_attrs.get("resumed_from_step", 0) > 0 for t in same)


def test_restarted_driver_continues_without_losing_or_repeating_trials(tmp_path):
    space = write_space(tmp_path, SLOW_SPACE.replace("trials: 3", "trials: 5"))
    runs = tmp_path / "runs"
    url = f"sqlite:///{runs / 'tiny.db'}"
    proc = run_cli(space, runs)

    def some_complete():
        if not (runs / "tiny.db").exists():
            return None
        try:
            # Slots exist once the driver has created every table: polling Optuna earlier
            # would race it creating them.
            if not rows(url, Slot, "tiny"):
                return None
            study = optuna.load_study(study_name="tiny", storage=url)
            done = study.get_trials(states=(TrialState.COMPLETE,))
            running = study.get_trials(states=(TrialState.RUNNING,))
            return {t.number: t.values for t in done} if done and running else None
        except (KeyError, sa.exc.OperationalError):
            return None

    before = wait_for(some_complete, 240, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    again = run_cli(space, runs)
    output, _ = again.communicate(timeout=400)
    assert again.returncode == 0, output
    study = optuna.load_study(study_name="tiny", storage=url)
    assert len(finished(study)) == 5
    for number, values in before.items():
        assert study.trials[number].state == TrialState.COMPLETE
        assert study.trials[number].values == values
    trained_numbers = [c.trial for c in rows(url, Candidate, "tiny") if c.status == "trained"]
    assert len(trained_numbers) == len(set(trained_numbers))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_search_stops_cleanly_and_resumes(tmp_path, signum):
    space = write_space(tmp_path, LONG_SPACE)
    runs = tmp_path / "runs"
    url = f"sqlite:///{runs / 'tiny.db'}"
    proc = run_cli(space, runs, "--progress-every", "1")

    def training():
        if not (runs / "tiny.db").exists():
            return False
        try:
            return any(c.status == "running" for c in rows(url, Candidate, "tiny"))
        except sa.exc.OperationalError:
            return False

    def reporting():
        # Only once the driver has created the study: opening Optuna's storage while it is
        # still being created races on its schema table.
        try:
            study = optuna.load_study(study_name="tiny", storage=url)
            return any("progress" in t.user_attrs
                       for t in study.get_trials(states=(TrialState.RUNNING,)))
        except sa.exc.OperationalError:
            return False

    wait_for(training, 240, proc)
    wait_for(reporting, 240, proc)
    time.sleep(2.5)  # within the driver's 2 s poll (1 s progress interval) a line is printed
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, output
    # What a running trial is doing, between trial ends: in the terminal and in the log.
    live = r" +#\d+ \S+ mqar step \d+/400 loss \d+\.\d{4}"
    assert re.search(f"^{live}", output, re.M), output
    log = (runs / "tiny" / "search.log").read_text()
    assert re.search(rf"^\d{{4}}-\d\d-\d\dT[\d:]+ {live}", log, re.M), log
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1].startswith(
        f"hybridlab search: interrupted ({signal.Signals(signum).name}); ")
    assert "rerun the same command to resume" in output
    study = optuna.load_study(study_name="tiny", storage=url)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    interrupted = [c for c in rows(url, Candidate, "tiny") if c.reason == "interrupted"]
    assert interrupted and all(c.status == "failed" for c in interrupted)
    assert not [c for c in rows(url, Candidate, "tiny") if c.status == "running"]
    if signum == signal.SIGINT:
        again = run_cli(space, runs)
        output, _ = again.communicate(timeout=400)
        assert again.returncode == 0, output
        study = optuna.load_study(study_name="tiny", storage=url)
        assert len(finished(study)) == 3
        assert not study.get_trials(states=(TrialState.RUNNING,))
        # Each interrupted trial was queued again with its parameters and finished.
        for c in interrupted:
            retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == c.trial]
            assert len(retries) == 1 and retries[0].params == study.trials[c.trial].params
            assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
