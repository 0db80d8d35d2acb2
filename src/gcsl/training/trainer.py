"""The SFT/GCSL trainer: ``SFTTrainer`` plus exactly what GCSL needs, in ``compute_loss``
(the preference trainers are TRL's own, AlphaDPO's in :mod:`gcsl.training.preference`).

- A KL penalty to the base model (Quark, used by the paper with coefficient 0.05): the reference
  is the same model with the LoRA adapter disabled (no second copy is loaded), run under
  ``no_grad`` on the goal-free prompt followed by the same completion tokens, as Quark's
  reference never sees the control token. Batches whose prompts carry a goal bring those inputs
  as ``ref_*`` keys (built by the collators, :func:`gcsl.training.packing.reference_row`); other
  batches are goal-free already (a scalar goal's soft token is simply not inserted). The penalty
  is the token-level KL(policy || base) over the full vocabulary, averaged over completion
  tokens, added as ``kl_coef * KL`` and logged as ``kl`` (the data term is logged as ``nll``).
- An entropy bonus (Quark's, ``entropy_coef``; GXimingLu/Quark's main.py subtracts
  ``entropy_coef * entropy`` from the per-token loss, default 0.06 in its arguments.py): the
  policy's next-token entropy over the full vocabulary, averaged over completion tokens, is
  subtracted as ``entropy_coef * H`` and the term logged as ``entropy_bonus``.
- Reward-token rows may train at their own learning rate (``goal_token_lr``): they start from a
  text's embedding and must move much further than a LoRA update.
- Packed batches (:mod:`gcsl.training.packing`) go through either loss unchanged; only the
  token count TRL logs is taken from their position ids, not their 4D mask.
- Scalar goals (``gcsl-noquant-embed``): a batch that carries ``goal_value`` gets the goal's
  soft token inserted into its input embeddings (:mod:`gcsl.goal_embedding`).

Without the KL penalty or the entropy bonus, on GPUs the loss is TRL's own (completion-only NLL
through its fused LM head). The same NLL is computed from the model's logits instead on CPUs (where the fused head is
slower) and when classic GCSL's reward tokens sit on a tied LM head: TRL's fused head reads
``lm_head.weight`` directly, which PEFT's trainable-tokens wrapper does not expose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from gcsl.errors import StageError
from gcsl.goal_embedding import apply_goal_embedding, insert_before_first_token
from gcsl.models import library_deprecations_silenced
from gcsl.training.packing import is_packed_batch, packed_token_count

__all__ = ["GcslSFTTrainer", "GoalValueCollator", "ReferenceCollator"]

REFERENCE_PREFIX = "ref_"  # batch keys holding the KL reference's inputs


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


@dataclass
class ReferenceCollator:
    """TRL's padding collator for rows that also carry the KL reference's inputs.

    Pads ``input_ids``/``labels`` as TRL does and ``ref_input_ids``/``ref_labels`` (from
    :func:`gcsl.training.packing.tokenize_rows`) the same way, returned with the ``ref_`` prefix.

    >>> from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    >>> c = ReferenceCollator(DataCollatorForLanguageModeling(pad_token_id=0))
    >>> c([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "ref_input_ids": [4, 3], "ref_labels": [-100, 3]}])[
    ...     "ref_labels"]
    tensor([[-100,    3]])
    """

    base: DataCollatorForLanguageModeling

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.base([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        reference = self.base([{"input_ids": e["ref_input_ids"], "labels": e["ref_labels"]} for e in examples])
        batch.update({REFERENCE_PREFIX + k: v for k, v in reference.items()})
        return batch


class GcslSFTTrainer(SFTTrainer):
    """``SFTTrainer`` with an optional KL penalty to the adapter-free base, entropy bonus and scalar-goal inputs.

    >>> trainer = GcslSFTTrainer(model, args=sft_config, train_dataset=ds, processing_class=tok,
    ...                          peft_config=lora, kl_coef=0.05)  # doctest: +SKIP
    """

    def __init__(self, *args: Any, kl_coef: float = 0.0, entropy_coef: float = 0.0, goal_token_lr: float | None = None,
                 **kwargs: Any):
        with library_deprecations_silenced():  # SFTTrainer wraps the model with peft here
            super().__init__(*args, **kwargs)
        from peft import PeftModel
        from peft.utils import TrainableTokensWrapper

        self.kl_coef = float(kl_coef)
        self.entropy_coef = float(entropy_coef)
        self.goal_token_lr = goal_token_lr
        if self.kl_coef and not isinstance(self.model, PeftModel):
            raise ValueError("kl_coef > 0 needs a PEFT model: the KL reference is the model with its adapter disabled")
        # TRL's fused LM head saves the (batch, length, vocab) logits' memory, which matters on GPUs.
        # On CPUs it scores every position and recomputes the projection in backward: measured ~20%
        # slower per SmolLM2 step than the logits path (benchmarks/train_throughput.py).
        self._fused_head = (self.args.device.type != "cpu"
                            and not isinstance(self.model.get_output_embeddings(), TrainableTokensWrapper))

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the reward-token rows in a group of their own at ``goal_token_lr``.

        The learning-rate schedule scales every group's own initial rate, so the rows follow the
        same schedule at their own level.
        """
        optimizer = super().create_optimizer(model)
        if self.goal_token_lr is None or any(g.get("goal_tokens") for g in optimizer.param_groups):
            return optimizer
        opt_model = self.model if model is None else model
        # PEFT's TrainableTokens delta: the rows of the reward tokens (shared with a tied LM head).
        rows = {id(p) for n, p in opt_model.named_parameters() if "trainable_tokens" in n and p.requires_grad}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in rows]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in rows]
                options = {k: v for k, v in group.items() if k != "params"}
                optimizer.add_param_group({**options, "params": moved, "lr": self.goal_token_lr, "goal_tokens": True})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        goal_value = inputs.pop("goal_value", None)
        batch = dict(inputs)  # with the KL reference's inputs, if the collator made them
        inputs = {k: v for k, v in inputs.items() if not k.startswith(REFERENCE_PREFIX)}
        raw = dict(inputs)
        if self.model.training:
            self._count_tokens(raw)
        if goal_value is not None:
            inputs = self._with_goal(model, raw, goal_value)
        if self.kl_coef == 0 and self.entropy_coef == 0 and self._fused_head:
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
        with torch.set_grad_enabled(bool(self.entropy_coef) and torch.is_grad_enabled()):
            entropy_sum = -(log_probs.exp() * log_probs).sum()
        self._record("entropy", entropy_sum.detach(), n)
        with torch.no_grad():
            self._record("mean_token_accuracy", (log_probs.argmax(-1) == tokens).sum(), n)
        if self.entropy_coef:
            # Quark's bonus: subtracted, so training keeps the next-token distribution from collapsing.
            loss = loss - self.entropy_coef * entropy_sum / count
            self._record("entropy_bonus", self.entropy_coef * entropy_sum.detach(), n)
        if self.kl_coef:
            ref_log_probs = self._reference_log_probs(model, batch)
            if ref_log_probs.shape != log_probs.shape:
                raise StageError(f"KL reference: it scores {ref_log_probs.shape[0]} completion tokens where the batch "
                                 f"scores {log_probs.shape[0]}; re-run `gcsl prepare` so the goal-free prompts match")
            kl_sum = (log_probs.exp() * (log_probs - ref_log_probs)).sum()
            loss = loss + self.kl_coef * kl_sum / count
            self._record("kl", kl_sum.detach(), n)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # Like Trainer.compute_loss: the token count spans all ranks and DDP averages gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _reference_log_probs(self, model, batch: dict[str, Any]) -> torch.Tensor:
        """The base model's (completion tokens, vocab) log-probabilities given the goal-free prompts.

        ``batch`` is a collated batch: its ``ref_*`` inputs when it has them, else its own inputs
        (goal-free prompts; a ``goal_value`` is ignored, so no soft goal token goes in). The rows
        come in the order of the batch's completion tokens, flattened row-major.
        """
        reference = {k[len(REFERENCE_PREFIX):]: v for k, v in batch.items() if k.startswith(REFERENCE_PREFIX)}
        if not reference:
            reference = {k: v for k, v in batch.items() if k != "goal_value"}
        mask = reference["labels"][:, 1:] != -100
        forward = {k: v for k, v in reference.items() if k != "labels"}
        forward["use_cache"] = False
        # Disabling the adapter also turns off the reward-token rows and the goal embedding's copy.
        with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
            return model(**forward).logits[:, :-1][mask].float().log_softmax(-1)

    def _count_tokens(self, inputs: dict[str, Any]) -> None:
        """Adds the batch's real (prompt and completion) tokens on all ranks to the trainer state.

        Kept in ``state.num_input_tokens_seen``, which checkpoints save and resuming restores; the
        Trainer's own count (off here) would count a packed batch's 4D mask entries, token pairs.
        """
        mask = inputs.get("attention_mask")
        if is_packed_batch(inputs):
            tokens = packed_token_count(inputs)
        else:
            tokens = mask.sum() if mask is not None else inputs["input_ids"].numel()
        tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64).reshape(1)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(tokens).sum().item())

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
