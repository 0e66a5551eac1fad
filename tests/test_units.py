"""One way to write sizes: bytes in KiB/MiB/GiB, counts in k/M/G, the same in every view."""

import pytest

from hybridlab.units import UNIT_RULES, format_bytes, format_count


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"),
    # 1.25 and 1.75 KiB are exact ties: half up, as the dashboard's JavaScript rounds them.
    (1280, "1.3 KiB"), (1792, "1.8 KiB"), (10 * 1024 + 100, "10.1 KiB"),
    # What rounds up to the base is written in the next unit.
    (1024 * 1024 - 1, "1 MiB"), (1023.6, "1 KiB"), (3 * 2**20, "3 MiB"),
    (int(2.5 * 2**30), "2.5 GiB"), (5 * 2**40, "5 TiB"), (2**50, "1024 TiB"),
])
def test_bytes_use_binary_units(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize(("n", "text"), [
    (0, "0"), (7, "7"), (999, "999"), (999.4, "999"), (999.6, "1k"), (1000, "1k"),
    (1250, "1.3k"), (12_345, "12.3k"), (1_500_000, "1.5M"), (2_000_000_000, "2G"),
    (3.2e12, "3.2T"), (122.5, "123"),
])
def test_counts_use_decimal_units(n, text):
    assert format_count(n) == text


def test_the_rules_are_plain_json_for_the_dashboard():
    assert UNIT_RULES == {
        "bytes": {"base": 1024, "units": ["B", "KiB", "MiB", "GiB", "TiB"], "separator": " "},
        "count": {"base": 1000, "units": ["", "k", "M", "G", "T"], "separator": ""},
    }
