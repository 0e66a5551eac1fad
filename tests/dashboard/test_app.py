"""The dashboard's HTTP surface: missing and empty databases, JSON, and what it refuses."""

from pathlib import Path

import optuna
from optuna.storages import RDBStorage

from hybridlab.metrics import METRICS, metric_names, registry_as_json
from hybridlab.store import create_tables, make_engine
from hybridlab_dashboard import DashboardApp, StudyDatabase


def app_for(path: Path) -> DashboardApp:
    return DashboardApp(StudyDatabase(f"sqlite:///{path}"))


def test_a_missing_database_gets_a_page_that_says_so(tmp_path: Path, client):
    path = tmp_path / "runs" / "nothing.db"
    app = app_for(path)
    page = client(app, "/")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b'data-state="missing"' in page.body
    assert f"No study database at {path}".encode() in page.body
    index = client(app, "/hl/api/studies").json()
    assert index["database"]["state"] == "missing" and index["studies"] == []
    assert index["default"] is None
    study = client(app, "/hl/api/study?name=tiny")
    assert study.status == 503 and "No study database" in study.json()["error"]
    optuna_page = client(app, "/dashboard")
    assert optuna_page.status == 503 and b"No study database" in optuna_page.body
    assert b"Traceback" not in page.body + study.body + optuna_page.body
    assert not path.parent.exists()


def test_empty_databases_get_a_page_that_says_so(tmp_path: Path, client):
    empty_file = tmp_path / "empty.db"
    empty_file.touch()
    tables_only = tmp_path / "tables.db"
    engine = make_engine(f"sqlite:///{tables_only}")
    create_tables(engine)
    engine.dispose()
    no_study = tmp_path / "nostudy.db"
    RDBStorage(f"sqlite:///{no_study}").engine.dispose()
    for path in (empty_file, tables_only, no_study):
        app = app_for(path)
        page = client(app, "/")
        assert page.status == 200 and b'data-state="empty"' in page.body
        assert b"holds no" in page.body
        index = client(app, "/hl/api/studies").json()
        assert index["database"]["state"] == "empty" and index["studies"] == []
        assert client(app, "/api/studies").status == 503


def test_a_file_that_is_not_a_database_is_reported(tmp_path: Path, client):
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not SQLite, " * 100)
    app = app_for(path)
    page = client(app, "/")
    assert page.status == 200 and b'data-state="error"' in page.body
    assert b"Cannot read" in page.body and b"Traceback" not in page.body
    assert client(app, "/hl/api/studies").json()["database"]["state"] == "error"


def test_json_endpoints(synthetic_app, client, synthetic):
    made = synthetic["trials"]
    index = client(synthetic_app, "/hl/api/studies")
    assert index.status == 200 and index.headers["Cache-Control"] == "no-store"
    assert index.json() == {
        "database": {"url": synthetic_app.database.display_url, "state": "ready",
                     "message": f"Reading {synthetic_app.database.display_url}"},
        "studies": [{"name": "demo", "directions": ["maximize"], "objectives": ["accuracy"]}],
        "default": "demo",
    }
    study = client(synthetic_app, "/hl/api/study?name=demo").json()
    assert set(study) == {"study", "objectives", "quality_metrics", "cost_axes", "units",
                          "layer_types", "metrics", "state_context", "counts", "best", "fronts",
                          "trials", "evaluations", "revision"}
    assert len(study["trials"]) == len(made) + 2
    assert set(study["trials"][0]) == {
        "number", "state", "status", "note", "reused_from", "seed", "values", "metrics", "pattern",
        "layers", "depth", "attention_fraction", "params", "active_params", "flops_per_token",
        "state_bytes", "tokens_per_second", "started", "completed", "export_command",
        "curve_points"}
    assert set(study["trials"][0]["layers"][0]) == {"type", "symbol", "width", "d_state",
                                                   "state_bytes", "params", "spec"}
    curves = client(synthetic_app, "/hl/api/curves?study=demo&trials=1,2").json()
    assert curves["study"] == "demo"
    assert [(s["trial"], s["split"], s["metric"], len(s["steps"]) == len(s["values"]))
            for s in curves["series"]] == [(1, "test", "accuracy", True),
                                          (2, "test", "accuracy", True)]
    assert client(synthetic_app, "/hl/api/curves?study=demo&trials=").json()["series"] == []


def test_the_page_gets_its_metrics_from_the_registry(synthetic_app, client, monkeypatch):
    study = client(synthetic_app, "/hl/api/study?name=demo").json()
    assert study["metrics"] == registry_as_json()
    costs = metric_names("cost")
    assert study["cost_axes"] == {name: METRICS[name].direction for name in costs}
    assert set(study["fronts"]["accuracy"]) == set(costs)
    assert all(name in study["trials"][0] for name in costs)
    # A cost the registry no longer lists is neither an axis nor a front.
    monkeypatch.delitem(METRICS, "flops_per_token")
    study = client(synthetic_app, "/hl/api/study?name=demo").json()
    assert "flops_per_token" not in study["cost_axes"] | study["fronts"]["accuracy"]
    assert "flops_per_token" not in study["metrics"]


def test_bad_requests_get_json_errors(synthetic_app, client):
    unknown = client(synthetic_app, "/hl/api/study?name=nope")
    assert unknown.status == 404
    assert unknown.json()["error"] == f"no study 'nope' in {synthetic_app.database.display_url}"
    bad = client(synthetic_app, "/hl/api/curves?study=demo&trials=1,x")
    assert bad.status == 400 and "trial numbers" in bad.json()["error"]


def test_static_assets_and_nothing_else(synthetic_app, client):
    script = client(synthetic_app, "/hl/static/app.js")
    assert script.status == 200 and script.headers["Content-Type"] == "text/javascript"
    assert client(synthetic_app, "/hl/static/style.css").status == 200
    for path in ("/hl/static/../data.py", "/hl/static/..%2fdata.py", "/hl/static/",
                 "/hl/static/index.html", "/hl/static/../../../../etc/passwd", "/etc/passwd",
                 "/hl/data.py", "/runs/demo.db", "/static/../../../../etc/passwd",
                 "/static/..%2f_app.py"):
        response = client(synthetic_app, path)
        assert response.status in (403, 404), path
        assert b"root:" not in response.body and b"import" not in response.body


def test_only_reads_are_served(synthetic_app, client):
    for path in ("/api/studies", "/api/studies/1", "/api/studies/1/note", "/hl/api/study", "/"):
        for method in ("POST", "PUT", "DELETE", "PATCH", "HEAD"):
            response = client(synthetic_app, path, method=method)
            assert response.status == 405 and response.headers["Allow"] == "GET", (method, path)


def test_writes_through_optuna_dashboard_never_reach_the_study(synthetic_app, client, synthetic):
    before = client(synthetic_app, "/api/studies").json()
    assert client(synthetic_app, "/api/studies/1", method="DELETE").status == 405
    assert client(synthetic_app, "/api/studies", method="POST").status == 405
    assert client(synthetic_app, "/api/studies").json() == before
    url = synthetic_app.database.url
    assert len(optuna.load_study(study_name="demo", storage=url).trials) == (
        len(synthetic["trials"]) + 2)


def test_optuna_dashboard_is_served_beside(synthetic_app, client):
    redirect = client(synthetic_app, "/optuna/")
    assert redirect.status == 302 and redirect.headers["Location"] == "/dashboard"
    assert client(synthetic_app, "/optuna").status == 302
    page = client(synthetic_app, "/dashboard")
    assert page.status == 200 and b"Optuna Dashboard" in page.body
    assert client(synthetic_app, "/dashboard/studies/1").status == 200
    studies = client(synthetic_app, "/api/studies").json()["study_summaries"]
    assert [s["study_name"] for s in studies] == ["demo"]
    assert client(synthetic_app, "/api/studies/1").json()["name"] == "demo"
    assert client(synthetic_app, "/static/bundle.js").status == 200
    assert client(synthetic_app, "/favicon.ico", headers={"Accept-Encoding": ""}).status == 200


def test_loopback_dashboard_answers_only_loopback_names(tmp_path: Path, client):
    local = app_for(tmp_path / "x.db")
    for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "localhost", "127.0.0.2"):
        assert client(local, "/hl/api/studies", host=host).status == 200, host
    for host in ("evil.example", "evil.example:8080", "10.0.0.5:8080", ""):
        refused = client(local, "/hl/api/studies", host=host)
        assert refused.status == 403 and b"localhost" in refused.body, host
    exposed = DashboardApp(StudyDatabase(f"sqlite:///{tmp_path / 'x.db'}"), bind_host="0.0.0.0")
    assert client(exposed, "/hl/api/studies", host="lab-node-3:8080").status == 200


def test_page_is_locked_down(synthetic_app, client):
    page = client(synthetic_app, "/")
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    # Everything the page loads is its own: no CDN, nothing fetched from elsewhere.
    assert b"http://" not in page.body and b"https://" not in page.body
    script = client(synthetic_app, "/hl/static/app.js").body
    assert b"http://" not in script.replace(b"http://www.w3.org/2000/svg", b"")
    assert b"https://" not in script
