"""SPRec (gcsl.tasks.recommendation.preference): its rows, rounds and self-play pairs, the pairs' way through
`gcsl prepare`, and its self-play rounds on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gcsl.config import resolve_config
from gcsl.data.prepare import PrepareConfig, prepare
from gcsl.errors import ConfigError
from gcsl.experiments.runner import ExperimentConfig
from gcsl.methods import Method, get_method, trained_methods
from gcsl.stages import ModelFolder, iter_jsonl, write_jsonl
from gcsl.tasks.recommendation.preference import (
    RecipeConfig,
    pair_log,
    positive_rows,
    run_recipe,
    sample_rows,
    sprec_pairs,
)
from test_rec_baselines import DATA  # the Amazon CSV fixture and its data options

ROWS = [{"prompt": f"history {i}", "response": f'"Item {i}"', "score": s} for i, s in enumerate([5, 3, 4, 1, 4])]


def test_positives_are_the_rows_rated_at_the_cut_or_above():
    assert positive_rows(ROWS, 4) == [0, 2, 4]
    assert positive_rows(ROWS, 5) == [0] and positive_rows(ROWS, 1) == [0, 1, 2, 3, 4]


def test_each_round_draws_its_own_seeded_sample_without_replacement():
    pool = list(range(100))
    first, again, other = sample_rows(pool, 10, 1), sample_rows(pool, 10, 1), sample_rows(pool, 10, 2)
    assert first == again and first != other
    assert len(set(first)) == 10 and set(first) <= set(pool)
    assert sample_rows(pool, None, 3) == pool and sample_rows(pool, 500, 3) == pool


def test_pairs_reject_the_models_own_recommendation():
    rows = [ROWS[0], ROWS[2], ROWS[4]]
    predictions = ['I would pick "Item 7" next.',  # quoted: that title
                   "Item 4\nor else",  # unquoted: its first line
                   '"""..."""']  # no usable title: no pair
    pairs = sprec_pairs(rows, predictions)
    assert [(p["prompt"], p["chosen"], p["rejected"], p["negative"]) for p in pairs] == [
        ("history 0", '"Item 0"', '"Item 7"', "self-play"),
        ("history 2", '"Item 2"', '"Item 4"', "self-play")]
    # A recommendation of the logged item itself stays a pair, as in the reference code.
    assert sprec_pairs([ROWS[0]], ['"Item 0"'])[0]["rejected"] == '"Item 0"'
    with pytest.raises(ValueError):
        sprec_pairs(rows, predictions[:2])


def test_the_pairs_come_back_out_of_gcsl_prepare_unchanged(tmp_path):
    pairs = sprec_pairs([ROWS[0], ROWS[2], ROWS[0]], ['"Item 7"', '"Item 2"', '"Item 8"'])
    # history 0 twice: one chosen row, two rejected ones; history 2's model named the logged item.
    log = pair_log(pairs, high=5, low=1)
    assert sorted((r["prompt"], r["response"], r["score"]) for r in log) == [
        ("history 0", '"Item 0"', 5), ("history 0", '"Item 7"', 1), ("history 0", '"Item 8"', 1),
        ("history 2", '"Item 2"', 1), ("history 2", '"Item 2"', 5)]
    write_jsonl(tmp_path / "pairs.jsonl", log)
    prepare(resolve_config(PrepareConfig, overrides={
        "data": str(tmp_path / "pairs.jsonl"), "out": tmp_path / "prep", "method": "dpo", "kind": "ordinal",
        "score_range": [1, 5], "dpo_negatives": "observed", "dpo_pairs": 2, "quiet": True}))
    table = pq.read_table(tmp_path / "prep" / "train.parquet").to_pylist()
    got = sorted((r["prompt"], r["chosen"], r["rejected"]) for r in table)
    assert got == sorted((p["prompt"], p["chosen"], p["rejected"]) for p in pairs)


def test_bad_options_are_one_line_errors():
    with pytest.raises(ConfigError) as err:
        resolve_config(RecipeConfig, overrides={"method": "sprec", "data": "d", "out": "o", "rounds": -1,
                                                "sample_size": 0, "stage_epochs": 0, "train": {"init_adapter": "x"}})
    text = str(err.value)
    assert "rounds: must be >= 0" in text and "sample_size: must be at least 1" in text
    assert "stage_epochs: must be positive" in text
    assert "train: the recipe sets init_adapter itself" in text and "\n" not in text
    with pytest.raises(ConfigError) as err:
        resolve_config(ExperimentConfig, overrides={
            "name": "x", "out": "o", "task": "sentiment", "data": "d", "eval_prompts": "p", "methods": ["sprec"],
            "baseline": "sprec", "recipe": {"round": 2}})
    text = str(err.value)
    assert "methods: sprec is a baseline of task recommendation only" in text
    assert "recipe.round: unknown option of RecipeConfig" in text


def test_a_sweep_or_variant_may_set_a_recipe_option_of_its_own():
    from gcsl.experiments.runner import expand_variants

    options = {"name": "x", "out": "o", "task": "recommendation", "data": "d", "eval_prompts": "p",
               "methods": ["rosepo"], "baseline": "rosepo", "primary_metric": "ndcg@10", "recipe": {"rounds": 1},
               "variants": [{"name": "slow", "method": "sprec", "recipe": {"stage_learning_rate": 1e-6}}],
               "sweeps": [{"method": "rosepo", "option": "recipe.stage_learning_rate", "values": [3e-5, 1e-4]}]}
    variants = {v.name: v.recipe for v in expand_variants(resolve_config(ExperimentConfig, overrides=options))}
    assert variants == {"rosepo": {}, "slow": {"stage_learning_rate": 1e-6},
                        "rosepo[stage_learning_rate=3e-05]": {"stage_learning_rate": 3e-5},
                        "rosepo[stage_learning_rate=0.0001]": {"stage_learning_rate": 1e-4}}
    with pytest.raises(ConfigError) as err:
        resolve_config(ExperimentConfig, overrides={
            **options, "variants": [{"name": "slow", "method": "sprec", "recipe": {"stage_lr": 1e-6}}],
            "sweeps": [{"method": "rosepo", "option": "recipe.seed", "values": [1]},
                       {"method": "sft", "option": "recipe.rounds", "values": [1]}]})
    assert "variants[slow].recipe.stage_lr: unknown option of RecipeConfig" in str(err.value)
    assert "sweeps: recipe.seed: unknown option of RecipeConfig" in str(err.value)
    assert "sweeps: recipe.rounds: method sft is not a recipe" in str(err.value)


def test_the_table_entry_is_a_recommendation_recipe():
    method = get_method("sprec")
    assert method.variant_kind == "recipe" and method.recipe == "sprec" and method.tasks == ("recommendation",)
    assert "sprec" not in trained_methods() and not method.is_goal_conditioned
    with pytest.raises(ConfigError, match="a recipe .rosepo or sprec. trains in its own stages"):
        Method("x", "x", None, trainer="none", columns=(), recipe="sprec")  # no tasks named
    with pytest.raises(ConfigError, match="a recipe"):
        Method("x", "x", None, trainer="none", columns=(), tasks=("recommendation",), recipe="spin")


@pytest.fixture(scope="module")
def sprec_run(tmp_path_factory, tiny_llama_dir, one_torch_thread):
    from gcsl.tasks import recommendation as rec

    root = tmp_path_factory.mktemp("sprec")
    files = rec.export_recommendation_files(rec.RecommendationDataConfig(**DATA), root / "data")
    cfg = resolve_config(RecipeConfig, overrides={
        "method": "sprec", "data": str(files["train"]), "out": root / "sprec", "model": str(tiny_llama_dir),
        "rounds": 2, "sample_size": 4, "stage_epochs": 2, "prepare": {"kind": "ordinal", "score_range": [1, 5]},
        "train": {"epochs": 1, "per_device_batch_size": 4, "report_to": "none", "save_steps": 1, "lora_r": 4},
        "generate": {"max_new_tokens": 4, "batch_size": 4}})
    return cfg, run_recipe(cfg), files


def test_rounds_sample_with_the_previous_rounds_model_and_record_their_compute(sprec_run):
    cfg, final, files = sprec_run
    out = Path(cfg.out)
    liked = [{k: row[k] for k in ("prompt", "response", "score")} for _, row in iter_jsonl(files["train"])
             if row["score"] >= 4]
    assert [row for _, row in iter_jsonl(out / "positives.jsonl")] == liked
    run = json.loads((final / "run.json").read_text())
    stages = run["stages"]
    assert [s["stage"] for s in stages] == ["round-0-sft", "round-1-sample", "round-1-sft", "round-1-dpo",
                                            "round-2-sample", "round-2-sft", "round-2-dpo"]
    # Round 0 trains the train block's one epoch; each round's SFT stage_epochs = 2 on its 4 drawn rows (one
    # step of 4 sequences per epoch).
    assert stages[0]["rows"] == len(liked) and stages[0]["epochs"] == 1
    assert [(s["epochs"], s["optimizer_steps"]) for s in stages if s["stage"] in ("round-1-sft", "round-2-sft")] == \
        [(2, 2), (2, 2)]
    for r in (1, 2):
        # The round's rows: its own seeded draw of the liked rows, sampled, then trained on by SFT.
        drawn = [liked[i] for i in sample_rows(range(len(liked)), 4, cfg.seed + r)]
        prompts = [row["prompt"] for _, row in iter_jsonl(out / f"round-{r}-sample" / "prompts.jsonl")]
        assert prompts == [row["prompt"] for row in drawn]
        assert [row for _, row in iter_jsonl(out / f"round-{r}-sft" / "log.jsonl")] == drawn
        # Greedy samples (top_k 1) of the model the previous round ended with.
        sampled_with = json.loads((out / f"round-{r}-sample" / "samples.jsonl.run.json").read_text())["config"]
        before = out / ("round-0-sft" if r == 1 else "round-1-sft") / "model"
        assert sampled_with["model"] == str(before) and sampled_with["top_k"] == 1
        completions = [row["completion"] for _, row in iter_jsonl(out / f"round-{r}-sample" / "samples.jsonl")]
        # The random tiny model names no item, so no pair is made and the round's DPO is skipped, on record.
        assert sprec_pairs(drawn, completions) == []
        dpo = next(s for s in stages if s["stage"] == f"round-{r}-dpo")
        assert dpo["pairs"] == 0 and dpo["skipped"] == "no pairs"
    assert run["compute"]["optimizer_steps"] == stages[0]["optimizer_steps"] + 4 and run["compute"]["samples_generated"] == 8
    assert run["compute"]["train_rows"] == len(liked) + 8
    assert ModelFolder(final).state == "complete" and json.loads((final / "stages.json").read_text())["stages"] == stages
    # The final model is round 2's: its adapter file is the round-2 SFT model's.
    assert (final / "adapter_model.safetensors").read_bytes() == (
        out / "round-2-sft" / "model" / "adapter_model.safetensors").read_bytes()


def test_a_rerun_reuses_every_finished_stage(sprec_run, monkeypatch):
    import sys

    training, generation = sys.modules["gcsl.training.train"], sys.modules["gcsl.generation.generate"]
    cfg, final, _ = sprec_run
    before = (final / "run.json").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(training, "train", refuse)
    monkeypatch.setattr(generation, "generate", refuse)
    assert run_recipe(cfg) == final and (final / "run.json").read_text() == before


def test_a_recipe_takes_a_finished_stage_with_the_same_inputs_from_a_shared_folder(sprec_run, tmp_path,
                                                                                   monkeypatch):
    import os
    import sys
    from dataclasses import replace

    cfg, _, _ = sprec_run
    donor = Path(cfg.out) / "round-0-sft"
    training = sys.modules["gcsl.training.train"]
    real_train = training.train

    def refuse(*args, **kwargs):
        raise AssertionError("a stage with the same inputs trained again")

    monkeypatch.setattr(training, "train", refuse)
    twin = replace(cfg, out=tmp_path / "twin", model_out=None, rounds=0, share=[Path(cfg.out)])
    final = run_recipe(twin)
    taken = tmp_path / "twin" / "round-0-sft"
    # Hard links to the donor's files, and a record that says where they came from and what they cost there.
    adapter = Path("model") / "adapter_model.safetensors"
    assert os.path.samefile(taken / adapter, donor / adapter)
    record, original = (json.loads((d / "stage.json").read_text()) for d in (taken, donor))
    assert record["shared_from"] == str(donor / "model") and record["key"] == original["key"]
    assert {k: record[k] for k in ("rows", "optimizer_steps", "train_seconds")} == \
        {k: original[k] for k in ("rows", "optimizer_steps", "train_seconds")}
    assert (final / "adapter_model.safetensors").read_bytes() == (donor / adapter).read_bytes()

    # Another seed trains another model: nothing is taken.
    monkeypatch.setattr(training, "train", real_train)
    other = replace(cfg, out=tmp_path / "seed1", model_out=None, rounds=0, seed=1, share=[Path(cfg.out)])
    run_recipe(other)
    own = json.loads((tmp_path / "seed1" / "round-0-sft" / "stage.json").read_text())
    assert "shared_from" not in own and own["key"] != original["key"] and own["optimizer_steps"] > 0
    assert not os.path.samefile(tmp_path / "seed1" / "round-0-sft" / "model" / "adapter_model.safetensors",
                                donor / "model" / "adapter_model.safetensors")


def test_the_stages_after_round_0_train_at_the_stage_learning_rate(sprec_run, tmp_path):
    from dataclasses import replace

    from gcsl.tasks.recommendation.preference import RECIPE_TRAIN_DEFAULTS

    cfg, _, _ = sprec_run
    run_recipe(replace(cfg, out=tmp_path / "lr", model_out=None, rounds=1, stage_learning_rate=1e-5,
                       share=[Path(cfg.out)]))
    # (Every training stage takes its options from one place; this tiny model's round-1 DPO has no pairs.)
    stages = ("round-0-sft", "round-1-sft")
    rates = [json.loads((tmp_path / "lr" / s / "model" / "run.json").read_text())["config"]["learning_rate"]
             for s in stages]
    assert rates == [RECIPE_TRAIN_DEFAULTS["learning_rate"], 1e-5]
    # Round 0 is the fixture's training, so it is taken; round 1's SFT differs from the fixture's and trains.
    records = [json.loads((tmp_path / "lr" / s / "stage.json").read_text()) for s in stages]
    assert records[0]["shared_from"] == str(Path(cfg.out) / "round-0-sft" / "model")
    assert "shared_from" not in records[1] and records[1]["optimizer_steps"] > 0


def test_a_finished_stage_made_with_other_settings_is_an_error_not_reused(sprec_run):
    from dataclasses import replace

    cfg, final, _ = sprec_run
    before = (final / "run.json").read_text()
    # Round 0 is unchanged and passes; round 1's SFT trained at the default rate, not at 1e-5.
    with pytest.raises(ConfigError, match=r"round-1-sft/model: trained with other settings \(learning_rate "
                                          r"[0-9.e-]+ -> 1e-05\); remove the folder"):
        run_recipe(replace(cfg, stage_learning_rate=1e-5))
    assert (final / "run.json").read_text() == before


def test_an_interrupted_stage_resumes_from_its_last_checkpoint(sprec_run, tmp_path, monkeypatch):
    import sys
    from dataclasses import replace

    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise KeyboardInterrupt("stopped after the first checkpoint")

    cfg, _, _ = sprec_run
    training = sys.modules["gcsl.training.train"]
    real_train = training.train
    monkeypatch.setattr(training, "train", lambda c, **kw: real_train(c, callbacks=[Interrupt()]))
    # One row per sequence, two per step: round 0 takes several steps, each checkpointed (save_steps 1).
    cut = replace(cfg, out=tmp_path / "cut", model_out=None, rounds=0, seed=2,
                  train={**cfg.train, "per_device_batch_size": 2, "prefix_sharing": False})
    with pytest.raises(KeyboardInterrupt):
        run_recipe(cut)
    model = tmp_path / "cut" / "round-0-sft" / "model"
    assert ModelFolder(model).state == "partial" and ModelFolder(model).last_checkpoint.name == "checkpoint-1"
    monkeypatch.setattr(training, "train", real_train)
    run_recipe(cut)
    run = json.loads((model / "run.json").read_text())
    assert run["resumed_from_step"] == 1 and run["global_step"] == run["optimizer_steps"] > 1
