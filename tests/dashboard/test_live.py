"""The dashboard beside a real search: read while the search writes, then drawn in Chromium.

One small search runs once for the module. The dashboard is served before the database exists,
a poller reads every JSON endpoint the way the page does while the search writes, and a Chromium
tab opened on the empty dashboard must follow the search to its end without a reload.
"""

from __future__ import annotations

import json
import shlex
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hybridlab import cli
from hybridlab.search.runner import SearchSummary, run_search
from hybridlab_dashboard import DashboardApp, StudyDatabase

pytestmark = pytest.mark.slow

SPACE = Path(__file__).parents[1] / "search" / "tiny_space.yaml"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "runs"
NO_CHROMIUM = "/usr/bin/chromium is absent (apt-get install -y chromium; .ci/run installs it)"
STUDY = "tiny"


class Poller(threading.Thread):
    """Reads the dashboard's endpoints back to back, as an open page does, until stopped."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.halt = threading.Event()
        self.failures: list[str] = []
        self.states: list[str] = []
        self.finished_counts: list[int] = []

    def get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(self.base + path, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            self.failures.append(f"{path}: {err.code} {err.read()[:300]!r}")
        except OSError as err:
            self.failures.append(f"{path}: {err}")
        return None

    def run(self) -> None:
        while not self.halt.is_set():
            index = self.get("/hl/api/studies")
            if index is not None:
                self.states.append(index["database"]["state"])
                if STUDY in [s["name"] for s in index["studies"]]:
                    self.read_study()
            self.halt.wait(0.2)

    def read_study(self) -> None:
        snapshot = self.get(f"/hl/api/study?name={STUDY}")
        if snapshot is None:
            return
        counts = snapshot["counts"]
        self.finished_counts.append(counts.get("complete", 0) + counts.get("pruned", 0))
        trials = ",".join(str(t["number"]) for t in snapshot["trials"])
        self.get(f"/hl/api/curves?study={STUDY}&trials={trials}")
        self.get("/api/studies")


@dataclass
class Live:
    url: str
    summary: SearchSummary
    echoed: list[str]
    poller: Poller
    page: Any = None
    before_search: str = ""
    browser: Any = field(default=None, repr=False)


def fetch(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.status, response.url, response.read()


@pytest.fixture(scope="module")
def live(tmp_path_factory, serve, launch_browser) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("live")
    database_url = f"sqlite:///{folder / 'runs' / 'tiny.db'}"
    database = StudyDatabase(database_url, database_args=("--storage", database_url))
    served = serve(DashboardApp(database, study=STUDY))
    browser = launch_browser()
    page, before = None, ""
    if browser is not None:
        page = browser.new_page()
        page.goto(served.url + "/")
        before = page.wait_for("document.getElementById('study').options.length === 0 "
                               "&& document.getElementById('database').textContent")
        # A reload would drop this marker: the page must follow the search by polling alone.
        page.evaluate("window.sameDocument = true")
    poller = Poller(served.url)
    poller.start()
    while not poller.states and poller.is_alive():
        poller.halt.wait(0.05)
    echoed: list[str] = []
    try:
        summary = run_search(SPACE, storage_url=database_url, runs_dir=folder / "runs",
                             echo=echoed.append, heartbeat_interval=1, grace_period=4)
    finally:
        poller.halt.set()
        poller.join(timeout=60)
    yield Live(served.url, summary, echoed, poller, page, before, browser)


def test_dashboard_reads_while_the_search_writes(live: Live):
    assert live.poller.failures == []
    assert live.summary.finished == 4 and live.summary.failed == 0
    assert not [line for line in live.echoed if "error" in line.lower()]
    states = live.poller.states
    assert states[0] == "missing" and states[-1] == "ready" and "error" not in states
    assert "ready" in states and "missing" not in states[states.index("ready"):]
    # Read mid-search, not only before and after it.
    assert [n for n in live.poller.finished_counts if n < 4]
    assert live.poller.finished_counts[-1] == 4


def test_page_follows_the_search_without_reloading(live: Live):
    if live.page is None:
        pytest.skip(NO_CHROMIUM)
    assert "No study database" in live.before_search
    final = json.loads(fetch(f"{live.url}/hl/api/study?name={STUDY}")[2])
    live.page.wait_for(f"document.body.dataset.revision === '{final['revision']}'", timeout=20)
    assert live.page.evaluate("document.querySelectorAll('#trials tbody tr').length") == 4
    assert live.page.evaluate("window.sameDocument") is True
    assert live.page.evaluate("document.getElementById('database').dataset.state") == "ready"
    assert live.page.evaluate("document.getElementById('study').value") == STUDY


def test_pages_draw_strips_fronts_curves_and_comparison(live: Live):
    if live.page is None:
        pytest.skip(NO_CHROMIUM)
    page = live.page
    _, _, body = fetch(f"{live.url}/hl/api/study?name={STUDY}")
    data = json.loads(body)
    page.wait_for(f"document.body.dataset.revision === '{data['revision']}'", timeout=20)
    for trial in data["trials"]:
        cells = f"#trials svg.strip[data-trial='{trial['number']}'] rect.cell"
        assert page.count(cells) == len(trial["layers"]) == len(trial["pattern"])
        assert page.collect(cells, "e.dataset.type") == [layer["type"] for layer in trial["layers"]]

    complete = [t for t in data["trials"] if t["state"] == "complete"]
    front = data["fronts"]["accuracy"]["state_bytes"]
    assert page.count("#pareto-state_bytes circle.front") == len(front)
    for chart in ("pareto-state_bytes", "pareto-params", "pareto-tokens_per_second",
                  "structure-attention_fraction", "structure-depth"):
        assert page.count(f"#{chart} circle.pt") == len(complete), chart

    # The hover card carries the trial's strip. The last front point is drawn on top of any
    # other at the same place (a reused genome plots where its original does).
    number = page.collect("#pareto-state_bytes circle.front", "+e.dataset.trial")[-1]
    page.hover(f"#pareto-state_bytes circle[data-trial='{number}']")
    page.wait_for(f"!document.getElementById('tooltip').hidden "
                  f"&& document.getElementById('tooltip').dataset.trial === '{number}'")
    layers = next(len(t["layers"]) for t in data["trials"] if t["number"] == number)
    assert page.count("#tooltip svg.strip rect.cell") == layers

    # Until trials are picked, the comparison and curves show the best trials and the next best.
    cards = page.collect("#compare .card", "+e.dataset.trial")
    assert set(data["best"]) <= set(cards) and len(cards) == min(3, len(complete))
    commands = {t["number"]: t["export_command"] for t in data["trials"]}
    assert page.collect("#compare .export-command", "e.textContent") == [
        commands[n] for n in cards]
    assert page.collect("#trials .export-command", "e.textContent") == [
        commands[t["number"]] for t in data["trials"]]
    page.wait_for("document.querySelectorAll('#curves path.line').length > 0")
    evaluated = {e["trial"] for e in data["evaluations"]}
    assert page.count("#evaluations tbody tr") == len(evaluated)

    page.screenshot(SCREENSHOTS / "dashboard-screenshot.png")
    assert page.errors() == []

    # Ticking a trial in the table puts it beside the best ones.
    other = next(t["number"] for t in data["trials"] if t["number"] not in cards)
    page.evaluate(f"document.querySelector('#trials tr[data-trial=\"{other}\"] input').click()")
    page.wait_for(f"document.querySelector('#compare .card[data-trial=\"{other}\"]') !== null")


def test_optuna_dashboard_is_served_beside(live: Live):
    status, final_url, body = fetch(f"{live.url}/optuna/")
    assert status == 200 and urllib.parse.urlparse(final_url).path == "/dashboard"
    assert b"Optuna Dashboard" in body
    _, _, studies = fetch(f"{live.url}/api/studies")
    assert [s["study_name"] for s in json.loads(studies)["study_summaries"]] == [STUDY]
    if live.browser is None:
        pytest.skip(NO_CHROMIUM)
    page = live.browser.new_page()
    page.goto(f"{live.url}/optuna/")
    page.wait_for(f"document.body.innerText.includes('{STUDY}')")
    # Open the study from optuna-dashboard's study list, as a user would.
    page.evaluate(f"[...document.querySelectorAll('a')]"
                  f".find(a => a.textContent.includes('{STUDY}'))?.click()")
    page.wait_for("document.body.innerText.includes('History')", timeout=30)
    page.screenshot(SCREENSHOTS / "dashboard-optuna-screenshot.png")


def test_the_export_command_shown_for_a_trial_exports_it(live: Live, tmp_path: Path,
                                                         monkeypatch):
    data = json.loads(fetch(f"{live.url}/hl/api/study?name={STUDY}")[2])
    trial = next(t for t in data["trials"] if t["number"] == data["best"][0])
    argv = shlex.split(trial["export_command"])
    assert argv[:2] == ["hybridlab", "export"] and argv[argv.index("--trial") + 1] == str(
        trial["number"])
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv[1:]) == 0
    out = tmp_path / argv[argv.index("--out") + 1]
    assert out.is_dir() and any(out.iterdir())
