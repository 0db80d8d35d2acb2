"""Goal conditioning in training: reward-token rows, the goal-free KL reference, and rows per step (tiny Llama, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import write_feedback_log
from gcsl.errors import ConfigError

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Prepared data by (method, chat, placement); chat logs hold the same rows as user messages."""
    from gcsl.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("goal-conditioning")
    text_log = write_feedback_log(root / "log.jsonl", seed=0)
    chat_log = root / "chat.jsonl"
    rows = [json.loads(line) for line in text_log.read_text().splitlines()]
    chat_log.write_text("".join(json.dumps({**r, "prompt": [{"role": "user", "content": r["prompt"]}]}) + "\n"
                                for r in rows))
    cache: dict[tuple, Path] = {}

    def get(method: str, chat: bool = False, placement: str = "after") -> Path:
        key = (method, chat, placement)
        if key not in cache:
            out = root / f"{method}-{'chat' if chat else 'text'}-{placement}"
            prepare(PrepareConfig(data=str(chat_log if chat else text_log), out=out, method=method,
                                  score_range=[1.0, 5.0], metric_name="rating", placement=placement, quiet=True))
            cache[key] = out
        return cache[key]

    return get


def _build(data: Path, out: Path, model: Path, **overrides):
    """The trainer exactly as `gcsl train` sets it up (nothing trained, nothing written)."""
    from accelerate import PartialState

    from gcsl.training.train import TrainConfig, _build_trainer, _read_prepared

    values = dict(data=data, out=out, model=str(model), per_device_batch_size=64, report_to="none",
                  lora_dropout=0.0, learning_rate=1e-2)
    values.update(overrides)
    return _build_trainer(TrainConfig(**values), _read_prepared(data), PartialState(cpu=True), out)


def _train(data: Path, out: Path, model: Path, **overrides):
    from gcsl.training.train import TrainConfig, train

    values = dict(data=data, out=out, model=str(model), report_to="none", logging_steps=1, save_steps=50,
                  learning_rate=1e-2)
    values.update(overrides)
    return train(TrainConfig(**values))


def _base_embeddings(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).get_input_embeddings().weight


# -- 1. reward-token rows: distinct starts, own learning rate ---------------------------------

@pytest.mark.parametrize(("method", "text"), [("gcsl", " level {k}"), ("gcsl-bey", " at least level {k}")])
def test_reward_token_rows_start_at_the_mean_embedding_of_their_level_name(prepared, tiny_llama_dir, tmp_path,
                                                                          method, text):
    built = _build(prepared(method), tmp_path / "out", tiny_llama_dir)
    tokenizer = built.tokenizer
    tokens = json.loads((prepared(method) / "goals.json").read_text())["special_tokens"]
    assert len(tokens) == 5
    base = _base_embeddings(tiny_llama_dir)
    expected = torch.stack([base[tokenizer.encode(text.format(k=k), add_special_tokens=False)].mean(0)
                            for k in range(1, 6)])
    adapter = built.trainer.model.get_input_embeddings().token_adapter
    assert adapter.token_indices["default"] == tokenizer.convert_tokens_to_ids(tokens)
    # PEFT's trainable rows start from (and its stored originals are) the initialised rows.
    start = adapter.trainable_tokens_delta["default"].detach()
    assert torch.equal(start, expected)
    assert torch.equal(adapter.trainable_tokens_original["default"], expected)
    cosine = torch.nn.functional.cosine_similarity(start[:, None], start[None], dim=-1)
    assert cosine[~torch.eye(5, dtype=torch.bool)].max() < 0.999
    assert torch.cdist(start, start)[~torch.eye(5, dtype=torch.bool)].min() > 1e-3


def test_untied_lm_head_rows_start_from_the_head_rows_of_the_same_text(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gcsl.training.train import _add_goal_tokens, _init_goal_token_rows

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32, tie_word_embeddings=False)
    tokens = ["[R_1+]", "[R_2+]", "[R_3+]"]
    ids = _add_goal_tokens(tokenizer, tokens)
    model.resize_token_embeddings(len(tokenizer))
    inputs, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert head is not inputs and not torch.equal(head[:100], inputs[:100])
    _init_goal_token_rows(model, tokenizer, tokens, ids)
    for k, token_id in enumerate(ids, start=1):
        text_ids = tokenizer.encode(f" at least level {k}", add_special_tokens=False)
        assert torch.equal(inputs[token_id], inputs[text_ids].mean(0))
        assert torch.equal(head[token_id], head[text_ids].mean(0))
    assert torch.cdist(inputs[ids], inputs[ids])[~torch.eye(3, dtype=torch.bool)].min() > 1e-3


def test_goal_token_lr_puts_the_reward_rows_in_their_own_group(prepared, tiny_llama_dir, tmp_path):
    built = _build(prepared("gcsl"), tmp_path / "out", tiny_llama_dir, goal_token_lr=0.5, learning_rate=1e-2)
    trainer = built.trainer
    optimizer = trainer.create_optimizer()
    rows = [p for n, p in trainer.model.named_parameters() if "trainable_tokens" in n and p.requires_grad]
    assert len(rows) == 1 and rows[0].shape == (5, 64)
    groups = [g for g in optimizer.param_groups if g.get("goal_tokens")]
    assert len(groups) == 1 and len(groups[0]["params"]) == 1 and groups[0]["params"][0] is rows[0]
    assert groups[0]["lr"] == 0.5
    others = [g for g in optimizer.param_groups if not g.get("goal_tokens")]
    assert all(g["lr"] == 1e-2 for g in others)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(held) == len(trainable) and {id(p) for p in held} == {id(p) for p in trainable}
    assert trainer.create_optimizer() is optimizer and len(optimizer.param_groups) == 3  # not regrouped twice
    # The linear schedule scales each group's own rate.
    scheduler = trainer.create_scheduler(num_training_steps=4, optimizer=optimizer)
    optimizer.step()
    scheduler.step()
    assert groups[0]["lr"] == pytest.approx(0.5 * 0.75) and others[0]["lr"] == pytest.approx(1e-2 * 0.75)

    from gcsl.config import resolve_config
    from gcsl.training.train import TrainConfig

    plain = _build(prepared("gcsl"), tmp_path / "plain", tiny_llama_dir).trainer.create_optimizer()
    assert not any(g.get("goal_tokens") for g in plain.param_groups)
    with pytest.raises(ConfigError, match="goal_token_lr: gcsl-bey-nl has no reward tokens"):
        _train(prepared("gcsl-bey-nl"), tmp_path / "nl", tiny_llama_dir, goal_token_lr=0.5)
    with pytest.raises(ConfigError, match="goal_token_lr: must be positive"):
        resolve_config(TrainConfig, overrides={"data": "d", "out": "o", "goal_token_lr": 0.0})


# -- 2. the KL reference conditions on the goal-free prompt -----------------------------------

def _batch_rows(trainer, packed: bool) -> list[tuple[list[int], int]]:
    """(training row ids, completion start) of the batch's rows in the order its completion tokens come."""
    from gcsl.training.packing import IGNORE

    dataset = trainer.train_dataset
    if not packed:
        return [(r["input_ids"], next(j for j, x in enumerate(r["labels"]) if x != IGNORE)) for r in dataset]
    rows = []
    for seq in dataset:
        ids, labels, segments, blocks = seq["input_ids"], seq["labels"], seq["segment_ids"], seq["block_ids"]
        for s in sorted(set(segments)):
            prefix = [i for i in range(len(ids)) if segments[i] == s and blocks[i] == 0]
            for b in sorted({blocks[i] for i in range(len(ids)) if segments[i] == s} - {0}):
                block = [i for i in range(len(ids)) if segments[i] == s and blocks[i] == b]
                first = next(j for j, i in enumerate(block) if labels[i] != IGNORE)
                rows.append(([ids[i] for i in prefix + block], len(prefix) + first))
    return rows


def _goal_free_prompt(prompt_text: str, chat: bool):
    return json.loads(prompt_text) if chat else prompt_text


def _expected_reference(trainer, tokenizer, data: Path, packed: bool, chat: bool) -> torch.Tensor:
    """The base model's log-probs of each row's completion after its goal-free prompt, one plain forward a row."""
    from gcsl.training.packing import tokenize_prompt_completion

    table = pq.read_table(data / "train.parquet").to_pylist()
    by_ids = {}
    for r in table:
        ids, _ = tokenize_prompt_completion(r["prompt"], r["completion"], tokenizer,
                                            max_length=trainer.args.max_length)
        by_ids[tuple(ids)] = r
    parts = []
    model = trainer.model
    for ids, start in _batch_rows(trainer, packed):
        prompt = _goal_free_prompt(by_ids[tuple(ids)]["prompt_text"], chat)
        if chat:
            prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"]
        else:
            prompt_ids = tokenizer(text=prompt)["input_ids"]
        completion = ids[start:]
        with torch.no_grad(), model.disable_adapter():
            logits = model(input_ids=torch.tensor([prompt_ids + completion])).logits[0]
        parts.append(logits[len(prompt_ids) - 1:-1].float().log_softmax(-1))
    return torch.cat(parts)


def _full_batch(trainer) -> dict[str, torch.Tensor]:
    dataset = trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


@pytest.mark.parametrize(("method", "chat", "placement", "packed", "pack_tokens"), [
    ("gcsl-bey-nl", False, "after", True, None),
    ("gcsl-bey-nl", False, "after", True, 60),  # groups split over sequences, each part with its prefix
    ("gcsl-bey-nl", False, "after", False, None),
    ("gcsl-bey-nl", True, "after", True, None),
    ("gcsl-bey-nl", True, "system", False, None),
    ("gcsl", False, "after", True, None),
    ("gcsl-noquant-embed", False, "after", False, None),
])
def test_kl_reference_is_the_base_model_on_the_goal_free_prompt(prepared, tiny_llama_dir, tmp_path, method, chat,
                                                                placement, packed, pack_tokens):
    data = prepared(method, chat, placement)
    built = _build(data, tmp_path / "out", tiny_llama_dir, kl_coef=0.05, prefix_sharing=packed,
                   **({"max_length": pack_tokens, "pack_tokens": pack_tokens} if pack_tokens else {}))
    trainer = built.trainer
    if pack_tokens:
        segments = sum(len(set(s)) for s in trainer.train_dataset["segment_ids"])
        groups = len(set(pq.read_table(data / "train.parquet", columns=["row_id"]).column("row_id").to_pylist()))
        assert segments > groups
    batch = _full_batch(trainer)
    assert ("ref_input_ids" in batch) is (method != "gcsl-noquant-embed")
    assert ("position_ids" in batch) is packed
    used = trainer._reference_log_probs(trainer.model, batch)
    expected = _expected_reference(trainer, built.tokenizer, data, packed, chat)
    completion_tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert used.shape == expected.shape == (completion_tokens, len(built.tokenizer))
    # Equal up to fp32 rounding: log-probs near -11 have a 1e-6 ulp, and the batched (or packed)
    # forward sums in another order than a single row's.
    torch.testing.assert_close(used, expected, atol=1e-6, rtol=1e-6)
    # The old reference, the base model on the training batch itself, saw the goal: it differs.
    if method == "gcsl-noquant-embed":
        goal_batch = trainer._with_goal(trainer.model, {k: v for k, v in batch.items() if k != "goal_value"},
                                        batch["goal_value"])
    else:
        goal_batch = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    mask = goal_batch["labels"][:, 1:] != -100
    with torch.no_grad(), trainer.model.disable_adapter():
        forward = {k: v for k, v in goal_batch.items() if k != "labels"}
        with_goal = trainer.model(**forward).logits[:, :-1][mask].float().log_softmax(-1)
    assert with_goal.shape == used.shape and (with_goal - used).abs().max() > 1e-2


@pytest.mark.parametrize("method", ["gcsl-bey-nl", "gcsl"])
def test_packed_and_unpacked_kl_to_the_goal_free_reference_agree(prepared, tiny_llama_dir, tmp_path, method):
    kls, losses = [], []
    for packed in (True, False):
        trainer = _build(prepared(method), tmp_path / f"out-{packed}", tiny_llama_dir, kl_coef=0.05,
                         prefix_sharing=packed).trainer
        torch.manual_seed(3)
        with torch.no_grad():  # move the policy away from the base (LoRA B starts at zero), the same in both
            for name, param in trainer.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        trainer.model.train()
        batch = _full_batch(trainer)
        count = (batch["labels"][:, 1:] != -100).sum()
        losses.append(trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=count).item())
        kls.append(trainer._metrics["train"]["kl"][-1])
    assert kls[0] > 1e-3
    assert kls[0] == pytest.approx(kls[1], abs=1e-5)
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)


def test_kl_needs_the_goal_free_prompts(prepared, tiny_llama_dir, tmp_path):
    from gcsl.errors import DataError

    data = tmp_path / "old"
    data.mkdir()
    source = prepared("gcsl-bey-nl")
    (data / "goals.json").write_text((source / "goals.json").read_text())
    pq.write_table(pq.read_table(source / "train.parquet").drop_columns(["reference_prompt"]), data / "train.parquet")
    with pytest.raises(DataError, match="reference_prompt.*re-run `gcsl prepare`"):
        _train(data, tmp_path / "out", tiny_llama_dir, kl_coef=0.05)
    assert not (tmp_path / "out.partial").exists()


# -- 3. rows per optimizer step ---------------------------------------------------------------

@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_train_metrics_record_rows_per_step(prepared, tiny_llama_dir, tmp_path, capsys, packed):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from gcsl.training.packing import pack_prefix_shared

    data = prepared("gcsl-bey-nl")
    result = _train(data, tmp_path / "run", tiny_llama_dir, epochs=1.0, per_device_batch_size=2,
                    gradient_accumulation_steps=2, max_length=256, pack_tokens=160, prefix_sharing=packed)
    metrics = json.loads((result.out / "train_metrics.json").read_text())
    dataset = Dataset.from_parquet(str(data / "train.parquet"))
    layout = pack_prefix_shared(dataset, AutoTokenizer.from_pretrained(str(tiny_llama_dir)), max_tokens=160,
                                max_length=256)
    assert layout.sequences > 2 and layout.rows == len(dataset)  # several sequences, no row dropped
    per_sequence = layout.rows / layout.sequences if packed else 1.0
    steps = json.loads((result.out / "trainer_state.json").read_text())["global_step"]
    assert metrics["train_rows"] == len(dataset)
    assert metrics["rows_per_sequence"] == pytest.approx(per_sequence, abs=1e-4)
    assert metrics["rows_per_step"] == pytest.approx(per_sequence * 2 * 2 * 1, abs=1e-3)
    assert metrics["optimizer_steps"] == metrics["global_step"] == steps == result.global_step > 0
    assert metrics["epochs"] == pytest.approx(1.0)
    # One epoch: every token once, shared prefixes once when packed.
    assert metrics["train_tokens"] == (layout.packed_tokens if packed else layout.naive_tokens)
    assert 0 < metrics["train_seconds"] < 600
    record = json.loads((result.out / "run.json").read_text())
    assert all(record[k] == v for k, v in metrics.items())
    printed = capsys.readouterr().out
    assert f"trained {steps} optimizer steps of {metrics['rows_per_step']:g} rows" in printed
    assert f"Rows per optimizer step: {metrics['rows_per_step']:g}" in (result.out / "README.md").read_text()
