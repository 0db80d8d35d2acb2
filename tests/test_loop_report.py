"""The report's online loop rounds section, table, summary and plot, on rounds.json files laid out as a loop writes
them (no training: the report only reads the final model folders)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_scripted_reviews
from gcsl.config import resolve_config
from gcsl.experiments.layout import ExperimentLayout
from gcsl.experiments.report import write_report
from gcsl.experiments.runner import ExperimentConfig, expand_variants
from gcsl.runinfo import atomic_write_json

LOOP = "online-gcsl-bey-nl"


def _round(r: int, top: float, pool: int, mean: float | None, steps: int = 1, display: bool = True) -> dict:
    samples = 0 if mean is None else 6
    # display units here: a score in [0, 10] scaled down to [0, 1] when oriented (an older record has none)
    shown = {"thresholds_display": [10 * t for t in (0.0, 0.25, 0.5, top)]} if display else {}
    return {"round": r, "thresholds": [0.0, 0.25, 0.5, top], **shown, "retained_levels": [3, 4], "pool_rows": pool,
            "samples": samples, "mean_sample_score": mean, "scorer_calls": samples, "train_rows": 12,
            "optimizer_steps": steps, "epochs": 1.0, "train_tokens": None, "train_seconds": 0.5,
            "wall_seconds": 1.0}


# Seed 0's samples go from 0.4 (round 1) to 0.7 (round 2), seed 1's from 0.5 to 0.6: changes 0.3 and 0.1.
ROUNDS = {0: [_round(0, 0.75, 24, None), _round(1, 0.8, 30, 0.4), _round(2, 0.9, 36, 0.7, steps=2)],
          1: [_round(0, 0.75, 24, None, display=False), _round(1, 0.85, 30, 0.5, display=False),
              _round(2, 0.875, 36, 0.6, display=False)]}


def _config(tmp_path: Path, **over) -> ExperimentConfig:
    return resolve_config(ExperimentConfig, overrides={
        "name": "loops", "out": tmp_path / "exp", "task": "sentiment",
        "data": str(write_scripted_reviews(tmp_path / "fb.jsonl")), "eval_prompts": "p.jsonl", "seeds": [0, 1],
        "baseline": "base", "ci_samples": 200, **over})


def _finish(layout: ExperimentLayout, variant: str, seed: int, rounds: list[dict]) -> None:
    """A loop's final model folder as far as the report reads it: run.json and rounds.json."""
    model = layout.stage(variant, seed).model
    atomic_write_json(model / "rounds.json", {"method": LOOP, "rounds": rounds})
    atomic_write_json(model / "run.json", {"stage": "train", "method": LOOP})


def test_loop_rounds_table_summary_and_plot(tmp_path):
    cfg = _config(tmp_path, methods=["base", LOOP],
                  # a one-seed loop: its change has no interval
                  variants=[{"name": "quark-1", "method": "quark", "seeds": [0]}])
    layout = ExperimentLayout(cfg.out)
    for seed, rounds in ROUNDS.items():
        _finish(layout, LOOP, seed, rounds)
    _finish(layout, "quark-1", 0, ROUNDS[1][:2])
    text = write_report(cfg, expand_variants(cfg)).read_text()
    results = json.loads(layout.results_json.read_text())

    rows = results["loop_rounds"]
    assert [(r["variant"], r["seed"], r["round"]) for r in rows] == [
        (LOOP, 0, 0), (LOOP, 0, 1), (LOOP, 0, 2), (LOOP, 1, 0), (LOOP, 1, 1), (LOOP, 1, 2), ("quark-1", 0, 0),
        ("quark-1", 0, 1)]
    # Thresholds in the metric's units where rounds.json has them (seed 0), else its oriented ones, flagged.
    assert [r["top_threshold"] for r in rows[:6]] == [7.5, 8.0, 9.0, 0.75, 0.85, 0.875]
    assert [r["oriented"] for r in rows[:6]] == [False] * 3 + [True] * 3
    assert [r["pool_rows"] for r in rows[:3]] == [24, 30, 36]
    assert [r["mean_sample_score"] for r in rows[3:6]] == [None, 0.5, 0.6]
    assert rows[2]["optimizer_steps"] == 2 and rows[2]["scorer_calls"] == 6 and rows[0]["samples"] == 0
    assert "## Online loop rounds" in text
    assert (f"| {LOOP} | 0 | 2 | 36 | 6 | 0.700 | 9.000 | 0.000 2.500 5.000 9.000 | 3 4 | 2 | 0.5 s | 6 |"
            in text)
    assert f"| {LOOP} | 1 | 0 | 24 | 0 | — | 0.750 | 0.000 0.250 0.500 0.750 (oriented) |" in text  # round 0 samples nothing

    change = {c["variant"]: c for c in results["loop_round_change"]}
    # (0.3 + 0.1) / 2; the bootstrap over two seeds' changes can only reach their extremes.
    assert change[LOOP]["mean_change"] == pytest.approx(0.2) and change[LOOP]["n_seeds"] == 2
    assert change[LOOP]["ci_low"] == pytest.approx(0.1) and change[LOOP]["ci_high"] == pytest.approx(0.3)
    assert (f"- {LOOP}: mean sample score changed by +0.200 from round 1 to the last round, averaged over n = 2 "
            "seeds, 95% bootstrap interval over seeds [0.100, 0.300].") in text
    # quark-1 ran rounds 0 and 1 only: from round 1 to itself, no change, and one seed has no interval.
    assert change["quark-1"]["mean_change"] == 0 and change["quark-1"]["ci_low"] is None
    assert ("- quark-1: mean sample score changed by +0.000 from round 1 to the last round, averaged over n = 1 "
            "seed; no interval with fewer than 2 seeds.") in text

    assert (cfg.out / "loop_rounds.png").stat().st_size > 1000 and "![loop_rounds](loop_rounds.png)" in text
    # The Training table still sums the rounds: 1 + 1 + 2 steps for seed 0, 3 for seed 1.
    facts = {t["variant"]: t for t in results["training"]}
    assert facts[LOOP]["optimizer_steps"] == [4, 3]


def test_report_without_loop_variants_has_no_rounds(tmp_path):
    cfg = _config(tmp_path, methods=["base", "gcsl-bey-nl"])
    text = write_report(cfg, expand_variants(cfg)).read_text()
    results = json.loads(ExperimentLayout(cfg.out).results_json.read_text())
    assert "Online loop rounds" not in text and not (cfg.out / "loop_rounds.png").exists()
    assert not {"loop_rounds", "loop_round_change"} & set(results)
    # The keys every report has are all there.
    assert {"rows", "training", "goal_curves", "curve_statistics", "probe"} <= set(results)
