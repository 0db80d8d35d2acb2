"""DExperts (Liu et al., ACL 2021): sampling from the base model steered by an expert and an anti-expert.

At every step the next-token logits are ``base + alpha * (expert - anti_expert)``; temperature,
top-k and nucleus (top-p) filtering and the draw then follow exactly as in plain sampling.

How the three models are held: one base model in memory carries both LoRA adapters (peft's
multiple adapters, named ``expert`` and ``anti``). ``transformers`` samples from that model with
the adapters switched off, so the base logits, the KV cache, the padding and the random draws are
the plain path's own. :class:`DExpertsLogitsProcessor`, a ``LogitsProcessor`` handed to
``generate`` (transformers runs custom processors before its temperature/top-k/top-p warpers, as
its own classifier-free guidance processor does), switches the adapters on for one mixed-batch
forward (peft's ``adapter_names``: the batch twice, once per adapter) over the tokens written since
its last call, with its own KV cache, and adds ``alpha * (expert - anti)`` to the scores. With
``alpha = 0`` the scores are returned untouched and no random number is drawn by it, so samples equal
the base model's.

What it does not do: goal-conditioned experts (their goal would have to be written into the prompt
for them only) and experts that added tokens to the vocabulary are refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcsl.errors import ConfigError, StageError

__all__ = ["DExpertsLogitsProcessor", "DExpertsModel", "load_dexperts"]

EXPERT, ANTI = "expert", "anti"


@contextmanager
def _adapters_on(peft_model) -> Iterator[None]:
    """The LoRA layers switched on inside the block (they are off for the base model's own steps)."""
    peft_model.base_model.enable_adapter_layers()
    try:
        yield
    finally:
        peft_model.base_model.disable_adapter_layers()


class DExpertsLogitsProcessor:
    """Adds ``alpha * (expert - anti_expert)`` to the base model's next-token scores, one generate call long.

    ``prompt_mask`` is the left-padded prompts' attention mask. ``generate`` extends the mask with
    ones for every new token (finished rows included) and numbers positions by the mask's cumulative
    sum; the experts' inputs are built the same way, so they read what the base reads.
    """

    def __init__(self, peft_model, alpha: float, prompt_mask) -> None:
        self.peft_model = peft_model
        self.alpha = float(alpha)
        self.prompt_mask = prompt_mask
        self.cache = None
        self.seen = 0  # tokens already in the experts' cache

    def expert_logits(self, input_ids) -> tuple[Any, Any]:
        """The expert's and the anti-expert's next-token logits (float32) after ``input_ids``."""
        import torch
        from transformers import DynamicCache

        rows, width = input_ids.shape
        mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones((rows, width - self.prompt_mask.shape[1]))], 1)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        if self.cache is None:
            self.cache = DynamicCache()
        new = slice(self.seen, width)
        twice = lambda t: torch.cat([t, t], 0)  # noqa: E731 - the batch once per adapter
        with _adapters_on(self.peft_model):
            out = self.peft_model(input_ids=twice(input_ids[:, new]), attention_mask=twice(mask),
                                  position_ids=twice(positions[:, new]), cache=self.cache, use_cache=True,
                                  adapter_names=[EXPERT] * rows + [ANTI] * rows, logits_to_keep=1)
        self.seen = width
        logits = out.logits[:, -1, :].float()
        return logits[:rows], logits[rows:]

    def __call__(self, input_ids, scores):
        if self.alpha == 0:
            return scores
        expert, anti = self.expert_logits(input_ids)
        vocab = scores.shape[-1]  # the lm head may pad its rows beyond the tokenizer; both agree here
        return scores + self.alpha * (expert[:, :vocab] - anti[:, :vocab]).to(scores.dtype)


@dataclass
class DExpertsModel:
    """The base model with its two adapters, sampled from like a model: ``generate``, ``device``, ``dtype``."""

    peft_model: Any
    alpha: float

    @property
    def device(self):
        return self.peft_model.device

    @property
    def dtype(self):
        return self.peft_model.dtype

    def processor(self, attention_mask) -> DExpertsLogitsProcessor:
        return DExpertsLogitsProcessor(self.peft_model, self.alpha, attention_mask)

    def generate(self, *, input_ids, attention_mask, **kwargs):
        """``transformers`` generate on the base model (adapters off), steered by a fresh processor."""
        from transformers import LogitsProcessorList

        self.peft_model.base_model.disable_adapter_layers()
        try:
            return self.peft_model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                            logits_processor=LogitsProcessorList([self.processor(attention_mask)]),
                                            **kwargs)
        finally:
            self.peft_model.base_model.enable_adapter_layers()

    def base_logits(self, input_ids, attention_mask):
        """The base model's logits (adapters off), for checks."""
        self.peft_model.base_model.disable_adapter_layers()
        try:
            return self.peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            self.peft_model.base_model.enable_adapter_layers()


def _adapter_base(folder: Path, field_name: str) -> tuple[str, str | None]:
    """The base an adapter folder was trained on (adapter_config.json) and the name `gcsl train` was given."""
    def read(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StageError(f"{path}: cannot read it ({exc}); re-run `gcsl train` for the {field_name}") from None
        return data if isinstance(data, dict) else {}

    base = read(folder / "adapter_config.json").get("base_model_name_or_path")
    if not base:
        raise StageError(f"{folder}/adapter_config.json: base_model_name_or_path is missing; add the base model")
    named = read(folder / "run.json").get("config", {}).get("model") if (folder / "run.json").is_file() else None
    return str(base), (str(named) if named else None)


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def load_dexperts(model: str, expert: str, anti_expert: str, alpha: float, device=None, dtype=None):
    """The base ``model`` with the ``expert`` and ``anti_expert`` adapters (gcsl train outputs) on it.

    Returns a :class:`gcsl.models.InferenceModel` whose ``model`` is a :class:`DExpertsModel`.
    An adapter trained on another base is a one-line StageError naming it.
    """
    from peft import PeftModel

    from gcsl.models import (
        InferenceModel,
        default_device,
        library_deprecations_silenced,
        load_causal_lm,
        load_tokenizer,
        resolve_model_path,
    )
    from gcsl.stages import ModelFolder

    device = device if device is not None else default_device()
    resolved = resolve_model_path(model)
    for field_name, folder in (("expert", expert), ("anti_expert", anti_expert)):
        path = Path(folder)
        if ModelFolder(path).state != "complete" or not (path / "adapter_config.json").is_file():
            raise StageError(f"{field_name}: {folder} is not a finished `gcsl train` output (adapter_config.json "
                             "and run.json); train it first")
        setup = ModelFolder(path).goal_setup()
        if setup is not None:
            from gcsl.methods import get_method

            if get_method(setup.method).is_goal_conditioned:
                raise ConfigError(f"{field_name}: {folder} was trained with goals ({setup.method}); DExperts' "
                                  "experts are goal-free, e.g. sft and sft-bottom")
        base, named = _adapter_base(path, field_name)
        if not (_same_model(base, resolved) or (named is not None and _same_model(named, model))):
            raise StageError(f"{field_name}: {folder} was trained on {named or base!r}, not on model {model!r}; "
                             "give the base model both adapters were trained on")
    tokenizer = load_tokenizer(model)
    base_model = load_causal_lm(model, dtype=dtype, device=device)
    rows = base_model.get_input_embeddings().weight.shape[0]
    from gcsl.models import saved_vocab_rows

    for field_name, folder in (("expert", expert), ("anti_expert", anti_expert)):
        saved = saved_vocab_rows(Path(folder))
        if saved is not None and saved != rows:
            raise StageError(f"{field_name}: {folder} resized the vocabulary to {saved} rows (the base has {rows}); "
                             "DExperts needs experts that added no tokens")
    try:
        with library_deprecations_silenced():
            peft_model = PeftModel.from_pretrained(base_model, str(expert), adapter_name=EXPERT, is_trainable=False)
            peft_model.load_adapter(str(anti_expert), adapter_name=ANTI, is_trainable=False)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(f"cannot load the DExperts adapters onto {model!r} ({first}); check that both were trained "
                         "on it") from None
    peft_model.eval()
    return InferenceModel(model=DExpertsModel(peft_model, alpha), tokenizer=tokenizer, base_model=str(model))
