import io
import itertools
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybridlab.checkpoint import (
    MARKER,
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from hybridlab.config import (
    ArchConfig,
    AttentionSpec,
    ConfigError,
    Mamba1Spec,
    Mamba2Spec,
)
from hybridlab.data.task import IGNORE, Batch
from hybridlab.data.tasks import make_task
from hybridlab.layers import MoE, MoESpec
from hybridlab.model import HybridLM
from hybridlab.train import (
    TrainConfig,
    build_optimizer,
    lr_at,
    scored_logits,
    settings_key,
    train,
)


@dataclass
class ShiftTask:
    """Predict the token seen ``lag`` steps ago: learnable by any mixer, scored after ``lag``."""

    vocab_size: int = 16
    seq_len: int = 24
    lag: int = 2
    name: str = "shift"
    metric: str = "accuracy"
    bytes_per_token: float = 1.0
    interrupt_after: int | None = None
    draws: int = 0

    def fingerprint(self) -> dict:
        return {"name": self.name, "lag": self.lag}

    def _make(self, n: int, generator: torch.Generator) -> Batch:
        inputs = torch.randint(self.vocab_size, (n, self.seq_len), generator=generator)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, self.lag - 1 : -1] = inputs[:, : -self.lag]
        return Batch(inputs, targets)

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Batch:
        self.draws += 1
        if self.interrupt_after is not None and self.draws > self.interrupt_after:
            raise KeyboardInterrupt("simulated crash")
        return self._make(batch_size, generator)

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        yield self._make(batch_size, torch.Generator().manual_seed(10_000))


def small_model(pattern: str = "m*M", seed: int = 0) -> HybridLM:
    config = ArchConfig.from_pattern(
        pattern, d_model=32, vocab_size=16, mamba1=Mamba1Spec(d_state=8),
        mamba2=Mamba2Spec(d_state=8, headdim=16, chunk_size=8), attention=AttentionSpec(n_heads=2),
    )
    return HybridLM(config, seed=seed)


FAST = dict(batch_size=8, lr=1e-2, warmup_steps=3, eval_every=5, eval_batch_size=16, log_every=2)


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    cfg = TrainConfig(steps=14, checkpoint_every=4, seed=3, **FAST)
    straight = small_model()
    done = train(straight, ShiftTask(), cfg, checkpoint_dir=tmp_path / "a")
    assert done.status == "completed" and done.steps == 14

    crashed = small_model()
    with pytest.raises(KeyboardInterrupt):
        train(crashed, ShiftTask(interrupt_after=10), cfg, checkpoint_dir=tmp_path / "b")
    assert latest_checkpoint(tmp_path / "b").name == "step_00000008"
    resumed_model = small_model(seed=99)  # fresh process: weights come from the checkpoint
    resumed = train(resumed_model, ShiftTask(), cfg, checkpoint_dir=tmp_path / "b")
    assert resumed.steps == 14 and resumed.tokens == done.tokens
    for (name, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert resumed.metrics == done.metrics


def test_on_log_sees_every_logged_train_loss():
    seen = []
    result = train(small_model(), ShiftTask(), TrainConfig(steps=9, seed=1, **FAST),
                   on_log=lambda step, loss: seen.append((step, loss)))
    logged = [(c["step"], c["value"]) for c in result.curve
              if c["split"] == "train" and c["metric"] == "loss"]
    assert seen == logged and [step for step, _ in seen] == [2, 4, 6, 8]


def test_nan_loss_ends_training_with_reason(tmp_path):
    model = small_model()
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 4 else output

    model.backbone.layers[1].register_forward_hook(poison)
    result = train(model, ShiftTask(), TrainConfig(steps=10, **FAST), checkpoint_dir=tmp_path)
    assert result.status == "diverged"
    assert result.reason == "loss became nan at step 4"
    assert result.steps == 3
    assert latest_checkpoint(tmp_path) is None


def test_truncated_checkpoint_is_refused(tmp_path):
    model = small_model()
    path = save_checkpoint(tmp_path, 5, model=model, train_state={"step": 5})
    data = (path / MODEL_FILE).read_bytes()
    (path / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupted") as err:
        load_checkpoint(path, small_model())
    assert err.value.path == path


def truncate_model(path: Path) -> None:
    data = (path / MODEL_FILE).read_bytes()
    (path / MODEL_FILE).write_bytes(data[: len(data) // 2])


def flip_a_byte(name: str) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        data = bytearray((path / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (path / name).write_bytes(bytes(data))
    return corrupt


def drop_marker(path: Path) -> None:
    (path / MARKER).unlink()


def edit_meta(path: Path) -> None:
    (path / META_FILE).write_text((path / META_FILE).read_text().replace('"step"', '"step" '))


CORRUPTIONS = {
    "truncated model": (truncate_model, "model.safetensors is corrupted"),
    "flipped weight byte": (flip_a_byte(MODEL_FILE), "model.safetensors is corrupted"),
    "flipped state byte": (flip_a_byte(STATE_FILE), "train_state.pt is corrupted"),
    "missing marker": (drop_marker, "never finished"),
    "edited meta": (edit_meta, "does not match the marker"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, kind):
    corrupt, reason = CORRUPTIONS[kind]
    cfg = TrainConfig(steps=14, checkpoint_every=4, seed=3, **FAST)
    straight_model = small_model()
    straight = train(straight_model, ShiftTask(), cfg)
    with pytest.raises(KeyboardInterrupt):
        train(small_model(), ShiftTask(interrupt_after=10), cfg, checkpoint_dir=tmp_path)
    corrupt(tmp_path / "step_00000008")
    before = {p.name: p.read_bytes() for p in (tmp_path / "step_00000008").iterdir()}

    resumed_model = small_model(seed=99)
    resumed = train(resumed_model, ShiftTask(), cfg, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 4 and resumed.status == "completed"
    assert_same_weights(straight_model, resumed_model)
    assert resumed.curve == straight.curve and resumed.metrics == straight.metrics
    [note] = resumed.recovered
    assert note.startswith("checkpoint step_00000008 failed verification (")
    assert reason in note and note.endswith(
        "set aside as step_00000008.corrupt-1; resumed from step_00000004")
    aside = tmp_path / "step_00000008.corrupt-1"
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == before
    assert latest_checkpoint(tmp_path).name == "step_00000014"
    again = train(small_model(seed=98), ShiftTask(), cfg, checkpoint_dir=tmp_path)
    assert (again.resumed_from, again.recovered) == (14, [])
    assert aside.is_dir()


def test_every_checkpoint_corrupt_starts_fresh_and_keeps_them_all(tmp_path):
    cfg = TrainConfig(steps=10, checkpoint_every=3, seed=5, **FAST)
    straight_model = small_model()
    straight = train(straight_model, ShiftTask(), cfg)
    with pytest.raises(KeyboardInterrupt):
        train(small_model(), ShiftTask(interrupt_after=7), cfg, checkpoint_dir=tmp_path)
    # An earlier attempt already set one step-6 checkpoint aside; the next name is free.
    (tmp_path / "step_00000006.corrupt-1").mkdir()
    truncate_model(tmp_path / "step_00000006")
    flip_a_byte(STATE_FILE)(tmp_path / "step_00000003")

    # Nothing to resume: the run starts from the caller's initialisation, as the first one did.
    resumed_model = small_model()
    resumed = train(resumed_model, ShiftTask(), cfg, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 0
    assert_same_weights(straight_model, resumed_model)
    assert resumed.curve == straight.curve
    assert [n.split(" failed")[0] for n in resumed.recovered] == [
        "checkpoint step_00000006", "checkpoint step_00000003"]
    assert resumed.recovered[0].endswith("set aside as step_00000006.corrupt-2; started fresh")
    assert all(n.endswith("; started fresh") for n in resumed.recovered)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "step_00000006.corrupt-1", "step_00000006.corrupt-2", "step_00000003.corrupt-1"}


def test_corrupt_final_checkpoint_retrains_the_last_steps(tmp_path):
    cfg = TrainConfig(steps=14, checkpoint_every=4, seed=3, **FAST)
    first_model = small_model()
    first = train(first_model, ShiftTask(), cfg, checkpoint_dir=tmp_path)
    truncate_model(first.checkpoint)
    again_model = small_model(seed=99)
    again = train(again_model, ShiftTask(), cfg, checkpoint_dir=tmp_path)
    assert again.resumed_from == 12 and len(again.recovered) == 1
    assert again.curve == first.curve
    assert_same_weights(first_model, again_model)


def test_partial_checkpoint_is_ignored(tmp_path):
    model = small_model()
    save_checkpoint(tmp_path, 5, model=model, train_state={"step": 5})
    unfinished = save_checkpoint(tmp_path, 9, model=model, train_state={"step": 9})
    (unfinished / "COMPLETE").unlink()
    assert latest_checkpoint(tmp_path).name == "step_00000005"
    with pytest.raises(CheckpointError, match="never finished"):
        load_checkpoint(unfinished, model)


def test_checkpoint_round_trip_restores_weights(tmp_path):
    model = small_model(seed=1)
    path = save_checkpoint(tmp_path, 1, model=model, train_state={"step": 1,
                                                                  "x": torch.arange(3)})
    other = small_model(seed=2)
    state = load_checkpoint(path, other)
    assert torch.equal(state["x"], torch.arange(3))
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_old_checkpoints_are_pruned(tmp_path):
    model = small_model()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model=model, train_state={}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]


def test_ssm_parameters_norms_and_biases_get_no_weight_decay():
    model = small_model("mM*-")
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay_group, no_decay_group = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in no_decay_group["params"]}
    decayed = {names[id(p)] for p in decay_group["params"]}
    assert "backbone.layers.0.mixer.A_log" in no_decay  # 2-D, excluded by name
    for suffix in ("mixer.D", "dt_proj.bias", "dt_bias", "norm.weight", "conv1d.bias"):
        assert any(n.endswith(suffix) for n in no_decay), suffix
    assert not any(n.endswith(("A_log", ".D", "norm.weight")) for n in decayed)
    assert "backbone.layers.2.mixer.in_proj.weight" in decayed
    assert len(no_decay) + len(decayed) == len(list(model.parameters()))


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, cfg) == pytest.approx(0.1)
    steps = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(steps))


def test_budgets_and_callback_stop_training():
    tokens = train(small_model(), ShiftTask(), TrainConfig(steps=50, max_tokens=8 * 24 * 3,
                                                           **FAST))
    assert (tokens.status, tokens.steps) == ("budget", 3)
    seen = []
    stopped = train(small_model(), ShiftTask(), TrainConfig(steps=50, **FAST),
                    callback=lambda step, m: seen.append(step) or step >= 10)
    assert stopped.status == "stopped" and stopped.steps == 10 and seen == [5, 10]


def test_training_learns_and_records_curves():
    result = train(small_model("m-"), ShiftTask(),
                   TrainConfig(steps=60, batch_size=16, lr=1e-2, warmup_steps=5, eval_every=30,
                               eval_batch_size=64, log_every=10, seed=0, threads=2))
    assert result.status == "completed"
    assert result.metrics["accuracy"] > 0.9
    train_losses = [c["value"] for c in result.curve if c["split"] == "train"]
    assert len(train_losses) == 6 and train_losses[-1] < train_losses[0] / 3
    assert torch.get_num_threads() == 2


def test_bad_train_config_names_field():
    with pytest.raises(ConfigError, match=r"train.lr: must be positive"):
        TrainConfig.from_dict({"lr": 0})
    with pytest.raises(ConfigError, match=r"train.stepz: unknown field"):
        TrainConfig.from_dict({"stepz": 3})


def test_model_too_small_for_task_vocab_is_refused():
    with pytest.raises(ConfigError, match="vocab_size"):
        train(small_model(), ShiftTask(vocab_size=40), TrainConfig(steps=1, **FAST))


def test_scored_logits_equal_full_forward_at_scored_positions():
    from hybridlab.train import scored_logits

    model = small_model("m*M")
    batch = ShiftTask(lag=3)._make(4, torch.Generator().manual_seed(5))
    logits, targets = scored_logits(model, batch)
    full = model(batch.inputs)
    assert torch.equal(targets, batch.targets[batch.mask])
    torch.testing.assert_close(logits, full[batch.mask], rtol=1e-5, atol=1e-6)


FLOAT_FIELDS = ["lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip",
                "max_seconds"]


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_train_floats_are_refused_naming_the_field(name, value):
    with pytest.raises(ConfigError, match=rf"^{name}: must be a finite number") as err:
        TrainConfig(**{name: value})
    assert err.value.field == name
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({name: value})
    assert err.value.field == f"train.{name}"


@pytest.mark.parametrize(("name", "value", "message"), [
    ("beta2", 1.0, "must be in"), ("beta1", -0.1, "must be in"), ("lr", -1e-3, "positive"),
    ("min_lr_ratio", 1.5, "must be in"), ("grad_clip", -1.0, ">= 0"),
    ("max_seconds", 0.0, "positive"), ("warmup_steps", -1, ">= 0"),
])
def test_out_of_range_train_values_name_their_own_field(name, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        TrainConfig(**{name: value})
    assert err.value.field == name


@pytest.mark.parametrize(("name", "value"), [
    ("max_tokens", math.inf), ("max_tokens", 1.5), ("threads", 2.0), ("warmup_steps", math.nan),
    ("steps", True), ("seed", "3"),
])
def test_integer_train_fields_refuse_floats_and_bools(name, value):
    with pytest.raises(ConfigError, match="must be an integer") as err:
        TrainConfig(**{name: value})
    assert err.value.field == name


def test_in_range_train_floats_and_integral_floats_are_accepted():
    cfg = TrainConfig(lr=1, weight_decay=0, beta2=0.999, max_seconds=2.5, min_lr_ratio=1.0)
    assert (cfg.lr, cfg.weight_decay, cfg.max_seconds) == (1, 0, 2.5)


def test_settings_key_ignores_how_a_run_executes_but_not_what_it_learns():
    from hybridlab.data.tasks import make_task

    cfg = TrainConfig(steps=40, **FAST)
    mqar = make_task("mqar", seed=1, vocab_size=64)
    key = settings_key(cfg, mqar)
    assert len(key) == 12 and int(key, 16) >= 0
    assert settings_key(TrainConfig(steps=40, **FAST), make_task("mqar", seed=1, vocab_size=64)) \
        == key
    for operational in (dict(threads=1), dict(threads=7), dict(device="cuda:1"),
                        dict(checkpoint_every=5), dict(keep_checkpoints=9)):
        assert settings_key(replace(cfg, **operational), mqar) == key, operational
    changed = {settings_key(replace(cfg, **decisive), mqar) for decisive in (
        dict(lr=2e-2), dict(steps=41), dict(seed=1), dict(batch_size=4), dict(max_tokens=999),
        dict(warmup_steps=4), dict(precision="bf16"), dict(eval_every=6))}
    changed |= {settings_key(cfg, make_task("mqar", seed=2, vocab_size=64)),
                settings_key(cfg, make_task("mqar", seed=1, vocab_size=128)),
                settings_key(cfg, ShiftTask())}
    assert key not in changed and len(changed) == 11


def curve_keys(curve: list[dict]) -> list[tuple]:
    return [(c["step"], c["split"], c["metric"]) for c in curve]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize(("steps", "eval_every"), [(14, 5), (15, 5), (12, 4)])
def test_rerun_after_the_final_checkpoint_returns_the_same_curve(tmp_path, steps, eval_every):
    cfg = TrainConfig(steps=steps, checkpoint_every=4, seed=2,
                      **{**FAST, "eval_every": eval_every})
    first_model = small_model()
    first = train(first_model, ShiftTask(), cfg, checkpoint_dir=tmp_path)
    keys = curve_keys(first.curve)
    assert len(set(keys)) == len(keys)
    assert (steps, "test", "accuracy") in keys
    again_model = small_model(seed=99)
    again = train(again_model, ShiftTask(), cfg, checkpoint_dir=tmp_path)
    assert again.resumed_from == steps and again.steps == steps
    assert again.curve == first.curve
    assert again.metrics == first.metrics
    assert_same_weights(first_model, again_model)
    assert again.checkpoint == first.checkpoint and again.checkpoint.is_dir()


class Crash(Exception):
    pass


@pytest.mark.parametrize(("checkpoint_every", "crash_at"), [(3, 10), (4, 15), (5, 15)])
def test_curve_after_a_crash_and_resume_equals_the_uninterrupted_curve(
        tmp_path, checkpoint_every, crash_at):
    cfg = TrainConfig(steps=17, checkpoint_every=checkpoint_every, seed=4, **FAST)
    straight_model = small_model()
    straight = train(straight_model, ShiftTask(), cfg, checkpoint_dir=tmp_path / "a")

    def crash(step: int, metrics: dict[str, float]) -> bool:
        if step == crash_at:
            raise Crash
        return False

    with pytest.raises(Crash):
        train(small_model(), ShiftTask(), cfg, checkpoint_dir=tmp_path / "b", callback=crash)
    resumed_model = small_model(seed=99)
    resumed = train(resumed_model, ShiftTask(), cfg, checkpoint_dir=tmp_path / "b")
    assert 0 < resumed.resumed_from < crash_at
    keys = curve_keys(resumed.curve)
    assert len(set(keys)) == len(keys)
    assert resumed.curve == straight.curve
    assert resumed.metrics == straight.metrics
    assert_same_weights(straight_model, resumed_model)


def test_growing_the_step_budget_extends_the_curve_without_repeating_points(tmp_path):
    short = train(small_model(), ShiftTask(), TrainConfig(steps=8, seed=1, **FAST),
                  checkpoint_dir=tmp_path)
    longer = train(small_model(seed=99), ShiftTask(), TrainConfig(steps=14, seed=1, **FAST),
                   checkpoint_dir=tmp_path)
    assert longer.resumed_from == 8
    keys = curve_keys(longer.curve)
    assert len(set(keys)) == len(keys)
    assert longer.curve[: len(short.curve)] == short.curve
    assert {k for k in keys if k[0] > 8} == {
        *((s, "train", "loss") for s in (10, 12, 14)),
        *((s, "test", m) for s in (10, 14) for m in ("loss", "accuracy"))}


PROGRESS_LINE = re.compile(
    r"shift step (\d+)/(\d+) loss (\d+\.\d{4}) lr (\d\.\d{2}e[+-]\d\d) (\d+\.\d) s\n")


@pytest.mark.parametrize(("steps", "log_every"), [(6, 2), (7, 3)])
def test_progress_lines_report_each_log_interval(steps, log_every):
    stream = io.StringIO()
    cfg = TrainConfig(steps=steps, seed=1, **{**FAST, "log_every": log_every})
    result = train(small_model(), ShiftTask(), cfg, progress="lines", progress_stream=stream)
    lines = stream.getvalue().splitlines(keepends=True)
    losses = [c for c in result.curve if c["split"] == "train"]
    assert len(lines) == len(losses) == steps // log_every
    seconds = []
    for line, point in zip(lines, losses, strict=True):
        match = PROGRESS_LINE.fullmatch(line)
        assert match, line
        step = int(match[1])
        assert (step, int(match[2])) == (point["step"], steps)
        assert float(match[3]) == pytest.approx(point["value"], abs=5e-5)
        assert float(match[4]) == pytest.approx(lr_at(step - 1, cfg), rel=5e-3)
        seconds.append(float(match[5]))
    assert seconds == sorted(seconds) and seconds[-1] <= result.seconds + 0.05


def test_progress_lines_continue_from_the_resumed_step(tmp_path):
    cfg = TrainConfig(steps=12, checkpoint_every=4, seed=1, **FAST)
    with pytest.raises(KeyboardInterrupt):
        train(small_model(), ShiftTask(interrupt_after=9), cfg, checkpoint_dir=tmp_path)
    stream = io.StringIO()
    train(small_model(), ShiftTask(), cfg, checkpoint_dir=tmp_path, progress="lines",
          progress_stream=stream)
    assert [int(PROGRESS_LINE.fullmatch(line)[1]) for line in
            stream.getvalue().splitlines(keepends=True)] == [10, 12]


def test_progress_off_is_silent_and_the_bar_writes_to_the_stream():
    cfg = TrainConfig(steps=4, **FAST)
    for off in ("off", False):
        stream = io.StringIO()
        train(small_model(), ShiftTask(), cfg, progress=off, progress_stream=stream)
        assert stream.getvalue() == ""
    for bar in ("bar", True):
        stream = io.StringIO()
        train(small_model(), ShiftTask(), cfg, progress=bar, progress_stream=stream)
        assert "4/4" in stream.getvalue() and not PROGRESS_LINE.search(stream.getvalue())
    with pytest.raises(ConfigError, match="progress") as err:
        train(small_model(), ShiftTask(), cfg, progress="line")
    assert err.value.field == "progress"


@pytest.mark.parametrize(("target", "metric"), [(0.3, "accuracy"), (3.0, "loss")])
def test_training_stops_once_the_target_is_reached(tmp_path, target, metric):
    task = make_task("mqar", seed=0, vocab_size=64, seq_len=16, num_kv_pairs=2)
    arch = ArchConfig.from_pattern("**", d_model=32, vocab_size=task.vocab_size,
                                   attention=AttentionSpec(n_heads=2, n_kv_heads=1))
    base = dict(steps=200, batch_size=16, lr=0.01, warmup_steps=10, eval_every=20,
                eval_batch_size=64, threads=1)
    full = train(HybridLM(arch, seed=0), task, TrainConfig(**base))
    tests = [c for c in full.curve if c["split"] == "test" and c["metric"] == metric]
    better = (lambda v: v >= target) if metric == "accuracy" else (lambda v: v <= target)
    first = next(c["step"] for c in tests if better(c["value"]))
    assert first < base["steps"], "the fixture must reach the target before the last step"

    cfg = TrainConfig(**base, target=target, target_metric=metric)
    solved = train(HybridLM(arch, seed=0), task, cfg, checkpoint_dir=tmp_path / "run")
    assert (solved.status, solved.steps) == ("solved", first)
    assert better(solved.metrics[metric]) and f"at step {first}" in solved.reason
    # The same evaluations as the full run up to that step: stopping changes nothing before it.
    assert [c for c in solved.curve if c["step"] <= first] == \
        [c for c in full.curve if c["step"] <= first]
    # A retry of a solved run stops at once instead of training on.
    again = train(HybridLM(arch, seed=0), task, cfg, checkpoint_dir=tmp_path / "run")
    assert (again.status, again.steps, again.curve) == ("solved", first, solved.curve)


def test_target_metric_must_be_a_task_metric():
    with pytest.raises(ConfigError, match="target_metric"):
        TrainConfig(target=0.9, target_metric="params")


def moe_model(seed: int, *, aux: float) -> HybridLM:
    config = ArchConfig.from_pattern(
        "E*E", d_model=32, vocab_size=16, attention=AttentionSpec(n_heads=2),
        moe=MoESpec(n_experts=4, top_k=1, balance_coef=aux, z_loss_coef=aux / 4))
    return HybridLM(config, seed=seed)


@pytest.mark.parametrize("aux", [0.0, 0.5])
def test_a_training_step_differentiates_cross_entropy_plus_the_routers_aux_losses(aux):
    """One step of ``train`` equals one step by hand on CE + each MoE layer's aux_loss, and logs
    the router's statistics of that step."""
    cfg = TrainConfig(steps=1, batch_size=8, lr=1e-2, warmup_steps=1, eval_every=1,
                      eval_batch_size=8, log_every=1, seed=5, grad_clip=0.5)
    trained = moe_model(3, aux=aux)
    result = train(trained, ShiftTask(), cfg)

    by_hand = moe_model(3, aux=aux).train()
    optimizer = build_optimizer(by_hand, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(0, cfg)
    batch = ShiftTask().train_batch(cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    logits, targets = scored_logits(by_hand, batch)
    routed = [m for m in by_hand.modules() if isinstance(m, MoE)]
    aux_total = sum(m.aux_loss for m in routed)
    (F.cross_entropy(logits, targets) + aux_total).backward()
    torch.nn.utils.clip_grad_norm_(by_hand.parameters(), cfg.grad_clip)
    imbalance = max(m.load.max().item() * m.n_experts for m in routed)
    optimizer.step()
    for (name, a), b in zip(trained.state_dict().items(), by_hand.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    logged = {c["metric"]: c["value"] for c in result.curve if c["split"] == "train"}
    assert logged["aux_loss"] == pytest.approx(aux_total.item(), rel=1e-5, abs=1e-9)
    assert logged["router_imbalance"] == pytest.approx(imbalance, rel=1e-6)
    assert 1 <= imbalance <= 4
    # The aux term moved the router: the same step on cross-entropy alone lands elsewhere.
    if aux:
        alone = moe_model(3, aux=0.0)
        train(alone, ShiftTask(), cfg)
        router = "backbone.layers.0.mixer.router.weight"
        assert not torch.allclose(alone.state_dict()[router], trained.state_dict()[router])


def test_plain_models_log_no_router_stats():
    result = train(small_model("m-"), ShiftTask(), TrainConfig(steps=2, log_every=1, **{
        k: v for k, v in FAST.items() if k != "log_every"}))
    assert {c["metric"] for c in result.curve if c["split"] == "train"} == {"loss"}
