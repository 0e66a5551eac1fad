"""``hybridlab train --config FILE``: errors name the file, the line and the field."""

import pytest

from hybridlab.cli import load_train_config
from hybridlab.config import ConfigError


@pytest.mark.parametrize(("text", "message"), [
    ("steps: 10\nlr: .nan\n", "t.yaml:2: train.lr: must be a finite number"),
    ("steps: 10\nbatch_size: 0\n", "t.yaml:2: train.batch_size: must be positive"),
    ("steps: 10\nnope: 1\n", "train.nope: unknown field"),
    ("- 1\n", "must be a mapping of train settings"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n"
        for p, c in zip("abcdefg", "bcdefgh", strict=True)), "aliases expand"),
])
def test_train_config_file_errors(tmp_path, text, message):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_train_config(str(path), {})


def test_binary_train_config_is_named(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_bytes(b"\x00\xff\xfe")
    with pytest.raises(ConfigError, match=r"t\.yaml.*not UTF-8"):
        load_train_config(str(path), {})


def test_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("steps: 10\nlr: 0.01\n")
    cfg = load_train_config(str(path), {"lr": 0.02})
    assert (cfg.steps, cfg.lr) == (10, 0.02)


def test_piped_training_prints_a_line_per_log_interval(tmp_path, capsys):
    from hybridlab.cli import main

    code = main(["train", "tiny-hybrid", "--task", "mqar", "--task-option", "vocab_size=64",
                 "--task-option", "seq_len=16", "--steps", "12", "--threads", "1",
                 "--set", "log_every=4", "--set", "eval_every=12", "--set", "batch_size=4",
                 "--out", str(tmp_path / "run")])
    assert code == 0
    err = capsys.readouterr().err
    steps = [line.split()[2] for line in err.splitlines() if " step " in f" {line}"]
    assert steps == ["4/12", "8/12", "12/12"], err
