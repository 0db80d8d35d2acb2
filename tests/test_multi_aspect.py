"""Multi-aspect goals: expansion counts against brute force, per-aspect filtering, goal text, per-aspect
requests, single-aspect output unchanged, and prepare -> train -> generate on the tiny Llama."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.parquet as pq
import pytest

from conftest import write_feedback_log
from gcsl.cli import main as cli_main
from gcsl.data.prepare import PrepareConfig, prepare
from gcsl.errors import ConfigError, DataError
from gcsl.goals import GoalSetup, MetricSpec, MultiGoalSetup, inference_goal
from gcsl.goals.aspects import read_aspects
from gcsl.goals.formulate import combination_ids, combination_levels, formulate_beyond_aspects
from gcsl.goals.render import default_aspect_templates
from gcsl.methods import trained_methods

FIXTURES = Path(__file__).parent / "fixtures" / "multi_aspect"

# Single-aspect runs whose outputs were hashed with the code from before multi-aspect goals existed
# (tests/fixtures/multi_aspect/single_aspect_hashes.json): every trained method, three metric setups.
SINGLE_VARIANTS = {"plain": {}, "ranged": {"score_range": [1.0, 5.0]},
                   "below": {"score_range": [1.0, 5.0], "lower_is_better": True, "flip": False, "metric_name": "delay"}}

ASPECTS = ["name=sentiment,column=sent,range=0:1", "name=brevity,column=brev,range=0:1"]


def _write_two_aspect_log(path: Path, n: int = 40, seed: int = 3) -> Path:
    """Two score columns with different distributions (so their thresholds and means differ)."""
    rng = random.Random(seed)
    rows = [{"prompt": f"Review film {i % 10}.", "response": f"Film {i} was {rng.choice(['ok', 'grim', 'fun'])}.",
             "sent": round(rng.random(), 2), "brev": round(rng.random() ** 3, 2)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def two_aspect_log(tmp_path_factory) -> Path:
    return _write_two_aspect_log(tmp_path_factory.mktemp("ma") / "log.jsonl")


def _prepare(log: Path, out: Path, method: str, **kw):
    res = prepare(PrepareConfig(data=str(log), out=out, method=method, quiet=True, aspects=list(ASPECTS), **kw))
    return res, pq.read_table(out / "train.parquet").to_pylist(), json.loads((out / "goals.json").read_text())


def _hashes(out: Path) -> dict[str, str]:
    table = pq.read_table(out / "train.parquet")
    content = json.dumps({"schema": str(table.schema), "rows": table.to_pylist()}, sort_keys=True, default=str)
    return {"train_parquet_bytes": hashlib.sha256((out / "train.parquet").read_bytes()).hexdigest(),
            "train_parquet_content": hashlib.sha256(content.encode()).hexdigest(),
            "goals_json": hashlib.sha256((out / "goals.json").read_bytes()).hexdigest()}


# -- single aspect: unchanged, byte for byte --------------------------------------------------

def test_single_aspect_outputs_are_unchanged_byte_for_byte(tmp_path):
    stored = json.loads((FIXTURES / "single_aspect_hashes.json").read_text())
    log = write_feedback_log(tmp_path / "log.jsonl", seed=0)
    same_writer = stored["pyarrow"] == pyarrow.__version__  # Parquet bytes also carry the writer's version
    # The methods of the table when the hashes were taken (methods added since have no "before").
    assert {key.split("/")[1] for key in stored["outputs"]} <= set(trained_methods())
    for key, want in stored["outputs"].items():
        variant, method = key.split("/")
        out = tmp_path / variant / method
        prepare(PrepareConfig(data=str(log), out=out, method=method, quiet=True, **SINGLE_VARIANTS[variant]))
        got = _hashes(out)
        assert got["goals_json"] == want["goals_json"], f"{key}: goals.json changed"
        assert got["train_parquet_content"] == want["train_parquet_content"], f"{key}: rows changed"
        if same_writer:
            assert got["train_parquet_bytes"] == want["train_parquet_bytes"], f"{key}: bytes changed"
    assert len(stored["outputs"]) == 33


@pytest.mark.parametrize("method", ["gcsl-bey-nl", "gcsl", "dpo"])
def test_one_aspect_is_the_single_aspect_options(tmp_path, method):
    log = write_feedback_log(tmp_path / "log.jsonl", seed=0)
    prepare(PrepareConfig(data=str(log), out=tmp_path / "a", method=method, quiet=True,
                          aspects=["name=delay,column=score,range=1:5,direction=below"]))
    prepare(PrepareConfig(data=str(log), out=tmp_path / "b", method=method, quiet=True, **SINGLE_VARIANTS["below"]))
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")


# -- formulation: brute force ------------------------------------------------------------------

def test_beyond_expansion_matches_brute_force_on_random_levels():
    rng = np.random.default_rng(0)
    for trial in range(20):
        sizes = tuple(int(k) for k in rng.integers(1, 5, size=int(rng.integers(2, 4))))
        levels = np.stack([rng.integers(1, k + 1, size=30) for k in sizes], axis=1)
        retained = tuple(tuple(sorted(rng.choice(np.arange(1, k + 1), size=int(rng.integers(1, k + 1)),
                                                 replace=False).tolist())) for k in sizes)
        form = formulate_beyond_aspects(levels, retained, sizes)
        expected = [(i, combo) for i in range(len(levels)) for combo in itertools.product(*retained)
                    if all(levels[i, a] >= combo[a] for a in range(len(sizes)))]
        got = [(int(r), combination_levels(int(c), sizes)) for r, c in zip(form.rows, form.goal_levels)]
        assert got == expected, f"trial {trial}"
        below = sum(not any(i == r for r, _ in expected) for i in range(len(levels)))
        assert form.dropped == ({"below every retained goal": below} if below else {})


def test_combination_ids_round_trip():
    sizes = (3, 2, 4)
    combos = list(itertools.product(*[range(1, k + 1) for k in sizes]))
    ids = combination_ids(np.array(combos), sizes)
    assert ids.tolist() == list(range(1, 25))
    assert [combination_levels(int(c), sizes) for c in ids] == combos


def test_prepared_expansion_and_counts_match_an_independent_computation(tmp_path, two_aspect_log):
    _, rows, goals = _prepare(two_aspect_log, tmp_path / "bey", "gcsl-bey")
    raw = [json.loads(line) for line in two_aspect_log.read_text().splitlines()]
    thresholds = [a["thresholds"] for a in goals["aspects"]]
    retained = [a["retained_levels"] for a in goals["aspects"]]
    expected = sorted((i, combo) for i, r in enumerate(raw) for combo in itertools.product(*retained)
                      if r["sent"] >= thresholds[0][combo[0] - 1] and r["brev"] >= thresholds[1][combo[1] - 1])
    got = sorted((r["row_id"], tuple(r["aspect_levels"])) for r in rows)
    assert got == expected and len(rows) == len(expected) > 0
    counts = {tuple(c["levels"]): c["rows"] for c in goals["combination_counts"]}
    assert counts == {combo: sum(1 for _, c in expected if c == combo) for combo in {c for _, c in expected}}
    # Every row's goal is its combination's tokens, thresholds the combination's.
    for r in rows[:5]:
        a, b = r["aspect_levels"]
        assert r["goal"] == f"[A1_R_{a}+][A2_R_{b}+]"
        assert r["aspect_thresholds"] == [thresholds[0][a - 1], thresholds[1][b - 1]]
        assert r["aspect_scores"] == [raw[r["row_id"]]["sent"], raw[r["row_id"]]["brev"]]
    assert goals["special_tokens"] == [f"[A{i}_R_{k}+]" for i in (1, 2) for k in range(1, 6)]


def test_classic_goal_is_the_tuple_of_own_levels(tmp_path, two_aspect_log):
    _, rows, goals = _prepare(two_aspect_log, tmp_path / "classic", "gcsl")
    raw = [json.loads(line) for line in two_aspect_log.read_text().splitlines()]
    thresholds = [a["thresholds"] for a in goals["aspects"]]
    assert [r["row_id"] for r in rows] == list(range(len(raw)))
    for r in rows:
        want = [sum(raw[r["row_id"]][col] >= t for t in ts) for col, ts in zip(("sent", "brev"), thresholds)]
        assert r["aspect_levels"] == want and r["goal"] == f"[A1_R_{want[0]}][A2_R_{want[1]}]"


def test_goal_filtering_is_per_aspect(tmp_path, two_aspect_log):
    _, _, goals = _prepare(two_aspect_log, tmp_path / "f", "gcsl-bey-nl")
    raw = [json.loads(line) for line in two_aspect_log.read_text().splitlines()]
    kept = []
    for aspect, col in zip(goals["aspects"], ("sent", "brev")):
        mean = np.mean([r[col] for r in raw])
        want = [k for k, t in enumerate(aspect["thresholds"], start=1) if t > mean]
        assert aspect["retained_levels"] == want and aspect["train_mean"] == pytest.approx(mean)
        kept.append(want)
    assert kept[0] != kept[1]  # the skewed brevity scores keep other levels than sentiment
    _, _, unfiltered = _prepare(two_aspect_log, tmp_path / "nf", "gcsl-bey-nl", filter=False)
    assert [a["retained_levels"] for a in unfiltered["aspects"]] == [[1, 2, 3, 4, 5]] * 2


# -- goal text ----------------------------------------------------------------------------------

def _setup(method: str, **kw) -> MultiGoalSetup:
    def aspect(name, thresholds, retained, mean, column):
        spec = MetricSpec(name=name, low=0, high=1, subject="a review")
        return GoalSetup(method, spec, thresholds, retained, mean, 4, default_aspect_templates(spec),
                         extra={"column": column})

    return MultiGoalSetup(method, (aspect("negative sentiment", (0.1, 0.3, 0.57, 0.8), (3, 4), 0.5, "neg"),
                                   aspect("brevity", (0.05, 0.4, 0.6, 0.9), (2, 3, 4), 0.3, "brev")), **kw)


def test_two_aspect_goal_text_states_every_aspect_in_one_sentence():
    snl = _setup("gcsl-bey-snl")
    assert inference_goal(snl, "level:3").text == (
        "Generate a review with a negative sentiment score greater than 0.57 and a brevity score greater than 0.60.")
    goal = inference_goal(snl, "negative sentiment=level:3,brevity=level:2")
    assert goal.text == ("Generate a review with a negative sentiment score greater than 0.57 and a brevity score "
                         "greater than 0.40.")
    assert inference_goal(_setup("gcsl-bey-snl", conjunction=", as well as "), "brevity=level:2").text == (
        "Generate a review with a negative sentiment score greater than 0.80, as well as a brevity score greater "
        "than 0.40.")
    assert inference_goal(_setup("gcsl-bey-nl"), "top").text == (
        "Generate a review with a negative sentiment score greater than 0.80 and a brevity score greater than 0.90. "
        "Negative sentiment scores range from 0 to 1, with 1 indicating the highest negative sentiment. "
        "Brevity scores range from 0 to 1, with 1 indicating the highest brevity.")
    assert inference_goal(_setup("gcsl-bey"), "negative sentiment=level:3,brevity=level:2").text == "[A1_R_3+][A2_R_2+]"
    assert _setup("gcsl").special_tokens[:2] == ["[A1_R_1]", "[A1_R_2]"]


# -- inference requests -----------------------------------------------------------------------

def test_per_aspect_inference_requests():
    s = _setup("gcsl-bey-snl")
    top = inference_goal(s, "top")
    assert [(g.level, g.threshold) for g in top.aspects] == [(4, 0.8), (4, 0.9)]
    scaled = inference_goal(s, "brevity=scale:1.1")  # an aspect left out is asked for its top
    assert [g.threshold for g in scaled.aspects] == [0.8, 0.99]
    by_column = inference_goal(s, "neg=0.65, brev=level:3")
    assert [g.threshold for g in by_column.aspects] == [0.65, 0.6] and by_column.aspects[0].level == 3
    assert [g.threshold for g in inference_goal(s, "scale:1.1").aspects] == [0.88, 0.99]
    # Level methods snap a value per aspect to a trained level, and say so.
    snapped = inference_goal(_setup("gcsl-bey"), "brevity=0.1")
    assert snapped.text == "[A1_R_4+][A2_R_2+]" and snapped.note.startswith("brevity: goal '0.1' reaches only level 1")
    for bad, words in [("mood=top", "no aspect 'mood'"), ("brevity=top,brev=level:2", "asked for twice"),
                       ("brevity", "use top, a number"), ("brevity=level:1", "aspect 'brevity': goal 'level:1'")]:
        with pytest.raises(ConfigError, match=words):
            inference_goal(s, bad)


def test_untrained_combination_is_noted(capsys):
    s = _setup("gcsl-bey", combination_counts={(3, 2): 4, (4, 2): 1})
    assert inference_goal(s, "negative sentiment=level:4,brevity=level:2").note is None
    goal = inference_goal(s, "top")
    assert "no training row reaches levels negative sentiment 4, brevity 4 together" in goal.note
    assert "no training row reaches" in capsys.readouterr().err


def test_goals_json_round_trips(tmp_path, two_aspect_log):
    res, _, goals = _prepare(two_aspect_log, tmp_path / "rt", "gcsl-bey-nl")
    loaded = GoalSetup.load(tmp_path / "rt")
    assert isinstance(loaded, MultiGoalSetup) and json.loads(json.dumps(loaded.to_json())) == goals
    assert loaded.combination_counts == res.setup.combination_counts
    assert goals["counts"]["rows_out"] == sum(c["rows"] for c in goals["combination_counts"])
    assert set(goals["counts"]["rows_per_level"]) == {"sentiment", "brevity"}
    assert [a["column"] for a in goals["aspects"]] == ["sent", "brev"]
    run = json.loads((tmp_path / "rt" / "run.json").read_text())
    assert run["goals"]["combination_counts"] == goals["combination_counts"]


# -- configuration errors ---------------------------------------------------------------------

def test_aspect_specs_name_the_field_at_fault():
    aspects, problems = read_aspects(["name=a,column=x,range=1:0", "name=b,column=y,direction=lower",
                                      "name=a,column=z,kind=ratio", {"name": "c", "column": "w", "colour": 1}])
    assert problems == [
        "aspects[1].range: give LOW:HIGH (YAML: [LOW, HIGH]) with LOW < HIGH, got ['1', '0']",
        "aspects[2].range: direction=lower flips scores (non-x = high + low - x), which needs range=LOW:HIGH; "
        "or use direction=below",
        "aspects[3].kind: 'ratio' is not one of scalar, ordinal, categorical",
        "aspects[4]: unknown field(s) colour; valid fields are name, column, range, direction, kind, bins, "
        "precision, categories, flipped_name, best_meaning, templates, words"]
    assert aspects == []


def test_prepare_refuses_what_several_aspects_cannot_mean(tmp_path, two_aspect_log):
    with pytest.raises(ConfigError, match="method: dpo reads one score per row"):
        _prepare(two_aspect_log, tmp_path / "d", "dpo")
    with pytest.raises(ConfigError, match=r"metric_name: with --aspect, give it inside each aspect \(name=...\)"):
        _prepare(two_aspect_log, tmp_path / "m", "gcsl", metric_name="quality")
    rows = [json.loads(line) for line in two_aspect_log.read_text().splitlines()]
    rows[0]["brev"] = 1.5
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"aspect 'brevity' \(column 'brev'\): .* line 1: score 1\.5 is above"):
        _prepare(bad, tmp_path / "b", "gcsl")
    code = cli_main(["prepare", "--data", str(two_aspect_log), "--out", str(tmp_path / "c"),
                     "--aspect", "name=a,column=sent", "name=b,column=nope"])
    assert code != 0 and not (tmp_path / "c").exists()


# -- end to end on the tiny model ----------------------------------------------------------------

@pytest.mark.usefixtures("one_torch_thread")
def test_prepare_train_generate_two_aspects(tmp_path, two_aspect_log, tiny_llama_dir):
    from gcsl.config import resolve_config
    from gcsl.generation import GenerateConfig, generate
    from gcsl.training.train import TrainConfig, _goal_token_text, train

    # Aspect tokens start from their own words, as single-aspect [R_k+] start from " at least level k".
    assert _goal_token_text("[A2_R_3+]") == " aspect 2 at least level 3" and _goal_token_text("[A1_R_2]") == (
        " aspect 1 level 2")

    data = tmp_path / "prepared"
    assert cli_main(["prepare", "--data", str(two_aspect_log), "--out", str(data), "--method", "gcsl-bey",
                     "--aspect", *ASPECTS, "--quiet"]) == 0
    model = tmp_path / "model"
    train(TrainConfig(data=data, out=model, model=str(tiny_llama_dir), max_steps=2, per_device_batch_size=4,
                      report_to="none", logging_steps=1, save_steps=50, learning_rate=1e-2))
    card = (model / "README.md").read_text()
    assert "Aspect `sent`: sentiment" in card and "Training rows per level combination:" in card
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    assert len(tokenizer.encode("[A1_R_5+][A2_R_4+]", add_special_tokens=False)) == 2
    lowest_brevity = min(GoalSetup.load(data).aspects[1].retained_levels)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p", "prompt": "Review film 1."}) + "\n")
    out = generate(resolve_config(GenerateConfig, overrides={
        "model": str(model), "prompts": str(prompts), "out": str(tmp_path / "gen.jsonl"), "num_samples": 1,
        "max_new_tokens": 3, "batch_size": 1, "device": "cpu",
        "goal": f"sentiment=top,brevity=level:{lowest_brevity}"}))
    row = json.loads(out.read_text().splitlines()[0])
    setup = GoalSetup.load(model)
    top_sent = max(setup.aspects[0].retained_levels)
    assert row["goal"] == f"[A1_R_{top_sent}+][A2_R_{lowest_brevity}+]"
    assert isinstance(row["completion"], str) and row["goal_request"] == f"sentiment=top,brevity=level:{lowest_brevity}"
    record = json.loads(out.with_name(out.name + ".run.json").read_text())
    assert [a["level"] for a in record["goals"]["aspects"]] == [top_sent, lowest_brevity]


def test_yaml_aspects_list_with_clause_templates_and_a_below_aspect(tmp_path, two_aspect_log):
    config = tmp_path / "prepare.yaml"
    config.write_text(
        "method: gcsl-bey-snl\n"
        "conjunction: ', plus '\n"
        "aspects:\n"
        "  - {name: sentiment, column: sent, range: [0, 1], templates: {snl: '{a_metric} of at least {threshold}'}}\n"
        "  - {name: brevity, column: brev, range: [0, 1], direction: below, precision: 1}\n")
    assert cli_main(["prepare", "--config", str(config), "--data", str(two_aspect_log), "--out", str(tmp_path / "y"),
                     "--quiet"]) == 0
    goals = json.loads((tmp_path / "y" / "goals.json").read_text())
    rows = pq.read_table(tmp_path / "y" / "train.parquet").to_pylist()
    raw = [json.loads(line) for line in two_aspect_log.read_text().splitlines()]
    brevity = goals["aspects"][1]
    # "below": thresholds are upper bounds, met by scores at or under them.
    for r in rows:
        a, b = r["aspect_levels"]
        sent_t, brev_t = r["aspect_thresholds"]
        assert raw[r["row_id"]]["brev"] <= brev_t and brev_t == brevity["thresholds"][b - 1]
        assert r["goal"] == (f"Generate a response with a sentiment score of at least {sent_t:.2f}, plus a brevity "
                             f"score less than {brev_t:.1f}.")
    assert brevity["metric"]["higher_is_better"] is False and brevity["metric"]["flip"] is False


# -- level words per aspect --------------------------------------------------------------------

# Lowest level first, as a single aspect's level_words (configs/cpu/sentiment.yaml, multi-aspect.yaml).
SENT_WORDS = ["very positive", "positive", "mildly positive", "mixed", "negative"]
BREV_WORDS = ["long", "fairly long", "fairly short", "short"]
WORD_TEMPLATES = ({"bey": "{level_word} or more negative ({a_metric} greater than {threshold})"},
                  {"bey": "{level_word} or shorter (fewer than {threshold} words)"})


def test_two_aspect_goal_text_leads_with_each_aspects_level_word():
    def aspect(name, thresholds, words, templates, **spec_kw):
        spec = MetricSpec(name=name, subject="a review", **spec_kw)
        base = default_aspect_templates(spec)
        if spec.low is None:  # prepare drops the range sentence of an aspect without a range
            del base["detail"]
        return GoalSetup("gcsl-bey-nl", spec, thresholds, (len(thresholds) - 1, len(thresholds)), 0.3,
                         len(thresholds), {**base, **templates}, level_words=tuple(words))

    setup = MultiGoalSetup("gcsl-bey-nl", (
        aspect("negative sentiment", (0.0, 0.1, 0.3, 0.57, 0.8), SENT_WORDS, WORD_TEMPLATES[0], low=0, high=1),
        # "below": thresholds are stored negated (oriented), so -40 reads "fewer than 40".
        aspect("brevity", (-46.0, -40.0, -33.0, -29.0), BREV_WORDS, WORD_TEMPLATES[1], higher_is_better=False,
               flip=False, precision=0)), sentence="Write {subject} that is {goals}.{details}")
    assert inference_goal(setup, "top").text == (
        "Write a review that is negative or more negative (a negative sentiment score greater than 0.80) and short "
        "or shorter (fewer than 29 words). Negative sentiment scores range from 0 to 1, with 1 indicating the "
        "highest negative sentiment.")
    assert setup.goal_text(combination_ids(np.array([[4, 2]]), setup.sizes)[0]).startswith(
        "Write a review that is mixed or more negative (a negative sentiment score greater than 0.57) and fairly "
        "long or shorter (fewer than 40 words).")


def test_aspect_words_must_name_every_bin():
    aspects, problems = read_aspects([
        "name=sentiment,column=sent,range=0:1,words=negative|mixed|positive",
        {"name": "brevity", "column": "brev", "bins": 4, "words": BREV_WORDS[:3]},
        {"name": "stars", "column": "s", "kind": "ordinal", "words": ["bad", "good"]},
        {"name": "tone", "column": "t", "words": "calm|loud"}])
    assert problems == [
        "aspects[1].words: aspect 'sentiment' has 5 bins, so give 5 words, lowest level first; got 3",
        "aspects[2].words: aspect 'brevity' has 4 bins, so give 4 words, lowest level first; got 3",
        "aspects[3].words: ordinal feedback names its levels already; drop words",
        "aspects[4].words: a list of non-empty words, lowest level first (CLI: words=low|mid|high)"]
    assert aspects == []
    cli = "name=sentiment,column=sent,range=0:1,words=" + "|".join(SENT_WORDS)
    assert read_aspects([cli])[0][0].words == tuple(SENT_WORDS)

    def refused(**kw):
        return PrepareConfig(data="log.jsonl", out=Path("x"), method="gcsl-bey-nl", **kw).validate()

    assert refused(aspects=[*ASPECTS[:1], {"name": "brevity", "column": "brev", "templates": WORD_TEMPLATES[1]}]) == [
        "aspect 'brevity': its templates state {level_word}; give it words=..., one per bin, lowest first"]
    assert refused(aspects=list(ASPECTS), level_words=SENT_WORDS) == [
        "level_words: with several aspects give each aspect its own words (YAML aspects[i].words: [...], CLI "
        "words=a|b|c), lowest level first"]


def test_aspect_words_must_name_the_bins_ties_leave(tmp_path, two_aspect_log):
    tied = tmp_path / "tied.jsonl"
    rows = [json.loads(line) for line in two_aspect_log.read_text().splitlines()]
    tied.write_text("".join(json.dumps({**r, "brev": [0.1, 0.1, 0.1, 0.5, 0.9][i % 5]}) + "\n"
                            for i, r in enumerate(rows)))
    words = "|".join(["a", "b", "c", "d", "e"])
    with pytest.raises(DataError, match=r"aspect 'brevity' \(column 'brev'\): .*ties left 3 bins, but words names 5; "
                                        r"give 3 words or fewer bins"):
        prepare(PrepareConfig(data=str(tied), out=tmp_path / "t", method="gcsl-bey-nl", quiet=True,
                              aspects=[ASPECTS[0], f"{ASPECTS[1]},words={words}"]))


def test_yaml_aspect_words_reach_the_goals_and_round_trip_through_goals_json(tmp_path, two_aspect_log):
    config = tmp_path / "prepare.yaml"
    config.write_text(
        "method: gcsl-bey-nl\n"
        "subject: a review\n"
        "aspect_sentence: 'Write {subject} that is {goals}.{details}'\n"
        "aspects:\n"
        f"  - {{name: negative sentiment, column: sent, range: [0, 1], words: {json.dumps(SENT_WORDS)},\n"
        f"     templates: {json.dumps(WORD_TEMPLATES[0])}}}\n"
        f"  - {{name: brevity, column: brev, direction: below, bins: 4, words: {json.dumps(BREV_WORDS)},\n"
        f"     templates: {json.dumps(WORD_TEMPLATES[1])}}}\n")
    out = tmp_path / "words"
    assert cli_main(["prepare", "--config", str(config), "--data", str(two_aspect_log), "--out", str(out),
                     "--quiet"]) == 0
    goals = json.loads((out / "goals.json").read_text())
    assert [a.get("level_words") for a in goals["aspects"]] == [SENT_WORDS, BREV_WORDS]
    sent, brev = (a["thresholds"] for a in goals["aspects"])
    rows = pq.read_table(out / "train.parquet").to_pylist()
    assert rows
    for r in rows:
        a, b = r["aspect_levels"]
        assert r["goal"] == (f"Write a review that is {SENT_WORDS[a - 1]} or more negative (a negative sentiment "
                             f"score greater than {sent[a - 1]:.2f}) and {BREV_WORDS[b - 1]} or shorter (fewer than "
                             f"{brev[b - 1]:.2f} words). Negative sentiment scores range from 0 to 1, with 1 "
                             "indicating the highest negative sentiment.")
    loaded = GoalSetup.load(out)
    assert isinstance(loaded, MultiGoalSetup)
    assert [a.level_words for a in loaded.aspects] == [tuple(SENT_WORDS), tuple(BREV_WORDS)]
    assert json.loads(json.dumps(loaded.to_json())) == goals
    top = inference_goal(loaded, "top")
    assert top.text == next(r["goal"] for r in rows if r["aspect_levels"] == [a.level for a in top.aspects])
