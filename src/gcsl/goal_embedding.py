"""Scalar-goal conditioner for ``gcsl-noquant-embed``: a raw score becomes one soft input token.

The paper's no-quantization ablation (appendix C.2) feeds the scalar feedback value through an
external reward-embedding layer and gives the result to the decoder as an extra input. Here that
layer is :class:`GoalEmbedding` (``Linear(1, hidden)`` or a two-layer MLP on the value scaled to
[-1, 1] by the metric's range), and its output is inserted as one extra input embedding right
before the first real (attended) token of every row, so it works with left padding (generation)
and right padding (training) alike.

Where it lives: the module is attached to the causal LM as the attribute
:data:`GOAL_EMBEDDING_MODULE` before the LoRA adapter is created, and listed in PEFT's
``modules_to_save``, so its trained copy is saved in ``adapter_model.safetensors`` (and in every
checkpoint, so resuming restores it). Its shape and value range are in ``goal_embedding.json``
next to the adapter. A merged model (``gcsl merge``) keeps it in ``goal_embedding.safetensors``.

Generation uses it like this::

    from gcsl.models import load_for_inference
    from gcsl.goal_embedding import apply_goal_embedding, load_goal_embedding

    m = load_for_inference("runs/noquant-embed")
    load_goal_embedding(m.model, "runs/noquant-embed")        # attaches the trained conditioner
    batch = m.tokenizer(prompts, return_tensors="pt", padding=True)  # left padding for generation
    embeds, mask = apply_goal_embedding(m.model, batch.input_ids, batch.attention_mask, goal.value)
    out = m.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=64)
    # with inputs_embeds, a decoder-only model returns only the new tokens

With the adapter disabled (the KL reference), PEFT routes calls to the untrained original copy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gcsl.errors import StageError

__all__ = [
    "GOAL_EMBEDDING_MODULE",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "GoalEmbeddingConfig",
    "GoalEmbedding",
    "attach_goal_embedding",
    "get_goal_embedding",
    "insert_before_first_token",
    "apply_goal_embedding",
    "save_goal_embedding",
    "load_goal_embedding",
]

GOAL_EMBEDDING_MODULE = "gcsl_goal_embedding"
CONFIG_NAME = "goal_embedding.json"
WEIGHTS_NAME = "goal_embedding.safetensors"


@dataclass(frozen=True)
class GoalEmbeddingConfig:
    """Shape of the conditioner and the value range that is mapped onto [-1, 1]."""

    hidden_size: int
    low: float
    high: float
    layers: int = 2

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GoalEmbeddingConfig:
        return cls(hidden_size=int(data["hidden_size"]), low=float(data["low"]), high=float(data["high"]),
                   layers=int(data.get("layers", 2)))


class GoalEmbedding(nn.Module):
    """Maps goal values of shape (batch,) to input embeddings of shape (batch, hidden).

    >>> cond = GoalEmbedding(GoalEmbeddingConfig(hidden_size=8, low=1.0, high=5.0))
    >>> cond(torch.tensor([1.0, 5.0])).shape
    torch.Size([2, 8])
    """

    def __init__(self, config: GoalEmbeddingConfig, output_std: float | None = None):
        super().__init__()
        if config.high <= config.low:
            raise StageError(f"goal embedding: value range [{config.low}, {config.high}] is empty; the metric's "
                             "low must be below its high")
        self.config = config
        hidden = config.hidden_size
        if config.layers == 1:
            self.net = nn.Sequential(nn.Linear(1, hidden))
        else:
            self.net = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        if output_std is not None:
            # Start at the scale of the model's token embeddings, so the soft token neither drowns
            # the prompt nor vanishes in the first layer's norm.
            last = self.net[-1]
            nn.init.normal_(last.weight, std=output_std / max(1.0, last.in_features ** 0.5))
            nn.init.zeros_(last.bias)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        first = self.net[0].weight
        values = values.to(device=first.device, dtype=torch.float32).reshape(-1, 1)
        # Values beyond the range (e.g. a "scale:1.1" goal) extrapolate instead of being clipped.
        scaled = 2.0 * (values - self.config.low) / (self.config.high - self.config.low) - 1.0
        return self.net(scaled.to(first.dtype))


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/PEFT wrappers."""
    while hasattr(model, "module") and not hasattr(model, "get_input_embeddings"):
        model = model.module  # DistributedDataParallel and friends
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def attach_goal_embedding(model: nn.Module, config: GoalEmbeddingConfig) -> GoalEmbedding:
    """Creates the conditioner and attaches it to ``model`` (before PEFT wrapping, for training).

    >>> attach_goal_embedding(model, GoalEmbeddingConfig(model.config.hidden_size, 1.0, 5.0))  # doctest: +SKIP
    """
    base = _base_model(model)
    embed = base.get_input_embeddings().weight
    module = GoalEmbedding(config, output_std=float(embed.detach().float().std()))
    module.to(device=embed.device)
    setattr(base, GOAL_EMBEDDING_MODULE, module)
    return module


def get_goal_embedding(model: nn.Module) -> nn.Module | None:
    """The attached conditioner (under PEFT, the wrapper that routes to the trained copy), or None."""
    return getattr(_base_model(model), GOAL_EMBEDDING_MODULE, None)


def insert_before_first_token(x: torch.Tensor, attention_mask: torch.Tensor, fill: torch.Tensor | float | int
                              ) -> torch.Tensor:
    """Inserts ``fill`` at each row's first attended position: (B, L, ...) -> (B, L + 1, ...).

    ``fill`` is a scalar or has shape (B, ...) matching ``x[:, 0]``.

    >>> mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    >>> insert_before_first_token(torch.tensor([[0, 5, 6], [7, 8, 0]]), mask, 9)
    tensor([[0, 9, 5, 6],
            [9, 7, 8, 0]])
    """
    batch, length = x.shape[:2]
    first = attention_mask.to(torch.long).argmax(dim=1)  # index of the first 1 (0 for an all-zero row)
    j = torch.arange(length + 1, device=x.device).unsqueeze(0)
    source = (j - (j > first[:, None]).long()).clamp(max=length - 1)
    at_goal = j == first[:, None]
    extra = x.shape[2:]
    index = source.view(batch, length + 1, *([1] * len(extra))).expand(batch, length + 1, *extra)
    shifted = x.gather(1, index)
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    if fill.dim() > 0:
        fill = fill.unsqueeze(1)  # (B, 1, ...)
    return torch.where(at_goal.view(batch, length + 1, *([1] * len(extra))), fill, shifted)


def apply_goal_embedding(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         value: torch.Tensor | float | list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings with the goal's soft token inserted, and the matching attention mask.

    ``value`` is one goal value for the whole batch or one per row, in the metric's display units.

    >>> embeds, mask = apply_goal_embedding(model, ids, attention_mask, 4.5)  # doctest: +SKIP
    >>> model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=32)  # doctest: +SKIP
    """
    conditioner = get_goal_embedding(model)
    if conditioner is None:
        raise StageError("this model has no goal embedding; load it with load_goal_embedding(model, folder) "
                         "from a gcsl-noquant-embed training output")
    embeds = _base_model(model).get_input_embeddings()(input_ids)
    values = torch.as_tensor(value, dtype=torch.float32, device=embeds.device).reshape(-1)
    if values.numel() == 1:
        values = values.expand(input_ids.shape[0])
    goal = conditioner(values).to(embeds.dtype)
    return (insert_before_first_token(embeds, attention_mask, goal),
            insert_before_first_token(attention_mask, attention_mask, 1))


def save_goal_embedding(model: nn.Module, folder: Path, *, weights: bool) -> None:
    """Writes ``goal_embedding.json`` (and, with ``weights``, ``goal_embedding.safetensors``)."""
    from safetensors.torch import save_file

    from gcsl.runinfo import atomic_write_json

    module = get_goal_embedding(model)
    if module is None:
        raise StageError("no goal embedding attached to this model; nothing to save")
    trained = getattr(module, "modules_to_save", None)
    if trained is not None:  # a PEFT ModulesToSaveWrapper: save the trained copy
        module = trained[next(iter(trained.keys()))]
    folder = Path(folder)
    atomic_write_json(folder / CONFIG_NAME, module.config.to_json())
    if weights:
        state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME))


def load_goal_embedding(model: nn.Module, folder: str | Path) -> GoalEmbedding | None:
    """Attaches the trained conditioner saved in ``folder`` to ``model``; None if there is none.

    Reads the weights from ``goal_embedding.safetensors`` (merged models) or from the adapter's
    ``adapter_model.safetensors`` (training outputs), so it also works on a model whose adapter
    was already merged and unloaded.

    >>> load_goal_embedding(load_for_inference("runs/embed").model, "runs/embed")  # doctest: +SKIP
    """
    from safetensors import safe_open

    folder = Path(folder)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        return None
    try:
        config = GoalEmbeddingConfig.from_json(json.loads(config_file.read_text(encoding="utf-8")))
    except (KeyError, ValueError, TypeError) as exc:
        raise StageError(f"{config_file}: not a valid goal embedding config ({exc}); re-run `gcsl train`") from None
    if (folder / WEIGHTS_NAME).is_file():
        weights, prefix = folder / WEIGHTS_NAME, ""
    else:
        weights, prefix = folder / "adapter_model.safetensors", None
    if not weights.is_file():
        raise StageError(f"{folder}: goal embedding weights not found (neither {WEIGHTS_NAME} nor "
                         "adapter_model.safetensors); re-run `gcsl train`")
    state = {}
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            if prefix == "":
                state[key] = handle.get_tensor(key)
            elif f"{GOAL_EMBEDDING_MODULE}." in key:
                state[key.split(f"{GOAL_EMBEDDING_MODULE}.", 1)[1]] = handle.get_tensor(key)
    base = _base_model(model)
    module = GoalEmbedding(config)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise StageError(f"{weights}: goal embedding weights do not match {CONFIG_NAME} ({first}); "
                         "re-run `gcsl train`") from None
    module.to(device=base.get_input_embeddings().weight.device)
    setattr(base, GOAL_EMBEDDING_MODULE, module)
    return module
