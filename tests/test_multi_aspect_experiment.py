"""`gcsl experiment` with multi-aspect goals on the tiny Llama: a goal grid, the per-aspect report and
heatmaps, the `words` metric and `gcsl data sentiment --length-column`, and config errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from gcsl.config import resolve_config
from gcsl.errors import ConfigError
from gcsl.experiments.layout import ExperimentLayout, slug
from gcsl.experiments.report import write_report
from gcsl.experiments.runner import ExperimentConfig, expand_variants, run_experiment
from gcsl.tasks.sentiment import SentimentDataConfig, SentimentEvalConfig, evaluate, write_sentiment_data
from gcsl.tasks.sentiment.data import with_length_column

WORDS = ["awful", "bad", "dull", "fine", "good", "great", "wonderful", "terrible"]
ASPECTS = [{"name": "negative sentiment", "column": "score", "range": [0, 1], "bins": 2},
           {"name": "brevity", "column": "words", "direction": "below", "precision": 0, "bins": 2}]


def _two_aspect_log(path: Path) -> Path:
    """24 scripted reviews on 12 chat prompts whose lengths (3 to 7 words) vary apart from their scores."""
    rows = [{"prompt": [{"role": "user", "content": f"Review movie {i % 12}."}],
             "response": "A " + WORDS[i % 8] + " film" + " indeed" * (i % 5) + ".", "score": (i % 8) / 7}
            for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in with_length_column(rows, "words")))
    return path


def _prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"t{i}", "prompt": [{"role": "user", "content": f"Review film {i}."}]})
                            + "\n" for i in range(3)))
    return path


def _config(tmp_path: Path, **over) -> dict:
    return {"name": "two aspects", "out": tmp_path / "exp", "task": "sentiment", "data": "d.jsonl",
            "eval_prompts": "p.jsonl", "methods": ["base"], "seeds": [0],
            "variants": [{"name": "gcsl-nl", "prepare": {"aspects": ASPECTS}}],
            "goal_curves": {"gcsl-nl": ["grid"]},
            "aspect_metrics": {"negative sentiment": ["mean_score", "mean_score_textblob"], "brevity": ["words"]},
            **over}


def test_two_aspect_experiment_reports_a_goal_grid_with_rho_and_heatmaps(tmp_path, tiny_llama_dir, one_torch_thread,
                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(ExperimentConfig, overrides=_config(
        tmp_path, data=str(_two_aspect_log(tmp_path / "fb.jsonl")), eval_prompts=str(_prompts(tmp_path / "p.jsonl")),
        model=str(tiny_llama_dir), validation_prompts=2, check_metrics=["mean_score_textblob"],
        prepare={"subject": "a review"},
        train={"max_steps": 2, "per_device_batch_size": 4, "report_to": "none", "save_steps": 2},
        generate={"max_new_tokens": 4, "batch_size": 4}, ci_samples=100))
    text = run_experiment(cfg).read_text()
    exp = tmp_path / "exp"
    layout = ExperimentLayout(exp)
    # The validation split kept the brevity column, which prepare then read: 2 prompts x 2 rows held out.
    train_rows = [json.loads(x) for x in (exp / "train_feedback.jsonl").read_text().splitlines()]
    assert len(train_rows) == 20 and {"prompt", "response", "score", "words"} <= set(train_rows[0])
    setup = layout.goal_setup("gcsl-nl")
    assert setup.names == ("negative sentiment", "brevity") and setup.sizes == (2, 2)
    # `grid` expanded to every combination of the two aspects' levels (classic gcsl-nl: all levels).
    grid = [f"negative sentiment=level:{a},brevity=level:{b}" for a in (1, 2) for b in (1, 2)]
    v = next(v for v in expand_variants(cfg) if v.name == "gcsl-nl")
    assert layout.curve_goals(v) == grid
    for goal in grid:
        p = layout.stage("gcsl-nl", 0, goal)
        assert p.metrics.is_file() and p.items.is_file() and p.gens.name == f"gens-{slug(goal)}.jsonl"
        items = [json.loads(x) for x in p.items.read_text().splitlines()]
        # items/ keeps each generation's word count beside its two sentiment scores.
        assert len(items) == 3 and all(it["score_words"] == len(it["completion"].split()) for it in items)
    results = json.loads((exp / "results.json").read_text())
    cells = results["aspect_grids"]["gcsl-nl"]["cells"]
    assert [c["goal"] for c in cells] == grid
    counts = setup.combination_counts
    for c in cells:
        levels = tuple(a["level"] for a in c["aspects"])
        assert c["train_rows"] == counts.get(levels, 0)
        assert set(c["metrics"]) == {"mean_score", "mean_score_textblob", "words"}
        assert c["metrics"]["words"]["n_units"] == 3 and c["metrics"]["words"]["seeds"] == [0]
        # brevity's requested value is its threshold in words; level 2 asks for fewer words than level 1
        assert c["aspects"][1]["requested"] == setup.aspects[1].threshold_display(levels[1])
    assert setup.aspects[1].threshold_display(2) < setup.aspects[1].threshold_display(1)
    # Every cell is a row of the report's grid table, its training rows flagged when 0.
    section = text.split("## Multi-aspect goals")[1]
    for c in cells:
        row = next(line for line in section.splitlines() if line.startswith(f"| {c['goal']} |"))
        assert (("**0 (never trained)**" in row) == (c["train_rows"] == 0)) and f"{c['metrics']['words']['mean']:.3f}" in row
    # Per aspect and metric: rho within each level of the other aspect, then pooled over the 4 goals.
    stats = {(s["aspect"], s["metric"]): s["groups"] for s in results["aspect_grids"]["gcsl-nl"]["statistics"]}
    assert set(stats) == {("negative sentiment", "mean_score"), ("negative sentiment", "mean_score_textblob"),
                          ("brevity", "words")}
    brevity = stats[("brevity", "words")]
    assert [g["held_fixed"] for g in brevity] == ["negative sentiment level 1", "negative sentiment level 2", "pooled"]
    assert [g["n_goals"] for g in brevity] == [2, 2, 4]
    for g in brevity:
        assert g["spearman_rho"] is None or -1 <= g["spearman_rho"] <= 1
    assert "| brevity | words | pooled | 4 |" in section
    # One heatmap per aspect metric, beside the report and shown in it.
    for metric in ("mean_score", "mean_score_textblob", "words"):
        png = exp / f"heatmap-gcsl-nl-{metric}.png"
        assert png.stat().st_size > 1000 and f"]({png.name})" in section
    # The probe runs once per aspect: that aspect's levels, the other at its top goal, rows binned by its column.
    for aspect, column, other in (("negative sentiment", "score", "brevity"), ("brevity", "words", "negative sentiment")):
        probe = json.loads((exp / "probe" / "gcsl-nl" / "seed0" / slug(aspect) / "probe.json").read_text())
        assert probe["aspect"] == aspect and probe["score_column"] == column and probe["n_rows"] == 4
        a = setup.aspects[setup.names.index(aspect)]
        top_other = setup.aspects[setup.names.index(other)].goal_text(2)
        assert probe["goal_levels"] == [1, 2] and all(top_other in g for g in probe["goals"])
        assert [a.goal_text(k) in g for k in (1, 2) for g in probe["goals"]] == [True, False, False, True]
        # the held-out rows' bins follow the aspect's own column and thresholds
        held = [json.loads(x) for x in (exp / "validation.jsonl").read_text().splitlines()]
        rows = [json.loads(x) for x in (exp / "runs" / "gcsl-nl" / "seed0" / "probe" / slug(aspect) / "rows.jsonl")
                .read_text().splitlines()]
        assert [r["score"] for r in rows] == [float(h[column]) for h in held]
        assert f"| gcsl-nl ({aspect}) | 0 | 4 |" in text
    # The single-aspect sections leave the multi-aspect variant out where they cannot apply to it.
    assert results["beyond_check"] == [] and "gcsl-nl" not in results["curve_statistics"]
    assert {r["variant"] for r in results["rows"]} == {"base", "gcsl-nl"}
    # `trained` asks for the level combinations that have training rows only.
    trained = dataclasses.replace(v, curve=["trained"])
    assert layout.curve_goals(trained) == [g for g, c in zip(grid, cells) if c["train_rows"] > 0]

    # Known answers for the per-aspect rho: word counts that follow the brevity request within each
    # sentiment level (fewer words asked, fewer given) but differ between the sentiment levels.
    words = dict(zip(grid, (6.0, 4.0, 7.0, 5.0)))
    for goal, value in words.items():
        path = layout.stage("gcsl-nl", 0, goal).metrics
        m = json.loads(path.read_text())
        m["metrics"]["words"] = value
        m["unit_scores"]["words"] = {f"t{i}": value for i in range(3)}
        path.write_text(json.dumps(m))
    text = write_report(cfg, expand_variants(cfg)).read_text()
    results = json.loads((exp / "results.json").read_text())
    stats = {(s["aspect"], s["metric"]): s["groups"] for s in results["aspect_grids"]["gcsl-nl"]["statistics"]}
    rho = [g["spearman_rho"] for g in stats[("brevity", "words")]]
    # pooled: ranks of (7, 5, 7, 5) against (6, 4, 7, 5) -> 4 / (2 * sqrt(5))
    assert rho[:2] == [pytest.approx(1.0), pytest.approx(1.0)] and rho[2] == pytest.approx(4 / (2 * 5 ** 0.5))
    assert "| brevity | words | pooled | 4 | 0.894 |" in text
    assert "| negative sentiment=level:2,brevity=level:1 |" in text and "| 7.000 [7.000, 7.000] |" in text


def test_words_metric_matches_a_hand_count_and_the_data_step_adds_the_column(tmp_path):
    rows = [{"prompt_id": "a", "prompt": "p", "completion": "A dull,  dull film."},  # 4 words
            {"prompt_id": "a", "prompt": "p", "completion": ""},                      # 0 words
            {"prompt_id": "b", "prompt": "q", "completion": "Great\nfun"}]           # 2 words
    res = evaluate(rows, SentimentEvalConfig(direction="negative"))
    # per prompt first (a: (4 + 0) / 2 = 2, b: 2), then over prompts
    assert res.unit_scores["words"] == {"a": 2.0, "b": 2.0} and res.metrics["words"] == 2.0
    assert [it["score_words"] for it in res.items] == [4, 0, 2]
    # The data step: the shipped log copied with each response's word count; the shipped rows unchanged.
    out = write_sentiment_data(SentimentDataConfig(length_column="words"), tmp_path / "data")
    plain = write_sentiment_data(SentimentDataConfig(), tmp_path / "plain")
    with_words = [json.loads(x) for x in out[0].read_text().splitlines()]
    shipped = [json.loads(x) for x in plain[0].read_text().splitlines()]
    assert len(with_words) == len(shipped) == 400
    assert all(w.pop("words") == len(s["response"].split()) for w, s in zip(with_words, shipped))
    assert with_words == shipped
    with pytest.raises(ConfigError, match="length_column: only for --source shipped"):
        resolve_config(SentimentDataConfig, overrides={"source": "movielens", "length_column": "words"})


@pytest.mark.parametrize("over, expected", [
    ({"aspect_metrics": {"sentiment": ["mean_score"]}},
     "aspect_metrics.sentiment: no aspect of that name in the prepare blocks' aspects (negative sentiment, brevity)"),
    ({"aspect_metrics": {"brevity": ["length"]}},
     "aspect_metrics.brevity: task sentiment does not report 'length'; choose one of"),
    ({"goal_curves": {"gcsl-nl": ["negative sentiment=level:x,brevity=top"]}},
     "goal_curves.gcsl-nl: goal 'negative sentiment=level:x,brevity=top'"),
    ({"goal_curves": {"gcsl-nl": ["brevity=grid"]}}, "write one request per aspect as name=request"),
])
def test_multi_aspect_config_errors_are_one_line(tmp_path, over, expected):
    with pytest.raises(ConfigError) as err:
        resolve_config(ExperimentConfig, overrides=_config(tmp_path, **over))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_goal_grid_requests_validate_and_long_names_get_short_stable_files(tmp_path):
    cfg = resolve_config(ExperimentConfig, overrides=_config(tmp_path, goal_curves={
        "gcsl-nl": ["grid", "negative sentiment=level:2,brevity=scale:1.1", "brevity=level:1"]}))
    assert [v.curve for v in expand_variants(cfg) if v.name == "gcsl-nl"] == [
        ["grid", "negative sentiment=level:2,brevity=scale:1.1", "brevity=level:1"]]
    # Before prepare there is nothing to expand `grid` into.
    assert ExperimentLayout(tmp_path / "exp").curve_goals(expand_variants(cfg)[1]) == [
        "negative sentiment=level:2,brevity=scale:1.1", "brevity=level:1"]
    long = ",".join(f"aspect number {i}=level:{i}" for i in range(12))
    name = slug(long)
    assert len(name) == 120 and name == slug(long) and name != slug(long.replace("level:11", "level:1"))
