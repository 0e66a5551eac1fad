"""Promotion: the proxy search's winners, extrapolated and retrained at larger rungs.

A space's ``promotion`` section (``search.space.PromotionStage``) names how many proxy winners to
promote (``top_k``, distinct genomes, ranked by the space's first task objective), the baselines
to train beside them and the rungs. At each rung every source is extrapolated
(``hybridlab.scale``) to one parameter goal, so candidates and baselines are compared at equal
size, and retrained on the space's task with the rung's train settings, on one Ray worker or
data-parallel on ``workers_per_trial`` (``search.distributed``).

The baselines are the best candidate with its mixers swapped: every Mamba layer made attention
("transformer"), or every attention layer made Mamba ("ssm"), with the layer settings of the
candidate (or, where it has no layer of that kind, the space's first choices, attention as plain
multi-head attention); MLPs stay. A baseline that comes out as the architecture of a candidate
(the best one has no attention, say) shares that candidate's run instead of training it again.

Bookkeeping, so a rerun resumes: ``hl_promotion`` holds one row per (study, rung, run); a run's
checkpoints live where a trial of that genome and those train settings keeps them, so a run that
was interrupted (its worker or the driver killed) resumes from its newest checkpoint. A finished
run becomes a trial of the rung's own study (``store.rung_study_name``), added complete with its
value, and its candidate row, curve, evaluations and checkpoint are stored under that study as any
trial's are. ``promote`` skips runs that are already trained, so the same command continues.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
import torch
from optuna.trial import TrialState

from hybridlab import code_version
from hybridlab.config import ArchConfig, AttentionSpec, ConfigError, LayerSpec
from hybridlab.data.tasks import make_task
from hybridlab.errors import HybridlabError
from hybridlab.layers import LAYER_TYPES, mixer_types
from hybridlab.metrics import METRICS
from hybridlab.model import HybridLM
from hybridlab.scale import Scaled, ScaleError, Target, scale
from hybridlab.search.objective import candidate_costs, store_train_result
from hybridlab.search.space import PromotionStage, Rung, SearchSpace, parse_space
from hybridlab.store import (
    Candidate,
    CandidateStatus,
    Promotion,
    PromotionRole,
    PromotionStatus,
    RetryingRDBStorage,
    StorageError,
    create_tables,
    creation_lock,
    engine_kwargs,
    load_study,
    open_engine,
    rung_study_name,
    transaction,
)
from hybridlab.train import TrainConfig, TrainResult, settings_key, train

# As in the runner: set_metric_names is marked experimental by Optuna, which says nothing here.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

MAX_RUN_RETRIES = 2
# Trial user attribute of a rung study's trial: the hl_promotion key of the run it records.
KEY_ATTR = "promotion_key"


class PromotionFailed(HybridlabError, RuntimeError):
    """Some promoted runs failed; the others are recorded and a rerun retries the failed ones."""


@dataclass(frozen=True)
class Source:
    """What is promoted: a proxy trial, or a baseline built from the best one."""

    key: str
    role: PromotionRole
    arch: ArchConfig
    trial: int | None
    proxy_value: float | None


@dataclass(frozen=True)
class PlannedRun:
    source: Source
    scaled: Scaled | None
    error: str | None  # why the source cannot reach the rung's target (then scaled is None)


@dataclass(frozen=True)
class PromotionSummary:
    study: str
    trained: int  # runs trained by this call
    skipped: int  # runs already trained before it
    failed: list[str]
    seconds_per_rung: dict[int, float]


def promotion_sources(study: optuna.Study, name: str, url: str,
                      stage: PromotionStage, space: SearchSpace) -> list[Source]:
    """The ``top_k`` best distinct genomes of the study, then the baselines built from the best.

    Ranked by ``stage.metric`` (the space's first task objective) over complete trials with a
    trained or reused candidate.
    """
    with open_engine(url) as engine:
        candidates = transaction(engine, lambda session: Candidate.of_study(session, name))
    direction = _direction(space, stage.metric)
    sign = -1.0 if direction == "maximize" else 1.0
    ranked = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        c = candidates.get(t.number)
        value = (c.objectives or {}).get(stage.metric) if c is not None else None
        if c is None or c.arch is None or value is None or not math.isfinite(value):
            continue
        ranked.append((sign * value, t.number, c))
    ranked.sort(key=lambda item: item[:2])
    sources: list[Source] = []
    seen: set[str] = set()
    for _, number, c in ranked:
        if c.genome_hash in seen:
            continue
        seen.add(c.genome_hash)
        sources.append(Source(key=f"trial:{number}", role=PromotionRole.CANDIDATE,
                              arch=ArchConfig.from_dict(c.arch), trial=number,
                              proxy_value=float(c.objectives[stage.metric])))
        if len(sources) == stage.top_k:
            break
    if not sources:
        raise StorageError(f"study {name!r} has no complete trial with a measured "
                           f"{stage.metric} to promote")
    best = sources[0].arch
    for role in stage.baselines:
        role = PromotionRole(role)
        sources.append(Source(key=role.value, role=role, arch=baseline(best, role, space),
                              trial=None, proxy_value=None))
    return sources


def baseline(arch: ArchConfig, role: PromotionRole, space: SearchSpace) -> ArchConfig:
    """``arch`` with every mixer made attention (transformer) or Mamba (ssm); per-token layers
    (MLP, MoE) stay."""
    if role == PromotionRole.TRANSFORMER:
        keep: tuple[str, ...] = ("attention",)
        replacement = _first_spec(arch, keep, space, arch.d_model)
    else:
        keep = ("mamba2", "mamba1")
        replacement = _first_spec(arch, keep, space, arch.d_model)
    swap = tuple(kind for kind in mixer_types() if kind not in keep)
    layers = tuple(replacement if layer.type in swap else layer for layer in arch.layers)
    return replace(arch, layers=layers)


def _first_spec(arch: ArchConfig, kinds: tuple[str, ...], space: SearchSpace,
                d_model: int) -> LayerSpec:
    """The first layer of ``arch`` of one of ``kinds``, else one built from the space's first
    choices for the first of ``kinds`` the space searches (else that type's defaults)."""
    for layer in arch.layers:
        if layer.type in kinds:
            return layer
    searched = [k for k in kinds if k in space.model.layer_types] or list(kinds)
    kind = searched[0]
    settings = {}
    for key, param in space.model.layer_params.get(kind, {}).items():
        value = param.values[0] if hasattr(param, "values") else param.low
        if value is not None:
            settings[key] = value
    spec = LAYER_TYPES[kind].spec(**settings)
    if isinstance(spec, AttentionSpec):
        # Plain multi-head attention: the standard baseline, and its width lattice (whole KV
        # heads) is as fine as the head count allows, where one KV head would allow only
        # multiples of d_model.
        spec = replace(spec, n_kv_heads=None)
        if spec.head_dim is None and d_model % spec.n_heads:
            spec = replace(spec, n_heads=1)
    return spec


def rung_goal(rung: Rung, sources: list[Source]) -> Target:
    """The one target every run of the rung aims at: a relative target ("4x") multiplies the
    largest parameter count among the promoted candidates."""
    if rung.target.ratio is None:
        return rung.target
    from hybridlab.cost import param_count

    largest = max(param_count(s.arch) for s in sources if s.role == PromotionRole.CANDIDATE)
    return Target(params=round(rung.target.ratio * largest))


def plan_rung(sources: list[Source], rung: Rung, *, context: int) -> list[PlannedRun]:
    goal = rung_goal(rung, sources)
    planned = []
    for source in sources:
        try:
            planned.append(PlannedRun(source, scale(source.arch, goal, strategy=rung.strategy,
                                                    context=context), None))
        except ScaleError as err:
            planned.append(PlannedRun(source, None, str(err)))
    return planned


def _direction(space: SearchSpace, metric: str) -> str:
    for objective in space.objectives:
        if objective.metric == metric:
            return objective.direction
    return METRICS[metric].direction


def _train_one(arch_data: dict[str, Any], space_task: str, task_options: dict[str, Any],
               seed: int, cfg: TrainConfig, folder: str, threads: int) -> tuple[TrainResult, str]:
    """A Ray task: train one promoted run on one worker, resuming from ``folder``."""
    import ray

    torch.set_num_threads(threads)
    task = make_task(space_task, seed=seed, **task_options)
    model = HybridLM(ArchConfig.from_dict(arch_data), seed=seed)
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    with (path / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = train(model, task, cfg, checkpoint_dir=path)
    return result, ray.get_runtime_context().get_node_id()


def _train_parallel(arch_data: dict[str, Any], space_task: str, task_options: dict[str, Any],
                    seed: int, cfg: TrainConfig, folder: str, workers: int, use_gpu: bool,
                    cpus_per_worker: float, storage_path: str,
                    name: str) -> tuple[TrainResult, list[str]]:
    """A Ray task holding no CPU: train one promoted run data-parallel on Ray Train."""
    from hybridlab.search.distributed import train_data_parallel

    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    with (path / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = train_data_parallel(
            ArchConfig.from_dict(arch_data), task=space_task, task_seed=seed,
            task_options=task_options, cfg=cfg, model_seed=seed, workers=workers,
            checkpoint_dir=path, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
            storage_path=Path(storage_path), name=name)
    return run.result, list(run.nodes)


def load_stage(study: optuna.Study, name: str, space_path: str | Path | None) -> SearchSpace:
    """The study's space (as stored at its creation), or the one in ``space_path``, which must
    have a ``promotion`` section."""
    if space_path is not None:
        path = Path(space_path)
        from hybridlab.search.space import load_space

        space = load_space(path)
        where = str(path)
    else:
        text = study.user_attrs.get("space")
        if text is None:
            raise StorageError(f"study {name!r} has no stored search space; pass --space FILE")
        space = parse_space(text, source=f"study {name!r}'s stored space", check_task=False)
        where = f"the stored space of study {name!r}"
    if space.promotion is None:
        raise ConfigError("promotion", f"{where} has no promotion section; add one (see "
                          "search_spaces/scaling.yaml) and pass it with --space")
    return space


def promote(
    study_name: str,
    storage_url: str,
    *,
    space: SearchSpace,
    runs_dir: str | Path = "runs",
    ray_address: str | None = None,
    echo: Callable[[str], Any] = print,
) -> PromotionSummary:
    """Run every rung of ``space.promotion`` on the finished study ``study_name``.

    Runs already trained are skipped; failed or interrupted ones are trained again (resuming
    from their checkpoints). Raises PromotionFailed if any run failed, after recording it.
    """
    stage = space.promotion
    if stage is None:
        raise ConfigError("promotion", "the space has no promotion section")
    study = load_study(study_name, storage_url)
    sources = promotion_sources(study, study_name, storage_url, stage, space)
    artifacts = Path(runs_dir).resolve() / study_name
    task = make_task(space.task, seed=space.seed, **dict(space.task_options))
    direction = _direction(space, stage.metric)
    plans = [plan_rung(sources, rung, context=space.budgets.state_context)
             for rung in stage.rungs]
    with open_engine(storage_url) as engine:
        with creation_lock(engine):
            create_tables(engine)
            storage = RetryingRDBStorage(storage_url, engine_kwargs=engine_kwargs(storage_url))
            rung_studies = [optuna.create_study(
                study_name=rung_study_name(study_name, number), storage=storage,
                directions=[direction], load_if_exists=True)
                for number in range(1, len(stage.rungs) + 1)]
        for number, (rung, planned, rung_study) in enumerate(
                zip(stage.rungs, plans, rung_studies, strict=True), start=1):
            rung_study.set_user_attr("promotion_of", study_name)
            rung_study.set_user_attr("rung", number)
            rung_study.set_metric_names([stage.metric])
            _record_plan(engine, study_name, number, rung, planned, stage.metric)

    import ray

    started_ray = not ray.is_initialized()
    if started_ray:
        if ray_address:
            ray.init(address=ray_address)
        else:
            cpus = max(max(r.workers_per_trial for r in stage.rungs),
                       math.ceil(space.resources.cpus_per_worker * space.workers))
            # "local": a new instance, never one that an address file or RAY_ADDRESS points at.
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     object_store_memory=256 * 1024**2)
    trained, skipped, failed = 0, 0, []
    seconds: dict[int, float] = {}
    try:
        with open_engine(storage_url) as engine:
            for number, (rung, planned, rung_study) in enumerate(
                    zip(stage.rungs, plans, rung_studies, strict=True), start=1):
                began = time.perf_counter()
                done, skip, bad = _run_rung(ray, engine, space, task, study_name, number, rung,
                                            planned, rung_study, artifacts, echo)
                seconds[number] = time.perf_counter() - began
                trained, skipped, failed = trained + done, skipped + skip, failed + bad
                echo(f"rung {number} ({rung.target_text}, {rung.strategy}): {done} trained, "
                     f"{skip} already trained, {len(bad)} failed in {seconds[number]:.1f} s")
    finally:
        if started_ray:
            with contextlib.suppress(Exception):
                ray.shutdown()
    summary = PromotionSummary(study=study_name, trained=trained, skipped=skipped,
                               failed=failed, seconds_per_rung=seconds)
    if failed:
        raise PromotionFailed(f"{len(failed)} promoted run(s) failed: {'; '.join(failed)}; "
                              "the rest are recorded, rerun to retry the failed ones")
    return summary


def _record_plan(engine, study: str, number: int, rung: Rung, planned: list[PlannedRun],
                 metric: str) -> None:
    """Insert the rung's rows (pending), or refresh those not trained yet."""
    from hybridlab.cost import param_count

    def write(session) -> None:
        for plan in planned:
            source = plan.source
            row = session.get(Promotion, (study, number, source.key))
            if row is not None and row.status == PromotionStatus.TRAINED.value:
                continue
            arch = plan.scaled.config if plan.scaled is not None else source.arch
            values = dict(
                role=source.role.value, source_trial=source.trial,
                run_study=rung_study_name(study, number), metric=metric,
                proxy_value=source.proxy_value, genome_hash=arch.canonical_hash(),
                pattern=arch.pattern, arch=arch.to_dict(), params=param_count(arch),
                source_params=param_count(source.arch), strategy=rung.strategy,
                target=rung.target_text, workers=rung.workers_per_trial,
                status=(PromotionStatus.PENDING if plan.error is None
                        else PromotionStatus.FAILED).value,
                reason=plan.error)
            if row is None:
                session.add(Promotion(study=study, rung=number, key=source.key, run_trial=None,
                                      value=None, nodes=None, seconds=None, **values))
            else:
                for key, value in values.items():
                    setattr(row, key, value)

    transaction(engine, write)


def _run_rung(ray, engine, space: SearchSpace, task, study: str, number: int, rung: Rung,
              planned: list[PlannedRun], rung_study: optuna.Study, artifacts: Path,
              echo: Callable[[str], Any]) -> tuple[int, int, list[str]]:
    rows = {row.key: row for row in transaction(
        engine, lambda session: Promotion.of_study(session, study, number))}
    recorded = {t.user_attrs.get(KEY_ATTR): t for t in rung_study.get_trials(deepcopy=False)
                if t.state == TrialState.COMPLETE}
    todo, skipped, failed = [], 0, []
    for plan in planned:
        row = rows[plan.source.key]
        if row.status == PromotionStatus.TRAINED.value:
            skipped += 1
        elif plan.error is not None:
            failed.append(f"rung {number} {plan.source.key}: {plan.error}")
            echo(f"  {plan.source.key}: cannot scale: {plan.error}")
        else:
            todo.append(plan)
    # A baseline can be the very architecture of a candidate (the best one already has no
    # attention, say): it is trained once, and both rows record that one run.
    first: dict[str, str] = {}
    twins: dict[str, str] = {}
    for plan in planned:
        if plan.scaled is not None:
            genome = plan.scaled.config.canonical_hash()
            if genome in first:
                twins[plan.source.key] = first[genome]
            else:
                first[genome] = plan.source.key
    todo = [plan for plan in todo if plan.source.key not in twins]
    use_gpu = space.resources.gpus_per_worker > 0
    cfg = replace(rung.train, device="cuda" if use_gpu else "cpu", threads=None)
    options = dict(space.task_options)
    one = ray.remote(max_retries=MAX_RUN_RETRIES)(_train_one).options(
        num_cpus=space.resources.cpus_per_worker, num_gpus=space.resources.gpus_per_worker)
    many = ray.remote(max_retries=MAX_RUN_RETRIES)(_train_parallel).options(num_cpus=0)
    # Data-parallel runs go one at a time: two trainers asking for every CPU would each wait
    # for the other's workers.
    limit = len(todo) if rung.workers_per_trial == 1 else 1
    waiting = list(todo)
    running: dict[Any, tuple[PlannedRun, float]] = {}
    trained = 0
    while waiting or running:
        while waiting and len(running) < limit:
            plan = waiting.pop(0)
            arch = plan.scaled.config
            key = f"{arch.canonical_hash()}-{settings_key(cfg, task)}"
            folder = artifacts / "checkpoints" / key
            _set_status(engine, study, number, plan.source.key, PromotionStatus.RUNNING, None)
            if rung.workers_per_trial == 1:
                ref = one.remote(arch.to_dict(), space.task, options, space.seed, cfg,
                                 str(folder), space.resources.threads_per_worker)
            else:
                ref = many.remote(arch.to_dict(), space.task, options, space.seed, cfg,
                                  str(folder), rung.workers_per_trial, use_gpu,
                                  space.resources.cpus_per_worker,
                                  str(artifacts / "ray-train"),
                                  f"{study}-rung{number}-{plan.source.key.replace(':', '')}")
            running[ref] = (plan, time.perf_counter())
            echo(f"  training {plan.source.key} at rung {number}: {arch.pattern} "
                 f"d_model {arch.d_model}, {plan.scaled.achieved:,.0f} params, "
                 f"{rung.workers_per_trial} worker(s)")
        done, _ = ray.wait(list(running), num_returns=1)
        ref = done[0]
        plan, began = running.pop(ref)
        try:
            result, nodes = ray.get(ref)
        except Exception as err:  # the run failed on every retry
            reason = str(err).strip().splitlines()[-1][:500]
            _set_status(engine, study, number, plan.source.key, PromotionStatus.FAILED, reason)
            failed.append(f"rung {number} {plan.source.key}: {reason}")
            echo(f"  {plan.source.key}: failed: {reason}")
            continue
        nodes = [nodes] if isinstance(nodes, str) else nodes
        _record_run(engine, space, task, study, number, rung, plan, rung_study,
                    recorded.get(plan.source.key), result, nodes,
                    time.perf_counter() - began)
        trained += 1
        metric = space.promotion.metric
        echo(f"  {plan.source.key}: {metric} {result.metrics.get(metric, float('nan')):.4f} "
             f"({result.status}, {result.seconds:.1f} s"
             + (f", resumed from step {result.resumed_from}" if result.resumed_from else "")
             + ")")
    for key, twin in twins.items():
        if rows[key].status == PromotionStatus.TRAINED.value:
            continue
        status = _copy_twin(engine, study, number, key, twin)
        echo(f"  {key}: the same architecture as {twin}, whose run it shares ({status})")
        if status == PromotionStatus.TRAINED:
            trained += 1
        else:
            failed.append(f"rung {number} {key}: its twin {twin} did not train")
    return trained, skipped, failed


def _copy_twin(engine, study: str, rung: int, key: str, twin: str) -> PromotionStatus:
    """Give run ``key`` the outcome of ``twin``, the run of the same architecture."""

    def copy(session) -> PromotionStatus:
        source = session.get(Promotion, (study, rung, twin))
        row = session.get(Promotion, (study, rung, key))
        trained = source.status == PromotionStatus.TRAINED.value
        row.status = source.status if trained else PromotionStatus.FAILED.value
        row.reason = f"the same architecture as {twin}: shares its run"
        row.run_trial, row.value, row.nodes = source.run_trial, source.value, source.nodes
        row.seconds = 0.0 if trained else None
        return PromotionStatus(row.status)

    return transaction(engine, copy)


def _set_status(engine, study: str, rung: int, key: str, status: PromotionStatus,
                reason: str | None) -> None:
    transaction(engine, lambda session: session.execute(sa.update(Promotion).where(
        Promotion.study == study, Promotion.rung == rung, Promotion.key == key).values(
        status=status.value, reason=reason)))


def _record_run(engine, space: SearchSpace, task, study: str, number: int, rung: Rung,
                plan: PlannedRun, rung_study: optuna.Study, existing, result: TrainResult,
                nodes: list[str], seconds: float) -> None:
    """The finished run as a complete trial of the rung study, its rows, and its hl_promotion
    row; a trial already recorded for the run (an earlier call died after adding it) is reused."""
    metric = space.promotion.metric
    arch = plan.scaled.config
    value = result.metrics.get(metric)
    if value is None or not math.isfinite(value):
        reason = f"{result.status}: {result.reason}; no finite {metric}"
        _set_status(engine, study, number, plan.source.key, PromotionStatus.FAILED, reason)
        return
    costs = candidate_costs(arch, space)
    source = plan.source
    if existing is None:
        attrs = {KEY_ATTR: source.key, "role": source.role.value, "source_trial": source.trial,
                 "pattern": arch.pattern, "genome_hash": arch.canonical_hash(),
                 "train_seconds": result.seconds, "nodes": nodes, **costs}
        if result.resumed_from:
            attrs["resumed_from_step"] = result.resumed_from
        rung_study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE, values=[value], user_attrs=attrs))
        trial = max(t.number for t in rung_study.get_trials(deepcopy=False)
                    if t.user_attrs.get(KEY_ATTR) == source.key)
    else:
        trial = existing.number
    run_study = rung_study_name(study, number)
    store_train_result(engine, run_study, trial, task.name, result)
    fingerprint = json.loads(json.dumps(task.fingerprint(), default=str))
    source_text = (f"trial {source.trial}" if source.trial is not None
                   else f"{source.role.value} baseline")
    reason = (f"promoted {source_text} to {rung.target_text} by {rung.strategy}: "
              f"{result.reason}"
              + (f"; resumed from step {result.resumed_from}" if result.resumed_from else ""))
    values = {
        "genome_hash": arch.canonical_hash(), "pattern": arch.pattern, "arch": arch.to_dict(),
        "params": int(costs["params"]), "active_params": int(costs["active_params"]),
        "flops_per_token": costs["flops_per_token"],
        "state_bytes": int(costs["state_bytes"]),
        "state_context": space.budgets.state_context, "tokens_per_second": None,
        "task": space.task, "task_fingerprint": fingerprint,
        "corpus_hash": fingerprint.get("corpus_hash"), "code_version": code_version(),
        "status": CandidateStatus.TRAINED.value, "reason": reason, "reused_from": None,
        "objectives": {**costs, **result.metrics},
    }

    def finish(session) -> None:
        Candidate.upsert(session, run_study, trial, values)
        session.execute(sa.update(Promotion).where(
            Promotion.study == study, Promotion.rung == number,
            Promotion.key == source.key).values(
            status=PromotionStatus.TRAINED.value, reason=reason, run_trial=trial, value=value,
            nodes=nodes, seconds=seconds))

    transaction(engine, finish)
