"""Goal construction: quantize -> formulate -> render, with property tests of the invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gcsl.errors import ConfigError
from gcsl.goals import (
    GoalSetup,
    MetricSpec,
    assign_levels,
    default_templates,
    formulate_beyond,
    formulate_classic,
    formulate_dpo_pairs,
    formulate_sampled_pairs,
    formulate_sft,
    inference_goal,
    place_goal,
    quantize_feedback,
    render_goal,
    retained_levels,
)

SCALAR = MetricSpec(name="quality", low=0.0, high=1.0)
TOX = MetricSpec(name="toxicity", low=0.0, high=1.0, higher_is_better=False, best_meaning="the least toxicity")


def test_equal_frequency_distinct_scores_exact_bins():
    scores = np.random.default_rng(0).permutation(np.linspace(0, 1, 100))
    q = quantize_feedback(scores, SCALAR, bins=5)
    assert q.bins_used == 5
    assert np.bincount(q.levels).tolist() == [0, 20, 20, 20, 20, 20]
    ordered = np.sort(scores)
    # tau_k is the smallest score of bin k.
    assert q.thresholds == tuple(float(ordered[20 * k]) for k in range(5))
    for k in range(1, 6):
        assert scores[q.levels == k].min() == q.thresholds[k - 1]


def test_ties_collapse_bins_and_say_so():
    scores = np.array([0.0] * 6 + [0.5] * 3 + [1.0])
    q = quantize_feedback(scores, SCALAR, bins=5)
    # Boundaries at sorted positions 0, 2, 4, 6, 8 hold 0, 0, 0, 0.5, 0.5.
    assert q.thresholds == (0.0, 0.5)
    assert q.levels.tolist() == [1] * 6 + [2] * 4
    assert q.notes and "collapse 5 requested bins into 2" in q.notes[0]


def test_ordinal_uses_its_own_levels():
    ratings = np.array([1, 2, 2, 3, 5, 5, 4], dtype=float)
    q = quantize_feedback(ratings, MetricSpec(name="rating", low=1, high=5, kind="ordinal"), bins=3)
    assert q.thresholds == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert q.levels.tolist() == [1, 2, 2, 3, 5, 5, 4]


def test_categorical_levels_follow_the_given_order():
    spec = MetricSpec(name="label", kind="categorical", categories=("bad", "ok", "good"))
    q = quantize_feedback(np.array([1.0, 3.0, 2.0]), spec)
    assert q.thresholds == (1.0, 2.0, 3.0)
    assert render_goal(spec, "bey", default_templates(spec), threshold=2.0) == (
        "Generate a response rated ok or better. Ratings from worst to best: bad, ok, good.")


def test_flip_lower_is_better_and_below_phrasing():
    assert TOX.orient(np.array([0.1]))[0] == pytest.approx(0.9)
    below = MetricSpec(name="toxicity", low=0.0, high=1.0, higher_is_better=False, flip=False)
    assert below.orient(np.array([0.1]))[0] == pytest.approx(-0.1)
    text = render_goal(below, "snl", default_templates(below), threshold=0.15)
    assert text == "Generate a response with a toxicity score less than 0.15."


def test_paper_wordings():
    t = default_templates(TOX)
    assert render_goal(TOX, "bey", t, threshold=0.85) == (
        "Generate a response with a non-toxicity score greater than 0.85. Non-toxicity scores range from 0 to 1, "
        "with 1 indicating the least toxicity.")
    rating = MetricSpec(name="rating", low=1, high=5, kind="ordinal", subject="a recommendation",
                        best_meaning="the highest rating")
    assert render_goal(rating, "snl", default_templates(rating), threshold=4) == (
        "Generate a recommendation with a rating equal or greater than 4.")
    # The article goes by sound: "a user ...", "an efficiency ..."
    for name, article in (("user preference rating", "a"), ("efficiency score", "an"), ("upvote share", "an")):
        spec = MetricSpec(name=name, low=1, high=5, kind="ordinal", subject="a recommendation")
        assert render_goal(spec, "snl", default_templates(spec), threshold=4).startswith(
            f"Generate a recommendation with {article} {name} equal or greater than 4")
    assert render_goal(SCALAR, "range", default_templates(SCALAR), range_bounds=(0.8, 0.9)).startswith(
        "Generate a response with a quality score between 0.80 and 0.90.")
    assert render_goal(SCALAR, "token", {}, level=3) == "[R_3]"
    assert render_goal(SCALAR, "token-bey", {}, level=3) == "[R_3+]"
    assert render_goal(SCALAR, "value", default_templates(SCALAR), value=0.8765).startswith(
        "Generate a response with a quality score of 0.88.")


def test_retained_levels_strictly_above_mean():
    assert retained_levels((0.1, 0.4, 0.5, 0.9), 0.4) == (3, 4)  # 0.4 is not strictly above
    assert retained_levels((0.1, 0.4), 0.4, filter_goals=False) == (1, 2)
    assert retained_levels((0.1, 0.2), 0.9) == (2,)


def test_sft_top_fraction_and_cutoff():
    scores = np.arange(8, dtype=float)
    f = formulate_sft(scores, top_fraction=0.25)
    assert f.rows.tolist() == [6, 7]
    assert f.dropped == {"outside the top 25%": 6}
    assert formulate_sft(scores, cutoff=5).rows.tolist() == [5, 6, 7]


def test_classic_keeps_every_row_once():
    f = formulate_classic(np.array([2, 1, 3]))
    assert f.rows.tolist() == [0, 1, 2] and f.goal_levels.tolist() == [2, 1, 3]


def test_dpo_pairs_largest_gaps_per_prompt():
    group = np.array([0, 0, 0, 0, 1, 1, 2])
    scores = np.array([0.1, 0.9, 0.5, 0.3, 0.2, 0.2, 0.7])
    chosen, rejected = formulate_dpo_pairs(group, scores, pairs_per_group=2)
    # Prompt 0: gaps 0.8 (1>0) then 0.6 (1>3); prompt 1 has equal scores; prompt 2 has one response.
    assert list(zip(chosen.tolist(), rejected.tolist())) == [(1, 0), (1, 3)]


def test_sampled_pairs_come_from_other_prompts():
    group = np.array([0, 1, 2, 3])
    chosen, rejected = formulate_sampled_pairs(group, np.array([0, 2]), seed=1)
    assert chosen.tolist() == [0, 2]
    assert all(group[c] != group[r] for c, r in zip(chosen, rejected))


def _setup(method: str, spec: MetricSpec = SCALAR) -> GoalSetup:
    return GoalSetup(method, spec, (0.2, 0.5, 0.8), (2, 3), 0.45, 3, default_templates(spec),
                     top_bin_mean=0.9, score_max=0.97)


def test_inference_goal_top_value_and_scale():
    s = _setup("gcsl-bey-nl")
    top = inference_goal(s, "top")
    assert (top.level, top.threshold) == (3, 0.8)
    assert "greater than 0.80" in top.text
    assert inference_goal(s, "scale:1.24").threshold == 0.99
    assert inference_goal(s, "scale:1.5").threshold == 1.0  # clipped to the range
    assert "greater than 0.65" in inference_goal(s, "0.654").text  # rounded to precision
    assert inference_goal(_setup("sft"), "top").text is None
    assert inference_goal(_setup("gcsl"), "top").text == "[R_3]"
    assert inference_goal(_setup("gcsl"), "0.6").text == "[R_2]"
    assert inference_goal(_setup("gcsl-noquant-nl"), "top").value == 0.9
    with pytest.raises(ConfigError, match="level:<k>"):
        inference_goal(s, "best")


def test_numeric_goal_for_token_methods_snaps_to_a_trained_level(capsys):
    # gcsl-bey retained levels 2 and 3: [R_1+] never appears in training.
    goal = inference_goal(_setup("gcsl-bey"), "0.3")
    assert (goal.text, goal.level, goal.threshold) == ("[R_2+]", 2, 0.5)
    assert goal.note == "goal '0.3' reaches only level 1 (0.20), which was not trained; using level 2 (0.50) instead"
    assert capsys.readouterr().err == f"gcsl: note: {goal.note}\n"
    # Below every threshold: the lowest trained level, for token and bin (GCSL-NL) goals alike.
    low = inference_goal(_setup("gcsl-bey"), "0.1")
    assert (low.text, low.note) == ("[R_2+]", "goal '0.1' reaches no level (the lowest threshold is 0.20); using "
                                              "level 2 (0.50) instead")
    assert inference_goal(_setup("gcsl"), "0.1").text == "[R_1]"
    assert inference_goal(_setup("gcsl-nl"), "0.1").level == 1
    # Classic GCSL trains every level: a value in bin 1 keeps [R_1], with no note.
    classic = inference_goal(_setup("gcsl"), "0.3")
    assert (classic.text, classic.note) == ("[R_1]", None)
    assert inference_goal(_setup("gcsl-bey"), "0.6").note is None
    assert capsys.readouterr().err.count("gcsl: note:") == 3


def test_level_request_gives_the_trained_goal():
    bey = inference_goal(_setup("gcsl-bey-nl"), "level:2")
    assert (bey.level, bey.threshold, bey.request) == (2, 0.5, "level:2")
    assert "greater than 0.50" in bey.text
    assert inference_goal(_setup("gcsl-bey"), "level:3").text == "[R_3+]"
    assert inference_goal(_setup("gcsl"), "level:1").text == "[R_1]"
    assert inference_goal(_setup("gcsl-nl"), "level:2").text.startswith(
        "Generate a response with a quality score between 0.50 and 0.80.")
    noquant = inference_goal(_setup("gcsl-noquant-embed"), "level:3")
    assert (noquant.value, noquant.text) == (0.8, None)
    assert inference_goal(_setup("sft"), "level:1").text is None
    with pytest.raises(ConfigError, match="level 1 was filtered out and never trained; trained levels are 2, 3"):
        inference_goal(_setup("gcsl-bey"), "level:1")
    with pytest.raises(ConfigError, match=r"levels 1\.\.3"):
        inference_goal(_setup("gcsl"), "level:4")
    with pytest.raises(ConfigError, match="must be an integer"):
        inference_goal(_setup("gcsl"), "level:top")


def test_scale_uses_the_top_base_and_moves_toward_the_best_end():
    # gcsl-noquant-embed's top is the top bin's mean (0.9), so scale:1.1 scales 0.9, not tau_3 = 0.8.
    embed = _setup("gcsl-noquant-embed")
    assert inference_goal(embed, "top").value == 0.9
    assert inference_goal(embed, "scale:1.05").value == 0.95
    assert inference_goal(_setup("gcsl-noquant-nl"), "scale:1.05").value == 0.95
    # A negative top threshold: scaling measures from the worst end (-1), 0.8 * 1.1 above it.
    margin = MetricSpec(name="margin", low=-1.0, high=1.0)
    neg = GoalSetup("gcsl-bey-nl", margin, (-0.6, -0.4, -0.2), (2, 3), -0.45, 3, default_templates(margin))
    assert inference_goal(neg, "scale:1.1").threshold == -0.12
    # Lower-is-better phrased "below" with a base at or below 0: the distance from the worst end (high) grows.
    below = MetricSpec(name="loss", low=-1.0, high=1.0, higher_is_better=False, flip=False)
    up = GoalSetup("gcsl-bey-nl", below, (-0.2, 0.0, 0.4), (3,), -0.5, 3, default_templates(below))
    assert inference_goal(up, "top").threshold == -0.4
    assert inference_goal(up, "scale:1.5").threshold == -1.0  # 1 - 1.4 * 1.5 = -1.1, clipped to the range
    assert inference_goal(up, "scale:1.1").threshold == -0.54
    open_ended = MetricSpec(name="margin")
    unknown = GoalSetup("gcsl-bey-nl", open_ended, (-0.6, -0.4, -0.2), (2, 3), -0.45, 3,
                        default_templates(open_ended))
    with pytest.raises(ConfigError, match="--range"):
        inference_goal(unknown, "scale:1.1")
    with pytest.raises(ConfigError, match="positive"):
        inference_goal(neg, "scale:0")


def test_goal_setup_round_trips_through_json():
    for spec in (SCALAR, TOX, MetricSpec(name="toxicity", low=0, high=1, higher_is_better=False, flip=False)):
        s = _setup("gcsl-bey-nl", spec)
        again = GoalSetup.from_json(s.to_json())
        assert again.thresholds == s.thresholds
        assert inference_goal(again, "top").text == inference_goal(s, "top").text


def test_place_goal_positions():
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert place_goal("Q", "G", "before") == "G\n\nQ"
    assert place_goal(chat, "G", "after")[1]["content"] == "Q\n\nG"
    assert place_goal(chat, "G", "system")[0]["content"] == "G\n\nS"
    assert place_goal(chat, None) == chat
    assert chat[1]["content"] == "Q"  # inputs are not mutated


# -- properties ---------------------------------------------------------------------------------
scores_st = st.lists(st.integers(0, 30).map(lambda v: v / 10), min_size=1, max_size=200)


@settings(max_examples=150, deadline=None)
@given(scores=scores_st, bins=st.integers(1, 8), filt=st.booleans())
def test_properties_of_the_beyond_expansion(scores, bins, filt):
    scores = np.array(scores)
    q = quantize_feedback(scores, SCALAR, bins=bins)
    # Thresholds strictly increase; no more bins than asked.
    assert all(a < b for a, b in zip(q.thresholds, q.thresholds[1:]))
    assert 1 <= q.bins_used <= bins
    # Ties never split: equal scores share a level.
    for v in np.unique(scores):
        assert len(np.unique(q.levels[scores == v])) == 1
    kept = retained_levels(q.thresholds, float(scores.mean()), filter_goals=filt)
    f = formulate_beyond(q.levels, kept)
    # Every expanded row's goal is at most its own level, and retained.
    assert np.all(f.goal_levels <= q.levels[f.rows])
    assert set(f.goal_levels.tolist()) <= set(kept)
    # Row count = sum over rows of the retained levels at or below that row's level.
    expected = sum(sum(1 for k in kept if k <= lvl) for lvl in q.levels)
    assert len(f.rows) == expected
    assert f.dropped.get("below every retained goal", 0) == int(sum(lvl < min(kept) for lvl in q.levels))
    # Deterministic.
    g = formulate_beyond(quantize_feedback(scores, SCALAR, bins=bins).levels, kept)
    assert np.array_equal(f.rows, g.rows) and np.array_equal(f.goal_levels, g.goal_levels)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 20), bins=st.integers(1, 6))
def test_distinct_scores_multiple_of_k_fill_bins_exactly(n, bins):
    scores = np.random.default_rng(n).permutation(np.arange(n * bins, dtype=float))
    q = quantize_feedback(scores, SCALAR, bins=bins)
    assert np.bincount(q.levels, minlength=bins + 1)[1:].tolist() == [n] * bins
    assert np.array_equal(assign_levels(scores, q.thresholds), q.levels)
