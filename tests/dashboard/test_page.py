"""The page in headless Chromium over the synthetic study (no search): metrics and units as sent."""

import dataclasses

import pytest

from hybridlab.metrics import METRICS, metric_names
from hybridlab.units import format_bytes, format_count

FORMATS = {"bytes": format_bytes, "count": format_count, "FLOPs": format_count,
           "tokens/s": format_count}


@pytest.fixture
def open_page(synthetic_app, open_app_page, client):
    """Opens the synthetic study's page once it shows the current snapshot; returns both."""

    def opened():
        page = open_app_page(synthetic_app)
        data = client(synthetic_app, "/hl/api/study?name=demo").json()
        page.wait_for(f"document.body.dataset.revision === '{data['revision']}'")
        return page, data

    return opened


def test_the_page_draws_every_registry_cost_in_hybridlabs_units(open_page):
    page, data = open_page()
    costs = metric_names("cost")
    complete = [t for t in data["trials"] if t["state"] == "complete"]
    for name in costs:
        assert page.count(f"#pareto-{name} circle.pt") == len(complete), name
        # The table writes each cost as hybridlab status does.
        shown = page.collect(f"#trials td[data-metric='{name}']", "e.textContent")
        expected = [FORMATS[METRICS[name].unit](t[name]) if t[name] is not None else "–"
                    for t in data["trials"]]
        assert shown == expected, name
    headers = page.collect("#trials th", "e.textContent")
    assert [METRICS[name].label for name in costs] == [h for h in headers
                                                      if h in {m.label for m in METRICS.values()}]
    assert page.errors() == []


def test_labels_and_axes_follow_the_registry(open_page, monkeypatch):
    monkeypatch.setitem(METRICS, "params", dataclasses.replace(METRICS["params"],
                                                               label="weights (count)"))
    monkeypatch.delitem(METRICS, "flops_per_token")
    page, _ = open_page()
    assert "weights (count)" in page.collect("#trials th", "e.textContent")
    assert page.evaluate("document.querySelector('#pareto-params .title').textContent") == (
        "accuracy vs weights")
    assert page.count("#pareto-flops_per_token") == 0
    assert page.count("#trials td[data-metric='flops_per_token']") == 0
