"""The model card (README.md) written beside every trained adapter."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

__all__ = ["render_model_card"]

_METHOD_SUMMARY = {
    "sft": "supervised fine-tuning on the best-rated responses (no goal)",
    "sft-aug": "supervised fine-tuning on the GCSL-bey expansion with the goals removed (SFT-aug)",
    "dpo": "direct preference optimisation on response pairs (TRL DPOTrainer)",
    "simpo": "SimPO on response pairs (TRL CPOTrainer, loss_type=simpo)",
    "gcsl": "classic GCSL: each response conditioned on its own quantized level as a reward token",
    "gcsl-nl": "classic GCSL with the level written as a natural-language score range",
    "gcsl-bey": "GCSL-bey: each response conditioned on every retained threshold it exceeds, as reward tokens",
    "gcsl-bey-nl": "GCSL-bey-NL: each response conditioned on every retained threshold it exceeds, "
                   "as a natural-language instruction",
    "gcsl-bey-snl": "GCSL-bey-SNL: like GCSL-bey-NL with the metric's name and target only",
    "gcsl-noquant-nl": "GCSL without quantization: the raw score written in the goal",
    "gcsl-noquant-embed": "GCSL without quantization: the raw score fed through a learned goal embedding",
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "-" if value is None else str(value)


def _rows_per_step(metrics: dict[str, Any]) -> list[str]:
    """The effective batch: with prefix sharing a sequence holds several rows, a method-dependent number.

    >>> _rows_per_step({"rows_per_step": 81.5, "rows_per_sequence": 10.1875, "train_rows": 163, "epochs": 1.0})
    ['- Rows per optimizer step: 81.5 (10.19 training rows per sequence); 163 training rows, 1 epochs']
    """
    if metrics.get("rows_per_step") is None:
        return []
    return [f"- Rows per optimizer step: {_fmt(metrics['rows_per_step'])} "
            f"({metrics.get('rows_per_sequence', 1):.2f} training rows per sequence); "
            f"{_fmt(metrics.get('train_rows'))} training rows, {_fmt(metrics.get('epochs'))} epochs"]


def render_model_card(*, out_dir: Path, method: str, base_model: str, data_dir: Path, goals: dict[str, Any],
                      config: dict[str, Any], metrics: dict[str, Any], rows: int) -> str:
    """Markdown describing what was trained on what, with the goal to use and the command to run.

    >>> card = render_model_card(out_dir=Path("runs/a"), method="sft", base_model="m", data_dir=Path("d"),
    ...                          goals={"metric": {"name": "rating"}}, config={}, metrics={}, rows=10)
    >>> card.splitlines()[0]
    '# a: sft fine-tune of m'
    """
    metric = goals.get("metric") or {}
    inference = goals.get("inference_goal") or {}
    thresholds = goals.get("thresholds") or []
    retained = goals.get("retained_levels") or []
    out = shlex.quote(str(out_dir))
    lines = [
        f"# {Path(out_dir).name}: {method} fine-tune of {base_model}",
        "",
        f"A LoRA adapter trained with gcsl: {_METHOD_SUMMARY.get(method, method)}.",
        "",
        "## Training",
        "",
        f"- Base model: `{base_model}`",
        f"- Data: `{data_dir}` ({rows} training rows)",
        f"- Method: `{method}`",
        f"- LoRA: r={_fmt(config.get('lora_r'))}, alpha={_fmt(config.get('lora_alpha'))}, "
        f"dropout={_fmt(config.get('lora_dropout'))}, target modules `{config.get('lora_target_modules')}`",
        f"- Optimiser: {config.get('optimizer')} at learning rate {_fmt(config.get('learning_rate'))}"
        + (f" (reward-token rows at {_fmt(config['goal_token_lr'])})" if config.get("goal_token_lr") else "")
        + f", batch {config.get('per_device_batch_size')} x {config.get('gradient_accumulation_steps')} accumulation "
        f"per device, seed {config.get('seed')}",
        f"- KL coefficient to the base model: {_fmt(config.get('kl_coef'))}",
        f"- Steps: {_fmt(metrics.get('global_step'))}, final training loss {_fmt(metrics.get('train_loss'))}",
        *_rows_per_step(metrics),
        "",
        "## Goals",
        "",
        f"- Metric: {metric.get('display_name') or metric.get('name')} "
        f"(range {_fmt(metric.get('low'))} to {_fmt(metric.get('high'))}, "
        f"{'higher' if metric.get('higher_is_better', True) else 'lower'} is better)",
    ]
    if thresholds:
        lines.append("- Thresholds (levels 1..K): " + ", ".join(_fmt(t) for t in thresholds))
        lines.append("- Retained levels: " + ", ".join(str(k) for k in retained))
    if goals.get("special_tokens"):
        lines.append("- Reward tokens added to the tokenizer: " + " ".join(f"`{t}`" for t in goals["special_tokens"]))
    if inference.get("text"):
        lines.append(f"- Top inference goal (level {_fmt(inference.get('level'))}, threshold "
                     f"{_fmt(inference.get('threshold'))}): `{inference['text']}`")
    elif inference.get("value") is not None:
        lines.append(f"- Top inference goal value: {_fmt(inference['value'])}")
    else:
        lines.append("- This method uses no goal at inference.")
    lines += [
        "",
        "Everything needed to rebuild a goal is in `goals.json`; `run.json` holds the resolved training config, "
        "seed and package versions.",
        "",
        "## Use",
        "",
        "```bash",
        f"gcsl generate --model {out} --prompts prompts.jsonl --goal top --out generations.jsonl",
        f"gcsl merge --model {out} --out {shlex.quote(str(out_dir) + '-merged')}   # optional: a standalone model",
        "```",
        "",
        "`--goal` also takes a value in the metric's units, `scale:<factor>` (the top goal made more ambitious by the "
        "factor) or `level:<k>` (level k's goal exactly as trained).",
        "",
    ]
    return "\n".join(lines)
