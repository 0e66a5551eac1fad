"""The proxy calibration view: its read-only JSON and the table the page draws from it."""

import statistics

import pytest

from hybridlab.store import create_tables, make_engine
from hybridlab.store.calibration import Measured, store_run

PANEL = {"transformer": "*-*-", "hybrid": "M-*-", "mamba1": "m-m-", "mamba2": "M-M-"}
# The order runs are stored in: the table's columns.
PANEL_ORDER = ["transformer", "hybrid", "mamba1", "mamba2"]
# (task, reference) -> values over three seeds; memorization depends on the mixer (reversed).
VALUES = {
    ("mqar", "transformer"): [0.95, 0.93, 0.97], ("mqar", "hybrid"): [0.90, 0.92, 0.88],
    ("mqar", "mamba1"): [0.30, 0.34, 0.26], ("mqar", "mamba2"): [0.41, 0.39, 0.40],
    ("mad:memorization", "transformer"): [0.2, 0.21, 0.19],
    ("mad:memorization", "hybrid"): [0.5, 0.52, 0.48],
    ("mad:memorization", "mamba1"): [0.9, 0.91, 0.89],
    ("mad:memorization", "mamba2"): [0.9, 0.9, 0.9],
}


def write_calibration(url: str, study: str) -> None:
    engine = make_engine(url)
    create_tables(engine)
    for (task, ref), values in VALUES.items():
        for seed, value in enumerate(values):
            m = Measured(task=task, reference=ref, pattern=PANEL[ref], params=1000, seed=seed,
                         metric="accuracy", value=value, seconds=30.0, budget_scale=1.0,
                         settings="latest")
            store_run(engine, study, f"{study}-{task}-{ref}-{seed}", m, steps=100)
    engine.dispose()


@pytest.fixture
def calibrated_app(synthetic_app):
    write_calibration(synthetic_app.database.url, "demo")
    return synthetic_app


def test_the_endpoint_gives_each_tasks_summaries_and_verdict(calibrated_app, client):
    response = client(calibrated_app, "/hl/api/calibration?study=demo")
    assert response.status == 200
    [budget] = response.json()["budgets"]
    assert budget["scale"] == 1.0
    tasks = {t["task"]: t for t in budget["tasks"]}
    mqar = tasks["mqar"]
    assert (mqar["expectation"], mqar["held"], mqar["separated"]) == (
        "attention ahead", True, True)
    # worse attention (hybrid 0.90) minus better SSM (mamba2 0.40) over their rms spread
    spread = ((statistics.stdev(VALUES[("mqar", "hybrid")]) ** 2
               + statistics.stdev(VALUES[("mqar", "mamba2")]) ** 2) / 2) ** 0.5
    assert float(mqar["margin"]) == pytest.approx(0.5 / spread, abs=0.01)
    assert mqar["ahead"]["hybrid"] == mqar["margin"]
    assert float(mqar["ahead"]["transformer"]) > float(mqar["margin"])
    for ref in mqar["references"]:
        values = VALUES[("mqar", ref["reference"])]
        assert ref["mean"] == pytest.approx(statistics.fmean(values))
        assert ref["spread"] == pytest.approx(statistics.stdev(values))
        assert ref["n"] == 3
    assert tasks["mad:memorization"]["held"] is False
    assert client(calibrated_app, "/hl/api/calibration?study=nothing").json()["budgets"] == []


def test_the_page_draws_the_calibration_table(calibrated_app, open_app_page, client):
    page = open_app_page(calibrated_app)
    page.wait_for("document.querySelector('table.calibration tr[data-task=\"mqar\"]') !== null")
    assert page.evaluate("document.getElementById('calibration-section').hidden") is False
    header = page.collect("table.calibration th", "e.textContent")
    assert header == ["task", "metric", *PANEL_ORDER, "expectation", "margin", "verdict",
                      "each ahead by", "min / run"]
    cells = page.collect("table.calibration tr[data-task='mqar'] td", "e.textContent")
    assert cells[:2] == ["mqar", "accuracy"]
    assert all(cell.endswith("(3)") and " ± " in cell for cell in cells[2:6])
    mqar = client(calibrated_app, "/hl/api/calibration?study=demo").json()[
        "budgets"][0]["tasks"][0]
    ahead = ", ".join(f"{ref} {m}" for ref, m in mqar["ahead"].items())
    assert cells[6:] == ["attention ahead", mqar["margin"], "holds, separated", ahead, "0.5"]
    verdicts = page.collect("table.calibration tbody tr",
                            "[e.dataset.task, e.children[e.children.length - 3].textContent]")
    assert dict(verdicts) == {"mqar": "holds, separated", "mad:memorization": "does not hold"}
    assert page.errors() == []
