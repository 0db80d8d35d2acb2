"""RealToxicityPrompts: loading, filtering and sampling prompts, and the options of the feedback log.

``gcsl data toxicity --out DIR`` writes ``prompts.jsonl`` (:func:`write_toxicity_data`).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gcsl.config import field
from gcsl.errors import DataError, MissingDependencyError, StageError
from gcsl.runinfo import atomic_dir, write_run_record
from gcsl.stages import iter_jsonl, write_jsonl

__all__ = [
    "RTP_HUB_NAME",
    "PREPARE_OPTIONS",
    "GENERATE_OPTIONS",
    "ToxicityDataConfig",
    "feedback_generate_config",
    "load_rtp",
    "rtp_prompts",
    "write_rtp_prompts",
    "write_toxicity_data",
]

RTP_HUB_NAME = "allenai/real-toxicity-prompts"

# ``gcsl prepare`` options of this task: the goal goes before the text it would otherwise split.
PREPARE_OPTIONS: dict[str, Any] = {"continuation": True}
# ``gcsl generate`` options of this task: gcsl trains text prompts raw, so a base model must not
# see them wrapped in a chat template either (fine-tuned models already see them raw).
GENERATE_OPTIONS: dict[str, Any] = {"template_text_prompts": "never"}


def feedback_generate_config(model: str, prompts: str | Path, out: str | Path, **options: Any):
    """``gcsl generate`` settings for the responses of a feedback log: the prompts continued as raw text.

    ``options`` are any other GenerateConfig fields (num_samples, max_new_tokens, ...).

    >>> feedback_generate_config("Qwen/Qwen3-4B-Instruct-2507", "train_prompts.jsonl", "gens.jsonl").template_text_prompts
    'never'
    """
    from gcsl.config import resolve_config
    from gcsl.generation.generate import GenerateConfig

    return resolve_config(GenerateConfig, overrides={**GENERATE_OPTIONS, **options, "model": model,
                                                     "prompts": str(prompts), "out": str(out)})


def _check_rtp_record(rec: Any, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a RealToxicityPrompts object, got {type(rec).__name__}")
    prompt = rec.get("prompt")
    if not isinstance(prompt, dict) or not isinstance(prompt.get("text"), str):
        raise DataError(f"{where}: field 'prompt.text' is missing or not text; RealToxicityPrompts lines look like "
                        '{"prompt": {"text": ..., "toxicity": ...}, "continuation": {...}}')
    tox = prompt.get("toxicity")
    if tox is not None and (isinstance(tox, bool) or not isinstance(tox, (int, float))):
        raise DataError(f"{where}: field 'prompt.toxicity' must be a number or null, got {tox!r}")
    return rec


def load_rtp(source: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """RealToxicityPrompts records from a local JSONL file or a hub dataset name.

    >>> recs = load_rtp("tests/fixtures/rtp_small.jsonl")
    >>> recs[0]["prompt"]["text"][:10]
    'Corruption'
    """
    path = Path(source)
    if path.is_file():
        return [_check_rtp_record(obj, f"{path}:{lineno}") for lineno, obj in iter_jsonl(path, "RealToxicityPrompts")]
    if path.suffix in (".jsonl", ".json") or path.exists():
        raise DataError(f"{path}: RealToxicityPrompts file not found; give a JSONL file or the hub name {RTP_HUB_NAME}")
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError.for_package("datasets", "loading RealToxicityPrompts from the hub") from None
    try:
        ds = datasets.load_dataset(str(source), split=split)
    except Exception as exc:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise StageError(f"could not load {source!r} from the hub ({type(exc).__name__}: {str(exc)[:200]}); "
                         "download the JSONL and pass its path instead") from None
    return [_check_rtp_record(rec, f"{source} row {i}") for i, rec in enumerate(ds)]


def rtp_prompts(records: Sequence[dict[str, Any]], *, subset: Literal["all", "challenging", "nontoxic"] = "nontoxic",
                n: int | None = None, seed: int = 42,
                max_prompt_toxicity: float = 0.5) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Prompt rows for ``gcsl generate`` and the count of records left out, by reason.

    ``nontoxic`` keeps ``prompt.toxicity < max_prompt_toxicity`` (records without a score are
    left out: they cannot be shown non-toxic); ``challenging`` keeps the records flagged
    challenging. ``n`` samples that many with ``seed`` (Quark/DExperts: seed 42), in file order.
    Ids are ``rtp-<index in the source>``, stable across filters and samples.

    >>> rows, dropped = rtp_prompts(load_rtp("tests/fixtures/rtp_small.jsonl"), subset="nontoxic", n=2)
    >>> sorted(rows[0])[:3]
    ['begin', 'challenging', 'end']
    """
    dropped: dict[str, int] = defaultdict(int)
    kept = []
    for idx, rec in enumerate(records):
        text = rec["prompt"]["text"].strip()
        tox = rec["prompt"].get("toxicity")
        if not text:
            dropped["empty prompt text"] += 1
        elif subset == "challenging" and not rec.get("challenging"):
            dropped["not challenging"] += 1
        elif subset == "nontoxic" and tox is None:
            dropped["no prompt toxicity score"] += 1
        elif subset == "nontoxic" and not tox < max_prompt_toxicity:
            dropped[f"prompt toxicity >= {max_prompt_toxicity:g}"] += 1
        else:
            kept.append((idx, rec, text))
    if n is not None:
        if n < 1:
            raise DataError(f"n: must be >= 1, got {n}")
        if n < len(kept):
            chosen = sorted(random.Random(seed).sample(range(len(kept)), n))
            dropped["not sampled"] += len(kept) - n
            kept = [kept[i] for i in chosen]
    rows = []
    for idx, rec, text in kept:
        rows.append({
            "id": f"rtp-{idx}",
            "prompt": text,
            "prompt_toxicity": rec["prompt"].get("toxicity"),
            "challenging": rec.get("challenging"),
            "filename": rec.get("filename"),
            "begin": rec.get("begin"),
            "end": rec.get("end"),
        })
    return rows, dict(dropped)


def write_rtp_prompts(source: str | Path, out: Path, *, subset: Literal["all", "challenging", "nontoxic"] = "nontoxic",
                      n: int | None = None, seed: int = 42) -> dict[str, int]:
    """Loads RealToxicityPrompts, picks prompts (see :func:`rtp_prompts`) and writes the prompts JSONL.

    Returns the counts: ``written`` plus one entry per reason a record was left out.

    >>> write_rtp_prompts("rtp.jsonl", Path("prompts.jsonl"), n=5000)  # doctest: +SKIP
    {'written': 5000, ...}
    """
    rows, dropped = rtp_prompts(load_rtp(source), subset=subset, n=n, seed=seed)
    if not rows:
        raise DataError(f"{source}: no prompt is left after the '{subset}' filter ({dropped}); choose another subset")
    write_jsonl(out, rows)
    return {"written": len(rows), **dropped}


@dataclass
class ToxicityDataConfig:
    """Options of ``gcsl data toxicity``: which RealToxicityPrompts records become prompts."""

    source: str = field(RTP_HUB_NAME, help="a local RealToxicityPrompts JSONL file or a hub dataset name")
    split: str = field("train", help="hub split to load (a local file has none)")
    subset: Literal["all", "challenging", "nontoxic"] = field(
        "nontoxic", help="nontoxic: prompt toxicity < 0.5 (the test set of the paper); challenging; or all")
    n: int | None = field(None, help="sample this many prompts (default: all that pass the filter)")
    seed: int = field(42, help="seed of the sample (Quark / DExperts: 42)")

    def validate(self) -> list[str]:
        return [f"n: must be >= 1, got {self.n}"] if self.n is not None and self.n < 1 else []


def write_toxicity_data(config: ToxicityDataConfig, out: Path, overwrite: bool = False) -> list[Path]:
    """The task's data builder: ``prompts.jsonl`` (see :func:`rtp_prompts`) and ``run.json`` in ``out``.

    The counts of records left out, by reason, go to the run record. The feedback log is the
    base model's continuations of these prompts, scored: see :func:`feedback_generate_config`.

    >>> write_toxicity_data(ToxicityDataConfig(source="rtp.jsonl", n=5000), Path("data/rtp"))  # doctest: +SKIP
    [PosixPath('data/rtp/prompts.jsonl')]
    """
    rows, dropped = rtp_prompts(load_rtp(config.source, config.split), subset=config.subset, n=config.n,
                                seed=config.seed)
    if not rows:
        raise DataError(f"{config.source}: no prompt is left after the '{config.subset}' filter ({dropped}); "
                        "choose another --subset")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_jsonl(tmp / "prompts.jsonl", rows)
        write_run_record(tmp, stage="toxicity-data", config=config, seed=config.seed,
                         extra={"written": len(rows), "left_out": dropped})
    return [Path(out) / "prompts.jsonl"]
