"""The dashboard's WSGI application: hybridlab's pages and JSON, with optuna-dashboard beside them.

optuna-dashboard's browser bundle fetches ``/api/...`` and ``/static/...`` and routes under
``/dashboard`` from the site root (its prefix is compiled in), so it cannot live under a prefix.
It is served at those root paths instead, and ``/optuna/`` redirects to it; hybridlab's own pages
are ``/`` and everything under ``/hl/``. Only GET is served (the study is read, never changed),
only paths listed here are answered, and the static assets are a fixed set read at start-up, so
no request can name a file.
"""

from __future__ import annotations

import html
import ipaddress
import json
import logging
import traceback
import urllib.parse
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

import sqlalchemy as sa

from hybridlab_dashboard.data import DatabaseUnavailable, StudyDatabase, UnknownStudy

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

ASSETS = {"app.js": "text/javascript", "units.js": "text/javascript", "style.css": "text/css"}
OPTUNA_PATHS = ("/dashboard", "/api/", "/static/", "/csv/")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
MAX_CURVE_TRIALS = 32

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _request_host(environ: dict[str, Any]) -> str:
    """The host name the browser asked for, without the port (``[::1]:8080`` -> ``::1``)."""
    host = environ.get("HTTP_HOST", "")
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class DashboardApp:
    """Routes each request to a hybridlab view or to optuna-dashboard; see the module docstring."""

    def __init__(self, database: StudyDatabase, *, study: str | None = None,
                 bind_host: str = "127.0.0.1") -> None:
        """``bind_host`` is the address the server listens on: bound to loopback, requests whose
        Host header names another machine are refused, so a web page elsewhere cannot read the
        study through DNS rebinding."""
        self.database = database
        self.study = study
        self.loopback_only = is_loopback(bind_host)
        static = resources.files(__package__) / "static"
        self._index = (static / "index.html").read_text()
        self._assets = {name: ((static / name).read_bytes(), kind) for name, kind in ASSETS.items()}
        self._optuna: WSGIApp | None = None

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if self.loopback_only and not is_loopback(_request_host(environ)):
            return _text(start_response, "403 Forbidden", "this dashboard answers only on "
                         "localhost; start it with --host to serve other names\n")
        if environ["REQUEST_METHOD"] != "GET":
            return _json(start_response, "405 Method Not Allowed",
                         {"error": "the dashboard is read-only"}, [("Allow", "GET")])
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        if path == "/":
            return self._page(start_response)
        if path.startswith("/hl/static/") and path[len("/hl/static/"):] in self._assets:
            body, kind = self._assets[path[len("/hl/static/"):]]
            return _respond(start_response, "200 OK", body, kind, [("Cache-Control", "no-cache")])
        if path == "/hl/api/studies":
            return self._guarded(start_response, self._studies)
        if path == "/hl/api/study":
            name = query.get("name", [""])[0]
            return self._guarded(start_response, lambda: self.database.snapshot(name))
        if path == "/hl/api/curves":
            return self._guarded(start_response, lambda: self._curves(query))
        if path == "/hl/api/promotion":
            study = query.get("study", [""])[0]
            return self._guarded(start_response, lambda: self.database.promotion(study))
        if path == "/hl/api/calibration":
            study = query.get("study", [""])[0]
            return self._guarded(start_response, lambda: self.database.calibration(study))
        if path in ("/optuna", "/optuna/"):
            return _respond(start_response, "302 Found", b"", "text/plain",
                            [("Location", "/dashboard")])
        if path == "/favicon.ico" or path.startswith(OPTUNA_PATHS):
            return self._to_optuna(environ, start_response)
        return _text(start_response, "404 Not Found", f"nothing at {path}\n")

    def _page(self, start_response: StartResponse) -> Iterable[bytes]:
        # The database state is written into the page itself, so it reads right without scripts.
        state = self.database.state()
        page = self._index.replace("<!--state-->", html.escape(state.message)).replace(
            "<!--state-kind-->", state.state)
        return _respond(start_response, "200 OK", page.encode(), "text/html; charset=utf-8",
                        [("Content-Security-Policy", PAGE_POLICY)])

    def _studies(self) -> dict[str, Any]:
        state = self.database.state()
        studies = self.database.studies() if state.state == "ready" else []
        names = [s["name"] for s in studies]
        return {
            "database": {"url": self.database.display_url, "state": state.state,
                         "message": state.message},
            "studies": studies,
            "default": self.study if self.study in names else (names[0] if names else None),
        }

    def _curves(self, query: dict[str, list[str]]) -> dict[str, Any]:
        study = query.get("study", [""])[0]
        try:
            trials = [int(t) for t in query.get("trials", [""])[0].split(",") if t]
        except ValueError:
            raise ValueError("trials must be comma-separated trial numbers") from None
        return {"study": study,
                "series": self.database.curves(study, trials[:MAX_CURVE_TRIALS])}

    def _guarded(self, start_response: StartResponse,
                 view: Callable[[], dict[str, Any]]) -> Iterable[bytes]:
        """A JSON view whose failures become a JSON error with a status, never a stack trace."""
        try:
            return _json(start_response, "200 OK", view())
        except UnknownStudy as err:
            return _json(start_response, "404 Not Found", {
                "error": f"no study {err.args[0]!r} in {self.database.display_url}"})
        except ValueError as err:
            return _json(start_response, "400 Bad Request", {"error": str(err)})
        except DatabaseUnavailable as err:
            return _json(start_response, "503 Service Unavailable", {"error": str(err)})
        except sa.exc.DBAPIError as err:
            # A busy or briefly inconsistent database: the page retries on its next poll.
            return _json(start_response, "503 Service Unavailable",
                         {"error": f"database not readable now: {str(err.orig).splitlines()[0]}"})
        except Exception as err:
            log.error("dashboard view failed:\n%s", traceback.format_exc())
            return _json(start_response, "500 Internal Server Error",
                         {"error": f"{type(err).__name__}: {err}"})

    def _to_optuna(self, environ: dict[str, Any],
                   start_response: StartResponse) -> Iterable[bytes]:
        if self._optuna is None:
            # Imported on first use: it pulls in scikit-learn, seconds that `hybridlab --help`
            # and a dashboard nobody opens at /optuna/ should not pay.
            import optuna_dashboard

            try:
                self._optuna = optuna_dashboard.wsgi(self.database.optuna_storage())
            except DatabaseUnavailable as err:
                page = (f"<!doctype html><title>Optuna views</title>"
                        f"<p>{html.escape(str(err))}</p><p><a href='/'>hybridlab dashboard</a>")
                return _respond(start_response, "503 Service Unavailable", page.encode(),
                                "text/html; charset=utf-8")
        # optuna-dashboard 0.21 reads Accept-Encoding unguarded; clients that send none get a 500.
        environ.setdefault("HTTP_ACCEPT_ENCODING", "")
        return self._optuna(environ, start_response)


def _respond(start_response: StartResponse, status: str, body: bytes, kind: str,
             headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body))),
                            ("X-Content-Type-Options", "nosniff"), *(headers or [])])
    return [body]


def _text(start_response: StartResponse, status: str, text: str) -> list[bytes]:
    return _respond(start_response, status, text.encode(), "text/plain; charset=utf-8")


def _json(start_response: StartResponse, status: str, payload: dict[str, Any],
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = json.dumps(payload, default=str).encode()
    return _respond(start_response, status, body, "application/json",
                    [("Cache-Control", "no-store"), *(headers or [])])
