"""A search with a promotion rung on a two-node Ray cluster, simulated on this machine.

Each node has one CPU and each search worker needs one, so the two workers run on different
nodes; the promoted run trains data-parallel on two Ray Train workers, one per node. Storage is
PostgreSQL (SQLite is refused on a multi-node cluster) and the runs folder is shared, as a
network file system would be. Every Ray process binds 127.0.0.1.
"""

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from hybridlab.search.runner import NODE_ATTR, run_search
from hybridlab.search.status import study_table
from hybridlab.store import Promotion, make_engine, rung_study_name
from tests.search.corpus_space import corpus_space, write_corpus

pytestmark = pytest.mark.slow

PROMOTION = """resources: {cpus_per_worker: 1, threads_per_worker: 1}
promotion:
  top_k: 2
  baselines: [ssm]
  rungs:
    # An absolute goal every pattern of this tiny space reaches within 5% (at this size the
    # width lattice is coarse, and a ratio of the largest source may fall between its steps).
    - scale: {params: 140k}
      train: {steps: 12, eval_every: 6, checkpoint_every: 6}
      workers_per_trial: 2
"""


@pytest.fixture
def two_node_cluster(monkeypatch):
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Ray rewrites a 127.0.0.1 address to this machine's outward interface before connecting
    # (services.resolve_ip_for_localhost), where nothing listens; with "cluster" address
    # resolution off it keeps the loopback address, in this process and in the Ray processes
    # it starts (which read the variable).
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    monkeypatch.setenv(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, "0")
    local = {"num_cpus": 1, "node_ip_address": "127.0.0.1",
             "object_store_memory": 128 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**local, "include_dashboard": False})
    cluster.add_node(**local)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("storage_url", ["postgresql"], indirect=True)
def test_search_and_promotion_use_both_nodes(tmp_path, storage_url, two_node_cluster):
    url = storage_url
    corpus = write_corpus(tmp_path / "corpus")
    space = tmp_path / "rehearsal.yaml"
    space.write_text(corpus_space(
        name="rehearsal", corpus=corpus, cache=tmp_path / "cache", trials=4, workers=2,
        train="{steps: 30, batch_size: 4, lr: 0.003, warmup_steps: 2, eval_every: 15, "
              "eval_batch_size: 16, checkpoint_every: 10}", tail=PROMOTION))
    shared_runs = tmp_path / "shared-runs"
    lines: list[str] = []
    summary = run_search(space, storage_url=url, ray_address=two_node_cluster.address,
                         runs_dir=shared_runs, echo=lines.append, heartbeat_interval=2,
                         grace_period=20)
    assert summary.finished == 4, lines

    study = optuna.load_study(study_name="rehearsal", storage=url)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    trial_nodes = {t.user_attrs[NODE_ATTR] for t in study.get_trials()
                   if NODE_ATTR in t.user_attrs}
    alive = {node.node_id for node in [two_node_cluster.head_node,
                                       *two_node_cluster.worker_nodes]}
    assert trial_nodes == alive, "the two search workers did not run on both nodes"

    engine = make_engine(url)
    with engine.connect() as conn:
        promoted = conn.execute(sa.select(Promotion).where(
            Promotion.study == "rehearsal")).all()
    engine.dispose()
    distinct = {t.user_attrs["genome_hash"] for t in complete}
    assert len(promoted) == min(2, len(distinct)) + 1  # top 2 distinct genomes + ssm baseline
    for row in promoted:
        assert row.status == "trained" and row.workers == 2, row.reason
        assert set(row.nodes) == alive, "a promoted run did not train on both nodes"
    rung = optuna.load_study(study_name=rung_study_name("rehearsal", 1), storage=url)
    # One trial per distinct architecture: a baseline equal to a candidate shares its run.
    runs = rung.get_trials(states=(TrialState.COMPLETE,))
    assert {t.number for t in runs} == {row.run_trial for row in promoted}
    assert "rung 1" in study_table("rehearsal", url)
