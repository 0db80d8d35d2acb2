"""`gcsl merge`: a trained adapter folded into its base model, saved as a standalone model folder.

The result loads with plain ``AutoModelForCausalLM.from_pretrained`` (no PEFT), together with the
tokenizer that holds any reward tokens and the ``goals.json`` needed to write goals. For
``gcsl-noquant-embed`` runs the goal conditioner is not part of the transformer, so it is saved
beside it (``goal_embedding.json`` + ``goal_embedding.safetensors``) and
:func:`gcsl.goal_embedding.load_goal_embedding` attaches it again.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gcsl.config import field
from gcsl.errors import ConfigError
from gcsl.runinfo import atomic_dir, atomic_write_text, write_run_record
from gcsl.training.card import merged_model_card

__all__ = ["MergeConfig", "merge"]


@dataclass
class MergeConfig:
    model: Path = field(help="a `gcsl train` output folder (PEFT adapter, tokenizer, goals.json)")
    out: Path = field(help="output folder for the merged model")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = field("auto", help="weights' dtype in the merged folder "
                                                                        "(auto: the base model's own dtype)")
    device: str | None = field(None, help="device to merge on (default: cuda if available, else cpu)")
    overwrite: bool = field(False, help="replace an existing --out folder")

    def validate(self) -> list[str]:
        problems = []
        if not (Path(self.model) / "adapter_config.json").is_file():
            problems.append(f"model: {self.model} holds no adapter_config.json; give a `gcsl train` output folder")
        if Path(self.out).resolve() == Path(self.model).resolve():
            problems.append("out: must differ from --model")
        return problems


def merge(cfg: MergeConfig) -> Path:
    """Writes the merged model, tokenizer, goals.json (and goal embedding) to ``cfg.out``.

    >>> merge(MergeConfig(model=Path("runs/gcsl-bey-nl"), out=Path("runs/merged")))  # doctest: +SKIP
    PosixPath('runs/merged')
    """
    import torch

    from gcsl.goal_embedding import GOAL_EMBEDDING_MODULE, load_goal_embedding, save_goal_embedding
    from gcsl.models import load_for_inference
    from gcsl.stages import ModelFolder

    src = Path(cfg.model)
    if not (src / "adapter_config.json").is_file():
        raise ConfigError(f"{src}: no adapter_config.json; give a `gcsl train` output folder to --model")
    setup = ModelFolder(src).goal_setup()
    loaded = load_for_inference(str(src), device=cfg.device)  # merges the adapter into the base weights
    model = loaded.model
    if cfg.dtype != "auto":
        model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype])
    else:
        model = model.to(_saved_dtype(loaded.base_model) or model.dtype)
    with atomic_dir(Path(cfg.out), overwrite=cfg.overwrite) as tmp:
        conditioner = load_goal_embedding(model, src)
        if conditioner is not None:
            save_goal_embedding(model, tmp, weights=True)
            delattr(model, GOAL_EMBEDDING_MODULE)  # not a transformers weight: keep it out of model.safetensors
        model.save_pretrained(str(tmp))
        loaded.tokenizer.save_pretrained(str(tmp))
        if (src / "goals.json").is_file():
            shutil.copyfile(src / "goals.json", tmp / "goals.json")
        if (src / "README.md").is_file():
            card = merged_model_card((src / "README.md").read_text(encoding="utf-8"), Path(cfg.out))
            atomic_write_text(tmp / "README.md", card)
        write_run_record(tmp, stage="merge", config=cfg, seed=None, goals=setup.to_json() if setup else None,
                         extra={"base_model": loaded.base_model, "method": setup.method if setup else None})
    return Path(cfg.out)


def _saved_dtype(base_model: str):
    """The dtype recorded in the base model's config.json (None when unknown)."""
    import json

    import torch

    from gcsl.models import resolve_model_path

    config = Path(resolve_model_path(base_model)) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    name = data.get("dtype") or data.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None
