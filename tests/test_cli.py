"""The ``hybridlab`` command itself: its version, its help, and argument checks."""

import argparse
from pathlib import Path

import optuna
import pytest

import hybridlab
from hybridlab.cli import build_parser, main
from hybridlab.store import create_tables, make_engine
from hybridlab_dashboard import server as dashboard_server


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version_names_the_package_and_the_code(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"hybridlab {hybridlab.__version__} ")
    assert hybridlab.code_version() in out


def test_every_flag_has_help_text():
    parser = build_parser()
    commands = subparsers(parser)
    assert {"search", "status", "train", "inspect", "eval", "export", "dashboard"} <= set(commands)
    missing = [
        f"{name} {'/'.join(action.option_strings)}"
        for name, sub in [("hybridlab", parser), *commands.items()]
        for action in sub._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
        and not (action.help or "").strip()
    ]
    assert missing == []


def make_study_database(runs: Path, name: str) -> None:
    """``runs/<name>.db`` holding study ``name`` with one running trial, as a search leaves it."""
    url = f"sqlite:///{runs / f'{name}.db'}"
    engine = make_engine(url)
    create_tables(engine)
    engine.dispose()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name=name, storage=url).ask()


@pytest.fixture
def one_database(tmp_path: Path) -> Path:
    make_study_database(tmp_path / "runs", "alpha")
    return tmp_path / "runs"


@pytest.fixture
def two_databases(one_database: Path) -> Path:
    make_study_database(one_database, "beta")
    return one_database


def test_status_without_flags_reads_the_only_study_database(one_database, capsys, monkeypatch):
    assert main(["status", "--runs-dir", str(one_database)]) == 0
    assert capsys.readouterr().out.startswith(
        f"study alpha (sqlite:///{one_database.resolve() / 'alpha.db'}): 1 trials")
    monkeypatch.chdir(one_database.parent)
    assert main(["status"]) == 0
    assert "study alpha" in capsys.readouterr().out


def test_status_without_flags_lists_several_databases(two_databases, capsys):
    assert main(["status", "--runs-dir", str(two_databases)]) == 2
    err = capsys.readouterr().err
    assert "2 study databases" in err and "(alpha, beta)" in err and "--study" in err


def test_dashboard_without_flags_serves_the_only_study_database(one_database, monkeypatch):
    served = []

    def capture(app, host, port):
        served.append(app)
        raise OSError("not listening in this test")

    monkeypatch.setattr(dashboard_server, "make_dashboard_server", capture)
    monkeypatch.chdir(one_database.parent)
    assert main(["dashboard"]) == 2
    assert served[0].database.url == f"sqlite:///{one_database.resolve() / 'alpha.db'}"


def test_dashboard_without_flags_lists_several_databases(two_databases, capsys, monkeypatch):
    monkeypatch.setattr(dashboard_server, "make_dashboard_server",
                        lambda *a: pytest.fail("started with no database chosen"))
    assert main(["dashboard", "--runs-dir", str(two_databases)]) == 2
    err = capsys.readouterr().err
    assert "2 study databases" in err and "(alpha, beta)" in err


def test_export_without_study_uses_the_only_study_database(one_database, tmp_path, capsys):
    argv = ["export", "--runs-dir", str(one_database), "--best", "--format", "hybridlab",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    # Found the study: what stops it is that no trial finished.
    assert "study 'alpha' has no completed trial" in capsys.readouterr().err
    make_study_database(one_database, "beta")
    assert main(argv) == 2
    assert "(alpha, beta)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
