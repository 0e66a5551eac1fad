"""``hybridlab dashboard``: its arguments, where it listens, and how it starts and stops."""

import argparse
import socket
import urllib.request
from pathlib import Path

import pytest

from hybridlab.cli import main
from hybridlab.store import StorageError
from hybridlab_dashboard import (
    DashboardApp,
    StudyDatabase,
    add_dashboard_arguments,
    dashboard_command,
    make_dashboard_server,
    server,
)
from hybridlab_dashboard.server import _ThreadingServer


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dashboard_arguments(parser)
    return parser.parse_args(argv)


def test_it_listens_on_loopback_unless_told_otherwise(tmp_path: Path, serve):
    args = parse("--study", "s")
    assert (args.host, args.port, args.storage, args.runs_dir) == ("127.0.0.1", 8080, None, "runs")
    assert parse("--host", "0.0.0.0", "--port", "9000").host == "0.0.0.0"
    served = serve(DashboardApp(StudyDatabase(f"sqlite:///{tmp_path / 'x.db'}")))
    assert served.server.server_address[0] == "127.0.0.1"
    with urllib.request.urlopen(served.url + "/", timeout=30) as response:
        assert response.status == 200 and b"No study database" in response.read()


def test_default_server_address_is_loopback(tmp_path: Path):
    app = DashboardApp(StudyDatabase(f"sqlite:///{tmp_path / 'x.db'}"))
    server = make_dashboard_server(app, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


def test_ipv6_loopback(tmp_path: Path):
    app = DashboardApp(StudyDatabase(f"sqlite:///{tmp_path / 'x.db'}"), bind_host="::1")
    try:
        server = make_dashboard_server(app, "::1", 0)
    except OSError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    try:
        assert server.server_address[0] == "::1"
    finally:
        server.server_close()


def test_without_a_database_it_asks_for_a_study_or_a_storage(tmp_path: Path):
    with pytest.raises(StorageError, match=r"0 study databases .*--study NAME or --storage URL"):
        dashboard_command(parse("--runs-dir", str(tmp_path)))


def test_a_busy_port_is_an_error_not_a_traceback(tmp_path: Path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = dashboard_command(parse("--study", "s", "--runs-dir", str(tmp_path),
                                       "--port", str(port)))
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_it_serves_until_interrupted(tmp_path: Path, capsys, monkeypatch):
    def interrupted(self, poll_interval=0.5):
        raise KeyboardInterrupt

    monkeypatch.setattr(_ThreadingServer, "serve_forever", interrupted)
    code = dashboard_command(parse("--study", "s", "--runs-dir", str(tmp_path), "--port", "0"))
    out = capsys.readouterr().out
    assert code == 0
    assert f"sqlite:///{tmp_path.resolve() / 's.db'} at http://127.0.0.1:" in out
    assert "/optuna/" in out and "anyone who can reach" not in out
    assert not (tmp_path / "s.db").exists()


@pytest.mark.parametrize(("argv", "expected"), [
    (["--study", "s"], ()),
    (["--study", "s", "--runs-dir", "elsewhere"], ("--runs-dir", "elsewhere")),
    (["--storage", "postgresql+psycopg://me:secret@db/hl"],
     ("--storage", "postgresql+psycopg://me:***@db/hl")),
])
def test_export_lines_find_the_same_database(argv, expected, monkeypatch):
    made = []

    def capture(app, host, port):
        made.append(app)
        raise OSError("not listening in this test")

    monkeypatch.setattr(server, "make_dashboard_server", capture)
    assert dashboard_command(parse(*argv)) == 2
    assert made[0].database._database_args == expected


@pytest.mark.parametrize("port", ["99999", "65536", "-1", "http"])
def test_a_port_out_of_range_is_refused_before_anything_starts(port, tmp_path: Path, capsys,
                                                              monkeypatch):
    started = []
    monkeypatch.setattr(server, "make_dashboard_server", lambda *a: started.append(a))
    with pytest.raises(SystemExit) as exited:
        main(["dashboard", "--study", "s", "--runs-dir", str(tmp_path), "--port", port])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --port" in err and "0 (any free port) or 1-65535" in err
    assert "Traceback" not in err and started == []


def test_the_port_range_ends_are_accepted():
    assert [parse("--port", p).port for p in ("0", "1", "65535")] == [0, 1, 65535]
