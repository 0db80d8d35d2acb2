"""Quark (Lu et al., 2022) as an online-loop entry: the entropy bonus, the table entry and its training defaults."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import write_scripted_reviews
from gcsl.config import resolve_config
from gcsl.errors import ConfigError
from gcsl.experiments.runner import ExperimentConfig, run_experiment
from gcsl.methods import Method, get_method, trained_methods
from gcsl.stages import iter_jsonl
from gcsl.training.train import TrainConfig

# Quark's own settings (GXimingLu/Quark arguments.py): kl_coef 0.05, entropy_coef 0.06.
QUARK_TRAIN = {"kl_coef": 0.05, "entropy_coef": 0.06}
PREPARE = {"score_range": [0, 1], "bins": 4}
TRAIN = {"per_device_batch_size": 4, "report_to": "none", "save_steps": 1, "lora_r": 4}
GENERATE = {"max_new_tokens": 3, "batch_size": 4}


def _trainer(tiny_llama_dir: Path, tmp_path: Path, **kwargs):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from gcsl.training.trainer import GcslSFTTrainer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    data = {"prompt": [f"Describe item {i}{'!' * i}" for i in range(4)],
            "completion": [f" It is fine {i}." for i in range(4)]}
    args = SFTConfig(output_dir=str(tmp_path), bf16=False, activation_checkpointing=False, use_cpu=True,
                     report_to=[], per_device_train_batch_size=4)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return GcslSFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data), processing_class=tok,
                          data_collator=DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id),
                          peft_config=lora, **kwargs)


def test_entropy_bonus_is_the_mean_completion_entropy_subtracted(tiny_llama_dir, tmp_path, one_torch_thread):
    plain = _trainer(tiny_llama_dir, tmp_path / "plain")
    trainer = _trainer(tiny_llama_dir, tmp_path / "bonus", entropy_coef=0.0)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["attention_mask"].min() == 0  # padding is in play: only completion tokens count
    # Zero coefficient: the loss is bit for bit the trainer's loss without the option.
    torch.manual_seed(0)
    before = plain.compute_loss(plain.model, dict(batch))
    torch.manual_seed(0)
    zero = trainer.compute_loss(trainer.model, dict(batch))
    assert torch.equal(before, zero) and "entropy_bonus" not in trainer._metrics["train"]

    # By hand: softmax entropy of every completion position's next-token distribution, averaged.
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    probs = logits[:, :-1][mask].double().softmax(-1)
    entropy = float(-(probs * probs.log()).sum(-1).mean())
    assert 0 < entropy < math.log(logits.shape[-1])

    trainer.entropy_coef = 0.5
    with_bonus = trainer.compute_loss(trainer.model, dict(batch))
    assert with_bonus.item() == pytest.approx(zero.item() - 0.5 * entropy, rel=1e-5)
    assert trainer._metrics["train"]["entropy_bonus"][-1] == pytest.approx(0.5 * entropy, rel=1e-5)
    assert trainer._metrics["train"]["entropy"][-1] == pytest.approx(entropy, rel=1e-5)
    with_bonus.backward()  # the bonus carries a gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters() if p.requires_grad)


def test_quark_is_a_loop_over_gcsl_with_quarks_coefficients():
    quark = get_method("quark")
    assert quark.variant_kind == "loop" and quark.loop == "gcsl" and not quark.trainable
    assert dict(quark.train_defaults) == QUARK_TRAIN
    assert "Quark" in quark.summary and "quark" not in trained_methods()
    assert get_method("gcsl").goal_input == "token"  # each response at its own quantile's reward token
    fields = set(TrainConfig.__dataclass_fields__)
    assert set(dict(quark.train_defaults)) <= fields
    with pytest.raises(ConfigError, match="only an entry with loop carries them"):
        Method("x", "x", None, trainer="none", columns=(), train_defaults=(("kl_coef", 0.05),))
    with pytest.raises(ConfigError, match="each option once"):
        Method("x", "x", None, trainer="none", columns=(), loop="gcsl",
               train_defaults=(("kl_coef", 0.05), ("kl_coef", 0.1)))


@pytest.mark.parametrize("value", [-0.1, math.inf, math.nan])
def test_entropy_coef_must_be_non_negative_and_finite(tmp_path, value):
    with pytest.raises(ConfigError) as err:
        resolve_config(TrainConfig, overrides={"data": tmp_path, "out": tmp_path / "m", "entropy_coef": value})
    assert "entropy_coef: must be >= 0 and finite" in str(err.value) and "\n" not in str(err.value)


def test_experiment_runs_quark_with_its_defaults(tmp_path, tiny_llama_dir, monkeypatch, one_torch_thread):
    import gcsl.training.online as online

    monkeypatch.setattr(online, "task_reward", lambda task, options=None: lambda texts: [1.0] * len(texts))
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"t{i}", "prompt": [{"role": "user", "content": f"Film {i}."}]})
                               + "\n" for i in range(2)))
    cfg = resolve_config(ExperimentConfig, overrides={
        "name": "tiny", "out": tmp_path / "exp", "task": "sentiment", "data": str(write_scripted_reviews(tmp_path / "fb.jsonl")),
        "eval_prompts": str(prompts), "model": str(tiny_llama_dir), "methods": ["base", "quark"],
        "seeds": [0], "baseline": "base", "validation_prompts": 2, "prepare": PREPARE,
        "train": {**TRAIN, "max_steps": 1}, "loop": {"rounds": 1, "samples_per_round": 4},
        "generate": GENERATE, "ci_samples": 50,
    })
    text = run_experiment(cfg).read_text()
    loop = tmp_path / "exp" / "runs" / "quark" / "seed0" / "loop"
    for r in (0, 1):
        config = json.loads((loop / f"round-{r}" / "model" / "run.json").read_text())["config"]
        assert {k: config[k] for k in QUARK_TRAIN} == QUARK_TRAIN
    assert json.loads((loop / "round-0" / "prepared" / "goals.json").read_text())  # prepared as classic gcsl
    assert "| quark |" in text
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert {r["variant"] for r in results["rows"]} == {"base", "quark"}
    gens = tmp_path / "exp" / "runs" / "quark" / "seed0" / "gens-top.jsonl"
    assert {row["goal"] for _, row in iter_jsonl(gens)} != {None}  # sampled at the top reward token
