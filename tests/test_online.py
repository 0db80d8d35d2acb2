"""Online RL baselines (gcsl.training.online): GRPO and RLOO through TRL on a tiny model, rewarded by the task's scorer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gcsl.config import resolve_config
from gcsl.errors import ConfigError, StageError
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


class _Interrupt(Exception):
    pass


def _stop_after_saving(step: int):
    """A real callback that kills the run right after the checkpoint of ``step`` is written."""
    from transformers import TrainerCallback

    class StopAfterSaving(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise _Interrupt(f"killed after step {step}")

    return StopAfterSaving()


def test_interrupted_online_run_resumes_from_its_last_checkpoint(tmp_path, tiny_llama_dir, one_torch_thread):
    from safetensors.torch import load_file

    # 4 prompts, 2 a step: an epoch is 2 steps, so the run is cut (after step 3) inside its second epoch. With
    # seed 1, TRL's own sampler, restarted on resuming, would give that epoch's last step other prompts.
    log = str(_log(tmp_path / "fb.jsonl", prompts=4))

    def config(out: Path, **over) -> OnlineConfig:
        return resolve_config(OnlineConfig, overrides={
            "data": log, "out": out, "model": str(tiny_llama_dir), "max_steps": 4, "num_generations": 2,
            "per_device_batch_size": 4, "max_completion_length": 3, "save_steps": 1, "seed": 1, **over})

    whole = train_online(config(tmp_path / "whole"), "grpo")
    cut = config(tmp_path / "cut")
    with pytest.raises(_Interrupt):
        train_online(cut, "grpo", callbacks=[_stop_after_saving(3)])
    folder = ModelFolder(cut.out)
    assert folder.state == "partial" and folder.last_checkpoint.name == "checkpoint-3"
    # Its record of the compute so far: 3 steps of 4 completions, and the seconds they took.
    assert json.loads((folder.last_checkpoint / "gcsl_online_counts.json").read_text())["completions"] == 12
    first_sitting = json.loads((folder.last_checkpoint / "gcsl_train_seconds.json").read_text())["train_seconds"]
    assert first_sitting > 0
    # Re-run without resume: refused; with other settings: refused; with resume: continues.
    with pytest.raises(StageError, match="an unfinished run is here; set resume to continue it"):
        train_online(cut, "grpo")
    with pytest.raises(ConfigError, match=r"resume needs the interrupted run's settings, but learning_rate differ"):
        train_online(config(cut.out, resume=True, learning_rate=1e-3), "grpo")
    assert train_online(config(cut.out, resume=True), "grpo") == cut.out
    run, ref = (json.loads((p / "run.json").read_text()) for p in (cut.out, whole))
    assert run["resumed_from_step"] == 3 and ref["resumed_from_step"] is None
    # The same steps and compute as the uninterrupted run, the seconds of both sittings counted.
    for key in ("optimizer_steps", "completions_sampled", "scorer_calls", "reward_batches"):
        assert run[key] == ref[key], key
    assert run["mean_reward"] == pytest.approx(ref["mean_reward"])
    assert run["optimizer_steps"] == 4 and run["completions_sampled"] == 16
    assert run["train_seconds"] > first_sitting and "train_seconds_from_step" not in run
    assert not folder.partial.exists() and not (cut.out / "checkpoints").exists()
    # ... and the same adapter: adapter, optimizer and RNG states came back from the checkpoint, and the
    # resumed epoch visited the prompts the uninterrupted one did.
    got, want = (load_file(str(p / "adapter_model.safetensors")) for p in (cut.out, whole))
    assert set(got) == set(want)
    assert any(want[k].abs().sum() > 0 for k in want if "lora_B" in k)  # trained: a fresh lora_B is all zeros
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6), key
    # Nothing left to resume once finished.
    with pytest.raises(StageError, match="nothing to resume"):
        train_online(config(cut.out, resume=True), "grpo")
