"""The dashboard writes sizes with hybridlab's rule: the same strings as ``hybridlab status``."""

import json
import re
import shutil
import subprocess
from importlib import resources

import pytest

from hybridlab.search.status import study_table
from hybridlab.units import UNIT_RULES, format_bytes, format_count

NODE = shutil.which("node")
VALUES = [0, 1, 1023, 1024, 1280, 1536, 1792, 10_340, 1023.6, 2**20 - 1, 3 * 2**20,
          2.5 * 2**30, 5 * 2**40, 2**50, 999.6, 1250, 12_345, 122.5, 1_500_000, 3.2e12]


def formatted_by_units_js(values, kind: str) -> list[str]:
    """What static/units.js writes for each value under the rule the snapshot carries."""
    if NODE is None:
        pytest.skip("node is not installed")
    source = (resources.files("hybridlab_dashboard") / "static" / "units.js").read_text()
    script = (f"{source}\nconst rule = {json.dumps(UNIT_RULES[kind])};\n"
              f"const values = {json.dumps(values)};\n"
              "console.log(JSON.stringify(values.map((n) => formatScaled(n, rule))));")
    out = subprocess.run([NODE, "-e", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_units_js_writes_what_python_writes():
    assert formatted_by_units_js(VALUES, "bytes") == [format_bytes(n) for n in VALUES]
    assert formatted_by_units_js(VALUES, "count") == [format_count(n) for n in VALUES]


def test_status_and_the_dashboard_write_trials_alike(synthetic_app, client):
    snapshot = client(synthetic_app, "/hl/api/study?name=demo").json()
    # The page formats with the rule it is sent, so Python's rule is the only one.
    assert snapshot["units"] == UNIT_RULES
    trials = [t for t in snapshot["trials"] if t["state_bytes"]]
    state = formatted_by_units_js([t["state_bytes"] for t in trials], "bytes")
    params = formatted_by_units_js([t["params"] for t in trials], "count")
    table = study_table("demo", synthetic_app.database.url).splitlines()
    assert re.split(r"\s{2,}", table[1])[3:5] == ["params", "state@L"]
    rows = {cells[0]: cells for cells in (re.split(r"\s{2,}", line) for line in table[2:])}
    assert len(trials) >= 3
    for trial, state_text, params_text in zip(trials, state, params, strict=True):
        assert rows[str(trial["number"])][3:5] == [params_text, state_text]
