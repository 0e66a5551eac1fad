"""Drivers starting on one fresh database at the same moment all succeed (both backends)."""

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa

from hybridlab.store import Run, open_engine, session_scope

pytestmark = pytest.mark.slow
TINY_SPACE = (Path(__file__).parents[1] / "search" / "tiny_space.yaml").read_text()
PROCESSES = 4
ROUNDS = 3


# One driver process: for each round, wait for the shared start time, then create the study on
# that round's fresh database; prints one outcome line per round. (A subprocess, not
# multiprocessing: a spawned child cannot import this test module under importlib mode.)
DRIVER = """
import json, sys, time
from pathlib import Path
from hybridlab.search import runner
from hybridlab.search.space import parse_space
text, rounds = sys.argv[1], json.loads(sys.argv[2])
space = parse_space(text)
for url, start in rounds:
    opts = runner.RunOptions(study="tiny", storage_url=url, trials=4, workers=1,
                             artifacts_dir=Path("unused"))
    time.sleep(max(0.0, start - time.time()))
    try:
        runner.prepare_study(space, text, opts)
        runner.begin_run(opts)
        print("outcome ok", flush=True)
    except Exception as err:
        print(f"outcome {type(err).__name__}: {err}".splitlines()[0], flush=True)
"""


@pytest.fixture
def fresh_urls(storage_url: str) -> Iterator[list[str]]:
    """ROUNDS fresh, empty databases of the fixture's kind (the fixture's and more beside it)."""
    if storage_url.startswith("sqlite"):
        yield [storage_url.replace("study.db", f"study{i}.db") for i in range(ROUNDS)]
        return
    url = sa.engine.make_url(storage_url)
    names = [f"{url.database}_{i}" for i in range(1, ROUNDS)]
    admin = sa.create_engine(storage_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield [storage_url] + [url.set(database=name).render_as_string(hide_password=False)
                               for name in names]
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_simultaneous_drivers_on_a_fresh_database_all_succeed(fresh_urls):
    # Imports take seconds under load: the first round starts well after every process is up.
    first = time.time() + 12
    rounds = json.dumps([[url, first + 3 * i] for i, url in enumerate(fresh_urls)])
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, TINY_SPACE, rounds],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(PROCESSES)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    outcomes = [line.removeprefix("outcome ") for out in outputs for line in out.splitlines()
                if line.startswith("outcome ")]
    assert outcomes == ["ok"] * (PROCESSES * ROUNDS), outputs
    for url in fresh_urls:
        assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["tiny"]
        with open_engine(url) as engine, session_scope(engine) as session:
            assert sorted(session.scalars(sa.select(Run.number))) == list(range(PROCESSES))
