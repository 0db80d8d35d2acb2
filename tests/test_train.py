"""`gcsl train` / `gcsl merge` on a tiny random Llama with the real SmolLM2 tokenizer (CPU, seconds each)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gcsl.cli import main as cli_main
from gcsl.config import resolve_config
from gcsl.errors import ConfigError, DataError, StageError

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prepared(feedback_log, tmp_path_factory):
    from gcsl.data.prepare import PrepareConfig, prepare

    cache: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in cache:
            out = tmp_path_factory.mktemp("prep") / method
            prepare(PrepareConfig(data=str(feedback_log), out=out, method=method, score_range=[1.0, 5.0],
                                  metric_name="rating", quiet=True))
            cache[method] = out
        return cache[method]

    return get


def _config(data: Path, out: Path, model: Path, **overrides):
    from gcsl.training.train import TrainConfig

    values = dict(data=data, out=out, model=str(model), max_steps=3, per_device_batch_size=4, logging_steps=1,
                  save_steps=50, report_to="none", learning_rate=1e-2)
    values.update(overrides)
    return TrainConfig(**values)


def _train(data: Path, out: Path, model: Path, **overrides):
    from gcsl.training.train import train

    return train(_config(data, out, model, **overrides))


@pytest.fixture(scope="module")
def bey_run(prepared, tiny_llama_dir, tmp_path_factory):
    """GCSL-bey-NL (text goals, TRL's fused loss path) with TensorBoard logging on."""
    return _train(prepared("gcsl-bey-nl"), tmp_path_factory.mktemp("runs") / "bey", tiny_llama_dir,
                  report_to="tensorboard")


@pytest.fixture(scope="module")
def token_run(prepared, tiny_llama_dir, tmp_path_factory):
    """Classic GCSL: reward tokens [R_k] added to the tokenizer."""
    return _train(prepared("gcsl"), tmp_path_factory.mktemp("runs") / "token", tiny_llama_dir)


def _base_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).state_dict()


def _base_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


def test_lora_weights_change_and_base_weights_do_not(bey_run, tiny_llama_dir):
    base = _base_state(tiny_llama_dir)
    lora_b = 0
    for name, param in bey_run.model.named_parameters():
        if "lora_B" in name:
            lora_b += 1
            assert param.abs().max() > 0, f"{name} stayed at its zero init"
        elif "lora_" not in name:
            assert not param.requires_grad, name
            assert torch.equal(param.detach(), base[_base_name(name)]), f"base weight {name} changed"
    assert lora_b == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert bey_run.global_step == 3


def test_outputs_are_complete(bey_run, prepared, tiny_llama_dir):
    out = bey_run.out
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "goals.json", "run.json",
                 "trainer_state.json", "README.md"):
        assert (out / name).is_file(), name
    assert not Path(str(out) + ".partial").exists()
    assert not (out / "checkpoints").exists()
    assert list((out / "logs").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (out / "goals.json").read_text() == (prepared("gcsl-bey-nl") / "goals.json").read_text()
    record = json.loads((out / "run.json").read_text())
    assert record["stage"] == "train" and record["status"] == "finished" and record["seed"] == 0
    assert record["method"] == "gcsl-bey-nl" and record["global_step"] == 3 and record["world_size"] == 1
    assert record["config"]["lora_r"] == 13 and record["config"]["lora_alpha"] == 32
    assert record["goals"]["method"] == "gcsl-bey-nl" and "torch" in record["versions"]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]
    card = (out / "README.md").read_text()
    goal_text = json.loads((out / "goals.json").read_text())["inference_goal"]["text"]
    assert "gcsl-bey-nl" in card and goal_text in card
    assert f"gcsl generate --model {out} --prompts prompts.jsonl --goal top" in card
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 13 and adapter["lora_dropout"] == 0.05
    assert adapter["base_model_name_or_path"] == str(Path(tiny_llama_dir).resolve())


def _card_code(card: str) -> str:
    """The card's one Python block (the transformers + peft snippet)."""
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) == 1, "the card holds one Python snippet"
    return blocks[0]


def _top_goal_row(data: Path, goals: dict) -> dict:
    """A training row of the top goal (the level inference asks for), as prepare wrote it."""
    rows = pq.read_table(data / "train.parquet").to_pylist()
    return next(r for r in rows if r["goal"] == goals["inference_goal"]["text"])


def test_card_carries_hub_metadata_and_a_prompt_built_as_in_training(bey_run, prepared, tiny_llama_dir):
    from gcsl.training.card import PLAIN_PROMPT, read_card_metadata

    out = bey_run.out
    card = (out / "README.md").read_text()
    meta = read_card_metadata(card)
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).is_dir() and base == str(Path(tiny_llama_dir).resolve())
    assert meta == {"base_model": base, "library_name": "peft", "pipeline_tag": "text-generation",
                    "tags": ["gcsl", "gcsl-bey-nl", "lora", "goal-conditioned"]}
    goals = json.loads((out / "goals.json").read_text())
    row = _top_goal_row(prepared("gcsl-bey-nl"), goals)
    code = _card_code(card)
    assert "gcsl" not in code.replace("goal", "")  # plain transformers + peft: no gcsl import or call
    assert f"base = {base!r}" in code and f"adapter = {str(out.resolve())!r}" in code
    # Run the snippet's prompt-building lines with a training prompt in place of the stand-in.
    prompt_part = code.split("# The tokenizer saved with the adapter")[0]
    namespace: dict = {}
    exec(prompt_part.replace(repr(PLAIN_PROMPT), repr(row["prompt_text"])), namespace)
    assert namespace["prompt"] == row["prompt"]
    assert namespace["prompt"].endswith("\n\n" + goals["inference_goal"]["text"])


def test_card_snippet_runs_with_plain_transformers_and_peft(token_run, prepared, capsys):
    """The whole snippet, reward token included, on the tiny model: the prompt is training's, generation runs."""
    from gcsl.training.card import PLAIN_PROMPT, read_card_metadata

    out = token_run.out
    card = (out / "README.md").read_text()
    assert read_card_metadata(card)["tags"] == ["gcsl", "gcsl", "lora", "goal-conditioned"]
    goals = json.loads((out / "goals.json").read_text())
    assert goals["inference_goal"]["text"] == "[R_5]"
    row = _top_goal_row(prepared("gcsl"), goals)
    namespace: dict = {}
    code = _card_code(card).replace("max_new_tokens=64", "max_new_tokens=4")
    exec(code.replace(repr(PLAIN_PROMPT), repr(row["prompt_text"])), namespace)
    assert namespace["prompt"] == row["prompt"] == row["prompt_text"] + "\n\n[R_5]"
    tokenizer = namespace["tokenizer"]
    ids = namespace["inputs"]["input_ids"][0].tolist()
    assert tokenizer.convert_tokens_to_ids("[R_5]") == ids[-1]  # one token, the trained row
    assert namespace["output"].shape[1] > len(ids)


@pytest.mark.parametrize(("placement", "chat", "expected"), [
    ("after", False, "Q\n\nG"),
    ("before", False, "G\n\nQ"),
    ("system", False, [{"role": "system", "content": "G"}, {"role": "user", "content": "Q"}]),
    ("after", True, [{"role": "user", "content": "Q\n\nG"}]),
    ("before", True, [{"role": "user", "content": "G\n\nQ"}]),
])
def test_card_prompt_code_places_the_goal_as_place_goal_does(placement, chat, expected):
    from gcsl.goals import place_goal
    from gcsl.training.card import _prompt_code

    namespace = {"user_prompt": "Q"}
    exec("\n".join(_prompt_code("G", placement, "\n\n", chat)), namespace)
    source = [{"role": "user", "content": "Q"}] if chat else "Q"
    assert namespace["prompt"] == expected == place_goal(source, "G", placement)


def test_card_says_where_the_base_comes_from_and_which_loss_trained():
    from gcsl.models import BUILTIN_MODELS
    from gcsl.training.card import read_card_metadata, render_model_card

    common = dict(out_dir=Path("runs/a"), data_dir=Path("d"), goals={"metric": {"name": "rating"}}, metrics={},
                  rows=4)
    builtin = render_model_card(method="sft", base_model="smollm2-135m-instruct", config={},
                                base_model_path="/cache/gcsl/models/smollm2-135m-instruct", **common)
    # The Hub header names the original model; the adapter and the snippet name the converted folder.
    assert read_card_metadata(builtin)["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert BUILTIN_MODELS["smollm2-135m-instruct"].install in builtin
    assert "names the base model as `/cache/gcsl/models/smollm2-135m-instruct`" in builtin
    hub = render_model_card(method="dpo", base_model="org/m", config={"preference_loss": "simpo"}, **common)
    assert read_card_metadata(hub) == {"base_model": "org/m", "library_name": "peft",
                                       "pipeline_tag": "text-generation", "tags": ["gcsl", "dpo", "simpo", "lora"]}
    assert "# a: simpo fine-tune of org/m" in hub and "a Hugging Face Hub model id" in hub
    embed = render_model_card(method="gcsl-noquant-embed", base_model="org/m", config={}, **common)
    assert "```python" not in embed and "goal embedding" in embed


def test_training_raises_no_deprecation_warning_from_gcsl(prepared, tiny_llama_dir, tmp_path):
    import warnings

    import gcsl

    source = str(Path(gcsl.__file__).parent)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(prepared("gcsl-bey-nl"), tmp_path / "run", tiny_llama_dir, max_steps=1)
        _train(prepared("dpo"), tmp_path / "dpo", tiny_llama_dir, max_steps=1)
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
            if issubclass(w.category, (DeprecationWarning, FutureWarning))
            and ("is_gradient_checkpointing" in str(w.message) or w.filename.startswith(source))]
    assert ours == []


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_prefix_sharing_is_the_default_and_matches_rows(prepared, tiny_llama_dir, tmp_path, capsys, kl_coef):
    """One full-batch step: packed prefix-shared sequences and one row per sequence give the same loss,
    KL and gradient norm (dropout off, so both layouts compute the same function)."""
    data = prepared("gcsl-bey-nl")
    logs = {}
    for sharing in (True, False):
        result = _train(data, tmp_path / f"sharing-{sharing}", tiny_llama_dir, max_steps=1, per_device_batch_size=64,
                        lora_dropout=0.0, kl_coef=kl_coef, prefix_sharing=sharing)
        logs[sharing] = result.log_history[0]
    printed = capsys.readouterr().out
    row_ids = pq.read_table(data / "train.parquet", columns=["row_id"]).column("row_id").to_pylist()
    assert len(set(row_ids)) < len(row_ids)  # some feedback rows carry several goals
    assert f"prefix sharing: {len(row_ids)} rows of {len(set(row_ids))} feedback rows in 1 sequences" in printed
    packed, plain = logs[True], logs[False]
    assert packed["loss"] == pytest.approx(plain["loss"], abs=1e-4)
    assert packed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-3)
    if kl_coef:
        assert packed["kl"] == pytest.approx(plain["kl"], abs=1e-5)
    run = json.loads((tmp_path / "sharing-True" / "run.json").read_text(encoding="utf-8"))
    assert run["config"]["prefix_sharing"] is True


def test_reward_token_rows_train_and_nothing_else_in_the_embedding(token_run, tiny_llama_dir):
    model, tokenizer = token_run.model, token_run.tokenizer
    tokens = [f"[R_{k}]" for k in range(1, 6)]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    base = _base_state(tiny_llama_dir)["model.embed_tokens.weight"]
    assert min(ids) >= base.shape[0]  # new rows beyond the original vocabulary
    wrapper = model.get_input_embeddings()
    adapter = wrapper.token_adapter
    trained = adapter.trainable_tokens_delta["default"].detach()
    original = adapter.trainable_tokens_original["default"]
    assert adapter.token_indices["default"] == ids
    assert (trained - original).abs().amax(dim=1).min() > 0, "a reward-token row did not train"
    frozen = wrapper.token_adapter.base_layer.weight
    assert not frozen.requires_grad
    assert torch.equal(frozen[: base.shape[0]].detach(), base), "original vocabulary rows changed"
    assert torch.equal(frozen[ids].detach(), original), "the stored rows under the reward tokens changed"
    # The KL reference (adapter disabled) sees the untrained rows; the policy sees the trained ones.
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(wrapper(ids_t)[0], trained)
        with model.disable_adapter():
            assert torch.equal(wrapper(ids_t)[0], original)


def test_trained_reward_tokens_survive_reload(token_run):
    from gcsl.models import load_for_inference

    loaded = load_for_inference(str(token_run.out), device="cpu")
    ids = loaded.tokenizer.convert_tokens_to_ids([f"[R_{k}]" for k in range(1, 6)])
    assert ids == token_run.tokenizer.convert_tokens_to_ids([f"[R_{k}]" for k in range(1, 6)])
    trained = token_run.model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"].detach()
    assert torch.allclose(loaded.model.get_input_embeddings().weight[ids], trained)
    assert loaded.tokenizer.tokenize("x [R_5]")[-1] == "[R_5]"


def test_kl_is_zero_at_step_zero_positive_after_and_uses_no_second_model(prepared, tiny_llama_dir, tmp_path,
                                                                         monkeypatch):
    from transformers import PreTrainedModel

    from gcsl.models import load_causal_lm

    created = []
    original_init = PreTrainedModel.__init__

    def counting_init(self, *args, **kwargs):
        created.append(type(self).__name__)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "__init__", counting_init)
    load_causal_lm(str(tiny_llama_dir))
    per_model = list(created)
    created.clear()
    # SFT prompts carry no goal, so the reference (base model, goal-free prompt) starts equal to the policy.
    result = _train(prepared("sft"), tmp_path / "kl", tiny_llama_dir, kl_coef=0.05, max_steps=4)
    assert created == per_model, f"training with KL built extra models: {created}"

    logs = [h for h in result.log_history if "kl" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-9)  # LoRA B starts at zero: policy == base
    assert all(h["kl"] > 1e-6 for h in logs[1:])
    for h in logs:
        assert h["loss"] == pytest.approx(h["nll"] + 0.05 * h["kl"], rel=1e-5)

    # The reference really is the base model: with the adapter disabled, logits match a fresh load.
    ids = torch.tensor([[1, 42, 77, 3000, 12]])
    fresh = load_causal_lm(str(tiny_llama_dir))
    with torch.no_grad(), result.model.disable_adapter():
        assert torch.allclose(result.model(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(result.model(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=1e-4)


def test_scalar_goal_embedding_trains_saves_and_reloads_for_generation(prepared, tiny_llama_dir, tmp_path):
    from gcsl.goal_embedding import (
        CONFIG_NAME,
        GOAL_EMBEDDING_MODULE,
        apply_goal_embedding,
        get_goal_embedding,
        load_goal_embedding,
    )
    from gcsl.models import load_for_inference

    result = _train(prepared("gcsl-noquant-embed"), tmp_path / "embed", tiny_llama_dir, kl_coef=0.05)
    wrapper = get_goal_embedding(result.model)
    trained = wrapper.modules_to_save["default"]
    untouched = wrapper.original_module
    values = torch.tensor([1.0, 3.0, 5.0])
    with torch.no_grad():
        assert not torch.allclose(trained(values), untouched(values)), "the goal embedding did not train"
    assert json.loads((result.out / CONFIG_NAME).read_text()) == {"hidden_size": 64, "low": 1.0, "high": 5.0,
                                                                  "layers": 2}
    logs = [h for h in result.log_history if "kl" in h]
    assert all(h["kl"] > 0 for h in logs)  # the reference never gets the soft goal token, the policy always does

    loaded = load_for_inference(str(result.out), device="cpu")
    assert get_goal_embedding(loaded.model) is None
    reloaded = load_goal_embedding(loaded.model, result.out)
    assert getattr(loaded.model, GOAL_EMBEDDING_MODULE) is reloaded
    with torch.no_grad():
        assert torch.allclose(reloaded(values), trained(values), atol=1e-6)

    tok = loaded.tokenizer
    tok.padding_side = "left"
    batch = tok(["Describe item 1.", "Describe item 2 in a few words."], return_tensors="pt", padding=True)
    embeds, mask = apply_goal_embedding(loaded.model, batch.input_ids, batch.attention_mask, 4.5)
    assert embeds.shape[:2] == (2, batch.input_ids.shape[1] + 1) and mask.sum() == batch.attention_mask.sum() + 2
    out = loaded.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                pad_token_id=tok.pad_token_id)
    assert out.shape == (2, 3)

    # A merged model keeps the conditioner beside the transformer weights.
    from transformers import AutoModelForCausalLM

    from gcsl.goal_embedding import WEIGHTS_NAME
    from gcsl.training.merge import MergeConfig, merge

    merged_dir = merge(MergeConfig(model=result.out, out=tmp_path / "merged", device="cpu"))
    assert (merged_dir / WEIGHTS_NAME).is_file() and (merged_dir / CONFIG_NAME).is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    assert not any(GOAL_EMBEDDING_MODULE in k for k in merged.state_dict())
    with torch.no_grad():
        assert torch.allclose(load_goal_embedding(merged, merged_dir)(values), trained(values), atol=1e-6)


@pytest.mark.parametrize("scalar_goal", [False, True], ids=["text", "scalar-goal"])
def test_logits_loss_matches_trl_fused_loss(tiny_llama_dir, tmp_path, scalar_goal):
    """CPUs take the logits path; GPUs TRL's fused LM head. Both give the same completion-only NLL."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from gcsl.goal_embedding import GOAL_EMBEDDING_MODULE, GoalEmbeddingConfig, attach_goal_embedding
    from gcsl.training.trainer import GcslSFTTrainer, GoalValueCollator

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    data = {"prompt": [f"Describe item {i}{'!' * i}" for i in range(4)], "completion": [f" It is fine {i}." for i in range(4)]}
    collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    if scalar_goal:
        data["goal_value"] = [1.0, 2.0, 4.0, 5.0]
        attach_goal_embedding(model, GoalEmbeddingConfig(hidden_size=64, low=1.0, high=5.0))
        lora.modules_to_save = [GOAL_EMBEDDING_MODULE]
        collator = GoalValueCollator(collator)
    args = SFTConfig(output_dir=str(tmp_path), bf16=False, activation_checkpointing=False, use_cpu=True, report_to=[],
                     per_device_train_batch_size=4, remove_unused_columns=not scalar_goal)
    trainer = GcslSFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data), processing_class=tok,
                             data_collator=collator, peft_config=lora)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["attention_mask"].min() == 0  # rows of different lengths: padding is in play
    assert not trainer._fused_head
    logits_loss = trainer.compute_loss(trainer.model, dict(batch))
    trainer._fused_head = True
    fused_loss = trainer.compute_loss(trainer.model, dict(batch))
    assert logits_loss.item() == pytest.approx(fused_loss.item(), rel=1e-5)
    assert trainer._metrics["train"]["nll"][0] == pytest.approx(logits_loss.item(), rel=1e-6)


def test_insert_before_first_token_handles_left_and_right_padding():
    from gcsl.goal_embedding import insert_before_first_token

    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert insert_before_first_token(ids, mask, -1).tolist() == [[0, 0, -1, 5, 6], [-1, 7, 8, 9, 0]]
    assert insert_before_first_token(mask, mask, 1).tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]]
    embeds = torch.arange(16, dtype=torch.float32).reshape(2, 4, 2)
    goal = torch.tensor([[100.0, 101.0], [200.0, 201.0]])
    out = insert_before_first_token(embeds, mask, goal)
    assert out[0, 2].tolist() == [100.0, 101.0] and out[1, 0].tolist() == [200.0, 201.0]
    assert torch.equal(out[0, 3:], embeds[0, 2:]) and torch.equal(out[1, 1:], embeds[1])


def test_the_training_key_is_what_the_model_depends_on(tiny_llama_dir, tmp_path, bey_run, prepared):
    from gcsl.data.prepare import PrepareConfig, prepare
    from gcsl.training.train import check_same_training, recorded_training_key, training_key

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"prompt": f"Describe item {p}.", "response": f"Item {p} is {w}.",
                                       "score": (p + i) % 5 + 1}) + "\n"
                           for p in range(6) for i, w in enumerate(("fine", "great", "poor"))), encoding="utf-8")

    def prep(method: str, **options) -> Path:
        out = tmp_path / "-".join([method, *map(str, options.values())])
        if not out.exists():
            prepare(PrepareConfig(data=str(log), out=out, method=method, score_range=[1.0, 5.0], quiet=True,
                                  **options))
        return out

    def key(data: Path, out: str = "unused", **overrides) -> str:
        return training_key(_config(data, tmp_path / out, tiny_llama_dir, **overrides))

    # SFT on ratings >= 4 and BIGRec (ratings > 3) train the same rows of integer ratings the same way: one key,
    # whatever the folders, the logging or a DPO beta the SFT trainer never reads.
    sft = key(prep("sft", sft_cutoff=4.0))
    assert sft == key(prep("bigrec"), logging_steps=7, beta=0.3, out="elsewhere")
    changed = [key(prep("sft", sft_cutoff=3.0)), key(prep("sft-aug")), key(prep("gcsl-bey-nl")),
               key(prep("sft", sft_cutoff=4.0), learning_rate=2e-2), key(prep("sft", sft_cutoff=4.0), seed=1),
               key(prep("sft", sft_cutoff=4.0), init_adapter=bey_run.out)]
    assert len({sft, *changed}) == len(changed) + 1
    # Under a preference trainer the beta counts.
    assert key(prep("dpo"), beta=0.1) != key(prep("dpo"), beta=0.2)
    # A finished run's key, from its run.json, is the key of its settings; a folder without one has none.
    assert recorded_training_key(bey_run.out) == key(prepared("gcsl-bey-nl"), report_to="tensorboard")
    assert recorded_training_key(tmp_path / "unused") is None
    # A finished run checked against settings: the same training passes, another is a one-line error naming what
    # differs; a folder with nothing finished has nothing to compare.
    same = _config(prepared("gcsl-bey-nl"), tmp_path / "elsewhere", tiny_llama_dir, logging_steps=9)
    check_same_training(bey_run.out, same)
    check_same_training(tmp_path / "unused", same)
    with pytest.raises(ConfigError, match=r"trained with other settings \(learning_rate 0\.01 -> 0\.02, seed 0 -> 3\)"):
        check_same_training(bey_run.out, _config(prepared("gcsl-bey-nl"), tmp_path / "o", tiny_llama_dir,
                                                 learning_rate=2e-2, seed=3))
    with pytest.raises(ConfigError, match=r"\(other rows or another starting adapter\)"):
        check_same_training(bey_run.out, _config(prep("gcsl-bey-nl"), tmp_path / "o", tiny_llama_dir))


@pytest.mark.parametrize("loss", ["dpo", "simpo"])
def test_preference_baselines_train_on_pairs(prepared, tiny_llama_dir, tmp_path, loss):
    from gcsl.training.train import TrainConfig

    result = _train(prepared("dpo"), tmp_path / loss, tiny_llama_dir, max_steps=2, preference_loss=loss,
                    learning_rate=1e-3)
    assert result.global_step == 2 and result.method == "dpo"
    assert any("rewards/margins" in h for h in result.log_history)
    record = json.loads((result.out / "run.json").read_text())
    assert record["method"] == loss
    assert (result.out / "adapter_model.safetensors").is_file()
    with pytest.raises(ConfigError, match="kl_coef"):
        _train(prepared("dpo"), tmp_path / "kl", tiny_llama_dir, kl_coef=0.05)
    assert TrainConfig.__dataclass_fields__["preference_loss"].default == "dpo"


def test_merge_writes_a_standalone_model(token_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gcsl.models import load_for_inference
    from gcsl.training.merge import MergeConfig, merge

    out = tmp_path / "merged"
    assert cli_main(["merge", "--model", str(token_run.out), "--out", str(out), "--device", "cpu"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert (out / "goals.json").read_text() == (token_run.out / "goals.json").read_text()
    assert json.loads((out / "run.json").read_text())["stage"] == "merge"
    assert not (out / "adapter_config.json").exists()
    from gcsl.training.card import read_card_metadata

    card, adapter_card = (out / "README.md").read_text(), (token_run.out / "README.md").read_text()
    assert read_card_metadata(card) == {**read_card_metadata(adapter_card), "library_name": "transformers"}
    assert f"AutoModelForCausalLM.from_pretrained({str(out.resolve())!r})" in card
    assert card.endswith(adapter_card.split("\n---\n", 1)[1])  # the training sections as they were
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer("Describe item 3.\n\n[R_5]", return_tensors="pt").input_ids
    assert tokenizer.convert_tokens_to_ids("[R_5]") in ids[0].tolist()
    reference = load_for_inference(str(token_run.out), device="cpu").model
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(StageError, match="exists"):
        merge(MergeConfig(model=token_run.out, out=out, device="cpu"))


def test_bad_options_fail_with_one_line(tmp_path, capsys, prepared, tiny_llama_dir, token_run):
    from gcsl.training.train import TrainConfig

    with pytest.raises(ConfigError) as err:
        resolve_config(TrainConfig, overrides={"data": "d", "out": "o", "lora_r": 0, "lora_dropout": 1.5,
                                               "resume": True, "overwrite": True})
    message = str(err.value)
    assert "\n" not in message and "lora_r" in message and "lora_dropout" in message and "resume" in message

    assert cli_main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.count("\n") == 0 and "not a prepared data directory" in printed

    with pytest.raises(DataError, match="chosen"):  # DPO options on SFT data: the data says which method
        (tmp_path / "fake").mkdir()
        goals = json.loads((prepared("gcsl") / "goals.json").read_text())
        (tmp_path / "fake" / "goals.json").write_text(json.dumps({**goals, "method": "dpo"}))
        (tmp_path / "fake" / "train.parquet").write_bytes((prepared("gcsl") / "train.parquet").read_bytes())
        _train(tmp_path / "fake", tmp_path / "x", tiny_llama_dir)
    with pytest.raises(ConfigError, match="preference_loss"):
        _train(prepared("gcsl"), tmp_path / "y", tiny_llama_dir, preference_loss="simpo")
    with pytest.raises(StageError, match="exists and is not empty"):
        _train(prepared("gcsl"), token_run.out, tiny_llama_dir)
    with pytest.raises(StageError, match="no complete checkpoint"):
        _train(prepared("gcsl"), tmp_path / "never-started", tiny_llama_dir, resume=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_real_smollm2_trains_a_few_steps(prepared, tmp_path):
    result = _train(prepared("gcsl-bey-nl"), tmp_path / "smollm2", "smollm2-135m-instruct", max_steps=3,
                    per_device_batch_size=2, learning_rate=1e-4)
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert (result.out / "adapter_model.safetensors").is_file()
    assert json.loads((result.out / "run.json").read_text())["precision"] in ("fp32", "bf16", "fp16")
    # Plain peft cannot resolve gcsl's built-in name: the adapter names the converted folder instead.
    base = json.loads((result.out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base != "smollm2-135m-instruct" and Path(base).is_dir() and (Path(base) / "config.json").is_file()
    assert f"names the base model as `{base}`" in (result.out / "README.md").read_text()


def test_bf16_precision_trains_on_a_cpu_and_generates_at_bf16(prepared, tiny_llama_dir, tmp_path):
    """`precision: bf16` and `dtype: bf16` are CPU options too (fast on CPUs with AVX512-BF16 / AMX)."""
    from gcsl.config import resolve_config
    from gcsl.generation.generate import GenerateConfig, generate

    result = _train(prepared("sft"), tmp_path / "bf16", tiny_llama_dir, precision="bf16")
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert json.loads((result.out / "run.json").read_text())["precision"] == "bf16"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "Rate this film."}) + "\n")
    gens = generate(resolve_config(GenerateConfig, overrides={
        "model": str(result.out), "prompts": str(prompts), "out": tmp_path / "g.jsonl", "max_new_tokens": 3,
        "dtype": "bf16", "device": "cpu"}))
    record = json.loads(gens.with_name("g.jsonl.run.json").read_text())
    assert record["dtype"] == "bfloat16" and record["config"]["dtype"] == "bf16"
    assert len(gens.read_text().splitlines()) == 1
