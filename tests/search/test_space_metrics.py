"""The metric registry is the one list of metrics: the space reads it, the dashboard serves it."""

import json
from pathlib import Path

import pytest

from hybridlab.config import ConfigError
from hybridlab.metrics import DEFAULT_OBJECTIVE, METRICS, metric_names, registry_as_json
from hybridlab.search.space import parse_space

TINY_SPACE = (Path(__file__).parent / "tiny_space.yaml").read_text()
CORPUS_TASK = "  name: corpus\n  options: {seq_len: 32}\n"


def with_objective(objective: str, *, corpus: bool = False) -> str:
    text = TINY_SPACE.replace("  - {metric: accuracy, direction: maximize}", f"  - {objective}")
    if corpus:
        text = text.replace(
            "  name: mqar\n  options: {vocab_size: 64, seq_len: 32, num_kv_pairs: 2, n_test: 64}\n",
            CORPUS_TASK)
    return text


def test_registry_entries_are_complete():
    assert set(metric_names("task")) | set(metric_names("cost")) == set(METRICS)
    assert not set(metric_names("task")) & set(metric_names("cost"))
    for name, metric in METRICS.items():
        assert metric.name == name
        assert metric.direction in ("maximize", "minimize")
        assert metric.label and metric.unit


@pytest.mark.parametrize("name", list(METRICS))
def test_space_accepts_each_registered_metric_with_its_default_direction(name):
    corpus = METRICS[name].only_from is not None
    space = parse_space(with_objective(f"{{metric: {name}}}", corpus=corpus), check_task=corpus)
    assert [(o.metric, o.direction) for o in space.objectives] == [
        (name, METRICS[name].direction)]


def test_unregistered_metric_is_refused_with_the_registered_ones():
    with pytest.raises(ConfigError) as info:
        parse_space(with_objective("{metric: perplexity}"))
    assert info.value.field == "objectives[0].metric"
    assert all(name in info.value.message for name in METRICS)


def test_metric_only_some_tasks_report_is_refused_for_the_others():
    only = [m for m in METRICS.values() if m.only_from is not None]
    assert only
    for metric in only:
        with pytest.raises(ConfigError) as info:
            parse_space(with_objective(f"{{metric: {metric.name}}}"))
        assert f"not {metric.name} (only {metric.only_from} do)" in info.value.message


def test_default_objective_comes_from_the_registry():
    text = TINY_SPACE.replace("objectives:\n  - {metric: accuracy, direction: maximize}\n", "")
    space = parse_space(text)
    assert [(o.metric, o.direction) for o in space.objectives] == [
        (DEFAULT_OBJECTIVE, METRICS[DEFAULT_OBJECTIVE].direction)]


def test_registry_as_json_is_plain_and_complete():
    served = json.loads(json.dumps(registry_as_json()))
    assert list(served) == list(METRICS)
    for name, entry in served.items():
        metric = METRICS[name]
        assert entry == {"name": name, "kind": metric.kind, "direction": metric.direction,
                         "unit": metric.unit, "label": metric.label,
                         "log_scale": metric.log_scale, "only_from": metric.only_from}
