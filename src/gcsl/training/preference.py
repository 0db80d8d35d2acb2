"""AlphaDPO (Wu et al., ICML 2025, arXiv:2410.10148): SimPO's loss with an adaptive, per-pair margin.

Sources: the paper, and its authors' reference implementation (github.com/junkangwu/alpha-DPO,
``scripts/dpo_trainer.py``, ``loss_type == "alpha-dpo"`` with ``ln: true``, and its
``training_configs/*.yaml``). With length-normalised log-probabilities (``ln: true``)

    r(y)   = log pi_theta(y | x) / |y|             rho(y) = log pi_ref(y | x) / |y|
    M      = (r(y_w) - rho(y_w)) - (r(y_l) - rho(y_l))   the pair's policy-vs-reference log-ratio gap
    M*     = (M - mu) / sigma                       mu, sigma: running mean and std of M over batches
    loss   = -log sigmoid(beta * (r(y_w) - r(y_l)) - gamma - alpha * beta * sg[M*])

where ``sg`` stops the gradient: only SimPO's reward difference is optimised, the margin moves
with the data. This is the paper's implicit reference pi_ref_hat ~ U(y|x) (pi_theta/pi_ref)^alpha
put into SimPO's length-normalised reward, which is why alpha is scaled by beta; the reference code
writes the same as ``beta * (pi_logratios - sg[alpha * M* + gamma_beta_ratio])`` with
``gamma = beta * gamma_beta_ratio``. With ``alpha = 0`` it is SimPO's loss exactly (TRL's
``CPOTrainer(loss_type="simpo")``: ``beta * (logratios - simpo_gamma / beta)``).

``mu`` and ``sigma`` are exponential moving averages (momentum 0.9, reference code) of the mean
and standard deviation of M over the global batch (all processes), updated with each training
micro-batch before it is normalised. One deviation: the reference code starts the averages at
zero without correction, which inflates M* about tenfold in the first steps; here they are
bias-corrected (as Adam's moments are), so the first batch is normalised by its own statistics.
The averages are not part of a checkpoint: a resumed run starts them again.

Also here: :class:`RosePOTrainer`, DPO with RosePO's personalized smoothing (one label-smoothing factor per
pair, from the dataset's ``smoothing`` column; :func:`smoothed_dpo_loss`). Both trainers read their batch's
log-probabilities through :func:`sequence_logps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer

from gcsl.methods import SMOOTHING_COLUMN

__all__ = ["ALPHADPO_DEFAULTS", "AlphaDPOConfig", "AlphaDPOTrainer", "alphadpo_loss", "RosePOTrainer",
           "smoothed_dpo_loss", "sequence_logps"]

# Defaults from the reference implementation's training_configs/llama-3-8b-instruct-alpha-dpo.yaml
# (beta 2.5, gamma_beta_ratio 0.6, alpha 0.2; its Mistral config shares beta 2.5). gamma here is
# the absolute margin, beta * gamma_beta_ratio, as TRL's simpo_gamma is.
ALPHADPO_DEFAULTS = {"beta": 2.5, "gamma": 1.5, "alpha": 0.2}
# Momentum of the running statistics of M (reference code: update_and_sync_ref_mean_std).
MARGIN_MOMENTUM = 0.9
# Guards sigma = 0, as on the first step of a fresh LoRA adapter, where policy == reference and M = 0.
_EPS = 1e-8


def alphadpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                  ref_rejected_logps: torch.Tensor, *, beta: float, gamma: float, alpha: float,
                  mean: torch.Tensor | float, std: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair AlphaDPO losses and the (detached) normalised margins M*.

    All log-probabilities are per-token averages over each completion (length-normalised);
    ``mean`` and ``std`` are the statistics M is normalised with.

    >>> t = torch.tensor
    >>> losses, m = alphadpo_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.5]), beta=2.0, gamma=1.0, alpha=0.5,
    ...                           mean=0.0, std=2.0)
    >>> round(m.item(), 3), round(losses.item(), 4)  # M = 1, M* = 0.5: -log sigmoid(2 - 1 - 0.5)
    (0.5, 0.4741)
    """
    logratios = chosen_logps - rejected_logps
    gap = logratios - (ref_chosen_logps - ref_rejected_logps)
    normalised = ((gap - mean) / (std + _EPS)).detach()
    losses = -F.logsigmoid(beta * logratios - gamma - alpha * beta * normalised)
    return losses, normalised


def sequence_logps(trainer: DPOTrainer, model, inputs: dict) -> tuple:
    """Summed completion log-probabilities of a DPOTrainer batch ([chosen..., rejected...]) under the policy and
    the trainer's reference, the completions' lengths, the policy's outputs and the model inputs used.

    The reference is DPOTrainer's own (``compute_ref_log_probs``: with a LoRA adapter, the same model with the
    adapter disabled; or precomputed columns)."""
    model_kwargs = {k: v for k, v in inputs.items()
                    if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}}
    model_kwargs["use_cache"] = False
    if trainer.aux_loss_enabled:
        model_kwargs["output_router_logits"] = True
    completion_mask = inputs["completion_mask"]
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    shift_mask = completion_mask[..., 1:]
    # The fused head's log-probs are 0 where the label is -100, so a sum covers the completion only.
    logps = outputs.log_probs[:, -shift_mask.size(1):].sum(dim=1)
    if trainer.precompute_ref_logps:
        ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
    else:
        ref_model = model if trainer.ref_model is None else trainer.ref_model
        ref_logps = torch.cat(trainer.compute_ref_log_probs(ref_model, inputs))
    return logps, ref_logps.to(logps.device), shift_mask.sum(dim=1).clamp(min=1), outputs, model_kwargs


@dataclass
class AlphaDPOConfig(DPOConfig):
    """``DPOConfig`` plus AlphaDPO's two constants (``beta`` is DPOConfig's own)."""

    alphadpo_alpha: float = field(default=ALPHADPO_DEFAULTS["alpha"],
                                  metadata={"help": "weight alpha of the adaptive margin alpha * beta * M*"})
    alphadpo_gamma: float = field(default=ALPHADPO_DEFAULTS["gamma"],
                                  metadata={"help": "target reward margin gamma, as SimPO's"})


class AlphaDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with the AlphaDPO loss in place of DPO's, in ``compute_loss``.

    The reference log-probabilities are DPOTrainer's own (``compute_ref_log_probs``: with a LoRA
    adapter, the same model with the adapter disabled; or precomputed); logged metrics follow
    DPOTrainer's names, with rewards taken as the paper's implicit ones,
    ``beta * (r(y) - alpha * (r(y) - rho(y)))``, plus ``alphadpo/margin_mean`` and ``_std``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.alphadpo_alpha = self.args.alphadpo_alpha
        self.alphadpo_gamma = self.args.alphadpo_gamma
        self._margin_moments = torch.zeros(2, dtype=torch.float64)  # running mean and std of M
        self._margin_updates = 0

    def _margin_statistics(self, gap: torch.Tensor, update: bool) -> tuple[float, float]:
        batch = self.accelerator.gather(gap.detach().float()).double().cpu()
        observed = torch.stack([batch.mean(), batch.std() if batch.numel() > 1 else torch.zeros((), dtype=batch.dtype)])
        if update:
            self._margin_moments = MARGIN_MOMENTUM * self._margin_moments + (1 - MARGIN_MOMENTUM) * observed
            self._margin_updates += 1
        if self._margin_updates == 0:  # evaluation before any training step: the batch's own statistics
            return observed[0].item(), observed[1].item()
        mean, std = self._margin_moments / (1 - MARGIN_MOMENTUM ** self._margin_updates)
        return mean.item(), std.item()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        logps, ref_logps, lengths, outputs, model_kwargs = sequence_logps(self, model, inputs)
        chosen, rejected = (logps / lengths).chunk(2)
        ref_chosen, ref_rejected = (ref_logps.to(logps.device) / lengths).chunk(2)

        gap = (chosen - rejected) - (ref_chosen - ref_rejected)
        mean, std = self._margin_statistics(gap, update=mode == "train")
        losses, _ = alphadpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta,
                                  gamma=self.alphadpo_gamma, alpha=self.alphadpo_alpha, mean=mean, std=std)
        loss = losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss

        with torch.no_grad():
            chosen_rewards = self.beta * (chosen - self.alphadpo_alpha * (chosen - ref_chosen))
            rejected_rewards = self.beta * (rejected - self.alphadpo_alpha * (rejected - ref_rejected))
            metrics = self._metrics[mode]
            gathered = {name: self.accelerator.gather(value.detach()) for name, value in {
                "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                "rewards/margins": chosen_rewards - rejected_rewards,
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                "logps/chosen": chosen, "logps/rejected": rejected}.items()}
            for name, value in gathered.items():
                metrics[name].append(value.float().mean().item())
            metrics["alphadpo/margin_mean"].append(mean)
            metrics["alphadpo/margin_std"].append(std)
        if return_outputs:  # the fused head builds no logits; prediction_step wants them
            with torch.no_grad():
                outputs = model(**{k: v for k, v in model_kwargs.items() if k != "output_router_logits"})
            return loss, outputs
        return loss


# -- RosePO's personalized smoothing (Liao et al., 2024, arXiv:2410.12519) ------------------------------


def smoothed_dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, smoothing: torch.Tensor,
                      *, beta: float) -> torch.Tensor:
    """Per-pair DPO loss with a per-pair label-smoothing factor (RosePO's personalized smoothing).

    ``(1 - e) * -log sigmoid(beta * h) + e * -log sigmoid(-beta * h)``, h the pair's policy-minus-reference
    log-ratio gap: the conservative-DPO form with its one global epsilon replaced by a factor per pair, the
    probability the preference oracle gives that the pair's label is wrong.

    >>> t = torch.tensor
    >>> round(smoothed_dpo_loss(t([1.0]), t([-1.0]), t([0.25]), beta=0.5).item(), 4)  # h = 2
    0.5633
    """
    h = beta * (chosen_logratios - rejected_logratios)
    return -(1 - smoothing) * F.logsigmoid(h) - smoothing * F.logsigmoid(-h)


class _SmoothingCollator:
    """DPOTrainer's collator plus each pair's smoothing factor, which the parent collator drops."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        batch = self.inner([{k: v for k, v in ex.items() if k != SMOOTHING_COLUMN} for ex in examples])
        batch[SMOOTHING_COLUMN] = torch.tensor([float(ex[SMOOTHING_COLUMN]) for ex in examples])
        return batch


class RosePOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` whose sigmoid loss takes a per-pair smoothing factor from the dataset's
    ``smoothing`` column (:func:`smoothed_dpo_loss`); everything else, the reference included, is DPOTrainer's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = _SmoothingCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if SMOOTHING_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, SMOOTHING_COLUMN]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        smoothing = inputs.pop(SMOOTHING_COLUMN)
        logps, ref_logps, _, outputs, model_kwargs = sequence_logps(self, model, inputs)
        chosen, rejected = logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        losses = smoothed_dpo_loss(chosen - ref_chosen, rejected - ref_rejected, smoothing.to(logps.device),
                                   beta=self.beta)
        loss = losses.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
        with torch.no_grad():  # DPOTrainer's metric names, so logs and reports read the same
            chosen_rewards = self.beta * (chosen - ref_chosen)
            rejected_rewards = self.beta * (rejected - ref_rejected)
            metrics = self._metrics[mode]
            for name, value in {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                                "rewards/margins": chosen_rewards - rejected_rewards,
                                "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                                "rosepo/smoothing": smoothing.float()}.items():
                metrics[name].append(self.accelerator.gather(value.detach()).float().mean().item())
        if return_outputs:  # the fused head builds no logits; prediction_step wants them
            with torch.no_grad():
                outputs = model(**{k: v for k, v in model_kwargs.items() if k != "output_router_logits"})
            return loss, outputs
        return loss
