"""The ``hybridlab dashboard`` command: a small threaded HTTP server around the WSGI app."""

from __future__ import annotations

import argparse
import socket
import sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from hybridlab.store import display_url
from hybridlab_dashboard.app import DashboardApp, is_loopback
from hybridlab_dashboard.data import StudyDatabase, resolve_storage

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_RUNS_DIR = "runs"


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # Pages poll while optuna-dashboard loads several resources at once: one thread per request.
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """Logs failed requests only: a page polling every few seconds would flood the terminal."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if str(code)[:1] in ("4", "5"):
            super().log_request(code, size)


def make_dashboard_server(app: DashboardApp, host: str = DEFAULT_HOST,
                          port: int = DEFAULT_PORT) -> WSGIServer:
    """A server bound to ``host:port`` (port 0 picks a free one); call ``serve_forever``."""
    server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
    return make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)


def port_number(text: str) -> int:
    """An argparse type for ``--port``: refused at parsing, before any database is opened."""
    try:
        port: int | None = int(text)
    except ValueError:
        port = None
    if port is None or not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: use 0 (any free port) or "
                                         "1-65535")
    return port


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", help="study shown first (default: the first in the database)")
    parser.add_argument("--storage", help="database URL (default: <runs-dir>/<study>.db; without "
                        "--study either, the only study database in --runs-dir)")
    parser.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR,
                        help="where the default database <runs-dir>/<study>.db lives")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default: {DEFAULT_HOST}, this machine only)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help=f"port to listen on (default: {DEFAULT_PORT}; 0 picks a free one)")


def dashboard_command(args: argparse.Namespace) -> int:
    """Serve a study's dashboard, read-only: architectures, fronts, curves, and Optuna's views."""
    url = resolve_storage(args.study, args.storage, args.runs_dir)
    # The export command lines shown per trial must find the database this one was told of.
    database_args: tuple[str, ...] = ()
    if args.storage is not None:
        database_args = ("--storage", display_url(args.storage))
    elif args.runs_dir != DEFAULT_RUNS_DIR:
        database_args = ("--runs-dir", args.runs_dir)
    database = StudyDatabase(url, database_args=database_args)
    app = DashboardApp(database, study=args.study, bind_host=args.host)
    try:
        server = make_dashboard_server(app, args.host, args.port)
    except OSError as err:
        print(f"hybridlab dashboard: error: cannot listen on {args.host}:{args.port}: "
              f"{err.strerror or err}", file=sys.stderr)
        return 2
    port = server.server_address[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"hybridlab dashboard: {database.display_url} at http://{shown}:{port}/ "
          f"(Optuna's views: http://{shown}:{port}/optuna/); Ctrl-C stops", flush=True)
    if not is_loopback(args.host):
        print(f"hybridlab dashboard: listening on {args.host}: anyone who can reach this "
              "machine can read the study", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        database.close()
    return 0
