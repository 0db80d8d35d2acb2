"""The method table (gcsl.methods): every entry prepares as its flags say, and a new entry needs nothing else."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gcsl import methods
from gcsl.data.prepare import PrepareConfig, prepare
from gcsl.errors import ConfigError
from gcsl.goals import GoalSetup, inference_goal
from gcsl.goals.formulate import beyond_threshold, per_level
from gcsl.methods import COMPLETION_COLUMNS, METHODS, PAIR_COLUMNS, Method, get_method, trained_methods

ALL_LAYOUT_COLUMNS = {"completion", "chosen", "rejected", "goal_value"}


def _prepare(log: Path, out: Path, method: str, **kw):
    result = prepare(PrepareConfig(data=str(log), out=out, method=method, score_range=[1.0, 5.0],
                                   metric_name="rating", quiet=True, **kw))
    table = pq.read_table(out / "train.parquet")
    return result, table, json.loads((out / "goals.json").read_text())


@pytest.fixture(scope="module")
def prepared_all(feedback_log, tmp_path_factory):
    """Every trainable method of the table prepared on the shared feedback log."""
    root = tmp_path_factory.mktemp("methods")
    return {name: _prepare(feedback_log, root / name, name) for name in trained_methods()}


def test_the_table_is_the_expected_one():
    assert list(METHODS) == ["base", "sft", "sft-aug", "dpo", "gcsl", "gcsl-nl", "gcsl-bey", "gcsl-bey-nl",
                             "gcsl-bey-snl", "gcsl-noquant-nl", "gcsl-noquant-embed", "sft-bottom", "dexperts", "pplm",
                             "random", "most-popular", "bigrec", "grpo", "rloo", "online-gcsl-bey-nl", "quark",
                             "sft-all", "llmeraser", "rosepo", "sprec"]
    untrained = {"base": "base", "dexperts": "decoding", "pplm": "classifier", "random": "heuristic",
                 "most-popular": "heuristic", "grpo": "online", "rloo": "online", "online-gcsl-bey-nl": "loop",
                 "quark": "loop", "llmeraser": "erased", "rosepo": "recipe", "sprec": "recipe"}
    assert trained_methods() == tuple(m for m in METHODS if m not in untrained)
    assert {m.name: m.variant_kind for m in METHODS.values() if not m.trainable} == untrained
    assert {m.name: m.online for m in METHODS.values() if m.online} == {"grpo": "grpo", "rloo": "rloo"}
    assert {m.name: m.loop for m in METHODS.values() if m.loop} == {"online-gcsl-bey-nl": "gcsl-bey-nl", "quark": "gcsl"}
    assert {m.name: m.recipe for m in METHODS.values() if m.recipe} == {"rosepo": "rosepo", "sprec": "sprec"}
    assert {m.name: m.erases for m in METHODS.values() if m.erases} == {"llmeraser": ("sft-all", "sft-bottom")}
    assert {m.name: m.tasks for m in METHODS.values() if m.tasks is not None} == {
        "random": ("recommendation",), "most-popular": ("recommendation",), "bigrec": ("recommendation",),
        "rosepo": ("recommendation",), "sprec": ("recommendation",)}
    assert {m.name for m in METHODS.values() if m.beyond} == {"sft-aug", "gcsl-bey", "gcsl-bey-nl", "gcsl-bey-snl"}
    assert {m.name for m in METHODS.values() if m.goal_input == "token"} == {"gcsl", "gcsl-bey"}
    assert {m.name: m.goal_request for m in METHODS.values() if m.is_goal_conditioned} == {
        "gcsl": "level", "gcsl-nl": "level", "gcsl-bey": "level", "gcsl-bey-nl": "threshold",
        "gcsl-bey-snl": "threshold", "gcsl-noquant-nl": "value", "gcsl-noquant-embed": "value"}
    base = get_method("base")
    assert base.trainer == "none" and base.formulate is None and not base.trainable and base.columns == ()


@pytest.mark.parametrize("name", trained_methods())
def test_every_method_prepares_exactly_its_columns(prepared_all, name):
    method = get_method(name)
    _, table, goals = prepared_all[name]
    assert goals["method"] == name and table.num_rows > 0
    for column in method.columns:
        assert column in table.column_names, column
        assert table.column(column).null_count == 0, column
    # The other layouts' columns are absent, or (goal_value outside the embed method) all empty.
    for column in ALL_LAYOUT_COLUMNS - set(method.columns):
        assert column not in table.column_names or table.column(column).null_count == table.num_rows, column


@pytest.mark.parametrize("name", trained_methods())
def test_flags_agree_with_the_prepared_rows(prepared_all, name):
    method = get_method(name)
    _, table, goals = prepared_all[name]
    setup = GoalSetup.from_json(goals)
    levels, retained = goals["levels"], goals["retained_levels"]
    if method.trainer == "preference":
        rows = table.to_pylist()
        assert set(PAIR_COLUMNS) <= set(table.column_names) and "completion" not in table.column_names
        assert all(r["score_chosen"] > r["score_rejected"] for r in rows)
        assert inference_goal(setup, "top").text is None
        return
    rows = table.to_pylist()
    per_row = Counter(r["row_id"] for r in rows)
    # Beyond methods train a response once per retained threshold it reaches: several thresholds here.
    assert (max(per_row.values()) > 1) == method.beyond
    # Filtering keeps the levels above the training mean only, and drops the rows below them.
    assert (retained != levels) == method.filtering
    if method.filtering:
        below = {r["row_id"] for r in rows if setup.level_of(r["score"]) < min(retained)}
        assert below == set() and goals["dropped"]["below every retained goal"] > 0
    if method.goal_input == "none":
        assert all(r["goal"] is None and r["prompt"] == r["prompt_text"] for r in rows)
    if method.goal_input in ("token", "text"):
        assert all(r["goal"] and r["prompt"] == r["prompt_text"] + "\n\n" + r["goal"] for r in rows)
    if method.goal_input == "token":
        assert goals["special_tokens"] == [f"[R_{k}{'+' if method.beyond else ''}]" for k in levels]
        assert {r["goal"] for r in rows} <= set(goals["special_tokens"])
    else:
        assert goals["special_tokens"] == []
    if method.goal_input == "embedding":
        assert all(r["goal"] is None and r["goal_value"] == r["score"] for r in rows)
    if method.beyond and method.is_goal_conditioned:
        assert {r["goal_level"] for r in rows} == set(retained)
    top = inference_goal(setup, "top")
    if method.goal_request == "none":
        assert top.text is None and top.value is None
    elif method.goal_request == "value":
        assert top.value == pytest.approx(goals["top_bin_mean"], abs=0.005) and top.level is None
    else:
        assert top.level == max(retained) and top.text == setup.goal_text(max(retained))
        # A level goal snaps a value to a trained level; a threshold goal writes the value itself.
        asked = inference_goal(setup, f"{goals['thresholds'][-1] + 0.01:.2f}")
        assert (asked.threshold == goals["thresholds"][-1]) == (method.goal_request == "level")


def test_a_new_method_is_one_table_entry(feedback_log, tmp_path, monkeypatch):
    from gcsl.training.train import _read_prepared

    table = dict(METHODS)
    # Classic per-bin rows with GCSL-bey-SNL's short threshold wording, and beyond rows without filtering.
    table["gcsl-snl"] = Method("gcsl-snl", "classic GCSL with the short threshold wording", per_level,
                               goal_style="snl", goal_input="text", goal_request="threshold")
    table["gcsl-bey-nofilter"] = Method("gcsl-bey-nofilter", "GCSL-bey-NL, every level kept", beyond_threshold,
                                        goal_style="bey", goal_input="text", goal_request="threshold",
                                        beyond=True)
    monkeypatch.setattr(methods, "METHODS", table)
    assert "gcsl-snl" in trained_methods()
    _, snl, goals = _prepare(feedback_log, tmp_path / "snl", "gcsl-snl")
    setup = GoalSetup.from_json(goals)
    rows = snl.to_pylist()
    assert len(rows) == 32 and Counter(r["row_id"] for r in rows).most_common(1)[0][1] == 1
    assert all(r["goal"] == setup.goal_text(r["goal_level"]) for r in rows)
    assert rows[0]["goal"].startswith("Generate a response with a rating score greater than")
    assert goals["retained_levels"] == goals["levels"]  # no filtering: every level is a goal
    assert inference_goal(setup, "top").text == setup.goal_text(max(goals["levels"]))
    assert _read_prepared(tmp_path / "snl").method == "gcsl-snl"
    _, nofilter, goals = _prepare(feedback_log, tmp_path / "nofilter", "gcsl-bey-nofilter")
    assert goals["retained_levels"] == goals["levels"]
    assert nofilter.num_rows == sum(r["goal_level"] for r in _prepare(
        feedback_log, tmp_path / "classic", "gcsl")[1].to_pylist())  # row at level q -> q goals


def test_get_method_names_every_valid_method_in_one_line():
    with pytest.raises(ConfigError) as err:
        get_method("gcsl-beyond")
    message = str(err.value)
    assert message == ("method: unknown method 'gcsl-beyond'; use one of base, sft, sft-aug, dpo, gcsl, gcsl-nl, "
                       "gcsl-bey, gcsl-bey-nl, gcsl-bey-snl, gcsl-noquant-nl, gcsl-noquant-embed, sft-bottom, "
                       "dexperts, pplm, random, most-popular, bigrec, grpo, rloo, online-gcsl-bey-nl, quark, sft-all, "
                       "llmeraser, rosepo, sprec")
    assert "\n" not in message


def test_contradictory_entries_are_refused():
    with pytest.raises(ConfigError, match="method 'x': token goals need goal_style token or token-bey"):
        Method("x", "x", per_level, goal_style="bey", goal_input="token", goal_request="level")
    with pytest.raises(ConfigError, match="the preference trainer, and only it, reads prompt, chosen, rejected"):
        Method("y", "y", per_level, trainer="preference", columns=COMPLETION_COLUMNS)
    with pytest.raises(ConfigError, match="a decoding-time method .* samples from the untrained base"):
        Method("z", "z", per_level, experts=("sft", "sft-bottom"))
    with pytest.raises(ConfigError, match="a heuristic uses no model: no trainer, goal, experts or training columns"):
        Method("h", "h", per_level, heuristic=True, tasks=("recommendation",))
    with pytest.raises(ConfigError, match="a heuristic writes a task's own answers: name the tasks it applies to"):
        Method("h", "h", None, trainer="none", columns=(), heuristic=True)
    with pytest.raises(ConfigError, match="an online method trains on its own samples: no trainer, goal"):
        Method("o", "o", None, trainer="none", columns=COMPLETION_COLUMNS, online="grpo")
    with pytest.raises(ConfigError, match="online must be grpo or rloo, got 'ppo'"):
        Method("o", "o", None, trainer="none", columns=(), online="ppo")


def test_base_and_decoding_methods_prepare_nothing(feedback_log, tmp_path):
    with pytest.raises(ConfigError, match="base is the untrained model"):
        _prepare(feedback_log, tmp_path / "base", "base")
    with pytest.raises(ConfigError, match="dexperts trains its adapters with sft and sft-bottom"):
        _prepare(feedback_log, tmp_path / "dexperts", "dexperts")
    for name, kind in (("pplm", "classifier"), ("llmeraser", "erased"), ("rosepo", "recipe")):
        with pytest.raises(ConfigError, match=rf"{name} is made by `gcsl experiment` \(variant kind {kind}\)"):
            _prepare(feedback_log, tmp_path / name, name)
    assert not any((tmp_path / name).exists() for name in ("base", "dexperts", "pplm", "llmeraser", "rosepo"))


def test_old_names_still_import():
    from gcsl.goals import GOAL_STYLE as goal_style
    from gcsl.goals import METHODS as goal_methods
    from gcsl.training.train import EMBED_METHOD, PREFERENCE_METHODS, TOKEN_METHODS

    assert goal_methods == trained_methods()
    assert goal_style["gcsl-bey-nl"] == "bey" and goal_style["sft-aug"] is None
    assert (EMBED_METHOD, PREFERENCE_METHODS, TOKEN_METHODS) == ("gcsl-noquant-embed", ("dpo",), ("gcsl", "gcsl-bey"))


def test_cli_choices_come_from_the_table(capsys):
    from gcsl.cli import main

    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in trained_methods():
        assert name in help_text
    assert "{sft,sft-aug,dpo,gcsl,gcsl-nl,gcsl-bey,gcsl-bey-nl,gcsl-bey-snl,gcsl-noquant-nl,gcsl-noquant-embed," \
        "sft-bottom,bigrec,sft-all}" \
        in help_text
