"""BIGRec: its training rows, L2 grounding on the base LLM's last-token states, the popularity adjustment,
and the restricted catalogue (``top_items``) the CPU ranking setup uses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gcsl.config import resolve_config
from gcsl.errors import ConfigError
from gcsl.experiments.runner import ExperimentConfig, _evaluate_options, run_experiment
from gcsl.goals.formulate import FormulationInput
from gcsl.methods import BASE_MODEL, get_method
from gcsl.stages import iter_jsonl, write_jsonl
from gcsl.tasks import recommendation as rec
from gcsl.tasks.recommendation.baselines import BaselineConfig, write_baseline_generations
from gcsl.tasks.recommendation.bigrec import LastTokenEncoder, bigrec_positives, popularity_adjusted

AMAZON = Path(__file__).parent / "fixtures" / "amazon_small.csv"

# Four movies; item 1 and 2 are rated 3 times, item 3 twice, item 4 once (9 ratings).
# (user, item, rating, timestamp)
RATINGS = [("u1", "1", 5, 1), ("u1", "3", 4, 2), ("u1", "2", 3, 3), ("u1", "4", 1, 4),
           ("u2", "2", 5, 5), ("u2", "1", 4, 6), ("u2", "3", 2, 7),
           ("u3", "1", 4, 8), ("u3", "2", 5, 9)]
TITLES = {"1": "Alpha", "2": "Beta", "3": "Gamma", "4": "Delta"}


@pytest.fixture()
def movielens_folder(tmp_path: Path) -> Path:
    """A MovieLens-100k-shaped folder (RecBole atomic files) holding :data:`RATINGS`."""
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\n" + "".join(
        f"{i}\t{t}\n" for i, t in TITLES.items()), encoding="utf-8")
    (folder / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{i}\t{r}\t{ts}\n" for u, i, r, ts in RATINGS), encoding="utf-8")
    return folder


class TableEncoder:
    """Fixed vectors per text, so distances can be worked out by hand."""

    def __init__(self, table: dict[str, tuple[float, ...]]):
        self.table = table

    def encode(self, texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=False,
               show_progress_bar=False):
        out = np.array([self.table[t.strip()] for t in texts], dtype=np.float64)
        return out / np.linalg.norm(out, axis=1, keepdims=True) if normalize_embeddings else out


VECTORS = {"Alpha": (0.0, 0.0), "Beta": (3.0, 4.0), "Gamma": (1.0, 0.0), "query": (0.0, 1.0)}


# -- step 1: the training rows --------------------------------------------------------------

def test_bigrec_trains_on_ratings_above_3_only():
    f = bigrec_positives(FormulationInput(np.zeros(6), np.array([5.0, 3.0, 4.0, 1.0, 3.5, 2.0]), np.zeros(6), ()))
    assert f.rows.tolist() == [0, 2, 4] and f.goal_levels.tolist() == [0, 0, 0]
    assert list(f.dropped.values()) == [3]
    method = get_method("bigrec")
    assert method.trainable and method.variant_kind == "trained" and method.tasks == ("recommendation",)
    assert not method.is_goal_conditioned
    assert dict(method.evaluate_defaults) == {"grounding": "bigrec-l2", "lm": BASE_MODEL}


def test_evaluate_defaults_need_pairs_and_a_task():
    from gcsl.methods import Method

    with pytest.raises(ConfigError, match="evaluate_defaults are a task's evaluator options"):
        Method("x", "x", bigrec_positives, evaluate_defaults=(("grounding", "bigrec-l2"),))
    with pytest.raises(ConfigError, match="each option once"):
        Method("x", "x", bigrec_positives, tasks=("recommendation",),
               evaluate_defaults=(("lm", "a"), ("lm", "b")))


def test_the_experiment_scores_bigrec_with_its_grounding_and_the_base_model(tmp_path):
    cfg = resolve_config(ExperimentConfig, overrides={
        "name": "x", "out": tmp_path, "task": "recommendation", "data": "t.jsonl", "eval_prompts": "p.jsonl",
        "model": "my-base", "primary_metric": "ndcg@10",
        "evaluate": {"dataset": "amazon", "path": "data", "popularity_gamma": 2.0}})
    assert _evaluate_options(cfg, "bigrec") == {"grounding": "bigrec-l2", "lm": "my-base", "dataset": "amazon",
                                                "path": "data", "popularity_gamma": 2.0}
    assert _evaluate_options(cfg, "sft") == {"dataset": "amazon", "path": "data", "popularity_gamma": 2.0}


# -- step 2: grounding ----------------------------------------------------------------------

def test_l2_grounding_ranks_by_hand_computed_distances():
    g = rec.TitleGrounder(["Alpha", "Beta", "Gamma"], TableEncoder(VECTORS), metric="l2")
    # |query - item|: Alpha 1, Beta sqrt(9 + 9) = 4.243, Gamma sqrt(2) = 1.414 -> Alpha, Gamma, Beta.
    out = g.ground(["query"] * 3, ["Alpha", "Gamma", "Beta"])
    assert [r.rank for r in out] == [1.0, 2.0, 3.0]
    assert out[0].nearest_title == "Alpha" and out[0].similarity == pytest.approx(0.0)
    # Cosine grounding of the same vectors ranks otherwise (Alpha is the zero vector: similarity 0).
    cos = rec.TitleGrounder(["Alpha", "Beta", "Gamma"], TableEncoder({**VECTORS, "Alpha": (1.0, 1e-9)}))
    assert cos.ground(["query"], ["Beta"])[0].rank == 1.0


def test_l2_grounding_counts_a_duplicated_title_once_and_ties_pessimistically():
    table = {**VECTORS, "Delta": (0.0, 2.0)}  # as far from the query as Alpha
    g = rec.TitleGrounder(["Alpha", "Beta", "Gamma", "Beta", "Delta"], table_encoder := TableEncoder(table),
                          metric="l2")
    assert g.encoder is table_encoder and g.n_items == 5 and len(g.unique_titles) == 4
    ranks = [r.rank for r in g.ground(["query"] * 4, ["Alpha", "Delta", "Gamma", "Beta"])]
    # Alpha and Delta tie at distance 1: each ranks below the other; Beta's two items count once.
    assert ranks == [2.0, 2.0, 3.0, 4.0]


def test_popularity_adjustment_follows_the_formula():
    rng = np.random.default_rng(0)
    d, pop, gamma = rng.uniform(0, 5, (3, 4)), [3.0, 0.0, 10.0, 1.0], 1.7
    got = popularity_adjusted(d, pop, gamma)
    for i in range(3):
        for j in range(4):
            dn = (d[i, j] - d[i].min()) / (d[i].max() - d[i].min())
            pn = (pop[j] - 0.0) / (10.0 - 0.0)
            assert got[i, j] == pytest.approx(dn / (1 + pn) ** gamma)
    assert np.array_equal(popularity_adjusted(d, pop, 0.0).argsort(1), d.argsort(1))
    assert np.all(popularity_adjusted(np.ones((1, 3)), pop[:3], 1.0) == 0.0)  # a constant row scales to 0


def test_popularity_lifts_a_popular_item_above_a_nearer_one():
    # Scaled distances: Alpha 0, Beta 1, Gamma (sqrt 2 - 1) / (sqrt 18 - 1) = 0.128; Beta's popularity scales to 1.
    plain = rec.TitleGrounder(["Alpha", "Beta", "Gamma"], TableEncoder(VECTORS), metric="l2",
                              popularity=[0, 10, 0])
    assert [r.rank for r in plain.ground(["query"] * 2, ["Beta", "Gamma"])] == [3.0, 2.0]
    lifted = rec.TitleGrounder(["Alpha", "Beta", "Gamma"], TableEncoder(VECTORS), metric="l2",
                               popularity=[0, 10, 0], popularity_gamma=3.0)  # Beta: 1 / 2^3 = 0.125 < 0.128
    assert [r.rank for r in lifted.ground(["query"] * 2, ["Beta", "Gamma"])] == [2.0, 3.0]
    with pytest.raises(ConfigError, match="popularity_gamma: .* one training count per catalogue item"):
        rec.TitleGrounder(["Alpha"], TableEncoder(VECTORS), metric="l2", popularity_gamma=1.0)


def test_last_token_encoder_is_the_last_layer_state_at_the_last_token(tiny_llama_dir, one_torch_thread):
    import torch

    enc = LastTokenEncoder(str(tiny_llama_dir))
    batch = enc.encode(["Heat", "The Godfather: Part II (1974)", '"Heat"'])
    alone = [enc.encode([t])[0] for t in ("Heat", "The Godfather: Part II (1974)")]
    # Left padding with positions that skip it: the short title's state does not depend on its batch-mate.
    np.testing.assert_allclose(batch[0], alone[0], atol=1e-4)
    np.testing.assert_allclose(batch[1], alone[1], atol=1e-5)
    np.testing.assert_array_equal(batch[0], batch[2])  # quotes are stripped, as BIGRec's scripts do
    ids = enc.tokenizer("Heat", return_tensors="pt")
    with torch.no_grad():
        hidden = enc.model(**ids, output_hidden_states=True).hidden_states[-1][0, -1].numpy()
    np.testing.assert_allclose(alone[0], hidden, atol=1e-5)


def test_bigrec_grounding_options_are_checked_up_front():
    with pytest.raises(ConfigError, match="lm: bigrec-l2 grounding embeds titles with a causal LM"):
        resolve_config(rec.RecommendationEvalConfig, overrides={"grounding": "bigrec-l2"})
    with pytest.raises(ConfigError, match="popularity_gamma: must be >= 0"):
        resolve_config(rec.RecommendationEvalConfig, overrides={"popularity_gamma": -1})
    cfg = resolve_config(rec.RecommendationEvalConfig, overrides={"grounding": "bigrec-l2", "lm": "m",
                                                                  "popularity_gamma": 1.0})
    with pytest.raises(ConfigError, match="path: popularity_gamma needs the items' training counts"):
        rec.evaluation.build_grounder(cfg)


# -- the restricted catalogue -----------------------------------------------------------------

def test_top_items_keeps_the_most_rated_items_and_their_interactions(movielens_folder):
    whole = rec.load_movielens(movielens_folder, min_interactions=2)
    assert whole.stats["examples"] == 6 and len(whole.items) == 4
    data = rec.load_movielens(movielens_folder, min_interactions=2, top_items=2)
    assert [it.title for it in data.items] == ["Alpha", "Beta"]
    assert data.stats["dropped"] == {"ratings_outside_top_items": 3, "users_below_min_interactions": 0}
    assert data.stats["examples"] == 3 and data.stats["catalogue_items"] == 2
    examples = [ex for split in rec.SPLITS for ex in data.splits[split]]
    # u1 rated Alpha, Gamma, Beta, Delta: Gamma and Delta are gone, so Beta follows Alpha directly.
    assert [(ex.user_id, ex.title, [h.title for h in ex.history]) for ex in examples] == [
        ("u1", "Beta", ["Alpha"]), ("u2", "Alpha", ["Beta"]), ("u3", "Beta", ["Alpha"])]
    # min_interactions counts what is left: every user keeps 2 ratings of the top 2.
    assert rec.load_movielens(movielens_folder, min_interactions=3, top_items=2).stats["users_kept"] == 0


def test_top_items_on_d3_rows_drops_other_targets_and_history_entries():
    whole = rec.load_amazon(AMAZON, min_interactions=3)
    data = rec.load_amazon(AMAZON, min_interactions=3, top_items=3)
    kept = {it.item_id for it in data.items}
    assert len(kept) == 3 and data.stats["catalogue_items"] == 3
    examples = [ex for split in rec.SPLITS for ex in data.splits[split]]
    assert examples and all(ex.item_id in kept and all(h.item_id in kept for h in ex.history) for ex in examples)
    assert len(examples) < whole.stats["examples"] and data.stats["dropped"]["rows_with_target_outside_top_items"] > 0


def test_the_exported_catalogue_is_what_evaluator_and_baselines_rank_against(movielens_folder, tmp_path):
    cfg = rec.RecommendationDataConfig(path=movielens_folder, min_interactions=2, top_items=2, n_train=0,
                                       n_valid=0, n_test=0)
    files = rec.write_recommendation_data(cfg, tmp_path / "data")
    out = tmp_path / "data"
    assert out / "catalogue.jsonl" in files
    rows = [row for _, row in iter_jsonl(out / "catalogue.jsonl")]
    # Train = the two earliest targets: u1's Beta (t=3) and u2's Alpha (t=6); u3's Beta (t=9) is test.
    assert rows == [{"item_id": "1", "title": "Alpha", "train_interactions": 1},
                    {"item_id": "2", "title": "Beta", "train_interactions": 1}]
    assert [it.title for it in rec.load_catalogue("movielens", out)] == ["Alpha", "Beta"]
    gens = write_baseline_generations(resolve_config(BaselineConfig, overrides={
        "kind": "random", "prompts": str(out / "test_prompts.jsonl"), "out": tmp_path / "g.jsonl",
        "path": out, "num_samples": 20}))
    assert {rec.extract_title(row["completion"]) for _, row in iter_jsonl(gens)} == {"Alpha", "Beta"}
    with pytest.raises(ConfigError, match="top_items: must be >= 0"):
        resolve_config(rec.RecommendationDataConfig, overrides={"top_items": -1})


# -- end to end -------------------------------------------------------------------------------

def test_a_bigrec_experiment_trains_on_liked_items_and_grounds_with_the_base_model(tmp_path, tiny_llama_dir,
                                                                                     monkeypatch, one_torch_thread):
    monkeypatch.chdir(tmp_path)
    data_cfg = rec.RecommendationDataConfig(dataset="amazon", path=AMAZON, min_interactions=3, top_items=6,
                                            n_train=0, n_valid=0, n_test=0)
    files = rec.export_recommendation_files(data_cfg, tmp_path / "data")
    cfg = resolve_config(ExperimentConfig, overrides={
        "name": "bigrec", "out": tmp_path / "exp", "task": "recommendation", "data": str(files["train"]),
        "eval_prompts": str(files["test_prompts"]), "model": str(tiny_llama_dir), "methods": ["bigrec"],
        "seeds": [0], "baseline": "bigrec", "primary_metric": "ndcg@10",
        "prepare": {"kind": "ordinal", "score_range": [1, 5]},
        "train": {"max_steps": 2, "per_device_batch_size": 2, "report_to": "none", "save_steps": 2},
        "generate": {"max_new_tokens": 6, "batch_size": 4},
        "evaluate": {"dataset": "amazon", "path": str(tmp_path / "data"), "popularity_gamma": 1.0},
        "ci_samples": 50})
    run_experiment(cfg)
    run = tmp_path / "exp" / "runs" / "bigrec"
    train_scores = [row["score"] for _, row in iter_jsonl(files["train"])]
    import pyarrow.parquet as pq

    prepared = pq.read_table(next(run.rglob("train.parquet"))).to_pylist()
    assert len(prepared) == sum(s > 3 for s in train_scores) and 0 < len(prepared) < len(train_scores)
    metrics = json.loads((run / "seed0" / "metrics-top.json").read_text())
    options = metrics["options"]
    assert options["grounding"] == "bigrec-l2" and options["model"] == str(tiny_llama_dir)
    assert options["popularity_gamma"] == 1.0 and options["catalogue_items"] == 6
    n_test = sum(1 for _ in iter_jsonl(files["test_prompts"]))
    assert metrics["n_generations"] == n_test
    items = [row for _, row in iter_jsonl(run / "seed0" / "metrics-top.items.jsonl")]
    assert all(item["rank"] is None or 1 <= item["rank"] <= 6 for item in items)
    assert all(math.isfinite(metrics["metrics"][m]) for m in ("ndcg@10", "hr@10", "err@20"))


def test_write_jsonl_round_trip_of_catalogue_rows(tmp_path):
    # A hand-written catalogue file is read back with its counts (the evaluator's popularity).
    write_jsonl(tmp_path / "catalogue.jsonl", [{"item_id": 7, "title": " Heat ", "train_interactions": 4}])
    items, counts = rec.data.read_catalogue_file(tmp_path)
    assert items == [rec.CatalogueItem("7", "Heat")] and counts == [4]
