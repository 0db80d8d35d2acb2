"""DExperts (gcsl.generation.dexperts): logits base + alpha (expert - anti), on a tiny random Llama.

The adapters are random LoRA weights (``init_lora_weights=False``) saved like a `gcsl train` output,
so expert and anti-expert differ clearly without training; the experiment test trains real ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from gcsl.config import resolve_config
from gcsl.data.prepare import PrepareConfig, prepare
from gcsl.errors import ConfigError
from gcsl.generation import GenerateConfig, generate
from gcsl.methods import get_method, trained_methods

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [{"id": "a", "prompt": "Write a poem about the sea."}, {"id": "b", "prompt": "Tell me"},
           {"id": "c", "prompt": [{"role": "user", "content": "How do I boil an egg?"}]}]


def _adapter(base: Path, out: Path, seed: int) -> Path:
    """A random, clearly non-zero LoRA adapter on ``base``, in a folder that reads as a finished gcsl run."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gcsl.models import library_deprecations_silenced

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    with library_deprecations_silenced():
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear",
                                                init_lora_weights=False))
    peft.save_pretrained(str(out))
    (out / "run.json").write_text(json.dumps({"config": {"model": str(base)}}))
    return out


@pytest.fixture(scope="module")
def experts(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("experts")
    return _adapter(tiny_llama_dir, root / "expert", 1), _adapter(tiny_llama_dir, root / "anti", 2)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def dexperts(tiny_llama_dir, experts):
    from gcsl.generation.dexperts import load_dexperts

    return load_dexperts(str(tiny_llama_dir), str(experts[0]), str(experts[1]), 0.0, device="cpu")


def _inputs(tokenizer):
    """Two left-padded prompts of different lengths."""
    batch = tokenizer(["Hello there, my dear friend", "Hi"], return_tensors="pt", padding=True, padding_side="left")
    assert (batch["attention_mask"] == 0).any()
    return batch["input_ids"], batch["attention_mask"]


def _scores(dexperts, alpha: float, input_ids, mask):
    """The processor's next-token log-probabilities at ``alpha`` after the base model's logits."""
    with torch.no_grad():
        base = dexperts.model.base_logits(input_ids, mask)[:, -1, :].float()
        processor = dexperts.model.processor(mask)
        processor.alpha = alpha
        return base, processor(input_ids, base.clone())


def _cfg(model, prompts, out, **kw) -> GenerateConfig:
    return resolve_config(GenerateConfig, overrides={"model": str(model), "prompts": str(prompts), "out": str(out),
                                                     "num_samples": 2, "max_new_tokens": 4, "batch_size": 2,
                                                     "device": "cpu", **kw})


def test_alpha_zero_is_exactly_the_base_model(dexperts, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    input_ids, mask = _inputs(dexperts.tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    with torch.no_grad():
        expected = plain(input_ids=input_ids, attention_mask=mask).logits[:, -1, :].float()
    base, scores = _scores(dexperts, 0.0, input_ids, mask)
    assert torch.equal(base, expected) and torch.equal(scores, expected)
    assert torch.equal(torch.softmax(scores, -1), torch.softmax(expected, -1))


def test_alpha_zero_samples_equal_plain_base_generation(tiny_llama_dir, experts, prompts_file, tmp_path):
    plain = generate(_cfg(tiny_llama_dir, prompts_file, tmp_path / "plain.jsonl"))
    zero = generate(_cfg(tiny_llama_dir, prompts_file, tmp_path / "zero.jsonl", expert=str(experts[0]),
                         anti_expert=str(experts[1]), alpha=0.0))
    steered = generate(_cfg(tiny_llama_dir, prompts_file, tmp_path / "steered.jsonl", expert=str(experts[0]),
                            anti_expert=str(experts[1]), alpha=4.0))
    completions = [[json.loads(x)["completion"] for x in p.read_text().splitlines()] for p in (plain, zero, steered)]
    assert completions[0] == completions[1]
    assert completions[2] != completions[0]  # the experts do act at alpha > 0
    # The run record names the experts and alpha, and a resumed file cannot mix them.
    record = json.loads(Path(str(steered) + ".run.json").read_text())["config"]
    assert (record["expert"], record["anti_expert"], record["alpha"]) == (str(experts[0]), str(experts[1]), 4.0)
    from gcsl.generation.generate import _SAMPLING_OPTIONS

    assert {"expert", "anti_expert", "alpha"} <= set(_SAMPLING_OPTIONS)


def test_experts_read_what_the_base_reads_through_the_cache(dexperts, experts, tiny_llama_dir):
    """The processor's expert logits equal a standalone expert's, at the first step and after a cached one."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gcsl.models import library_deprecations_silenced

    input_ids, mask = _inputs(dexperts.tokenizer)
    with library_deprecations_silenced():
        refs = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), str(e)).eval()
                for e in experts]
    processor = dexperts.model.processor(mask)
    longer = torch.cat([input_ids, torch.tensor([[17], [23]])], 1)
    with torch.no_grad():
        for ids in (input_ids, longer):
            got = processor.expert_logits(ids)
            full_mask = torch.cat([mask, torch.ones(2, ids.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
            for logits, ref in zip(got, refs):
                want = ref(input_ids=ids, attention_mask=full_mask).logits[:, -1, :].float()
                torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    assert processor.seen == longer.shape[1]


def test_larger_alpha_moves_toward_the_expert_and_away_from_the_anti_expert(dexperts):
    input_ids, mask = _inputs(dexperts.tokenizer)
    with torch.no_grad():
        expert, anti = dexperts.model.processor(mask).expert_logits(input_ids)
    favoured, disfavoured = (expert - anti).argmax(-1), (expert - anti).argmin(-1)
    rows = torch.arange(len(favoured))
    up, down = [], []
    for alpha in (0.0, 1.0, 2.0, 4.0):
        _, scores = _scores(dexperts, alpha, input_ids, mask)
        logp = torch.log_softmax(scores, -1)
        up.append(logp[rows, favoured])
        down.append(logp[rows, disfavoured])
    up, down = torch.stack(up), torch.stack(down)
    assert (up.diff(dim=0) > 0).all() and (down.diff(dim=0) < 0).all()


@pytest.mark.parametrize(("overrides", "message"), [
    ({"expert": "somewhere"}, "anti_expert: DExperts needs both adapters"),
    ({"anti_expert": "somewhere"}, "expert: DExperts needs both adapters"),
    ({"expert": "a", "anti_expert": "b", "alpha": -1.0}, "alpha: must be >= 0, got -1.0"),
])
def test_config_errors_are_one_line_and_name_the_field(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(GenerateConfig, overrides={"model": "m", "prompts": "p.jsonl", "out": str(tmp_path / "g.jsonl"),
                                                  **overrides})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_model_must_be_the_base_not_an_adapter(tmp_path, experts):
    with pytest.raises(ConfigError, match="model: .* is an adapter folder"):
        resolve_config(GenerateConfig, overrides={"model": str(experts[0]), "prompts": "p.jsonl",
                                                  "out": str(tmp_path / "g.jsonl"), "expert": str(experts[0]),
                                                  "anti_expert": str(experts[1])})


def test_the_table_has_sft_bottom_and_dexperts():
    assert "sft-bottom" in trained_methods() and "dexperts" not in trained_methods()
    method = get_method("dexperts")
    assert method.variant_kind == "decoding" and not method.trainable and method.experts == ("sft", "sft-bottom")
    assert all(get_method(m).trainable and not get_method(m).is_goal_conditioned for m in method.experts)


def test_prepare_sft_bottom_keeps_the_bottom_fraction(feedback_log, tmp_path):
    scores = sorted(json.loads(x)["score"] for x in feedback_log.read_text().splitlines())
    kw = {"data": str(feedback_log), "score_range": [1.0, 5.0], "quiet": True, "sft_top": 0.25}
    bottom = prepare(PrepareConfig(out=tmp_path / "bottom", method="sft-bottom", **kw))
    top = prepare(PrepareConfig(out=tmp_path / "top", method="sft", **kw))
    kept = sorted(pq.read_table(bottom.out / "train.parquet").column("score").to_pylist())
    assert kept == scores[:8]  # 32 rows, distinct scores: the 8 lowest
    assert bottom.dropped == {"outside the bottom 25%": 24}
    best = pq.read_table(top.out / "train.parquet").column("score").to_pylist()
    assert max(kept) < min(best)
    # With a cutoff the two split the log: sft keeps >= cutoff, sft-bottom the rest.
    cut = prepare(PrepareConfig(out=tmp_path / "cut", method="sft-bottom", sft_cutoff=3.0, **kw))
    assert sorted(pq.read_table(cut.out / "train.parquet").column("score").to_pylist()) == [s for s in scores if s < 3]


def test_experiment_with_dexperts_trains_both_experts_and_reports_it(tmp_path, tiny_llama_dir, monkeypatch):
    from gcsl.experiments.layout import ExperimentLayout
    from gcsl.experiments.runner import ExperimentConfig, run_experiment
    from gcsl.goals import GoalSetup

    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"Review movie {i % 6}.", "response": f"A {w} film.", "score": (i % 8) / 7}
            for i, w in enumerate(["awful", "bad", "dull", "fine", "good", "great", "wonderful", "nice"] * 2)]
    (tmp_path / "fb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"Review film {i}."}) + "\n"
                                              for i in range(2)))
    cfg = resolve_config(ExperimentConfig, overrides={
        "name": "tiny-dexperts", "out": tmp_path / "exp", "task": "sentiment", "data": "fb.jsonl",
        "eval_prompts": "p.jsonl", "model": str(tiny_llama_dir), "methods": ["base", "dexperts"], "seeds": [0],
        "baseline": "base", "prepare": {"score_range": [0, 1], "bins": 2, "sft_top": 0.25},
        "train": {"max_steps": 1, "per_device_batch_size": 4, "report_to": "none"},
        "generate": {"max_new_tokens": 2, "batch_size": 2, "alpha": 1.5}, "ci_samples": 50})
    report = run_experiment(cfg)
    text = report.read_text()
    assert "| dexperts | 0 |" in text
    layout = ExperimentLayout(tmp_path / "exp")
    expert, anti = (layout.expert("dexperts", role) for role in ("expert", "anti-expert"))
    assert GoalSetup.load(expert.prepared).method == "sft" and GoalSetup.load(anti.prepared).method == "sft-bottom"
    assert max(pq.read_table(anti.prepared / "train.parquet").column("score").to_pylist()) < min(
        pq.read_table(expert.prepared / "train.parquet").column("score").to_pylist())
    assert layout.goal_setup("dexperts") is None and len(layout.prepared_folders()) == 2
    record = json.loads(Path(str(layout.stage("dexperts").gens) + ".run.json").read_text())["config"]
    assert (record["expert"], record["anti_expert"], record["alpha"]) == (str(expert.model), str(anti.model), 1.5)
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert {r["variant"] for r in results["rows"]} == {"base", "dexperts"}
    # Each adapter's training is listed on its own row.
    training = {t["variant"]: t for t in results["training"]}
    assert set(training) == {"dexperts (expert)", "dexperts (anti-expert)"}
    assert training["dexperts (anti-expert)"]["train_rows"] == [pq.read_metadata(anti.prepared / "train.parquet").num_rows]
    assert "| dexperts (anti-expert) | 0 |" in text
    # A re-run trains nothing and generates nothing again.
    stamp = (expert.model / "run.json").stat().st_mtime_ns
    run_experiment(cfg)
    assert (expert.model / "run.json").stat().st_mtime_ns == stamp
    # Without runs/, each adapter's training row comes from records/.
    before = json.loads((tmp_path / "exp" / "results.json").read_text())
    shutil.rmtree(tmp_path / "exp" / "runs")
    run_experiment(cfg)
    assert json.loads((tmp_path / "exp" / "results.json").read_text()) == before
