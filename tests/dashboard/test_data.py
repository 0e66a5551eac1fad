"""The dashboard's read-only data layer: fronts, layer strips, snapshots, and never writing."""

import itertools
import json
import random
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa

from hybridlab.config import AttentionSpec, Mamba2Spec
from hybridlab.cost import cost_report
from hybridlab.store import CurvePoint, StorageError, make_engine, session_scope
from hybridlab_dashboard.data import (
    StudyDatabase,
    export_command,
    layers,
    pareto_front,
    readonly_engine_kwargs,
    readonly_url,
    resolve_storage,
)


def brute_force_front(points, directions):
    signs = [1 if d == "minimize" else -1 for d in directions]
    keyed = [[s * v for s, v in zip(signs, p, strict=True)] for p in points]
    return [i for i, p in enumerate(keyed) if not any(
        all(a <= b for a, b in zip(q, p, strict=True)) and q != p for q in keyed)]


def read_only_refusal(error: BaseException | None) -> bool:
    """SQLite says "attempt to write a readonly database", PostgreSQL "read-only transaction"."""
    return "readonly" in str(error).lower().replace("-", "")


def test_pareto_front_keeps_the_non_dominated_points_and_ties():
    points = [(0.9, 100), (0.8, 50), (0.85, 200), (0.8, 50), (0.5, 10), (0.4, 20)]
    assert pareto_front(points, ("maximize", "minimize")) == [0, 1, 3, 4]
    assert pareto_front(points, ("minimize", "maximize")) == [1, 2, 3, 5]
    assert pareto_front([], ("maximize", "minimize")) == []


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_pareto_front_matches_the_definition(dims):
    rng = random.Random(dims)
    for directions in itertools.product(("minimize", "maximize"), repeat=dims):
        # Coarse values, so ties and duplicates occur.
        points = [tuple(rng.randint(0, 6) for _ in range(dims)) for _ in range(40)]
        assert pareto_front(points, directions) == brute_force_front(points, directions)


def test_layers_give_each_layer_its_type_width_and_state(synthetic):
    config = synthetic["arch"]("M*-m")
    per_layer = layers(config.to_dict(), config.pattern, 4096)
    report = cost_report(config, 4096)
    assert [layer["type"] for layer in per_layer] == ["mamba2", "attention", "mlp", "mamba1"]
    assert [layer["symbol"] for layer in per_layer] == list("M*-m")
    assert [layer["state_bytes"] for layer in per_layer] == [c.state_bytes for c in report.layers]
    assert [layer["width"] for layer in per_layer] == [64, 32, config.layers[2].d_hidden(32), 64]
    assert per_layer[0]["d_state"] == Mamba2Spec(d_state=8).d_state
    assert per_layer[1]["d_state"] is None
    assert per_layer[1]["spec"]["n_heads"] == AttentionSpec(n_heads=2).n_heads


def test_layers_of_an_unreadable_genome_fall_back_to_the_pattern(synthetic):
    broken = {**synthetic["arch"]("M*").to_dict(), "from_the_future": True}
    assert layers(broken, "M*", 4096) == [{"type": "mamba2", "symbol": "M"},
                                          {"type": "attention", "symbol": "*"}]
    assert layers(None, None, None) == []


def test_resolve_storage(tmp_path: Path):
    assert resolve_storage("s", None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 's.db'}"
    assert resolve_storage(None, "sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    with pytest.raises(StorageError, match=r"0 study databases .*--study NAME or --storage URL"):
        resolve_storage(None, None, tmp_path)
    with pytest.raises(StorageError, match="no database file"):
        resolve_storage(None, "sqlite://", tmp_path)
    with pytest.raises(StorageError, match="not a database URL"):
        resolve_storage(None, "not a url", tmp_path)


def test_export_command_quotes_and_finds_the_same_database():
    assert export_command("my study", 3) == (
        "hybridlab export --study 'my study' --trial 3 --format hybridlab "
        "--out 'runs/export/my study/trial-3'")
    storage = ("--storage", "postgresql+psycopg://u:***@h/db")
    assert export_command("s", 1, database_args=storage).endswith(
        "--storage 'postgresql+psycopg://u:***@h/db'")


def test_a_missing_sqlite_file_is_reported_and_never_created(tmp_path: Path):
    path = tmp_path / "later" / "study.db"
    database = StudyDatabase(f"sqlite:///{path}")
    state = database.state()
    assert state.state == "missing" and str(path) in state.message
    engine = sa.create_engine(readonly_url(f"sqlite:///{path}"),
                              **readonly_engine_kwargs(f"sqlite:///{path}"))
    with pytest.raises(sa.exc.OperationalError):
        engine.connect()
    assert not path.exists() and not path.parent.exists()


def test_snapshot_of_a_study(synthetic_url: str, synthetic):
    made = synthetic["trials"]
    database = StudyDatabase(synthetic_url)
    try:
        assert database.state().state == "ready"
        assert database.studies() == [
            {"name": "demo", "directions": ["maximize"], "objectives": ["accuracy"]}]
        snap = database.snapshot("demo")
        assert snap == database.snapshot("demo")
        curves = database.curves("demo", [3, 0, 99])
    finally:
        database.close()
    assert snap["objectives"] == snap["quality_metrics"] == [
        {"metric": "accuracy", "direction": "maximize"}]
    assert snap["counts"] == {"complete": 5, "pruned": 1, "running": 1}
    assert snap["state_context"] == 4096
    best = max(range(len(made)), key=lambda i: made[i][1])
    assert snap["best"] == [best]
    trials = {t["number"]: t for t in snap["trials"]}
    for number, (pattern, accuracy) in enumerate(made):
        t = trials[number]
        assert t["pattern"] == pattern and len(t["layers"]) == t["depth"] == len(pattern)
        assert t["values"] == {"accuracy": accuracy} and t["metrics"]["accuracy"] == accuracy
        assert t["state_bytes"] == cost_report(synthetic["arch"](pattern), 4096).state_bytes
        assert t["curve_points"] == 2
        assert t["export_command"].startswith(f"hybridlab export --study demo --trial {number} ")
    mixers = [c for c in made[3][0] if c != "-"]
    assert trials[3]["attention_fraction"] == mixers.count("*") / len(mixers)
    rejected = trials[len(made)]
    assert rejected["state"] == "pruned" and rejected["layers"] == [] and rejected["values"] == {}
    assert rejected["note"].startswith("rejected: params")
    assert trials[len(made) + 1]["state"] == "running"
    complete = [(t["metrics"]["accuracy"], t["state_bytes"]) for t in snap["trials"]
                if t["state"] == "complete"]
    expected = pareto_front(complete, ("maximize", "minimize"))
    assert snap["fronts"]["accuracy"]["state_bytes"] == expected
    assert set(snap["fronts"]["accuracy"]) == {"state_bytes", "params", "tokens_per_second",
                                               "flops_per_token", "active_params"}
    assert len(snap["evaluations"]) == len(made)
    assert set(snap["evaluations"][0]) == {"trial", "task", "metric", "value", "stderr",
                                           "harness"}
    assert [(c["trial"], c["split"], c["metric"], c["steps"]) for c in curves] == [
        (0, "test", "accuracy", [10, 20]), (3, "test", "accuracy", [10, 20])]
    json.dumps(snap)


def test_the_dashboard_cannot_write_the_database(synthetic_url: str, synthetic):
    database = StudyDatabase(synthetic_url)
    try:
        database.snapshot("demo")
        with pytest.raises(sa.exc.DBAPIError) as refused, database._connect().begin() as conn:
            conn.execute(sa.text("DELETE FROM hl_candidate"))
        assert read_only_refusal(refused.value)
        storage = database.optuna_storage()
        with pytest.raises(optuna.exceptions.StorageInternalError) as refused:
            storage.set_study_user_attr(storage.get_study_id_from_name("demo"), "x", 1)
        assert read_only_refusal(refused.value.__cause__)
    finally:
        database.close()
    study = optuna.load_study(study_name="demo", storage=synthetic_url)
    assert "x" not in study.user_attrs and len(study.trials) == len(synthetic["trials"]) + 2


def test_revision_moves_with_every_write_the_page_shows(synthetic_url: str):
    database = StudyDatabase(synthetic_url)
    engine = make_engine(synthetic_url)
    try:
        first = database.snapshot("demo")["revision"]
        assert database.snapshot("demo")["revision"] == first
        with session_scope(engine) as session:
            session.add(CurvePoint(study="demo", trial=0, step=30, split="test",
                                   metric="accuracy", value=0.5))
        second = database.snapshot("demo")["revision"]
        optuna.load_study(study_name="demo", storage=synthetic_url).ask()
        assert len({first, second, database.snapshot("demo")["revision"]}) == 3
    finally:
        engine.dispose()
        database.close()
