"""BIGRec (Bao et al., 2023, "A Bi-Step Grounding Paradigm for Large Language Models in Recommendation
Systems"): its training data, its item embedding and its popularity-adjusted L2 grounding.

The two steps, as the reference repository (SAI990323/BIGRec) implements them:

1. **Grounding to the recommendation space**: instruction tuning on histories -> the next item, on the
   interactions the user liked only: a rating above 3 of 5 (``data/movie/process.ipynb`` turns each rating
   into ``rating > 3.0`` and skips the target when it is 0). :func:`~gcsl.goals.formulate.bigrec_positives`
   is that row selection,
   the ``bigrec`` entry of :data:`gcsl.methods.METHODS`; it trains like ``sft`` otherwise.
2. **Grounding to the actual item space**: the generation and every catalogue title are embedded by the
   *base* LLM (not the tuned one): the last layer's hidden state at the last token, titles fed bare and
   left-padded (``data/embedding.ipynb``, ``data/movie/evaluate.py``); items are ranked by L2 distance
   (``torch.cdist(p=2)``). :class:`LastTokenEncoder` is that embedding; the evaluator's
   ``--grounding bigrec-l2`` ranks with it (:class:`~gcsl.tasks.recommendation.grounding.TitleGrounder`,
   ``metric="l2"``).

Optional popularity (``data/movie/adjust_pda.py``): each generation's distances are min-max scaled to
[0, 1], the items' training-interaction shares min-max scaled to [0, 1] (P), and items are ranked by
``D / (1 + P) ** gamma`` (:func:`popularity_adjusted`). The repository picks gamma per metric on the
validation split from 0, 1, ..., 99; here ``popularity_gamma`` is an evaluator option (default 0: plain
L2 grounding, BIGRec without statistical information).

Deviations: the shared recommendation prompt (with ratings, :func:`~gcsl.tasks.recommendation.build_prompt`)
replaces BIGRec's titles-only history, so one prompt file serves every method; histories hold up to
``history_len`` items where BIGRec requires exactly 10.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Step 1's row selection lives with the other formulations (the method table reads it there); re-exported here.
from gcsl.goals.formulate import BIGREC_POSITIVE_ABOVE, bigrec_positives

__all__ = ["BIGREC_POSITIVE_ABOVE", "bigrec_positives", "LastTokenEncoder", "popularity_adjusted", "l2_distances"]

def l2_distances(queries: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Euclidean distance of every query row to every item row (``torch.cdist(p=2)``'s values).

    >>> l2_distances(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0], [1.0, 0.0]])).tolist()
    [[5.0, 1.0]]
    """
    q = np.asarray(queries, dtype=np.float64)
    e = np.asarray(items, dtype=np.float64)
    # |q - e|^2 expanded: one matrix product instead of a (queries x items x dim) tensor.
    sq = (q * q).sum(1)[:, None] + (e * e).sum(1)[None, :] - 2.0 * q @ e.T
    return np.sqrt(np.maximum(sq, 0.0))


def popularity_adjusted(distances: np.ndarray, popularity: Sequence[float], gamma: float) -> np.ndarray:
    """BIGRec's popularity-adjusted distances, lower = better: ``D / (1 + P) ** gamma`` with each row of
    ``distances`` and the popularity min-max scaled to [0, 1] (a constant row or popularity scales to 0).

    ``gamma = 0`` returns the scaled distances, which rank the items as the raw ones do.

    >>> popularity_adjusted(np.array([[1.0, 2.0, 3.0]]), [0, 1, 3], 1.0).round(3).tolist()
    [[0.0, 0.375, 0.5]]
    """
    d = np.asarray(distances, dtype=np.float64)
    lo, hi = d.min(axis=1, keepdims=True), d.max(axis=1, keepdims=True)
    d = np.divide(d - lo, hi - lo, out=np.zeros_like(d), where=hi > lo)
    if gamma == 0:
        return d
    p = np.asarray(popularity, dtype=np.float64)
    if p.shape != (d.shape[1],):
        raise ValueError(f"popularity has {p.size} values for {d.shape[1]} items")
    # The repository scales counts to shares first; min-max scaling makes that step a no-op, so it is skipped.
    span = p.max() - p.min()
    p = (p - p.min()) / span if span > 0 else np.zeros_like(p)
    return d * (1.0 + p)[None, :] ** (-gamma)


class LastTokenEncoder:
    """Embeds texts with a causal LM as BIGRec does: the last layer's hidden state at the last token,
    texts fed bare (no template) and left-padded so the last position is a real token; position ids skip
    the padding, so an embedding is the same in any batch.

    It has a sentence-transformer's ``encode`` signature, so a
    :class:`~gcsl.tasks.recommendation.grounding.TitleGrounder` takes it as its encoder.

    >>> enc = LastTokenEncoder("smollm2-135m-instruct")  # doctest: +SKIP
    >>> enc.encode(["Heat", "Alien"]).shape  # doctest: +SKIP
    (2, 576)
    """

    def __init__(self, model: str, device: str = "cpu"):
        import torch

        from gcsl.models import load_causal_lm, load_tokenizer

        self.name = model
        self.device = device
        self.tokenizer = load_tokenizer(model)
        self.tokenizer.padding_side = "left"
        # float32 on the CPU: distances between near-identical titles are small, half precision blurs them.
        self.model = load_causal_lm(model, dtype=torch.float32 if device == "cpu" else None, device=device)
        self.model.eval()

    def encode(self, texts: Sequence[str], batch_size: int = 16, convert_to_numpy: bool = True,
               normalize_embeddings: bool = False, show_progress_bar: bool = False) -> Any:
        import torch

        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer([t.strip().strip('"') for t in texts[start:start + batch_size]],
                                   return_tensors="pt", padding=True).to(self.device)
            # Positions count real tokens only, so a title's embedding does not depend on the longer titles
            # padding its batch (the reference passes none and lets batch-mates shift the positions).
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                hidden = self.model(**batch, position_ids=positions,
                                    output_hidden_states=True).hidden_states[-1][:, -1, :]
            if normalize_embeddings:
                hidden = torch.nn.functional.normalize(hidden, dim=-1)
            out.append(hidden.float().cpu().numpy())
        width = self.model.config.hidden_size
        return np.concatenate(out) if out else np.zeros((0, width), dtype=np.float32)
