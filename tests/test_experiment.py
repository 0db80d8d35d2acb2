"""`gcsl experiment` end to end on a tiny random model: stages, caching, report, plots, configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from gcsl.config import resolve_config
from gcsl.experiments.report import write_report
from gcsl.experiments.runner import ExperimentConfig, expand_variants, run_experiment

REPO = Path(__file__).resolve().parent.parent


def _feedback(path: Path) -> Path:
    words = ["awful", "bad", "dull", "fine", "good", "great", "wonderful", "terrible"]
    rows = []
    for i in range(24):
        w = words[i % len(words)]
        rows.append({"prompt": [{"role": "user", "content": f"Review movie {i % 12}."}],
                     "response": f"A {w} film.", "score": (i % 8) / 7})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"t{i}", "prompt": [{"role": "user", "content": f"Review film {i}."}]})
                            + "\n" for i in range(4)))
    return path


def test_experiment_runs_caches_and_reports(tmp_path, tiny_llama_dir):
    cfg = resolve_config(ExperimentConfig, overrides={
        "name": "tiny", "out": tmp_path / "exp", "task": "sentiment", "data": str(_feedback(tmp_path / "fb.jsonl")),
        "eval_prompts": str(_prompts(tmp_path / "p.jsonl")), "model": str(tiny_llama_dir),
        "methods": ["base", "sft", "gcsl-bey-nl"], "seeds": [0, 1], "baseline": "sft",
        "method_seeds": {"base": [1]},
        "goal_curve": ["scale:1.1"], "prepare": {"score_range": [0, 1], "bins": 4},
        "train": {"max_steps": 2, "per_device_batch_size": 4, "report_to": "none", "save_steps": 1},
        "generate": {"max_new_tokens": 4, "batch_size": 4}, "ci_samples": 200,
    })
    report = run_experiment(cfg)
    text = report.read_text()
    assert "| gcsl-bey-nl | 0 1 | 4 |" in text and "(baseline)" in text
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert {r["variant"] for r in results["rows"]} == {"base", "sft", "gcsl-bey-nl"}
    # A one-seed variant is compared with the baseline's same seed only.
    rows = {r["variant"]: r for r in results["rows"]}
    assert rows["base"]["compared_seeds"] == "1" and rows["gcsl-bey-nl"]["compared_seeds"] == "0 1"
    assert "diff_vs_baseline" in rows["base"]
    assert results["beyond_check"] and "top_training_bin_mean" in results["beyond_check"][0]
    for png in ("methods.png", "goal_curve.png", "training_scores.png"):
        assert (tmp_path / "exp" / png).stat().st_size > 1000
    run = tmp_path / "exp" / "runs" / "gcsl-bey-nl" / "seed1"
    assert (run / "model" / "run.json").exists() and (run / "metrics-scale_1.1.json").exists()
    # A re-run skips every finished stage: nothing is rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "exp" / "runs").rglob("*") if p.is_file()}
    run_experiment(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # An interrupted evaluation is redone: remove one metrics file and it comes back.
    (run / "metrics-top.json").unlink()
    run_experiment(cfg)
    assert (run / "metrics-top.json").exists()
    # The beyond check only compares like with like: a share above a threshold is not the feedback's scale.
    other = dataclasses.replace(cfg, primary_metric="above_threshold")
    text = write_report(other, expand_variants(other)).read_text()
    assert "## Beyond" not in text and "not applicable here; `above_threshold`" in text
    assert json.loads((tmp_path / "exp" / "results.json").read_text())["beyond_check"] == []


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
