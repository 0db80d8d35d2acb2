"""Toxicity task and text scorers: RTP loading, prompt files, metrics by hand, Perspective client.

The Perspective client talks to a real HTTP server on 127.0.0.1 that answers in the API's
format, so retries, backoff, rate limiting and key handling run exactly as against the service.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gcsl.config import resolve_config
from gcsl.errors import ConfigError, DataError, MissingDependencyError, StageError
from gcsl.scorers import HFClassifierScorer, PerspectiveScorer, ProfanityScorer, build_scorer
from gcsl.tasks.toxicity import (
    GENERATE_OPTIONS,
    PREPARE_OPTIONS,
    ToxicityEvalConfig,
    evaluate,
    feedback_generate_config,
    feedback_log,
    load_rtp,
    rtp_prompts,
    scorer_agreement,
    write_rtp_prompts,
)

FIXTURE = Path(__file__).parent / "fixtures" / "rtp_small.jsonl"
KEY = "k3y-THAT-must-never-leak-0123456789"


# ---------------------------------------------------------------------------------------------
# a local server speaking the Perspective API's request/response format
# ---------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - the http.server hook name
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["comment"]["text"]
        with srv.lock:
            srv.requests.append({"t": time.monotonic(), "path": self.path, "key": self.headers.get("X-Goog-Api-Key"),
                                 "body": body})
            over_budget = len(srv.requests) > srv.max_requests
            scripted = srv.script.get(text)
            step = scripted.pop(0) if scripted else None
        if over_budget:
            status, headers, payload = 500, {}, {"error": {"message": "test server request budget exhausted"}}
        elif step is not None:
            status, headers, payload = step
        elif text in srv.scores:
            status, headers = 200, {}
            payload = {"attributeScores": {"TOXICITY": {"summaryScore": {"value": srv.scores[text],
                                                                         "type": "PROBABILITY"}}},
                       "languages": ["en"]}
        else:
            status, headers = 400, {}
            payload = {"error": {"code": 400, "message": "Attribute TOXICITY does not support request languages: xx",
                                 "status": "INVALID_ARGUMENT"}}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def perspective(monkeypatch):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.lock = threading.Lock()
    srv.requests, srv.scores, srv.script, srv.max_requests = [], {}, {}, 60
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1alpha1/comments:analyze"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)
    yield srv
    srv.shutdown()
    srv.server_close()


def _client(srv, **kw):
    opts = {"url": srv.url, "requests_per_second": 1000.0, "backoff_base": 0.01, "max_retries": 3}
    return PerspectiveScorer(**{**opts, **kw})


# ---------------------------------------------------------------------------------------------
# Perspective client
# ---------------------------------------------------------------------------------------------


def test_perspective_scores_and_request_format(perspective):
    perspective.scores.update({"hello there": 0.12, "you idiot": 0.91})
    s = _client(perspective)
    assert s.score(["hello there", "you idiot"]) == [0.12, 0.91]
    req = perspective.requests[0]
    assert req["body"]["languages"] == ["en"]
    assert req["body"]["requestedAttributes"] == {"TOXICITY": {}}
    # the key travels in a header, never in the URL
    assert req["key"] == KEY and KEY not in req["path"]


def test_perspective_retries_429_with_exponential_backoff(perspective, caplog):
    perspective.scores["slow"] = 0.3
    too_many = (429, {}, {"error": {"code": 429, "message": "Quota exceeded"}})
    perspective.script["slow"] = [too_many, too_many]
    s = _client(perspective, backoff_base=0.05)
    with caplog.at_level(logging.DEBUG):
        assert s.score(["slow"]) == [0.3]
    times = [r["t"] for r in perspective.requests]
    assert len(times) == 3
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[0] >= 0.05 * 0.95 and gaps[1] >= 0.10 * 0.95  # 0.05 * 2**attempt
    assert "HTTP 429" in caplog.text and KEY not in caplog.text


def test_perspective_honours_retry_after_but_caps_it(perspective):
    perspective.scores["x"] = 0.4
    perspective.script["x"] = [(429, {"Retry-After": "0.3"}, {"error": {"message": "slow down"}})]
    s = _client(perspective, backoff_base=0.01)
    assert s.score(["x"]) == [0.4]
    t = [r["t"] for r in perspective.requests]
    assert t[1] - t[0] >= 0.3 * 0.95
    perspective.requests.clear()
    perspective.script["x"] = [(503, {"Retry-After": "30"}, {})]
    start = time.monotonic()
    assert _client(perspective, backoff_base=0.01, backoff_max=0.2).score(["x"]) == [0.4]
    assert time.monotonic() - start < 5  # capped at backoff_max, not 30 s


def test_perspective_gives_up_after_max_retries_on_5xx(perspective):
    perspective.script["down"] = [(503, {}, {"error": {"message": "unavailable"}})] * 10
    s = _client(perspective, max_retries=2)
    assert s.score(["down"]) == [None]
    assert len(perspective.requests) == 3  # one try + two retries, then stop
    assert "503" in s.last_reasons[0] and "3 attempt" in s.last_reasons[0]


def test_perspective_400_is_unscorable_without_retry_and_key_is_redacted(perspective):
    perspective.script["echo"] = [(400, {}, {"error": {"message": f"bad request for key {KEY}"}})]
    s = _client(perspective)
    assert s.score(["unsupported language text", "echo"]) == [None, None]
    assert len(perspective.requests) == 2
    assert "does not support request languages" in s.last_reasons[0]
    assert KEY not in s.last_reasons[1] and "[redacted]" in s.last_reasons[1]


def test_perspective_bad_key_is_one_config_error_without_the_key(perspective):
    perspective.script["a"] = [(403, {}, {"error": {"message": f"API key not valid: {KEY}"}})]
    with pytest.raises(ConfigError) as err:
        _client(perspective).score(["a"])
    assert "PERSPECTIVE_API_KEY" in str(err.value) and KEY not in str(err.value)
    assert "\n" not in str(err.value)


def test_perspective_skips_empty_and_non_text_without_requests(perspective):
    s = _client(perspective)
    assert s.score(["", "  ", None]) == [None, None, None]
    assert perspective.requests == []
    assert s.last_reasons[:2] == ["empty text", "empty text"] and "not text" in s.last_reasons[2]


def test_perspective_rate_limit_spaces_requests(perspective):
    perspective.scores.update({f"t{i}": 0.1 for i in range(4)})
    s = _client(perspective, requests_per_second=20.0)
    assert s.score([f"t{i}" for i in range(4)]) == [0.1] * 4
    t = [r["t"] for r in perspective.requests]
    assert all(b - a >= 0.05 * 0.9 for a, b in zip(t, t[1:]))


def test_perspective_unreachable_server_is_unscorable_and_bounded(monkeypatch, caplog):
    import socket

    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = PerspectiveScorer(url=f"http://127.0.0.1:{port}/x", requests_per_second=1000, backoff_base=0.01,
                          max_retries=1, timeout=2)
    with caplog.at_level(logging.DEBUG):
        assert s.score(["hello"]) == [None]
    assert "unreachable" in s.last_reasons[0] and KEY not in s.last_reasons[0] and KEY not in caplog.text


def test_perspective_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("MY_PERSPECTIVE_KEY", raising=False)
    with pytest.raises(ConfigError, match="MY_PERSPECTIVE_KEY"):
        PerspectiveScorer(key_env="MY_PERSPECTIVE_KEY")


# ---------------------------------------------------------------------------------------------
# local scorers
# ---------------------------------------------------------------------------------------------


def test_profanity_scorer_is_named_honestly_and_handles_bad_text():
    s = ProfanityScorer()
    assert "profanity" in s.name and "not Perspective" in s.name
    clean, profane, bad = s.score(["what a lovely garden", "fuck this shit", None])
    assert 0.0 <= clean < 0.5 < profane <= 1.0
    assert bad is None and "not text" in s.last_reasons[2]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "you", "are", "nice", "awful", "idiot", "a", "day"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, initializer_range=1.0,
                     id2label={0: "non-toxic", 1: "toxic"}, label2id={"non-toxic": 0, "toxic": 1})
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-bert")
    BertForSequenceClassification(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_hf_classifier_scores_the_chosen_class_probability(tiny_classifier):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["you are nice", "you are an awful idiot", "a day"]
    s = HFClassifierScorer(str(tiny_classifier), label="TOXIC", device="cpu")
    got = s.score(texts)
    tok = AutoTokenizer.from_pretrained(str(tiny_classifier))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_classifier)).eval()
    for text, value in zip(texts, got):
        with torch.no_grad():
            probs = torch.softmax(model(**tok(text, return_tensors="pt")).logits, -1)[0]
        assert value == pytest.approx(probs[1].item(), abs=1e-5)
    other = HFClassifierScorer(str(tiny_classifier), label=0, device="cpu").score(texts)
    assert [a + b for a, b in zip(got, other)] == pytest.approx([1.0] * 3, abs=1e-5)
    assert s.name.endswith("[toxic]")
    assert s.score([None, "you"])[0] is None and s.last_reasons[0].startswith("not text")


def test_hf_classifier_unknown_label_lists_the_classes(tiny_classifier):
    with pytest.raises(ConfigError, match="0=non-toxic, 1=toxic"):
        HFClassifierScorer(str(tiny_classifier), label="insult")
    with pytest.raises(ConfigError, match="could not load"):
        HFClassifierScorer(str(tiny_classifier / "missing"))


@pytest.mark.skipif(importlib.util.find_spec("detoxify") is not None, reason="detoxify is installed here")
def test_detoxify_missing_names_the_extra():
    with pytest.raises(MissingDependencyError, match=r"pip install gcsl\[detoxify\]"):
        build_scorer("detoxify")


def test_build_scorer_rejects_unknown_kinds_and_hf_without_model():
    with pytest.raises(ConfigError, match="not one of"):
        build_scorer("perspektive")
    with pytest.raises(ConfigError, match="needs a model"):
        build_scorer("hf")
    with pytest.raises(ConfigError, match="hf_model"):
        resolve_config(ToxicityEvalConfig, overrides={"scorer": "hf"})


# ---------------------------------------------------------------------------------------------
# RealToxicityPrompts loading and prompt files
# ---------------------------------------------------------------------------------------------


def _raw_fixture():
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


def test_load_rtp_reads_the_real_line_schema():
    recs = load_rtp(FIXTURE)
    assert len(recs) == len(_raw_fixture()) == 12
    assert set(recs[0]) == {"filename", "begin", "end", "challenging", "prompt", "continuation"}
    assert len([k for k in recs[0]["prompt"] if k != "text"]) == 8  # the eight Perspective attributes


def test_load_rtp_bad_lines_name_file_and_line(tmp_path):
    good = FIXTURE.read_text().splitlines()[0]
    bad_json = tmp_path / "a.jsonl"
    bad_json.write_text(good + "\n{not json\n")
    with pytest.raises(DataError, match=r"a\.jsonl:2: not valid JSON"):
        load_rtp(bad_json)
    no_text = tmp_path / "b.jsonl"
    no_text.write_text(good + "\n" + json.dumps({"prompt": {"toxicity": 0.1}}) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl:2: field 'prompt.text'"):
        load_rtp(no_text)
    with pytest.raises(DataError, match="not found"):
        load_rtp(tmp_path / "missing.jsonl")


def test_load_rtp_from_an_unreachable_hub_is_one_stage_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StageError, match="pass its path instead"):
        load_rtp("nobody-here/no-such-rtp-copy")


def test_rtp_prompts_filters_strips_and_keeps_ids():
    raw = _raw_fixture()
    rows, dropped = rtp_prompts(load_rtp(FIXTURE), subset="nontoxic")
    expect = [i for i, r in enumerate(raw) if r["prompt"]["toxicity"] is not None and r["prompt"]["toxicity"] < 0.5]
    assert [r["id"] for r in rows] == [f"rtp-{i}" for i in expect]
    assert dropped == {"prompt toxicity >= 0.5": 4, "no prompt toxicity score": 1}
    assert all(r["prompt_toxicity"] < 0.5 for r in rows)

    challenging, dropped = rtp_prompts(load_rtp(FIXTURE), subset="challenging")
    assert [r["id"] for r in challenging] == [f"rtp-{i}" for i, r in enumerate(raw) if r["challenging"]]
    assert dropped == {"not challenging": 8}

    everything, _ = rtp_prompts(load_rtp(FIXTURE), subset="all")
    assert everything[5]["prompt"] == raw[5]["prompt"]["text"].strip() != raw[5]["prompt"]["text"]
    assert set(everything[0]) >= {"id", "prompt", "prompt_toxicity", "challenging", "filename", "begin", "end"}


def test_rtp_prompts_samples_with_a_seed():
    recs = load_rtp(FIXTURE)
    a, dropped = rtp_prompts(recs, subset="all", n=5, seed=42)
    b, _ = rtp_prompts(recs, subset="all", n=5, seed=42)
    others = {tuple(r["id"] for r in rtp_prompts(recs, subset="all", n=5, seed=s)[0]) for s in range(10)}
    assert a == b and len(a) == 5 and dropped == {"not sampled": 7}
    assert len(others) > 1
    ids = [int(r["id"].split("-")[1]) for r in a]
    assert ids == sorted(ids)  # file order


def test_write_rtp_prompts_writes_the_generate_contract(tmp_path):
    out = tmp_path / "prompts.jsonl"
    counts = write_rtp_prompts(FIXTURE, out, subset="nontoxic", n=3, seed=1)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert counts["written"] == 3 == len(lines)
    assert all(isinstance(r["id"], str) and isinstance(r["prompt"], str) for r in lines)


# ---------------------------------------------------------------------------------------------
# metrics, by hand
# ---------------------------------------------------------------------------------------------


ROWS = [
    {"prompt_id": "p1", "prompt": "A", "sample": 0, "completion": "you are nice"},
    {"prompt_id": "p1", "prompt": "A", "sample": 1, "completion": "you are awful"},
    {"prompt_id": "p2", "prompt": "B", "sample": 0, "completion": "exactly half"},
    {"prompt_id": "p2", "prompt": "B", "sample": 1, "completion": "low one"},
    {"prompt_id": "p3", "prompt": "C", "sample": 0, "completion": ""},
    {"prompt_id": "p3", "prompt": "C", "sample": 1, "completion": "no language"},
    {"prompt_id": "p4", "prompt": "D", "sample": 0, "completion": "mild words"},
    {"prompt_id": "p4", "prompt": "D", "sample": 1, "completion": None},
]
SCORES = {"you are nice": 0.2, "you are awful": 0.7, "exactly half": 0.5, "low one": 0.1, "mild words": 0.3}


def _perspective_config(srv, **kw):
    return resolve_config(ToxicityEvalConfig, overrides={"scorer": "perspective", "perspective_url": srv.url,
                                                         "perspective_rps": 1000, **kw})


def test_toxicity_metrics_by_hand(perspective):
    perspective.scores.update(SCORES)
    res = evaluate(ROWS, _perspective_config(perspective))
    # p1 max 0.7 (toxic); p2 max 0.5 (exactly 0.5 is not toxic); p3 nothing scorable; p4 max 0.3
    assert res.metrics["expected_max_toxicity"] == pytest.approx((0.7 + 0.5 + 0.3) / 3)
    assert res.metrics["toxicity_probability"] == pytest.approx(1 / 3)
    assert res.unit_scores["expected_max_toxicity"] == {"p1": 0.7, "p2": 0.5, "p4": 0.3}
    assert res.unit_scores["toxicity_probability"] == {"p1": 1.0, "p2": 0.0, "p4": 0.0}
    assert res.n_units == 3 and res.n_generations == 8
    # dist-n still covers every prompt's text: p1 unigrams {you, are, nice, awful} over 6 words
    assert res.unit_scores["dist-1"]["p1"] == pytest.approx(4 / 6)
    assert res.unit_scores["dist-2"]["p1"] == pytest.approx(3 / 4)
    status = {(i["prompt_id"], i["sample"]): (i["status"], i["reason"]) for i in res.items}
    assert status[("p3", 0)] == ("unscorable", "empty completion")
    assert status[("p3", 1)][0] == "unscorable" and "HTTP 400" in status[("p3", 1)][1]
    assert status[("p4", 1)] == ("unscorable", "completion is not text (NoneType)")
    assert any("3 of 8 generation(s) could not be scored" in n for n in res.notes)
    assert any("1 of 4 prompt(s) had no scorable generation" in n for n in res.notes)
    assert len(perspective.requests) == 6  # empty and non-text completions never reach the API


def test_toxicity_threshold_option_is_strict(perspective):
    perspective.scores.update(SCORES)
    res = evaluate(ROWS, _perspective_config(perspective, toxic_threshold=0.3))
    # p1 (0.7) and p2 (0.5) are above 0.3; p4's 0.3 is not
    assert res.metrics["toxicity_probability"] == pytest.approx(2 / 3)


def test_toxicity_all_unscorable_is_undefined_not_a_crash(perspective):
    rows = [{"prompt_id": "p", "prompt": "A", "completion": ""}, {"prompt_id": "p", "prompt": "A", "completion": 5}]
    res = evaluate(rows, _perspective_config(perspective))
    assert math.isnan(res.metrics["expected_max_toxicity"]) and math.isnan(res.metrics["toxicity_probability"])
    assert res.n_units == 0 and any("undefined" in n for n in res.notes)


def test_toxicity_default_scorer_aggregates_its_own_scores():
    rows = [
        {"prompt_id": "a", "prompt": "So", "completion": "fuck off, idiot"},
        {"prompt_id": "a", "prompt": "So", "completion": "have a lovely day"},
        {"prompt_id": "b", "prompt": "Then", "completion": "the garden was quiet"},
    ]
    scores = ProfanityScorer().score([r["completion"] for r in rows])
    res = evaluate(rows, ToxicityEvalConfig())
    assert res.metrics["expected_max_toxicity"] == pytest.approx((max(scores[:2]) + scores[2]) / 2)
    assert res.metrics["toxicity_probability"] == pytest.approx(
        ((max(scores[:2]) > 0.5) + (scores[2] > 0.5)) / 2)
    assert any("not comparable" in n for n in res.notes)
    assert "profanity" in res.options["scorer_name"]


def test_feedback_log_from_scored_generations(perspective):
    perspective.scores.update(SCORES)
    res = evaluate(ROWS, _perspective_config(perspective))
    log_rows, left_out = feedback_log(ROWS, res)
    assert len(log_rows) == 5 and sum(left_out.values()) == 3
    first = log_rows[0]
    assert first["prompt"] == "A" and first["response"] == "you are nice"
    assert first["toxicity"] == 0.2 and first["feedback"] == pytest.approx(0.8)
    assert first["scorer"] == "perspective-toxicity"
    with pytest.raises(DataError):
        feedback_log(ROWS[:3], res)


PAPER_CONFIG = Path(__file__).parents[1] / "configs" / "paper" / "toxicity.yaml"


def _rtp_feedback_log(perspective, path: Path) -> Path:
    """A feedback log for ``gcsl prepare``: RTP prompt texts with five scored continuations."""
    perspective.scores.update(SCORES)
    texts = [r["prompt"] for r in rtp_prompts(load_rtp(FIXTURE), subset="all")[0]]
    rows = [{"prompt_id": f"rtp-{i}", "prompt": texts[i], "sample": 0, "completion": c} for i, c in enumerate(SCORES)]
    log_rows, _ = feedback_log(rows, evaluate(rows, _perspective_config(perspective)))
    path.write_text("".join(json.dumps(r) + "\n" for r in log_rows), encoding="utf-8")
    return path


def test_prepared_toxicity_rows_put_the_goal_before_the_text(perspective, tmp_path):
    import pyarrow.parquet as pq
    import yaml

    from gcsl.data.prepare import PrepareConfig, prepare
    from gcsl.experiments.runner import ExperimentConfig

    paper = yaml.safe_load(PAPER_CONFIG.read_text())
    assert PREPARE_OPTIONS.items() <= paper["prepare"].items()
    assert GENERATE_OPTIONS.items() <= paper["generate"].items()
    resolve_config(ExperimentConfig, yaml_path=PAPER_CONFIG)  # every stage option is a known one
    log = _rtp_feedback_log(perspective, tmp_path / "feedback.jsonl")
    # What `gcsl experiment` runs for this config's gcsl-bey-nl variant.
    res = prepare(resolve_config(PrepareConfig, overrides={**paper["prepare"], "data": str(log),
                                                           "method": "gcsl-bey-nl", "out": tmp_path / "p",
                                                           "quiet": True}))
    assert res.setup.placement == "before"
    rows = pq.read_table(res.out / "train.parquet").to_pylist()
    assert rows and all(r["prompt"] == r["goal"] + "\n\n" + r["prompt_text"] for r in rows)
    assert rows[0]["prompt"].endswith("according to a recent")  # the text is what the response continues
    # Instruction logs keep the goal after the prompt.
    after = prepare(PrepareConfig(data=str(log), out=tmp_path / "a", score_column="toxicity", score_range=[0, 1],
                                  lower_is_better=True, quiet=True))
    assert after.setup.placement == "after"
    first = pq.read_table(after.out / "train.parquet").to_pylist()[0]
    assert first["prompt"] == first["prompt_text"] + "\n\n" + first["goal"]


def test_feedback_generation_sees_the_prompt_as_training_does(perspective, tmp_path, smollm2_tokenizer):
    import pyarrow.parquet as pq

    from gcsl.data.prepare import PrepareConfig, prepare
    from gcsl.generation.generate import _encode
    from gcsl.training.packing import IGNORE, tokenize_prompt_completion

    log = _rtp_feedback_log(perspective, tmp_path / "feedback.jsonl")
    row = pq.read_table(prepare(PrepareConfig(data=str(log), out=tmp_path / "sft", method="sft", sft_top=1.0,
                                              score_column="toxicity", score_range=[0, 1], lower_is_better=True,
                                              quiet=True)).out / "train.parquet").to_pylist()[0]
    train_ids, labels = tokenize_prompt_completion(row["prompt"], row["completion"], smollm2_tokenizer)
    cfg = feedback_generate_config("base-model", tmp_path / "prompts.jsonl", tmp_path / "gens.jsonl", num_samples=1)
    assert (cfg.template_text_prompts, cfg.num_samples) == ("never", 1)
    # "never": generate encodes a text prompt without the chat template, for base models too.
    generation_ids = _encode(smollm2_tokenizer, row["prompt_text"], False, "rtp-0")
    assert train_ids[:len(generation_ids)] == generation_ids
    assert labels[:len(generation_ids)] == [IGNORE] * len(generation_ids)
    assert labels[len(generation_ids)] != IGNORE  # the response starts right where the text ends
    # The chat template a base model would otherwise get is not what training sees.
    templated = _encode(smollm2_tokenizer, row["prompt_text"], True, "rtp-0")
    assert train_ids[:len(templated)] != templated


# ---------------------------------------------------------------------------------------------
# agreement with the Perspective scores stored in RTP
# ---------------------------------------------------------------------------------------------


def test_agreement_auroc_and_spearman_by_hand(perspective):
    # stored Perspective: 0.9, 0.1, 0.8, 0.2, 0.3 -> labels 1, 0, 1, 0, 0; local: 0.9, 0.1, 0.4, 0.4, 0.3
    records = [
        {"prompt": {"text": "t1", "toxicity": 0.9}, "continuation": {"text": "t2", "toxicity": 0.1}},
        {"prompt": {"text": "t3", "toxicity": 0.8}, "continuation": {"text": "t4", "toxicity": 0.2}},
        {"prompt": {"text": "t5", "toxicity": None}, "continuation": {"text": "t6", "toxicity": 0.3}},
    ]
    perspective.scores.update({"t1": 0.9, "t2": 0.1, "t3": 0.4, "t4": 0.4, "t6": 0.3})
    rep = scorer_agreement(records, _client(perspective))
    # positive-negative pairs: 0.9 beats 0.1, 0.4, 0.3 (3); 0.4 beats 0.1 and 0.3, ties 0.4 (2.5) -> 5.5 / 6
    assert rep["auroc"] == pytest.approx(5.5 / 6)
    assert rep["n_texts"] == 5 and rep["n_positive"] == 2
    from scipy.stats import spearmanr

    assert rep["spearman"] == pytest.approx(spearmanr([0.9, 0.1, 0.8, 0.2, 0.3], [0.9, 0.1, 0.4, 0.4, 0.3]).statistic)
    assert any("without a Perspective score" in n for n in rep["notes"])


def test_agreement_of_the_offline_scorer_on_the_fixture():
    rep = scorer_agreement(FIXTURE, ProfanityScorer())
    raw = _raw_fixture()
    ref = [r[p]["toxicity"] for r in raw for p in ("prompt", "continuation") if r[p]["toxicity"] is not None]
    local = ProfanityScorer().score([r[p]["text"] for r in raw for p in ("prompt", "continuation")
                                     if r[p]["toxicity"] is not None])
    pos = [s for s, r in zip(local, ref) if r > 0.5]
    neg = [s for s, r in zip(local, ref) if r <= 0.5]
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg]
    assert rep["n_texts"] == len(ref) == 23 and rep["n_positive"] == len(pos)
    assert rep["auroc"] == pytest.approx(sum(pairs) / len(pairs))
    assert rep["spearman"] > 0  # profanity tracks toxicity on this sample


def test_agreement_undefined_auroc_is_reported(perspective):
    records = [{"prompt": {"text": "a", "toxicity": 0.1}, "continuation": {"text": "b", "toxicity": 0.2}}]
    perspective.scores.update({"a": 0.1, "b": 0.3})
    rep = scorer_agreement(records, _client(perspective))
    assert math.isnan(rep["auroc"]) and any("AUROC is undefined" in n for n in rep["notes"])
