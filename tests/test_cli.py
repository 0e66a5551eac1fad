"""The ``hybridlab`` command itself: its version, its help, and argument checks."""

import argparse

import pytest

import hybridlab
from hybridlab.cli import build_parser, main


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
