"""Two drivers on one study never train the same genome at once, nor twice."""

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa

from hybridlab.search import runner
from hybridlab.search.space import parse_space
from hybridlab.store import Candidate, make_engine

pytestmark = pytest.mark.slow

# Three genomes in all (one layer: attention, or Mamba-1 with d_state 4 or 8), six trials.
SPACE = (Path(__file__).parent / "tiny_space.yaml").read_text().replace(
    "depth: {low: 1, high: 2}", "depth: {low: 1, high: 1}").replace(
    "layer_types: [mamba1, mamba2, attention]", "layer_types: [mamba1, attention]").replace(
    "  mamba2: {d_state: 8, headdim: 16, chunk_size: 16}\n", "").replace("trials: 4", "trials: 6")

# One driver with one worker, in-process (the worker loop Ray would run), starting at `start`.
DRIVER = """
import sys, time
from pathlib import Path
from hybridlab.search import runner
from hybridlab.search.space import parse_space
text, url, folder, start = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
opts = runner.RunOptions(study="tiny", storage_url=url, trials=6, workers=1,
                         artifacts_dir=Path(folder), poll_seconds=0.5, heartbeat_interval=1,
                         grace_period=10)
runner.prepare_study(parse_space(text), text, opts)
opts = runner.begin_run(opts)
time.sleep(max(0.0, start - time.time()))
print("ran", runner.worker_loop(text, None, opts, 0), flush=True)
"""


def test_two_drivers_train_each_genome_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    # The study exists before the drivers start (creating it together is test_creation's case).
    runner.prepare_study(parse_space(SPACE), SPACE, runner.RunOptions(
        study="tiny", storage_url=url, trials=6, workers=1, artifacts_dir=tmp_path))
    start = time.time() + 12
    procs = [subprocess.Popen([sys.executable, "-c", DRIVER, SPACE, url, str(tmp_path / "runs"),
                               str(start)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = optuna.load_study(study_name="tiny", storage=url)
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,
                                        optuna.trial.TrialState.PRUNED))
    assert len(finished) == 6
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            candidates = conn.execute(sa.select(Candidate).where(Candidate.study == "tiny")).all()
    finally:
        engine.dispose()
    trained = Counter(c.genome_hash for c in candidates if c.status == "trained")
    reused = {c.genome_hash for c in candidates if c.status == "reused"}
    assert trained and all(n == 1 for n in trained.values()), trained
    assert reused <= set(trained)
