"""Prefix-shared packing is exactly the unpacked training: same tokens, loss, LoRA gradients and KL."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from gcsl.errors import ConfigError, DataError
from gcsl.training.packing import (
    PrefixSharingCollator,
    block_attention_mask,
    is_packed_batch,
    pack_prefix_shared,
    packed_token_count,
    prefix_sharing_notice,
    shared_prefix_length,
    supports_block_mask,
    tokenize_prompt_completion,
)

TOL = 1e-4


# -- data: a real gcsl-bey-nl expansion -------------------------------------------------------

def _feedback_log(path: Path, chat: bool, rows: int = 6) -> Path:
    """Ratings 1..5 over rows: unfiltered, a rating-r row carries r goals (different goal counts per row)."""
    histories = ["Toy Story, GoldenEye, Heat", "Fargo, Clerks", "Casablanca, Vertigo, Psycho, Rear Window",
                 "Alien, Aliens", "Babe, Speed, Twister", "Heat"]
    answers = ['"Jaws"', '"Fargo 2"', '"Notorious" is a fine next pick', '"Predator"', '"Big"', '"Ronin"']
    with path.open("w") as fh:
        for i in range(rows):
            prompt = f"The user watched {histories[i % 6]}. Recommend one movie."
            fh.write(json.dumps({"prompt": [{"role": "user", "content": prompt}] if chat else prompt,
                                 "response": answers[i % 6], "score": 5 - i % 5}) + "\n")
    return path


def _prepared(tmp_path: Path, chat: bool, rows: int = 6) -> Dataset:
    from gcsl.data.prepare import PrepareConfig, prepare

    log = _feedback_log(tmp_path / f"log-{chat}.jsonl", chat, rows)
    out = tmp_path / f"prep-{chat}"
    prepare(PrepareConfig(data=str(log), out=out, method="gcsl-bey-nl", kind="ordinal", score_range=[1, 5],
                          metric_name="rating", filter=False, quiet=True))
    return Dataset.from_parquet(str(out / "train.parquet"))


@pytest.fixture(scope="module", params=["chat", "text"])
def expansion(request, tmp_path_factory) -> Dataset:
    # Ratings 5, 4, 3, 2: rows with 5, 4, 3 and 2 goals (14 training rows).
    return _prepared(tmp_path_factory.mktemp("packing"), chat=request.param == "chat", rows=4)


# -- reference computations on ordinary (unpacked) sequences ----------------------------------

def _unpacked_batch(dataset: Dataset, tokenizer, max_length: int | None = None) -> dict[str, torch.Tensor]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = []
    for r in dataset:
        ids, labels = tokenize_prompt_completion(r["prompt"], r["completion"], tokenizer, max_length=max_length)
        rows.append({"input_ids": ids, "labels": labels})
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(rows)


def _truncating_length(dataset: Dataset, tokenizer) -> int:
    """A max_length that cuts rows inside their completion but leaves every row a completion token."""
    starts = []
    for r in dataset:
        _, labels = tokenize_prompt_completion(r["prompt"], r["completion"], tokenizer)
        starts.append(next(j for j, x in enumerate(labels) if x != -100))
    return max(starts) + 2


def _budget_that_splits_a_group(dataset: Dataset, tokenizer) -> int:
    """One token less than the largest row group needs: that group is split, its remainder packs with another."""
    groups: dict[int, list] = {}
    for r in dataset:
        groups.setdefault(r["row_id"], []).append(tokenize_prompt_completion(r["prompt"], r["completion"], tokenizer))
    sizes = []
    for variants in groups.values():
        shared = shared_prefix_length(variants)
        sizes.append(shared + sum(len(ids) - shared for ids, _ in variants))
    return max(sizes) - 1


def _packed_batch(packed, model, tokenizer) -> dict[str, torch.Tensor]:
    collator = PrefixSharingCollator.for_model(model, tokenizer.pad_token_id)
    return collator([packed.dataset[i] for i in range(len(packed.dataset))])


def _completion_log_probs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(completion tokens, vocab) log-probabilities and the target ids: what the trainer's loss and KL use."""
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    return out.logits[:, :-1][mask].float().log_softmax(-1), targets[mask]


def _nll(model, batch) -> torch.Tensor:
    log_probs, targets = _completion_log_probs(model, batch)
    return -log_probs.gather(-1, targets[:, None]).sum() / len(targets)


def _kl_to_base(model, batch) -> torch.Tensor:
    log_probs, _ = _completion_log_probs(model, batch)
    with torch.no_grad(), model.disable_adapter():
        base, _ = _completion_log_probs(model, batch)
    return (log_probs.exp() * (log_probs - base)).sum() / len(log_probs)


def _lora_grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _lora_model(model_dir: Path, attn: str = "sdpa"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation=attn)
    # Random A and B (not B = 0): the adapter changes the outputs, so gradients of A and the KL are non-zero.
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _assert_packed_equals_unpacked(model, tokenizer, dataset: Dataset, packed, max_length: int | None = None):
    unpacked = _unpacked_batch(dataset, tokenizer, max_length)
    batch = _packed_batch(packed, model, tokenizer)
    # The Trainer's normaliser (num_items_in_batch) counts labels[..., 1:]: the same completion tokens.
    assert int((batch["labels"][:, 1:] != -100).sum()) == int((unpacked["labels"][:, 1:] != -100).sum())
    loss_unpacked, loss_packed = _nll(model, unpacked), _nll(model, batch)
    assert abs(loss_packed.item() - loss_unpacked.item()) <= TOL
    grads_unpacked, grads_packed = _lora_grads(model, loss_unpacked), _lora_grads(model, loss_packed)
    assert grads_unpacked.keys() == grads_packed.keys() and grads_unpacked
    assert any(g.abs().max() > 1e-3 for g in grads_unpacked.values())
    for name, grad in grads_unpacked.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=TOL, rtol=TOL, msg=name)
    return loss_unpacked.item()


# -- tokenization is TRL's --------------------------------------------------------------------

@pytest.mark.parametrize("truncate", [False, True])
def test_tokenization_matches_sft_trainer(expansion, tiny_llama_dir, smollm2_tokenizer, tmp_path, truncate):
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    max_length = _truncating_length(expansion, smollm2_tokenizer) if truncate else 1024
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    args = SFTConfig(output_dir=str(tmp_path), max_length=max_length, completion_only_loss=True, bf16=False,
                     activation_checkpointing=False, report_to=[], use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=expansion.select_columns(["prompt", "completion"]),
                         processing_class=smollm2_tokenizer)
    ours = [tokenize_prompt_completion(r["prompt"], r["completion"], smollm2_tokenizer, max_length=max_length)
            for r in expansion]
    kept = [(ids, labels) for ids, labels in ours if any(x != -100 for x in labels)]
    assert len(kept) == len(trainer.train_dataset) > 0
    assert [ids for ids, _ in kept] == trainer.train_dataset["input_ids"]
    assert [labels for _, labels in kept] == trainer.train_dataset["labels"]
    untruncated = [tokenize_prompt_completion(r["prompt"], r["completion"], smollm2_tokenizer) for r in expansion]
    # The truncation case really cuts rows inside their completion.
    assert (sum(len(a) < len(b) for (a, _), (b, _) in zip(ours, untruncated)) > 0) is truncate


# -- the shared prefix and the layout ---------------------------------------------------------

def test_shared_prefix_length_rules():
    prompt = [-100] * 4
    a = ([1, 2, 3, 4, 9, 9], prompt + [9, 9])
    b = ([1, 2, 3, 5, 9, 9], prompt + [9, 9])
    assert shared_prefix_length([a, b]) == 3
    assert shared_prefix_length([a]) == 0  # one variant: nothing to share
    # Identical variants: the prefix stops before the first completion target (index 4), not at the end.
    assert shared_prefix_length([a, a]) == 3
    # A completion starting right after a common token: sharing it would score one prediction for two rows.
    c = ([1, 2, 3], [-100, 2, 3])
    assert shared_prefix_length([c, ([1, 2, 4], [-100, 2, 4])]) == 0
    # No common token at all.
    assert shared_prefix_length([a, ([7, 2, 3, 4, 9, 9], prompt + [9, 9])]) == 0


def test_pack_layout_reconstructs_every_row(expansion, smollm2_tokenizer):
    rows = [tokenize_prompt_completion(r["prompt"], r["completion"], smollm2_tokenizer) for r in expansion]
    longest = max(len(ids) for ids, _ in rows)
    packed = pack_prefix_shared(expansion, smollm2_tokenizer, max_tokens=int(longest * 1.6))
    assert packed.rows == len(expansion) == sum(packed.dataset["n_examples"])
    assert packed.groups == len(set(expansion["row_id"])) == 4
    assert packed.naive_tokens == sum(len(ids) for ids, _ in rows)
    assert packed.packed_tokens == sum(len(x) for x in packed.dataset["input_ids"]) < packed.naive_tokens
    rebuilt = []
    for seq in packed.dataset:
        assert len(seq["input_ids"]) <= int(longest * 1.6)
        n = len(seq["input_ids"])
        assert all(len(seq[c]) == n for c in ("labels", "position_ids", "segment_ids", "block_ids"))
        for s in sorted(set(seq["segment_ids"])):
            where = [i for i in range(n) if seq["segment_ids"][i] == s]
            assert where == list(range(where[0], where[-1] + 1))  # a segment is contiguous
            prefix = [i for i in where if seq["block_ids"][i] == 0]
            assert seq["position_ids"][where[0]] == 0 and seq["labels"][where[0]] == -100
            for b in sorted({seq["block_ids"][i] for i in where} - {0}):
                block = [i for i in where if seq["block_ids"][i] == b]
                ids = [seq["input_ids"][i] for i in prefix + block]
                labels = [seq["labels"][i] for i in prefix + block]
                # Positions continue from the prefix's end, as in the row's own sequence.
                assert [seq["position_ids"][i] for i in prefix + block] == list(range(len(ids)))
                assert seq["labels"][block[0]] == -100
                rebuilt.append((tuple(ids), tuple(labels[1:])))
    expected = [(tuple(ids), tuple(labels[1:])) for ids, labels in rows]
    assert Counter(rebuilt) == Counter(expected)


def test_group_too_long_is_split_with_the_prefix_repeated(smollm2_tokenizer):
    prompt = "Shared history " * 30
    ds = Dataset.from_dict({"prompt": [prompt + f"\n\nGoal {k}." for k in range(4)],
                            "completion": [f" answer {k}" for k in range(4)], "row_id": [7] * 4})
    rows = [tokenize_prompt_completion(p, c, smollm2_tokenizer) for p, c in zip(ds["prompt"], ds["completion"])]
    packed = pack_prefix_shared(ds, smollm2_tokenizer, max_tokens=len(rows[0][0]) + 12)
    assert packed.rows == 4 and packed.groups == 1
    assert len(packed.dataset) >= 2  # the group does not fit one sequence
    prefix_lengths = [seq["block_ids"].count(0) for seq in packed.dataset]
    assert min(prefix_lengths) > 30  # every part carries the whole shared prompt


def test_rows_without_group_pack_alone(expansion, smollm2_tokenizer):
    packed = pack_prefix_shared(expansion, smollm2_tokenizer, max_tokens=4096, group_column=None)
    assert packed.groups == packed.rows == len(expansion)
    assert packed.packed_tokens == packed.naive_tokens  # ordinary packing: nothing shared
    assert all(0 not in seq["block_ids"] for seq in packed.dataset)


def test_bad_input_errors(expansion, smollm2_tokenizer):
    with pytest.raises(DataError, match="row_id"):
        pack_prefix_shared(expansion.remove_columns("row_id"), smollm2_tokenizer, max_tokens=1024)
    with pytest.raises(ConfigError, match="max_tokens"):
        pack_prefix_shared(expansion, smollm2_tokenizer, max_tokens=20)
    with pytest.raises(DataError, match="max_length"):
        pack_prefix_shared(expansion, smollm2_tokenizer, max_tokens=1024, max_length=5)


def test_truncated_rows_are_dropped_and_counted(smollm2_tokenizer):
    ds = Dataset.from_dict({"prompt": ["word " * 50, "short"], "completion": [" a", " b"], "row_id": [0, 1]})
    packed = pack_prefix_shared(ds, smollm2_tokenizer, max_tokens=64, max_length=20)
    assert packed.dropped == 1 and packed.rows == 1
    assert "1 row(s) without completion tokens" in packed.summary()


# -- masks and batches ------------------------------------------------------------------------

def test_block_attention_mask_two_segments_and_padding():
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, -1]])
    blk = torch.tensor([[0, 1, 1, 2, 0, 0, 0]])
    m = block_attention_mask(seg, blk)[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 0, 0, 1, 0, 0, 0],  # block 2 sees the prefix, not block 1
        [0, 0, 0, 0, 1, 0, 0],  # a new segment sees nothing before it
        [0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],  # padding sees only padding
    ]


def test_collator_formats(expansion, smollm2_tokenizer):
    packed = pack_prefix_shared(expansion, smollm2_tokenizer, max_tokens=400)
    examples = [packed.dataset[0], packed.dataset[len(packed.dataset) - 1]]
    sdpa = PrefixSharingCollator(smollm2_tokenizer.pad_token_id, "sdpa", pad_to_multiple_of=8)(examples)
    eager = PrefixSharingCollator(smollm2_tokenizer.pad_token_id, "eager")(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert sdpa["input_ids"].shape[1] % 8 == 0 and sdpa["input_ids"].shape[1] >= max(lengths)
    assert sdpa["attention_mask"].dtype == torch.bool and eager["attention_mask"].dtype == torch.float32
    length = eager["input_ids"].shape[1]
    assert torch.equal(eager["attention_mask"] == 0, sdpa["attention_mask"][..., :length, :length])
    assert is_packed_batch(sdpa) and not is_packed_batch({"attention_mask": torch.ones(1, 3)})
    assert int(packed_token_count(sdpa)) == sum(lengths)
    short = lengths.index(min(lengths))
    assert (sdpa["labels"][short, min(lengths):] == -100).all()
    with pytest.raises(ConfigError, match="flash_attention_2"):
        PrefixSharingCollator(0, "flash_attention_2")


def test_supports_block_mask_by_attention(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    for attn, ok in (("sdpa", True), ("eager", True), ("flex_attention", False)):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), attn_implementation=attn)
        assert supports_block_mask(model) is ok
        assert (prefix_sharing_notice(model) is None) is ok
    notice = prefix_sharing_notice(model)
    assert "flex_attention" in notice and "\n" not in notice and "sdpa" in notice


# -- exactness: loss, LoRA gradients, KL ------------------------------------------------------

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_lora_grads_equal_unpacked(expansion, tiny_llama_dir, smollm2_tokenizer, attn):
    model = _lora_model(tiny_llama_dir, attn)
    packed = pack_prefix_shared(expansion, smollm2_tokenizer,
                                max_tokens=_budget_that_splits_a_group(expansion, smollm2_tokenizer))
    # Several sequences (padding in the batch), several segments in one, and a group split in two.
    assert len(packed.dataset) >= 2
    assert max(len(set(s)) for s in packed.dataset["segment_ids"]) >= 2
    assert sum(len(set(s)) for s in packed.dataset["segment_ids"]) > packed.groups
    loss = _assert_packed_equals_unpacked(model, smollm2_tokenizer, expansion, packed)
    assert 5 < loss < 20  # a random model over a 49k vocabulary


def test_packed_equals_unpacked_with_truncation(expansion, tiny_llama_dir, smollm2_tokenizer):
    model = _lora_model(tiny_llama_dir)
    max_length = _truncating_length(expansion, smollm2_tokenizer)
    packed = pack_prefix_shared(expansion, smollm2_tokenizer, max_tokens=3 * max_length, max_length=max_length)
    full = pack_prefix_shared(expansion, smollm2_tokenizer, max_tokens=1024)
    assert packed.dropped == 0 and packed.rows == len(expansion) and packed.naive_tokens < full.naive_tokens
    _assert_packed_equals_unpacked(model, smollm2_tokenizer, expansion, packed, max_length=max_length)


def test_packed_kl_to_base_equals_unpacked(expansion, tiny_llama_dir, smollm2_tokenizer):
    model = _lora_model(tiny_llama_dir)
    packed = pack_prefix_shared(expansion, smollm2_tokenizer, max_tokens=300)
    unpacked = _unpacked_batch(expansion, smollm2_tokenizer)
    batch = _packed_batch(packed, model, smollm2_tokenizer)
    kl_unpacked, kl_packed = _kl_to_base(model, unpacked), _kl_to_base(model, batch)
    assert kl_unpacked.item() > 1e-3  # the adapter moved the model away from its base
    assert abs(kl_packed.item() - kl_unpacked.item()) <= TOL
    grads_unpacked, grads_packed = _lora_grads(model, kl_unpacked), _lora_grads(model, kl_packed)
    for name, grad in grads_unpacked.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=TOL, rtol=TOL, msg=name)


@pytest.mark.parametrize("trainer_kind", ["gcsl", "gcsl-kl", "trl-fused-head"])
def test_trainer_loss_equal_on_packed_batches(expansion, tiny_llama_dir, smollm2_tokenizer, tmp_path, trainer_kind):
    """The trainers, unchanged, give packed and ordinary batches of the same rows the same loss: the
    project's trainer (logits path, with and without KL) and TRL's own fused-LM-head loss (used on GPUs)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from gcsl.training.trainer import GcslSFTTrainer

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    packed = pack_prefix_shared(expansion, smollm2_tokenizer, max_tokens=300, max_length=1024)
    args = SFTConfig(output_dir=str(tmp_path), max_length=1024, completion_only_loss=True, bf16=False,
                     activation_checkpointing=False, report_to=[], use_cpu=True, remove_unused_columns=False,
                     dataset_kwargs={"skip_prepare_dataset": True})
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False,
                      task_type="CAUSAL_LM")
    kwargs = dict(model=model, args=args, train_dataset=packed.dataset, processing_class=smollm2_tokenizer,
                  data_collator=PrefixSharingCollator.for_model(model, smollm2_tokenizer.pad_token_id),
                  peft_config=lora)
    if trainer_kind == "trl-fused-head":
        trainer = SFTTrainer(**kwargs)
    else:
        trainer = GcslSFTTrainer(**kwargs, kl_coef=0.05 if trainer_kind == "gcsl-kl" else 0.0)
    batches = [_packed_batch(packed, trainer.model, smollm2_tokenizer), _unpacked_batch(expansion, smollm2_tokenizer)]
    losses = []
    for batch in batches:
        count = (batch["labels"][:, 1:] != -100).sum()
        losses.append(trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=count).item())
    assert abs(losses[0] - losses[1]) <= TOL
    assert 5 < losses[1] < 20


@pytest.mark.slow
def test_packed_equals_unpacked_on_smollm2(tmp_path):
    """The real SmolLM2-135M-Instruct (fp32): loss, LoRA gradients and KL of packed and unpacked rows agree."""
    from peft import LoraConfig, get_peft_model

    from gcsl.models import load_causal_lm, load_tokenizer, resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(path, dtype=torch.float32, device="cpu"),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    assert supports_block_mask(model)
    for chat in (True, False):
        dataset = _prepared(tmp_path, chat=chat, rows=3)
        packed = pack_prefix_shared(dataset, tokenizer, max_tokens=512)
        assert packed.token_ratio > 1.2
        loss = _assert_packed_equals_unpacked(model, tokenizer, dataset, packed)
        assert 0 < loss < 15
        kl_unpacked = _kl_to_base(model, _unpacked_batch(dataset, tokenizer)).item()
        kl_packed = _kl_to_base(model, _packed_batch(packed, model, tokenizer)).item()
        assert kl_unpacked > 1e-3 and abs(kl_packed - kl_unpacked) <= TOL
