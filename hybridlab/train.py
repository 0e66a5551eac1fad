"""Train one candidate: AdamW, warmup + cosine, clipping, NaN guard, budgets, checkpoint/resume.

The trainer knows nothing of the search: evaluation results go to an optional callback (the search
reports them to Optuna for pruning; returning True stops training), and the outcome, including why
training stopped, comes back as a ``TrainResult`` the caller records. With ``DataParallel`` it
trains as one rank of a torch.distributed group that the caller set up (``search.distributed``
does it on Ray Train); the trainer itself never imports a cluster framework.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, TextIO, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from hybridlab.checkpoint import load_checkpoint, load_latest_checkpoint, save_checkpoint
from hybridlab.config import ConfigError
from hybridlab.data.task import Batch, TaskData
from hybridlab.errors import HybridlabError
from hybridlab.layers.registry import aux_losses, no_weight_decay_ids, router_loads
from hybridlab.metrics import METRICS, metric_names
from hybridlab.model import HybridLM

Status = Literal["completed", "solved", "budget", "stopped", "diverged"]
T = TypeVar("T")
EvalCallback = Callable[[int, dict[str, float]], bool | None]
# Called with (step, mean train loss) after each logged window; what a search driver shows live.
LogCallback = Callable[[int, float], None]
# "bar": a tqdm bar for terminals; "lines": one flushed line per log interval, for pipes and logs.
Progress = Literal["bar", "lines", "off"]
PROGRESS_MODES = ("bar", "lines", "off")

# TrainConfig fields that change how a run executes but neither its weights nor its curve:
# resuming from a checkpoint is exact, so where and how often it is written does not matter.
OPERATIONAL_FIELDS = frozenset({"threads", "device", "checkpoint_every", "keep_checkpoints"})



@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batch_size: int = 64
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end (and never when diverged)
    keep_checkpoints: int = 2
    max_tokens: int | None = None
    max_seconds: float | None = None
    seed: int = 0
    threads: int | None = None  # torch CPU threads for this trial; None leaves torch's setting
    device: str = "cpu"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Stop once the task is solved: the test metric ``target_metric`` reaches ``target`` at an
    # evaluation (Zoology stops MQAR runs at 0.99 accuracy). None trains every step.
    target: float | None = None
    target_metric: str = "accuracy"

    def __post_init__(self) -> None:
        # Annotations are strings here (postponed evaluation), so the kind is read from them.
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if value is None and kind.endswith("| None"):
                continue
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if kind.startswith("int") and not (number and isinstance(value, int)):
                raise ConfigError(f.name, f"must be an integer, got {value!r}")
            # NaN slips through every range check below and inf passes them, so both are
            # refused here, where the message can say what is wrong.
            if kind.startswith("float") and not (number and math.isfinite(value)):
                raise ConfigError(f.name, f"must be a finite number, got {value!r}")
            if (kind == "str" or kind.startswith("Literal")) and not isinstance(value, str):
                raise ConfigError(f.name, f"must be a string, got {value!r}")
        for name in ("steps", "batch_size", "eval_every", "eval_batch_size", "log_every"):
            _require(getattr(self, name) > 0, name, "must be positive")
        for name in ("warmup_steps", "checkpoint_every", "keep_checkpoints", "seed"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        _require(self.lr > 0, "lr", "must be positive")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, name, "must be in [0, 1)")
        _require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        _require(self.threads is None or self.threads > 0, "threads", "must be positive")
        _require(self.max_tokens is None or self.max_tokens > 0, "max_tokens", "must be positive")
        _require(self.max_seconds is None or self.max_seconds > 0, "max_seconds",
                 "must be positive")
        _require(self.precision in ("auto", "fp32", "bf16"), "precision",
                 "must be auto, fp32 or bf16")
        task_metrics = metric_names("task")
        _require(self.target_metric in task_metrics, "target_metric",
                 f"must be one of {list(task_metrics)}, got {self.target_metric!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> TrainConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"train.{key}", f"unknown field; expected one of {sorted(known)}",
                                  source=source)
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"train.{err.field}", err.message, source=source) from None
        except TypeError as err:
            raise ConfigError("train", str(err), source=source) from None


def _solved(cfg: TrainConfig, metrics: dict[str, float], step: int) -> str | None:
    """The reason to stop when ``metrics`` reach the target, else None."""
    if cfg.target is None or cfg.target_metric not in metrics:
        return None
    value = metrics[cfg.target_metric]
    maximize = METRICS[cfg.target_metric].direction == "maximize"
    if (value >= cfg.target) if maximize else (value <= cfg.target):
        return f"{cfg.target_metric} {value:.4g} reached the target {cfg.target:g} at step {step}"
    return None


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(name, message)


@dataclass(frozen=True, kw_only=True)
class DataParallel:
    """This process's place in a data-parallel run: rank ``rank`` of ``world_size``.

    The caller has initialised the default torch.distributed process group (gloo on CPU, nccl on
    CUDA, with ``cfg.device`` naming this rank's GPU).
    """

    rank: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("rank", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"data_parallel.{name}", f"must be an integer, got {value!r}")
        _require(self.world_size >= 1, "data_parallel.world_size", "must be >= 1")
        _require(0 <= self.rank < self.world_size, "data_parallel.rank",
                 f"must be in 0..{self.world_size - 1}, got {self.rank}")

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of ``batch_size`` (which the world size divides)."""
        local = batch_size // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)


class RankZeroError(HybridlabError, RuntimeError):
    """Raised on the other ranks when a step that only rank 0 runs (checkpoint, callback) failed
    there; rank 0 raises the original error."""


def _check_data_parallel(dp: DataParallel, cfg: TrainConfig) -> None:
    if cfg.batch_size % dp.world_size:
        raise ConfigError("batch_size", f"the global batch of {cfg.batch_size} must split "
                          f"evenly over the {dp.world_size} data-parallel ranks")
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("data_parallel", "the default torch.distributed process group is not "
                          "initialised; call torch.distributed.init_process_group first")
    group = (dist.get_rank(), dist.get_world_size())
    if group != (dp.rank, dp.world_size):
        raise ConfigError("data_parallel", f"says rank {dp.rank} of {dp.world_size} but the "
                          f"process group is rank {group[0]} of {group[1]}")


def _on_rank_zero(dp: DataParallel | None, fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 alone, its value (or failure) handed to every rank.

    Decisions that differ by process (clocks, the callback) and writes to the shared folder go
    through here, so the ranks never disagree on when to stop, and a failure on rank 0 ends every
    rank instead of leaving the others waiting in the next collective.
    """
    if dp is None:
        return fn()
    payload: list[Any] = [None]
    if dp.rank == 0:
        try:
            payload[0] = (True, fn())
        except BaseException as err:
            dist.broadcast_object_list([(False, f"{type(err).__name__}: {err}")], src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    ok, value = payload[0]
    if not ok:
        raise RankZeroError(f"rank 0 failed: {value}")
    return value


class _ScoredForward(nn.Module):
    """``scored_logits`` as a module's forward: DistributedDataParallel wraps ``forward`` only,
    and its gradient hooks must see every training step."""

    def __init__(self, model: HybridLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor):
        return scored_logits(self.model, Batch(inputs, targets))


@dataclass
class TrainResult:
    status: Status
    reason: str
    steps: int
    tokens: int
    seconds: float
    metrics: dict[str, float]
    curve: list[dict[str, Any]] = field(default_factory=list)  # {step, split, metric, value}
    checkpoint: Path | None = None
    resumed_from: int = 0  # the step of the checkpoint this run continued from (0: fresh)
    # One line per checkpoint that failed verification and was set aside, with what the run
    # resumed from instead; the caller records them.
    recovered: list[str] = field(default_factory=list)


def settings_key(cfg: TrainConfig, task: TaskData) -> str:
    """12 hex chars naming what besides the genome decides the trained weights and curve.

    Covers every train setting except ``OPERATIONAL_FIELDS`` and the task's exact data
    (fingerprint: name, version, knobs, seed). Runs with equal keys may share a checkpoint folder.
    """
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in OPERATIONAL_FIELDS}
    text = json.dumps({"train": train, "task": task.fingerprint()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def routing_stats(model: nn.Module, dp: DataParallel | None = None) -> dict[str, float]:
    """Of the last training step's routed layers (none: {}): ``aux_loss``, the sum of their
    auxiliary losses, and ``router_imbalance``, the most loaded expert's share of its layer's
    assignments times its layer's expert count (1 is perfect balance; n_experts / top_k at
    worst). Under data parallelism both are means over the ranks' batches."""
    loads = router_loads(model)
    if not loads:
        return {}
    aux = sum((loss.detach().float() for loss in aux_losses(model)), loads[0].new_zeros(()))
    stats = torch.cat([aux[None], *(load.float() for load in loads)])
    if dp is not None:
        dist.all_reduce(stats)
        stats /= dp.world_size
    values = stats.tolist()
    imbalance, at = 0.0, 1
    for load in loads:
        share = values[at:at + load.numel()]
        imbalance = max(imbalance, max(share) * load.numel())
        at += load.numel()
    return {"aux_loss": values[0], "router_imbalance": imbalance}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    exempt = no_weight_decay_ids(model)
    for param in model.parameters():  # each shared (tied) parameter once
        if param.requires_grad:
            (no_decay if id(param) in exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return nullcontext()
    # SSM parameters stay fp32: autocast only changes the dtype of matmul inputs, and the scans
    # compute in fp32 from fp32 A_log / D / dt bias.
    return torch.autocast(device.type, dtype=torch.bfloat16)


def scored_logits(model: HybridLM, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (S, V) and targets (S,) at the S scored positions only.

    Synthetic tasks score a few positions per sequence (MQAR: one in sixteen), and the LM head
    over a large vocabulary dominates the cost, so it runs on the scored rows alone.
    """
    hidden = model.hidden_states(batch.inputs)  # (B, L, d_model)
    mask = batch.mask
    return model.lm_head(hidden[mask]), batch.targets[mask]


@torch.no_grad()
def evaluate(
    model: HybridLM, task: TaskData, *, batch_size: int, precision: str = "auto",
    data_parallel: DataParallel | None = None,
) -> dict[str, float]:
    """Loss and accuracy at the scored positions of the task's fixed test set (+ bits/byte).

    With ``data_parallel`` the ranks take the test batches in turn and share their per-batch sums;
    every rank then adds them up in batch order, so all ranks get the metrics a single process
    computes from the same weights, to the bit.
    """
    was_training = model.training
    model.eval()
    sums: list[tuple[float, int, int]] = []  # per test batch: loss sum, correct, scored
    for i, batch in enumerate(task.eval_batches(batch_size)):
        if data_parallel is not None and i % data_parallel.world_size != data_parallel.rank:
            sums.append((0.0, 0, 0))
            continue
        batch = batch.to(model.device)
        with _autocast(model.device, precision):
            logits, targets = scored_logits(model, batch)
        if targets.numel() == 0:
            sums.append((0.0, 0, 0))
            continue
        sums.append((float(F.cross_entropy(logits.float(), targets, reduction="sum")),
                     int((logits.argmax(-1) == targets).sum()), targets.numel()))
    if data_parallel is not None:
        # Each batch has one rank's sums and zeros elsewhere: adding zeros is exact, so the
        # all-reduce loses nothing whatever its order (counts stay exact in float64 below 2**53).
        shared = torch.tensor(sums, dtype=torch.float64, device=model.device).reshape(-1, 3)
        dist.all_reduce(shared)
        sums = [(loss, int(correct), int(scored)) for loss, correct, scored in shared.tolist()]
    total_loss, total_correct, total_scored = 0.0, 0, 0
    for loss, correct, scored in sums:
        total_loss += loss
        total_correct += correct
        total_scored += scored
    model.train(was_training)
    if total_scored == 0:
        raise ValueError(f"task {task.name!r}: the evaluation set has no scored positions")
    metrics = {"loss": total_loss / total_scored, "accuracy": total_correct / total_scored}
    if task.metric == "bits_per_byte":
        metrics["bits_per_byte"] = metrics["loss"] / math.log(2) / task.bytes_per_token
    return metrics


def _load(
    checkpoint_dir: str | Path | None, model: HybridLM, dp: DataParallel | None
) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The newest verified checkpoint: (path, train state, recovery notes), or (None, None, []).

    Data-parallel: rank 0 picks it (setting corrupt ones aside, which must happen once), then
    every rank loads that same checkpoint from the shared folder.
    """
    if checkpoint_dir is None:
        return None, None, []
    if dp is None:
        return load_latest_checkpoint(checkpoint_dir, model)
    picked: dict[str, Any] = {}

    def pick() -> tuple[Path | None, list[str]]:
        found, picked["state"], recovered = load_latest_checkpoint(checkpoint_dir, model)
        return found, recovered

    found, recovered = _on_rank_zero(dp, pick)
    if dp.rank == 0:
        return found, picked["state"], recovered
    return found, (load_checkpoint(found, model) if found is not None else None), recovered


def train(
    model: HybridLM,
    task: TaskData,
    cfg: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    callback: EvalCallback | None = None,
    on_log: LogCallback | None = None,
    progress: Progress | bool = "off",
    progress_stream: TextIO | None = None,
    data_parallel: DataParallel | None = None,
) -> TrainResult:
    """Train ``model`` on ``task``; resumes from the newest verified checkpoint in the folder.

    Newer checkpoints that fail verification are set aside and listed in ``recovered``.
    ``progress`` ("bar" | "lines" | "off"; True and False mean "bar" and "off") goes to
    ``progress_stream``, sys.stderr by default; a line reads
    ``mqar step 50/100 loss 3.2100 lr 1.00e-03 12.3 s``.

    Stops at ``cfg.steps`` ("completed"), once an evaluation reaches ``cfg.target`` ("solved"),
    at a token or time budget ("budget"), when the callback returns True ("stopped"), or on a
    non-finite loss ("diverged", with the step in the reason). ``on_log(step, loss)`` runs after
    each ``cfg.log_every`` steps with the window's mean train loss (on rank 0 only).

    ``data_parallel``: this process is one rank of a data-parallel run; every rank calls
    ``train`` with the same model seed, task, config and (shared) checkpoint folder.

    - ``cfg.batch_size`` is the global batch. Every rank draws the whole batch from the same
      seeded data generator and trains on its rows ``rank*B/W:(rank+1)*B/W`` (W must divide B,
      else ConfigError naming batch_size), so the data order, the generator state in
      checkpoints, ``tokens`` and the curve do not depend on the world size.
    - The model is wrapped in DistributedDataParallel. Each rank's loss is its sum over scored
      positions divided by the global count of scored positions (known on every rank from the
      whole batch) and scaled by W against DDP's gradient averaging, so the synchronised
      gradient is the single-process one however the scored positions fall across ranks.
      Clipping sees that synchronised gradient; the logged train loss is the global mean
      (all-reduced), and a non-finite one ends every rank as "diverged" at the same step.
    - Evaluation: the ranks take the test batches in turn and share their sums (``evaluate``):
      every rank gets the metrics a single process gets from the same weights.
    - Rank 0 alone writes checkpoints, in the single-process format, while the others wait; on
      resume rank 0 picks the checkpoint and every rank loads it. A checkpoint resumes under any
      world size that divides the batch, single-process included, with the same data order: only
      the order of floating-point reductions differs, so the curve matches to rounding.
    - The callback, the time budget and ``progress`` run on rank 0 alone; its decisions are
      broadcast so every rank stops at the same step. A failure there raises the original error
      on rank 0 and ``RankZeroError`` on the others. Every rank returns the same result, except
      ``seconds`` (each rank's own clock; rank 0's is the one checkpoints keep).
    """
    dp = data_parallel
    mode = ("bar" if progress else "off") if isinstance(progress, bool) else progress
    if mode not in PROGRESS_MODES:
        raise ConfigError("progress", f"must be one of {', '.join(PROGRESS_MODES)}, got "
                          f"{progress!r}")
    if dp is not None and dp.rank != 0:
        mode = "off"
    stream = progress_stream if progress_stream is not None else sys.stderr
    if task.vocab_size > model.config.vocab_size:
        raise ConfigError("vocab_size", f"the task needs {task.vocab_size} tokens but the "
                          f"model has {model.config.vocab_size}")
    if dp is not None:
        _check_data_parallel(dp, cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    if dp is not None and device.type == "cuda":
        # A bare "cuda" is this process's current GPU; nccl collectives (object broadcasts
        # included) run on the current device, and DDP needs the index.
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg)
    data_rng = torch.Generator().manual_seed(cfg.seed)
    step, tokens, seconds_before, resumed_from = 0, 0, 0.0, 0
    curve: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    evaluated_at = -1
    running_loss, running_count = 0.0, 0
    found, state, recovered = _load(checkpoint_dir, model, dp)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        data_rng.set_state(state["data_rng"])
        step, tokens = int(state["step"]), int(state["tokens"])
        resumed_from = step
        seconds_before = float(state["seconds"])
        curve = list(state["curve"])
        # The train-loss window open at the checkpoint, so the next logged mean is the one an
        # uninterrupted run logs (checkpoints written before this was saved restart the window).
        running_loss = float(state.get("running_loss", 0.0))
        running_count = int(state.get("running_count", 0))
        # A checkpoint written after an evaluation already holds that evaluation: reuse it rather
        # than appending the same step again (a retry of a run that had finished training).
        metrics = {c["metric"]: c["value"] for c in curve
                   if c["step"] == step and c["split"] == "test"}
        evaluated_at = step if metrics else -1
    # Built after loading: DDP broadcasts rank 0's weights to the others when it is created.
    forward = (DistributedDataParallel(
        _ScoredForward(model), device_ids=[device.index] if device.type == "cuda" else None)
        if dp is not None else None)

    start = time.perf_counter()

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - start

    def checkpoint() -> Path | None:
        if checkpoint_dir is None:
            return None
        state = {
            "optimizer": optimizer.state_dict(), "data_rng": data_rng.get_state(),
            "step": step, "tokens": tokens, "seconds": elapsed(), "curve": curve,
            "running_loss": running_loss, "running_count": running_count,
        }
        return _on_rank_zero(dp, lambda: save_checkpoint(
            checkpoint_dir, step, model=model, train_state=state, keep=cfg.keep_checkpoints))

    def result(status: Status, reason: str, metrics: dict[str, float], path: Path | None):
        return TrainResult(status=status, reason=reason, steps=step, tokens=tokens,
                           seconds=elapsed(), metrics=metrics, curve=curve, checkpoint=path,
                           resumed_from=resumed_from, recovered=recovered)

    def step_loss(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to differentiate, the global mean loss to log) for one global batch."""
        if forward is None:
            batch = batch.to(device)
            with _autocast(device, cfg.precision):
                logits, targets = scored_logits(model, batch)
            loss = F.cross_entropy(logits.float(), targets)
            return loss + sum(aux_losses(model)), loss.detach()
        scored = int(batch.mask.sum())
        rows = dp.rows(cfg.batch_size)
        local = Batch(batch.inputs[rows], batch.targets[rows]).to(device)
        with _autocast(device, cfg.precision):
            logits, targets = forward(local.inputs, local.targets)
        local_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        total = local_sum.detach().clone()
        dist.all_reduce(total)
        mean = total / scored  # 0/0 is NaN: no scored position at all diverges, as it does alone
        if not torch.isfinite(mean):
            return mean, mean
        # Each rank's auxiliary losses are its own batch's; DDP's gradient mean averages them.
        return local_sum * (dp.world_size / scored) + sum(aux_losses(model)), mean

    def callback_stops(at: int, evaluated: dict[str, float]) -> bool:
        return callback is not None and bool(callback(at, evaluated))

    status: Status = "completed"
    reason = f"reached {cfg.steps} steps"
    # A run resumed from a checkpoint that had already solved the task is finished.
    solved = _solved(cfg, metrics, step) if evaluated_at == step else None
    if solved is not None:
        status, reason = "solved", solved
    bar = tqdm(total=cfg.steps, initial=step, disable=mode != "bar", desc=task.name, leave=False,
               file=stream)
    try:
        while step < cfg.steps and status != "solved":
            if cfg.max_tokens is not None and tokens >= cfg.max_tokens:
                status, reason = "budget", f"token budget of {cfg.max_tokens} reached"
                break
            if cfg.max_seconds is not None and _on_rank_zero(
                    dp, lambda: elapsed() >= cfg.max_seconds):
                status, reason = "budget", f"time budget of {cfg.max_seconds} s reached"
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            batch: Batch = task.train_batch(cfg.batch_size, data_rng)
            loss, logged = step_loss(batch)
            if not torch.isfinite(logged):
                return result("diverged", f"loss became {logged.item()} at step {step + 1}",
                              metrics, None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            tokens += batch.inputs.numel()
            running_loss += logged.item()
            running_count += 1
            bar.update(1)
            if step % cfg.log_every == 0:
                mean = running_loss / running_count
                curve.append({"step": step, "split": "train", "metric": "loss", "value": mean})
                curve += [{"step": step, "split": "train", "metric": k, "value": v}
                          for k, v in routing_stats(model, dp).items()]
                bar.set_postfix(loss=f"{mean:.3f}")
                if on_log is not None and (dp is None or dp.rank == 0):
                    on_log(step, mean)
                if mode == "lines":
                    lr = optimizer.param_groups[0]["lr"]
                    print(f"{task.name} step {step}/{cfg.steps} loss {mean:.4f} lr {lr:.2e} "
                          f"{elapsed():.1f} s", file=stream, flush=True)
                running_loss, running_count = 0.0, 0
            if step % cfg.eval_every == 0 or step == cfg.steps:
                metrics = evaluate(model, task, batch_size=cfg.eval_batch_size,
                                   precision=cfg.precision, data_parallel=dp)
                evaluated_at = step
                curve += [{"step": step, "split": "test", "metric": k, "value": v}
                          for k, v in metrics.items()]
                if _on_rank_zero(dp, partial(callback_stops, step, metrics)):
                    status, reason = "stopped", f"stopped by the evaluation callback at step {step}"
                    break
                solved = _solved(cfg, metrics, step)
                if solved is not None:
                    status, reason = "solved", solved
                    break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint()
    finally:
        bar.close()
    unevaluated = evaluated_at != step
    if unevaluated:
        metrics = evaluate(model, task, batch_size=cfg.eval_batch_size, precision=cfg.precision,
                           data_parallel=dp)
        curve += [{"step": step, "split": "test", "metric": k, "value": v}
                  for k, v in metrics.items()]
    # Nothing trained or evaluated since the checkpoint we resumed from: it is the final state.
    unchanged = found is not None and step == resumed_from and not unevaluated
    return result(status, reason, metrics, found if unchanged else checkpoint())
