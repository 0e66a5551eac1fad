"""Data-parallel training (``train(..., data_parallel=...)``) against single-process training.

The ranks are processes started with torch.multiprocessing over gloo on 127.0.0.1 (nccl on the
GPUs for the gpu-marked test), without Ray. A spawned child imports this module by name, so the
tests put the repository root on sys.path first (pytest's importlib mode does not).

Tolerance: data parallelism changes only the order of floating-point sums (each rank's partial
loss and gradient sums, then the all-reduce), a relative change of ~1e-7 per step in fp32 that 30
AdamW steps leave far below 1e-4 (measured: at most 1.3e-7). Logged train losses and test losses are
compared at rtol 1e-4; test accuracy may flip an argmax at a near-tie, so it is compared to
within two scored positions. Everything that does not depend on float order (data order, data
generator state, tokens, curve keys, the stop step, the ranks' agreement with each other, and
evaluation of the same weights) is compared exactly.
"""

from __future__ import annotations

import io
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hybridlab.config import ArchConfig, AttentionSpec, ConfigError, Mamba2Spec
from hybridlab.data.task import IGNORE, Batch, TaskData
from hybridlab.data.tasks import make_task
from hybridlab.layers import MoESpec
from hybridlab.model import HybridLM
from hybridlab.train import DataParallel, TrainConfig, TrainResult, evaluate, train

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
STOP_AT = 8  # an evaluation step, with the train-loss window half full (log_every 3)
CFG = dict(steps=24, batch_size=8, lr=1e-2, warmup_steps=3, eval_every=8, eval_batch_size=12,
           log_every=3, seed=3, threads=1, precision="fp32")
RTOL = 1e-4
WORDS = ("state", "space", "model", "attention", "mamba", "hybrid", "layer", "token", "scan",
         "head", "query", "key", "value", "recall", "gate", "the", "of", "and", "a", "to")


@dataclass
class UnevenShift:
    """Predict the token ``lag`` steps back; the first half of a batch scores every position
    after the lag, the second half only the last two, so data-parallel ranks score different
    numbers of positions."""

    vocab_size: int = 16
    seq_len: int = 20
    lag: int = 2
    name: str = "uneven"
    metric: str = "accuracy"
    bytes_per_token: float = 1.0

    def fingerprint(self) -> dict:
        return {"name": self.name}

    def _make(self, n: int, generator: torch.Generator) -> Batch:
        inputs = torch.randint(self.vocab_size, (n, self.seq_len), generator=generator)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, self.lag - 1 : -1] = inputs[:, : -self.lag]
        targets[n // 2 :, : -3] = IGNORE
        return Batch(inputs, targets)

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        return self._make(batch_size, generator)

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(10_000)
        for _ in range(3):  # three batches: an uneven share over two ranks
            yield self._make(batch_size, generator)


def write_corpus(folder: Path) -> Path:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for doc in range(4):
        (folder / f"doc{doc}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(800)))
    return folder


def build_task(name: str, root: Path) -> TaskData:
    if name == "corpus":
        # 30 held-out windows: three test batches of 12, 12 and 6.
        return make_task(f"corpus:{root / 'corpus'}", seed=0, seq_len=32,
                         max_eval_tokens=32 * 30, cache_dir=str(root / "cache"))
    if name == "mqar":
        return make_task("mqar", seed=1, vocab_size=64, seq_len=32, num_kv_pairs=4, n_test=60)
    return UnevenShift()


def build_model(task: TaskData, pattern: str = "M*-", aux: float = 0.01) -> HybridLM:
    """A small hybrid: Mamba-2, attention and MLP (or MoE, ``E``, whose router's balance and
    z-loss coefficients are ``aux``)."""
    arch = ArchConfig.from_pattern(
        pattern, d_model=32, vocab_size=task.vocab_size,
        mamba2=Mamba2Spec(d_state=8, headdim=16, chunk_size=8), attention=AttentionSpec(n_heads=2),
        moe=MoESpec(n_experts=4, top_k=2, balance_coef=aux, z_loss_coef=aux))
    return HybridLM(arch, seed=0)


@dataclass(frozen=True)
class Job:
    """One training run, the same on every rank."""

    task: str
    cfg: dict[str, Any] = field(default_factory=dict)  # overrides of CFG
    folder: str | None = None  # checkpoint folder (shared by the ranks)
    stop_at: int | None = None  # the callback stops training at this evaluation step
    poison: tuple[int, int] | None = None  # (rank, forward call) whose output becomes NaN
    progress: bool = False
    pattern: str = "M*-"
    aux: float = 0.01  # an MoE layer's balance and z-loss coefficients


@dataclass
class Outcome:
    result: TrainResult
    weights: dict[str, torch.Tensor]
    callback_calls: list[int]
    progress: str


def run_job(job: Job, root: Path, dp: DataParallel | None = None,
            device: str = "cpu") -> Outcome:
    task = build_task(job.task, root)
    model = build_model(task, job.pattern, job.aux)
    calls: list[int] = []
    if job.poison is not None and (dp.rank if dp else 0) == job.poison[0]:
        count = {"n": 0}

        def poison(module, args, output):
            count["n"] += 1
            return output * float("nan") if count["n"] == job.poison[1] else output

        model.backbone.layers[1].register_forward_hook(poison)

    def callback(step: int, metrics: dict[str, float]) -> bool:
        calls.append(step)
        return job.stop_at is not None and step >= job.stop_at

    stream = io.StringIO()
    cfg = TrainConfig(**{**CFG, **job.cfg, "device": device})
    result = train(model, task, cfg, checkpoint_dir=job.folder, callback=callback,
                   progress="lines" if job.progress else "off", progress_stream=stream,
                   data_parallel=dp)
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return Outcome(result, weights, calls, stream.getvalue())


def _rank_main(rank: int, world: int, port: int, backend: str, jobs: list[Job], root: str,
               out: str) -> None:
    """A spawned rank: join the group, run every job, save each outcome for the parent."""
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        device = f"cuda:{rank}" if backend == "nccl" else "cpu"
        for i, job in enumerate(jobs):
            outcome = run_job(job, Path(root), DataParallel(rank=rank, world_size=world), device)
            torch.save(outcome, Path(out) / f"{i}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(jobs: list[Job], root: Path, *, world: int = WORLD,
              backend: str = "gloo") -> list[list[Outcome]]:
    """Every job's outcome on each rank: ``[job][rank]``."""
    out = root / f"outcomes-{free_port()}"
    out.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO))
        mp.spawn(_rank_main, args=(world, free_port(), backend, jobs, str(root), str(out)),
                 nprocs=world)
    return [[torch.load(out / f"{i}-{r}.pt", weights_only=False) for r in range(world)]
            for i in range(len(jobs))]


def train_losses(result: TrainResult) -> list[float]:
    return [c["value"] for c in result.curve if c["split"] == "train" and c["metric"] == "loss"]


def curve_keys(result: TrainResult) -> list[tuple]:
    return [(c["step"], c["split"], c["metric"]) for c in result.curve]


def assert_close_curves(got: TrainResult, want: TrainResult, *, scored: int) -> None:
    assert curve_keys(got) == curve_keys(want)
    for a, b in zip(got.curve, want.curve, strict=True):
        if b["metric"] == "accuracy":
            assert abs(a["value"] - b["value"]) <= 2 / scored + 1e-12, (a, b)
        else:
            assert a["value"] == pytest.approx(b["value"], rel=RTOL), (a, b)


def scored_test_positions(task: TaskData) -> int:
    return sum(int(b.mask.sum()) for b in task.eval_batches(CFG["eval_batch_size"]))


def checkpoint_state(folder: Path, step: int) -> dict[str, Any]:
    return torch.load(folder / f"step_{step:08d}" / "train_state.pt", weights_only=True)


TASKS = ("corpus", "mqar", "uneven")
# Routed MoE layers without auxiliary losses: the cross-entropy alone, which data parallelism
# reproduces (the auxiliary losses are each rank's own batch's).
MOE_NO_AUX = Job("uneven", pattern="ME*E", aux=0.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """Single-process references, then one spawn of two ranks for every data-parallel run."""
    root = tmp_path_factory.mktemp("dp")
    write_corpus(root / "corpus")
    single = {name: run_job(Job(name), root) for name in TASKS}
    single["moe_no_aux"] = run_job(MOE_NO_AUX, root)
    one_then_two = str(root / "one_then_two")
    single["stopped"] = run_job(Job("mqar", folder=one_then_two, stop_at=STOP_AT), root)
    jobs = {
        **{name: Job(name, progress=name == "mqar") for name in TASKS},
        "stopped": Job("mqar", folder=str(root / "two_then_one"), stop_at=STOP_AT),
        "one_then_two": Job("mqar", folder=one_then_two),
        "poisoned": Job("uneven", poison=(1, 4)),
        "moe_no_aux": MOE_NO_AUX,
        "moe": Job("uneven", pattern="ME*E"),
        "timed": Job("uneven", cfg=dict(steps=100_000, max_seconds=1.0, eval_every=10**6)),
    }
    outcomes = dict(zip(jobs, run_ranks(list(jobs.values()), root), strict=True))
    two_then_one = run_job(Job("mqar", folder=str(root / "two_then_one")), root)
    return {"root": root, "single": single, "dp": outcomes, "two_then_one": two_then_one}


@pytest.mark.slow
@pytest.mark.parametrize("name", [*TASKS, "moe_no_aux"])
def test_two_ranks_reproduce_the_single_process_run(runs, name):
    root, single, (rank0, rank1) = runs["root"], runs["single"][name], runs["dp"][name]
    job = MOE_NO_AUX if name == "moe_no_aux" else Job(name)
    task = build_task(job.task, root)
    assert (rank0.result.status, rank0.result.steps) == ("completed", CFG["steps"])
    assert rank0.result.tokens == single.result.tokens
    assert_close_curves(rank0.result, single.result, scored=scored_test_positions(task))
    worst = max(abs(a / b - 1) for a, b in zip(train_losses(rank0.result),
                                               train_losses(single.result), strict=True))
    assert worst < RTOL
    # The model learnt something, so the comparison is not between two flat curves.
    losses = train_losses(single.result)
    assert losses[-1] < 0.9 * losses[0]
    for key, value in single.weights.items():
        torch.testing.assert_close(rank0.weights[key], value, rtol=1e-3, atol=1e-5)
    # The ranks agree with each other exactly: same weights, curve and metrics.
    assert rank1.result.curve == rank0.result.curve
    assert rank1.result.metrics == rank0.result.metrics
    for key, value in rank0.weights.items():
        assert torch.equal(rank1.weights[key], value), key
    # Evaluation split over the ranks gives what one process computes from the same weights.
    model = build_model(task, job.pattern, job.aux)
    model.load_state_dict(rank0.weights)
    alone = evaluate(model, task, batch_size=CFG["eval_batch_size"], precision="fp32")
    assert alone == rank0.result.metrics


@pytest.mark.slow
def test_ranks_agree_on_an_moe_run_with_auxiliary_losses_and_log_router_stats(runs):
    rank0, rank1 = runs["dp"]["moe"]
    assert rank0.result.status == "completed"
    assert rank1.result.curve == rank0.result.curve
    for key, value in rank0.weights.items():
        assert torch.equal(rank1.weights[key], value), key
    logged = {c["metric"]: c["value"] for c in rank0.result.curve if c["split"] == "train"}
    assert logged["aux_loss"] > 0 and 1 <= logged["router_imbalance"] <= 4 / 2
    # Without auxiliary losses the same run logs a router imbalance but no aux loss term.
    plain = {c["metric"]: c["value"] for c in runs["dp"]["moe_no_aux"][0].result.curve}
    assert plain["aux_loss"] == 0 and plain["router_imbalance"] >= 1


def test_callback_and_progress_run_on_rank_zero_only(runs):
    rank0, rank1 = runs["dp"]["mqar"]
    assert rank0.callback_calls == [8, 16, 24] and rank1.callback_calls == []
    assert len(rank0.progress.splitlines()) == CFG["steps"] // CFG["log_every"]
    assert rank1.progress == ""
    stopped0, stopped1 = runs["dp"]["stopped"]
    for outcome in (stopped0, stopped1):
        assert (outcome.result.status, outcome.result.steps) == ("stopped", STOP_AT)
    assert stopped1.callback_calls == []


@pytest.mark.slow
def test_checkpoints_do_not_depend_on_the_world_size(runs):
    root = runs["root"]
    two = checkpoint_state(root / "two_then_one", STOP_AT)
    one = checkpoint_state(root / "one_then_two", STOP_AT)
    assert torch.equal(two["data_rng"], one["data_rng"])
    assert (two["step"], two["tokens"], two["running_count"]) == \
        (one["step"], one["tokens"], one["running_count"]) == (STOP_AT, STOP_AT * 8 * 32, 2)
    assert two["running_loss"] == pytest.approx(one["running_loss"], rel=RTOL)
    assert runs["dp"]["stopped"][0].result.checkpoint == root / "two_then_one" / "step_00000008"


@pytest.mark.slow
@pytest.mark.parametrize("order", ["two_then_one", "one_then_two"])
def test_a_run_resumes_under_another_world_size(runs, order):
    reference = runs["single"]["mqar"].result
    resumed = runs["two_then_one"] if order == "two_then_one" else runs["dp"][order][0]
    assert (resumed.result.resumed_from, resumed.result.steps) == (STOP_AT, CFG["steps"])
    assert resumed.result.tokens == reference.tokens
    task = build_task("mqar", runs["root"])
    assert_close_curves(resumed.result, reference, scored=scored_test_positions(task))
    if order == "one_then_two":
        # Up to the checkpoint one process trained it, exactly as the reference did.
        assert [c for c in resumed.result.curve if c["step"] <= STOP_AT] == \
            [c for c in reference.curve if c["step"] <= STOP_AT]


@pytest.mark.slow
def test_divergence_on_one_rank_stops_every_rank_at_the_same_step(runs):
    for outcome in runs["dp"]["poisoned"]:
        assert outcome.result.status == "diverged"
        assert outcome.result.reason == "loss became nan at step 4"
        assert outcome.result.steps == 3


@pytest.mark.slow
def test_time_budget_is_decided_once_for_every_rank(runs):
    rank0, rank1 = runs["dp"]["timed"]
    assert rank0.result.status == rank1.result.status == "budget"
    assert 0 < rank0.result.steps == rank1.result.steps < 100_000
    assert rank1.result.curve == rank0.result.curve


def test_a_batch_the_world_size_does_not_divide_is_refused():
    task = UnevenShift()
    with pytest.raises(ConfigError, match="batch_size: the global batch of 6 must split evenly "
                       "over the 4 data-parallel ranks") as err:
        train(build_model(task), task, TrainConfig(**{**CFG, "batch_size": 6}),
              data_parallel=DataParallel(rank=1, world_size=4))
    assert err.value.field == "batch_size"


def test_data_parallel_without_a_process_group_is_refused():
    assert not dist.is_initialized()
    task = UnevenShift()
    with pytest.raises(ConfigError, match="not initialised") as err:
        train(build_model(task), task, TrainConfig(**CFG),
              data_parallel=DataParallel(rank=0, world_size=2))
    assert err.value.field == "data_parallel"


@pytest.mark.parametrize(("rank", "world_size", "name"), [
    (2, 2, "data_parallel.rank"), (-1, 2, "data_parallel.rank"),
    (0, 0, "data_parallel.world_size"), (0, 1.0, "data_parallel.world_size"),
])
def test_bad_data_parallel_places_name_the_field(rank, world_size, name):
    with pytest.raises(ConfigError) as err:
        DataParallel(rank=rank, world_size=world_size)
    assert err.value.field == name


@pytest.mark.gpu
def test_ddp_over_nccl_and_bf16_on_the_visible_gpus(tmp_path):
    """fp32 DDP over nccl reproduces one GPU's curve; a bf16 DDP run trains and stays close."""
    world = min(2, torch.cuda.device_count())
    fp32 = Job("uneven")
    bf16 = replace(fp32, cfg=dict(precision="bf16"))
    alone = run_job(fp32, tmp_path, device="cuda:0")
    (fp32_ranks, bf16_ranks) = run_ranks([fp32, bf16], tmp_path, world=world, backend="nccl")
    # GPU kernels reduce in their own order (atomics, split-K): a looser tolerance than on CPU.
    for a, b in zip(train_losses(fp32_ranks[0].result), train_losses(alone.result), strict=True):
        assert a == pytest.approx(b, rel=1e-3)
    low = train_losses(bf16_ranks[0].result)
    assert all(torch.isfinite(torch.tensor(low))) and low[-1] < 0.9 * low[0]
    # bf16 rounds matmul inputs to 8 mantissa bits: the curve follows fp32's only loosely.
    for a, b in zip(low, train_losses(alone.result), strict=True):
        assert a == pytest.approx(b, rel=0.1)
    for ranks in (fp32_ranks, bf16_ranks):
        for outcome in ranks[1:]:
            for key, value in ranks[0].weights.items():
                assert torch.equal(outcome.weights[key], value), key
