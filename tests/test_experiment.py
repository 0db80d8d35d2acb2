"""`gcsl experiment` end to end on a tiny random model: stages, caching, report, plots, configs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import write_scripted_reviews
from gcsl.config import resolve_config
from gcsl.data.prepare import PrepareConfig, prepare
from gcsl.errors import ConfigError, StageError
from gcsl.experiments.layout import ExperimentLayout
from gcsl.experiments.report import curve_statistics, write_report
from gcsl.experiments.runner import (
    ExperimentConfig,
    expand_variants,
    held_out_prompts,
    run_experiment,
    split_validation,
)

REPO = Path(__file__).resolve().parent.parent


def _prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"t{i}", "prompt": [{"role": "user", "content": f"Review film {i}."}]})
                            + "\n" for i in range(4)))
    return path


def test_experiment_runs_caches_and_reports(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the report names files relative to where the experiment ran
    cfg = resolve_config(ExperimentConfig, overrides={
        "name": "tiny", "out": tmp_path / "exp", "task": "sentiment", "data": str(write_scripted_reviews(tmp_path / "fb.jsonl")),
        "eval_prompts": str(_prompts(tmp_path / "p.jsonl")), "model": str(tiny_llama_dir),
        "methods": ["base", "sft", "gcsl-bey-nl"], "seeds": [0, 1], "baseline": "sft",
        "method_seeds": {"base": [1]},
        # the list form for gcsl-bey-nl; a per-variant curve over every trained level for the
        # unfiltered variant, whose name needs a slug on disk
        "goal_curve": ["scale:1.1"], "goal_curves": {"gcsl-bey-nl[filter=False]": ["trained", "scale:1.1"]},
        "variants": [{"name": "gcsl-bey-nl[filter=False]", "method": "gcsl-bey-nl", "prepare": {"filter": False},
                      "seeds": [0]}],
        # a sweep variant; two bins keep one goal, so the probe has nothing to compare it with
        "sweeps": [{"method": "gcsl-bey-nl", "option": "prepare.bins", "values": [2], "seeds": [0]}],
        "check_metrics": ["mean_score_textblob"], "validation_prompts": 3,
        "comparisons": [["gcsl-bey-nl", "sft"], ["gcsl-bey-nl", "base"]],
        "prepare": {"score_range": [0, 1], "bins": 4},
        "train": {"max_steps": 2, "per_device_batch_size": 4, "report_to": "none", "save_steps": 1},
        "generate": {"max_new_tokens": 4, "batch_size": 4}, "ci_samples": 200,
    })
    report = run_experiment(cfg)
    text = report.read_text()
    assert "| gcsl-bey-nl | 0 1 | 4 |" in text and "(baseline)" in text
    exp = tmp_path / "exp"
    # Training never saw the 3 validation prompts: 3 x 2 rows held out of 24.
    val = [json.loads(x) for x in (exp / "validation.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (exp / "train_feedback.jsonl").read_text().splitlines()]
    assert len(val) == 6 and len(train) == 18
    prepared = ExperimentLayout(exp).stage("gcsl-bey-nl").prepared
    assert json.loads((prepared / "run.json").read_text())["config"]["data"] == str(exp / "train_feedback.jsonl")
    # Every row and curve point carries both scorers.
    results = json.loads((exp / "results.json").read_text())
    for row in results["rows"]:
        assert 0 <= row["mean"] <= 1 and 0 <= row["mean_score_textblob_mean"] <= 1
    assert {r["variant"] for r in results["check_rows"]["mean_score_textblob"]} == {r["variant"] for r in results["rows"]}
    assert "### Check metric `mean_score_textblob`" in text
    # The unfiltered variant's curve: all 4 trained levels then the scaled top, in requested order.
    stats = results["curve_statistics"]["gcsl-bey-nl[filter=False]"]
    assert stats["mean_score"]["goals"] == ["level:1", "level:2", "level:3", "level:4", "scale:1.1"]
    assert stats["mean_score_textblob"]["n_goals"] == 5
    assert stats["mean_score"]["top_goal"] == "scale:1.1" and stats["mean_score"]["bottom_goal"] == "level:1"
    point = results["goal_curves"]["gcsl-bey-nl[filter=False]"]["level:1"]
    assert point["n_units"] == 4 and "mean_score_textblob" in point["check"]
    # Per-item generations and both scores are kept beside the report, for the slugged name too.
    items = [json.loads(x) for x in (exp / "items" / "gcsl-bey-nl_filter_False" / "seed0" / "level_1.jsonl")
             .read_text().splitlines()]
    assert len(items) == 4 and {"prompt_id", "completion", "score", "score_textblob"} <= set(items[0])
    assert (exp / "items" / "base" / "seed1" / "top.jsonl").exists()
    # level:4 is the top goal of the unfiltered variant: its samples are reused, relabelled, not redrawn.
    run0 = exp / "runs" / "gcsl-bey-nl_filter_False" / "seed0"
    top, level4 = ([json.loads(x) for x in (run0 / f"gens-{g}.jsonl").read_text().splitlines()]
                   for g in ("top", "level_4"))
    assert [r["completion"] for r in level4] == [r["completion"] for r in top]
    assert {r["goal_request"] for r in level4} == {"level:4"} and {r["goal_request"] for r in top} == {"top"}
    # Training facts: rows of the variant's own prepared data, the 2 steps it ran.
    facts = {t["variant"]: t for t in results["training"]}
    assert "base" not in facts and facts["sft"]["seeds"] == [0, 1]
    assert facts["gcsl-bey-nl"]["train_rows"] == [pq.read_metadata(prepared / "train.parquet").num_rows] * 2
    assert facts["gcsl-bey-nl"]["optimizer_steps"] == [2, 2] and all(t > 0 for t in facts["sft"]["train_seconds"])
    assert "## Training" in text and "| gcsl-bey-nl[filter=False] | 0 |" in text
    assert any(b["variant"] == "gcsl-bey-nl[filter=False]" for b in results["beyond_check"])
    assert (exp / "probe" / "gcsl-bey-nl" / "seed0" / "probe.json").exists()
    assert "## Goal sensitivity" in text and not (exp / "probe" / "sft").exists()
    # The slugged variant is in every section of the report: results, training, beyond, curves, probe.
    assert "| gcsl-bey-nl[filter=False] | 0 | 6 |" in text
    assert {p["variant"] for p in results["probe"]} == {"gcsl-bey-nl", "gcsl-bey-nl[filter=False]"}
    # Pooled over seeds: the point estimates are linear in each row's gain, so they are the seeds' means.
    pooled = {p["variant"]: p for p in results["probe_pooled"]}
    per_seed = [p for p in results["probe"] if p["variant"] == "gcsl-bey-nl"]
    assert set(pooled) == {"gcsl-bey-nl"} and pooled["gcsl-bey-nl"]["seeds"] == [0, 1] and len(per_seed) == 2
    for key in ("sensitivity", "trend"):
        assert pooled["gcsl-bey-nl"][key] == pytest.approx(sum(p[key] for p in per_seed) / 2)
    assert "| gcsl-bey-nl | 0 1 (pooled) |" in text
    # The sweep variant is in the results, training and beyond sections; trained on one goal, it is
    # not probed (and the run goes on).
    assert ExperimentLayout(exp).goal_setup("gcsl-bey-nl[bins=2]").trained_levels == (2,)
    assert "| gcsl-bey-nl[bins=2] | 0 |" in text and "gcsl-bey-nl[bins=2]" in facts
    assert any(b["variant"] == "gcsl-bey-nl[bins=2]" for b in results["beyond_check"])
    assert not (exp / "probe" / "gcsl-bey-nl_bins_2").exists()
    # Files are named relative to where the experiment ran, never by this machine's absolute paths.
    assert "training feedback `fb.jsonl`" in text and str(tmp_path) not in text
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert {r["variant"] for r in results["rows"]} == {"base", "sft", "gcsl-bey-nl", "gcsl-bey-nl[filter=False]",
                                                       "gcsl-bey-nl[bins=2]"}
    # A one-seed variant is compared with the baseline's same seed only.
    rows = {r["variant"]: r for r in results["rows"]}
    assert rows["base"]["compared_seeds"] == "1" and rows["gcsl-bey-nl"]["compared_seeds"] == "0 1"
    assert "diff_vs_baseline" in rows["base"]
    # Holm over the table's four comparisons with the baseline: the smallest bootstrap p times 4, and so on, each at
    # least the one before; the baseline has none.
    compared = sorted((r for r in rows.values() if "bootstrap_p" in r), key=lambda r: r["bootstrap_p"])
    assert len(compared) == 4 and "holm_p" not in rows["sft"]
    assert compared[0]["holm_p"] == pytest.approx(min(1.0, 4 * compared[0]["bootstrap_p"]))
    assert all(r["holm_p"] >= r["bootstrap_p"] for r in compared)
    assert [r["holm_p"] for r in compared] == sorted(r["holm_p"] for r in compared)
    assert "mean_score_textblob_holm_p" in rows["base"] and "| Holm p |" in text
    # Further comparisons: a minus b over the seeds both have, under both scorers; against the baseline it is the
    # results row's difference, against the one-seed base model its seed's difference of means.
    pairs = {(c["against"], c["metric"]): c for c in results["comparisons"]}
    assert len(pairs) == 4 and "## Further comparisons" in text
    assert pairs["sft", "mean_score"]["diff"] == pytest.approx(rows["gcsl-bey-nl"]["diff_vs_baseline"])
    assert pairs["sft", "mean_score_textblob"]["low"] == pytest.approx(
        rows["gcsl-bey-nl"]["mean_score_textblob_diff_low"])
    curve = results["goal_curves"]
    assert pairs["base", "mean_score"]["seeds"] == "1" and pairs["base", "mean_score"]["diff"] == pytest.approx(
        curve["gcsl-bey-nl"]["top"]["per_seed"]["1"] - curve["base"]["top"]["per_seed"]["1"])
    assert results["beyond_check"] and "top_training_bin_mean" in results["beyond_check"][0]
    for png in ("methods.png", "goal_curve.png", "training_scores.png"):
        assert (tmp_path / "exp" / png).stat().st_size > 1000
    run = tmp_path / "exp" / "runs" / "gcsl-bey-nl" / "seed1"
    assert (run / "model" / "run.json").exists() and (run / "metrics-scale_1.1.json").exists()
    # A re-run skips every finished stage: nothing is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "exp").rglob("*") if p.is_file()
              and p.parent.name != "exp" or p.suffix == ".jsonl"}
    run_experiment(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # An interrupted evaluation is redone: remove one metrics file and it comes back.
    (run / "metrics-top.json").unlink()
    run_experiment(cfg)
    assert (run / "metrics-top.json").exists()
    # A finished model stands only for the settings it trained with: with another learning rate the run stops at
    # the first finished model and names the difference, rather than evaluating the old model as the new setting.
    (run / "metrics-top.json").unlink()
    changed = dataclasses.replace(cfg, train={**cfg.train, "learning_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"runs/sft/seed0/model: trained with other settings \(learning_rate "
                                          r"0\.0001 -> 0\.001\); remove the folder"):
        run_experiment(changed)
    run_experiment(cfg)
    assert (run / "metrics-top.json").exists()
    # The beyond check only compares like with like: a share above a threshold is not the feedback's scale.
    other = dataclasses.replace(cfg, primary_metric="above_threshold")
    text = write_report(other, expand_variants(other)).read_text()
    assert "## Beyond" not in text and "not applicable here; `above_threshold`" in text
    assert json.loads((tmp_path / "exp" / "results.json").read_text())["beyond_check"] == []
    # The committed folder alone (a clone without runs/) writes the same report and runs nothing: records/ keeps
    # every evaluation, training record and prepared goals file the report reads, and no adapter.
    run_experiment(cfg)
    before = json.loads((exp / "results.json").read_text())
    records = exp / "records"
    assert (records / "gcsl-bey-nl" / "seed1" / "model" / "train_metrics.json").is_file()
    assert (records / "gcsl-bey-nl_filter_False" / "prepared" / "goals.json").is_file()
    assert not list(records.rglob("*.safetensors")) and not list(records.rglob("checkpoint-*"))
    shutil.rmtree(exp / "runs")
    run_experiment(cfg)
    assert not (exp / "runs").exists()
    assert json.loads((exp / "results.json").read_text()) == before
    # --report-only with a seed not finished: the report leaves it out and says so, where a plain run would train it.
    shutil.rmtree(records / "gcsl-bey-nl" / "seed1")
    text = run_experiment(dataclasses.replace(cfg, report_only=True)).read_text()
    assert not (exp / "runs").exists()
    assert "| gcsl-bey-nl | 0 | 4 |" in text and "| gcsl-bey-nl | 0 1 |" not in text
    # With nothing recorded it stops rather than replace the report with an empty one.
    shutil.rmtree(records)
    kept = (exp / "experiment.json").read_text()
    with pytest.raises(StageError, match="no variant has every evaluation recorded"):
        run_experiment(dataclasses.replace(cfg, report_only=True))
    assert "| gcsl-bey-nl | 0 | 4 |" in (exp / "report.md").read_text()
    assert (exp / "experiment.json").read_text() == kept


def test_sweeps_and_variants_expand():
    cfg = resolve_config(ExperimentConfig, overrides={
        "name": "x", "out": "o", "task": "sentiment", "data": "d", "eval_prompts": "p", "methods": ["sft"],
        "sweeps": [{"method": "sft", "option": "prepare.sft_top", "values": [0.1, 0.6]}],
        "variants": [{"name": "bey-nl-nofilter", "method": "gcsl-bey-nl", "prepare": {"filter": False}}],
        "method_seeds": {"sft": [0]}})
    names = {v.name: v for v in expand_variants(cfg)}
    assert set(names) == {"sft", "sft[sft_top=0.1]", "sft[sft_top=0.6]", "bey-nl-nofilter"}
    assert names["sft[sft_top=0.6]"].prepare == {"sft_top": 0.6}
    assert names["sft"].seeds == [0] and names["bey-nl-nofilter"].seeds == [0, 1, 2]
    with pytest.raises(ConfigError, match="comparisons: sft-typo name"):
        expand_variants(dataclasses.replace(cfg, comparisons=[["sft", "sft-typo"]]))
    # --only takes names separated by spaces: a comma-joined one names no variant and is refused, not run as nothing
    with pytest.raises(ConfigError, match=r"only: sft,bey-nl-nofilter name\(s\) no variant .*separated by spaces"):
        expand_variants(dataclasses.replace(cfg, only=["sft,bey-nl-nofilter"]))
    assert len(expand_variants(dataclasses.replace(cfg, only=["sft[sft_top=0.1]", "bey-nl-nofilter"]))) == 4
    assert dataclasses.replace(cfg, comparisons=[["sft"], "sft"]).validate() == [
        "comparisons: ['sft'] is not a pair [variant, variant it is compared with]",
        "comparisons: 'sft' is not a pair [variant, variant it is compared with]"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")) + [
    REPO / "src" / "gcsl" / "resources" / "quickstart.yaml"], ids=lambda p: p.name)
def test_every_shipped_experiment_config_validates(path):
    data = yaml.safe_load(path.read_text())
    if "methods" not in data and "task" not in data:
        pytest.skip("not an experiment config")
    data.setdefault("out", "o")
    data.setdefault("data", "d")
    data.setdefault("eval_prompts", "p")
    cfg = resolve_config(ExperimentConfig, overrides=data)
    assert expand_variants(cfg)


def _curve_point(mean: float, per_seed_units: dict[int, dict[str, float]]) -> dict:
    return {"mean": mean, "seeds": sorted(per_seed_units), "per_seed_units": per_seed_units}


def test_curve_statistics_known_answers():
    # Given out of order on purpose: goals are ranked by what they request.
    points = {
        "high": _curve_point(0.7, {0: {"p1": 0.8, "p2": 0.6}, 1: {"p1": 0.6, "p2": 0.8}, 2: {"p1": 0.0, "p2": 0.0}}),
        "low": _curve_point(0.3, {0: {"p1": 0.2, "p2": 0.4}, 1: {"p1": 0.2, "p2": 0.4}}),
        "mid": _curve_point(0.5, {0: {"p1": 0.5, "p2": 0.5}, 1: {"p1": 0.5, "p2": 0.5}}),
    }
    st = curve_statistics(points, {"high": 0.9, "low": 0.1, "mid": 0.5}, n_boot=500)
    assert st["goals"] == ["low", "mid", "high"] and st["spearman_rho"] == pytest.approx(1.0)
    # Seed 2 exists only at the top goal, so it is left out of the pairing: per prompt
    # (0.7 - 0.2, 0.7 - 0.4) -> mean 0.4. A resample of the 2 prompts draws the 0.3 pair twice a
    # quarter of the time, so the 2.5% and 97.5% quantiles are exactly 0.3 and 0.5.
    assert st["top_minus_bottom"] == pytest.approx(0.4) and st["seeds"] == [0, 1] and st["n_units"] == 2
    assert (st["diff_low"], st["diff_high"]) == pytest.approx((0.3, 0.5))
    # Achieved order mid > high > low over requested low < mid < high: rho = 1 - 6 * 2 / (3 * 8) = 0.5.
    swapped = {**points, "mid": _curve_point(0.9, points["mid"]["per_seed_units"])}
    assert curve_statistics(swapped, {"low": 0.1, "mid": 0.5, "high": 0.9}, n_boot=50)["spearman_rho"] == 0.5
    # Unknown requested values: the configured order stands; a flat curve has no rho.
    flat = {g: _curve_point(0.5, p["per_seed_units"]) for g, p in points.items()}
    st = curve_statistics(flat, {"high": None, "low": None, "mid": None}, n_boot=50)
    assert st["goals"] == ["high", "low", "mid"] and st["spearman_rho"] is None
    assert st["top_goal"] == "mid" and st["bottom_goal"] == "high"


def test_a_moved_experiment_keeps_its_own_split_and_refuses_another_log(tmp_path):
    from gcsl.experiments.runner import _check_prepared_data

    cfg = resolve_config(ExperimentConfig, overrides={"name": "x", "out": tmp_path / "new", "task": "sentiment",
                                                      "data": "fb.jsonl", "eval_prompts": "p", "validation_prompts": 3})
    prepared = tmp_path / "new" / "runs" / "sft" / "prepared"
    prepared.mkdir(parents=True)

    def made_from(data: str, out: str) -> None:
        (prepared / "run.json").write_text(json.dumps({"config": {"data": data, "out": out}}))

    # prepared in the folder's old place, from that folder's own training split: the same data
    made_from("/old/exp/train_feedback.jsonl", "/old/exp/runs/sft/prepared")
    _check_prepared_data(cfg, prepared)
    # from another folder's split, or from the whole log (validation prompts included): refused
    for data in ("/other/train_feedback.jsonl", "fb.jsonl"):
        made_from(data, "/old/exp/runs/sft/prepared")
        with pytest.raises(ConfigError, match="prepared from .* but this experiment trains on"):
            _check_prepared_data(cfg, prepared)


def test_validation_split_is_deterministic_and_disjoint(tmp_path):
    prompts = [f"prompt {i}" for i in range(10)]
    by_hash = sorted(prompts, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    assert held_out_prompts(prompts, 3) == set(by_hash[:3]) == held_out_prompts(reversed(prompts * 2), 3)
    with pytest.raises(ConfigError, match="all 10 distinct"):
        held_out_prompts(prompts, 10)

    data = write_scripted_reviews(tmp_path / "fb.jsonl")
    over = {"name": "x", "out": tmp_path / "exp", "task": "sentiment", "data": str(data), "eval_prompts": "p",
            "validation_prompts": 4}
    cfg = resolve_config(ExperimentConfig, overrides=over)
    train_path, val_path = split_validation(cfg)
    train = [json.loads(x) for x in train_path.read_text().splitlines()]
    val = [json.loads(x) for x in val_path.read_text().splitlines()]
    key = json.dumps
    assert len({key(r["prompt"]) for r in val}) == 4 and not {key(r["prompt"]) for r in val} & {
        key(r["prompt"]) for r in train}
    original = [json.loads(x) for x in data.read_text().splitlines()]
    assert sorted(map(key, train + val)) == sorted(map(key, original))  # every row, columns as logged
    # Independent of any seed, and a re-run leaves the files as they were.
    stamp = train_path.stat().st_mtime_ns
    split_validation(dataclasses.replace(cfg, seeds=[7]))
    assert train_path.stat().st_mtime_ns == stamp
    # Once a variant is prepared, the split may not move under it.
    (tmp_path / "exp" / "runs" / "sft" / "prepared").mkdir(parents=True)
    (tmp_path / "exp" / "runs" / "sft" / "prepared" / "goals.json").write_text("{}")
    with pytest.raises(ConfigError, match="validation split differs"):
        split_validation(dataclasses.replace(cfg, validation_prompts=5))
    # Nor under a finished model trained without a prepare stage (an online method's).
    (tmp_path / "exp" / "runs" / "sft" / "prepared" / "goals.json").unlink()
    split_validation(cfg)
    (tmp_path / "exp" / "runs" / "grpo" / "seed0" / "model").mkdir(parents=True)
    (tmp_path / "exp" / "runs" / "grpo" / "seed0" / "model" / "run.json").write_text("{}")
    with pytest.raises(ConfigError, match="validation split differs"):
        split_validation(dataclasses.replace(cfg, validation_prompts=5))


def test_trained_goal_curves_expand_from_prepared_goals(tmp_path):
    data = write_scripted_reviews(tmp_path / "fb.jsonl")
    cfg = resolve_config(ExperimentConfig, overrides={
        "name": "x", "out": tmp_path / "exp", "task": "sentiment", "data": str(data), "eval_prompts": "p",
        "methods": ["gcsl", "gcsl-bey-nl"], "goal_curves": {"gcsl": ["level:1", "level:4"],
                                                           "gcsl-bey-nl": ["trained", "scale:1.1"]},
        "variants": [{"name": "bey-all", "method": "gcsl-bey-nl", "prepare": {"filter": False}}]})
    variants = {v.name: v for v in expand_variants(cfg)}
    # The unfiltered variant inherits its method's curve; before prepare `trained` has no levels yet.
    assert variants["bey-all"].curve == ["trained", "scale:1.1"]
    assert ExperimentLayout(cfg.out).variant_goals(variants["bey-all"]) == ["top", "scale:1.1"]
    for v in variants.values():
        prepare(resolve_config(PrepareConfig, overrides={
            "data": str(data), "method": v.method, "score_range": [0, 1], "bins": 4, **v.prepare, "quiet": True,
            "out": ExperimentLayout(cfg.out).stage(v.name).prepared}))
    # Scores (i % 8) / 7 in 4 equal bins: thresholds 0, 2/7, 4/7, 6/7 and mean 0.5, so filtering keeps 3 and 4.
    assert ExperimentLayout(cfg.out).curve_goals(variants["gcsl-bey-nl"]) == ["level:3", "level:4", "scale:1.1"]
    assert ExperimentLayout(cfg.out).curve_goals(variants["bey-all"]) == ["level:1", "level:2", "level:3", "level:4", "scale:1.1"]
    assert ExperimentLayout(cfg.out).variant_goals(variants["gcsl"]) == ["top", "level:1", "level:4"]


def test_goal_curve_config_forms_and_errors():
    base = {"name": "x", "out": "o", "task": "sentiment", "data": "d", "eval_prompts": "p",
            "methods": ["sft", "gcsl-bey-nl"]}
    old = {v.name: v for v in expand_variants(resolve_config(ExperimentConfig, overrides={
        **base, "goal_curve": ["0.3", "scale:1.2"]}))}
    assert old["gcsl-bey-nl"].goals == ["top", "0.3", "scale:1.2"] == old["gcsl-bey-nl"].curve
    assert old["sft"].goals == ["top"] and old["sft"].curve == []
    with pytest.raises(ConfigError, match=r"goal_curves.gcsl-bey-nl: goal 'level:x'"):
        resolve_config(ExperimentConfig, overrides={**base, "goal_curves": {"gcsl-bey-nl": ["level:x"]}})
    with pytest.raises(ConfigError, match="validation_prompts: must be >= 0"):
        resolve_config(ExperimentConfig, overrides={**base, "validation_prompts": -1})
    with pytest.raises(ConfigError, match="goal_curves: gcsl-nl name"):
        expand_variants(resolve_config(ExperimentConfig, overrides={**base, "goal_curves": {"gcsl-nl": ["top"]}}))
    # The task and its metrics come from the task registry, checked before any training.
    with pytest.raises(ConfigError, match=r"primary_metric: task sentiment does not report 'beyond@1'; choose one of "
                                          r"mean_score, mean_score_textblob"):
        resolve_config(ExperimentConfig, overrides={**base, "primary_metric": "beyond@1"})
    with pytest.raises(ConfigError, match=r"check_metrics: task code does not report 'mean_score'"):
        resolve_config(ExperimentConfig, overrides={**base, "task": "code", "primary_metric": "beyond@1",
                                                    "check_metrics": ["pass@5", "mean_score"]})
    with pytest.raises(ConfigError, match=r"task: 'poetry' is not one of toxicity, sentiment"):
        resolve_config(ExperimentConfig, overrides={**base, "task": "poetry"})


def test_quickstart_settings_on_a_tiny_model_print_low_high_difference_and_probe(tmp_path, tiny_llama_dir, capsys):
    """The shipped quickstart settings, with a tiny model and data: the summary it prints holds together."""
    from gcsl.config import load_yaml
    from gcsl.experiments.quickstart import _summarise, resource_path

    settings = load_yaml(resource_path("quickstart.yaml"))
    method = next(m for m in settings["methods"] if m != "base")
    settings["prepare"] = {**settings["prepare"], "bins": 4,
                           "level_words": settings["prepare"]["level_words"][1:]}  # 4 bins here
    settings["goal_curves"] = {method: ["level:1", "level:4"]}
    cfg = resolve_config(ExperimentConfig, overrides={
        **settings, "out": tmp_path / "qs", "data": str(write_scripted_reviews(tmp_path / "fb.jsonl")),
        "eval_prompts": str(_prompts(tmp_path / "p.jsonl")), "model": str(tiny_llama_dir), "validation_prompts": 3,
        "train": {**settings["train"], "epochs": 1, "per_device_batch_size": 8, "report_to": "none"},
        "generate": {**settings["generate"], "max_new_tokens": 4}, "ci_samples": 200, "probe": {"ci_samples": 100}})
    run_experiment(cfg)
    summary = _summarise(tmp_path / "qs", method)
    printed = capsys.readouterr().out
    goals = json.loads((ExperimentLayout(cfg.out).stage(method).prepared / "goals.json").read_text())
    assert goals["level_words"] == ["positive", "mildly positive", "mixed", "negative"]
    assert "that is negative (a negative sentiment score between" in goals["inference_goal"]["text"]
    stats = summary["statistics"]
    assert stats["bottom_goal"] == "level:1" and stats["top_goal"] == "level:4"
    assert stats["top_minus_bottom"] == pytest.approx(summary["high"]["mean"] - summary["low"]["mean"], abs=1e-9)
    assert f"high minus low goal      {stats['top_minus_bottom']:+.3f}" in printed
    assert "Goal sensitivity probe on 6 held-out feedback rows" in printed and "TextBlob" in printed
    assert f"Report: {tmp_path / 'qs' / 'report.md'}" in printed


def test_a_run_that_died_before_its_first_checkpoint_starts_over(tmp_path, tiny_llama_dir):
    cfg = resolve_config(ExperimentConfig, overrides={
        "name": "tiny", "out": tmp_path / "exp", "task": "sentiment", "data": str(write_scripted_reviews(tmp_path / "fb.jsonl")),
        "eval_prompts": str(_prompts(tmp_path / "p.jsonl")), "model": str(tiny_llama_dir), "methods": ["sft"],
        "seeds": [0], "baseline": "sft", "prepare": {"score_range": [0, 1]},
        "train": {"max_steps": 1, "per_device_batch_size": 4, "report_to": "none"},
        "generate": {"max_new_tokens": 2, "batch_size": 4}, "ci_samples": 50})
    model = ExperimentLayout(cfg.out).stage("sft").model
    partial = model.with_name("model.partial")
    (partial / "checkpoints").mkdir(parents=True)  # killed before any checkpoint was whole
    run_experiment(cfg)
    assert (model / "run.json").is_file() and not partial.exists()
