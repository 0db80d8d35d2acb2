"""Online RL baselines (gcsl.training.online): GRPO and RLOO through TRL on a tiny model, rewarded by the task's scorer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gcsl.config import resolve_config
from gcsl.errors import ConfigError
from gcsl.experiments.runner import ExperimentConfig, run_experiment
from gcsl.methods import get_method, trained_methods
from gcsl.stages import ModelFolder
from gcsl.tasks.base import score_generations
from gcsl.training.online import OnlineConfig, task_reward, train_online


def _log(path: Path, prompts: int = 4) -> Path:
    """Two rows per prompt: the online methods read the distinct prompts only."""
    rows = [{"prompt": [{"role": "user", "content": f"Review movie {i % prompts}."}], "response": "A film.",
             "score": (i % 5) / 4} for i in range(2 * prompts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_online_methods_in_the_table():
    for name, algorithm in (("grpo", "grpo"), ("rloo", "rloo")):
        method = get_method(name)
        assert method.variant_kind == "online" and method.online == algorithm
        assert not method.trainable and not method.is_goal_conditioned and name not in trained_methods()


@pytest.mark.parametrize("direction", ["positive", "negative"])
def test_reward_is_the_sentiment_evaluators_score(direction):
    from gcsl.scorers import VaderScorer
    from gcsl.tasks.sentiment import NEUTRAL_SCORE

    texts = ["A wonderful, moving film.", "Dreadful and boring.", "", "It is a film."]
    rewards = task_reward("sentiment", {"direction": direction})(texts)
    items = score_generations([{"prompt_id": i, "completion": t} for i, t in enumerate(texts)],
                              VaderScorer(direction))
    assert rewards == [NEUTRAL_SCORE if it["score"] is None else it["score"] for it in items]
    assert rewards[2] == NEUTRAL_SCORE  # an empty completion: neutral, as the evaluator scores it
    # The configured direction decides which review is rewarded.
    assert (rewards[0] > rewards[1]) == (direction == "positive")


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_train_online_writes_a_loadable_model_folder_and_counts_its_compute(tmp_path, tiny_llama_dir, algorithm,
                                                                            one_torch_thread):
    from gcsl.models import load_for_inference

    out = tmp_path / algorithm
    cfg = resolve_config(OnlineConfig, overrides={
        "data": str(_log(tmp_path / "fb.jsonl", prompts=3)), "out": out, "model": str(tiny_llama_dir),
        "max_steps": 2, "num_generations": 2, "per_device_batch_size": 4, "max_completion_length": 3,
        "task_options": {"direction": "negative"}, "seed": 1})
    assert train_online(cfg, algorithm) == out
    assert ModelFolder(out).state == "complete" and not ModelFolder(out).partial.exists()
    assert ModelFolder(out).goal_setup() is None  # goal-free: generate reads it like the base model
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "train_metrics.json"):
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["method"] == algorithm
    # TRL's batch is completions: 4 per step = 2 prompts x 2 generations, one step per sampled batch.
    assert run["optimizer_steps"] == 2 and run["prompts_per_step"] == 2 and run["num_generations"] == 2
    assert run["completions_sampled"] == 2 * 2 * 2 == run["scorer_calls"] == run["train_rows"]
    assert run["reward_batches"] == 2 and run["train_prompts"] == 3 and run["train_seconds"] > 0
    assert run["beta"] == {"grpo": 0.0, "rloo": 0.05}[algorithm]  # TRL's defaults
    lm = load_for_inference(str(out), device="cpu")
    assert not lm.model.training
    # A finished folder is not overwritten by accident.
    with pytest.raises(Exception, match="exists and is not empty"):
        train_online(cfg, algorithm)


def test_toxicity_reward_is_non_toxicity_and_neutral_when_unscorable():
    # profanity-check, the offline default scorer: reward = 1 - toxicity, an empty completion 0.5
    clean, rude, empty = task_reward("toxicity")(["What a lovely afternoon.", "shut up, you fucking idiot", ""])
    assert clean > 0.9 and rude < 0.01 and empty == 0.5


def test_online_methods_need_a_task_scorer(tmp_path):
    with pytest.raises(ConfigError, match=r"online methods \(grpo, rloo\) need a scorer") as exc:
        resolve_config(ExperimentConfig, overrides={
            "name": "x", "out": tmp_path / "exp", "task": "code", "data": "d", "eval_prompts": "p",
            "methods": ["base", "grpo"], "baseline": "base", "primary_metric": "beyond@1"})
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="need a scorer for that task"):
        task_reward("code")
    with pytest.raises(ConfigError, match="online.epoch: unknown option of OnlineConfig"):
        resolve_config(ExperimentConfig, overrides={
            "name": "x", "out": tmp_path / "exp", "task": "sentiment", "data": "d", "eval_prompts": "p",
            "methods": ["grpo"], "baseline": "grpo", "online": {"epoch": 1}})
    with pytest.raises(ConfigError, match="not a multiple of num_generations"):
        resolve_config(OnlineConfig, overrides={"data": "d", "out": tmp_path / "o", "num_generations": 3})


def test_experiment_with_an_online_method_trains_once_and_reports_it(tmp_path, tiny_llama_dir, monkeypatch,
                                                                      one_torch_thread):
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"Review film {i}."}) + "\n" for i in range(2)))
    cfg = resolve_config(ExperimentConfig, overrides={
        "name": "tiny", "out": tmp_path / "exp", "task": "sentiment", "data": str(_log(tmp_path / "fb.jsonl")),
        "eval_prompts": str(prompts), "model": str(tiny_llama_dir), "methods": ["base", "grpo"], "seeds": [0],
        "baseline": "base", "evaluate": {"direction": "negative"},
        "train": {"lora_r": 4, "max_steps": 99},  # LoRA options pass on; sft's run length does not
        "online": {"max_steps": 1, "num_generations": 2, "per_device_batch_size": 4, "max_completion_length": 3},
        "generate": {"max_new_tokens": 3, "batch_size": 2}, "ci_samples": 50,
    })
    text = run_experiment(cfg).read_text()
    model = tmp_path / "exp" / "runs" / "grpo" / "seed0" / "model"
    run = json.loads((model / "run.json").read_text())
    assert run["config"]["lora_r"] == 4 and run["config"]["task_options"] == {"direction": "negative"}
    assert run["optimizer_steps"] == 1 and run["completions_sampled"] == 4 and run["train_prompts"] == 4
    assert "| grpo | 0 |" in text and "## Training" in text and "Online variants (grpo)" in text
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert {r["variant"] for r in results["rows"]} == {"base", "grpo"}
    facts = {t["variant"]: t for t in results["training"]}
    assert facts["grpo"]["optimizer_steps"] == [1] and facts["grpo"]["train_rows"] == [4]
    assert facts["grpo"]["rows_per_step"] == [4] and facts["grpo"]["train_seconds"][0] > 0
    # Cached: a re-run does not train again.
    stamp = (model / "run.json").stat().st_mtime_ns
    run_experiment(cfg)
    assert (model / "run.json").stat().st_mtime_ns == stamp
