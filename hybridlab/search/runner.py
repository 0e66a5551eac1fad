"""The search driver and its Ray workers.

The driver checks everything it can refuse (options, space, storage, folders, a changed space)
before Ray starts, creates hybridlab's tables and the Optuna study under a creation lock, records
its run (``hl_run``), queues the space's seed architectures once (``enqueue_seeds``: the first
trials of a fresh study), then starts N Ray workers. Each worker loads the study by name and URL and
runs one trial at a time, each on a claimed slot of the trial cap (see ``store.Slot``), with
Optuna heartbeats: a dead worker's trial goes stale, is failed and re-queued with the same
parameters by Optuna's ``RetryHeartbeatStaleTrialCallback``, and the retry resumes from the
checkpoint its predecessor left. A worker that finds every slot claimed exits, freeing its CPUs
(the driver starts one again if a slot frees). SIGINT/SIGTERM stop the run: its running trials
fail as interrupted and are queued again. The database is the single source of truth, so a
restarted driver continues the study; storage calls ride out database outages
(``store.retry``).
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import math
import signal
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import optuna
import sqlalchemy as sa
import torch
import yaml
from optuna.storages import (
    RetryFailedTrialCallback,
    RetryHeartbeatStaleTrialCallback,
    fail_stale_trials,
)
from optuna.trial import FrozenTrial, TrialState

from hybridlab.config import ConfigError
from hybridlab.errors import HybridlabError
from hybridlab.search.objective import (
    Objective,
    make_tasks,
)
from hybridlab.search.progress import running_lines
from hybridlab.search.seeds import ProxySeed, proxy_seeds
from hybridlab.search.space import (
    SearchSpace,
    load_space,
    make_pruner,
    make_sampler,
    parse_space,
)
from hybridlab.store import (
    SEED_ARCH_ATTR,
    SEED_ATTR,
    SEED_RULE_ATTR,
    SEED_SOURCE_ATTR,
    Candidate,
    CandidateStatus,
    RetryingRDBStorage,
    Run,
    Slot,
    StorageError,
    best_trials,
    check_storage,
    create_tables,
    creation_lock,
    default_sqlite_url,
    display_url,
    engine_kwargs,
    is_sqlite,
    make_engine,
    open_engine,
    transaction,
    worker_id,
)

# Heartbeats and stale-trial retries are marked experimental by Optuna; they are the mechanism
# this runner is built on, so the warning says nothing to the user.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

MAX_TRIAL_RETRIES = 3
MAX_WORKER_RESTARTS = 3
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Sampler seeds are space.seed + rank; run k of a study numbers its workers from k * RANKS_PER_RUN
# (a worker started again later in the run takes the next rank), so a resumed study or a second
# driver never replays proposals, and a fresh study keeps ranks 0..workers-1.
RANKS_PER_RUN = 1000
# Trial user attribute naming the run (``RunOptions.run_id``) that ran the trial.
RUN_ATTR = "run"
# Top-level space keys that say how to run or what follows the search, not what it searches: a
# resumed study may change them.
RUN_KEYS = ("trials", "workers", "resources", "promotion")
INTERRUPTED = "interrupted"
# Trial user attribute naming the Ray node whose worker ran the trial.
NODE_ATTR = "ray_node"
# Study user attribute listing the seeds already queued (``enqueue_seeds``).
SEEDS_ATTR = "seeds_queued"


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
    # How often the driver prints what each running trial of this run is doing.
    progress_seconds: float = 30.0
    # This driver's run: its trials carry the id; its workers' ranks start at first_rank.
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    first_rank: int = 0
    allow_space_change: bool = False


@dataclass(frozen=True)
class SearchSummary:
    """What a search did.

    ``worker_seconds`` is the sum over this run's workers of each one's lifetime, from its task
    starting to its exit (a worker that exited because no work was left is not counted as idle
    after it exited); ``train_seconds`` sums the training time of the trials this run trained.
    """

    study: str
    storage_url: str
    finished: int
    complete: int
    pruned: int
    failed: int
    wall_seconds: float
    train_seconds: float
    workers: int
    worker_seconds: float = 0.0

    @property
    def overhead_share(self) -> float:
        """Share of worker time not spent training (set-up, orchestration, evaluation, idle)."""
        busy = self.worker_seconds
        return max(0.0, 1.0 - self.train_seconds / busy) if busy else 0.0


class SearchInterrupted(HybridlabError):
    """The search was stopped by SIGINT or SIGTERM; the CLI exits 128 + the signal number."""

    def __init__(self, signum: int, finished: int, trials: int) -> None:
        self.exit_code = 128 + signum
        super().__init__(f"interrupted ({signal.Signals(signum).name}); {finished} of {trials} "
                         "trials finished, rerun the same command to resume")


class SearchFailed(HybridlabError, RuntimeError):
    """The search ended short of its trials (this run failed too often, or workers died)."""


class _Stop(BaseException):
    """The driver loop saw SIGINT/SIGTERM; a BaseException so no ``except Exception`` eats it
    before the driver cleans up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def make_optuna_storage(opts: RunOptions) -> RetryingRDBStorage:
    return RetryingRDBStorage(
        opts.storage_url,
        engine_kwargs=engine_kwargs(opts.storage_url),
        heartbeat_interval=opts.heartbeat_interval,
        grace_period=opts.grace_period,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
            max_retry=MAX_TRIAL_RETRIES),
    )


def prepare_study(space: SearchSpace, space_text: str, opts: RunOptions, *,
                  seeds: Sequence[ProxySeed] = ()) -> optuna.Study:
    """Create (or load) the study and every table, and enqueue the ``seeds`` it does not have
    yet as its next trials; run once, in the driver, before workers.

    Safe when several drivers start on one fresh database at the same moment (creation lock).
    """
    with open_engine(opts.storage_url) as engine, creation_lock(engine):
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
        stored = study.user_attrs.get("space")
        if stored is not None and not opts.allow_space_change:
            changes = space_diff(stored, space_text)
            if changes:
                raise StorageError(
                    f"study {opts.study!r} in {display_url(opts.storage_url)} was created with "
                    "another search space; rerun with --allow-space-change to continue it with "
                    "this one, or pick another --study name. Changes (stored -> new, "
                    f"ignoring {', '.join(RUN_KEYS)}):\n{changes}")
        study.set_metric_names([o.metric for o in space.objectives])
        study.set_user_attr("space", space_text)
        study.set_user_attr("objectives", [o.metric for o in space.objectives])
        enqueue_seeds(study, seeds)
    return study


def enqueue_seeds(study: optuna.Study, seeds: Sequence[ProxySeed]) -> None:
    """Queue each seed the study has not queued before (by name, kept in the study's
    ``SEEDS_ATTR``), so a resumed study never queues one twice; Optuna hands queued trials out
    before it samples, so a fresh study trains its seeds first."""
    queued = list(study.user_attrs.get(SEEDS_ATTR, []))
    for seed in seeds:
        if seed.name in queued:
            continue
        study.enqueue_trial({}, user_attrs={
            SEED_ATTR: seed.name, SEED_ARCH_ATTR: seed.arch.to_dict(),
            SEED_SOURCE_ATTR: seed.source, SEED_RULE_ATTR: seed.rule})
        queued.append(seed.name)
    study.set_user_attr(SEEDS_ATTR, queued)


def space_diff(stored: str, new: str) -> str:
    """A unified diff of what two space files search, or "" when that is the same.

    Both are compared as parsed YAML written back canonically (sorted keys, one style), so
    comments, order and layout do not count, and neither do ``RUN_KEYS``.
    """

    def canonical(text: str) -> list[str]:
        data = yaml.safe_load(text)
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in RUN_KEYS}
        return yaml.safe_dump(data, sort_keys=True, default_flow_style=False).splitlines()

    lines = difflib.unified_diff(canonical(stored), canonical(new), "stored space", "new space",
                                 lineterm="", n=1)
    return "\n".join(lines)


def begin_run(opts: RunOptions) -> RunOptions:
    """Record this driver's run in the study; its options with the run's first worker rank."""
    owner = worker_id()
    for _ in range(20):
        try:
            with open_engine(opts.storage_url) as engine:
                number = transaction(engine, lambda session: Run.begin(
                    session, opts.study, opts.run_id, opts.workers, owner))
            return replace(opts, first_rank=number * RANKS_PER_RUN)
        except sa.exc.IntegrityError:
            continue  # another driver took the same number first
    raise StorageError(f"could not record a run of study {opts.study!r}: too many drivers "
                       "starting at once")


def run_trials(study: optuna.Study, run_id: str) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(RUN_ATTR) == run_id]


def _sweep(engine, study: optuna.Study, opts: RunOptions) -> None:
    """Free slots whose trial failed and claims whose worker died before starting a trial, and
    mark failed trials' candidates that still say running (their worker died)."""
    trials = study.get_trials(deepcopy=False)
    states = {t.number: t.state for t in trials}
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    cutoff = time.time() - opts.grace_period

    def sweep(session) -> None:
        for slot in session.scalars(sa.select(Slot).where(Slot.study == opts.study)).all():
            if (slot.trial is not None and states.get(slot.trial) == TrialState.FAIL) or (
                slot.trial is None and slot.claimed_unix < cutoff
            ):
                session.delete(slot)
        Candidate.fail_unfinished(session, opts.study, failed,
                                  "the trial failed without a recorded reason (its worker died "
                                  "or stopped sending heartbeats)")

    transaction(engine, sweep)


def _claim_slot(engine, opts: RunOptions) -> int | None:
    """Claim the smallest free slot, or None when all ``opts.trials`` are claimed.

    Reads only the claimed slots (a study of 10**9 trials has few), never a list of free ones.
    """
    owner = worker_id()

    def taken(session) -> list[int]:
        return list(session.scalars(sa.select(Slot.slot).where(
            Slot.study == opts.study).order_by(Slot.slot)))

    for _ in range(10):
        claimed = transaction(engine, taken)
        # Slots are distinct and start at 0: the first gap is where slot i is not i.
        free = next((i for i, slot in enumerate(claimed) if slot != i), len(claimed))
        if free >= opts.trials:
            return None
        try:
            transaction(engine, lambda session, slot=free: _insert_slot(
                session, opts.study, slot, owner))
            return free
        except sa.exc.IntegrityError:
            continue  # another worker took it first
    return None


def _insert_slot(session, study: str, slot: int, owner: str) -> None:
    existing = session.get(Slot, (study, slot))
    if existing is not None and existing.owner == owner:
        return  # a retried insert whose first attempt committed
    session.add(Slot(study=study, slot=slot, owner=owner))


def worker_loop(space_text: str, source: str | None, opts: RunOptions, rank: int) -> int:
    """Run trials until the study has ``opts.trials`` finished ones, this run has failed too
    often, or every slot is claimed by another worker; returns trials run here."""
    space = parse_space(space_text, source=source, check_task=False)
    torch.set_num_threads(space.resources.threads_per_worker)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=opts.study, storage=make_optuna_storage(opts),
        sampler=make_sampler(space, opts.first_rank + rank), pruner=make_pruner(space),
    )
    engine = make_engine(opts.storage_url)
    device = "cuda" if space.resources.gpus_per_worker > 0 else "cpu"
    tasks = make_tasks(space.task, seed=space.seed, options=dict(space.task_options))
    objective = Objective(space, tasks, study=opts.study, engine=engine,
                          artifacts_dir=opts.artifacts_dir, device=device)
    objective.on_evaluation = lambda: _share_threads(study, opts, space)
    objective.poll_seconds = opts.poll_seconds

    slot: int | None = None

    import ray

    # A worker runs as a Ray task; called directly (tests, debugging) there is no node to name,
    # and asking for the runtime context would start a Ray instance in this process.
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def run_trial(trial: optuna.Trial) -> float | list[float]:
        trial.set_user_attr(RUN_ATTR, opts.run_id)
        if node is not None:
            trial.set_user_attr(NODE_ATTR, node)
        transaction(engine, lambda session: session.execute(sa.update(Slot).where(
            Slot.study == opts.study, Slot.slot == slot).values(trial=trial.number)))
        return objective(trial)

    ran = 0
    try:
        while True:
            fail_stale_trials(study)
            _sweep(engine, study, opts)
            if len(study.get_trials(deepcopy=False, states=FINISHED)) >= opts.trials:
                return ran
            failed = [t for t in run_trials(study, opts.run_id) if t.state == TrialState.FAIL]
            if len(failed) >= max_failures(opts.trials):
                # A space whose trials fail every time would otherwise sample forever.
                return ran
            slot = _claim_slot(engine, opts)
            if slot is None:
                # Every slot is claimed: the rest runs elsewhere. Exiting frees this worker's
                # CPUs for them; the driver starts a worker again if a slot is freed.
                return ran
            torch.set_num_threads(space.resources.threads_per_worker)
            try:
                study.optimize(run_trial, n_trials=1, catch=(Exception,), gc_after_trial=True)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as err:
                # Another worker declared this trial stale (a heartbeat came too late) and
                # failed it; its retry is queued, so this worker carries on.
                print(f"worker {rank}: trial closed by another worker: {err}", flush=True)
            ran += 1
    finally:
        engine.dispose()


def _share_threads(study: optuna.Study, opts: RunOptions, space: SearchSpace) -> None:
    """Spread this run's CPU threads over its running trials: a trial left running alone after
    the other workers exited takes their threads."""
    running = sum(1 for t in run_trials(study, opts.run_id) if t.state == TrialState.RUNNING)
    total = space.resources.threads_per_worker * opts.workers
    torch.set_num_threads(max(space.resources.threads_per_worker, total // max(1, running)))


def _worker_task(space_text: str, source: str | None, opts: RunOptions,
                 rank: int) -> tuple[int, float]:
    """A Ray worker: ``worker_loop`` and how long it lived (for the summary's overhead)."""
    started = time.perf_counter()
    ran = worker_loop(space_text, source, opts, rank)
    return ran, time.perf_counter() - started


def max_failures(trials: int) -> int:
    """Failed attempts of one run (exceptions, dead workers) after which a search gives up."""
    return max(3, trials)


def progress_line(study: optuna.Study, trials: int, started: float) -> str:
    all_trials = study.get_trials(deepcopy=False)
    count = {state: 0 for state in TrialState}
    for t in all_trials:
        count[t.state] += 1
    # A rejected candidate ends PRUNED; until then it is still running.
    rejected = sum(1 for t in all_trials
                   if t.state == TrialState.PRUNED and "rejected" in t.user_attrs)
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
        res = space.resources
        cpus = max(1, math.ceil(res.cpus_per_worker * res.workers_per_trial * opts.workers))
        # "local": a new instance, never one that an address file or RAY_ADDRESS points at.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 object_store_memory=256 * 1024**2, log_to_driver=True)
    return ray


def _also_logged(echo: Callable[[str], Any], log: Path) -> Callable[[str], None]:
    """``echo`` that also appends each line, timestamped, to ``log`` (a rerun appends)."""
    def both(line: str) -> None:
        echo(line)
        with log.open("a") as f:
            f.write(f"{datetime.datetime.now().isoformat(timespec='seconds')} {line}\n")
    return both


def check_folder(path: Path, flag: str) -> None:
    """Create ``path`` and write a probe file in it, or refuse naming ``flag``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".hybridlab-probe-"):
            pass
    except OSError as err:
        raise ConfigError(flag, f"cannot write to {path}: {err.strerror or err}") from None


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """Collect SIGINT and SIGTERM in the yielded list instead of dying; the driver loop polls it.

    (Raising from the handler would surface inside Ray's C extension as a SystemError.) Only the
    main thread may install handlers; elsewhere the list stays empty.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def record(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
    allow_space_change: bool = False,
    progress_every: float = 30.0,
    echo: Callable[[str], Any] = print,
) -> SearchSummary:
    """Validate the space, create the study and tables, run the Ray workers, summarise.

    Everything that can be refused (options, space, folders, storage, a changed space) is
    checked before Ray starts. Every ``progress_every`` seconds the driver prints a line per
    running trial (task, step, train loss, latest test metric). Each line this function
    prints (through ``echo``) also goes, timestamped, to ``<runs_dir>/<study>/search.log``.
    """
    path = Path(space_path)
    space = load_space(path)
    space_text = path.read_text()
    for flag, value in (("--trials", trials), ("--workers", workers),
                        ("--heartbeat-interval", heartbeat_interval),
                        ("--grace-period", grace_period), ("--progress-every", progress_every)):
        if value is not None and value < 1:
            raise ConfigError(flag, f"must be at least 1, got {value}")
    if grace_period < 2 * heartbeat_interval:
        raise ConfigError("--grace-period", f"{grace_period} s must be at least twice "
                          f"--heartbeat-interval ({heartbeat_interval} s), or live trials are "
                          "declared dead")
    runs = Path(runs_dir).resolve()
    name = study or space.name
    url = storage_url or default_sqlite_url(name, runs)
    opts = RunOptions(
        study=name, storage_url=url, trials=space.trials if trials is None else trials,
        workers=space.workers if workers is None else workers, artifacts_dir=runs / name,
        heartbeat_interval=heartbeat_interval, grace_period=grace_period,
        allow_space_change=allow_space_change, progress_seconds=progress_every,
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Each check creates nothing when it fails; the default database lives in --runs-dir, so
    # that flag is named first.
    checks = [lambda: check_storage(url), lambda: check_folder(opts.artifacts_dir, "--runs-dir")]
    for check in checks if storage_url else reversed(checks):
        check()
    echo = _also_logged(echo, opts.artifacts_dir / "search.log")
    seeds = seed_trials(space)
    for seed in seeds:
        echo(f"seed {seed.name}: {seed.rule}")
    started = time.perf_counter()
    if not ray_address:
        # A local Ray cannot span nodes, so the study is created first and a refusal (a changed
        # space) costs no Ray start. A cluster is asked first whether SQLite can serve it.
        optuna_study = prepare_study(space, space_text, opts, seeds=seeds)
    ray = _start_ray(ray_address, opts, space)
    try:
        if ray_address:
            optuna_study = prepare_study(space, space_text, opts, seeds=seeds)
        opts = begin_run(opts)
        echo(f"study {name!r} in {display_url(url)}: {opts.trials} trials, {opts.workers} "
             f"workers, objectives {[f'{o.direction} {o.metric}' for o in space.objectives]}")
        with _stop_on_signals() as received:
            try:
                errors, worker_seconds = _drive(ray, space, space_text, str(path), opts,
                                                optuna_study, started, echo, received)
            except _Stop as stop:
                _stop_run(ray, optuna_study, opts)
                finished = len(optuna_study.get_trials(deepcopy=False, states=FINISHED))
                raise SearchInterrupted(stop.signum, finished, opts.trials) from None
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
    wall = time.perf_counter() - started
    summary = summarise(optuna_study, opts, wall, worker_seconds)
    if errors:
        echo("worker errors: " + "; ".join(errors))
    if summary.finished < opts.trials:
        raise SearchFailed(
            f"search stopped with {summary.finished} of {opts.trials} trials finished after "
            f"{summary.failed} failed attempts in this run; last failure: {last_failure(opts)}; "
            f"worker errors: {errors or 'none'}")
    if space.lm_eval is not None and summary.complete:
        from hybridlab.evaluation.run import evaluate_top_trials

        echo(f"lm-eval on the top {space.lm_eval.top_k} trial(s): {', '.join(space.lm_eval.tasks)}")
        evaluate_top_trials(url, name, space.lm_eval.tasks, top_k=space.lm_eval.top_k,
                            limit=space.lm_eval.limit, echo=echo)
    if space.promotion is not None and summary.complete:
        from hybridlab.search.promotion import promote

        echo(f"promotion: top {space.promotion.top_k} and baselines "
             f"{list(space.promotion.baselines)} at {len(space.promotion.rungs)} rung(s)")
        promote(name, url, space=space, runs_dir=runs, ray_address=ray_address, echo=echo)
    return summary


def seed_trials(space: SearchSpace) -> list[ProxySeed]:
    """The space's seeds at its proxy size, for the task's vocabulary (see
    ``hybridlab.search.seeds``)."""
    if not space.seeds:
        return []
    tasks = make_tasks(space.task, seed=space.seed, options=dict(space.task_options))
    return proxy_seeds(space, max(task.vocab_size for task in tasks))


def _drive(ray, space: SearchSpace, space_text: str, source: str, opts: RunOptions,
           study: optuna.Study, started: float, echo: Callable[[str], Any],
           received: list[int]) -> tuple[list[str], float]:
    """Run the workers to the end; (worker errors, summed worker lifetimes in seconds).

    Raises ``_Stop`` once a signal arrives in ``received``.
    """
    res = space.resources
    # A worker whose trials train data-parallel only coordinates: its Ray Train workers take
    # the CPUs and GPUs.
    parallel = res.workers_per_trial > 1
    remote = ray.remote(max_retries=MAX_WORKER_RESTARTS)(_worker_task).options(
        num_cpus=0 if parallel else res.cpus_per_worker,
        num_gpus=0 if parallel else res.gpus_per_worker)
    launched: dict[Any, float] = {}

    def launch(rank: int) -> Any:
        ref = remote.remote(space_text, source, opts, rank)
        launched[ref] = time.perf_counter()
        return ref

    pending = [launch(rank) for rank in range(opts.workers)]
    next_rank = opts.workers
    errors: list[str] = []
    worker_seconds = 0.0
    last = ""
    shown = time.perf_counter()
    while True:
        if pending:
            done, pending = ray.wait(pending, timeout=opts.poll_seconds)
        else:
            done = []
            time.sleep(opts.poll_seconds)
        if received:
            # Killed, not asked: on a cluster the tasks would otherwise outlive ray.shutdown
            # for a moment and write to trials the driver is about to fail.
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise _Stop(received[0])
        for ref in done:
            try:
                worker_seconds += ray.get(ref)[1]
            except Exception as err:  # a worker that exhausted its restarts
                errors.append(str(err).splitlines()[0])
                worker_seconds += time.perf_counter() - launched[ref]
        line = progress_line(study, opts.trials, started)
        if line.split("]", 1)[1] != last:
            echo(line)
            last = line.split("]", 1)[1]
        if time.perf_counter() - shown >= opts.progress_seconds:
            for running in running_lines(study, run=(RUN_ATTR, opts.run_id)):
                echo(f"  {running}")
            shown = time.perf_counter()
        if len(pending) < opts.workers:
            if not pending:
                # No worker is left to notice a trial whose worker died: fail it here, so its
                # retry is queued and its slot freed.
                fail_stale_trials(study)
                with open_engine(opts.storage_url) as engine:
                    _sweep(engine, study, opts)
            if next_rank < RANKS_PER_RUN and _work_left(study, opts):
                # A worker exited while every slot was claimed, and one was freed since (a
                # trial failed): start one again, with a fresh rank so its sampler does not
                # replay.
                pending.append(launch(next_rank))
                next_rank += 1
        if not pending and not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            return errors, worker_seconds


def _work_left(study: optuna.Study, opts: RunOptions) -> bool:
    """Whether a free slot remains for a new worker, and this run has not given up."""
    trials = study.get_trials(deepcopy=False)
    if sum(t.state in FINISHED for t in trials) >= opts.trials:
        return False
    mine = [t for t in trials if t.user_attrs.get(RUN_ATTR) == opts.run_id]
    if sum(t.state == TrialState.FAIL for t in mine) >= max_failures(opts.trials):
        return False
    with open_engine(opts.storage_url) as engine:
        claimed = transaction(engine, lambda session: session.scalar(
            sa.select(sa.func.count()).select_from(Slot).where(Slot.study == opts.study)))
    return claimed < opts.trials


def _stop_run(ray, study: optuna.Study, opts: RunOptions) -> None:
    """Stop this run's workers, then fail its RUNNING trials and their candidates as
    interrupted (a rerun resumes: failed trials free their slots)."""
    with contextlib.suppress(Exception):
        ray.shutdown()
    # Optuna has no public call to fail another process's trial; its storage does it.
    storage = study._storage
    retry = RetryFailedTrialCallback(max_retry=MAX_TRIAL_RETRIES)
    stopped = []
    for t in run_trials(study, opts.run_id):
        if t.state == TrialState.RUNNING:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                stopped.append(t.number)
                # Queued again with its parameters, as a dead worker's trial is: the rerun
                # resumes it from its checkpoint.
                retry(study, storage.get_trial(t._trial_id))
    with open_engine(opts.storage_url) as engine:
        transaction(engine, lambda session: Candidate.fail_unfinished(
            session, opts.study, stopped, INTERRUPTED))


def last_failure(opts: RunOptions) -> str:
    """The reason recorded for the newest failed candidate (see ``Objective``), if any."""
    with open_engine(opts.storage_url) as engine:
        reason = transaction(engine, lambda session: Candidate.newest_reason(
            session, opts.study, CandidateStatus.FAILED))
    return reason or "none recorded (a worker died?)"


def summarise(study: optuna.Study, opts: RunOptions, wall: float,
              worker_seconds: float) -> SearchSummary:
    trials = study.get_trials(deepcopy=False)
    mine = [t for t in trials if t.user_attrs.get(RUN_ATTR) == opts.run_id]
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    failed = sum(t.state == TrialState.FAIL for t in mine)
    train_seconds = sum(float(t.user_attrs.get("train_seconds", 0.0)) for t in mine)
    return SearchSummary(study=opts.study, storage_url=opts.storage_url,
                         finished=complete + pruned, complete=complete, pruned=pruned,
                         failed=failed, wall_seconds=wall, train_seconds=train_seconds,
                         workers=opts.workers, worker_seconds=worker_seconds)
