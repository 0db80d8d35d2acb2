"""The online GCSL loop (gcsl.training.online_loop) on a tiny model: pool, re-quantization, resuming, experiment."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import write_scripted_reviews
from gcsl.config import resolve_config
from gcsl.data.prepare import PrepareConfig
from gcsl.errors import ConfigError
from gcsl.experiments.runner import ExperimentConfig, run_experiment
from gcsl.goals import GoalSetup, quantize_feedback
from gcsl.methods import Method, get_method, trained_methods
from gcsl.stages import ModelFolder, iter_jsonl
from gcsl.training.online_loop import LoopConfig, read_rounds, run_online_loop

PREPARE = {"score_range": [0, 1], "bins": 4}
TRAIN = {"per_device_batch_size": 4, "report_to": "none", "save_steps": 1, "lora_r": 4}
GENERATE = {"max_new_tokens": 3, "batch_size": 4}


def _high_scorer(monkeypatch) -> None:
    """Every sample scores 1.0: the pool's upper thresholds must move up."""
    import gcsl.training.online as online

    monkeypatch.setattr(online, "task_reward", lambda task, options=None: lambda texts: [1.0] * len(texts))


def _loop(tmp_path: Path, model: Path, **over) -> LoopConfig:
    return resolve_config(LoopConfig, overrides={
        "data": str(write_scripted_reviews(tmp_path / "fb.jsonl")), "out": tmp_path / "loop", "model": str(model),
        "rounds": 2, "samples_per_round": 6, "steps_per_round": 1, "prepare": PREPARE, "train": TRAIN,
        "generate": GENERATE, **over})


def _pool_scores(path: Path) -> np.ndarray:
    return np.array([row["score"] for _, row in iter_jsonl(path)], dtype=float)


@pytest.fixture(scope="module")
def finished_loop(tmp_path_factory, tiny_llama_dir, one_torch_thread):
    """One keep_all loop of 2 rounds, every sample scored 1.0."""
    mp = pytest.MonkeyPatch()
    _high_scorer(mp)
    try:
        tmp = tmp_path_factory.mktemp("loop")
        cfg = _loop(tmp, tiny_llama_dir)
        final = run_online_loop(cfg)
    finally:
        mp.undo()
    return cfg, final


def test_the_table_entry_and_its_checks():
    method = get_method("online-gcsl-bey-nl")
    assert method.variant_kind == "loop" and method.loop == "gcsl-bey-nl" and not method.trainable
    assert "online-gcsl-bey-nl" not in trained_methods()
    with pytest.raises(ConfigError, match="an online loop trains with the method it names"):
        Method("l", "l", None, trainer="none", columns=(), loop="gcsl", online="grpo")
    with pytest.raises(ConfigError, match="loop names another method"):
        Method("l", "l", None, trainer="none", columns=(), loop="l")


@pytest.mark.parametrize(("over", "message"), [
    ({"goal": "level:2"}, "goal: use top or scale"),
    ({"pool": "window"}, "pool: window needs window >= 1"),
    ({"window": 3}, "only pool: window uses it"),
    ({"method": "online-gcsl-bey-nl"}, "is not a method"),
    ({"train": {"max_steps": 3}}, "train: the loop sets max_steps itself"),
])
def test_loop_config_refuses_bad_options(tmp_path, over, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(LoopConfig, overrides={"data": "fb.jsonl", "out": tmp_path / "loop", **over})


def test_rounds_requantize_the_growing_pool(finished_loop):
    cfg, final = finished_loop
    rounds = read_rounds(final)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    spec = resolve_config(PrepareConfig, overrides={"data": "x", "out": Path("x"), **PREPARE}).metric_spec()
    for r, record in enumerate(rounds):
        pool = Path(cfg.out) / f"round-{r}" / "pool.jsonl"
        # Pool growth, keep_all: the log's 24 rows plus 6 scored samples a round.
        assert record["pool_rows"] == 24 + 6 * r == len(_pool_scores(pool))
        # The thresholds are the equal-frequency rule's on the pool's own scores.
        expected = quantize_feedback(_pool_scores(pool), spec, bins=4).thresholds
        assert record["thresholds"] == pytest.approx(list(expected))
        assert record["thresholds_display"] == pytest.approx([spec.display(t) for t in expected])
        assert record["optimizer_steps"] == 1 and record["train_seconds"] > 0
        assert record["samples"] == record["scorer_calls"] == (6 if r else 0)
    assert rounds[1]["mean_sample_score"] == 1.0
    # Samples that all score high move the top thresholds up.
    assert rounds[1]["thresholds"][-1] > rounds[0]["thresholds"][-1]
    assert rounds[2]["thresholds"][-1] >= rounds[1]["thresholds"][-1]
    # Samples were drawn on the log's distinct prompts, in turn.
    prompts = [row["prompt"] for _, row in iter_jsonl(Path(cfg.out) / "round-1" / "samples-prompts.jsonl")]
    assert len(prompts) == 6 and prompts[0] == [{"role": "user", "content": "Review movie 0."}]


def test_final_folder_is_the_last_rounds_model(finished_loop, tiny_llama_dir):
    from gcsl.models import load_for_inference

    cfg, final = finished_loop
    assert ModelFolder(final).state == "complete"
    last = Path(cfg.out) / "round-2"
    assert (final / "goals.json").read_text() == (last / "prepared" / "goals.json").read_text()
    assert GoalSetup.load(final).thresholds == pytest.approx(read_rounds(final)[-1]["thresholds"])
    run = json.loads((final / "run.json").read_text())
    assert [r["round"] for r in run["rounds"]] == [0, 1, 2] and run["optimizer_steps_all_rounds"] == 3
    assert json.loads((last / "model" / "run.json").read_text())["config"]["init_adapter"] == str(
        Path(cfg.out) / "round-1" / "model")
    loaded = load_for_inference(str(final), device="cpu")
    assert loaded.model.training is False and loaded.base_model == str(tiny_llama_dir)


def test_init_adapter_starts_from_the_given_weights(finished_loop, tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    from gcsl.training.train import TrainConfig, train

    cfg, _ = finished_loop
    start = Path(cfg.out) / "round-0" / "model"
    out = tmp_path / "continued"
    # A step of a vanishing learning rate leaves the weights where they started: the given adapter's
    # (a fresh adapter's lora_B would be all zeros).
    train(resolve_config(TrainConfig, overrides={
        **TRAIN, "data": Path(cfg.out) / "round-0" / "prepared", "out": out, "model": cfg.model, "max_steps": 1,
        "learning_rate": 1e-12, "init_adapter": start}))
    before, after = (load_file(str(p / "adapter_model.safetensors")) for p in (start, out))
    assert set(before) == set(after)
    lora_b = [k for k in before if "lora_B" in k]
    assert lora_b and any(before[k].abs().sum() > 0 for k in lora_b)
    for key in before:
        assert np.allclose(before[key].float().numpy(), after[key].float().numpy(), atol=1e-6), key
    with pytest.raises(ConfigError, match="init_adapter: .* holds no adapter_config.json"):
        resolve_config(TrainConfig, overrides={"data": "d", "out": tmp_path / "o", "init_adapter": tmp_path})


def test_rerun_resumes_without_retraining_finished_rounds(finished_loop, monkeypatch, tiny_llama_dir):
    import shutil

    cfg, final = finished_loop
    _high_scorer(monkeypatch)
    out = Path(cfg.out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("run.json")}
    assert run_online_loop(cfg) == final
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing redone
    # An interrupted last round (its model and record gone) is redone alone.
    (out / "round-2" / "round.json").unlink()
    shutil.rmtree(out / "round-2" / "model")
    run_online_loop(cfg)
    for r in (0, 1):
        path = out / f"round-{r}" / "model" / "run.json"
        assert path.stat().st_mtime_ns == stamps[path]
    assert (out / "round-2" / "model" / "run.json").stat().st_mtime_ns != stamps[out / "round-2" / "model" / "run.json"]
    assert ModelFolder(final).state == "complete"
    # Rounds made with other settings are not reused.
    with pytest.raises(ConfigError, match="made with other settings \\(samples_per_round differ\\)"):
        run_online_loop(resolve_config(LoopConfig, overrides={**cfg.__dict__, "samples_per_round": 7}))
    # Nor is a loop cut back to fewer rounds than it holds: refused before anything is touched.
    with pytest.raises(ConfigError, match=r"rounds: .* already holds 2 rounds after round 0, more than rounds: 1; "
                                          r"set rounds to at least 2") as exc:
        run_online_loop(resolve_config(LoopConfig, overrides={**cfg.__dict__, "rounds": 1}))
    assert "\n" not in str(exc.value) and read_rounds(final)[-1]["round"] == 2


def test_window_pool_keeps_the_last_rows(tmp_path, tiny_llama_dir, monkeypatch, one_torch_thread):
    _high_scorer(monkeypatch)
    cfg = _loop(tmp_path, tiny_llama_dir, rounds=1, pool="window", window=10)
    run_online_loop(cfg)
    pool = [row for _, row in iter_jsonl(Path(cfg.out) / "round-1" / "pool.jsonl")]
    assert len(pool) == 10 and read_rounds(Path(cfg.out))[1]["pool_rows"] == 10
    assert [row["score"] for row in pool[-6:]] == [1.0] * 6  # the round's samples are the newest rows


def test_experiment_runs_the_loop_probes_it_and_extends_it(tmp_path, tiny_llama_dir, monkeypatch, one_torch_thread):
    from gcsl.goals import inference_goal

    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"t{i}", "prompt": [{"role": "user", "content": f"Film {i}."}]})
                               + "\n" for i in range(2)))
    options = {
        "name": "tiny", "out": tmp_path / "exp", "task": "sentiment", "data": str(write_scripted_reviews(tmp_path / "fb.jsonl")),
        "eval_prompts": str(prompts), "model": str(tiny_llama_dir), "methods": ["base", "online-gcsl-bey-nl"],
        "seeds": [0], "baseline": "base", "validation_prompts": 2,
        # unfiltered, every round keeps all 4 levels as goals: the probe has levels to compare
        "prepare": {**PREPARE, "filter": False},
        "train": {**TRAIN, "max_steps": 1}, "loop": {"rounds": 1, "samples_per_round": 4},
        "goal_curves": {"online-gcsl-bey-nl": ["trained"]}, "probe": {"ci_samples": 50},
        "generate": GENERATE, "ci_samples": 50,
    }
    cfg = resolve_config(ExperimentConfig, overrides=options)
    text = run_experiment(cfg).read_text()
    exp = tmp_path / "exp"
    loop = exp / "runs" / "online-gcsl-bey-nl" / "seed0" / "loop"
    # The loop samples the training split's prompts only: 12 less the 2 held out.
    held = {json.dumps(json.loads(x)["prompt"]) for x in (exp / "validation.jsonl").read_text().splitlines()}
    looped = {json.dumps(row["prompt"]) for _, row in iter_jsonl(loop / "prompts.jsonl")}
    assert len(looped) == 10 and not looped & held
    assert "| online-gcsl-bey-nl |" in text and "Online loop variants (online-gcsl-bey-nl)" in text
    results = json.loads((exp / "results.json").read_text())
    assert {r["variant"] for r in results["rows"]} == {"base", "online-gcsl-bey-nl"}
    facts = {t["variant"]: t for t in results["training"]}
    rounds = read_rounds(exp / "runs" / "online-gcsl-bey-nl" / "seed0" / "model")
    assert facts["online-gcsl-bey-nl"]["optimizer_steps"] == [2]  # 1 step in each of rounds 0 and 1
    assert facts["online-gcsl-bey-nl"]["train_seconds"] == [pytest.approx(sum(r["train_seconds"] for r in rounds))]
    # Each round is a row of the report's rounds section, as rounds.json recorded it, with its plot.
    table = [(r["round"], r["pool_rows"], r["samples"], r["thresholds"]) for r in results["loop_rounds"]]
    assert table == [(r["round"], r["pool_rows"], r["samples"], r["thresholds_display"]) for r in rounds]
    assert [r["samples"] for r in results["loop_rounds"]] == [0, 4] and "## Online loop rounds" in text
    assert "averaged over n = 1 seed; no interval" in text and (exp / "loop_rounds.png").is_file()
    gens = exp / "runs" / "online-gcsl-bey-nl" / "seed0" / "gens-top.jsonl"
    assert {row["goal"] for _, row in iter_jsonl(gens)} != {None}  # sampled at its goal, like a GCSL model
    # The final model is probed on the validation rows, like a trained variant.
    seed_dir = exp / "runs" / "online-gcsl-bey-nl" / "seed0"
    probe = json.loads((exp / "probe" / "online-gcsl-bey-nl" / "seed0" / "probe.json").read_text())
    assert probe["n_rows"] == 4 and [p["variant"] for p in results["probe"]] == ["online-gcsl-bey-nl"]
    assert "## Goal sensitivity" in text
    # Its curve: `trained` is the last round's trained levels, each requesting that round's threshold.
    final = GoalSetup.load(seed_dir / "model")
    levels = [f"level:{k}" for k in final.trained_levels]
    stats = results["curve_statistics"]["online-gcsl-bey-nl"]["mean_score"]
    assert len(levels) >= 2 and stats["goals"] == levels and set(results["goal_curves"]["online-gcsl-bey-nl"]) >= set(levels)
    assert stats["requested"] == pytest.approx([inference_goal(final, g).threshold for g in levels])
    # Cached: a re-run trains nothing again.
    stamps = {p: p.stat().st_mtime_ns for p in [*loop.rglob("run.json"), seed_dir / "metrics-top.json",
                                                 seed_dir / "probe" / "probe.json"]}
    run_experiment(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # More rounds configured: the loop goes on from round 1; the final model, its samples, scores and probe move on.
    run_experiment(resolve_config(ExperimentConfig, overrides={**options, "loop": {**options["loop"], "rounds": 2}}))
    assert [r["round"] for r in read_rounds(seed_dir / "model")] == [0, 1, 2]
    for r in (0, 1):
        path = loop / f"round-{r}" / "model" / "run.json"
        assert path.stat().st_mtime_ns == stamps[path]
    assert (seed_dir / "model" / "goals.json").read_text() == (loop / "round-2" / "prepared" / "goals.json").read_text()
    for path in (seed_dir / "metrics-top.json", seed_dir / "probe" / "probe.json"):
        assert path.stat().st_mtime_ns != stamps[path], path
    facts = {t["variant"]: t for t in json.loads((exp / "results.json").read_text())["training"]}
    assert facts["online-gcsl-bey-nl"]["optimizer_steps"] == [3]
    # Fewer rounds than done: refused, in one line.
    with pytest.raises(ConfigError, match="already holds 2 rounds after round 0, more than rounds: 1"):
        run_experiment(cfg)
    # Without runs/ (a fresh clone of the committed folder): the rounds, training facts, goals and curve come from
    # records/, and nothing runs.
    before = json.loads((exp / "results.json").read_text())
    shutil.rmtree(exp / "runs")
    run_experiment(resolve_config(ExperimentConfig, overrides={**options, "loop": {**options["loop"], "rounds": 2}}))
    assert not (exp / "runs").exists() and json.loads((exp / "results.json").read_text()) == before
