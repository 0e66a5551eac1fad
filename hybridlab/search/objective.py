"""One trial: sample (or take a queued seed's architecture) -> price -> (reject | reuse | train)
-> objectives, all recorded.

A candidate that breaks a rule or budget is recorded as rejected and ends PRUNED without training;
one whose genome was already trained in this study reuses the stored objectives (and says so); the
rest train with checkpoints keyed by genome and train settings, so a retried trial resumes where
its failed predecessor stopped.
"""

from __future__ import annotations

import fcntl
import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from hybridlab import code_version
from hybridlab.checkpoint import MODEL_FILE
from hybridlab.config import ArchConfig
from hybridlab.cost import (
    active_param_count,
    flops_per_token,
    inference_state_bytes,
    measure_tokens_per_second,
    param_count,
)
from hybridlab.data.state_tracking import STATE_TASKS
from hybridlab.data.synthetic import MAD_TASKS
from hybridlab.data.task import TaskData
from hybridlab.data.tasks import make_task
from hybridlab.files import sha256_file
from hybridlab.model import HybridLM
from hybridlab.search.progress import TrialProgress
from hybridlab.search.space import (
    Rejected,
    SearchSpace,
    check_budgets,
    describe_pruner,
    sample_architecture,
)
from hybridlab.store import (
    CHECKPOINT_KIND,
    SEED_ARCH_ATTR,
    Artifact,
    Candidate,
    CandidateStatus,
    CurvePoint,
    Evaluation,
    GenomeClaim,
    transaction,
    worker_id,
)
from hybridlab.train import TrainConfig, TrainResult, settings_key, train

SUITES = {"mad:all": tuple(f"mad:{name}" for name in MAD_TASKS),
          "state:all": tuple(f"state:{name}" for name in STATE_TASKS)}


def task_members(spec: str, options: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each task of ``spec`` (itself, or a suite's members) with its knob overrides.

    A suite's options hold knobs for every member and, under a member's short name (the part
    after the colon), a mapping of knobs for that member alone, which win over the shared ones:
    ``{seq_len: 64, selective_copying: {num_tokens_to_copy: 8}}``.
    """
    members = SUITES.get(spec)
    if members is None:
        return [(spec, dict(options))]
    names = {member.split(":", 1)[1]: member for member in members}
    shared = {k: v for k, v in options.items() if k not in names}
    for key, value in options.items():
        if key in names and not isinstance(value, dict):
            raise ValueError(f"task {spec!r}: option {key!r} names a member task and must map "
                             f"its knobs, got {value!r}")
    return [(member, {**shared, **options.get(short, {})}) for short, member in names.items()]


def make_tasks(spec: str, *, seed: int, options: dict[str, Any]) -> list[TaskData]:
    """One task, or every task of a suite ("mad:all": the six MAD tasks, trained separately)."""
    return [make_task(name, seed=seed, **knobs) for name, knobs in task_members(spec, options)]


def candidate_costs(arch: ArchConfig, space: SearchSpace) -> dict[str, float]:
    context = space.budgets.state_context
    return {
        "params": param_count(arch),
        "active_params": active_param_count(arch),
        "flops_per_token": flops_per_token(arch, context),
        "state_bytes": inference_state_bytes(arch, context),
    }


class Objective:
    """The callable handed to ``study.optimize`` by each worker."""

    def __init__(
        self, space: SearchSpace, tasks: list[TaskData], *, study: str, engine: Engine,
        artifacts_dir: Path, device: str = "cpu",
    ) -> None:
        self.space = space
        self.tasks = tasks
        self.study = study
        self.engine = engine
        self.artifacts_dir = artifacts_dir
        self.device = device
        # Called at each evaluation of a training run (the worker re-spreads its threads).
        self.on_evaluation: Callable[[], None] | None = None
        # How often a trial waiting for another trial of its genome looks again.
        self.poll_seconds = 2.0
        self.vocab_size = max(task.vocab_size for task in tasks)

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        try:
            return self._run(trial)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            self._record(trial.number, status=CandidateStatus.FAILED, reason="interrupted")
            raise
        except Exception as err:
            self._record(trial.number, status=CandidateStatus.FAILED,
                         reason=f"{type(err).__name__}: {err}")
            raise

    def _run(self, trial: optuna.Trial) -> float | list[float]:
        seeded = trial.user_attrs.get(SEED_ARCH_ATTR)
        try:
            arch = (ArchConfig.from_dict(seeded) if seeded is not None
                    else sample_architecture(trial, self.space, self.vocab_size))
        except Rejected as rejected:
            raise self._reject(trial, str(rejected)) from None
        costs = candidate_costs(arch, self.space)
        trial.set_user_attr("pattern", arch.pattern)
        trial.set_user_attr("genome_hash", arch.canonical_hash())
        for key, value in costs.items():
            trial.set_user_attr(key, value)
        try:
            check_budgets(self.space.budgets, costs)
        except Rejected as rejected:
            raise self._reject(trial, str(rejected), arch=arch, costs=costs) from None

        genome = arch.canonical_hash()
        reused = self._claim_or_reuse(trial, genome)
        if reused is not None:
            trial.set_user_attr("reused_from", reused.trial)
            self._record(trial.number, arch=arch, costs=costs, status=CandidateStatus.REUSED,
                         reason=f"same genome as trial {reused.trial}",
                         reused_from=reused.trial, objectives=reused.objectives,
                         tokens_per_second=reused.tokens_per_second)
            return self._values(reused.objectives)
        try:
            return self._train(trial, arch, costs)
        finally:
            transaction(self.engine, lambda session: session.execute(sa.delete(GenomeClaim).where(
                GenomeClaim.study == self.study, GenomeClaim.genome_hash == genome,
                GenomeClaim.trial == trial.number)))

    def _train(self, trial: optuna.Trial, arch: ArchConfig,
               costs: dict[str, float]) -> float | list[float]:
        model = HybridLM(arch, seed=self.space.seed).to(self.device)
        tokens_per_second = measure_tokens_per_second(
            model, batch_size=4, seqlen=self.tasks[0].seq_len, repeats=2, seed=self.space.seed)
        costs = {**costs, "tokens_per_second": tokens_per_second}
        trial.set_user_attr("tokens_per_second", tokens_per_second)
        self._record(trial.number, arch=arch, costs=costs, status=CandidateStatus.RUNNING)

        # The measured model is still the seeded initial one: the first task trains it.
        results = [self._train_on(trial, arch, task, model if i == 0 else None)
                   for i, task in enumerate(self.tasks)]
        trial.set_user_attr("train_seconds", sum(r.seconds for r in results))
        trial.set_user_attr("train_status", [r.status for r in results])
        resumed = max(r.resumed_from for r in results)
        if resumed:
            trial.set_user_attr("resumed_from_step", resumed)
        # Checkpoints that failed verification were set aside and the run resumed from an
        # earlier one (or afresh): the trial still ends as trained, and says so.
        recovered = [note for r in results for note in r.recovered]
        if recovered:
            trial.set_user_attr("checkpoint_recovery", recovered)
        recovery = f"; checkpoint recovery: {'; '.join(recovered)}" if recovered else ""
        for status, outcome in (("diverged", CandidateStatus.FAILED),
                                ("stopped", CandidateStatus.PRUNED)):
            stopped = [r for r in results if r.status == status]
            if stopped:
                self._record(trial.number, arch=arch, costs=costs, status=outcome,
                             reason=stopped[0].reason + recovery)
                raise optuna.TrialPruned(stopped[0].reason)
        metrics = _mean_metrics([r.metrics for r in results])
        objectives = {**{k: float(v) for k, v in costs.items()}, **metrics}
        self._record(trial.number, arch=arch, costs=costs, status=CandidateStatus.TRAINED,
                     reason=results[0].reason + recovery, objectives=objectives)
        return self._values(objectives)

    def _train_on(self, trial: optuna.Trial, arch: ArchConfig, task: TaskData,
                  model: HybridLM | None = None) -> TrainResult:
        """Train a fresh model on one task; a new seeded init for each task of a suite."""
        if model is None:
            model = HybridLM(arch, seed=self.space.seed).to(self.device)
        # Optuna prunes on one curve: only a single-task, single-objective study reports.
        prune = (len(self.tasks) == 1 and not self.space.multi_objective
                 and self.space.pruner != "none")
        metric = self.space.objectives[0].metric
        pruned_at: list[str] = []
        live = TrialProgress(trial, task.name, self.space.train.steps, metric)

        def report(step: int, metrics: dict[str, float]) -> bool:
            live.evaluated(step, metrics)
            if self.on_evaluation is not None:
                self.on_evaluation()
            if not prune or metric not in metrics:
                return False
            trial.report(metrics[metric], step)
            if not trial.should_prune():
                return False
            pruned_at.append(f"pruned by {describe_pruner(self.space)} at step {step}: "
                             f"{metric} {metrics[metric]:.4g}")
            return True

        # Threads are the worker's business (set per trial), not the trainer's.
        cfg = replace(self.space.train, device=self.device, threads=None)
        key = f"{arch.canonical_hash()}-{settings_key(cfg, task)}"
        folder = self.artifacts_dir / "checkpoints" / key
        folder.mkdir(parents=True, exist_ok=True)
        # One writer per folder: a duplicate genome (or a retry of a trial declared dead too
        # early) waits, then resumes from the finished checkpoint instead of racing it.
        with (folder / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.space.resources.workers_per_trial > 1:
                result = self._train_data_parallel(trial, arch, task, cfg, folder)
            else:
                result = train(model, task, cfg, checkpoint_dir=folder, callback=report,
                               on_log=live.logged)
        if result.status == "stopped" and pruned_at:
            result = replace(result, reason=pruned_at[0])
        store_train_result(self.engine, self.study, trial.number, task.name, result,
                           suite=len(self.tasks) > 1)
        return result

    def _train_data_parallel(self, trial: optuna.Trial, arch: ArchConfig, task: TaskData,
                             cfg: TrainConfig, folder: Path) -> TrainResult:
        """Train on ``resources.workers_per_trial`` Ray Train workers (no pruning: the space
        refuses a pruner with it); the trial records the nodes they ran on."""
        from hybridlab.search.distributed import train_data_parallel

        members = task_members(self.space.task, dict(self.space.task_options))
        spec, knobs = dict(zip((t.name for t in self.tasks), members, strict=True))[task.name]
        resources = self.space.resources
        run = train_data_parallel(
            arch, task=spec, task_seed=self.space.seed,
            task_options=knobs, cfg=cfg, model_seed=self.space.seed,
            workers=resources.workers_per_trial, checkpoint_dir=folder,
            use_gpu=resources.gpus_per_worker > 0, cpus_per_worker=resources.cpus_per_worker,
            storage_path=self.artifacts_dir / "ray-train",
            name=f"{self.study}-trial{trial.number}-{folder.name}")
        trial.set_user_attr("train_nodes", list(run.nodes))
        return run.result

    def _values(self, objectives: dict[str, Any]) -> float | list[float]:
        values = []
        for objective in self.space.objectives:
            value = objectives.get(objective.metric)
            if value is None or not math.isfinite(value):
                raise ValueError(f"objective {objective.metric!r} was not measured "
                                 f"(have {sorted(objectives)})")
            values.append(float(value))
        return values[0] if len(values) == 1 else values

    def _reject(self, trial: optuna.Trial, reason: str, *, arch: ArchConfig | None = None,
                costs: dict[str, float] | None = None) -> optuna.TrialPruned:
        """Record the rejection; the caller raises the returned exception."""
        trial.set_user_attr("rejected", reason)
        self._record(trial.number, arch=arch, costs=costs, status=CandidateStatus.REJECTED,
                     reason=reason)
        return optuna.TrialPruned(f"rejected: {reason}")

    def _claim_or_reuse(self, trial: optuna.Trial, genome: str) -> Candidate | None:
        """The candidate that trained ``genome``, or None once this trial holds its claim.

        While another running trial holds the claim this one waits; a holder that ended without
        a trained result (failed, pruned, its worker died) is taken over.
        """
        owner = worker_id()

        def look(session) -> tuple[Candidate | None, int | None]:
            trained = Candidate.first_trained(session, self.study, genome)
            if trained is not None:
                return trained, None
            claim = session.get(GenomeClaim, (self.study, genome))
            if claim is None:
                session.add(GenomeClaim(study=self.study, genome_hash=genome,
                                        trial=trial.number, owner=owner))
                return None, None
            return None, None if claim.trial == trial.number else claim.trial

        while True:
            try:
                trained, holder = transaction(self.engine, look)
            except sa.exc.IntegrityError:
                continue  # claimed by another trial at the same moment: look again
            if holder is None:
                return trained
            # Failing stale trials here too: the holder's worker may have died.
            optuna.storages.fail_stale_trials(trial.study)
            states = {t.number: t.state for t in trial.study.get_trials(deepcopy=False)}
            if states.get(holder) != optuna.trial.TrialState.RUNNING:
                transaction(self.engine, lambda session, holder=holder: session.execute(
                    sa.delete(GenomeClaim).where(
                        GenomeClaim.study == self.study, GenomeClaim.genome_hash == genome,
                        GenomeClaim.trial == holder)))
                continue
            time.sleep(self.poll_seconds)

    def _record(self, trial: int, *, status: CandidateStatus, reason: str | None = None,
                arch: ArchConfig | None = None, costs: dict[str, float] | None = None,
                reused_from: int | None = None, objectives: dict[str, Any] | None = None,
                tokens_per_second: float | None = None) -> None:
        costs = costs or {}
        fingerprints = [task.fingerprint() for task in self.tasks]
        fingerprint = fingerprints[0] if len(fingerprints) == 1 else {"suite": fingerprints}
        values = {
            "genome_hash": arch.canonical_hash() if arch else None,
            "pattern": arch.pattern if arch else None,
            "arch": arch.to_dict() if arch else None,
            "params": int(costs["params"]) if "params" in costs else None,
            "active_params": int(costs["active_params"]) if "active_params" in costs else None,
            "flops_per_token": costs.get("flops_per_token"),
            "state_bytes": int(costs["state_bytes"]) if "state_bytes" in costs else None,
            "state_context": self.space.budgets.state_context if arch else None,
            "tokens_per_second": costs.get("tokens_per_second", tokens_per_second),
            "task": self.space.task,
            "task_fingerprint": json.loads(json.dumps(fingerprint, default=str)),
            "corpus_hash": fingerprints[0].get("corpus_hash"),
            "code_version": code_version(),
            "status": status.value,
            "reason": reason,
            "reused_from": reused_from,
            "objectives": objectives,
        }
        transaction(self.engine, lambda session: Candidate.upsert(
            session, self.study, trial, values))


def _mean_metrics(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per-metric mean over the runs of a suite (the metrics every run reported)."""
    shared = set.intersection(*(set(m) for m in runs))
    return {key: sum(m[key] for m in runs) / len(runs) for key in sorted(shared)}


def store_train_result(engine: Engine, study: str, trial: int, task: str, result: TrainResult,
                       *, suite: bool = False) -> None:
    """Curve, final proxy metrics and checkpoint of one training run (replacing a retry's).

    In a suite (several tasks per trial) curve splits are prefixed with the task's name.
    """

    def replace_rows(session) -> None:
        own_curve = (CurvePoint.split.startswith(f"{task}/", autoescape=True) if suite
                     else sa.true())
        session.execute(sa.delete(CurvePoint).where(
            CurvePoint.study == study, CurvePoint.trial == trial, own_curve))
        session.execute(sa.delete(Evaluation).where(
            Evaluation.study == study, Evaluation.trial == trial, Evaluation.task == task))
        session.execute(sa.delete(Artifact).where(
            Artifact.study == study, Artifact.trial == trial,
            Artifact.kind == f"{CHECKPOINT_KIND}{task}"))
        for point in result.curve:
            split = f"{task}/{point['split']}" if suite else point["split"]
            session.add(CurvePoint(study=study, trial=trial, step=point["step"], split=split,
                                   metric=point["metric"], value=point["value"]))
        for metric, value in result.metrics.items():
            session.add(Evaluation(study=study, trial=trial, task=task, metric=metric,
                                   value=value, stderr=None, harness="hybridlab-proxy",
                                   harness_version=code_version()))
        if result.checkpoint is not None:
            weights = result.checkpoint / MODEL_FILE
            session.add(Artifact(study=study, trial=trial, kind=f"{CHECKPOINT_KIND}{task}",
                                 path=str(result.checkpoint.resolve()),
                                 sha256=sha256_file(weights)))

    # Deleting first makes the whole write safe to repeat after an outage.
    transaction(engine, replace_rows)
