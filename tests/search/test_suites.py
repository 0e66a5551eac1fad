"""Suites ("mad:all", "state:all"): shared knobs reach every member, a member's own knobs (under
its short name) reach it alone and win, and bad options are refused naming the task and knob."""

import pytest

from hybridlab.data.synthetic import MAD_TASKS
from hybridlab.errors import ConfigError
from hybridlab.search.objective import make_tasks, task_members
from hybridlab.search.space import parse_space
from tests.search.test_space import TINY_SPACE


def test_shared_knobs_reach_every_member_and_a_members_own_knobs_win():
    options = {"seq_len": 48, "selective_copying": {"num_tokens_to_copy": 5, "seq_len": 40},
               "memorization": {"vocab_size": 64}}
    tasks = {t.name: t for t in make_tasks("mad:all", seed=0, options=options)}
    assert sorted(tasks) == sorted(f"mad:{name}" for name in MAD_TASKS)
    copying = tasks["mad:selective_copying"].config
    assert (copying.num_tokens_to_copy, copying.seq_len) == (5, 40)
    assert tasks["mad:memorization"].config.vocab_size == 64
    for name, task in tasks.items():
        if name != "mad:selective_copying":
            assert task.config.seq_len == 48, name
        if name != "mad:memorization":
            assert task.config.vocab_size == type(task.config)().vocab_size, name


def test_a_single_task_takes_its_options_as_they_are():
    assert task_members("mqar", {"seq_len": 64}) == [("mqar", {"seq_len": 64})]


def test_a_member_knob_the_member_lacks_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"mad:compression.*num_tokens_to_copy"):
        make_tasks("mad:all", seed=0, options={"compression": {"num_tokens_to_copy": 3}})


def test_a_member_name_must_map_knobs():
    with pytest.raises(ValueError, match="'compression' names a member task"):
        task_members("mad:all", {"compression": 3})


def test_the_space_points_at_task_options():
    old = "  name: mqar\n  options: {vocab_size: 64, seq_len: 32, num_kv_pairs: 2, n_test: 64}"
    assert old in TINY_SPACE
    text = TINY_SPACE.replace(old, "  name: mad:all\n  options: {selective_copying: {bogus: 1}}")
    with pytest.raises(ConfigError) as err:
        parse_space(text, source="space.yaml")
    message = str(err.value)
    assert "task.options" in message and "bogus" in message and "selective_copying" in message
