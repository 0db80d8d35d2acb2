"""PPLM (gcsl.generation.pplm): the attribute classifier and the steered sampling, on a tiny random Llama.

The classifier is trained for real on a small feedback log whose good and bad responses use different
words, so its classes are separable from the tiny model's hidden states.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_scripted_reviews
from gcsl.config import config_to_dict, resolve_config
from gcsl.errors import ConfigError, StageError
from gcsl.generation import GenerateConfig, generate
from gcsl.generation.pplm import (
    DESIRED,
    ClassifierConfig,
    PPLMModel,
    PPLMSettings,
    load_classifier,
    load_pplm,
    train_classifier,
)
from gcsl.methods import get_method

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOOD, BAD = ["lovely", "kind", "gentle", "warm"], ["awful", "rude", "cruel", "nasty"]


def _log(path: Path) -> Path:
    """16 rows: toxicity 0.0-0.3 for kind words, 0.7-1.0 for rude ones (lower is better)."""
    rows = [{"prompt": f"Say something {i}.", "response": f"You are {w} and {w}.", "toxicity": tox}
            for i, (words, base) in enumerate([(GOOD, 0.0), (BAD, 0.7)] * 2) for j, w in enumerate(words)
            for tox in [round(base + 0.1 * j, 2)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TOXICITY = {"score_column": "toxicity", "lower_is_better": True, "score_range": [0, 1], "sft_top": 0.5}


@pytest.fixture(scope="module")
def classifier(tiny_llama_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pplm")
    return train_classifier(resolve_config(ClassifierConfig, overrides={
        "model": str(tiny_llama_dir), "data": str(_log(root / "fb.jsonl")), "out": root / "clf",
        "prepare": TOXICITY, "epochs": 30, "learning_rate": 0.05, "batch_size": 8, "held_out": 0.25}))


@pytest.fixture(scope="module")
def steered(tiny_llama_dir, classifier):
    return load_pplm(str(tiny_llama_dir), str(classifier), PPLMSettings(num_iterations=3), device="cpu")


def _inputs(tokenizer):
    """Two left-padded prompts of different lengths, each with a history before its last token."""
    batch = tokenizer(["Hello there, my dear friend", "Good day"], return_tensors="pt", padding=True,
                      padding_side="left")
    assert (batch["attention_mask"] == 0).any() and (batch["attention_mask"].sum(1) >= 2).all()
    return batch["input_ids"], batch["attention_mask"]


def _prompt_file(path: Path, topics: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me about {w}."}) + "\n"
                            for i, w in enumerate(topics)))
    return path


def test_classifier_learns_the_feedback_classes_and_reloads_to_the_same_outputs(classifier, tiny_llama_dir):
    from gcsl.generation.pplm import _mean_features
    from gcsl.models import load_causal_lm, load_tokenizer

    meta = json.loads((classifier / "classifier.json").read_text())
    assert meta["classes"][DESIRED] == "desired" and meta["desired_rows"] == 8
    assert (meta["train_rows"], meta["held_rows"]) == (12, 4)
    assert meta["train_loss"][-1] < 0.5 * meta["train_loss"][0]
    assert meta["train_accuracy"] == 1.0 and meta["held_accuracy"] is not None
    record = json.loads((classifier / "run.json").read_text())
    assert record["stage"] == "pplm-classifier" and record["config"]["prepare"]["sft_top"] == 0.5
    assert json.loads((classifier / "train_metrics.json").read_text())["optimizer_steps"] == 30 * 2
    # The reloaded head reproduces the recorded accuracies on the log's rows (train and held-out together).
    clf = load_classifier(classifier)
    tok, model = load_tokenizer(str(tiny_llama_dir)), load_causal_lm(str(tiny_llama_dir), device="cpu")
    rows = [json.loads(line) for line in (classifier.parent / "fb.jsonl").read_text().splitlines()]
    feats = _mean_features(model, tok, [r["response"] for r in rows], 100, 8, "cpu")
    labels = torch.tensor([DESIRED if r["toxicity"] < 0.5 else 1 - DESIRED for r in rows])
    correct = float((clf.log_probs(feats).argmax(-1) == labels).sum())
    assert correct == pytest.approx(12 * meta["train_accuracy"] + 4 * meta["held_accuracy"])
    assert torch.equal(clf.log_probs(feats), load_classifier(classifier).log_probs(feats))


def test_step_size_zero_samples_exactly_like_the_base_model(steered, tiny_llama_dir, classifier):
    lm = load_pplm(str(tiny_llama_dir), str(classifier), PPLMSettings(step_size=0.0), device="cpu")
    ids, mask = _inputs(lm.tokenizer)
    base = lm.model.model
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1, :].float()
    assert torch.equal(lm.model.step_scores(lm.model.start(ids, mask)), expected)
    options = {"do_sample": True, "top_p": 0.9, "top_k": 0, "temperature": 0.8, "max_new_tokens": 6,
               "pad_token_id": lm.tokenizer.pad_token_id}
    torch.manual_seed(3)
    with torch.inference_mode():
        plain = base.generate(input_ids=ids, attention_mask=mask, **options)
    torch.manual_seed(3)
    with torch.inference_mode():
        ours = lm.model.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(ours, plain)
    # A positive step changes what is drawn.
    torch.manual_seed(3)
    steered_scores = steered.model.step_scores(steered.model.start(ids, mask))
    assert not torch.allclose(torch.log_softmax(steered_scores, -1), torch.log_softmax(expected, -1))


def test_a_positive_step_raises_the_desired_class_and_trains_only_the_perturbation(steered):
    model: PPLMModel = steered.model
    ids, mask = _inputs(steered.tokenizer)
    unpert, inputs = model.observe(model.start(ids, mask))
    zero = [(torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32))
            for k, v in inputs["past"]]
    deltas = model._perturb(unpert, **inputs)
    assert all(dk.abs().sum() > 0 for dk, _ in deltas)
    with torch.no_grad():
        before = model._steered(zero, **inputs)[0][:, DESIRED]
        after = model._steered(deltas, **inputs)[0][:, DESIRED]
    assert (after > before).all(), (before, after)
    assert all(p.grad is None and not p.requires_grad for p in model.model.parameters())
    assert all(p.grad is None for p in model.classifier.head.parameters())


def test_generate_with_pplm_writes_rows_and_its_settings(tmp_path, tiny_llama_dir, classifier):
    prompts = _prompt_file(tmp_path / "p.jsonl", ["cats", "rain", "tea"])
    cfg = resolve_config(GenerateConfig, overrides={
        "model": str(tiny_llama_dir), "prompts": str(prompts), "out": tmp_path / "gens.jsonl", "num_samples": 2,
        "max_new_tokens": 3, "batch_size": 4, "classifier": str(classifier), "pplm_iterations": 2,
        "pplm_step_size": 0.05, "device": "cpu"})
    out = generate(cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [(f"q{i}", s) for i in range(3) for s in range(2)]
    record = json.loads((tmp_path / "gens.jsonl.run.json").read_text())
    assert record["complete"] and record["config"]["classifier"] == str(classifier)
    assert record["pplm"]["step_size"] == 0.05 and record["pplm"]["num_iterations"] == 2
    assert record["pplm"]["gm_scale"] == 0.9 and record["pplm"]["classifier"]["classes"][DESIRED] == "desired"
    # Resuming with other PPLM settings is refused rather than mixing samples.
    with pytest.raises(StageError, match="pplm_step_size"):
        generate(resolve_config(GenerateConfig, overrides={**cfg.__dict__, "pplm_step_size": 0.1}))


def test_bad_pplm_settings_are_one_line_config_errors(tmp_path, tiny_llama_dir, classifier):
    with pytest.raises(ConfigError) as info:
        resolve_config(GenerateConfig, overrides={
            "model": "m", "prompts": "p.jsonl", "out": tmp_path / "g.jsonl", "classifier": "c", "expert": "e",
            "anti_expert": "a", "pplm_gm_scale": 1.5, "pplm_iterations": -1, "pplm_step_size": float("nan")})
    text = str(info.value)
    for name in ("classifier:", "pplm_gm_scale", "pplm_iterations", "pplm_step_size"):
        assert name in text
    assert "\n" not in text
    with pytest.raises(ConfigError, match="held_out"):
        resolve_config(ClassifierConfig, overrides={"model": "m", "data": "d", "out": tmp_path / "c", "held_out": 1})
    with pytest.raises(StageError, match="not a finished PPLM classifier"):
        load_classifier(tmp_path)
    with pytest.raises(StageError, match="trained on the hidden states of"):
        load_pplm("smollm2-135m-instruct", str(classifier), PPLMSettings())


def test_the_method_table_entry_is_a_classifier_steered_decoding_method():
    method = get_method("pplm")
    assert method.variant_kind == "classifier" and not method.trainable and not method.is_goal_conditioned


def test_experiment_trains_the_classifier_once_per_seed_and_samples_with_it(tmp_path, tiny_llama_dir, monkeypatch):
    from gcsl.experiments.layout import ExperimentLayout
    from gcsl.experiments.runner import ExperimentConfig, run_experiment

    monkeypatch.chdir(tmp_path)
    write_scripted_reviews(tmp_path / "fb.jsonl")
    _prompt_file(tmp_path / "p.jsonl", ["cats", "rain"])
    cfg = resolve_config(ExperimentConfig, overrides={
        "name": "tiny-pplm", "out": tmp_path / "exp", "task": "sentiment", "data": "fb.jsonl",
        "eval_prompts": "p.jsonl", "model": str(tiny_llama_dir), "methods": ["base", "pplm"], "seeds": [0],
        "baseline": "base", "prepare": {"score_range": [0, 1], "sft_top": 0.25},
        "generate": {"max_new_tokens": 2, "batch_size": 2, "pplm_iterations": 2}, "ci_samples": 50,
        "classifier": {"epochs": 2, "learning_rate": 0.001}})
    report = run_experiment(cfg)
    assert "| pplm | 0 |" in report.read_text()
    layout = ExperimentLayout(tmp_path / "exp")
    folder = layout.stage("pplm", 0).model
    meta = json.loads((folder / "classifier.json").read_text())
    # The classes are the sft and sft-bottom rows: the top and bottom quarter of the 24 scores.
    assert meta["train_rows"] + meta["held_rows"] == 12 and meta["desired_rows"] == 6
    # The experiment's classifier block reaches the classifier's training; the runner's own options stay its own.
    options = json.loads((folder / "run.json").read_text())["config"]
    assert options["epochs"] == 2 and options["learning_rate"] == 0.001 and options["seed"] == 0
    with pytest.raises(ConfigError, match=r"classifier\.out: unknown option of ClassifierConfig"):
        resolve_config(ExperimentConfig, overrides={**config_to_dict(cfg), "classifier": {"out": "elsewhere"}})
    record = json.loads(Path(str(layout.stage("pplm").gens) + ".run.json").read_text())
    assert record["config"]["classifier"] == str(folder) and record["pplm"]["num_iterations"] == 2
    training = {t["variant"]: t for t in json.loads((tmp_path / "exp" / "results.json").read_text())["training"]}
    assert training["pplm"]["train_rows"] == [meta["train_rows"]]
    # A re-run trains nothing again.
    stamp = (folder / "run.json").stat().st_mtime_ns
    run_experiment(cfg)
    assert (folder / "run.json").stat().st_mtime_ns == stamp
