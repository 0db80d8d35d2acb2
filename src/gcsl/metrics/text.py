"""Quality of generated text: diversity (dist-n) and perplexity under a reference model.

Both follow the protocol of the non-toxic generation papers (Quark / DExperts, see
EVALUATION.md) and are shared by every task that scores free text (toxicity, sentiment):

- dist-n of one prompt = unique n-grams / total n-grams over that prompt's generations
  (whitespace tokens; n-grams never cross two generations), averaged over prompts. DExperts
  divides by the number of words instead of n-grams: ``denominator="words"`` reproduces that.
- perplexity of a generation g after its prompt p:
  ``exp((NLL(p+g) - NLL(p)) / (len(p+g) - len(p)))``, lengths in tokens of the joint
  tokenisation of ``p + g``; empty generations are skipped, values >= a cutoff (1e4) dropped,
  and the metric is the mean over generations.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gcsl.config import field
from gcsl.errors import ConfigError

__all__ = [
    "distinct_n",
    "PerplexityResult",
    "conditional_perplexity",
    "load_causal_lm",
    "TextQualityOptions",
    "TextQuality",
    "text_quality",
]


def distinct_n(texts: Sequence[str], n: int, denominator: Literal["ngrams", "words"] = "ngrams") -> float | None:
    """Unique n-grams over total n-grams (or total words) in ``texts``; ``None`` when there are none.

    >>> distinct_n(["a b a", "a b"], 2)   # bigrams: (a b), (b a), (a b) -> 2 unique of 3
    0.6666666666666666
    >>> distinct_n(["a b a", "a b"], 2, denominator="words")   # 2 unique over 5 words
    0.4
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    unique: set[tuple[str, ...]] = set()
    total_ngrams = total_words = 0
    for text in texts:
        if not isinstance(text, str):
            continue
        words = text.split()
        total_words += len(words)
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total_ngrams += len(grams)
        unique.update(grams)
    total = total_ngrams if denominator == "ngrams" else total_words
    if total == 0:
        return None
    return len(unique) / total


@dataclass
class PerplexityResult:
    """Per-generation perplexities (``None`` with a reason when skipped or dropped) and their mean."""

    values: list[float | None]
    reasons: list[str | None]
    mean: float
    n_scored: int
    n_skipped_empty: int
    n_over_cutoff: int


def _prompt_as_text(prompt: Any, tokenizer: Any) -> tuple[str | None, bool]:
    """The prompt as the reference model sees it; chat prompts go through its chat template."""
    if isinstance(prompt, str):
        return prompt, False
    if isinstance(prompt, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), True
        return "\n\n".join(m["content"] for m in prompt), False
    return None, False


def _joint_ids(tokenizer: Any, prompt: str, generation: str, add_special_tokens: bool) -> tuple[list[int], int]:
    """Token ids of ``prompt + generation`` and how many leading tokens belong to the prompt.

    A token that straddles the boundary counts as generated: it carries generated characters.
    Tokenizers without offsets fall back to the length of the prompt tokenised alone
    (the DExperts computation).
    """
    joint = prompt + generation
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(joint, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        boundary = 0
        for _, end in enc["offset_mapping"]:
            if end > len(prompt):
                break
            boundary += 1
        return list(enc["input_ids"]), boundary
    ids = tokenizer(joint, add_special_tokens=add_special_tokens)["input_ids"]
    n_prompt = len(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]) if prompt else 0
    return list(ids), min(n_prompt, len(ids))


def conditional_perplexity(model: Any, tokenizer: Any, prompts: Sequence[Any], generations: Sequence[Any], *,
                           batch_size: int = 8, max_ppl: float = 1e4,
                           max_length: int | None = None) -> PerplexityResult:
    """Perplexity of each generation given its prompt under a causal LM (batched, no gradients).

    Only generated tokens are scored; the first token of a sequence has no prediction, so a
    generation whose tokens all sit at position 0 (an empty prompt with a one-token generation)
    is skipped with a reason. Prompts may be text or chat messages.

    >>> r = conditional_perplexity(model, tok, ["The cat"], [" sat on the mat."])  # doctest: +SKIP
    >>> r.values[0] > 1.0  # doctest: +SKIP
    True
    """
    import torch
    import torch.nn.functional as F

    n = len(generations)
    values: list[float | None] = [None] * n
    reasons: list[str | None] = [None] * n
    n_empty = n_over = 0
    work: list[tuple[int, list[int], int]] = []
    for i, (prompt, gen) in enumerate(zip(prompts, generations)):
        if not isinstance(gen, str):
            reasons[i] = f"generation is not text ({type(gen).__name__})"
            continue
        if not gen.strip():
            n_empty += 1
            reasons[i] = "empty generation (skipped)"
            continue
        text, is_chat = _prompt_as_text(prompt, tokenizer)
        if text is None:
            reasons[i] = "prompt is neither text nor chat messages"
            continue
        ids, start = _joint_ids(tokenizer, text, gen, add_special_tokens=not is_chat)
        start = max(start, 1)
        if start >= len(ids):
            reasons[i] = "no generated token has a prediction to score"
            continue
        if max_length is not None and len(ids) > max_length:
            reasons[i] = f"prompt + generation is {len(ids)} tokens, over max_length {max_length}"
            continue
        work.append((i, ids, start))

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # similar lengths share a batch, so little compute goes to padding
    work.sort(key=lambda w: len(w[1]))
    try:
        with torch.no_grad():
            for b0 in range(0, len(work), max(1, batch_size)):
                batch = work[b0:b0 + batch_size]
                width = max(len(ids) for _, ids, _ in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, (_, ids, _) in enumerate(batch):
                    input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                    mask[r, :len(ids)] = 1
                input_ids, mask = input_ids.to(device), mask.to(device)
                logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
                # token_nll[r, j] = -log p(token j+1 | tokens <= j)
                token_nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
                for r, (i, ids, start) in enumerate(batch):
                    nll = float(token_nll[r, start - 1:len(ids) - 1].double().sum())
                    mean_nll = nll / (len(ids) - start)
                    ppl = math.exp(mean_nll) if mean_nll < 700 else math.inf
                    if ppl >= max_ppl:
                        n_over += 1
                        reasons[i] = f"perplexity {ppl:.4g} >= cutoff {max_ppl:g} (dropped)"
                    else:
                        values[i] = ppl
    finally:
        model.train(was_training)
    scored = [v for v in values if v is not None]
    mean = sum(scored) / len(scored) if scored else math.nan
    return PerplexityResult(values, reasons, mean, len(scored), n_empty, n_over)


def load_causal_lm(path: str, device: str | None = None) -> tuple[Any, Any]:
    """The perplexity reference model and its tokenizer, in float32, loaded as every other model of
    the package is (:mod:`gcsl.models`: a built-in name, a folder, a ``.gguf`` file or a hub id).

    >>> model, tok = load_causal_lm("smollm2-135m-instruct")  # doctest: +SKIP
    """
    import torch

    from gcsl import models

    try:
        model = models.load_causal_lm(path, dtype=torch.float32, device=device or models.default_device())
        tokenizer = models.load_tokenizer(path)
    except ConfigError as exc:
        raise ConfigError(f"reference_model: {exc}") from None
    model.eval()
    return model, tokenizer


@dataclass
class TextQualityOptions:
    """Options shared by the free-text tasks: diversity and perplexity."""

    dist_denominator: Literal["ngrams", "words"] = field(
        "ngrams", help="dist-n denominator: total n-grams (EVALUATION.md) or total words (DExperts' code)")
    reference_model: str | None = field(
        None, help="causal LM for perplexity (folder, hub id or .gguf file; the paper uses the base model); "
                   "unset skips perplexity")
    ppl_batch_size: int = field(8, help="sequences per forward pass when computing perplexity")
    ppl_max: float = field(1e4, help="perplexities at or above this are dropped (Quark/DExperts sanity cutoff)")
    device: str | None = field(None, help="device for model-based scorers and perplexity (default: cuda if present)")

    def quality_problems(self) -> list[str]:
        problems = []
        if self.ppl_batch_size < 1:
            problems.append(f"ppl_batch_size: must be >= 1, got {self.ppl_batch_size}")
        if not self.ppl_max > 1.0:
            problems.append(f"ppl_max: must be > 1, got {self.ppl_max}")
        return problems


@dataclass
class TextQuality:
    """dist-n and perplexity of a generations file: metrics, per-prompt values, per-row perplexity."""

    metrics: dict[str, float]
    unit_scores: dict[str, dict[str, float]]
    perplexities: list[float | None] | None
    perplexity_reasons: list[str | None] | None
    notes: list[str]

    def add_to(self, metrics: dict[str, float], unit_scores: dict[str, dict[str, float]],
               items: list[dict[str, Any]], notes: list[str]) -> None:
        """Adds these metrics, per-prompt values and notes to a task's, and each row's perplexity to its item."""
        metrics.update(self.metrics)
        unit_scores.update(self.unit_scores)
        notes.extend(self.notes)
        if self.perplexities is not None:
            for item, ppl, why in zip(items, self.perplexities, self.perplexity_reasons):
                item["perplexity"] = ppl
                item["perplexity_reason"] = why


def text_quality(rows: Sequence[dict[str, Any]], options: TextQualityOptions, *, model: Any = None,
                 tokenizer: Any = None) -> TextQuality:
    """dist-1/2/3 per prompt (averaged) and, with a reference model, perplexity per generation.

    ``rows`` are generation rows (``prompt_id``, ``prompt``, ``completion``). A loaded
    ``model``/``tokenizer`` pair takes precedence over ``options.reference_model``.

    >>> q = text_quality([{"prompt_id": "p", "prompt": "x", "completion": "a b a b"}], TextQualityOptions())
    >>> q.metrics["dist-1"], q.metrics["dist-2"]
    (0.5, 0.6666666666666666)
    """
    by_prompt: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_prompt[str(row["prompt_id"])].append(row.get("completion"))
    metrics: dict[str, float] = {}
    unit_scores: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    for n in (1, 2, 3):
        name = f"dist-{n}"
        per_prompt = {pid: distinct_n(texts, n, options.dist_denominator) for pid, texts in by_prompt.items()}
        kept = {pid: v for pid, v in per_prompt.items() if v is not None}
        if len(kept) < len(per_prompt):
            notes.append(f"{name}: {len(per_prompt) - len(kept)} prompt(s) without any {n}-gram left out")
        unit_scores[name] = kept
        metrics[name] = sum(kept.values()) / len(kept) if kept else math.nan

    perplexities = reasons = None
    if model is None and options.reference_model:
        model, tokenizer = load_causal_lm(options.reference_model, options.device)
    if model is not None:
        res = conditional_perplexity(model, tokenizer, [r.get("prompt") for r in rows],
                                     [r.get("completion") for r in rows], batch_size=options.ppl_batch_size,
                                     max_ppl=options.ppl_max)
        perplexities, reasons = res.values, res.reasons
        metrics["perplexity"] = res.mean
        per_prompt_ppl: dict[str, list[float]] = defaultdict(list)
        for row, v in zip(rows, res.values):
            if v is not None:
                per_prompt_ppl[str(row["prompt_id"])].append(v)
        unit_scores["perplexity"] = {pid: sum(v) / len(v) for pid, v in per_prompt_ppl.items()}
        other = len(rows) - res.n_scored - res.n_skipped_empty - res.n_over_cutoff
        notes.append(f"perplexity: mean over {res.n_scored} generation(s); {res.n_skipped_empty} empty skipped, "
                     f"{res.n_over_cutoff} at or above {options.ppl_max:g} dropped, {other} unscorable; "
                     "its per-prompt values (and interval) average each prompt's generations first")
    return TextQuality(metrics, unit_scores, perplexities, reasons, notes)
