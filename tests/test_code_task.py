"""Code generation evaluation: metrics against hand-computed values, loaders, harness, sandboxed runs."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import uuid
from pathlib import Path

import pytest

from gcsl.config import add_arguments, resolve_config
from gcsl.errors import ConfigError, DataError
from gcsl.tasks.code import (
    CodeEvalConfig,
    beyond_at_k,
    beyond_score,
    evaluate,
    extract_code,
    load_humaneval,
    load_mercury,
    pass_at_k,
    write_prompts,
)

FIXTURE = Path(__file__).parent / "fixtures" / "mercury_small.jsonl"
needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap is not installed (apt-get install bubblewrap)"
)


def _rows(samples: dict[str, list[str]]) -> list[dict]:
    return [
        {
            "prompt_id": tid,
            "prompt": "",
            "goal": None,
            "goal_request": "top",
            "sample": i,
            "completion": text,
            "meta": {"task_id": tid},
        }
        for tid, texts in samples.items()
        for i, text in enumerate(texts)
    ]


def _config(**kw) -> CodeEvalConfig:
    base = {"data": str(FIXTURE), "timeout_s": 3.0, "repeats": 2, "workers": 2, "progress": False}
    base.update(kw)
    return resolve_config(CodeEvalConfig, overrides=base)


# -- metrics ------------------------------------------------------------------------------------
def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # C(3,2)/C(5,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # C(3,3)/C(5,3)
    assert pass_at_k(5, 2, 4) == 1.0  # n - c < k
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    # The product form agrees with exact binomials where those would overflow floats.
    exact = 1 - math.comb(1997, 100) / math.comb(2000, 100)
    assert pass_at_k(2000, 3, 100) == pytest.approx(exact, rel=1e-12)
    for bad in [(5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_beyond_score_hand_computed_and_edge_policies():
    refs = [1.0, 3.0]
    assert beyond_score(2.0, refs) == 0.5
    assert beyond_score(1.0, refs) == 1.0 and beyond_score(3.0, refs) == 0.0
    assert beyond_score(0.5, refs) == 1.0 and beyond_score(4.0, refs) == 0.0  # clipped to [lo, hi]
    assert beyond_score(None, refs) == 0.0  # failing candidate
    assert beyond_score(2.5, [2.0, 4.0, 3.0]) == pytest.approx(0.75)
    # No passing reference.
    assert beyond_score(1.0, []) is None and beyond_score(None, []) is None
    assert beyond_score(1.0, [], no_reference="pass") == 1.0
    assert beyond_score(None, [], no_reference="pass") == 0.0
    # hi == lo.
    assert beyond_score(5.0, [2.0, 2.0]) == 1.0 and beyond_score(None, [2.0]) == 0.0
    assert [beyond_score(r, [2.0], equal_range="step") for r in (1.0, 2.0, 3.0)] == [1.0, 1.0, 0.0]
    assert beyond_score(1.0, [2.0], equal_range="exclude") is None


def test_beyond_at_k_is_mean_of_first_k():
    scores = [1.0, 0.5, 0.0, 0.25]
    assert beyond_at_k(scores, 1) == 1.0
    assert beyond_at_k(scores, 2) == 0.75
    assert beyond_at_k(scores, 4) == pytest.approx(0.4375)
    with pytest.raises(ValueError):
        beyond_at_k(scores, 5)


# -- code extraction ------------------------------------------------------------------------------
def test_extract_code_prefers_python_fences():
    text = "Idea:\n```text\nnot code\n```\nCode:\n```python\nx = 1\n```\nUsage:\n```python\nprint(x)\n```"
    assert extract_code(text) == ("x = 1", "fence-python")
    two = "```python\nprint(f(1))\n```\n```python\ndef f(a):\n    return a\n```"
    assert extract_code(two, entry_point="f") == ("def f(a):\n    return a", "fence-python")
    assert extract_code("```\ny = 2\n```") == ("y = 2", "fence")
    assert extract_code("```py\ndef g():\n    return 3") == (
        "def g():\n    return 3",
        "fence-python",
    )  # cut off
    assert extract_code("return 4\n") == ("return 4\n", "raw")
    assert extract_code("") == ("", "raw")


# -- loaders and prompts --------------------------------------------------------------------------
def test_load_mercury_fixture_schema():
    tasks = load_mercury(FIXTURE)
    assert [t.task_id for t in tasks] == [
        "two-sum",
        "reverse-linked-list",
        "binary-tree-level-order-traversal",
        "median-of-two-sorted-arrays",
    ]
    assert [t.difficulty for t in tasks] == ["Easy", "Easy", "Medium", "Hard"]
    assert tasks[0].entry_point == "twoSum" and len(tasks[0].tests) == 4 and len(tasks[0].references) == 2
    assert tasks[0].tests[0] == {"input": {"nums": [2, 7, 11, 15], "target": 9}, "expected": [0, 1]}
    assert tasks[0].description.startswith("Given an array of integers")


def test_load_mercury_parquet_matches_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mercury.parquet")
    from_parquet, from_jsonl = load_mercury(tmp_path / "mercury.parquet"), load_mercury(FIXTURE)
    assert [(t.task_id, t.tests, t.references) for t in from_parquet] == [
        (t.task_id, t.tests, t.references) for t in from_jsonl
    ]


def test_load_mercury_bad_rows_name_file_and_line(tmp_path):
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()[:2]]
    del rows[1]["entry_point"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*entry_point"):
        load_mercury(bad)
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_mercury(bad)
    rows[0]["difficulty"] = "Trivial"
    bad.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: difficulty 'Trivial'"):
        load_mercury(bad)
    with pytest.raises(DataError, match="file not found"):
        load_mercury(tmp_path / "missing.jsonl")


def test_load_mercury_from_unreachable_hub_is_one_line_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="pass a local Mercury") as info:
        load_mercury("Elfsong/Mercury", split="eval")
    assert "\n" not in str(info.value)


def test_load_humaneval_from_package():
    tasks = load_humaneval()
    assert len(tasks) == 164 and tasks[0].task_id == "HumanEval/0"
    assert tasks[0].entry_point == "has_close_elements" and "def check(candidate)" in tasks[0].tests
    assert tasks[0].difficulty is None


def test_write_prompts_chat_and_text(tmp_path):
    tasks = load_mercury(FIXTURE)
    out = tmp_path / "prompts.jsonl"
    assert write_prompts(tasks, out) == 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [t.task_id for t in tasks]
    assert rows[2]["difficulty"] == "Medium" and rows[2]["entry_point"] == "levelOrder"
    assert rows[0]["task_id"] == "two-sum" and rows[0]["dataset"] == "mercury"
    message = rows[0]["prompt"]
    assert message[0]["role"] == "user" and tasks[0].prompt.rstrip() in message[0]["content"]
    assert write_prompts(tasks[:1], out, style="text") == 1
    text = json.loads(out.read_text())["prompt"]
    assert text == f"'''{tasks[0].description}'''\n{tasks[0].prompt}"
    he = load_humaneval()[:2]
    write_prompts(he, out, style="text")
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == [t.prompt for t in he]


def test_config_cli_and_validation():
    parser = argparse.ArgumentParser()
    add_arguments(parser, CodeEvalConfig)
    args = parser.parse_args(["--dataset", "humaneval", "--k", "1", "5", "--unsafe-no-sandbox"])
    cfg = resolve_config(CodeEvalConfig, args=args)
    assert cfg.dataset == "humaneval" and cfg.k == [1, 5] and cfg.unsafe_no_sandbox is True
    assert cfg.repeats == 5 and cfg.timeout_s == 10.0 and cfg.runtime_statistic == "mean"
    with pytest.raises(ConfigError, match="repeats: must be >= 1.*workers: must be >= 1"):
        resolve_config(CodeEvalConfig, overrides={"repeats": 0, "workers": 0})


def test_generation_rows_that_do_not_fit_are_data_errors():
    with pytest.raises(DataError, match="generations row 1: task 'no-such-task' is not in mercury"):
        evaluate(_rows({"no-such-task": ["x"]}), _config())
    rows = _rows({"two-sum": ["a", "b"]})
    rows[1]["sample"] = 0
    with pytest.raises(DataError, match="generations row 2: task 'two-sum' sample 0 repeats"):
        evaluate(rows, _config())
    with pytest.raises(DataError, match="generations row 1: field 'sample'"):
        evaluate([{"prompt_id": "two-sum", "completion": "x"}], _config())


def test_a_completion_that_is_not_text_is_a_failed_item():
    result = evaluate([{"prompt_id": "two-sum", "sample": 0, "completion": None}], _config())
    assert result.items[0]["passed"] is False
    assert result.metrics["pass@1"] == 0.0


# -- sandboxed evaluation -------------------------------------------------------------------------
FAST_TWO_SUM = """Use a hash map:
```python
class Solution:
    def twoSum(self, nums: List[int], target: int) -> List[int]:
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i
```
This runs in O(n)."""
SLOW_TWO_SUM = """class Solution:
    def twoSum(self, nums, target):
        for i in range(len(nums)):
            for j in range(i + 1, len(nums)):
                if nums[i] + nums[j] == target:
                    return [i, j]
"""
WRONG_TWO_SUM_CODE = "class Solution:\n    def twoSum(self, nums, target):\n        return [0, 0]\n"
WRONG_TWO_SUM = f"```python\n{WRONG_TWO_SUM_CODE}```"
SYNTAX_ERROR = "```python\nclass Solution:\n    def twoSum(self, nums, target)\n        return []\n```"
NO_CODE = "I am sorry, I cannot help with that."
LOOPS_FOREVER = (
    "```python\nclass Solution:\n    def twoSum(self, nums, target):\n"
    "        while True:\n            pass\n```"
)
REVERSE_BODY = (
    "prev = None\n        while head:\n            head.next, prev, head = prev, head, head.next\n"
    "        return prev\n"
)
LEVEL_ORDER = """```py
class Solution:
    def levelOrder(self, root):
        levels, frontier = [], [root] if root else []
        while frontier:
            levels.append([n.val for n in frontier])
            frontier = [c for n in frontier for c in (n.left, n.right) if c]
        return levels
```"""
MEDIAN_RAISES = (
    "```python\nclass Solution:\n    def findMedianSortedArrays(self, a, b):\n        return 1 / 0\n```"
)


@needs_bwrap
def test_mercury_evaluation_end_to_end():
    rows = _rows(
        {
            "two-sum": [FAST_TWO_SUM, SLOW_TWO_SUM, WRONG_TWO_SUM, SYNTAX_ERROR, NO_CODE, LOOPS_FOREVER],
            "reverse-linked-list": [REVERSE_BODY],
            "binary-tree-level-order-traversal": [LEVEL_ORDER],
            "median-of-two-sorted-arrays": [MEDIAN_RAISES],
        }
    )
    # CPU time, one run at a time: two sandboxed runs sharing the 2 cores of a small machine slow each other
    # by up to 40% even in CPU time, which is the size of the fast/slow gap the Beyond checks below need.
    result = evaluate(rows, _config(k=[1, 2], runtime_clock="cpu", workers=1))
    statuses = [it["status"] for it in result.items]
    assert statuses == [
        "passed",
        "passed",
        "failed@cases",
        "failed@load",
        "failed@load",
        "failed@timeout",
        "passed",
        "passed",
        "failed@eval",
    ]
    assert [it["code_source"] for it in result.items][:5] == [
        "fence-python",
        "raw",
        "fence-python",
        "fence-python",
        "raw",
    ]
    assert "ZeroDivisionError" in result.items[8]["reason"] and "SyntaxError" in result.items[3]["reason"]
    # pass@1 per task: two-sum 2/6, reverse 1, level order 1, median 0 (micro-average over the 4 tasks).
    assert result.unit_scores["pass@1"] == pytest.approx(
        {
            "two-sum": 1 / 3,
            "reverse-linked-list": 1.0,
            "binary-tree-level-order-traversal": 1.0,
            "median-of-two-sorted-arrays": 0.0,
        }
    )
    assert result.metrics["pass@1"] == pytest.approx((1 / 3 + 1 + 1 + 0) / 4)
    assert result.metrics["pass@1/Easy"] == pytest.approx((1 / 3 + 1) / 2)
    assert result.metrics["pass@1/Medium"] == 1.0 and result.metrics["pass@1/Hard"] == 0.0
    assert "pass@2" not in result.metrics and any("k=2 not reported" in n for n in result.notes)
    # Beyond: the hash map matches the fast reference, the quadratic scan the slow one.
    fast, slow = result.items[0], result.items[1]
    assert len(fast["runtimes"]) == 2 and len(slow["runtimes"]) == 2
    assert fast["beyond"] >= 0.9 and slow["beyond"] <= 0.5 and fast["beyond"] > slow["beyond"]
    assert all(it["beyond"] == 0.0 for it in result.items[2:6]) and result.items[8]["beyond"] == 0.0
    assert result.unit_scores["beyond@1"]["two-sum"] == fast["beyond"]
    assert result.metrics["beyond@1/Hard"] == 0.0
    # The wrong reference of the median task is left out of its runtime range.
    assert any("8 passed, 1 failed" in n for n in result.notes)
    assert result.n_units == 4 and result.n_generations == 9 and result.task == "code"
    assert result.options["k_reported"] == [1] and "bubblewrap" in result.options["sandbox"]


def _edge_fixture(tmp_path: Path) -> Path:
    rows = {r["slug_name"]: r for r in map(json.loads, FIXTURE.read_text().splitlines())}
    broken = dict(rows["two-sum"], slug_name="two-sum-broken-refs")
    broken["solutions"] = [{"hash": 1, "runtime": "1ms", "solution": WRONG_TWO_SUM_CODE}]
    single = dict(rows["two-sum"], slug_name="two-sum-one-ref")
    single["solutions"] = [rows["two-sum"]["solutions"][1]]  # the fast hash-map reference only
    path = tmp_path / "edge.jsonl"
    path.write_text(json.dumps(broken) + "\n" + json.dumps(single) + "\n")
    return path


@needs_bwrap
def test_beyond_edge_policies(tmp_path):
    data = _edge_fixture(tmp_path)
    rows = _rows({"two-sum-broken-refs": [FAST_TWO_SUM], "two-sum-one-ref": [SLOW_TWO_SUM]})
    default = evaluate(rows, _config(data=str(data), repeats=1))
    assert [it["status"] for it in default.items] == ["passed", "passed"]
    # No passing reference: excluded and named; hi == lo: a passing candidate scores 1.0.
    assert default.unit_scores["beyond@1"] == {"two-sum-one-ref": 1.0}
    assert default.items[0]["beyond"] is None
    assert any("two-sum-broken-refs (no passing reference solution)" in n for n in default.notes)
    assert default.options["beyond_excluded"] == ["two-sum-broken-refs"]
    assert default.metrics["pass@1"] == 1.0
    strict = evaluate(rows, _config(data=str(data), repeats=1, no_reference="pass", equal_range="step"))
    # pass/fail for the task without references; the quadratic scan is slower than the one reference.
    assert strict.unit_scores["beyond@1"] == {"two-sum-broken-refs": 1.0, "two-sum-one-ref": 0.0}
    assert strict.metrics["beyond@1"] == 0.5
    dropped = evaluate(rows, _config(data=str(data), repeats=1, equal_range="exclude"))
    assert "beyond@1" not in dropped.metrics and len(dropped.options["beyond_excluded"]) == 2


def _marker_processes(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(entry.name)
        except OSError:
            continue
    return found


@needs_bwrap
def test_attacks_end_as_failed_items_and_the_evaluation_completes(tmp_path):
    probe = Path(__file__).parent / f".attack-probe-{uuid.uuid4().hex[:8]}"
    marker = f"gcsl-attack-{uuid.uuid4().hex[:8]}"
    attacks = {
        "fork bomb": f"import os, subprocess\nsubprocess.Popen(['/bin/sleep', '300', '{marker}'])\n"
        "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "memory bomb": "blocks = [bytearray(64 << 20) for _ in range(100)]\n",
        "infinite loop": LOOPS_FOREVER,
        "write outside": f"open({str(probe)!r}, 'w').write('pwned')\n",
        "network": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n",
        "kill parent": (
            "import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\n"
            "os.kill(-1, signal.SIGKILL)\ntime.sleep(1)\n"
        ),
        "output flood": "import sys\nwhile True:\n    sys.stdout.write('x' * 10000)\n",
    }
    # Module-level attacks in files that also define a (useless) Solution, so no starter code is prepended.
    rows = _rows(
        {"two-sum": [FAST_TWO_SUM, *(code + "\nclass Solution:\n    pass\n" for code in attacks.values())]}
    )
    start = time.perf_counter()
    # One worker: a fork bomb hogging both cores would otherwise push its neighbours past their timeout.
    result = evaluate(rows, _config(repeats=1, memory_mb=256, max_output_kb=64, timeout_s=2.5, workers=1))
    assert time.perf_counter() - start < 60
    items = dict(zip(["correct", *attacks], result.items))
    assert items["correct"]["status"] == "passed"
    expected = {
        "fork bomb": {"failed@timeout"},
        "memory bomb": {"failed@error"},
        "infinite loop": {"failed@timeout"},
        "write outside": {"failed@load"},
        "network": {"failed@load"},
        "kill parent": {"failed@error", "failed@load"},  # load: Solution has no twoSum
        "output flood": {"failed@error"},
    }
    for name, allowed in expected.items():
        assert items[name]["status"] in allowed, (name, items[name])
        assert items[name]["passed"] is False and items[name]["beyond"] == 0.0 and items[name]["reason"]
    assert "MemoryError" in items["memory bomb"]["reason"]
    assert "output_limit" in items["output flood"]["reason"]
    assert result.unit_scores["pass@1"]["two-sum"] == pytest.approx(1 / 8)
    assert not probe.exists()
    time.sleep(0.2)
    assert _marker_processes(marker) == []


@needs_bwrap
def test_report_channel_and_unencodable_errors_fail_items_not_the_evaluation():
    report = "import os\nfd = int(os.environ['GCSL_REPORT_FD'])\ndata = {payload}\n" \
        "while data:\n    data = data[os.write(fd, data):]\nos._exit(0)\n"
    attacks = {
        "deep report": report.format(payload="b'[' * 500_000"),
        "huge report": report.format(payload="b'x' * (8 << 20)"),
        "surrogate message": "raise ValueError('bad \\udcff byte')\n",
    }
    rows = _rows(
        {"two-sum": [FAST_TWO_SUM, *(code + "\nclass Solution:\n    pass\n" for code in attacks.values())]}
    )
    streamed = []
    result = evaluate(rows, _config(repeats=1, workers=1), on_item=streamed.append)
    items = dict(zip(["correct", *attacks], result.items))
    assert items["correct"]["status"] == "passed"
    for name in ("deep report", "huge report"):
        assert items[name]["status"] == "failed@error" and items[name]["passed"] is False, items[name]
        assert "report rejected" in items[name]["reason"], items[name]
    assert items["surrogate message"]["status"] == "failed@load"
    assert "\udcff" in items["surrogate message"]["reason"]
    # Every item was handed over as soon as it was final, each exactly once.
    key = lambda it: (it["task_id"], it["sample"])  # noqa: E731
    assert sorted(streamed, key=key) == sorted(result.items, key=key)


HUMANEVAL_FAST = 10
_PERTURB = """

def _perturbed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "!"
    if isinstance(value, (list, tuple)):
        return type(value)(list(value) + [None])
    return 0 if value is None else None


_original = {ep}


def {ep}(*args, **kwargs):
    return _perturbed(_original(*args, **kwargs))
"""


def _humaneval_rows(tasks) -> list[dict]:
    """Sample 0: the canonical solution as a continuation; sample 1: it with every result perturbed."""
    rows = []
    for t in tasks:
        body = t.references[0][len(t.prompt) :]
        rows += _rows({t.task_id: [body, body + _PERTURB.replace("{ep}", t.entry_point)]})
    return rows


def _check_humaneval(result, n_tasks):
    statuses = [it["status"] for it in result.items]
    assert statuses[0::2] == ["passed"] * n_tasks, [it for it in result.items[0::2] if not it["passed"]]
    assert all(s.startswith("failed@") for s in statuses[1::2]), statuses[1::2]
    # n = 2, c = 1 per task: pass@1 = 1/2 and pass@2 = 1.
    assert result.metrics == {"pass@1": 0.5, "pass@2": 1.0}
    assert result.n_units == n_tasks and any("Beyond is not reported" in n for n in result.notes)


@needs_bwrap
def test_humaneval_canonical_pass_and_mutants_fail_first_problems():
    tasks = load_humaneval()[:HUMANEVAL_FAST]
    rows = _humaneval_rows(tasks)
    # A chat-style answer for the first problem: the whole function in a fence, with its import.
    rows[0]["completion"] = "Here it is:\n```python\n" + tasks[0].references[0] + "```\n"
    result = evaluate(rows, _config(dataset="humaneval", data=None, k=[1, 2]))
    assert result.items[0]["code_source"] == "fence-python" and result.items[2]["code_source"] == "raw"
    _check_humaneval(result, HUMANEVAL_FAST)


@pytest.mark.slow
@needs_bwrap
def test_humaneval_all_164_canonical_pass_and_mutants_fail():
    tasks = load_humaneval()
    result = evaluate(
        _humaneval_rows(tasks), _config(dataset="humaneval", data=None, k=[1, 2], timeout_s=10.0)
    )
    _check_humaneval(result, 164)
