"""`gcsl train`: LoRA fine-tuning on prepared data with transformers / TRL / PEFT / accelerate.

One workflow, :func:`train`, read top to bottom. Every method of ``gcsl prepare`` goes through
the same path: SFT, SFT-aug and all GCSL variants train with completion-only loss through
:class:`~gcsl.training.trainer.GcslSFTTrainer` (TRL's ``SFTTrainer`` plus the KL penalty and the
scalar-goal conditioner); DPO pairs train with TRL's ``DPOTrainer``, or its ``CPOTrainer`` with
``loss_type="simpo"`` for ``--preference-loss simpo``, or
:class:`~gcsl.training.preference.AlphaDPOTrainer` (a ``DPOTrainer`` with AlphaDPO's loss) for
``--preference-loss alphadpo``.

Outputs and resuming. Training runs in ``OUT.partial/`` (checkpoints in
``OUT.partial/checkpoints/checkpoint-<step>``, TensorBoard logs in ``OUT.partial/logs``). Only a
finished run is renamed to ``OUT``, so a folder named ``OUT`` is always complete. ``--resume``
continues from the newest *complete* checkpoint in ``OUT.partial`` (one whose
``trainer_state.json``, written last, is whole; half-written newer ones are removed), restoring
model, optimizer, scheduler and RNG states, and refuses settings that differ from the
interrupted run's (run length and logging may change). Under a multi-process launcher only the main
process writes anything beyond what the Trainer itself writes.

Precision comes from the hardware (``--precision auto``): bf16 weights with bf16 autocast on
Ampere or newer GPUs, fp32 weights with fp16 autocast on older GPUs, plain fp32 on CPUs, where
gradient checkpointing is off too (TRL's own defaults, bf16 and checkpointing, make a CPU step
more than ten times slower).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, Literal

from gcsl.config import config_to_dict, field
from gcsl.errors import ConfigError, DataError, StageError
from gcsl.goals import GoalSetup
from gcsl.methods import METHODS, SMOOTHING_COLUMN, get_method
from gcsl.models import DEFAULT_MODEL
from gcsl.runinfo import atomic_write_json, atomic_write_text, write_run_record
from gcsl.stages import ModelFolder

__all__ = ["TrainConfig", "TrainResult", "train", "seconds_before", "training_clock", "training_key",
           "recorded_training_key", "check_same_training"]

# Names kept for importers from before the method table (gcsl.methods); this module reads the table.
EMBED_METHOD = next(m.name for m in METHODS.values() if m.trainer == "embed")
PREFERENCE_METHODS = tuple(m.name for m in METHODS.values() if m.trainer == "preference")
TOKEN_METHODS = tuple(m.name for m in METHODS.values() if m.goal_input == "token")
# The prepared goal-free prompt, in the form of ``prompt``: what the KL reference conditions on.
REFERENCE_COLUMN = "reference_prompt"
# Fields that change only how long or how verbosely a run goes; a resumed run may change them.
_RESUMABLE_CHANGES = {"epochs", "max_steps", "logging_steps", "save_steps", "save_total_limit", "keep_checkpoints",
                      "report_to", "resume", "overwrite"}


@dataclass
class TrainConfig:
    data: Path = field(help="prepared data directory (train.parquet + goals.json from `gcsl prepare`)")
    out: Path = field(help="output directory for the adapter, tokenizer, goals.json, run.json and model card")
    model: str = field(DEFAULT_MODEL, help="base model: a built-in name, a local folder or a hub id")
    lora_r: int = field(13, help="LoRA rank (paper: 13)")
    lora_alpha: float = field(32, help="LoRA alpha (paper: 32)")
    lora_dropout: float = field(0.05, help="LoRA dropout (paper: 0.05)")
    lora_target_modules: str = field("all-linear", help="modules that get LoRA: all-linear or a comma-separated "
                                                        "list such as q_proj,v_proj")
    learning_rate: float = field(1e-4, help="peak learning rate; the paper tuned 1e-7..1e-5 on a 4B model, 1e-4 "
                                            "lets a LoRA adapter move in short CPU runs")
    optimizer: Literal["adamw", "adafactor", "sgd"] = field("adamw", help="optimizer (adamw with weight decay 0 "
                                                                          "is the paper's Adam)")
    weight_decay: float = field(0.0, help="decoupled weight decay")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = field(
        "linear", help="learning-rate schedule")
    warmup_ratio: float = field(0.0, help="fraction of steps spent warming up the learning rate")
    epochs: float = field(1.0, help="passes over the training data")
    max_steps: int = field(-1, help="optimizer steps to run; > 0 overrides --epochs")
    per_device_batch_size: int = field(8, help="sequences per device per step")
    gradient_accumulation_steps: int = field(1, help="micro-batches accumulated per optimizer step")
    max_length: int = field(1024, help="longest tokenized prompt + completion; longer ones are cut at the end")
    prefix_sharing: bool = field(True, help="pack each feedback row's goal variants into one sequence holding the "
                                            "prompt once, several rows per sequence (exact; needs eager or sdpa "
                                            "attention, else each row trains alone with a notice); a batch is "
                                            "then per_device_batch_size packed sequences")
    pack_tokens: int | None = field(None, help="token budget of a packed sequence (default: max_length)")
    kl_coef: float = field(0.0, help="weight of the KL penalty to the base model (adapter disabled) given the "
                                     "goal-free prompt; the paper uses 0.05 for non-toxic generation")
    entropy_coef: float = field(0.0, help="weight of the entropy bonus: the loss minus this times the policy's mean "
                                          "next-token entropy over completion tokens (Quark uses 0.06)")
    goal_token_lr: float | None = field(None, help="gcsl / gcsl-bey: learning rate of the reward-token embedding "
                                                   "rows (default: --learning-rate); they start from the embedding "
                                                   "of their level's name and may need a larger step to separate")
    preference_loss: Literal["dpo", "simpo", "alphadpo", "rosepo"] = field(
        "dpo", help="loss for DPO-prepared pairs: dpo (DPOTrainer), simpo (CPOTrainer, loss_type=simpo), "
                    "alphadpo (AlphaDPO, Wu et al. 2025: SimPO's length-normalised loss with an adaptive per-pair "
                    "margin from the policy-vs-reference log-ratio; needs the reference, the base model) or rosepo "
                    "(DPO with a per-pair label smoothing read from the prepared data's smoothing column, as the "
                    "rosepo recipe writes it)")
    beta: float | None = field(None, help="preference loss beta (default: 0.1 for DPO, 2.0 for SimPO, 2.5 for "
                                          "AlphaDPO)")
    simpo_gamma: float = field(0.5, help="SimPO target reward margin")
    alphadpo_gamma: float | None = field(None, help="alphadpo: target reward margin gamma, in reward units "
                                                    "(default 1.5 = beta 2.5 x 0.6)")
    alphadpo_alpha: float | None = field(None, help="alphadpo: weight alpha >= 0 of the adaptive margin alpha * beta "
                                                    "* M*, M* the pair's normalised log-ratio gap to the reference "
                                                    "(default 0.2; 0 is SimPO's loss)")
    goal_embedding_layers: int = field(2, help="gcsl-noquant-embed: 1 = Linear(1, hidden), 2 = two-layer MLP")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field("auto", help="auto: bf16 on Ampere+ GPUs, fp16 "
                                                                            "autocast on older GPUs, fp32 on CPU; "
                                                                            "bf16 runs on CPUs too, faster on "
                                                                            "ones with AVX512-BF16 or AMX")
    gradient_checkpointing: bool | None = field(None, help="recompute activations to save memory (default: on "
                                                           "GPUs, off on CPUs)")
    seed: int = field(0, help="random seed (adapter init, data order, dropout)")
    deterministic: bool = field(False, help="use deterministic algorithms (slower; for bit-for-bit reruns)")
    logging_steps: int = field(10, help="log loss and metrics every N steps")
    save_steps: int = field(100, help="write a resumable checkpoint every N steps")
    save_total_limit: int = field(2, help="checkpoints kept during training")
    keep_checkpoints: bool = field(False, help="keep OUT/checkpoints after training finishes")
    report_to: str = field("tensorboard", help="loggers: tensorboard (into OUT/logs), none, or a comma-separated "
                                               "list of transformers integrations")
    init_adapter: Path | None = field(None, help="a `gcsl train` output folder whose LoRA adapter weights this run "
                                                 "starts from instead of a fresh adapter (same base model and LoRA "
                                                 "settings; the optimizer and schedule start afresh), e.g. the "
                                                 "previous round of an online loop")
    resume: bool = field(False, help="continue an interrupted run from the last complete checkpoint in OUT.partial")
    overwrite: bool = field(False, help="replace an existing OUT (or discard an unfinished OUT.partial)")

    def validate(self) -> list[str]:
        problems = []
        positive = ("lora_r", "lora_alpha", "learning_rate", "epochs", "per_device_batch_size",
                    "gradient_accumulation_steps", "max_length", "logging_steps", "save_steps", "save_total_limit")
        for name in positive:
            if not getattr(self, name) > 0:
                problems.append(f"{name}: must be positive, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        for name in ("kl_coef", "entropy_coef", "weight_decay", "simpo_gamma", "alphadpo_alpha", "alphadpo_gamma"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < math.inf:
                problems.append(f"{name}: must be >= 0 and finite, got {value}")
        for name in ("alphadpo_alpha", "alphadpo_gamma"):
            if getattr(self, name) is not None and self.preference_loss != "alphadpo":
                problems.append(f"{name}: only --preference-loss alphadpo uses it (got {self.preference_loss}); "
                                f"drop --{name.replace('_', '-')}")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"max_steps: must be positive (or -1 to use --epochs), got {self.max_steps}")
        if self.beta is not None and self.beta <= 0:
            problems.append(f"beta: must be positive, got {self.beta}")
        if self.goal_token_lr is not None and not self.goal_token_lr > 0:
            problems.append(f"goal_token_lr: must be positive, got {self.goal_token_lr}")
        if self.goal_embedding_layers not in (1, 2):
            problems.append(f"goal_embedding_layers: must be 1 or 2, got {self.goal_embedding_layers}")
        if not self.lora_target_modules.strip():
            problems.append("lora_target_modules: give all-linear or module names such as q_proj,v_proj")
        if self.pack_tokens is not None and self.pack_tokens < self.max_length:
            problems.append(f"pack_tokens: must be >= max_length ({self.max_length}) so every row fits, "
                            f"got {self.pack_tokens}")
        if self.resume and self.overwrite:
            problems.append("resume/overwrite: choose one (--resume continues OUT.partial, --overwrite discards it)")
        if Path(self.out).name.endswith(".partial"):
            problems.append(f"out: {self.out} ends in .partial, which names unfinished runs; choose another name")
        if self.init_adapter is not None and not (Path(self.init_adapter) / "adapter_config.json").is_file():
            problems.append(f"init_adapter: {self.init_adapter} holds no adapter_config.json; give a `gcsl train` "
                            "output folder")
        return problems


@dataclass
class TrainResult:
    """What a finished run produced: the output folder and its headline numbers."""

    out: Path
    method: str
    global_step: int
    train_loss: float  # the last logged training loss
    log_history: list[dict[str, Any]] = dc_field(default_factory=list)
    model: Any = dc_field(default=None, repr=False)  # the trained PeftModel, for in-process use
    tokenizer: Any = dc_field(default=None, repr=False)


@dataclass(frozen=True)
class _Prepared:
    data_dir: Path
    goals: GoalSetup
    method: str
    columns: tuple[str, ...]
    rows: int


@dataclass(frozen=True)
class _Precision:
    name: str
    dtype: Any
    bf16: bool
    fp16: bool
    gradient_checkpointing: bool


def train(cfg: TrainConfig, *, callbacks: list | None = None) -> TrainResult:
    """Fine-tunes ``cfg.model`` with LoRA on the prepared data in ``cfg.data``; writes ``cfg.out``.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects (progress, timing) for callers
    that run training in-process.

    >>> train(TrainConfig(data=Path("prep/gcsl-bey-nl"), out=Path("runs/gcsl-bey-nl")))  # doctest: +SKIP
    TrainResult(out=PosixPath('runs/gcsl-bey-nl'), method='gcsl-bey-nl', global_step=..., ...)
    """
    from accelerate import PartialState

    # 1. Validate everything before any process writes anything.
    # Under accelerate/torchrun this joins the process group; CPU-only ranks need cpu=True to get gloo.
    state = PartialState(cpu=cpu_only())
    prepared = _read_prepared(Path(cfg.data))
    method = prepared.method
    _check_method_options(cfg, method, state, prepared.columns)
    work = ModelFolder(cfg.out).partial
    checkpoint = _check_outputs(cfg, work)
    state.wait_for_everyone()
    if state.is_main_process:
        _prepare_work_dir(cfg, work, checkpoint, prepared)
    state.wait_for_everyone()

    # 2-4. Trainer arguments, tokenizer and model, data and the trainer.
    built = _build_trainer(cfg, prepared, state, work, callbacks)
    trainer = built.trainer
    if cfg.init_adapter is not None:
        _load_init_adapter(trainer.model, Path(cfg.init_adapter))

    # 5. Train (resuming restores model, optimizer, scheduler and RNG states). Training time adds
    # up over sittings: each checkpoint records the seconds spent up to it.
    before = seconds_before(checkpoint)
    started = time.perf_counter()
    trainer.add_callback(training_clock(started, before or 0.0))
    from gcsl.models import library_deprecations_silenced

    with library_deprecations_silenced():  # TRL's DPOTrainer reads a deprecated name while it trains
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = (before or 0.0) + time.perf_counter() - started
    trainer.save_model(str(work))  # every rank takes part (FSDP/DeepSpeed gather); the main one writes

    # 6. The main process completes the folder and renames it into place.
    metrics = {"global_step": trainer.state.global_step, "train_loss": _final_loss(trainer, output),
               **_throughput(cfg, built, trainer, seconds, state.num_processes)}
    if before is None:  # resumed from a checkpoint that does not record its time: this sitting's only
        metrics["train_seconds_from_step"] = int(checkpoint.name.split("-")[1])
    if state.is_main_process:
        print(_throughput_line(cfg, metrics, state.num_processes), flush=True)
        _finish(cfg, work, prepared, trainer, metrics, built.precision, built.base_path, checkpoint,
                state.num_processes)
    state.wait_for_everyone()
    return TrainResult(out=Path(cfg.out), method=method, global_step=metrics["global_step"],
                       train_loss=metrics["train_loss"], log_history=list(trainer.state.log_history),
                       model=trainer.model, tokenizer=built.tokenizer)


@dataclass(frozen=True)
class _Built:
    trainer: Any
    tokenizer: Any
    precision: _Precision
    base_path: str
    train_rows: int  # training rows (goal variants) after tokenization and truncation
    sequences: int  # sequences a batch is made of: packed sequences, else the rows themselves


def _build_trainer(cfg: TrainConfig, prepared: _Prepared, state, work: Path, callbacks: list | None = None) -> _Built:
    """The trainer of a validated run, everything set up as :func:`train` uses it; nothing is written."""
    from peft import LoraConfig
    from transformers import set_seed

    from gcsl.models import load_causal_lm, load_tokenizer, resolve_model_path

    method = prepared.method
    kind = get_method(method)
    # 2. Trainer arguments first: under DeepSpeed ZeRO-3 they make from_pretrained shard at load.
    precision = resolve_precision(cfg)
    args = _trainer_config(cfg, method, _trainer_arguments(cfg, work, precision))

    # 3. Tokenizer (plus reward tokens), model at the hardware's precision, LoRA config.
    set_seed(cfg.seed)
    base_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    goal_token_ids = _add_goal_tokens(tokenizer, prepared.goals.special_tokens)
    model = load_causal_lm(cfg.model, dtype=precision.dtype)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    _init_goal_token_rows(model, tokenizer, prepared.goals.special_tokens, goal_token_ids)
    modules_to_save = None
    if kind.trainer == "embed":
        from gcsl.goal_embedding import GOAL_EMBEDDING_MODULE, attach_goal_embedding

        attach_goal_embedding(model, _goal_embedding_config(cfg, model, prepared))
        modules_to_save = [GOAL_EMBEDDING_MODULE]
    lora = LoraConfig(
        **lora_settings(cfg),
        # Reward tokens train as embedding rows of their own while every other row stays frozen.
        trainable_token_indices={"embed_tokens": goal_token_ids} if goal_token_ids else None,
        modules_to_save=modules_to_save,
    )

    # 4. Data and trainer. The batch layout (packed or one row per sequence) is chosen in one place: _batches.
    dataset = _load_dataset(prepared, reference=_needs_reference(cfg, method))
    with state.main_process_first():  # the main process fills the datasets cache, the others read it
        dataset, collator, packed_rows = _batches(cfg, method, dataset, model, tokenizer, args, state)
    callbacks = _callbacks(cfg, work) + list(callbacks or [])
    if kind.trainer == "preference":
        from gcsl.models import library_deprecations_silenced

        trainer_cls = _preference_trainer_class(cfg)
        with library_deprecations_silenced():  # the trainer wraps the model with peft here
            trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                  peft_config=lora, callbacks=callbacks)
    else:
        from gcsl.training.trainer import GcslSFTTrainer

        trainer = GcslSFTTrainer(model=model, args=args, data_collator=collator,
                                 train_dataset=dataset, processing_class=tokenizer, peft_config=lora,
                                 callbacks=callbacks, kl_coef=cfg.kl_coef, entropy_coef=cfg.entropy_coef,
                                 goal_token_lr=cfg.goal_token_lr)
    sequences = len(trainer.train_dataset)  # after the trainer's own preparation (it drops empty rows)
    return _Built(trainer=trainer, tokenizer=tokenizer, precision=precision, base_path=base_path,
                  train_rows=sequences if packed_rows is None else packed_rows, sequences=sequences)


def _load_init_adapter(model, folder: Path) -> None:
    """Starts the fresh adapter of ``model`` (a PeftModel) from the weights saved in ``folder``.

    Every saved tensor must land on one of the model's: an adapter of other LoRA settings or
    another base is an error, not a silent partial load. A resumed run's checkpoint overrides
    these weights afterwards, as it should.
    """
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    try:
        weights = load_peft_weights(str(folder), device="cpu")
        result = set_peft_model_state_dict(model, weights)
    except (OSError, ValueError, RuntimeError) as exc:
        raise StageError(f"init_adapter: cannot load the adapter in {folder} ({exc}); it must come from `gcsl "
                         "train` on the same base model with the same LoRA settings") from None
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    # A tied LM head's reward-token rows are saved twice (its copy of the embedding's trainable-tokens delta);
    # the model holds them once, so that copy is loaded with the embedding's.
    deltas = [v for k, v in weights.items() if k.endswith("trainable_tokens_delta") and k not in unexpected]
    unexpected = [k for k in unexpected if not (k.endswith("trainable_tokens_delta")
                                                and any(weights[k].equal(v) for v in deltas))]
    if unexpected:
        raise StageError(f"init_adapter: {len(unexpected)} tensor(s) of {folder} fit no module of this run's "
                         f"adapter (e.g. {unexpected[0]}); train with the same LoRA settings")


# -- validation ------------------------------------------------------------------------------

def _read_prepared(data_dir: Path) -> _Prepared:
    import pyarrow.parquet as pq

    from gcsl.methods import trained_methods

    parquet, goals_file = data_dir / "train.parquet", data_dir / "goals.json"
    for path in (parquet, goals_file):
        if not path.is_file():
            raise DataError(f"{data_dir}: not a prepared data directory ({path.name} is missing); "
                            f"run `gcsl prepare --out {data_dir}` first")
    try:
        goals = GoalSetup.load(goals_file)
    except StageError as exc:
        raise DataError(str(exc)) from None
    method = goals.method
    if method not in trained_methods():
        raise DataError(f"{goals_file}: method {method!r} is not one of {', '.join(trained_methods())}; "
                        "re-run `gcsl prepare`")
    kind = get_method(method)
    try:
        handle = pq.ParquetFile(parquet)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise DataError(f"{parquet}: cannot read it as Parquet ({exc}); re-run `gcsl prepare`") from None
    columns = tuple(handle.schema_arrow.names)
    rows = handle.metadata.num_rows
    needed = kind.columns
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{parquet}: column(s) {', '.join(missing)} missing for method {method}; "
                        "re-run `gcsl prepare` with this method")
    if rows == 0:
        raise DataError(f"{parquet}: no training rows; check the feedback log and `gcsl prepare`'s report")
    table = handle.read(columns=list(needed))
    for name in needed:
        nulls = table.column(name).null_count
        if nulls:
            raise DataError(f"{parquet}: column {name} has {nulls} empty value(s); re-run `gcsl prepare`")
    if "goal_value" in needed:
        import numpy as np

        values = table.column("goal_value").to_numpy()
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise DataError(f"{parquet}: row {int(bad[0])}: goal_value is not a finite number; re-run `gcsl prepare`")
    # row_id groups a feedback row's goal variants for prefix sharing (older prepared data lacks it).
    available = columns
    pairs = kind.trainer == "preference"
    columns = (*needed, "row_id") if "row_id" in available and not pairs else needed
    if pairs and SMOOTHING_COLUMN in available:
        columns = (*columns, SMOOTHING_COLUMN)  # RosePO's per-pair smoothing (read only by --preference-loss rosepo)
    if REFERENCE_COLUMN in available and not pairs:
        columns = (*columns, REFERENCE_COLUMN)  # loaded only when the KL reference needs it
    return _Prepared(data_dir=data_dir, goals=goals, method=method, columns=columns, rows=rows)


def _check_method_options(cfg: TrainConfig, method: str, state, columns: tuple[str, ...] = ()) -> None:
    from accelerate.utils import DistributedType

    if _needs_reference(cfg, method) and REFERENCE_COLUMN not in columns:
        raise DataError(f"{cfg.data}: train.parquet has no {REFERENCE_COLUMN} column, the goal-free prompts the KL "
                        "reference conditions on; re-run `gcsl prepare`")
    problems = []
    kind = get_method(method)
    sharded = state.distributed_type == DistributedType.FSDP or (
        state.distributed_type == DistributedType.DEEPSPEED and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")
    if kind.trainer == "embed" and sharded:
        problems.append(f"method: {method} computes its goal embedding outside the sharded forward; "
                        "launch it with DDP (configs/accelerate/multi_gpu_ddp.yaml) or ZeRO-2")
    if kind.trainer == "preference" and cfg.kl_coef:
        problems.append("kl_coef: preference losses carry their own reference term; leave --kl-coef at 0 for DPO data")
    if kind.trainer == "preference" and cfg.entropy_coef:
        problems.append("entropy_coef: only the SFT/GCSL loss takes the entropy bonus; leave --entropy-coef at 0 for "
                        "DPO data")
    if cfg.goal_token_lr is not None and kind.goal_input != "token":
        from gcsl.methods import METHODS as table  # read now: the table may have grown since import

        tokens = [m.name for m in table.values() if m.goal_input == "token"]
        problems.append(f"goal_token_lr: {method} has no reward tokens (only {' and '.join(tokens)} do); "
                        "drop --goal-token-lr")
    if kind.trainer != "preference" and cfg.preference_loss != "dpo":
        problems.append(f"preference_loss: {cfg.preference_loss} needs DPO pairs, but {cfg.data} was prepared "
                        f"for {method}; run `gcsl prepare --method dpo`")
    elif cfg.preference_loss == "rosepo" and SMOOTHING_COLUMN not in columns:
        problems.append(f"preference_loss: rosepo reads each pair's {SMOOTHING_COLUMN} column, which {cfg.data} "
                        "lacks; prepare the pairs with the rosepo recipe (`gcsl experiment`, method rosepo) or use "
                        "--preference-loss dpo")
    if problems:
        raise ConfigError("invalid TrainConfig: " + "; ".join(problems))


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _RESUMABLE_CHANGES}


def _check_outputs(cfg: TrainConfig, work: Path) -> Path | None:
    """Read-only checks of OUT and OUT.partial; the checkpoint to resume from, if any."""
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        if cfg.resume:
            raise StageError(f"{out}: holds a finished run, so there is nothing to resume; drop --resume and pass "
                             "--overwrite to train again, or choose another --out")
        raise StageError(f"{out}: output directory exists and is not empty; pass --overwrite or choose another --out")
    if not cfg.resume:
        if work.exists() and not cfg.overwrite:
            raise StageError(f"{work}: an unfinished run is here; pass --resume to continue it or --overwrite to "
                             "start over")
        return None
    checkpoint = ModelFolder(cfg.out).last_checkpoint
    if checkpoint is None:
        raise StageError(f"{work}: no complete checkpoint to resume from; run again without --resume")
    record = work / "run.json"
    if record.is_file():
        try:
            before = _identity(json.loads(record.read_text(encoding="utf-8")).get("config", {}))
        except ValueError:
            before = None
        now = _identity(config_to_dict(cfg))
        if before is not None:
            # An option the interrupted run's record lacks was added since; its default is what that run did.
            defaults = _identity(config_to_dict(TrainConfig(data=cfg.data, out=cfg.out)))
            before = {**{k: defaults.get(k) for k in now if k not in before}, **before}
            changed = sorted(k for k in now if before.get(k) != now[k])
            if changed:
                raise ConfigError(f"{record}: --resume needs the interrupted run's settings, but {', '.join(changed)} "
                                  f"differ (was: {', '.join(f'{k}={before.get(k)!r}' for k in changed)})")
    return checkpoint


def _prepare_work_dir(cfg: TrainConfig, work: Path, checkpoint: Path | None, prepared: _Prepared) -> None:
    if checkpoint is None:
        if work.exists():
            shutil.rmtree(work)
        (work / "checkpoints").mkdir(parents=True)
    else:
        # Half-written checkpoints newer than the resume point would confuse checkpoint rotation.
        step = int(checkpoint.name.split("-")[1])
        for child in (work / "checkpoints").iterdir():
            match = re.fullmatch(r"checkpoint-(\d+)", child.name)
            if match and int(match.group(1)) > step:
                shutil.rmtree(child)
    write_run_record(work, stage="train", config=cfg, seed=cfg.seed, goals=prepared.goals.to_json(),
                     extra={"status": "running", "method": prepared.method})


# -- model and data --------------------------------------------------------------------------

def lora_settings(cfg: Any) -> dict[str, Any]:
    """The LoRA options every trainer of the package shares (rank, alpha, dropout, target modules).

    >>> from types import SimpleNamespace
    >>> lora_settings(SimpleNamespace(lora_r=13, lora_alpha=32, lora_dropout=0.05, lora_target_modules="q_proj, v_proj"))
    {'r': 13, 'lora_alpha': 32, 'lora_dropout': 0.05, 'task_type': 'CAUSAL_LM', 'target_modules': ['q_proj', 'v_proj']}
    """
    targets = cfg.lora_target_modules.strip()
    return {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "task_type": "CAUSAL_LM",
            "target_modules": targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]}


def cpu_only() -> bool:
    import torch

    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or (xpu is not None and xpu.is_available())
                or torch.backends.mps.is_available())


def resolve_precision(cfg: TrainConfig) -> _Precision:
    import torch

    from gcsl.models import choose_dtype

    on_gpu = torch.cuda.is_available()
    name = cfg.precision
    if name == "auto":
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
            choose_dtype("cuda" if on_gpu else "cpu")]
    checkpointing = on_gpu if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    # fp16 keeps fp32 weights under fp16 autocast: trainable rows stored in fp16 cannot be unscaled.
    dtype = torch.bfloat16 if name == "bf16" else torch.float32
    return _Precision(name=name, dtype=dtype, bf16=name == "bf16", fp16=name == "fp16",
                      gradient_checkpointing=checkpointing)


def _needs_reference(cfg: TrainConfig, method: str) -> bool:
    """Whether the KL reference needs inputs of its own: the prompts carry a goal (text or a reward token).

    Methods without a goal in the prompt (SFT, SFT-aug, scalar goals, whose soft token the
    reference simply does not get) compute the reference on the batch itself.
    """
    return cfg.kl_coef > 0 and get_method(method).goal_input in ("token", "text")


def _goal_token_text(token: str) -> str:
    """The text whose embedding a reward token starts from: the level it names.

    A multi-aspect token names its aspect first, so aspects' tokens of one level start apart too.

    >>> _goal_token_text("[R_3]"), _goal_token_text("[R_3+]"), _goal_token_text("[A2_R_3+]")
    (' level 3', ' at least level 3', ' aspect 2 at least level 3')
    """
    match = re.fullmatch(r"\[(?:A(\d+)_)?R_(\d+)(\+?)\]", token)
    if match is None:  # another special-token spelling: its own words
        return " " + token.strip("[]<>|").replace("_", " ")
    aspect, level, beyond = match.groups()
    text = f" at least level {level}" if beyond else f" level {level}"
    return f" aspect {aspect}{text}" if aspect else text


def _init_goal_token_rows(model, tokenizer, tokens: list[str], ids: list[int]) -> None:
    """Starts each reward token's embedding row at the mean embedding of its :func:`_goal_token_text`.

    ``resize_token_embeddings`` gives every new row (nearly) the same mean vector, and single
    rows trained at a LoRA learning rate barely move, so [R_1] .. [R_K] would stay almost
    indistinguishable. Started from " level k" (or " at least level k") they differ by their
    number from the first step. An untied LM head gets its rows the same way from its own
    matrix; a tied one is the input matrix. Called before PEFT wraps the model: its trainable-token
    rows start as copies of these (and the KL reference, adapter disabled, sees these too).
    """
    import torch

    if not tokens:
        return
    inputs = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    weights = [inputs] if head is None or head.weight is inputs else [inputs, head.weight]
    with torch.no_grad(), _gathered(weights):
        for token, token_id in zip(tokens, ids):
            text_ids = tokenizer.encode(_goal_token_text(token), add_special_tokens=False)
            for weight in weights:
                weight[token_id] = weight[text_ids].float().mean(0).to(weight.dtype)


def _gathered(weights: list):
    """Under DeepSpeed ZeRO-3 the weights are sharded: gather them whole to edit rows (rank 0's edit wins)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(weights, modifier_rank=0)


def _add_goal_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Adds the reward tokens as special tokens (never split); returns their ids."""
    if not tokens:
        return []
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    for token, token_id in zip(tokens, ids):
        if tokenizer.encode(token, add_special_tokens=False) != [token_id]:
            raise StageError(f"goal token {token!r} does not tokenize to a single token; use other special_tokens")
    return list(ids)


def _goal_embedding_config(cfg: TrainConfig, model, prepared: _Prepared):
    import pyarrow.parquet as pq

    from gcsl.goal_embedding import GoalEmbeddingConfig

    low, high = prepared.goals.metric.low, prepared.goals.metric.high
    if low is None or high is None or not high > low:
        values = pq.read_table(prepared.data_dir / "train.parquet", columns=["goal_value"]).column("goal_value")
        low, high = float(values.to_numpy().min()), float(values.to_numpy().max())
        if not high > low:
            high = low + 1.0  # a single distinct value: any non-empty range maps it to -1
    return GoalEmbeddingConfig(hidden_size=model.get_input_embeddings().weight.shape[1], low=float(low),
                               high=float(high), layers=cfg.goal_embedding_layers)


def _load_dataset(prepared: _Prepared, reference: bool = False):
    from datasets import Dataset

    columns = [c for c in prepared.columns if reference or c != REFERENCE_COLUMN]
    return Dataset.from_parquet(str(prepared.data_dir / "train.parquet"), columns=columns)


def _batches(cfg: TrainConfig, method: str, dataset, model, tokenizer, args, state):
    """The training rows, their collator and, when packed, how many rows the sequences hold.

    Prefix-shared packed sequences where they apply, else TRL's rows. Packing applies to
    prompt-completion methods (not DPO pairs, not scalar goals, whose soft token goes before each
    row) when the model's attention takes a block mask. The packed rows are tokenized here exactly
    as TRL would, so TRL's own preparation is skipped; so are rows that carry the KL reference's
    inputs (goal-free prompt + the same completion ids), built only when the KL needs them.
    """
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from gcsl.training.packing import (
        PrefixSharingCollator,
        pack_prefix_shared,
        prefix_sharing_notice,
        tokenize_rows,
    )
    from gcsl.training.trainer import GoalValueCollator, ReferenceCollator

    kind = get_method(method)
    if kind.trainer == "preference":
        return dataset, None, None  # the preference trainers bring their own collators and padding
    reference = REFERENCE_COLUMN if _needs_reference(cfg, method) else None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.prefix_sharing and kind.trainer != "embed":
        notice = prefix_sharing_notice(model)
        if notice is None:
            packed = pack_prefix_shared(dataset, tokenizer, max_tokens=cfg.pack_tokens or cfg.max_length,
                                        max_length=cfg.max_length,
                                        group_column="row_id" if "row_id" in dataset.column_names else None,
                                        reference_column=reference)
            if state.is_main_process:
                print(packed.summary(), flush=True)
            args.remove_unused_columns = False  # the collator needs position, segment and block ids
            args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
            return packed.dataset, PrefixSharingCollator.for_model(model, tokenizer.pad_token_id), packed.rows
        if state.is_main_process:
            print(notice, flush=True)
    if "row_id" in dataset.column_names:
        dataset = dataset.remove_columns("row_id")
    pad = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    if reference is not None:
        args.remove_unused_columns = False  # the collator needs the reference's ids
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        rows = tokenize_rows(dataset, tokenizer, max_length=cfg.max_length, reference_column=reference)
        return rows, ReferenceCollator(pad), None
    return dataset, (GoalValueCollator(pad) if kind.trainer == "embed" else pad), None


def _trainer_arguments(cfg: TrainConfig, work: Path, precision: _Precision) -> dict[str, Any]:
    """TrainingArguments shared by the SFT and preference trainers (every TRL default set on purpose)."""
    report_to = [r.strip() for r in cfg.report_to.split(",") if r.strip() and r.strip() not in ("none", "tensorboard")]
    return dict(
        output_dir=str(work / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a fraction of all steps
        optim={"adamw": "adamw_torch", "adafactor": "adafactor", "sgd": "sgd"}[cfg.optimizer],
        bf16=precision.bf16,
        fp16=precision.fp16,
        activation_checkpointing=precision.gradient_checkpointing,
        seed=cfg.seed,
        data_seed=cfg.seed,
        full_determinism=cfg.deterministic,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=report_to,
        # Every trainable tensor is used on every step (LoRA, reward rows, goal embedding).
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        use_cpu=cpu_only(),
    )


def _callbacks(cfg: TrainConfig, work: Path) -> list:
    if "tensorboard" not in [r.strip() for r in cfg.report_to.split(",")]:
        return []
    from transformers.integrations import TensorBoardCallback

    board = TensorBoardCallback()
    board.logging_dir = str(work / "logs")  # survives the final rename as OUT/logs
    return [board]


def _trainer_config(cfg: TrainConfig, method: str, arguments: dict[str, Any]):
    """SFTConfig for SFT/GCSL methods; DPOConfig, CPOConfig (SimPO) or AlphaDPOConfig for preference pairs."""
    kind = get_method(method)
    if kind.trainer != "preference":
        from trl import SFTConfig

        return SFTConfig(**arguments, max_length=cfg.max_length, completion_only_loss=True,
                         # goal_value must reach the collator; other runs drop unused columns as usual
                         remove_unused_columns=kind.trainer != "embed")
    if cfg.preference_loss == "simpo":
        # SimPO (Meng et al. 2024): reference-free and length-normalised; CPO's BC term off (cpo_alpha=0).
        from trl.experimental.cpo import CPOConfig

        return CPOConfig(**arguments, max_length=cfg.max_length, loss_type="simpo", cpo_alpha=0.0,
                         beta=2.0 if cfg.beta is None else cfg.beta,
                         simpo_gamma=cfg.simpo_gamma)
    if cfg.preference_loss == "alphadpo":
        from gcsl.training.preference import ALPHADPO_DEFAULTS, AlphaDPOConfig

        def given(value, name):
            return ALPHADPO_DEFAULTS[name] if value is None else value

        return AlphaDPOConfig(**arguments, max_length=cfg.max_length, beta=given(cfg.beta, "beta"),
                              alphadpo_gamma=given(cfg.alphadpo_gamma, "gamma"),
                              alphadpo_alpha=given(cfg.alphadpo_alpha, "alpha"))
    from trl import DPOConfig

    return DPOConfig(**arguments, max_length=cfg.max_length, beta=0.1 if cfg.beta is None else cfg.beta)


def _preference_trainer_class(cfg: TrainConfig):
    # With a LoRA adapter, DPOTrainer's reference is the same model with the adapter disabled.
    if cfg.preference_loss == "simpo":
        from trl.experimental.cpo import CPOTrainer

        return CPOTrainer
    if cfg.preference_loss == "alphadpo":
        from gcsl.training.preference import AlphaDPOTrainer

        return AlphaDPOTrainer
    if cfg.preference_loss == "rosepo":
        from gcsl.training.preference import RosePOTrainer

        return RosePOTrainer
    from trl import DPOTrainer

    return DPOTrainer


# -- finishing -------------------------------------------------------------------------------

def _final_loss(trainer, output) -> float:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses:
        return float(losses[-1])
    return float(getattr(output, "training_loss", math.nan))


def _throughput(cfg: TrainConfig, built: _Built, trainer, seconds: float, world_size: int) -> dict[str, Any]:
    """Rows per optimizer step, and the rows, epochs, steps, tokens and seconds of the run.

    With prefix sharing a batch of N sequences holds a method-dependent number of rows, so the
    effective batch is rows per sequence x sequences per optimizer step (all processes).
    """
    from gcsl.training.trainer import GcslSFTTrainer

    per_sequence = built.train_rows / max(built.sequences, 1)
    return {
        "train_rows": built.train_rows,
        "rows_per_sequence": round(per_sequence, 4),
        "rows_per_step": round(per_sequence * cfg.per_device_batch_size * cfg.gradient_accumulation_steps
                               * world_size, 4),
        "epochs": round(float(trainer.state.epoch or 0.0), 4),
        "optimizer_steps": trainer.state.global_step,
        # Counted by GcslSFTTrainer (prompt and completion tokens, shared prefixes once); the
        # preference trainers do not count.
        "train_tokens": int(trainer.state.num_input_tokens_seen) if isinstance(trainer, GcslSFTTrainer) else None,
        "train_seconds": round(seconds, 3),
    }


# Written into each checkpoint after it is saved: the training seconds up to that step, all sittings.
_CLOCK_FILE = "gcsl_train_seconds.json"


def seconds_before(checkpoint: Path | None) -> float | None:
    """Training seconds spent before ``checkpoint`` (0 for a fresh run; None when a checkpoint does not say)."""
    if checkpoint is None:
        return 0.0
    try:
        return float(json.loads((checkpoint / _CLOCK_FILE).read_text(encoding="utf-8"))["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def training_clock(started: float, before: float):
    """A callback that writes, into each checkpoint it follows, the training seconds up to it."""
    from transformers import TrainerCallback

    class TrainingClock(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                atomic_write_json(folder / _CLOCK_FILE,
                                  {"train_seconds": round(before + time.perf_counter() - started, 3)})

    return TrainingClock()


# Options that say where a run is kept and how it reports, not what it trains.
_BOOKKEEPING = {"data", "out", "logging_steps", "save_steps", "save_total_limit", "keep_checkpoints", "report_to",
                "resume", "overwrite"}
# Options only the preference trainers read.
_PREFERENCE_OPTIONS = {"preference_loss", "beta", "simpo_gamma", "alphadpo_gamma", "alphadpo_alpha"}


def training_key(cfg: TrainConfig) -> str:
    """What the model a run with ``cfg`` trains depends on, hashed: two runs with the same key train the same model.

    The key covers the rows as the trainer reads them, in order, and the method as far as training sees it:
    the trainer, the goal input and, for a method with a goal, the goal setup. It also covers every option
    that changes training and the starting adapter's weights. A method's name and prepare's bookkeeping
    (counts, rows dropped) do not count, nor do options the trainer ignores (a DPO beta under an SFT
    trainer). So BIGRec's model and a recommendation recipe's round-0 SFT on the same liked rows share a key.
    """
    import pyarrow.parquet as pq

    prepared = _read_prepared(Path(cfg.data))
    kind = get_method(prepared.method)
    packs = cfg.prefix_sharing and kind.trainer == "sft"  # row_id groups the rows packed together
    read = [c for c in prepared.columns
            if (c != "row_id" or packs) and (c != REFERENCE_COLUMN or _needs_reference(cfg, prepared.method))
            and (c != SMOOTHING_COLUMN or cfg.preference_loss == "rosepo")]
    options = _options_read(cfg, kind.trainer)
    if cfg.init_adapter is not None:
        weights = sorted(Path(cfg.init_adapter).glob("adapter_model.*"))
        options["init_adapter"] = [hashlib.sha256(w.read_bytes()).hexdigest() for w in weights]
    rows = pq.read_table(prepared.data_dir / "train.parquet", columns=read).to_pylist()
    if "row_id" in read:  # packing reads which rows share a row_id, in order of first appearance, not the ids
        first: dict[Any, int] = {}
        for row in rows:
            row["row_id"] = first.setdefault(row["row_id"], len(first))
    facts = {"rows": rows, "trainer": kind.trainer, "goal_input": kind.goal_input, "options": options,
             "goals": prepared.goals.to_json() if kind.goal_input != "none" else None}
    text = json.dumps(facts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _options_read(cfg: TrainConfig, trainer: str) -> dict[str, Any]:
    """The options that change what ``trainer`` trains: not the bookkeeping, not what that trainer never reads."""
    skipped = _BOOKKEEPING | (set() if trainer == "preference" else _PREFERENCE_OPTIONS)
    return {k: v for k, v in config_to_dict(cfg).items() if k not in skipped}


def recorded_training_key(model: Path) -> str | None:
    """:func:`training_key` of the finished run in ``model``, from the settings its run.json records; None when
    the folder holds no finished run or its prepared data are gone or unreadable."""
    if ModelFolder(model).state != "complete":
        return None
    try:
        config = json.loads((Path(model) / "run.json").read_text(encoding="utf-8"))["config"]
        return training_key(TrainConfig(**config))
    except (OSError, ValueError, KeyError, TypeError, DataError):
        return None


def check_same_training(model: Path, cfg: TrainConfig) -> None:
    """Raises ConfigError when the finished run in ``model`` trained otherwise than ``cfg`` says, naming the options
    that differ: a cached model must not stand in for settings it was not trained with. Says nothing where the
    run's settings or data can no longer be read, so there is nothing to compare.

    >>> check_same_training(Path("runs/sft/seed0/model"), cfg)  # doctest: +SKIP
    ConfigError: runs/sft/seed0/model: trained with other settings (learning_rate 0.0003 -> 3e-05); ...
    """
    recorded = recorded_training_key(model)
    if recorded is None or recorded == training_key(cfg):
        return
    trainer = get_method(_read_prepared(Path(cfg.data)).method).trainer
    old = _options_read(TrainConfig(**json.loads((Path(model) / "run.json").read_text(encoding="utf-8"))["config"]),
                        trainer)
    new = _options_read(cfg, trainer)
    # The starting adapter counts by its weights, so its path is no difference.
    changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if k != "init_adapter" and old.get(k) != v]
    what = ", ".join(changed) or "other rows or another starting adapter"
    raise ConfigError(f"{model}: trained with other settings ({what}); remove the folder to train it again, or "
                      "write to another out folder")


def _throughput_line(cfg: TrainConfig, metrics: dict[str, Any], world_size: int) -> str:
    """One line for the run's log.

    >>> _throughput_line(TrainConfig(data=Path("d"), out=Path("o"), per_device_batch_size=8), {
    ...     "train_rows": 163, "rows_per_sequence": 10.1875, "rows_per_step": 81.5, "epochs": 1.0,
    ...     "optimizer_steps": 2, "train_tokens": 14938, "train_seconds": 12.5}, 1)
    'trained 2 optimizer steps of 81.5 rows (10.19 rows per sequence x 8 sequences x 1 accumulation x 1 process); 163 rows, 1 epochs, 14,938 tokens in 12.5 s'
    """
    tokens = metrics["train_tokens"]
    return (f"trained {metrics['optimizer_steps']} optimizer steps of {metrics['rows_per_step']:g} rows "
            f"({metrics['rows_per_sequence']:.2f} rows per sequence x {cfg.per_device_batch_size} sequences x "
            f"{cfg.gradient_accumulation_steps} accumulation x {world_size} process{'es' if world_size > 1 else ''}); "
            f"{metrics['train_rows']} rows, {metrics['epochs']:g} epochs"
            + (f", {tokens:,} tokens" if tokens is not None else "") + f" in {metrics['train_seconds']:.1f} s")


def _finish(cfg: TrainConfig, work: Path, prepared: _Prepared, trainer, metrics: dict[str, Any],
            precision: _Precision, base_path: str, checkpoint: Path | None, world_size: int) -> None:
    from gcsl.training.card import render_model_card

    shutil.copyfile(prepared.data_dir / "goals.json", work / "goals.json")
    kind = get_method(prepared.method)
    # Name the base model so that plain peft finds it: a local folder (a built-in model's converted
    # copy included; gcsl's built-in names mean nothing to peft) made absolute, else the hub id.
    # run.json keeps the name the user gave.
    base_for_peft = peft_base_name(base_path)
    adapter_config = work / "adapter_config.json"
    if adapter_config.is_file():
        record = json.loads(adapter_config.read_text(encoding="utf-8"))
        record["base_model_name_or_path"] = base_for_peft
        atomic_write_json(adapter_config, record)
    if kind.trainer == "embed":
        from gcsl.goal_embedding import save_goal_embedding

        save_goal_embedding(trainer.model, work, weights=False)  # the weights are in the adapter
    trainer.state.save_to_json(str(work / "trainer_state.json"))
    # A run with another loss than the default DPO's is recorded under the loss's name (simpo, alphadpo).
    method = cfg.preference_loss if kind.trainer == "preference" and cfg.preference_loss != "dpo" else prepared.method
    write_run_record(work, stage="train", config=cfg, seed=cfg.seed, goals=prepared.goals.to_json(), extra={
        "status": "finished", "method": method, "base_model": cfg.model, "base_model_path": base_path,
        "precision": precision.name, "world_size": world_size, "rows": prepared.rows,
        "resumed_from_step": int(checkpoint.name.split("-")[1]) if checkpoint else None, **metrics})
    atomic_write_text(work / "README.md", render_model_card(
        out_dir=Path(cfg.out), method=prepared.method, base_model=cfg.model, data_dir=prepared.data_dir,
        goals=prepared.goals.to_json(), config=config_to_dict(cfg), metrics=metrics, rows=prepared.rows,
        base_model_path=base_for_peft, chat=_chat_prompts(prepared.data_dir)))
    atomic_write_json(work / "train_metrics.json", metrics)
    if not cfg.keep_checkpoints:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
    out = Path(cfg.out)
    if out.exists():  # only reachable with --overwrite (checked before training)
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(work, out)


def peft_base_name(base_path: str) -> str:
    """What adapter_config.json names as the base: an existing folder made absolute, else the hub id.

    >>> peft_base_name("HuggingFaceTB/SmolLM2-135M-Instruct")
    'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
    local = Path(base_path).expanduser()
    return str(local.resolve()) if local.exists() else str(base_path)


def _chat_prompts(data_dir: Path) -> bool:
    """Whether the prepared prompts are chat messages (the card's snippet then templates them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = pq.read_schema(data_dir / "train.parquet").field("prompt").type
    return not (pa.types.is_string(kind) or pa.types.is_large_string(kind))
