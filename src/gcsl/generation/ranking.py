"""Ranking a fixed set of answers by the model's probability of giving each one.

A recommender that samples one title can only be scored by where that title lands (grounding), so
everything below its first guess is decided by title similarity, not by the model. Scoring every
catalogue title instead gives the model's own full ranking: title t's score is

    log p(format_response(t), end-of-turn | prompt)

the log-probability that sampling at temperature 1 (no top-p or top-k) returns exactly that answer
and stops. Summed, not length-normalised, because that is the probability of the answer as the
model would give it. The prompt is run once; its key/value cache is repeated over a batch of
candidates (right-padded: causal attention keeps padding from reaching the real tokens).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

__all__ = ["candidate_logprobs", "answer_ids"]


def answer_ids(tokenizer, answers: Sequence[str]) -> list[list[int]]:
    """Each answer's token ids as the model would emit them after the prompt, ending with the token that stops
    sampling (the tokenizer's end-of-sequence, which ends the assistant turn in chat templates).

    >>> answer_ids(tok, ['"Heat"'])  # doctest: +SKIP
    [[1, 43462, 1, 2]]
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        from gcsl.errors import ConfigError

        raise ConfigError("the tokenizer has no end-of-sequence token, so an answer's end cannot be scored; "
                          "use a model whose tokenizer sets eos_token")
    return [list(tokenizer(a, add_special_tokens=False)["input_ids"]) + [eos] for a in answers]


def candidate_logprobs(model, prompt_ids: Sequence[int], candidates: Sequence[Sequence[int]], *,
                       batch_size: int = 64) -> list[float]:
    """Sum of log p(candidate tokens | prompt) for every candidate, in input order.

    >>> candidate_logprobs(model, tok("Hi")["input_ids"], answer_ids(tok, ["a", "b"]))  # doctest: +SKIP
    [-7.1, -8.3]
    """
    import torch

    if not candidates or any(len(c) == 0 for c in candidates):
        raise ValueError("every candidate needs at least one token")
    device = model.device
    scores: list[float] = []
    with torch.inference_mode():
        prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
        out = model(input_ids=prompt, use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts every candidate's first token
        cache = out.cache
        for start in range(0, len(candidates), batch_size):
            batch = [list(c) for c in candidates[start:start + batch_size]]
            total = first[torch.tensor([c[0] for c in batch], device=device)]
            width = max(len(c) for c in batch) - 1
            if width > 0:
                # Feed tokens 1..m-1 of each candidate; their logits predict tokens 2..m.
                ids = torch.zeros((len(batch), width), dtype=torch.long, device=device)
                mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
                for row, c in enumerate(batch):
                    ids[row, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                    mask[row, :len(c) - 1] = 1
                targets = torch.zeros_like(ids)
                for row, c in enumerate(batch):
                    targets[row, :len(c) - 1] = torch.tensor(c[1:], dtype=torch.long)
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(batch))
                attention = torch.cat([torch.ones((len(batch), prompt.shape[1]), dtype=torch.long, device=device),
                                       mask], dim=1)
                logits = model(input_ids=ids, attention_mask=attention, cache=past, use_cache=True).logits
                logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                total = total + (logp * mask).sum(dim=1)
            scores.extend(float(x) for x in total.cpu())
    return scores
