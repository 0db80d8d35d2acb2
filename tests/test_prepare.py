"""`gcsl prepare` end to end on small real files: every method, every format, every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gcsl.cli import main
from gcsl.data.prepare import PrepareConfig, prepare


def _write_log(path: Path, n: int = 20, *, prompts_per: int = 2, chat: bool = False) -> Path:
    rows = []
    for i in range(n):
        p = f"Prompt {i // prompts_per}"
        rows.append({"prompt": [{"role": "user", "content": p}] if chat else p,
                     "response": f"response {i}", "score": i / (n - 1)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return _write_log(tmp_path / "log.jsonl")


def _run(tmp_path: Path, log: Path, method: str, **kw):
    cfg = PrepareConfig(data=str(log), out=tmp_path / method, method=method, quiet=True, score_range=[0, 1], **kw)
    res = prepare(cfg)
    return res, pq.read_table(res.out / "train.parquet").to_pylist(), json.loads((res.out / "goals.json").read_text())


def test_gcsl_bey_nl_expansion_with_filtering(tmp_path, log):
    res, rows, goals = _run(tmp_path, log, "gcsl-bey-nl")
    # 20 distinct scores in 5 bins of 4; mean 0.5 -> thresholds above it: levels 4 (0.63) and 5 (0.84).
    assert goals["thresholds"] == pytest.approx([0.0, 4 / 19, 8 / 19, 12 / 19, 16 / 19])
    assert goals["retained_levels"] == [4, 5]
    assert len(rows) == 4 + 2 * 4  # bin-4 rows once, bin-5 rows twice
    assert goals["dropped"] == {"below every retained goal": 12}
    r = [x for x in rows if x["row_id"] == 19]
    assert [x["goal_level"] for x in r] == [4, 5]
    assert r[1]["prompt"] == "Prompt 9\n\n" + r[1]["goal"]
    assert r[1]["goal"] == ("Generate a response with a score greater than 0.84. Scores range from 0 to 1, "
                            "with 1 indicating the highest score.")
    assert r[1]["completion"] == "response 19"
    assert r[1]["threshold"] == pytest.approx(16 / 19)
    assert goals["inference_goal"]["level"] == 5
    assert (res.out / "run.json").exists()
    run = json.loads((res.out / "run.json").read_text())
    assert run["config"]["method"] == "gcsl-bey-nl" and "pyarrow" in run["versions"]


def test_no_filter_keeps_all_levels(tmp_path, log):
    _, rows, goals = _run(tmp_path, log, "gcsl-bey", filter=False)
    assert goals["retained_levels"] == [1, 2, 3, 4, 5]
    assert len(rows) == 4 * (1 + 2 + 3 + 4 + 5)
    assert {x["goal"] for x in rows} == {f"[R_{k}+]" for k in range(1, 6)}
    assert goals["special_tokens"] == [f"[R_{k}+]" for k in range(1, 6)]


def test_classic_and_nl_one_row_each(tmp_path, log):
    _, rows, goals = _run(tmp_path, log, "gcsl")
    assert len(rows) == 20 and rows[0]["goal"] == "[R_1]" and rows[-1]["goal"] == "[R_5]"
    _, rows, _ = _run(tmp_path, log, "gcsl-nl")
    assert "between 0.84 and 1" in rows[-1]["goal"] or "between 0.84 and 1.00" in rows[-1]["goal"]
    assert "between 0.00 and 0.21" in rows[0]["goal"]


def test_sft_sft_aug_and_snl(tmp_path, log):
    _, rows, _ = _run(tmp_path, log, "sft")
    assert sorted(x["row_id"] for x in rows) == list(range(15, 20))  # top 25% of 20
    assert all(x["goal"] is None and x["prompt"] == x["prompt_text"] for x in rows)
    _, rows, _ = _run(tmp_path / "c", log, "sft", sft_cutoff=0.9)
    assert sorted(x["row_id"] for x in rows) == [18, 19]
    _, aug, _ = _run(tmp_path, log, "sft-aug")
    assert len(aug) == 12 and all(x["goal"] is None for x in aug)
    _, snl, _ = _run(tmp_path, log, "gcsl-bey-snl")
    assert snl[-1]["goal"] == "Generate a response with a score greater than 0.84."


def test_noquant_variants(tmp_path, log):
    _, rows, _ = _run(tmp_path, log, "gcsl-noquant-nl")
    assert len(rows) == 20 and "score of 0.05" in rows[1]["goal"]
    _, rows, goals = _run(tmp_path, log, "gcsl-noquant-embed")
    assert rows[1]["goal"] is None and rows[1]["goal_value"] == pytest.approx(1 / 19)
    assert goals["inference_goal"]["value"] == pytest.approx(0.92)  # mean of the top bin, 2 decimals


def test_dpo_observed_and_sampled(tmp_path, log):
    _, rows, _ = _run(tmp_path, log, "dpo")
    assert len(rows) == 10  # 10 prompts with two responses each -> one pair per prompt
    assert all(r["score_chosen"] > r["score_rejected"] and r["pair_type"] == "observed" for r in rows)
    single = _write_log(tmp_path / "single.jsonl", n=8, prompts_per=1)
    with pytest.raises(Exception, match="--dpo-negatives sampled"):
        _run(tmp_path, single, "dpo")
    _, rows, _ = _run(tmp_path / "s", single, "dpo", dpo_negatives="sampled")
    assert {r["pair_type"] for r in rows} == {"sampled-negative"}
    assert all(r["score_rejected"] is None for r in rows)


def test_chat_prompts_and_placements(tmp_path):
    log = _write_log(tmp_path / "chat.jsonl", chat=True)
    _, rows, _ = _run(tmp_path, log, "gcsl-bey-nl")
    assert rows[0]["prompt"][-1]["content"].startswith("Prompt ")
    assert rows[0]["prompt"][-1]["content"].endswith(rows[0]["goal"])
    assert rows[0]["completion"] == [{"role": "assistant", "content": rows[0]["completion"][0]["content"]}]
    text_log = _write_log(tmp_path / "t.jsonl")
    _, rows, _ = _run(tmp_path / "sys", text_log, "gcsl-bey-nl", placement="system")
    assert rows[0]["prompt"][0] == {"role": "system", "content": rows[0]["goal"]}
    _, rows, _ = _run(tmp_path / "bef", text_log, "gcsl-bey-nl", placement="before")
    assert rows[0]["prompt"].startswith(rows[0]["goal"] + "\n\n")


def test_continuation_prompts_default_to_the_goal_before_the_text(tmp_path, log):
    res, rows, goals = _run(tmp_path, log, "gcsl-bey", continuation=True)
    assert goals["placement"] == "before" and res.setup.placement == "before"
    assert rows[0]["prompt"] == rows[0]["goal"] + "\n\n" + rows[0]["prompt_text"]
    # An explicit placement still wins, and without --continuation auto means after.
    _, rows, goals = _run(tmp_path / "x", log, "gcsl-bey", continuation=True, placement="after")
    assert goals["placement"] == "after" and rows[0]["prompt"] == rows[0]["prompt_text"] + "\n\n" + rows[0]["goal"]
    _, _, goals = _run(tmp_path / "d", log, "gcsl-bey")
    assert goals["placement"] == "after"


def test_formats_csv_parquet_and_saved_dataset(tmp_path, log):
    table = pa.Table.from_pylist([json.loads(x) for x in log.read_text().splitlines()])
    pq.write_table(table, tmp_path / "log.parquet")
    import pyarrow.csv as pcsv

    pcsv.write_csv(table, tmp_path / "log.csv")
    import datasets

    datasets.Dataset(table).save_to_disk(str(tmp_path / "ds"))
    expected = pq.read_table(_run(tmp_path / "j", log, "gcsl-bey-nl")[0].out / "train.parquet")
    for src in ("log.parquet", "log.csv", "ds"):
        got = pq.read_table(_run(tmp_path / src.replace(".", "_"), tmp_path / src, "gcsl-bey-nl")[0].out / "train.parquet")
        assert got.equals(expected), src


def test_column_mapping_and_ordinal_ratings(tmp_path):
    path = tmp_path / "ratings.jsonl"
    path.write_text("".join(json.dumps({"q": f"user {i}", "a": f"item {i}", "stars": 1 + i % 5}) + "\n" for i in range(10)))
    cfg = PrepareConfig(data=str(path), out=tmp_path / "o", prompt_column="q", response_column="a", score_column="stars",
                        kind="ordinal", score_range=[1, 5], metric_name="rating", quiet=True)
    res = prepare(cfg)
    goals = json.loads((res.out / "goals.json").read_text())
    assert goals["thresholds"] == [1, 2, 3, 4, 5]
    assert goals["retained_levels"] == [4, 5]  # mean rating 3
    assert goals["inference_goal"]["text"].startswith("Generate a response with a rating equal or greater than 5.")


def test_same_input_same_bytes(tmp_path, log):
    a = prepare(PrepareConfig(data=str(log), out=tmp_path / "a", quiet=True)).out
    b = prepare(PrepareConfig(data=str(log), out=tmp_path / "b", quiet=True)).out
    for name in ("train.parquet", "goals.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_existing_output_is_not_overwritten(tmp_path, log, capsys):
    assert main(["prepare", "--data", str(log), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    before = (tmp_path / "o" / "train.parquet").read_bytes()
    assert main(["prepare", "--data", str(log), "--out", str(tmp_path / "o"), "--method", "sft"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "o" / "train.parquet").read_bytes() == before


BAD = [
    ('{"prompt": "a", "response": "b", "score": 0.1}\n{"prompt": "a", "response": "b", "score": 0.2\n',
     "log.jsonl line 2: not valid JSON"),
    ('{"prompt": "a", "response": "b", "score": 0.1}\n{"prompt": "a", "response": "b", "score": NaN}\n',
     "log.jsonl line 2: score is missing or NaN"),
    ('{"prompt": "a", "response": "b", "score": 0.1}\n{"prompt": "a", "response": "b", "score": 7}\n',
     "log.jsonl line 2: score 7 is above the range high 1"),
    ('{"prompt": "a", "response": "b", "score": 0.1}\n{"prompt": "a", "response": "  ", "score": 0.2}\n',
     "log.jsonl line 2: response is empty"),
    ('{"prompt": "a", "response": "b", "score": 0.1}\n{"prompt": "a", "response": "c", "score": 0.1}\n',
     "every row has the same score 0.1"),
    ('{"prompt": "a", "response": "b", "scor": 0.1}\n', "column(s) not found: 'score'"),
    ('{"prompt": "a", "response": "b", "score": 0.1}\n\n{"prompt": "a", "response": "b", "score": null}\n',
     "log.jsonl line 3: score is missing or NaN"),
]


@pytest.mark.parametrize("content,message", BAD)
def test_bad_input_one_line_error(tmp_path, capsys, content, message):
    path = tmp_path / "log.jsonl"
    path.write_text(content)
    code = main(["prepare", "--data", str(path), "--out", str(tmp_path / "o"), "--range", "0", "1", "--bins", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_unknown_category_fewer_rows_than_bins_and_config_errors(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text('{"prompt": "a", "response": "b", "score": "good"}\n{"prompt": "a", "response": "b", "score": "great"}\n')
    code = main(["prepare", "--data", str(path), "--out", str(tmp_path / "o"), "--kind", "categorical",
                 "--categories", "bad", "ok", "good"])
    assert code == 2 and "line 2: unknown category 'great'" in capsys.readouterr().err
    path.write_text('{"prompt": "a", "response": "b", "score": 1}\n{"prompt": "a", "response": "b", "score": 2}\n')
    assert main(["prepare", "--data", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "2 rows but --bins 5" in capsys.readouterr().err
    assert main(["prepare", "--data", str(path), "--out", str(tmp_path / "o"), "--sft-top", "3"]) == 2
    assert "sft_top: must be in (0, 1]" in capsys.readouterr().err
    assert main(["prepare", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err


def test_yaml_config_and_cli_override(tmp_path, log):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {log}\nmethod: sft\nsft_top: 0.5\nquiet: true\n")
    assert main(["prepare", "--config", str(cfg), "--out", str(tmp_path / "o"), "--sft-top", "0.1"]) == 0
    rows = pq.read_table(tmp_path / "o" / "train.parquet").to_pylist()
    assert [r["row_id"] for r in rows] == [18, 19]
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nout: y\nbinz: 3\n")
    assert main(["prepare", "--config", str(bad)]) == 2


def test_prepare_does_not_import_torch(tmp_path, log):
    import subprocess
    import sys

    code = ("import sys; from gcsl.cli import main; "
            f"rc = main(['prepare', '--data', {str(log)!r}, '--out', {str(tmp_path / 'o')!r}, '--quiet']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_levels_are_consistent_with_scores(tmp_path, log):
    _, rows, goals = _run(tmp_path, log, "gcsl")
    th = np.array(goals["thresholds"])
    for r in rows:
        assert th[r["goal_level"] - 1] <= r["score"]


WORDS = ["very low", "low", "medium", "high", "very high"]


def test_level_words_stand_beside_the_number_in_training_and_inference_goals(tmp_path, log):
    from gcsl.goals import GoalSetup, inference_goal

    template = {"bey": "Generate {subject} with {a_metric} {cmp} {threshold} ({level_word}).",
                "range": "Generate {subject} rated {level_word}: {a_metric} between {range_low} and {range_high}."}
    _, rows, goals = _run(tmp_path, log, "gcsl-bey-nl", templates=template, level_words=WORDS, filter=False)
    assert goals["level_words"] == WORDS
    by_level = {r["goal_level"]: r["goal"] for r in rows}
    assert by_level[1] == "Generate a response with a score greater than 0.00 (very low)."
    assert by_level[5] == "Generate a response with a score greater than 0.84 (very high)."
    setup = GoalSetup.load(tmp_path / "gcsl-bey-nl")
    assert inference_goal(setup, "top").text == by_level[5]
    assert inference_goal(setup, "0.5").text == "Generate a response with a score greater than 0.50 (medium)."
    _, rows, _ = _run(tmp_path, log, "gcsl-nl", templates=template, level_words=WORDS)
    assert {r["goal_level"]: r["goal"] for r in rows}[2] == \
        "Generate a response rated low: a score between 0.21 and 0.42."


def test_level_words_must_match_the_bins(tmp_path, log):
    from gcsl.errors import DataError

    def problems(**kw):
        return PrepareConfig(data=str(log), out=tmp_path / "x", score_range=[0, 1], **kw).validate()

    assert any(p.startswith("level_words: give one per bin") for p in problems(level_words=WORDS[:3]))
    assert any("{level_word} needs --level-words" in p for p in problems(templates={"bey": "Be {level_word}."}))
    # Ties can leave fewer bins than asked for: the words must name the bins actually used.
    tied = tmp_path / "tied.jsonl"
    tied.write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r", "score": [0.1, 0.1, 0.1, 0.5, 0.9][i % 5]})
                            + "\n" for i in range(20)))
    with pytest.raises(DataError, match="ties left 3 bins, but --level-words names 5"):
        _run(tmp_path, tied, "gcsl-bey-nl", level_words=WORDS)
    # Without words, a goals.json reads and renders exactly as before.
    _, rows, goals = _run(tmp_path, log, "gcsl-bey-nl")
    assert "level_words" not in goals
    assert rows[0]["goal"].startswith("Generate a response with a score greater than")


def test_an_option_given_twice_is_refused_not_overwritten(tmp_path, log, capsys):
    argv = ["prepare", "--data", str(log), "--out", str(tmp_path / "o"), "--score-column", "score",
            "--score-column", "other"]
    assert main(argv) == 2
    assert "--score-column: given more than once" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
