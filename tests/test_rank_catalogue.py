"""Ranking a recommendation catalogue by the model's answer probabilities (`gcsl generate --rank-catalogue`), the
ranked sanity baselines, and the evaluator reading a row's ranking instead of grounding its title."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gcsl.config import resolve_config
from gcsl.errors import ConfigError, DataError
from gcsl.generation.generate import GenerateConfig, generate
from gcsl.generation.ranking import answer_ids, candidate_logprobs
from gcsl.stages import iter_jsonl
from gcsl.tasks import recommendation as rec
from gcsl.tasks.recommendation.baselines import BaselineConfig, history_titles, write_baseline_generations

FIXTURE = Path(__file__).parent / "fixtures" / "amazon_small.csv"
DATA = {"dataset": "amazon", "path": FIXTURE, "min_interactions": 3, "n_train": 0, "n_valid": 0, "n_test": 0}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rank") / "data"
    rec.export_recommendation_files(rec.RecommendationDataConfig(**DATA), out)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama_dir)), AutoModelForCausalLM.from_pretrained(
        str(tiny_llama_dir)).eval()


def _full_sequence_logprob(model, prompt: list[int], answer: list[int]) -> float:
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].float(), -1)
    return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(answer))


def test_cached_batched_scores_equal_one_full_forward_per_answer(tiny, one_torch_thread):
    tokenizer, model = tiny
    prompt = tokenizer("Recommend one item:")["input_ids"]
    answers = ['"Heat"', '"The Shawshank Redemption"', '"Up"', '"A"', '"Star Wars: Episode IV - A New Hope"']
    ids = answer_ids(tokenizer, answers)
    assert all(c[-1] == tokenizer.eos_token_id for c in ids) and len({len(c) for c in ids}) > 2
    # batch_size 2: three batches, answers of different lengths padded within each
    got = candidate_logprobs(model, prompt, ids, batch_size=2)
    want = [_full_sequence_logprob(model, prompt, c) for c in ids]
    assert got == pytest.approx(want, abs=1e-4)
    assert candidate_logprobs(model, prompt, ids, batch_size=64) == pytest.approx(got, abs=1e-5)


def test_generate_ranks_every_catalogue_title_and_the_evaluator_reads_the_ranking(tiny_llama_dir, data_dir, tmp_path,
                                                                                   tiny, one_torch_thread):
    cfg = resolve_config(GenerateConfig, overrides={
        "model": str(tiny_llama_dir), "prompts": str(data_dir / "test_prompts.jsonl"), "out": tmp_path / "r.jsonl",
        "rank_catalogue": data_dir, "batch_size": 4, "device": "cpu"})
    rows = [row for _, row in iter_jsonl(generate(cfg))]
    titles, answers = rec.catalogue_answers(data_dir)
    n_prompts = len((data_dir / "test_prompts.jsonl").read_text().splitlines())
    assert len(rows) == n_prompts >= 2 and len(titles) == len(set(titles)) > 5
    tokenizer, model = tiny
    for row in rows:
        assert sorted(row["ranking"]) == sorted(titles) and row["completion"] == rec.format_response(row["ranking"][0])
        assert row["ranking_logprobs"] == sorted(row["ranking_logprobs"], reverse=True)
        # The scores are the model's: re-scored here from the prompt as a base chat model reads it (templated)
        messages = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        for place in (0, -1):
            answer = answer_ids(tokenizer, [rec.format_response(row["ranking"][place])])[0]
            assert row["ranking_logprobs"][place] == pytest.approx(_full_sequence_logprob(model, prompt, answer),
                                                                   abs=1e-3)
    record = json.loads((tmp_path / "r.jsonl.run.json").read_text())
    assert record["config"]["rank_catalogue"] == str(data_dir) and record["complete"] is True
    # A rerun finds every row written and changes nothing.
    before = (tmp_path / "r.jsonl").read_bytes()
    generate(cfg)
    assert (tmp_path / "r.jsonl").read_bytes() == before

    result = rec.evaluate(rows, rec.RecommendationEvalConfig(dataset="amazon", path=data_dir))
    for item, row in zip(result.items, rows):
        assert item["rank"] == row["ranking"].index(row["meta"]["target_title"]) + 1
        assert item["hr@10"] == float(item["rank"] <= 10) and item["nearest_title"] == row["ranking"][0]
    assert result.options["grounding"] == "ranking"


def test_ranking_is_refused_with_several_samples_or_a_steered_decoder(tiny_llama_dir, data_dir, tmp_path):
    base = {"model": str(tiny_llama_dir), "prompts": str(data_dir / "test_prompts.jsonl"), "out": tmp_path / "r.jsonl",
            "rank_catalogue": data_dir}
    with pytest.raises(ConfigError, match="num_samples: a ranking is deterministic"):
        resolve_config(GenerateConfig, overrides={**base, "num_samples": 2})
    with pytest.raises(ConfigError, match="rank_catalogue: ranking scores the model's own"):
        resolve_config(GenerateConfig, overrides={**base, "classifier": str(tmp_path)})


def _baseline(kind: str, data_dir: Path, out: Path, **over) -> list[dict]:
    write_baseline_generations(resolve_config(BaselineConfig, overrides={
        "kind": kind, "prompts": str(data_dir / "test_prompts.jsonl"), "out": out, "dataset": "amazon",
        "path": data_dir, "feedback": str(data_dir / "train.jsonl"), "rank": True, **over}))
    return [row for _, row in iter_jsonl(out)]


def test_ranked_baselines_order_the_whole_catalogue(data_dir, tmp_path):
    titles, _ = rec.catalogue_answers(data_dir)
    popular = [t for t, _ in rec.popularity_ranking(
        [rec.extract_title(r["response"]) for _, r in iter_jsonl(data_dir / "train.jsonl")], rec.load_catalogue(
            "amazon", data_dir))]
    rows = _baseline("most-popular", data_dir, tmp_path / "pop.jsonl")
    assert rows
    for row in rows:
        seen = history_titles(row["prompt"])
        unseen = [t for t in popular if t not in seen]
        assert row["ranking"] == unseen + [t for t in popular if t in seen]
        assert row["completion"] == rec.format_response(unseen[0] if unseen else popular[0])
    shuffled = _baseline("random", data_dir, tmp_path / "a.jsonl", seed=0)
    again = _baseline("random", data_dir, tmp_path / "b.jsonl", seed=0)
    other = _baseline("random", data_dir, tmp_path / "c.jsonl", seed=1)
    assert [r["ranking"] for r in shuffled] == [r["ranking"] for r in again] != [r["ranking"] for r in other]
    assert all(sorted(r["ranking"]) == sorted(titles) for r in shuffled)
    # Scored from the rankings alone: no encoder is loaded, the rank is the target's place.
    result = rec.evaluate(shuffled, rec.RecommendationEvalConfig(dataset="amazon", path=data_dir,
                                                                 model="no-such-encoder"))
    ranks = [r["ranking"].index(r["meta"]["target_title"]) + 1 for r in shuffled]
    assert [it["rank"] for it in result.items] == ranks
    assert result.metrics["hr@10"] == pytest.approx(np.mean([k <= 10 for k in ranks]))
    with pytest.raises(ConfigError, match="num_samples: a ranking is one row per prompt"):
        _baseline("random", data_dir, tmp_path / "d.jsonl", num_samples=2)


def test_the_evaluator_refuses_mixed_files_and_rankings_without_the_target(data_dir, tmp_path):
    rows = _baseline("random", data_dir, tmp_path / "a.jsonl")
    cfg = rec.RecommendationEvalConfig(dataset="amazon", path=data_dir)
    mixed = [rows[0], {k: v for k, v in rows[1].items() if k != "ranking"}]
    with pytest.raises(DataError, match="generation row 2: has no ranking while other rows have one"):
        rec.evaluate(mixed, cfg)
    short = dict(rows[0], ranking=[t for t in rows[0]["ranking"] if t != rows[0]["meta"]["target_title"]])
    with pytest.raises(DataError, match="generation row 1: its ranking .* lacks the target"):
        rec.evaluate([short], cfg)


def test_an_experiment_ranking_the_catalogue_gives_the_baselines_rankings(data_dir, tmp_path, monkeypatch):
    from gcsl.experiments.runner import ExperimentConfig, run_experiment

    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(ExperimentConfig, overrides={
        "name": "ranked", "out": tmp_path / "exp", "task": "recommendation", "data": str(data_dir / "train.jsonl"),
        "eval_prompts": str(data_dir / "test_prompts.jsonl"), "model": "no-such-model",  # never loaded
        "methods": ["random", "most-popular"], "seeds": [0], "baseline": "random", "primary_metric": "ndcg@10",
        "generate": {"rank_catalogue": str(data_dir)},
        "evaluate": {"dataset": "amazon", "path": str(data_dir), "model": "no-such-encoder"}, "ci_samples": 200})
    run_experiment(cfg)
    titles, _ = rec.catalogue_answers(data_dir)
    for name in ("random", "most-popular"):
        seed0 = tmp_path / "exp" / "runs" / name / "seed0"
        rows = [row for _, row in iter_jsonl(seed0 / "gens-top.jsonl")]
        assert rows and all(sorted(r["ranking"]) == sorted(titles) for r in rows)
        metrics = json.loads((seed0 / "metrics-top.json").read_text())
        assert metrics["options"]["grounding"] == "ranking"
        # items/ keeps what re-scoring needs: each row's target, its rating and the target's rank.
        kept = [row for _, row in iter_jsonl(tmp_path / "exp" / "items" / name / "seed0" / "top.jsonl")]
        assert [(k["prompt_id"], k["target_title"], k["rank"]) for k in kept] == [
            (r["prompt_id"], r["meta"]["target_title"], r["ranking"].index(r["meta"]["target_title"]) + 1)
            for r in rows]
        assert all(k["target_rating"] == r["meta"]["target_rating"] for k, r in zip(kept, rows))
