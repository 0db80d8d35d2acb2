"""The one TRL subclass: ``SFTTrainer`` plus exactly what GCSL needs, in ``compute_loss``.

- A KL penalty to the base model (Quark, used by the paper with coefficient 0.05): the reference
  is the same model with the LoRA adapter disabled, run under ``no_grad`` on the same batch, so
  no second copy of the model is loaded. The penalty is the token-level KL(policy || base) over
  the full vocabulary, averaged over completion tokens, added as ``kl_coef * KL`` and logged as
  ``kl`` (the data term is logged as ``nll``).
- Packed batches (:mod:`gcsl.training.packing`) go through either loss unchanged; only the
  token count TRL logs is taken from their position ids, not their 4D mask.
- Scalar goals (``gcsl-noquant-embed``): a batch that carries ``goal_value`` gets the goal's
  soft token inserted into its input embeddings (:mod:`gcsl.training.goal_embedding`).

Without either, on GPUs the loss is TRL's own (completion-only NLL through its fused LM head).
The same NLL is computed from the model's logits instead on CPUs (where the fused head is
slower) and when classic GCSL's reward tokens sit on a tied LM head: TRL's fused head reads
``lm_head.weight`` directly, which PEFT's trainable-tokens wrapper does not expose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from gcsl.training.goal_embedding import apply_goal_embedding, insert_before_first_token
from gcsl.training.packing import is_packed_batch, packed_token_count

__all__ = ["GcslSFTTrainer", "GoalValueCollator"]


@dataclass
class GoalValueCollator:
    """TRL's padding collator plus a float ``goal_value`` tensor for scalar-goal batches.

    >>> from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    >>> c = GoalValueCollator(DataCollatorForLanguageModeling(pad_token_id=0))
    >>> c([{"input_ids": [1, 2], "goal_value": 4.5}])["goal_value"]
    tensor([4.5000])
    """

    base: DataCollatorForLanguageModeling

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base(examples)
        batch["goal_value"] = torch.tensor([float(e["goal_value"]) for e in examples], dtype=torch.float32)
        return batch


class GcslSFTTrainer(SFTTrainer):
    """``SFTTrainer`` with an optional KL penalty to the adapter-free base and scalar-goal inputs.

    >>> trainer = GcslSFTTrainer(model, args=sft_config, train_dataset=ds, processing_class=tok,
    ...                          peft_config=lora, kl_coef=0.05)  # doctest: +SKIP
    """

    def __init__(self, *args: Any, kl_coef: float = 0.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        from peft import PeftModel
        from peft.utils import TrainableTokensWrapper

        self.kl_coef = float(kl_coef)
        if self.kl_coef and not isinstance(self.model, PeftModel):
            raise ValueError("kl_coef > 0 needs a PEFT model: the KL reference is the model with its adapter disabled")
        # TRL's fused LM head saves the (batch, length, vocab) logits' memory, which matters on GPUs.
        # On CPUs it scores every position and recomputes the projection in backward: measured ~20%
        # slower per SmolLM2 step than the logits path (benchmarks/train_throughput.py).
        self._fused_head = (self.args.device.type != "cpu"
                            and not isinstance(self.model.get_output_embeddings(), TrainableTokensWrapper))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        goal_value = inputs.pop("goal_value", None)
        raw = dict(inputs)
        if goal_value is not None:
            inputs = self._with_goal(model, raw, goal_value)
        if self.kl_coef == 0 and self._fused_head:
            tokens_before = self._total_train_tokens
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
            if is_packed_batch(inputs) and self.model.training:
                # SFTTrainer counts attention-mask entries, which for a 4D block mask are token pairs.
                tokens = self.accelerator.gather_for_metrics(packed_token_count(inputs)).sum().item()
                self._total_train_tokens = tokens_before + tokens
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return result

        labels = inputs["labels"]
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        forward["use_cache"] = False
        outputs = model(**forward)
        targets = labels[:, 1:]
        mask = targets != -100
        # Only completion positions: the (tokens, vocab) slice is all the loss and the KL need.
        log_probs = outputs.logits[:, :-1][mask].float().log_softmax(-1)
        tokens = targets[mask]
        token_log_probs = log_probs.gather(-1, tokens[:, None]).squeeze(-1)
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        count = torch.as_tensor(count, device=log_probs.device).clamp(min=1)
        nll = -token_log_probs.sum() / count
        loss = nll
        n = mask.sum()
        self._record("nll", -token_log_probs.detach().sum(), n)
        with torch.no_grad():
            self._record("entropy", -(log_probs.exp() * log_probs).sum(), n)
            self._record("mean_token_accuracy", (log_probs.argmax(-1) == tokens).sum(), n)
        if self.kl_coef:
            peft_model = self.accelerator.unwrap_model(model)
            with torch.no_grad(), peft_model.disable_adapter():
                reference = forward if goal_value is None else self._with_goal(model, raw, goal_value)
                reference = {k: v for k, v in reference.items() if k != "labels"}
                reference["use_cache"] = False
                ref_log_probs = model(**reference).logits[:, :-1][mask].float().log_softmax(-1)
            kl_sum = (log_probs.exp() * (log_probs - ref_log_probs)).sum()
            loss = loss + self.kl_coef * kl_sum / count
            self._record("kl", kl_sum.detach(), n)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # Like Trainer.compute_loss: the token count spans all ranks and DDP averages gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _with_goal(self, model, inputs: dict[str, Any], goal_value: torch.Tensor) -> dict[str, Any]:
        """The batch with the goal's soft token before each row's first token (labels -100 there)."""
        inputs = dict(inputs)
        input_ids = inputs.pop("input_ids")
        attention_mask = inputs["attention_mask"]
        embeds, new_mask = apply_goal_embedding(self.accelerator.unwrap_model(model), input_ids, attention_mask,
                                                goal_value)
        inputs["inputs_embeds"] = embeds
        if "labels" in inputs:
            inputs["labels"] = insert_before_first_token(inputs["labels"], attention_mask, -100)
        inputs["attention_mask"] = new_mask
        return inputs

    def _record(self, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        """Logs a per-token mean over all ranks (SFTTrainer.log averages its per-mode metric lists)."""
        mode = "train" if self.model.training else "eval"
        pair = torch.stack([total.detach().float(), count.detach().float()]).reshape(1, 2)
        total, count = self.accelerator.gather_for_metrics(pair).sum(0).tolist()
        self._metrics[mode][name].append(total / count if count else 0.0)
