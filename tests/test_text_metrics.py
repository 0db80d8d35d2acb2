"""dist-n and conditional perplexity (gcsl.metrics.text), checked against hand and direct computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gcsl.errors import ConfigError
from gcsl.metrics.text import (
    TextQualityOptions,
    conditional_perplexity,
    distinct_n,
    load_causal_lm,
    text_quality,
)

# ---------------------------------------------------------------------------------------------
# dist-n
# ---------------------------------------------------------------------------------------------


def test_distinct_n_hand_values():
    texts = ["a b a", "a b"]
    assert distinct_n(texts, 1) == pytest.approx(2 / 5)  # {a, b} over 5 words
    assert distinct_n(texts, 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n(texts, 3) == pytest.approx(1.0)  # only (a b a)


def test_distinct_n_words_denominator_is_dexperts():
    # DExperts divides unique n-grams by the number of words, whatever n is
    assert distinct_n(["a b a", "a b"], 2, denominator="words") == pytest.approx(2 / 5)
    assert distinct_n(["a b a", "a b"], 3, denominator="words") == pytest.approx(1 / 5)


def test_distinct_n_never_crosses_generations():
    # joined, "a b a b" would hold two distinct trigrams; apart, neither has one
    assert distinct_n(["a b", "a b"], 3) is None
    assert distinct_n(["a b", "c d"], 2) == pytest.approx(1.0)


def test_distinct_n_whitespace_tokens_and_bad_inputs():
    assert distinct_n(["a\tb\n a  b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["", "   "], 1) is None
    assert distinct_n([None, "x y"], 1) == pytest.approx(1.0)  # a non-text generation holds no words
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


def test_text_quality_averages_dist_over_prompts_and_notes_prompts_without_ngrams():
    rows = [
        {"prompt_id": "p1", "prompt": "x", "completion": "a a"},
        {"prompt_id": "p1", "prompt": "x", "completion": "a a"},
        {"prompt_id": "p2", "prompt": "y", "completion": "x y z"},
    ]
    q = text_quality(rows, TextQualityOptions())
    # dist-1: p1 = 1/4, p2 = 3/3 -> mean 0.625; dist-3: only p2 has trigrams
    assert q.unit_scores["dist-1"] == {"p1": pytest.approx(0.25), "p2": pytest.approx(1.0)}
    assert q.metrics["dist-1"] == pytest.approx(0.625)
    assert q.metrics["dist-2"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert q.unit_scores["dist-3"] == {"p2": pytest.approx(1.0)}
    assert q.metrics["dist-3"] == pytest.approx(1.0)
    assert any("dist-3: 1 prompt(s)" in n for n in q.notes)
    assert q.perplexities is None and "perplexity" not in q.metrics


def test_text_quality_undefined_dist_is_nan():
    q = text_quality([{"prompt_id": "p", "prompt": "x", "completion": ""}], TextQualityOptions())
    assert math.isnan(q.metrics["dist-1"]) and q.unit_scores["dist-1"] == {}


# ---------------------------------------------------------------------------------------------
# perplexity on a tiny random Llama with the real SmolLM2 tokenizer (conftest fixtures)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_llama_dir: Path):
    return load_causal_lm(str(tiny_llama_dir), device="cpu")


def _direct_ppl(model, tok, prompt: str, gen: str) -> float:
    """The protocol's formula with the model's own mean loss: NLL(x) = loss(x) * (len(x) - 1)."""
    import torch

    prompt_ids = tok(prompt).input_ids
    joint_ids = tok(prompt + gen).input_ids
    assert joint_ids[:len(prompt_ids)] == prompt_ids  # the prompt tokens are a prefix of the joint ones
    with torch.no_grad():
        full = model(torch.tensor([joint_ids]), labels=torch.tensor([joint_ids])).loss.item() * (len(joint_ids) - 1)
        part = model(torch.tensor([prompt_ids]), labels=torch.tensor([prompt_ids])).loss.item() * (len(prompt_ids) - 1)
    return math.exp((full - part) / (len(joint_ids) - len(prompt_ids)))


PAIRS = [
    ("The weather today is", " cold and grey, with rain."),
    ("My favourite movie is", " a long one."),
    ("Once upon a time there was", " a king who lived in a castle by the sea and never left it."),
]


def test_perplexity_matches_direct_nll_difference(lm):
    model, tok = lm
    # a random model over a 49k vocabulary is near uniform (ppl ~ 5e4), so no cutoff here
    res = conditional_perplexity(model, tok, [p for p, _ in PAIRS], [g for _, g in PAIRS], batch_size=8,
                                 max_ppl=math.inf)
    for (prompt, gen), got in zip(PAIRS, res.values):
        assert got == pytest.approx(_direct_ppl(model, tok, prompt, gen), rel=1e-4)
    assert res.n_scored == 3
    assert res.mean == pytest.approx(sum(res.values) / 3)
    assert 1e3 < res.mean < 2e5


def test_perplexity_batched_equals_one_at_a_time(lm):
    model, tok = lm
    prompts, gens = [p for p, _ in PAIRS], [g for _, g in PAIRS]
    batched = conditional_perplexity(model, tok, prompts, gens, batch_size=3, max_ppl=math.inf)
    single = conditional_perplexity(model, tok, prompts, gens, batch_size=1, max_ppl=math.inf)
    assert batched.values == pytest.approx(single.values, rel=1e-4)


def test_perplexity_skips_empty_and_drops_at_cutoff(lm):
    model, tok = lm
    full = conditional_perplexity(model, tok, ["A", "A", "B"], [" one two three", "", "   "], max_ppl=math.inf)
    assert full.values[1] is None and full.values[2] is None
    assert full.n_skipped_empty == 2 and "empty" in full.reasons[1]
    value = full.values[0]
    # exactly at the cutoff is dropped (>=); just above it is kept
    at = conditional_perplexity(model, tok, ["A"], [" one two three"], max_ppl=value)
    assert at.values == [None] and at.n_over_cutoff == 1 and "cutoff" in at.reasons[0]
    assert math.isnan(at.mean)
    above = conditional_perplexity(model, tok, ["A"], [" one two three"], max_ppl=value * 1.0001)
    assert above.values[0] == pytest.approx(value)


def test_perplexity_mean_is_over_kept_generations(lm):
    model, tok = lm
    prompts, gens = [p for p, _ in PAIRS], [g for _, g in PAIRS]
    ref = conditional_perplexity(model, tok, prompts, gens, max_ppl=math.inf).values
    cutoff = sorted(ref)[1]  # drops the two largest (one sits exactly at the cutoff)
    res = conditional_perplexity(model, tok, prompts, gens, max_ppl=cutoff)
    kept = [v for v in ref if v < cutoff]
    assert res.n_scored == len(kept) == 1 and res.n_over_cutoff == 2
    assert res.mean == pytest.approx(kept[0])


def test_perplexity_bad_model_output_and_prompts_never_raise(lm):
    model, tok = lm
    res = conditional_perplexity(model, tok, ["ok", 17, ""], [None, " text", "x"])
    assert res.values[0] is None and "not text" in res.reasons[0]
    assert res.values[1] is None and "prompt" in res.reasons[1]
    # empty prompt + a one-token generation: its only token sits at position 0, nothing predicts it
    assert res.values[2] is None and "no generated token" in res.reasons[2]


def test_perplexity_of_chat_prompt_uses_the_chat_template(lm):
    model, tok = lm
    messages = [{"role": "user", "content": "Say something about rain."}]
    gen = "Rain is wet and grey."
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat = conditional_perplexity(model, tok, [messages], [gen], max_ppl=math.inf).values[0]
    assert chat == pytest.approx(_direct_ppl(model, tok, rendered, gen), rel=1e-4)


def test_text_quality_with_reference_model_path(tiny_llama_dir: Path, lm):
    model, tok = lm
    rows = [
        {"prompt_id": "p1", "prompt": PAIRS[0][0], "completion": PAIRS[0][1]},
        {"prompt_id": "p1", "prompt": PAIRS[0][0], "completion": ""},
        {"prompt_id": "p2", "prompt": PAIRS[1][0], "completion": PAIRS[1][1]},
        {"prompt_id": "p2", "prompt": PAIRS[2][0], "completion": PAIRS[2][1]},
    ]
    q = text_quality(rows, TextQualityOptions(reference_model=str(tiny_llama_dir), device="cpu", ppl_max=1e9))
    direct = [_direct_ppl(model, tok, *PAIRS[i]) for i in range(3)]
    assert q.perplexities[1] is None and q.perplexity_reasons[1].startswith("empty")
    assert q.metrics["perplexity"] == pytest.approx(sum(direct) / 3, rel=1e-4)  # mean over generations
    assert q.unit_scores["perplexity"]["p1"] == pytest.approx(direct[0], rel=1e-4)
    assert q.unit_scores["perplexity"]["p2"] == pytest.approx((direct[1] + direct[2]) / 2, rel=1e-4)
    assert any("1 empty skipped" in n for n in q.notes)


def test_load_causal_lm_bad_path_is_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="reference_model"):
        load_causal_lm(str(tmp_path / "nope"))


def test_perplexity_token_straddling_the_boundary_counts_as_generated(lm):
    import torch

    model, tok = lm
    joint = tok("Hello there").input_ids
    assert len(joint) == 2  # "Hello", " there": the first token holds the prompt "Hel" and generated "lo"
    res = conditional_perplexity(model, tok, ["Hel"], ["lo there"], max_ppl=math.inf)
    with torch.no_grad():
        loss = model(torch.tensor([joint]), labels=torch.tensor([joint])).loss.item()  # NLL of " there" alone
    # "Hello" has no prediction (position 0), so only " there" is scored
    assert res.values[0] == pytest.approx(math.exp(loss), rel=1e-4)


@pytest.mark.slow
def test_perplexity_reference_model_takes_the_built_in_name():
    """The reference model loads as every model does: the built-in SmolLM2 by name, offline."""
    rows = [{"prompt_id": "p", "prompt": "The film was", "completion": " a quiet, moving story."}]
    result = text_quality(rows, TextQualityOptions(reference_model="smollm2-135m-instruct", device="cpu"))
    assert 1.0 < result.metrics["perplexity"] < 1e4
