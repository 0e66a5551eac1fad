"""``hybridlab inspect``: bad flags are refused by name before anything is built."""

import pytest

from hybridlab.cli import main


@pytest.mark.parametrize(("flags", "message"), [
    (["--contexts", "abc"], "argument --contexts: expected an integer, got 'abc'"),
    (["--contexts", "1024,0"], "argument --contexts: must be at least 1, got 0"),
    (["--batch", "0"], "argument --batch: must be at least 1"),
    (["--seqlen", "-3"], "argument --seqlen: must be at least 1"),
    (["--generate", "x"], "argument --generate: expected an integer"),
])
def test_bad_inspect_flags_are_named(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_inspect_prints_one_state_column_per_context(capsys):
    assert main(["inspect", "tiny-hybrid", "--contexts", "64, 128", "--batch", "1",
                 "--seqlen", "16", "--generate", "2"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "type" in line)
    assert header.split()[-2:] == ["state@64", "state@128"]
