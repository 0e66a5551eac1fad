"""``hybridlab status`` for a study with promotion rungs: the runs per rung and the correlation."""

import re
from pathlib import Path

import sqlalchemy as sa

from hybridlab.cli import main
from hybridlab.search.status import study_table
from hybridlab.store import Promotion, make_engine
from hybridlab.store.validation import study_validation
from hybridlab.units import format_count
from tests.store.test_validation import run, write_promotions, write_proxy_study

PROXY = [2.31, 2.12, 2.45, 2.20, 2.05]
RUNG1 = [run("trial:4", source=4, proxy=2.05, value=1.91, pattern="M*MM", params=48_000),
         run("trial:1", source=1, proxy=2.12, value=1.88, pattern="MM*M", params=47_500),
         run("trial:3", source=3, proxy=2.20, value=1.97, pattern="M*-M", params=49_100),
         run("transformer", role="transformer", value=1.99, pattern="**-*", params=48_800),
         run("ssm", role="ssm", status="failed", reason="diverged at step 40",
             pattern="MMMM", params=47_000)]
RUNG2 = RUNG1[:2]


def cells(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def fill(url: str) -> None:
    write_proxy_study(url, "s", PROXY, metric="bits_per_byte", direction="minimize",
                      patterns=["M*", "MM", "*M", "M-", "M*"])
    write_promotions(url, "s", 1, RUNG1, metric="bits_per_byte", direction="minimize")
    write_promotions(url, "s", 2, RUNG2, metric="bits_per_byte", direction="minimize",
                     target="16x params", strategy="stack")


def test_status_shows_each_rungs_runs_and_correlation(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    fill(url)
    lines = study_table("s", url).splitlines()
    # The trial table comes first, as before.
    assert lines[0].startswith("study s (") and lines[0].endswith(": 5 trials")
    assert cells(lines[1])[:3] == ["#", "state", "pattern"] and "bits_per_byte" in lines[1]
    assert [cells(line)[0] for line in lines[2:7]] == ["0", "1", "2", "3", "4"]
    engine = make_engine(url)
    first, second = study_validation(engine, "s")
    engine.dispose()
    start = lines.index("promoted runs of rung 1 (4x params, both): bits_per_byte at proxy "
                        "scale and promoted, params source -> promoted, trials of study s.rung1")
    header = cells(lines[start + 1])
    assert header == ["role", "source", "pattern", "params", "proxy", "promoted", "status",
                      "trial", "workers", "time", "note"]
    rows = [dict(zip(header, cells(line), strict=False)) for line in lines[start + 2:start + 7]]
    assert [r["role"] for r in rows] == ["candidate"] * 3 + ["transformer", "ssm"]
    assert [r["source"] for r in rows] == ["#1", "#3", "#4", "-", "-"]
    made = {(m["role"], "-" if m["source_trial"] is None else f"#{m['source_trial']}"): m
            for m in RUNG1}
    for shown in rows:
        expected = made[(shown["role"], shown["source"])]
        assert shown["pattern"] == expected["pattern"]
        assert shown["params"] == (
            f"{format_count(1000)} -> {format_count(expected['params'])}")
        for column, key in (("proxy", "proxy_value"), ("promoted", "value")):
            assert shown[column] == ("-" if expected[key] is None else f"{expected[key]:.4g}")
        assert shown["status"] == expected["status"]
    by_source = {r["source"]: r for r in rows}
    assert by_source["#4"]["note"] == "proxy winner"
    assert rows[4]["note"] == "diverged at step 40" and rows[4]["trial"] == "-"
    assert [r["trial"] for r in rows[:4]] == ["#1", "#2", "#0", "#3"]
    assert lines[start + 7:start + 9] == first.summary().splitlines()
    assert lines[start + 7].startswith(
        "rung 1 (4x params, both): Spearman 0.50 (p=1), Kendall 0.33 (p=1) over 3 candidates; "
        "proxy winner #4 still best: no (#1 is); baselines: transformer 1.99 bits_per_byte")
    assert [line for line in lines[start + 9:] if line.startswith("promoted runs of rung")] == [
        lines[-6]]
    assert lines[-6].startswith("promoted runs of rung 2 (16x params, stack): ")
    assert lines[-2:] == second.summary().splitlines()
    assert "too few promoted candidates (2 < 3) for a rank correlation" in lines[-2]


def test_a_rung_study_reads_as_any_study_and_names_its_sources(tmp_path: Path, capsys):
    url = f"sqlite:///{tmp_path / 's.db'}"
    fill(url)
    # A baseline whose architecture is a candidate's shares that candidate's run.
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.update(Promotion).where(Promotion.rung == 1, Promotion.key == "ssm")
                     .values(status="trained", run_trial=1, value=1.88))
    engine.dispose()
    assert main(["status", "--study", "s.rung1", "--storage", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("study s.rung1 (") and lines[0].endswith(": 4 trials")
    assert cells(lines[1]) == ["#", "state", "pattern", "params", "state@L", "tok/s",
                               "bits_per_byte", "note"]
    notes = {cells(line)[0]: cells(line)[-1] for line in lines[2:]}
    assert notes == {"0": "promoted #4 of s", "1": "promoted #1 of s; ssm baseline of s",
                     "2": "promoted #3 of s",
                     "3": "transformer baseline of s"}
    # A rung study has no rungs of its own.
    assert not any(line.startswith("promoted runs of rung") for line in lines)


def test_a_study_without_promotions_or_an_older_database_shows_only_trials(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    write_proxy_study(url, "s", PROXY, metric="bits_per_byte", direction="minimize")
    plain = study_table("s", url)
    assert "promoted runs" not in plain and len(plain.splitlines()) == 2 + len(PROXY)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {Promotion.__tablename__}"))
    engine.dispose()
    assert study_table("s", url) == plain
