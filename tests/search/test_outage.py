"""A search on PostgreSQL rides out a server restart and a ~10 s outage in the middle."""

import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from hybridlab.search.runner import run_search
from hybridlab.store import Candidate

pytestmark = pytest.mark.slow

SPACE = (Path(__file__).parent / "tiny_space.yaml").read_text().replace(
    "steps: 20", "steps: 300").replace("checkpoint_every: 5", "checkpoint_every: 30")


def test_search_survives_postgres_restart_and_outage(tmp_path, private_postgres):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    url = private_postgres.url
    events: dict[str, float] = {}
    disturb_errors: list[BaseException] = []

    def disturb() -> None:
        engine = sa.create_engine(url)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    with engine.connect() as conn:
                        running = conn.execute(sa.select(sa.func.count()).select_from(
                            Candidate).where(Candidate.status == "running")).scalar()
                except sa.exc.DBAPIError:
                    running = 0
                if running:
                    break
                time.sleep(0.3)
            engine.dispose()
            private_postgres.restart()
            events["restarted"] = time.monotonic()
            time.sleep(4)
            private_postgres.stop()
            time.sleep(10)
            private_postgres.start()
            events["outage_over"] = time.monotonic()
        except BaseException as err:
            disturb_errors.append(err)
        finally:
            engine.dispose()
            # Whatever failed above, the search must not be left waiting for a stopped server.
            if not private_postgres.running():
                private_postgres.start()

    thread = threading.Thread(target=disturb, daemon=True)
    thread.start()
    try:
        summary = run_search(space, storage_url=url, runs_dir=tmp_path / "runs",
                             echo=lambda line: None, heartbeat_interval=1, grace_period=25)
    finally:
        ended = time.monotonic()
        thread.join(timeout=60)
        # Raised here, a failed pg_ctl explains a search that failed for want of a server.
        assert not disturb_errors, f"the test could not restart its server: {disturb_errors[0]}"
    assert "outage_over" in events and events["outage_over"] < ended, "search ended too early"
    assert summary.finished == 4
    study = optuna.load_study(study_name="tiny", storage=url)
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 4
    assert not study.get_trials(states=(TrialState.RUNNING,))
