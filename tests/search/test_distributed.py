"""``train_data_parallel``: one candidate on two Ray Train workers against a single process."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import ray.train
import torch

from hybridlab.config import ArchConfig, AttentionSpec, ConfigError, Mamba2Spec
from hybridlab.data.tasks import make_task
from hybridlab.model import HybridLM
from hybridlab.search.distributed import DistributedTrainingError, train_data_parallel
from hybridlab.train import TrainConfig, train

TASK_OPTIONS = dict(vocab_size=64, seq_len=32, num_kv_pairs=4, n_test=60)
CFG = TrainConfig(steps=16, batch_size=8, lr=1e-2, warmup_steps=3, eval_every=8,
                  eval_batch_size=12, log_every=2, checkpoint_every=8, seed=3, precision="fp32")
ARCH = ArchConfig.from_pattern(
    "M*-", d_model=32, vocab_size=64, mamba2=Mamba2Spec(d_state=8, headdim=16, chunk_size=8),
    attention=AttentionSpec(n_heads=2))
# Two workers sum in another order than one process (see tests/test_train_data_parallel.py for
# the exact comparison); 1e-3 leaves room for a different thread count as well.
RTOL = 1e-3


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=256 * 1024**2)
    yield
    ray.shutdown()


def run(tmp_path: Path, **overrides):
    kwargs = dict(task="mqar", task_seed=1, task_options=TASK_OPTIONS, cfg=CFG, model_seed=0,
                  workers=2, checkpoint_dir=tmp_path / "checkpoints",
                  storage_path=tmp_path / "ray-train", name="candidate")
    return train_data_parallel(ARCH, **{**kwargs, **overrides})


@pytest.mark.slow
def test_two_workers_reproduce_one_process_and_a_second_call_resumes(tmp_path, local_ray):
    torch.set_num_threads(1)
    task = make_task("mqar", seed=1, **TASK_OPTIONS)
    alone = train(HybridLM(ARCH, seed=0), task, CFG)

    first = run(tmp_path)
    assert first.world_size == 2
    assert first.nodes == (ray.get_runtime_context().get_node_id(),) * 2
    assert (first.result.status, first.result.steps, first.result.tokens) == \
        ("completed", alone.steps, alone.tokens)
    assert [(c["step"], c["split"], c["metric"]) for c in first.result.curve] == \
        [(c["step"], c["split"], c["metric"]) for c in alone.curve]
    scored = sum(int(b.mask.sum()) for b in task.eval_batches(CFG.eval_batch_size))
    for got, want in zip(first.result.curve, alone.curve, strict=True):
        if want["metric"] == "accuracy":
            assert abs(got["value"] - want["value"]) <= 2 / scored + 1e-12, (got, want)
        else:
            assert got["value"] == pytest.approx(want["value"], rel=RTOL), (got, want)
    assert first.result.checkpoint == tmp_path / "checkpoints" / "step_00000016"
    written = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())

    # From inside a Ray task holding no CPU, as the promotion runs it: nothing left to train.
    remote = ray.remote(num_cpus=0)(train_data_parallel)
    again = ray.get(remote.remote(
        ARCH, task="mqar", task_seed=1, task_options=TASK_OPTIONS, cfg=CFG, model_seed=0,
        workers=2, checkpoint_dir=tmp_path / "checkpoints", storage_path=tmp_path / "ray-train",
        name="candidate"))
    assert (again.result.resumed_from, again.result.steps) == (CFG.steps, CFG.steps)
    assert again.result.curve == first.result.curve
    assert again.result.metrics == first.result.metrics
    assert again.result.checkpoint == first.result.checkpoint
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == written


@pytest.mark.slow
def test_a_worker_error_surfaces_with_its_message(tmp_path, local_ray):
    with pytest.raises(DistributedTrainingError, match=(
            r"^data-parallel run 'candidate' on 2 workers failed: rank [01]: ValueError: task "
            r"'mqar': unknown knob 'nope'; valid knobs: ")) as err:
        run(tmp_path, task_options={**TASK_OPTIONS, "nope": 1}, max_failures=0)
    assert isinstance(err.value.__cause__, ray.train.WorkerGroupError)


@pytest.mark.parametrize(("overrides", "field"), [
    (dict(workers=3), "batch_size"), (dict(workers=0), "workers"),
    (dict(cpus_per_worker=0), "cpus_per_worker"), (dict(max_failures=-1), "max_failures"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, overrides, field):
    with pytest.raises(ConfigError) as err:
        run(tmp_path, **overrides)
    assert err.value.field == field
    assert list(tmp_path.iterdir()) == []
