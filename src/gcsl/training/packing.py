"""Prefix-shared packing: all goal variants of a feedback row train in one sequence holding their prompt once.

``gcsl prepare --method gcsl-bey-nl`` writes a response once per goal it satisfies. The variants
share ``row_id`` and, with the goal placed after the prompt, agree token for token up to the
goal. Trained as separate rows, the prompt (often most of the tokens) is paid for once per goal.
Here each row's variants become one segment::

    [shared prefix][goal_1 ... completion_1][goal_2 ... completion_2] ...

and several segments are packed into one sequence of at most ``max_tokens`` tokens. The 4D
attention mask lets a token see earlier tokens of its own block and the shared prefix of its
own segment, nothing else; position ids continue from the prefix's end in every block. Each
block therefore computes exactly the hidden states, logits, loss and gradients of its own
unpacked sequence (up to float summation order). Three details make that exact:

- Tokenization is TRL 1.16 ``SFTTrainer``'s own (:func:`tokenize_prompt_completion`, checked
  against the trainer in the tests), and the shared prefix is the longest common prefix of the
  token ids, so BPE merges across the prompt/goal boundary cannot make it wrong.
- The prefix stops before the first position whose next-token target is a completion token
  (:func:`shared_prefix_length`): its predictions would otherwise be scored once for several rows,
  and a block's first token would be predicted from the previous block.
- Every segment and block starts with label ``-100``, so the shifted next-token loss never
  crosses a boundary. ``labels[..., 1:] != -100`` (what the Trainer counts as
  ``num_items_in_batch``) is then exactly the completion tokens of the packed rows: the loss,
  sum of token losses / completion tokens, equals the unpacked loss over the same rows.

Attention implementations: ``eager`` and ``sdpa`` take a custom 4D mask (transformers passes a
4D mask through unchanged); flash-attention kernels only take sequence boundaries and flex
attention ignores tensor masks, so there :func:`supports_block_mask` is False and training
falls back to ordinary sequences with the one-line :func:`prefix_sharing_notice`.

The KL penalty's reference (the base model given the goal-free prompt) is laid out the same
way when asked for (``reference_column``): per variant the goal-free prompt's ids followed by the
variant's completion ids (:func:`reference_row`), the shared prompt once per segment, so its
completion tokens come in the policy's order. Unpacked rows get it from :func:`tokenize_rows`.

    packed = pack_prefix_shared(dataset, tokenizer, max_tokens=1024, max_length=1024)
    collator = PrefixSharingCollator.for_model(model, tokenizer.pad_token_id)
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gcsl.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

__all__ = [
    "BLOCK_MASK_IMPLEMENTATIONS",
    "PackedDataset",
    "PrefixSharingCollator",
    "block_attention_mask",
    "is_packed_batch",
    "pack_prefix_shared",
    "packed_token_count",
    "prefix_sharing_notice",
    "reference_row",
    "shared_prefix_length",
    "supports_block_mask",
    "tokenize_prompt",
    "tokenize_prompt_completion",
    "tokenize_rows",
]

# Attention implementations that apply an arbitrary 4D mask given as ``attention_mask``.
BLOCK_MASK_IMPLEMENTATIONS = ("eager", "sdpa")
IGNORE = -100


# -- tokenization ----------------------------------------------------------------------------

def tokenize_prompt_completion(prompt: str | list[dict[str, Any]], completion: str | list[dict[str, Any]],
                               tokenizer, *, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one prompt-completion row, exactly as TRL 1.16's SFTTrainer makes them.

    Chat rows go through the chat template (the prompt alone with the generation prompt, then
    prompt + completion); text rows get the EOS token appended to the completion. The completion
    starts where the two tokenizations diverge; ``labels`` is ``-100`` before it
    (``completion_only_loss``). With ``max_length`` the row keeps its first ``max_length`` tokens.

    >>> ids, labels = tokenize_prompt_completion("2 + 2 =", " 4", tokenizer)  # doctest: +SKIP
    >>> labels  # doctest: +SKIP
    [-100, -100, -100, 339, 0]
    """
    from trl.data_utils import is_conversational

    prompt_ids = tokenize_prompt(prompt, tokenizer)
    if is_conversational({"prompt": prompt}):
        ids = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=True,
                                            return_dict=True)["input_ids"]
    else:
        eos = tokenizer.eos_token
        if eos is not None and not completion.endswith(eos):
            completion = completion + eos
        ids = tokenizer(text=prompt + completion)["input_ids"]
    start = _common_prefix(prompt_ids, ids)
    labels = [IGNORE] * start + list(ids[start:])
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return list(ids), labels


def tokenize_prompt(prompt: str | list[dict[str, Any]], tokenizer) -> list[int]:
    """A prompt's ids as TRL 1.16 tokenizes it alone: chat messages with the generation prompt, text as is.

    >>> tokenize_prompt([{"role": "user", "content": "Hi"}], tokenizer)[-3:]  # doctest: +SKIP
    [1, 520, 9531]
    """
    from trl.data_utils import is_conversational

    if is_conversational({"prompt": prompt}):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(text=prompt)["input_ids"])


def reference_row(reference_prompt: str | list[dict[str, Any]], ids: Sequence[int], completion_start: int,
                  tokenizer) -> tuple[list[int], int]:
    """The KL reference's input for one training row, and the index of its first scored token.

    The reference is the base model on the goal-free prompt (Quark's reference sees no control
    token): ``reference_prompt`` tokenized as TRL tokenizes prompts, followed by exactly the
    completion ids of the (possibly truncated) training row ``ids`` from ``completion_start`` on.
    The tokens it scores are then the ones the training row scores (``ids[max(completion_start, 1):]``),
    in the same order.

    >>> reference_row("Hi", [5, 6, 7, 8, 9], 3, tokenizer)  # doctest: +SKIP
    ([13225, 8, 9], 1)
    """
    prompt_ids = tokenize_prompt(reference_prompt, tokenizer)
    completion = list(ids[completion_start:])
    # Position 0 is never a next-token target: a row whose completion starts there scores from 1.
    first = len(prompt_ids) + max(completion_start, 1) - completion_start
    if first == 0:
        raise DataError("training data: a goal-free reference_prompt tokenizes to no tokens, so the KL reference "
                        "cannot score the completion's first token; check the prompts")
    return prompt_ids + completion, first


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _first_target(labels: Sequence[int]) -> int | None:
    """Index of the first label that is a next-token target (position 0 never is)."""
    for j in range(1, len(labels)):
        if labels[j] != IGNORE:
            return j
    return None


def shared_prefix_length(rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> int:
    """How many leading tokens the ``(input_ids, labels)`` variants of one row can share exactly.

    The longest common prefix of the token ids, cut so the prefix holds no position whose
    next-token target is a completion token: those predictions belong to one variant each. A
    single variant shares nothing.

    >>> shared_prefix_length([([5, 6, 7, 8], [-100, -100, -100, 8]), ([5, 6, 9, 8], [-100, -100, -100, 8])])
    2
    >>> shared_prefix_length([([5, 6, 7], [-100, 6, 7]), ([5, 6, 7], [-100, 6, 7])])  # completion from token 1
    0
    """
    import numpy as np

    targets = [_first_target(labels) for _, labels in rows]
    if any(t is None for t in targets):
        return 0
    return _shared_prefix([np.asarray(ids) for ids, _ in rows], targets)


def _shared_prefix(ids: Sequence[Any], targets: Sequence[int]) -> int:
    """:func:`shared_prefix_length` on numpy id arrays and first-target indices."""
    import numpy as np

    if len(ids) < 2:
        return 0
    first = ids[0]
    lcp = len(first)
    for other in ids[1:]:
        n = min(lcp, len(other))
        differ = np.flatnonzero(first[:n] != other[:n])
        lcp = int(differ[0]) if len(differ) else n
    return max(0, min(lcp, min(targets) - 1))


def tokenize_rows(dataset: Dataset, tokenizer, *, max_length: int | None, reference_column: str,
                  num_proc: int | None = None) -> Dataset:
    """One sequence per row, as TRL's SFTTrainer prepares them, plus the KL reference's inputs.

    Columns ``input_ids`` and ``labels`` (:func:`tokenize_prompt_completion`), and ``ref_input_ids``
    and ``ref_labels``: the goal-free prompt in ``reference_column`` followed by the row's
    completion ids (:func:`reference_row`), labelled from the first token the row scores. Rows
    left without a completion token by truncation are dropped, as TRL drops them.

    >>> rows = tokenize_rows(ds, tok, max_length=1024, reference_column="reference_prompt")  # doctest: +SKIP
    >>> rows.column_names  # doctest: +SKIP
    ['input_ids', 'labels', 'ref_input_ids', 'ref_labels']
    """
    if reference_column not in dataset.column_names:
        raise DataError(f"training data: column {reference_column!r} missing; it holds the goal-free prompts the "
                        "KL reference conditions on (re-run `gcsl prepare`)")
    rows = dataset.map(_tokenize_row, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length,
                                                  "reference_column": reference_column},
                       remove_columns=dataset.column_names, num_proc=num_proc, desc="Tokenizing")
    return rows.filter(lambda labels: any(x != IGNORE for x in labels), input_columns="labels", num_proc=num_proc)


def _tokenize_row(example: dict[str, Any], *, tokenizer, max_length: int | None,
                  reference_column: str) -> dict[str, Any]:
    ids, labels = tokenize_prompt_completion(example["prompt"], example["completion"], tokenizer,
                                             max_length=max_length)
    start = next((j for j, label in enumerate(labels) if label != IGNORE), len(labels))
    ref_ids, first = reference_row(example[reference_column], ids, start, tokenizer)
    return {"input_ids": ids, "labels": labels, "ref_input_ids": ref_ids,
            "ref_labels": [IGNORE] * first + ref_ids[first:]}


# -- packing ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackedDataset:
    """Packed training sequences plus the counts a run reports.

    ``dataset`` has one packed sequence per row: ``input_ids``, ``labels``, ``position_ids``,
    ``segment_ids`` (which packed feedback row a token belongs to), ``block_ids`` (0: shared
    prefix, k >= 1: the k-th variant's block), ``n_examples`` and ``naive_tokens`` (the rows'
    tokens as separate sequences). Packed with a ``reference_column``, each sequence also holds
    the KL reference's inputs in the same layout, as ``ref_input_ids``, ``ref_labels``,
    ``ref_position_ids``, ``ref_segment_ids`` and ``ref_block_ids``: every block is the goal-free
    prompt's continuation by the same completion tokens, in the same order (:func:`reference_row`).
    """

    dataset: Dataset
    rows: int  # training rows (goal variants) packed
    groups: int  # distinct feedback rows
    naive_tokens: int  # tokens of the rows as separate sequences
    packed_tokens: int  # tokens of the packed sequences (shared prefixes counted once per segment)
    dropped: int  # rows with no completion token left after truncation (TRL's SFTTrainer drops them too)

    @property
    def sequences(self) -> int:
        return len(self.dataset)

    @property
    def token_ratio(self) -> float:
        """Tokens as separate rows / tokens packed: the most prefix sharing can speed a step up."""
        return self.naive_tokens / max(self.packed_tokens, 1)

    def summary(self) -> str:
        """One line for the run's log.

        >>> packed.summary()  # doctest: +SKIP
        'prefix sharing: 163 rows of 48 feedback rows in 16 sequences; 36,907 -> 14,938 tokens (2.47x)'
        """
        dropped = f"; {self.dropped} row(s) without completion tokens after truncation dropped" if self.dropped else ""
        return (f"prefix sharing: {self.rows} rows of {self.groups} feedback rows in {self.sequences} sequences; "
                f"{self.naive_tokens:,} -> {self.packed_tokens:,} tokens ({self.token_ratio:.2f}x){dropped}")


@dataclass
class _Segment:
    """One feedback row's (part of its) variants: the shared prefix once, then one block per variant.

    Token ids stay numpy int32 arrays (views into each row's ids) until a sequence is laid out,
    so a large expansion costs 4 bytes a token here rather than a Python int each.
    """

    prefix: Any  # np.ndarray
    blocks: list[tuple[Any, int]]  # (ids after the prefix, index of the completion start within them)
    naive_tokens: int
    reference: tuple[Any, list[tuple[Any, int]]] | None = None  # the KL reference's (prefix, blocks), same order

    def __len__(self) -> int:
        return len(self.prefix) + sum(len(ids) for ids, _ in self.blocks)


_CHUNK = 4096  # rows read, and packed sequences written, per Arrow batch


def pack_prefix_shared(dataset: Dataset, tokenizer, *, max_tokens: int, max_length: int | None = None,
                       group_column: str | None = "row_id", reference_column: str | None = None,
                       num_proc: int | None = None) -> PackedDataset:
    """Tokenizes prompt-completion rows like TRL, shares each row group's prompt prefix, packs to ``max_tokens``.

    Rows with the same ``group_column`` value (the goal variants of one feedback row) form one
    segment with their shared prefix once; a group too long for one sequence is split into
    several segments, each with its own copy of the prefix. Segments are packed best-fit
    decreasing into sequences of at most ``max_tokens`` tokens. ``group_column=None`` packs every
    row alone (ordinary packing, still exact). ``reference_column`` names the goal-free prompts:
    the sequences then carry the KL reference's inputs too (see :class:`PackedDataset`); only the
    training tokens count against ``max_tokens``.

    >>> packed = pack_prefix_shared(Dataset.from_parquet("prep/train.parquet"), tok, max_tokens=1024,
    ...                             max_length=1024)  # doctest: +SKIP
    >>> print(packed.summary())  # doctest: +SKIP
    prefix sharing: 163 rows of 48 feedback rows in 16 sequences; 36,907 -> 14,938 tokens (2.47x)
    """
    import numpy as np
    from datasets import Dataset, concatenate_datasets

    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise ConfigError(f"max_tokens: must be an integer >= 2, got {max_tokens!r}")
    columns = set(dataset.column_names)
    missing = [c for c in ("prompt", "completion", reference_column) if c is not None and c not in columns]
    if missing:
        raise DataError(f"training data: column(s) {', '.join(missing)} missing; prefix sharing needs TRL's "
                        "prompt-completion form (run `gcsl prepare`)")
    if group_column is not None and group_column not in columns:
        raise DataError(f"training data: column {group_column!r} missing; it groups a feedback row's goal variants "
                        "(re-run `gcsl prepare`, or pass group_column=None to pack rows without sharing)")

    tokenized = dataset.map(
        _tokenize_example, fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "group_column": group_column,
                                      "reference_column": reference_column},
        with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc, desc="Tokenizing for packing")

    rows: list[tuple[Any, ...]] = []  # (ids, first target[, reference ids, reference first target]) of kept rows
    members: dict[Any, list[int]] = {}
    dropped = 0
    index = 0
    for batch in tokenized.iter(batch_size=_CHUNK):
        references = (zip(batch["ref_input_ids"], batch["ref_first"]) if reference_column is not None
                      else [()] * len(batch["input_ids"]))
        for ids, start, group, reference in zip(batch["input_ids"], batch["completion_start"], batch["group"],
                                                references):
            target = max(start, 1)
            if target >= len(ids):  # nothing left to predict (truncated inside the prompt)
                dropped += 1
            elif len(ids) > max_tokens:
                raise ConfigError(f"max_tokens: {max_tokens} is less than training row {index}'s {len(ids)} tokens; "
                                  f"set max_tokens >= {len(ids)} or max_length <= {max_tokens}")
            else:
                members.setdefault(group, []).append(len(rows))
                if reference:
                    reference = (np.asarray(reference[0], dtype=np.int32), reference[1])
                rows.append((np.asarray(ids, dtype=np.int32), target, *reference))
            index += 1
    if not members:
        raise DataError("training data: no row has a completion token to train on (after truncation to "
                        f"max_length={max_length}); raise max_length or check the prepared data")

    segments: list[_Segment] = []
    for group_rows in members.values():
        segments.extend(_segments_of_group([rows[i] for i in group_rows], max_tokens))
    sequences = _best_fit_decreasing([len(s) for s in segments], max_tokens)
    parts = [Dataset.from_list([_layout([segments[j] for j in seq]) for seq in sequences[k:k + _CHUNK]],
                               features=_features(reference=reference_column is not None))
             for k in range(0, len(sequences), _CHUNK)]
    packed = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return PackedDataset(dataset=packed, rows=len(rows), groups=len(members),
                         naive_tokens=sum(s.naive_tokens for s in segments),
                         packed_tokens=sum(len(s) for s in segments), dropped=dropped)


def _features(reference: bool = False):
    from datasets import Features, Sequence, Value

    tokens = Sequence(Value("int32"))
    names = ("input_ids", "labels", "position_ids", "segment_ids", "block_ids")
    columns = {name: tokens for name in names}
    if reference:
        columns.update({f"ref_{name}": tokens for name in names})
    return Features({**columns, "n_examples": Value("int32"), "naive_tokens": Value("int64")})


def _tokenize_example(example: dict[str, Any], index: int, *, tokenizer, max_length: int | None,
                      group_column: str | None, reference_column: str | None = None) -> dict[str, Any]:
    ids, labels = tokenize_prompt_completion(example["prompt"], example["completion"], tokenizer,
                                             max_length=max_length)
    # TRL's labels are the ids from the completion's start on, -100 before: the start says it all.
    start = next((j for j, label in enumerate(labels) if label != IGNORE), len(labels))
    # Without a group column each row is its own group.
    group = index if group_column is None else example[group_column]
    row = {"input_ids": ids, "completion_start": start, "group": group}
    if reference_column is not None:
        row["ref_input_ids"], row["ref_first"] = reference_row(example[reference_column], ids, start, tokenizer)
    return row


def _segments_of_group(variants: list[tuple[Any, ...]], max_tokens: int) -> list[_Segment]:
    """The group as one segment, or several (each with its own prefix copy) when it exceeds ``max_tokens``.

    A variant is ``(ids, first target)``, or with the KL reference's ``(reference ids, first
    target)`` after it; the reference blocks follow the training blocks one for one.
    """
    prefix_len = _shared_prefix([v[0] for v in variants], [v[1] for v in variants])
    prefix = variants[0][0][:prefix_len]
    with_reference = len(variants[0]) == 4
    if with_reference:
        # The variants' goal-free prompts are one prompt, so most of the reference is shared.
        ref_len = _shared_prefix([v[2] for v in variants], [v[3] for v in variants])
        ref_prefix = variants[0][2][:ref_len]
    segments: list[_Segment] = []
    blocks: list[tuple[Any, int]] = []
    ref_blocks: list[tuple[Any, int]] = []
    size = naive = 0

    def close() -> None:
        segments.append(_Segment(prefix, blocks, naive, (ref_prefix, ref_blocks) if with_reference else None))

    for variant in variants:
        ids, target = variant[0], variant[1]
        block = ids[prefix_len:]
        if blocks and prefix_len + size + len(block) > max_tokens:
            close()
            blocks, ref_blocks, size, naive = [], [], 0, 0
        blocks.append((block, target - prefix_len))
        if with_reference:
            ref_blocks.append((variant[2][ref_len:], variant[3] - ref_len))
        size += len(block)
        naive += len(ids)
    close()
    return segments


def _best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: longest first, each into the fullest bin it still fits (a new one if none)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), sorted
    for i in order:
        need = lengths[i]
        k = bisect.bisect_left(free, (need, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - need > 0:
            bisect.insort(free, (room - need, b))
    return bins


def _layout(segments: list[_Segment]) -> dict[str, Any]:
    """One packed sequence's columns (and its KL reference's, prefixed ``ref_``, when the segments carry one)."""
    row = {**_columns([(seg.prefix, seg.blocks) for seg in segments]),
           "n_examples": sum(len(seg.blocks) for seg in segments),
           "naive_tokens": sum(seg.naive_tokens for seg in segments)}
    if segments[0].reference is not None:
        row.update({f"ref_{k}": v for k, v in _columns([seg.reference for seg in segments]).items()})
    return row


def _columns(segments: list[tuple[Any, list[tuple[Any, int]]]]) -> dict[str, Any]:
    """Token columns of ``(prefix, blocks)`` segments laid out one after another.

    A block's labels are its ids from the completion start on; its first token is never a
    target (here it follows the prefix or a previous block), nor is a segment's first token.
    """
    import numpy as np

    ids, labels, positions, segment_ids, block_ids = [], [], [], [], []
    for s, (prefix, blocks) in enumerate(segments):
        p = len(prefix)
        ids.append(prefix)
        labels.append(np.full(p, IGNORE, dtype=np.int32))
        positions.append(np.arange(p, dtype=np.int32))
        segment_ids.append(np.full(p, s, dtype=np.int32))
        block_ids.append(np.zeros(p, dtype=np.int32))
        for b, (block, start) in enumerate(blocks, start=1):
            n = len(block)
            block_labels = block.copy()
            block_labels[:max(start, 1)] = IGNORE
            ids.append(block)
            labels.append(block_labels)
            positions.append(np.arange(p, p + n, dtype=np.int32))
            segment_ids.append(np.full(n, s, dtype=np.int32))
            block_ids.append(np.full(n, b, dtype=np.int32))
    return {"input_ids": np.concatenate(ids), "labels": np.concatenate(labels),
            "position_ids": np.concatenate(positions), "segment_ids": np.concatenate(segment_ids),
            "block_ids": np.concatenate(block_ids)}


# -- batches ---------------------------------------------------------------------------------

def block_attention_mask(segment_ids: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``(batch, 1, L, L)`` mask, True where query token q may attend to key token k.

    q sees k when both are in the same segment, k is not after q, and k is in the shared prefix
    (block 0) or in q's own block. Padding (segment -1) sees earlier padding only, so no row of
    the mask is empty (an empty row would give NaN attention weights).

    >>> import torch
    >>> m = block_attention_mask(torch.tensor([[0, 0, 0, 0]]), torch.tensor([[0, 1, 2, 2]]))[0, 0].int()
    >>> m.tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]
    """
    import torch

    length = segment_ids.shape[-1]
    index = torch.arange(length, device=segment_ids.device)
    causal = index[:, None] >= index[None, :]
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    key_block = block_ids[:, None, :]
    visible = (key_block == 0) | (key_block == block_ids[:, :, None])
    return (same_segment & visible & causal)[:, None]


@dataclass
class PrefixSharingCollator:
    """Pads packed sequences and adds their block attention mask and position ids.

    Returns ``input_ids``, ``labels`` (-100 on padding), ``position_ids`` and a 4D
    ``attention_mask``: boolean for sdpa, additive float32 (0 / most negative) for eager, whose
    attention adds the mask to the scores. Sequences packed with the KL reference's inputs give
    the same four for the reference, prefixed ``ref_``.

    >>> collator = PrefixSharingCollator.for_model(model, tokenizer.pad_token_id)  # doctest: +SKIP
    >>> batch = collator([packed.dataset[0], packed.dataset[1]])  # doctest: +SKIP
    >>> batch["attention_mask"].shape  # doctest: +SKIP
    torch.Size([2, 1, 1021, 1021])
    """

    pad_token_id: int
    attn_implementation: str = "sdpa"
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.attn_implementation not in BLOCK_MASK_IMPLEMENTATIONS:
            raise ConfigError(f"attn_implementation: {self.attn_implementation!r} cannot take a block attention "
                              f"mask; use one of {', '.join(BLOCK_MASK_IMPLEMENTATIONS)} or train without packing")

    @classmethod
    def for_model(cls, model, pad_token_id: int, **options: Any) -> PrefixSharingCollator:
        """A collator whose mask format fits ``model``'s attention implementation."""
        return cls(pad_token_id=pad_token_id, attn_implementation=_attn_implementation(model), **options)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._pad(examples)
        if "ref_input_ids" in examples[0]:
            batch.update({f"ref_{k}": v for k, v in self._pad(examples, "ref_").items()})
        return batch

    def _pad(self, examples: list[dict[str, Any]], prefix: str = "") -> dict[str, torch.Tensor]:
        import torch

        length = max(len(e[f"{prefix}input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(examples), length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        segment_ids = torch.full(shape, -1, dtype=torch.long)
        block_ids = torch.zeros(shape, dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e[f"{prefix}input_ids"])
            input_ids[row, :n] = torch.as_tensor(e[f"{prefix}input_ids"])
            labels[row, :n] = torch.as_tensor(e[f"{prefix}labels"])
            position_ids[row, :n] = torch.as_tensor(e[f"{prefix}position_ids"])
            segment_ids[row, :n] = torch.as_tensor(e[f"{prefix}segment_ids"])
            block_ids[row, :n] = torch.as_tensor(e[f"{prefix}block_ids"])
        mask = block_attention_mask(segment_ids, block_ids)
        if self.attn_implementation == "eager":
            additive = torch.zeros(mask.shape, dtype=torch.float32)
            mask = additive.masked_fill_(~mask, torch.finfo(torch.float32).min)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}


def is_packed_batch(batch: dict[str, Any]) -> bool:
    """Whether ``batch`` came from :class:`PrefixSharingCollator` (its attention mask is 4D).

    >>> import torch
    >>> is_packed_batch({"attention_mask": torch.ones(2, 5)})
    False
    """
    mask = batch.get("attention_mask")
    return mask is not None and getattr(mask, "ndim", 0) == 4


def packed_token_count(batch: dict[str, Any]) -> torch.Tensor:
    """Real (non-padding) tokens of a packed batch, as a 0-d tensor.

    Padding sits at the right end with position 0, while every packed sequence ends on the last
    token of a row with a completion, whose position is at least 1; so a row's real length is one
    past its last non-zero position.

    >>> import torch
    >>> int(packed_token_count({"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6]])}))
    12
    """
    import torch

    positions = batch["position_ids"]
    index = torch.arange(1, positions.shape[-1] + 1, device=positions.device)
    return (index * (positions > 0)).amax(dim=-1).sum()


# -- attention support -----------------------------------------------------------------------

def _attn_implementation(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def supports_block_mask(model) -> bool:
    """Whether ``model``'s attention applies a custom 4D mask (eager, sdpa), so packing is exact.

    >>> supports_block_mask(AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa"))  # doctest: +SKIP
    True
    """
    return _attn_implementation(model) in BLOCK_MASK_IMPLEMENTATIONS


def prefix_sharing_notice(model) -> str | None:
    """None when ``model`` can train packed sequences; else the one-line notice to print before falling back.

    >>> prefix_sharing_notice(flash_model)  # doctest: +SKIP
    "prefix sharing off: attention 'flash_attention_2' cannot take a block mask; ..."
    """
    if supports_block_mask(model):
        return None
    return (f"prefix sharing off: attention {_attn_implementation(model)!r} cannot take a block attention mask, "
            "so each goal variant trains as its own sequence (load the model with attn_implementation='sdpa' "
            "to share prompts)")
