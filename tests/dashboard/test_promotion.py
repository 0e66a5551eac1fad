"""The proxy vs promoted view: its read-only JSON and the charts the page draws from it."""

from pathlib import Path

import pytest
import sqlalchemy as sa
from scipy import stats

from hybridlab.store import Promotion, make_engine
from hybridlab_dashboard import DashboardApp, StudyDatabase
from tests.store.test_validation import run, write_promotions, write_proxy_study

# Proxy values are the synthetic study's accuracies (trials 3, 2, 0 are its top three).
RUNG1 = [run("trial:3", source=3, proxy=0.62, value=0.71, pattern="M*M"),
         run("trial:2", source=2, proxy=0.55, value=0.74, pattern="*"),
         run("trial:0", source=0, proxy=0.31, value=0.40, pattern="mM"),
         run("transformer", role="transformer", value=0.69, pattern="***"),
         run("ssm", role="ssm", value=0.52, pattern="MMM")]
# Markup in a stored string must reach the page as text.
TARGET = "4x <i>params</i>"


@pytest.fixture
def promoted_app(synthetic_app):
    url = synthetic_app.database.url
    write_promotions(url, "demo", 1, RUNG1, metric="accuracy", direction="maximize",
                     target=TARGET)
    write_promotions(url, "demo", 2, RUNG1[:2], metric="accuracy", direction="maximize",
                     target="16x params", strategy="stack")
    return synthetic_app


def test_the_endpoint_gives_each_rungs_points_and_correlation(promoted_app, client):
    response = client(promoted_app, "/hl/api/promotion?study=demo")
    assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
    data = response.json()
    first, second = data["rungs"]
    assert (first["rung"], first["metric"], first["direction"]) == (1, "accuracy", "maximize")
    assert first["heading"] == f"rung 1 ({TARGET}, both)"
    assert first["run_study"] == "demo.rung1"
    got = {r["key"]: (r["role"], r["source_trial"], r["proxy_value"], r["value"], r["trained"])
           for r in first["runs"]}
    assert got == {r["key"]: (r["role"], r["source_trial"], r["proxy_value"], r["value"], True)
                   for r in RUNG1}
    candidates = [r for r in RUNG1 if r["role"] == "candidate"]
    proxy = [r["proxy_value"] for r in candidates]
    promoted = [r["value"] for r in candidates]
    correlation = first["correlation"]
    assert correlation["n"] == 3 and correlation["note"] is None
    assert correlation["spearman"] == pytest.approx(stats.spearmanr(proxy, promoted).statistic)
    assert correlation["kendall"] == pytest.approx(stats.kendalltau(proxy, promoted).statistic)
    assert correlation["text"].startswith(f"Spearman {correlation['spearman']:.2f} (p=")
    assert (first["proxy_winner"], first["promoted_winner"], first["winner_kept"]) == (3, 2, False)
    assert (first["best_baseline"], first["beats_baselines"]) == ("transformer", True)
    assert second["correlation"]["spearman"] is None
    assert second["correlation"]["text"] == ("too few promoted candidates (2 < 3) for a rank "
                                             "correlation")
    assert client(promoted_app, "/hl/api/promotion?study=demo").json() == data
    # A study without rungs, a rung study itself, and no study at all have nothing to draw.
    for name in ("demo.rung1", "nothing", ""):
        assert client(promoted_app, f"/hl/api/promotion?study={name}").json()["rungs"] == []


def test_the_revision_moves_when_a_promoted_run_finishes(promoted_app, client):
    before = client(promoted_app, "/hl/api/promotion?study=demo").json()
    engine = make_engine(promoted_app.database.url)
    with engine.begin() as conn:
        conn.execute(sa.update(Promotion).where(Promotion.key == "ssm")
                     .values(value=0.80))
    engine.dispose()
    after = client(promoted_app, "/hl/api/promotion?study=demo").json()
    assert after["revision"] != before["revision"]
    assert after["rungs"][0]["best_baseline"] == "ssm"
    assert after["rungs"][0]["beats_baselines"] is False


def test_older_and_missing_databases(tmp_path: Path, client):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    write_proxy_study(url, "s", [0.5, 0.6], metric="accuracy", direction="maximize")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {Promotion.__tablename__}"))
    engine.dispose()
    old = DashboardApp(StudyDatabase(url))
    assert client(old, "/hl/api/promotion?study=s").json()["rungs"] == []
    missing = DashboardApp(StudyDatabase(f"sqlite:///{tmp_path / 'none.db'}"))
    response = client(missing, "/hl/api/promotion?study=s")
    assert response.status == 503 and "No study database" in response.json()["error"]


def test_the_page_draws_proxy_against_promoted_per_rung(promoted_app, open_app_page, client):
    page = open_app_page(promoted_app)
    data = client(promoted_app, "/hl/api/promotion?study=demo").json()
    page.wait_for("document.querySelector('#promotion-rung-2') !== null")
    assert page.evaluate("document.getElementById('promotion-section').hidden") is False
    first, second = data["rungs"]
    for rung in (first, second):
        chart = f"#promotion-rung-{rung['rung']}"
        assert page.evaluate(f"document.querySelector('{chart} .title').textContent") == (
            rung["heading"])
        assert page.evaluate(f"document.querySelector('{chart} .subtitle').textContent") == (
            rung["correlation"]["text"])
    assert page.count("#promotion i") == 0
    labels = page.collect("#promotion-rung-1 g.candidate .pt-label", "e.textContent")
    assert sorted(labels) == ["#0", "#2", "#3"]
    assert page.collect("#promotion-rung-1 g.candidate circle.winner",
                        "e.parentNode.dataset.trial") == ["3"]
    assert page.collect("#promotion-rung-1 g.baseline", "e.dataset.role") == [
        "transformer", "ssm"]
    assert page.collect("#promotion-rung-1 g.baseline text", "e.textContent") == [
        "transformer 0.69", "ssm 0.52"]
    # Higher proxy accuracy is further right; higher promoted accuracy higher up (smaller y).
    points = {int(t): (x, y) for t, x, y in page.collect(
        "#promotion-rung-1 g.candidate circle",
        "[e.parentNode.dataset.trial, +e.getAttribute('cx'), +e.getAttribute('cy')]")}
    assert points[0][0] < points[2][0] < points[3][0]
    assert points[2][1] < points[3][1] < points[0][1]
    baseline_y = page.collect("#promotion-rung-1 g.baseline line", "+e.getAttribute('y1')")
    assert points[3][1] < baseline_y[0] < points[0][1]
    assert page.collect("#promotion .summary", "e.textContent") == [
        rung["summary"] for rung in data["rungs"]]
    assert page.errors() == []
