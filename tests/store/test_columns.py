"""Long values that real studies produce fit their columns on every backend (SQLite ignores
VARCHAR lengths, PostgreSQL refuses what exceeds them), and older databases are widened."""

import sqlalchemy as sa

from hybridlab.store import (
    Artifact,
    Candidate,
    CurvePoint,
    create_tables,
    open_engine,
    transaction,
)

# A corpus task at a user path is named "corpus:<path>"; a suite prefixes curve splits with
# the task's name ("mad:fuzzy_in_context_recall/test").
LONG_TASK = "corpus:/data/shared/users/someone/corpora/a-long-folder-name/more/text"


def test_long_task_names_fit_checkpoint_kinds_and_curve_splits(storage_url):
    with open_engine(storage_url) as engine:
        create_tables(engine)

        def write(session) -> None:
            session.add(Artifact(study="s", trial=0, kind=f"checkpoint:{LONG_TASK}",
                                 path="/x", sha256="0" * 64))
            session.add(CurvePoint(study="s", trial=0, step=1, split=f"{LONG_TASK}/test",
                                   metric="loss", value=1.0))

        transaction(engine, write)
        kinds = transaction(engine, lambda session: session.scalars(sa.select(Artifact.kind)).all())
    assert kinds == [f"checkpoint:{LONG_TASK}"]


def test_create_tables_widens_the_columns_of_an_older_database(storage_url):
    with open_engine(storage_url) as engine:
        create_tables(engine)
        if engine.dialect.name != "postgresql":
            return  # SQLite has no lengths to widen
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE hl_artifact ALTER COLUMN kind TYPE VARCHAR(64)"))
            conn.execute(sa.text("ALTER TABLE hl_curve ALTER COLUMN split TYPE VARCHAR(16)"))
        create_tables(engine)
        columns = {c["name"]: getattr(c["type"], "length", None)
                   for table in ("hl_artifact", "hl_curve")
                   for c in sa.inspect(engine).get_columns(table)}
    assert columns["kind"] == Artifact.__table__.c.kind.type.length
    assert columns["split"] == CurvePoint.__table__.c.split.type.length


def test_create_tables_adds_the_nullable_columns_an_older_database_lacks(storage_url):
    """A study written before hl_candidate had active_params: its rows read as not measured,
    new rows store the value, and nothing else changes."""
    with open_engine(storage_url) as engine:
        create_tables(engine)
        row = dict(study="s", trial=0, task="mqar", task_fingerprint={}, code_version="v",
                   status="trained", params=123)
        transaction(engine, lambda session: session.add(Candidate(**row)))
        with engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE hl_candidate DROP COLUMN active_params"))
        assert "active_params" not in {
            c["name"] for c in sa.inspect(engine).get_columns("hl_candidate")}
        create_tables(engine)
        create_tables(engine)  # idempotent
        transaction(engine, lambda session: session.add(Candidate(
            **{**row, "trial": 1, "active_params": 45})))
        got = transaction(engine, lambda session: session.execute(
            sa.select(Candidate.trial, Candidate.params, Candidate.active_params)
            .order_by(Candidate.trial)).all())
    assert [tuple(r) for r in got] == [(0, 123, None), (1, 123, 45)]
