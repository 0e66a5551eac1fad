"""The search driver and its Ray workers.

The driver validates the space, creates hybridlab's tables and the Optuna study once, then starts N
Ray workers. Each worker loads the study by name and URL and runs one trial at a time, each on a
claimed slot of the trial cap (see ``storage.Slot``), with Optuna heartbeats: a dead worker's
trial goes stale, is failed and re-queued with the same parameters by Optuna's
``RetryHeartbeatStaleTrialCallback``, and the retry resumes from the checkpoint its predecessor
left. The database is the single source of truth, so a restarted driver continues the study.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from hybridlab.search.objective import Objective, make_tasks
from hybridlab.search.space import (
    SearchSpace,
    load_space,
    make_pruner,
    make_sampler,
    parse_space,
)
from hybridlab.store import (
    Candidate,
    CandidateStatus,
    Slot,
    StorageError,
    best_trials,
    create_tables,
    default_sqlite_url,
    engine_kwargs,
    is_sqlite,
    make_engine,
    open_engine,
    session_scope,
    worker_id,
)

# Heartbeats and stale-trial retries are marked experimental by Optuna; they are the mechanism
# this runner is built on, so the warning says nothing to the user.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

MAX_TRIAL_RETRIES = 3
MAX_WORKER_RESTARTS = 3
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    study: str
    storage_url: str
    trials: int
    workers: int
    artifacts_dir: Path
    heartbeat_interval: int = 10
    grace_period: int = 30
    poll_seconds: float = 2.0


@dataclass(frozen=True)
class SearchSummary:
    study: str
    storage_url: str
    finished: int
    complete: int
    pruned: int
    failed: int
    wall_seconds: float
    train_seconds: float
    workers: int

    @property
    def overhead_share(self) -> float:
        """Share of worker time not spent training (orchestration, evaluation, idle)."""
        busy = self.wall_seconds * self.workers
        return max(0.0, 1.0 - self.train_seconds / busy) if busy else 0.0


def make_optuna_storage(opts: RunOptions) -> RDBStorage:
    return RDBStorage(
        opts.storage_url,
        engine_kwargs=engine_kwargs(opts.storage_url),
        heartbeat_interval=opts.heartbeat_interval,
        grace_period=opts.grace_period,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
            max_retry=MAX_TRIAL_RETRIES),
    )


def prepare_study(space: SearchSpace, space_text: str, opts: RunOptions) -> optuna.Study:
    """Create (or load) the study and every table; run once, in the driver, before workers."""
    with open_engine(opts.storage_url) as engine:
        create_tables(engine)
    study = optuna.create_study(
        study_name=opts.study, storage=make_optuna_storage(opts),
        directions=space.directions, load_if_exists=True,
    )
    expected = [optuna.study.StudyDirection[d.upper()] for d in space.directions]
    if list(study.directions) != expected:
        raise StorageError(
            f"study {opts.study!r} already exists with directions "
            f"{[d.name.lower() for d in study.directions]}, but the space asks for "
            f"{space.directions}; pick another --study name"
        )
    study.set_metric_names([o.metric for o in space.objectives])
    study.set_user_attr("space", space_text)
    study.set_user_attr("objectives", [o.metric for o in space.objectives])
    return study


def _release_dead_slots(engine, study: optuna.Study, opts: RunOptions) -> None:
    """Free slots whose trial failed, and claims whose worker died before starting a trial."""
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    cutoff = time.time() - opts.grace_period
    with session_scope(engine) as session:
        for slot in session.scalars(sa.select(Slot).where(Slot.study == opts.study)).all():
            if (slot.trial is not None and states.get(slot.trial) == TrialState.FAIL) or (
                slot.trial is None and slot.claimed_unix < cutoff
            ):
                session.delete(slot)


def _claim_slot(engine, opts: RunOptions) -> int | None:
    for _ in range(10):
        with session_scope(engine) as session:
            taken = set(session.scalars(sa.select(Slot.slot).where(Slot.study == opts.study)))
        free = [i for i in range(opts.trials) if i not in taken]
        if not free:
            return None
        try:
            with session_scope(engine) as session:
                session.add(Slot(study=opts.study, slot=free[0], owner=worker_id()))
            return free[0]
        except sa.exc.IntegrityError:
            continue  # another worker took it first
    return None


def worker_loop(space_text: str, source: str | None, opts: RunOptions, rank: int) -> int:
    """Run trials until the study has ``opts.trials`` finished ones; returns trials run here."""
    space = parse_space(space_text, source=source, check_task=False)
    torch.set_num_threads(space.resources.threads_per_worker)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=opts.study, storage=make_optuna_storage(opts),
        sampler=make_sampler(space, rank), pruner=make_pruner(space),
    )
    engine = make_engine(opts.storage_url)
    device = "cuda" if space.resources.gpus_per_worker > 0 else "cpu"
    tasks = make_tasks(space.task, seed=space.seed, options=dict(space.task_options))
    objective = Objective(space, tasks, study=opts.study, engine=engine,
                          artifacts_dir=opts.artifacts_dir, device=device)
    ran = 0
    try:
        while True:
            fail_stale_trials(study)
            _release_dead_slots(engine, study, opts)
            if len(study.get_trials(deepcopy=False, states=FINISHED)) >= opts.trials:
                return ran
            failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if len(failed) >= max_failures(opts.trials):
                # A space whose trials fail every time would otherwise sample forever.
                return ran
            slot = _claim_slot(engine, opts)
            if slot is None:
                # Every slot is busy: wait, to take over a trial whose worker dies.
                time.sleep(opts.poll_seconds)
                continue
            objective.slot = slot
            try:
                study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as err:
                # Another worker declared this trial stale (a heartbeat came too late) and
                # failed it; its retry is queued, so this worker carries on.
                print(f"worker {rank}: trial closed by another worker: {err}", flush=True)
            ran += 1
    finally:
        engine.dispose()


def max_failures(trials: int) -> int:
    """Failed attempts (exceptions, dead workers) after which a search gives up."""
    return max(3, trials)


def progress_line(study: optuna.Study, trials: int, started: float) -> str:
    all_trials = study.get_trials(deepcopy=False)
    count = {state: 0 for state in TrialState}
    for t in all_trials:
        count[t.state] += 1
    rejected = sum(1 for t in all_trials if "rejected" in t.user_attrs)
    complete, pruned = count[TrialState.COMPLETE], count[TrialState.PRUNED]
    line = (f"[{time.perf_counter() - started:6.1f}s] finished {complete + pruned}/{trials} "
            f"(complete {complete}, pruned {pruned - rejected}, rejected {rejected}) "
            f"running {count[TrialState.RUNNING]} waiting {count[TrialState.WAITING]} "
            f"failed {count[TrialState.FAIL]}")
    best = best_trials(study)
    if best:
        names = study.user_attrs.get("objectives", [])
        t = best[0]
        values = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, t.values, strict=False))
        line += f" | best #{t.number} {t.user_attrs.get('pattern', '?')} {values}"
    return line


def _start_ray(address: str | None, opts: RunOptions, space: SearchSpace):
    import ray

    if address:
        ray.init(address=address)
        alive = [n for n in ray.nodes() if n.get("Alive")]
        if len(alive) > 1 and is_sqlite(opts.storage_url):
            ray.shutdown()
            raise StorageError(
                f"SQLite cannot be shared by a {len(alive)}-node Ray cluster: its file lives on "
                "one machine and its locks do not cross the network; pass a PostgreSQL URL "
                "with --storage (postgresql+psycopg://...)"
            )
    else:
        cpus = max(1, math.ceil(space.resources.cpus_per_worker * opts.workers))
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=256 * 1024**2,
                 log_to_driver=True)
    return ray


def run_search(
    space_path: str | Path,
    *,
    study: str | None = None,
    storage_url: str | None = None,
    workers: int | None = None,
    trials: int | None = None,
    ray_address: str | None = None,
    runs_dir: str | Path = "runs",
    heartbeat_interval: int = 10,
    grace_period: int = 30,
    echo: Callable[[str], Any] = print,
) -> SearchSummary:
    """Validate the space, create the study and tables, run the Ray workers, summarise."""
    path = Path(space_path)
    space = load_space(path)
    space_text = path.read_text()
    runs = Path(runs_dir).resolve()
    name = study or space.name
    url = storage_url or default_sqlite_url(name, runs)
    opts = RunOptions(
        study=name, storage_url=url, trials=trials or space.trials,
        workers=workers or space.workers, artifacts_dir=runs / name,
        heartbeat_interval=heartbeat_interval, grace_period=grace_period,
    )
    if opts.trials < 1 or opts.workers < 1:
        raise ValueError("--trials and --workers must be at least 1")
    if grace_period < 2 * heartbeat_interval:
        raise ValueError(f"--grace-period ({grace_period} s) must be at least twice "
                         f"--heartbeat-interval ({heartbeat_interval} s), or live trials are "
                         "declared dead")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    # Ray first: a multi-node cluster with SQLite is refused before any database is created.
    ray = _start_ray(ray_address, opts, space)
    errors: list[str] = []
    try:
        optuna_study = prepare_study(space, space_text, opts)
        echo(f"study {name!r} in {url}: {opts.trials} trials, {opts.workers} workers, "
             f"objectives {[f'{o.direction} {o.metric}' for o in space.objectives]}")
        remote = ray.remote(max_retries=MAX_WORKER_RESTARTS)(worker_loop).options(
            num_cpus=space.resources.cpus_per_worker, num_gpus=space.resources.gpus_per_worker)
        pending = [remote.remote(space_text, str(path), opts, rank)
                   for rank in range(opts.workers)]
        last = ""
        while pending:
            done, pending = ray.wait(pending, timeout=opts.poll_seconds)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as err:  # a worker that exhausted its restarts
                    errors.append(str(err).splitlines()[0])
            line = progress_line(optuna_study, opts.trials, started)
            if line.split("]", 1)[1] != last:
                echo(line)
                last = line.split("]", 1)[1]
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
    wall = time.perf_counter() - started
    summary = summarise(optuna_study, opts, wall)
    if errors:
        echo("worker errors: " + "; ".join(errors))
    if summary.finished < opts.trials:
        raise RuntimeError(f"search stopped with {summary.finished} of {opts.trials} trials "
                           f"finished after {summary.failed} failed attempts; last failure: "
                           f"{last_failure(opts)}; worker errors: {errors or 'none'}")
    if space.lm_eval is not None and summary.complete:
        from hybridlab.evaluation.run import evaluate_top_trials

        echo(f"lm-eval on the top {space.lm_eval.top_k} trial(s): {', '.join(space.lm_eval.tasks)}")
        evaluate_top_trials(url, name, space.lm_eval.tasks, top_k=space.lm_eval.top_k,
                            limit=space.lm_eval.limit, echo=echo)
    return summary


def last_failure(opts: RunOptions) -> str:
    """The reason recorded for the newest failed candidate (see ``Objective``), if any."""
    with open_engine(opts.storage_url) as engine, session_scope(engine) as session:
        reason = Candidate.newest_reason(session, opts.study, CandidateStatus.FAILED)
    return reason or "none recorded (a worker died?)"


def summarise(study: optuna.Study, opts: RunOptions, wall: float) -> SearchSummary:
    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    failed = sum(t.state == TrialState.FAIL for t in trials)
    train_seconds = sum(float(t.user_attrs.get("train_seconds", 0.0)) for t in trials)
    return SearchSummary(study=opts.study, storage_url=opts.storage_url,
                         finished=complete + pruned, complete=complete, pruned=pruned,
                         failed=failed, wall_seconds=wall, train_seconds=train_seconds,
                         workers=opts.workers)

