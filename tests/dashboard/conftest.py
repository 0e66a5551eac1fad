"""Dashboard test helpers: a served app, study databases, and headless Chromium over DevTools."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
import wsgiref.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from hybridlab.config import ArchConfig, AttentionSpec, Mamba1Spec, Mamba2Spec
from hybridlab.cost import (
    active_param_count,
    flops_per_token,
    inference_state_bytes,
    param_count,
)
from hybridlab.store import (
    Candidate,
    CurvePoint,
    Evaluation,
    create_tables,
    make_engine,
    session_scope,
)
from hybridlab_dashboard import DashboardApp, StudyDatabase, make_dashboard_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-port=0",
]
STATE_CONTEXT = 4096
# Synthetic study: (pattern, accuracy) per finished trial; the cheap, state-light ones are worse.
SYNTHETIC = [("mM", 0.31), ("m", 0.12), ("*", 0.55), ("M*M", 0.62), ("mm-", 0.2)]


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(app: Callable, path: str, *, method: str = "GET", host: str = "127.0.0.1:8080",
         headers: dict[str, str] | None = None) -> Response:
    """One request straight into a WSGI app, as a browser on this machine would send it."""
    environ: dict[str, Any] = {}
    wsgiref.util.setup_testing_defaults(environ)
    path, _, query = path.partition("?")
    environ.update(REQUEST_METHOD=method, PATH_INFO=path, QUERY_STRING=query, HTTP_HOST=host,
                   HTTP_ACCEPT_ENCODING="gzip")
    for key, value in (headers or {}).items():
        environ["HTTP_" + key.upper().replace("-", "_")] = value
    started: dict[str, Any] = {}

    def start_response(status: str, response_headers: list[tuple[str, str]], exc_info=None):
        started.update(status=int(status.split()[0]), headers=dict(response_headers))

    body = b"".join(app(environ, start_response))
    return Response(started["status"], started["headers"], body)


def arch(pattern: str) -> ArchConfig:
    return ArchConfig.from_pattern(
        pattern, d_model=32, vocab_size=64, mamba1=Mamba1Spec(d_state=4),
        mamba2=Mamba2Spec(d_state=8, headdim=16, chunk_size=16),
        attention=AttentionSpec(n_heads=2))


def fill_synthetic_study(url: str, study: str = "demo") -> None:
    """A study written the way the search writes one, without training: finished, rejected,
    reused and running trials, curves and evaluations."""
    engine = make_engine(url)
    create_tables(engine)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    created = optuna.create_study(study_name=study, storage=url, direction="maximize")
    created.set_user_attr("objectives", ["accuracy"])
    depth = IntDistribution(1, 3)
    kind = CategoricalDistribution(["mamba1", "mamba2", "attention", "mlp"])
    with session_scope(engine) as session:
        for number, (pattern, accuracy) in enumerate(SYNTHETIC):
            config = arch(pattern)
            costs = {"params": param_count(config), "active_params": active_param_count(config),
                     "flops_per_token": flops_per_token(config, STATE_CONTEXT),
                     "state_bytes": inference_state_bytes(config, STATE_CONTEXT),
                     "tokens_per_second": 1e5 / len(pattern) * (1 + number)}
            created.add_trial(create_trial(
                params={"depth": len(pattern), "layer0.type": config.layers[0].type},
                distributions={"depth": depth, "layer0.type": kind},
                value=accuracy, user_attrs={"pattern": pattern}))
            session.add(Candidate(
                study=study, trial=number, genome_hash=config.canonical_hash(), pattern=pattern,
                arch=config.to_dict(), params=costs["params"],
                active_params=costs["active_params"],
                flops_per_token=costs["flops_per_token"], state_bytes=costs["state_bytes"],
                state_context=STATE_CONTEXT, tokens_per_second=costs["tokens_per_second"],
                task="mqar", task_fingerprint={"name": "mqar"}, code_version="test",
                status="trained", objectives={**costs, "accuracy": accuracy}))
            for step in (10, 20):
                session.add(CurvePoint(study=study, trial=number, step=step, split="test",
                                       metric="accuracy", value=accuracy * step / 20))
            session.add(Evaluation(study=study, trial=number, task="mqar", metric="accuracy",
                                   value=accuracy, stderr=0.01, harness="hybridlab-proxy",
                                   harness_version="test"))
        rejected = len(SYNTHETIC)
        created.add_trial(create_trial(state=TrialState.PRUNED, params={"depth": 3},
                                       distributions={"depth": depth},
                                       user_attrs={"rejected": "params 2e6 > max_params 1e5"}))
        session.add(Candidate(study=study, trial=rejected, task="mqar",
                              task_fingerprint={"name": "mqar"}, code_version="test",
                              status="rejected", reason="params 2e6 > max_params 1e5"))
    created.ask()
    engine.dispose()


@pytest.fixture
def synthetic_url(storage_url: str) -> str:
    """A database holding the synthetic study, on each backend (``storage_url`` is fresh)."""
    fill_synthetic_study(storage_url)
    return storage_url


@pytest.fixture
def synthetic() -> dict[str, Any]:
    """What the synthetic study holds: ``trials`` as (pattern, accuracy) and its ``arch``."""
    return {"trials": SYNTHETIC, "arch": arch, "state_context": STATE_CONTEXT}


@pytest.fixture
def synthetic_app(tmp_path: Path) -> Iterator[DashboardApp]:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    fill_synthetic_study(url)
    database = StudyDatabase(url)
    yield DashboardApp(database)
    database.close()


class Served:
    """The dashboard served over HTTP from a thread, as ``hybridlab dashboard`` serves it."""

    def __init__(self, app: DashboardApp) -> None:
        self.app = app
        self.server = make_dashboard_server(app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.app.database.close()


class DevTools:
    """A minimal Chrome DevTools Protocol client: one websocket, flattened target sessions."""

    def __init__(self, ws_url: str) -> None:
        import websocket

        # Chromium refuses DevTools websockets that carry an Origin it was not told to allow.
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, *,
             session: str | None = None) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") != self.next_id:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply["result"]

    def close(self) -> None:
        self.ws.close()


class Page:
    """One browser tab: navigate, evaluate JavaScript, wait for the DOM, move the mouse, shoot."""

    def __init__(self, devtools: DevTools, width: int = 1440, height: int = 1000) -> None:
        self.devtools = devtools
        target = devtools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = devtools.send("Target.attachToTarget",
                                     {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.devtools.send(method, params, session=self.session)

    def goto(self, url: str) -> None:
        # The old document carries a marker that the new one (after any redirect) lacks.
        self.evaluate("window.leaving = true")
        self.send("Page.navigate", {"url": url})
        self.wait_for("!window.leaving && document.readyState === 'complete'")

    def evaluate(self, expression: str) -> Any:
        reply = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                               "awaitPromise": True})
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def count(self, selector: str) -> int:
        return self.evaluate(f"document.querySelectorAll({json.dumps(selector)}).length")

    def collect(self, selector: str, expression: str) -> list[Any]:
        """``expression`` evaluated for each element ``e`` that ``selector`` matches."""
        return self.evaluate(
            f"[...document.querySelectorAll({json.dumps(selector)})].map(e => {expression})")

    def wait_for(self, expression: str, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {expression}")
            time.sleep(0.1)

    def hover(self, selector: str) -> None:
        """Move the real mouse onto the element's centre, scrolling it into view first."""
        found = json.dumps(selector)
        box = self.evaluate(f"(() => {{ const e = document.querySelector({found}); "
                            "e.scrollIntoView({block: 'center'}); const r = "
                            "e.getBoundingClientRect(); return [r.x + r.width / 2, "
                            "r.y + r.height / 2]; })()")
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": box[0], "y": box[1]})

    def screenshot(self, path: Path) -> None:
        """The whole page, not just the viewport."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        shot = self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                     "scale": 1}})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def errors(self) -> list[str]:
        """Script exceptions and console or network errors this tab has reported so far."""
        found = []
        for event in self.devtools.events:
            if event.get("sessionId") != self.session:
                continue
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:500])
            elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                found.append(f"{entry.get('url', '')}: {entry.get('text', '')}"[:500])
            elif (event.get("method") == "Runtime.consoleAPICalled"
                  and params.get("type") == "error"):
                found.append(json.dumps(params.get("args"))[:500])
        return found


class Browser:
    """Headless Chromium from the system package, with a throwaway profile."""

    def __init__(self, profile: Path) -> None:
        self.process = subprocess.Popen(
            [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and len(port_file.read_text().split()) == 2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{CHROMIUM} did not start its DevTools endpoint")
            time.sleep(0.1)
        port, path = port_file.read_text().split()
        self.devtools = DevTools(f"ws://127.0.0.1:{port}{path}")

    def new_page(self) -> Page:
        return Page(self.devtools)

    def close(self) -> None:
        if getattr(self, "devtools", None) is not None:
            self.devtools.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="session")
def launch_browser(tmp_path_factory) -> Iterator[Callable[[], Browser | None]]:
    """Starts headless Chromium on demand (None where the system has none); closes them all."""
    browsers: list[Browser] = []

    def launch() -> Browser | None:
        if not CHROMIUM.is_file():
            return None
        browsers.append(Browser(tmp_path_factory.mktemp("chromium-profile")))
        return browsers[-1]

    yield launch
    for browser in browsers:
        browser.close()


@pytest.fixture(scope="session")
def serve() -> Iterator[Callable[[DashboardApp], Served]]:
    """Serves an app over HTTP on a free local port; stops every server at the end."""
    servers: list[Served] = []

    def start(app: DashboardApp) -> Served:
        servers.append(Served(app))
        return servers[-1]

    yield start
    for served in servers:
        served.close()


@pytest.fixture
def open_app_page(serve, launch_browser) -> Callable[[DashboardApp], Any]:
    """``open_app_page(app)``: a new Chromium page on the served app's ``/`` (skips the test
    where the system has no Chromium)."""

    def open_page(app: DashboardApp):
        browser = launch_browser()
        if browser is None:
            pytest.skip("/usr/bin/chromium is absent (apt-get install -y chromium)")
        page = browser.new_page()
        page.goto(serve(app).url + "/")
        return page

    return open_page


@pytest.fixture
def client() -> Callable[..., Response]:
    """``client(app, path, method=..., host=..., headers=...)``: one request into a WSGI app."""
    return call
