"""Train one candidate on several workers: Ray Train's ``TorchTrainer`` running ``train`` with DDP.

Each Ray Train worker builds the task and the seeded model itself and trains as one rank of the
process group Ray Train sets up (gloo on CPU, nccl on GPU), with ``cfg.batch_size`` as the global
batch, so the run trains on the data a single worker would, in the same order (see
``hybridlab.train.train``). Checkpoints go to ``checkpoint_dir``, which every worker must reach
(one machine, or a folder shared by the nodes): a call on a folder holding a finished run
returns it without training, and an interrupted run resumes from its last checkpoint under any
world size. Rank 0's ``TrainResult`` comes back as the training function's return value.

Only DDP: every worker holds the whole model. FSDP (sharding a model too large for one GPU) is
not offered, because gloo cannot run it on CPU and so nothing here could test it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hybridlab.config import ArchConfig, ConfigError
from hybridlab.data.tasks import make_task
from hybridlab.errors import HybridlabError
from hybridlab.model import HybridLM
from hybridlab.train import DataParallel, TrainConfig, TrainResult, train


@dataclass(frozen=True)
class DistributedRun:
    """What came back: rank 0's ``TrainResult`` and where the ranks ran."""

    result: TrainResult
    world_size: int
    nodes: tuple[str, ...]  # the Ray node id of each rank, in rank order


class DistributedTrainingError(HybridlabError, RuntimeError):
    """A data-parallel run failed on its workers; the message names each failed rank."""


def _train_rank(config: dict[str, Any]) -> tuple[TrainResult, list[str]]:
    """One Ray Train worker: train as this rank; every rank returns (Ray keeps rank 0's)."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["threads"])
    cfg: TrainConfig = config["cfg"]
    if config["use_gpu"]:
        cfg = replace(cfg, device=str(ray.train.torch.get_device()))
    task = make_task(config["task"], seed=config["task_seed"], **config["task_options"])
    model = HybridLM(config["arch"], seed=config["model_seed"])
    result = train(model, task, cfg, checkpoint_dir=config["checkpoint_dir"],
                   data_parallel=DataParallel(rank=rank, world_size=world))
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return result, nodes


def _failure_message(err: Exception) -> str:
    """Each failed rank's exception and message, or the controller's error.

    Ray Train lists the ranks that had failed when it looked: often all, sometimes only the
    first (the others then fail on the broken process group, or are stopped).
    """
    import ray.train

    if isinstance(err, ray.train.WorkerGroupError) and err.worker_failures:
        return "; ".join(f"rank {rank}: {type(failure).__name__}: {failure}"
                         for rank, failure in sorted(err.worker_failures.items()))
    return str(err).strip().splitlines()[-1]


def train_data_parallel(
    arch: ArchConfig,
    *,
    task: str,
    task_seed: int,
    task_options: Mapping[str, Any],
    cfg: TrainConfig,
    model_seed: int,
    workers: int,
    checkpoint_dir: Path,
    use_gpu: bool = False,
    cpus_per_worker: float = 1,
    storage_path: Path,
    name: str,
    max_failures: int = 1,
) -> DistributedRun:
    """Train ``HybridLM(arch, seed=model_seed)`` on ``make_task(task, seed=task_seed,
    **task_options)`` with ``workers`` data-parallel Ray Train workers.

    Works from a driver connected to Ray (or none: Ray Train starts a local one) and from inside
    a Ray task, which may hold no CPU of its own. Each worker asks for ``cpus_per_worker`` CPUs
    (and one GPU with ``use_gpu``, its device replacing ``cfg.device``) and runs
    ``max(1, int(cpus_per_worker))`` torch threads. ``storage_path / name`` is Ray Train's run
    folder (its logs and state; the model checkpoints live in ``checkpoint_dir``). A worker
    failure restarts the whole group up to ``max_failures`` times, each restart resuming from
    the last checkpoint; past that, ``DistributedTrainingError`` names each failed rank's
    error. Relative paths are taken from the caller's folder. Bad arguments raise ConfigError
    (naming the argument) before anything starts.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError("workers", f"must be an integer >= 1, got {workers!r}")
    if cfg.batch_size % workers:
        raise ConfigError("batch_size", f"the global batch of {cfg.batch_size} must split "
                          f"evenly over the {workers} workers")
    if not cpus_per_worker > 0:
        raise ConfigError("cpus_per_worker", f"must be positive, got {cpus_per_worker!r}")
    if not isinstance(max_failures, int) or max_failures < 0:
        raise ConfigError("max_failures", f"must be an integer >= 0, got {max_failures!r}")
    # Workers may run in other folders, where a relative path would mean somewhere else.
    checkpoint_dir, storage_path = Path(checkpoint_dir).resolve(), Path(storage_path).resolve()

    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        _train_rank,
        train_loop_config={
            "arch": arch, "task": task, "task_seed": task_seed,
            "task_options": dict(task_options), "cfg": cfg, "model_seed": model_seed,
            "checkpoint_dir": str(checkpoint_dir), "use_gpu": use_gpu,
            "threads": max(1, int(cpus_per_worker)),
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=max_failures)),
    )
    try:
        outcome = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise DistributedTrainingError(
            f"data-parallel run {name!r} on {workers} workers failed: {_failure_message(err)}"
        ) from err
    result, nodes = outcome.return_value
    return DistributedRun(result=result, world_size=workers, nodes=tuple(nodes))
