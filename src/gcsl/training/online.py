"""Online RL baselines: GRPO and RLOO through TRL, a LoRA adapter rewarded by the task's own scorer.

One workflow, :func:`train_online`, read top to bottom: the distinct prompts of a feedback log
(the experiment's training prompts; its responses and scores are not used), the task's reward
hook (``reward_function(eval_config)`` beside the task's evaluator, e.g. VADER in the configured
direction for sentiment), and TRL's ``GRPOTrainer`` or ``RLOOTrainer`` updating a LoRA adapter on
the base model with the LoRA settings of `gcsl train`. The policy samples ``num_generations``
completions per prompt, the scorer rewards each, and the trainer takes one optimizer step per
batch of ``per_device_batch_size x gradient_accumulation_steps x processes`` completions
(``num_iterations`` is TRL's 1: each batch is sampled for one step, so completions sampled =
optimizer steps x that batch).

Output: a model folder as `gcsl train` writes it (adapter, tokenizer, run.json, train_metrics.json,
trainer_state.json), built in ``OUT.partial`` and renamed to ``OUT`` when finished. It has no
goals.json, so `gcsl generate` treats it as goal-free, like the base model: text prompts go
through the chat template when the tokenizer has one, which is how they are sampled here too.

Resuming, as `gcsl train` does: the Trainer writes a checkpoint every ``save_steps`` into
``OUT.partial/checkpoints`` (adapter, optimizer, scheduler, RNG states), and ``resume`` continues
from the newest whole one (:attr:`gcsl.stages.ModelFolder.last_checkpoint`) under the interrupted
run's settings (run length and logging may change). Each checkpoint also records the training
seconds and the completions scored up to it, so the run's record counts every sitting.

PPO is not shipped by TRL 1.16; GRPO and RLOO stand in for the paper's online baseline.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gcsl.config import config_to_dict, field
from gcsl.errors import ConfigError, DataError, StageError
from gcsl.models import DEFAULT_MODEL
from gcsl.runinfo import atomic_write_json, write_run_record
from gcsl.stages import ModelFolder

__all__ = ["OnlineConfig", "train_online", "task_reward", "reward_hook", "training_prompts", "ALGORITHMS",
           "SHARED_TRAIN_OPTIONS"]

ALGORITHMS = ("grpo", "rloo")
# TRL 1.16's own defaults, by algorithm, for the options left unset (None) here.
# TrainConfig options an experiment's shared `train` block passes on to its online variants too (the
# adapter and precision are the same for every method; learning rate and run length are the method's own).
SHARED_TRAIN_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "precision",
                        "gradient_checkpointing")
_TRL_DEFAULTS = {"grpo": {"num_generations": 8, "beta": 0.0}, "rloo": {"num_generations": 2, "beta": 0.05}}
# Fields that change only how long or how verbosely a run goes; a resumed run may change them.
_RESUMABLE_CHANGES = {"epochs", "max_steps", "logging_steps", "save_steps", "resume", "overwrite"}
# Written into each checkpoint after it is saved: the completions scored up to that step, all sittings.
_COUNTS_FILE = "gcsl_online_counts.json"


@dataclass
class OnlineConfig:
    data: str = field(help="feedback log (JSONL/CSV/Parquet/dataset) whose distinct prompts are the training "
                           "prompts; its responses and scores are not used")
    out: Path = field(help="output directory for the adapter, tokenizer, run.json and train_metrics.json")
    task: str = field("sentiment", help="task whose scorer gives the reward (one with a reward hook: sentiment)")
    task_options: dict = field(default_factory=dict, cli=False,
                               help="the task's evaluator options (e.g. direction: negative): the reward is the "
                                    "evaluator's own per-generation score")
    model: str = field(DEFAULT_MODEL, help="base model: a built-in name, a local folder or a hub id")
    prompt_column: str = field("prompt", help="prompt column of the feedback log")
    response_column: str = field("response", help="response column of the feedback log (read, not used)")
    score_column: str = field("score", help="score column of the feedback log (read, not used)")
    data_format: str = field("auto", help="feedback log format: auto, jsonl, csv, parquet or dataset")
    split: str = field("train", help="dataset split, for a datasets-hub log")
    learning_rate: float = field(1e-4, help="peak learning rate; TRL's default 1e-6 is for full fine-tuning, "
                                            "1e-4 is `gcsl train`'s LoRA rate, so every method moves alike")
    num_generations: int | None = field(None, help="completions sampled per prompt (default: TRL's, 8 for GRPO, "
                                                   "2 for RLOO)")
    per_device_batch_size: int = field(8, help="completions per device per micro-batch (TRL's default 8); a multiple "
                                               "of num_generations, so a batch holds whole prompt groups")
    gradient_accumulation_steps: int = field(1, help="micro-batches per optimizer step")
    max_completion_length: int = field(64, help="most tokens sampled per completion (gcsl generate's "
                                                "max_new_tokens; TRL's default is 512)")
    temperature: float = field(1.0, help="sampling temperature while training (TRL's and gcsl generate's 1.0)")
    beta: float | None = field(None, help="weight of the KL penalty to the reference (the base model, adapter "
                                          "off); default: TRL's, 0.0 for GRPO (no reference) and 0.05 for RLOO")
    epochs: float = field(1.0, help="passes over the training prompts")
    max_steps: int = field(-1, help="optimizer steps to run; > 0 overrides --epochs")
    lora_r: int = field(13, help="LoRA rank (as gcsl train; paper: 13)")
    lora_alpha: float = field(32, help="LoRA alpha (as gcsl train; paper: 32)")
    lora_dropout: float = field(0.05, help="LoRA dropout (as gcsl train; paper: 0.05)")
    lora_target_modules: str = field("all-linear", help="modules that get LoRA: all-linear or a comma-separated "
                                                        "list such as q_proj,v_proj")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = field("auto", help="auto: bf16 on Ampere+ GPUs, fp16 "
                                                                            "autocast on older GPUs, fp32 on CPU")
    gradient_checkpointing: bool | None = field(None, help="recompute activations to save memory (default: on "
                                                           "GPUs, off on CPUs)")
    seed: int = field(0, help="random seed (adapter init, prompt order, sampling)")
    logging_steps: int = field(10, help="log reward and loss every N steps")
    save_steps: int = field(100, help="write a resumable checkpoint every N steps (as gcsl train)")
    resume: bool = field(False, help="continue an interrupted run from the last complete checkpoint in OUT.partial")
    overwrite: bool = field(False, help="replace an existing OUT, or discard an unfinished OUT.partial")

    def validate(self) -> list[str]:
        problems = []
        for name in ("learning_rate", "per_device_batch_size", "gradient_accumulation_steps",
                     "max_completion_length", "temperature", "epochs", "lora_r", "lora_alpha", "logging_steps",
                     "save_steps"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}: must be positive, got {getattr(self, name)}")
        if self.num_generations is not None:
            if self.num_generations < 2:
                problems.append(f"num_generations: GRPO and RLOO compare a prompt's samples, so give at least 2, got "
                                f"{self.num_generations}")
            elif self.per_device_batch_size % self.num_generations:
                problems.append(f"per_device_batch_size: {self.per_device_batch_size} is not a multiple of "
                                f"num_generations ({self.num_generations}); a batch must hold whole prompt groups")
        if self.beta is not None and not 0 <= self.beta < math.inf:
            problems.append(f"beta: must be >= 0 and finite, got {self.beta}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"max_steps: must be positive (or -1 to use --epochs), got {self.max_steps}")
        if not self.lora_target_modules.strip():
            problems.append("lora_target_modules: give all-linear or module names such as q_proj,v_proj")
        if not isinstance(self.task_options, dict):
            problems.append(f"task_options: expected a mapping of evaluator options, got {self.task_options!r}")
        if self.resume and self.overwrite:
            problems.append("resume/overwrite: choose one (resume continues OUT.partial, overwrite discards it)")
        if Path(self.out).name.endswith(".partial"):
            problems.append(f"out: {self.out} ends in .partial, which names unfinished runs; choose another name")
        return problems


def task_reward(task: str, options: dict[str, Any] | None = None) -> Callable[[list[str]], list[float]]:
    """The task's reward for completions: its ``reward_function(eval_config)`` hook, beside its evaluator.

    A task without the hook (sentiment and toxicity have one) is a one-line ConfigError.

    >>> reward = task_reward("sentiment", {"direction": "positive"})
    >>> reward(["A wonderful film."])[0] > 0.5
    True
    """
    from gcsl.config import resolve_config
    from gcsl.tasks import get_task

    return reward_hook(task)(resolve_config(get_task(task).eval_config, overrides=dict(options or {})))


def reward_hook(task: str) -> Callable[[Any], Callable[[list[str]], list[float]]]:
    """The task's ``reward_function`` (in its evaluator's module); a one-line ConfigError when it has none."""
    from gcsl.tasks import get_task

    spec = get_task(task)
    hook = getattr(importlib.import_module(spec.evaluate.__module__), "reward_function", None)
    if hook is None:
        raise ConfigError(f"task {task}: online methods ({', '.join(ALGORITHMS)}) need a scorer for that task as "
                          "their reward, and it has none (sentiment and toxicity do); drop them from the methods")
    return hook


def training_prompts(cfg: OnlineConfig) -> list[Any]:
    """The distinct prompts of the feedback log, in first-seen order (text, or chat messages)."""
    from gcsl.data.load import read_feedback

    table, _ = read_feedback(cfg.data, prompt_column=cfg.prompt_column, response_column=cfg.response_column,
                             score_column=cfg.score_column, fmt=cfg.data_format, split=cfg.split)
    seen: dict[str, Any] = {}
    for prompt in table.column("prompt").to_pylist():
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            continue
        seen.setdefault(prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True), prompt)
    if not seen:
        raise DataError(f"{cfg.data}: no prompts in column {cfg.prompt_column!r}; online training needs some")
    return list(seen.values())


@dataclass
class _Counter:
    """What the reward function was asked for: the compute of the run, counted where it happens."""

    completions: int = 0  # completions sampled and scored on this process, all sittings
    batches: int = 0  # times the trainer asked for rewards (once per sampled batch)
    reward_sum: float = 0.0

    def save(self, folder: Path) -> None:
        atomic_write_json(folder / _COUNTS_FILE, {"completions": self.completions, "batches": self.batches,
                                                  "reward_sum": self.reward_sum})

    @classmethod
    def load(cls, checkpoint: Path | None) -> _Counter:
        """The counts up to ``checkpoint`` (zero for a fresh run, or a checkpoint that does not say)."""
        if checkpoint is None:
            return cls()
        try:
            return cls(**json.loads((checkpoint / _COUNTS_FILE).read_text(encoding="utf-8")))
        except (TypeError, OSError, ValueError):  # killed while writing it, or written by another version
            return cls()


def _completion_text(completion: Any) -> str:
    """TRL passes text completions as text, chat completions as [{'role': 'assistant', 'content': ...}]."""
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return completion if isinstance(completion, str) else ""


def _trl_reward(score: Callable[[list[str]], list[float]], counter: _Counter, name: str):
    """``score`` with TRL's reward-function signature, counting the completions it scores."""
    def reward(prompts, completions, **kwargs) -> list[float]:
        values = [float(r) for r in score([_completion_text(c) for c in completions])]
        counter.completions += len(values)
        counter.batches += 1
        counter.reward_sum += sum(values)
        return values

    reward.__name__ = name  # TRL logs each reward function's mean under its name
    return reward


def _counting_checkpoints(counter: _Counter):
    """A callback that writes, into each checkpoint it follows, the completions scored up to it."""
    from transformers import TrainerCallback

    class CountingCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                counter.save(folder)

    return CountingCheckpoints()


def _epoch_seeded(trainer_class):
    """``trainer_class`` (GRPOTrainer, RLOOTrainer) whose prompt order is a function of the seed and the epoch.

    TRL's RepeatSampler draws every epoch's order from one generator seeded once, and a resumed run
    builds it afresh, so after a checkpoint it would visit other prompts than the uninterrupted run
    did. Seeding each epoch's permutation with seed + epoch (epoch 0 keeps TRL's own order), the epoch
    read from the trainer's state when the epoch's pass begins, makes a resumed run sample the prompts
    the uninterrupted run sampled; the dataloader's skip of the batches already trained does the rest.
    """
    from trl.trainer.utils import RepeatSampler

    class EpochSeededSampler(RepeatSampler):
        def __init__(self, sampler: RepeatSampler, trainer) -> None:
            super().__init__(sampler.data_source, sampler.mini_repeat_count, sampler.batch_size, sampler.repeat_count,
                             sampler.shuffle, sampler.seed)
            self.trainer = trainer

        def __iter__(self):
            if self.shuffle:
                # state.epoch is whole at an epoch's start, and whole plus a fraction in a resumed epoch
                epoch = math.floor((self.trainer.state.epoch or 0.0) + 1e-6)
                self.generator.manual_seed((self.seed or 0) + epoch)
            return super().__iter__()

    class EpochSeeded(trainer_class):
        def _get_train_sampler(self, dataset=None):
            return EpochSeededSampler(super()._get_train_sampler(dataset), self)

    EpochSeeded.__name__ = trainer_class.__name__
    return EpochSeeded


def _resume_point(cfg: OnlineConfig, folder: ModelFolder) -> Path | None:
    """Read-only checks of OUT and OUT.partial; the checkpoint to resume from, if any."""
    out, work = folder.path, folder.partial
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise StageError(f"{out}: output directory exists and is not empty"
                         + ("; it holds a finished run, so there is nothing to resume" if cfg.resume else "")
                         + "; set overwrite or choose another out")
    if not cfg.resume:
        if work.exists() and not cfg.overwrite:
            raise StageError(f"{work}: an unfinished run is here; set resume to continue it or overwrite to start "
                             "over")
        return None
    checkpoint = folder.last_checkpoint
    if checkpoint is None:
        raise StageError(f"{work}: no complete checkpoint to resume from; run again without resume")
    try:
        before = json.loads((work / "run.json").read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError):
        return checkpoint  # no record of the interrupted run's settings to hold this one to
    # An option the interrupted run's record lacks was added since; its default is what that run did.
    now = {k: v for k, v in config_to_dict(cfg).items() if k not in _RESUMABLE_CHANGES}
    defaults = config_to_dict(OnlineConfig(data=cfg.data, out=cfg.out))
    changed = sorted(k for k in now if before.get(k, defaults.get(k)) != now[k])
    if changed:
        raise ConfigError(f"{work / 'run.json'}: resume needs the interrupted run's settings, but "
                          f"{', '.join(changed)} differ (was: "
                          f"{', '.join(f'{k}={before.get(k, defaults.get(k))!r}' for k in changed)})")
    return checkpoint


def train_online(cfg: OnlineConfig, algorithm: Literal["grpo", "rloo"], *, callbacks: list | None = None) -> Path:
    """Trains a LoRA adapter on ``cfg.model`` with ``algorithm`` on the log's prompts; writes ``cfg.out``.

    ``callbacks`` are extra ``transformers.TrainerCallback`` objects (progress, timing), as for `gcsl train`.

    >>> train_online(OnlineConfig(data="fb.jsonl", out=Path("runs/grpo"), max_steps=100), "grpo")  # doctest: +SKIP
    PosixPath('runs/grpo')
    """
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import set_seed

    from gcsl.models import library_deprecations_silenced, load_causal_lm, load_tokenizer, resolve_model_path
    from gcsl.training.train import (  # the training clock is `gcsl train`'s own
        cpu_only,
        lora_settings,
        peft_base_name,
        resolve_precision,
        seconds_before,
        training_clock,
    )

    # 1. Everything that can be wrong is found before the model loads or anything is written.
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    state = PartialState(cpu=cpu_only())
    score = task_reward(cfg.task, cfg.task_options)
    prompts = training_prompts(cfg)
    folder = ModelFolder(cfg.out)
    out, work = folder.path, folder.partial
    checkpoint = _resume_point(cfg, folder)
    defaults = _TRL_DEFAULTS[algorithm]
    generations = cfg.num_generations or defaults["num_generations"]
    beta = defaults["beta"] if cfg.beta is None else cfg.beta
    if cfg.per_device_batch_size % generations:
        raise ConfigError(f"per_device_batch_size: {cfg.per_device_batch_size} is not a multiple of {algorithm}'s "
                          f"num_generations ({generations}); set one so a batch holds whole prompt groups")
    state.wait_for_everyone()
    if state.is_main_process:
        if checkpoint is None:
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
        else:  # half-written checkpoints newer than the resume point would confuse checkpoint rotation
            resumed = int(checkpoint.name.split("-")[1])
            for child in checkpoint.parent.glob("checkpoint-*"):
                step = child.name.split("-")[1]
                if step.isdigit() and int(step) > resumed:
                    shutil.rmtree(child)
        write_run_record(work, stage="train", config=cfg, seed=cfg.seed, goals=None,
                         extra={"status": "running", "method": algorithm})
    state.wait_for_everyone()

    # 2. TRL's config: its defaults, the batch in completions, checkpoints as `gcsl train` keeps them (the
    # last two, every save_steps: TrainConfig's save_total_limit).
    precision = resolve_precision(cfg)
    if algorithm == "grpo":
        from trl import GRPOConfig as TrlConfig
        from trl import GRPOTrainer as TrlTrainer
    else:
        from trl import RLOOConfig as TrlConfig
        from trl import RLOOTrainer as TrlTrainer
    args = TrlConfig(
        output_dir=str(work / "checkpoints"), learning_rate=cfg.learning_rate, num_generations=generations,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, beta=beta,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, seed=cfg.seed, data_seed=cfg.seed,
        bf16=precision.bf16, fp16=precision.fp16, activation_checkpointing=precision.gradient_checkpointing,
        logging_steps=cfg.logging_steps, logging_first_step=True, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=2, report_to=[],
        dataloader_num_workers=0, use_cpu=cpu_only())

    # 3. Model, tokenizer, LoRA as `gcsl train` sets them; prompts as `gcsl generate` reads a goal-free model's.
    from peft import LoraConfig

    set_seed(cfg.seed)
    base_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_causal_lm(cfg.model, dtype=precision.dtype)
    lora = LoraConfig(**lora_settings(cfg))
    chat = tokenizer.chat_template is not None
    rows = [{"prompt": [{"role": "user", "content": p}] if isinstance(p, str) and chat else p} for p in prompts]
    counter = _Counter.load(checkpoint)
    reward = _trl_reward(score, counter, f"{cfg.task}_reward")
    with library_deprecations_silenced():  # the trainer wraps the model with peft here
        trainer = _epoch_seeded(TrlTrainer)(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora)

    # 4. Train (resuming restores adapter, optimizer, scheduler and RNG states). Training time and the
    # completions scored add up over sittings: each checkpoint records them up to its step.
    before = seconds_before(checkpoint)
    started = time.perf_counter()
    trainer.add_callback(training_clock(started, before or 0.0))
    trainer.add_callback(_counting_checkpoints(counter))
    for callback in callbacks or []:  # after the checkpoint's own records, so they see a whole checkpoint
        trainer.add_callback(callback)
    with library_deprecations_silenced():
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = (before or 0.0) + time.perf_counter() - started
    trainer.save_model(str(work))  # the adapter, and the tokenizer (processing_class) beside it

    # 5. The main process completes the folder and renames it into place.
    processes = state.num_processes
    steps = trainer.state.global_step
    completions = counter.completions * processes  # every process scores its own share of each batch
    per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * processes
    metrics = {
        "algorithm": algorithm, "train_prompts": len(prompts), "num_generations": generations, "beta": beta,
        "prompts_per_step": per_step // generations, "completions_sampled": completions,
        "scorer_calls": completions, "reward_batches": counter.batches * processes,
        "mean_reward": counter.reward_sum / counter.completions if counter.completions else None,
        # the report's training facts: a "row" of an online run is a sampled, scored completion
        "train_rows": completions, "rows_per_step": per_step, "epochs": round(float(trainer.state.epoch or 0.0), 4),
        "optimizer_steps": steps, "global_step": steps, "train_tokens": None, "train_seconds": round(seconds, 3),
        "resumed_from_step": int(checkpoint.name.split("-")[1]) if checkpoint else None,
    }
    if before is None:  # resumed from a checkpoint that does not record its time: this sitting's only
        metrics["train_seconds_from_step"] = metrics["resumed_from_step"]
    if state.is_main_process:
        print(f"{algorithm}: {steps} optimizer steps, {completions} completions sampled and scored "
              f"({metrics['prompts_per_step']} prompts x {generations} per step) in {seconds:.1f} s", flush=True)
        adapter_config = work / "adapter_config.json"
        if adapter_config.is_file():  # name the base so plain peft finds it (as gcsl train does)
            record = json.loads(adapter_config.read_text(encoding="utf-8"))
            record["base_model_name_or_path"] = peft_base_name(base_path)
            atomic_write_json(adapter_config, record)
        trainer.state.save_to_json(str(work / "trainer_state.json"))
        atomic_write_json(work / "train_metrics.json", metrics)
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        # run.json last: a folder that has it is complete (ModelFolder.state).
        write_run_record(work, stage="train", config=cfg, seed=cfg.seed, goals=None, extra={
            "status": "finished", "method": algorithm, "base_model": cfg.model, "base_model_path": base_path,
            "precision": precision.name, "world_size": processes, "rows": completions, **metrics})
        if out.exists():  # only reachable with overwrite (checked before training)
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(work, out)
    state.wait_for_everyone()
    return out
