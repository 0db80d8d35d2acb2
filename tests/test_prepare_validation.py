"""`gcsl prepare` on malformed, ambiguous and unusual inputs: each either stops with one line naming the
file, the physical line and the fix (exit code 2, no output folder), or keeps every row exactly."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gcsl.cli import main
from gcsl.data.prepare import PrepareConfig, prepare
from gcsl.errors import DataError, GcslError


def _rows(n: int = 4) -> list[dict]:
    return [{"prompt": f"p{i}", "response": f"r{i}", "score": i / (n - 1)} for i in range(n)]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _fails(tmp_path: Path, capsys, name: str, content: str | bytes, *extra: str) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = main(["prepare", "--data", str(path), "--out", str(tmp_path / "o"), "--bins", "2", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
    return err


def _kept(tmp_path: Path, path: Path, **kw) -> list[dict]:
    res = prepare(PrepareConfig(data=str(path), out=tmp_path / "out", method="sft", sft_top=1.0, quiet=True,
                                bins=2, **kw))
    rows = pq.read_table(res.out / "train.parquet").to_pylist()
    return sorted(rows, key=lambda r: r["row_id"])


# 1. Inputs that used to end in a traceback.

def test_duplicate_csv_column_names(tmp_path, capsys):
    err = _fails(tmp_path, capsys, "log.csv", "prompt,response,score,score\na,b,0.1,0.2\nc,d,0.3,0.4\n")
    assert "log.csv line 1: column 'score' appears 2 times in the header" in err


@pytest.mark.parametrize("message,fragment", [
    ({"role": "user"}, "line 2: prompt message 1 has no content"),
    ({"role": "user", "content": None}, "line 2: prompt message 1 has no content"),
])
def test_chat_messages_without_content(tmp_path, capsys, message, fragment):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "response": "r", "score": 0.1},
            {"prompt": [message], "response": "r", "score": 0.9}]
    assert fragment in _fails(tmp_path, capsys, "log.jsonl", _jsonl(rows))


def test_list_of_strings_as_prompt(tmp_path, capsys):
    rows = [{"prompt": ["hello", "there"], "response": "r", "score": s} for s in (0.1, 0.9)]
    err = _fails(tmp_path, capsys, "log.jsonl", _jsonl(rows))
    assert "log.jsonl line 1: prompt message 1 is text, not a {role, content} message" in err


def test_lone_surrogate(tmp_path, capsys):
    content = '{"prompt": "a", "response": "b", "score": 0.1}\n{"prompt": "\\ud800", "response": "b", "score": 0.9}\n'
    err = _fails(tmp_path, capsys, "log.jsonl", content)
    assert "log.jsonl line 2: holds a lone surrogate escape" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text(_jsonl(_rows()))
    path.chmod(0)
    try:
        code = main(["prepare", "--data", str(path), "--out", str(tmp_path / "o")])
    finally:
        path.chmod(0o600)
    err = capsys.readouterr().err
    assert code == 2 and "log.jsonl: cannot open the file (permission denied)" in err and "Traceback" not in err


def test_open_refused_by_the_system(tmp_path, capsys, monkeypatch):
    # The same path as a permission-denied file, for runs as root (which can open any file).
    path = tmp_path / "log.jsonl"
    path.write_text(_jsonl(_rows()))
    real_open = Path.open

    def refuse(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    code = main(["prepare", "--data", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "log.jsonl: cannot open the file (permission denied)" in err and "Traceback" not in err


# 2. Silent corruption and coercion.

def test_invalid_utf8_in_jsonl(tmp_path, capsys):
    content = b'{"prompt": "a", "response": "b", "score": 0.1}\n\n{"prompt": "a", "response": "\xff", "score": 0.9}\n'
    err = _fails(tmp_path, capsys, "log.jsonl", content)
    assert "log.jsonl line 3: not valid UTF-8 (byte 30 of the line)" in err


def test_boolean_scores(tmp_path, capsys):
    rows = [{"prompt": "a", "response": "b", "score": s} for s in (True, False)]
    err = _fails(tmp_path, capsys, "log.jsonl", _jsonl(rows))
    assert "log.jsonl line 1: score true is true/false, not a number (2 rows like this)" in err


@pytest.mark.parametrize("value", ["1_0", "0x10", "true", "1,5"])
def test_csv_score_must_be_a_plain_number(tmp_path, capsys, value):
    err = _fails(tmp_path, capsys, "log.csv", f'prompt,response,score\na,b,0.5\nc,d,"{value}"\n')
    assert f"log.csv line 3: score '{value}' is not a number" in err


def test_jsonl_scores_written_as_text_are_refused(tmp_path, capsys):
    rows = [{"prompt": "a", "response": "b", "score": s} for s in ("0.1", "1_0")]
    err = _fails(tmp_path, capsys, "log.jsonl", _jsonl(rows))
    assert "log.jsonl line 1: score '0.1' is text, not a number (2 rows like this)" in err


def test_duplicated_json_key(tmp_path, capsys):
    content = '{"prompt": "a", "response": "b", "score": 0.1}\n{"prompt": "a", "response": "b", "score": 0.2, "score": 0.9}\n'
    err = _fails(tmp_path, capsys, "log.jsonl", content)
    assert "log.jsonl line 2: key 'score' appears twice in one object" in err


@pytest.mark.parametrize("field,fragment", [("prompt", "line 2: prompt is empty"),
                                            ("response", "line 2: response is empty")])
def test_whitespace_only_text(tmp_path, capsys, field, fragment):
    rows = _rows()
    rows[1][field] = " \t\n "
    assert fragment in _fails(tmp_path, capsys, "log.jsonl", _jsonl(rows))


def test_whitespace_only_chat_prompt(tmp_path, capsys):
    rows = [{"prompt": [{"role": "user", "content": c}], "response": "r", "score": s}
            for c, s in (("hi", 0.1), ("  ", 0.9))]
    assert "log.jsonl line 2: prompt is empty" in _fails(tmp_path, capsys, "log.jsonl", _jsonl(rows))


# 3. Locations.

def test_csv_physical_lines_after_blank_lines_and_quoted_newlines(tmp_path, capsys):
    content = 'prompt,response,score\n\n"multi\nline",b,0.1\n\nc,"x\ny\nz",0.2\nd,e,oops\n'
    err = _fails(tmp_path, capsys, "log.csv", content)
    assert "log.csv line 9: score 'oops' is not a number" in err


def test_csv_field_count_reported_with_its_line(tmp_path, capsys):
    err = _fails(tmp_path, capsys, "log.csv", 'prompt,response,score\n"a\nb",c,0.1\nd,e\n')
    assert "log.csv line 4: 2 fields but the header has 3" in err


@pytest.mark.parametrize("row,fragment", [
    ({"prompt": "a", "response": "b", "score": "0.4"}, "line 3: 'score' is text here but a number on line 1"),
    ({"prompt": {"text": "a"}, "response": "b", "score": 0.4}, "line 3: 'prompt' is an object here but text on line 1"),
])
def test_column_whose_rows_disagree_on_type(tmp_path, capsys, row, fragment):
    assert fragment in _fails(tmp_path, capsys, "log.jsonl", _jsonl(_rows(2)) + json.dumps(row) + "\n")


def test_chat_content_whose_type_differs_between_rows(tmp_path, capsys):
    rows = [{"prompt": [{"role": "user", "content": c}], "response": "r", "score": s} for c, s in (("x", 0.1), (5, 0.9))]
    err = _fails(tmp_path, capsys, "log.jsonl", _jsonl(rows))
    assert "log.jsonl line 2: 'prompt[].content' is a number here but text on line 1" in err


def test_csv_scores_reach_later_stages_as_numbers(tmp_path):
    from gcsl.data.load import read_feedback

    path = tmp_path / "log.csv"
    path.write_text("prompt,response,score\na,b,1\nc,d, 2\n\ne,f,\n")
    table, fmt = read_feedback(str(path))
    assert fmt == "csv" and table.column("score_raw").type == pa.int64()
    assert table.column("score_raw").to_pylist() == [1, 2, None]
    path.write_text("prompt,response,score\na,b,1\nc,d,2.5e-1\n")
    assert read_feedback(str(path))[0].column("score_raw").to_pylist() == [1.0, 0.25]


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_jsonl_file(tmp_path, capsys, content):
    err = _fails(tmp_path, capsys, "log.jsonl", content)
    assert "log.jsonl: the file is empty (no JSON records)" in err


def test_empty_csv_file(tmp_path, capsys):
    assert "log.csv: the file is empty (no header line)" in _fails(tmp_path, capsys, "log.csv", "")


# 4. Valid files that used to be refused or changed.

def test_csv_text_that_looks_numeric_or_boolean_stays_text(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text('prompt,response,score\n007,true,1\n1e3,FALSE,2\n0.50,True,3\nNA,false,4\n')
    rows = _kept(tmp_path, path)
    assert [(r["prompt_text"], r["completion"], r["score"]) for r in rows] == [
        ("007", "true", 1.0), ("1e3", "FALSE", 2.0), ("0.50", "True", 3.0), ("NA", "false", 4.0)]
    path.write_text('prompt,response,score\n"  x",null,1\n"",b,2\n')
    with pytest.raises(GcslError, match=r"log.csv line 3: prompt is empty"):
        _kept(tmp_path, path)


def test_csv_ten_megabyte_field(tmp_path):
    big = "y" * (10 * 2**20)
    path = tmp_path / "log.csv"
    path.write_text(f'prompt,response,score\na,"{big}",0.1\nb,c,0.9\n')
    rows = _kept(tmp_path, path)
    assert rows[0]["completion"] == big and rows[1]["completion"] == "c"


def test_jsonl_ten_megabyte_line(tmp_path):
    big = "z" * (10 * 2**20)
    path = tmp_path / "log.jsonl"
    path.write_text(_jsonl([{"prompt": "a", "response": big, "score": 0.1}, {"prompt": "b", "response": "c", "score": 0.9}]))
    rows = _kept(tmp_path, path)
    assert rows[0]["completion"] == big and rows[1]["completion"] == "c"


def test_parquet_dictionary_encoded_strings(tmp_path):
    table = pa.table({"prompt": pa.array(["a", "b", "a"]).dictionary_encode(),
                      "response": pa.array(["x", "y", "z"]).dictionary_encode(),
                      "score": [0.1, 0.5, 0.9]})
    pq.write_table(table, tmp_path / "log.parquet")
    rows = _kept(tmp_path, tmp_path / "log.parquet")
    assert [(r["prompt_text"], r["completion"], r["score"]) for r in rows] == [
        ("a", "x", 0.1), ("b", "y", 0.5), ("a", "z", 0.9)]


# 5. Goal text.

def test_goals_without_range_leave_out_the_range_sentence_and_say_so(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text(_jsonl([{"prompt": f"p{i}", "response": "r", "score": 2 + i} for i in range(10)]))
    for method in ("gcsl-bey-nl", "gcsl-nl", "gcsl-noquant-nl"):
        assert main(["prepare", "--data", str(path), "--out", str(tmp_path / method), "--bins", "2",
                     "--method", method]) == 0
        err = capsys.readouterr().err
        goals = json.loads((tmp_path / method / "goals.json").read_text())
        rows = pq.read_table(tmp_path / method / "train.parquet").to_pylist()
        note = "no --range given: goals leave out the sentence stating the metric's range; pass --range LOW HIGH"
        assert any(n.startswith(note) for n in goals["notes"]) and f"note: {note}" in err
        assert all(" range from" not in r["goal"] and r["goal"].endswith(".") for r in rows), method
    assert rows[1]["goal"] == "Generate a response with a score of 3.00."
    rows = pq.read_table(tmp_path / "gcsl-bey-nl" / "train.parquet").to_pylist()
    assert rows[-1]["goal"] == "Generate a response with a score greater than 7.00."
    # With --range the sentence is there, and no note.
    assert main(["prepare", "--data", str(path), "--out", str(tmp_path / "r"), "--bins", "2", "--quiet",
                 "--range", "0", "20"]) == 0
    goals = json.loads((tmp_path / "r" / "goals.json").read_text())
    assert goals["inference_goal"]["text"] == ("Generate a response with a score greater than 7.00. Scores range "
                                               "from 0 to 20, with 20 indicating the highest score.")
    assert not any("--range" in n for n in goals["notes"])


def test_own_template_naming_the_range_needs_range(tmp_path):
    cfg = PrepareConfig(data="x.jsonl", out=tmp_path / "o", templates={"bey": "Aim above {threshold} of {high}."})
    assert "templates.bey: {high} need --range LOW HIGH (no range is known to state)" in cfg.validate()


def test_ordinal_with_too_many_levels_is_refused_unless_asked(tmp_path, capsys):
    content = _jsonl([{"prompt": f"p{i}", "response": "r", "score": s} for i, s in enumerate((1, 5, 1e6))])
    err = _fails(tmp_path, capsys, "log.jsonl", content, "--kind", "ordinal")
    assert "log.jsonl: --kind ordinal over the scores from 1 to 1e+06 makes 1000000 levels, more than " \
           "--max-levels 100" in err
    path = tmp_path / "small.jsonl"
    path.write_text(_jsonl([{"prompt": f"p{i}", "response": "r", "score": s} for i, s in enumerate((1, 5, 150))]))
    assert main(["prepare", "--data", str(path), "--out", str(tmp_path / "o2"), "--kind", "ordinal", "--quiet",
                 "--max-levels", "150"]) == 0
    assert len(json.loads((tmp_path / "o2" / "goals.json").read_text())["thresholds"]) == 150
    err = _fails(tmp_path, capsys, "small.jsonl", path.read_text(), "--kind", "ordinal", "--range", "1", "1000")
    assert "range: --kind ordinal over --range 1 1000 makes 1000 levels, more than --max-levels 100" in err


# 6. Mutated files: every row kept exactly, or one gcsl error.

_BASE = [{"prompt": ["Say hi", "Tell a joke", "Ünïcode ☃", "p3", "p4", "p5"][i], "response": f"answer {i}",
          "score": [0.1, 0.25, 0.5, 0.75, 0.9, 1.0][i]} for i in range(6)]


def _mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    for op, pos, byte in ops:
        pos %= max(len(data), 1)
        if op == "flip":
            data = data[:pos] + bytes([byte]) + data[pos + 1:]
        elif op == "truncate":
            data = data[:pos]
        elif op == "dup-key":
            lines = data.split(b"\n")
            i = pos % len(lines)
            lines[i] = lines[i].replace(b'"score": ', b'"score": 0.3, "score": ', 1)
            data = b"\n".join(lines)
        elif op == "swap-type":
            lines = data.split(b"\n")
            i = pos % len(lines)
            swaps = [(rb'"score": ([^,}]+)', rb'"score": "\1"'), (rb'"prompt": ("[^"]*")', rb'"prompt": [\1]'),
                     (rb'"response": "[^"]*"', rb'"response": 1'), (rb'"score": [^,}]+', rb'"score": true')]
            pattern, repl = swaps[byte % len(swaps)]
            lines[i] = re.sub(pattern, repl, lines[i], count=1)
            data = b"\n".join(lines)
    return data


def test_mutated_jsonl_is_kept_exactly_or_refused_in_one_line(tmp_path_factory):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    ops = st.lists(st.tuples(st.sampled_from(["flip", "truncate", "dup-key", "swap-type"]),
                             st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=3)

    @hypothesis.settings(max_examples=50, deadline=None, database=None, derandomize=True)
    @hypothesis.given(ops)
    def check(mutations):
        tmp = tmp_path_factory.mktemp("m")
        path = tmp / "log.jsonl"
        path.write_bytes(_mutate(_jsonl(_BASE).encode(), mutations))
        try:
            res = prepare(PrepareConfig(data=str(path), out=tmp / "o", method="sft", sft_top=1.0, bins=2, quiet=True))
        except GcslError as exc:
            assert "\n" not in str(exc) and str(exc)
            return
        records = [json.loads(line, strict=False) for line in path.read_bytes().split(b"\n") if line.strip()]
        rows = pq.read_table(res.out / "train.parquet").to_pylist()
        assert len(rows) == len(records) == res.rows_in
        for r in rows:
            rec = records[r["row_id"]]
            assert (r["prompt_text"], r["completion"], r["score"]) == (rec["prompt"], rec["response"], rec["score"])

    check()


_CSV = b'prompt,response,score\n"multi\nline",true,0.1\n\nb,"x, y",0.25\n007,NA,0.5\nd,"q""q",0.75\n'


def test_mutated_csv_is_kept_exactly_or_refused_in_one_line(tmp_path_factory):
    import csv
    import io

    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    ops = st.lists(st.tuples(st.sampled_from(["flip", "truncate"]), st.integers(0, 10**6), st.integers(0, 255)),
                   min_size=1, max_size=3)

    @hypothesis.settings(max_examples=50, deadline=None, database=None, derandomize=True)
    @hypothesis.given(ops)
    def check(mutations):
        data = _mutate(_CSV, mutations)
        tmp = tmp_path_factory.mktemp("c")
        path = tmp / "log.csv"
        path.write_bytes(data)
        try:
            res = prepare(PrepareConfig(data=str(path), out=tmp / "o", method="sft", sft_top=1.0, bins=2, quiet=True))
        except GcslError as exc:
            assert "\n" not in str(exc) and str(exc)
            return
        records = [r for r in csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")) if r]
        header, records = records[0], records[1:]
        rows = pq.read_table(res.out / "train.parquet").to_pylist()
        assert len(rows) == len(records) == res.rows_in
        for r in rows:
            rec = dict(zip(header, records[r["row_id"]]))
            assert (r["prompt_text"], r["completion"], r["score"]) == \
                (rec["prompt"], rec["response"], float(rec["score"]))

    check()


def test_an_object_split_over_two_lines_is_refused_at_its_first_line(tmp_path):
    # The Arrow reader would take it as one record; JSON Lines is one object per line.
    path = tmp_path / "split.jsonl"
    path.write_text('{"prompt":\n "p", "response": "r", "score": 0.1}\n\n'
                    '{"prompt": "q", "response": "s", "score": 0.9}\n{"prompt": "u", "response": "v", "score": 0.5}\n')
    with pytest.raises(DataError, match=r"split\.jsonl line 1: not valid JSON"):
        prepare(PrepareConfig(data=str(path), out=tmp_path / "o", method="sft", bins=2, quiet=True))
    assert not (tmp_path / "o").exists()
    blank = tmp_path / "blank.jsonl"  # blank lines between records are fine
    blank.write_text('\n{"prompt": "p", "response": "r", "score": 0.1}\n\n{"prompt": "q", "response": "s", '
                     '"score": 0.9}\n  \n')
    assert prepare(PrepareConfig(data=str(blank), out=tmp_path / "b", method="sft", bins=2, sft_top=1.0,
                                 quiet=True)).rows_in == 2


def test_a_control_character_before_a_csv_score_is_not_a_number(tmp_path):
    path = tmp_path / "ctl.csv"
    path.write_bytes(b"prompt,response,score\np,r,0.2\nq,s,\x1c.1\nu,v,0.9\n")
    with pytest.raises(DataError, match=r"ctl\.csv line 3: score '\\x1c\.1' is not a number"):
        prepare(PrepareConfig(data=str(path), out=tmp_path / "o", method="sft", bins=2, quiet=True))
