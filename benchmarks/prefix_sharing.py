"""Prefix sharing: training examples per second on a GCSL-bey-NL expansion, against TRL on the same rows.

In one run, on the same model, LoRA config and token budget per step, for each dataset:

- gcsl: the expansion packed by :func:`gcsl.training.packing.pack_prefix_shared` (each feedback
  row's prompt once, its goal variants as blocks) and trained by ``GcslSFTTrainer`` with the
  ``PrefixSharingCollator``;
- TRL naive: the same expansion as ordinary rows, trained by TRL's ``SFTTrainer`` as it comes,
  with its own packing (``packing=True``, best-fit decreasing, padding-free), which fills each
  step with the same token budget: the strongest TRL setting for this comparison;
- naive rows through the gcsl trainer: the TRL-packed ordinary rows again, but trained by
  ``GcslSFTTrainer``, so the loss path is gcsl's (on CPUs it computes the NLL from the logits,
  where TRL uses its fused LM head). Against this arm the only difference is prefix sharing, so
  it is the one to hold against the ideal speed-up.

Both run with ``bf16=False`` and gradient checkpointing off (the CPU-friendly settings), one
packed sequence of at most ``--budget`` tokens per step, one warm-up step each, then
``--steps`` measured steps each, interleaved (gcsl, naive, TRL, gcsl, ...) so load from other
processes on a shared machine hits all alike. A step is fetching and collating the batch,
forward, backward and the optimizer step. Examples are the training rows (goal variants) in the
measured steps. The ideal speed-up is the ratio of token counts alone: tokens of the rows as
separate sequences / tokens of the prefix-shared sequences.

Datasets: MovieLens-100k recommendation (long histories, short answers; ratings 1-5) with goal
filtering (the default) and without it (the ablation, more goals per row); the shipped sentiment
log (``src/gcsl/resources/sentiment/feedback.jsonl``, else ``data/sentiment/feedback.jsonl``, else
a small log of review prompts with short VADER-scored responses built here). Last, the wall time
of one GCSL-bey-NL epoch against one SFT-top-25% epoch on the same small feedback log.

    python benchmarks/prefix_sharing.py            # SmolLM2-135M-Instruct, ~15 min on 2 CPU cores
    python benchmarks/prefix_sharing.py --tiny     # random 2-layer Llama, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SENTIMENT_LOGS = (REPO / "src/gcsl/resources/sentiment/feedback.jsonl", REPO / "data/sentiment/feedback.jsonl")
FINAL = "recommendation, unfiltered"


# -- data ------------------------------------------------------------------------------------

def _recommendation_log(path: Path, rows: int, seed: int) -> Path:
    from gcsl.tasks.recommendation import (
        RecommendationDataConfig,
        load_recommendation_data,
        write_feedback_log,
    )

    data = load_recommendation_data(RecommendationDataConfig(n_train=rows, n_valid=1, n_test=1, seed=seed))
    write_feedback_log(data, "train", path, chat=True)  # an instruct model sees prompts through its chat template
    return path


def _sentiment_log(path: Path, rows: int, seed: int) -> tuple[Path, str]:
    for shipped in SENTIMENT_LOGS:
        if shipped.is_file():
            lines = shipped.read_text(encoding="utf-8").splitlines()
            picked = sorted(random.Random(seed).sample(range(len(lines)), min(rows, len(lines))))
            path.write_text("".join(lines[i] + "\n" for i in picked), encoding="utf-8")
            return path, f"{shipped.relative_to(REPO)} ({len(picked)} of {len(lines)} rows)"
    # No shipped log: review prompts with short responses, scored like the shipped one (VADER, negative).
    from gcsl.scorers import VaderScorer
    from gcsl.tasks.sentiment import sentiment_prompt_splits

    train, _ = sentiment_prompt_splits(seed=seed, n_train=rows)
    sentences = ["I loved every minute.", "A dull, tedious film.", "The acting was superb.", "It was fine.",
                 "A waste of two hours.", "Charming and warm.", "The plot made no sense.", "Beautifully shot."]
    rng = random.Random(seed)
    responses = [" ".join(rng.sample(sentences, 2)) for _ in train]
    scores = VaderScorer("negative").score(responses)
    with path.open("w", encoding="utf-8") as fh:
        for row, response, score in zip(train, responses, scores):
            fh.write(json.dumps({"prompt": [{"role": "user", "content": row["prompt"]}], "response": response,
                                 "score": round(score, 4)}) + "\n")
    return path, f"built here: {len(train)} review prompts with short VADER-scored responses"


def _prepare(log: Path, out: Path, *, method: str = "gcsl-bey-nl", filter_goals: bool = True, rating: bool = True):
    from datasets import Dataset

    from gcsl.data.prepare import PrepareConfig, prepare

    options = (dict(kind="ordinal", score_range=[1, 5], metric_name="rating") if rating
               else dict(score_range=[0.0, 1.0], metric_name="negative sentiment"))
    prepare(PrepareConfig(data=str(log), out=out, method=method, filter=filter_goals, quiet=True, **options))
    return Dataset.from_parquet(str(out / "train.parquet"))


# -- model -----------------------------------------------------------------------------------

def _model_source(args, work: Path) -> str:
    from gcsl.models import load_tokenizer, resolve_model_path

    if not args.tiny:
        return resolve_model_path(args.model)
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(work / "tiny"))
    tokenizer.save_pretrained(str(work / "tiny"))
    return str(work / "tiny")


def _lora():
    from peft import LoraConfig

    # The paper's adapter, as `gcsl train` builds it.
    return LoraConfig(r=13, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def _sft_config(out: Path, budget: int, seed: int, **extra):
    from trl import SFTConfig

    return SFTConfig(output_dir=str(out), max_length=budget, completion_only_loss=True, bf16=False,
                     gradient_checkpointing=False, use_cpu=True, per_device_train_batch_size=1,
                     learning_rate=1e-4, report_to=[], save_strategy="no", logging_steps=10_000, seed=seed,
                     data_seed=seed, dataloader_num_workers=0, **extra)


def _gcsl_trainer(source: str, dataset, budget: int, work: Path, seed: int, **extra):
    from gcsl.models import load_causal_lm, load_tokenizer
    from gcsl.training.packing import PrefixSharingCollator, pack_prefix_shared, prefix_sharing_notice
    from gcsl.training.trainer import GcslSFTTrainer

    tokenizer = load_tokenizer(source)
    model = load_causal_lm(source, dtype=torch.float32)
    notice = prefix_sharing_notice(model)
    if notice:
        raise SystemExit(notice)
    packed = pack_prefix_shared(dataset, tokenizer, max_tokens=budget, max_length=budget)
    args = _sft_config(work, budget, seed, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                       **extra)
    trainer = GcslSFTTrainer(model=model, args=args, train_dataset=packed.dataset, processing_class=tokenizer,
                             data_collator=PrefixSharingCollator.for_model(model, tokenizer.pad_token_id),
                             peft_config=_lora())
    return trainer, packed


def _naive_trainer(source: str, dataset, budget: int, work: Path, seed: int, *, trainer_class: str):
    """The expansion as ordinary rows, tokenized and packed (best-fit decreasing, padding-free) by TRL."""
    from trl import SFTTrainer

    from gcsl.models import load_causal_lm, load_tokenizer
    from gcsl.training.trainer import GcslSFTTrainer

    tokenizer = load_tokenizer(source)
    model = load_causal_lm(source, dtype=torch.float32)
    args = _sft_config(work, budget, seed, packing=True, packing_strategy="bfd")
    cls = SFTTrainer if trainer_class == "trl" else GcslSFTTrainer
    return cls(model=model, args=args, train_dataset=dataset.select_columns(["prompt", "completion"]),
               processing_class=tokenizer, peft_config=_lora())


# -- timing ----------------------------------------------------------------------------------

@dataclass
class _Stepper:
    """Runs training steps of one trainer by hand, so two trainers can alternate step by step."""

    trainer: object
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
        self._batches = iter(())

    def _next_batch(self):
        try:
            return next(self._batches)
        except StopIteration:
            self._batches = iter(self.trainer.get_train_dataloader())
            return next(self._batches)

    def step(self) -> None:
        trainer = self.trainer
        wall, cpu = time.perf_counter(), time.process_time()
        batch = self._next_batch()
        labels = batch["labels"]
        count = (labels[..., 1:] != -100).sum()
        trainer.training_step(trainer.model, batch, count)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad(set_to_none=True)
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)
        self.examples.append(_completion_runs(labels))
        self.tokens.append(_batch_tokens(batch))

    def rate(self, skip: int, clock: str = "wall", of: str = "examples") -> float:
        seconds = sum((self.wall if clock == "wall" else self.cpu)[skip:])
        return sum((self.examples if of == "examples" else self.tokens)[skip:]) / seconds


def _completion_runs(labels: torch.Tensor) -> int:
    """Training rows in a batch: each row's completion is one run of labels, and runs never touch
    (TRL's padding-free collator and the packing collator both ignore the first token of a row)."""
    on = labels != -100
    starts = on.clone()
    starts[..., 1:] &= ~on[..., :-1]
    return int(starts.sum())


def _batch_tokens(batch) -> int:
    from gcsl.training.packing import is_packed_batch, packed_token_count

    if is_packed_batch(batch):
        return int(packed_token_count(batch))
    return int(batch["position_ids"].numel())  # TRL padding-free: one unpadded row


# The three ways a step is run: prefix-shared rows, and the same rows unshared through the same
# trainer (isolates prefix sharing) or through TRL's SFTTrainer as it comes (the baseline users have).
ARMS = {"gcsl": "gcsl prefix-shared", "naive-gcsl": "naive rows, gcsl trainer", "trl": "naive rows, TRL SFTTrainer"}


@dataclass
class _Result:
    name: str
    naive_tokens: int
    packed_tokens: int
    steppers: dict[str, _Stepper]
    warmup: int

    @property
    def ideal(self) -> float:
        return self.naive_tokens / self.packed_tokens

    def ratio(self, baseline: str = "trl", clock: str = "wall") -> float:
        return self.steppers["gcsl"].rate(self.warmup, clock) / self.steppers[baseline].rate(self.warmup, clock)


def _compare(name: str, dataset, source: str, args, work: Path) -> _Result:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gcsl, packed = _gcsl_trainer(source, dataset, args.budget, work / f"{name}-gcsl", args.seed)
        trainers = {"gcsl": gcsl}
        for arm in ("naive-gcsl", "trl"):
            trainers[arm] = _naive_trainer(source, dataset, args.budget, work / f"{name}-{arm}", args.seed,
                                           trainer_class=arm.removeprefix("naive-"))
        steppers = {arm: _Stepper(t) for arm, t in trainers.items()}
        for _ in range(args.warmup + args.steps):
            for stepper in steppers.values():
                stepper.step()
    result = _Result(name, packed.naive_tokens, packed.packed_tokens, steppers, warmup=args.warmup)
    print(f"\n[{name}] {packed.groups} feedback rows -> {packed.rows} training rows; "
          f"{packed.sequences} prefix-shared sequences of <= {args.budget} tokens")
    print(f"  tokens: naive rows {packed.naive_tokens:,}, prefix-shared {packed.packed_tokens:,} "
          f"-> ideal speed-up {result.ideal:.2f}x")
    w = args.warmup
    for arm, s in steppers.items():
        print(f"  {ARMS[arm]:28s} {args.steps} steps: {sum(s.examples[w:]):4d} examples, {sum(s.tokens[w:]):6,} tokens, "
              f"{sum(s.wall[w:]):6.1f} s wall ({s.rate(w):.3f} ex/s), {sum(s.cpu[w:]):6.1f} s CPU "
              f"({s.rate(w, 'cpu'):.3f} ex/s)")
    # Which steps were drawn moves examples per token away from the dataset's average; the token rate
    # shows what a token costs in each layout (the block mask's overhead), free of that draw.
    token_cost = steppers["gcsl"].rate(w, of="tokens") / steppers["naive-gcsl"].rate(w, of="tokens")
    print(f"  tokens/s, prefix-shared / naive (same trainer): {token_cost:.2f}; ideal x that: "
          f"{result.ideal * token_cost:.2f}x")
    for arm in ("naive-gcsl", "trl"):
        print(f"  examples/s ratio vs {ARMS[arm]}: {result.ratio(arm):.2f} wall, {result.ratio(arm, 'cpu'):.2f} "
              f"CPU time; {result.ratio(arm) / result.ideal:.0%} of ideal")
    return result


def _epoch_seconds(dataset, source: str, args, work: Path) -> tuple[float, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, packed = _gcsl_trainer(source, dataset, args.budget, work, args.seed, num_train_epochs=1)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start, packed


# -- main ------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a built-in name, a model folder or a hub id")
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer Llama on the SmolLM2 tokenizer (quick)")
    ap.add_argument("--budget", type=int, default=1024, help="tokens per training step (one packed sequence)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per trainer and dataset")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    ap.add_argument("--rec-rows", type=int, default=48, help="MovieLens feedback rows (subsampled)")
    ap.add_argument("--sentiment-rows", type=int, default=96, help="sentiment feedback rows (subsampled)")
    ap.add_argument("--epoch-rows", type=int, default=24, help="feedback rows of the epoch comparison")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.tiny:
        args.steps = max(args.steps, 6)

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="gcsl-prefix-bench-") as tmp:
        work = Path(tmp)
        source = _model_source(args, work)
        print(f"model: {'random 2-layer Llama (--tiny)' if args.tiny else args.model} ({source}); "
              f"{torch.get_num_threads()} threads; budget {args.budget} tokens/step; "
              f"{args.warmup} warm-up + {args.steps} measured steps per trainer")
        rec_log = _recommendation_log(work / "rec.jsonl", args.rec_rows, args.seed)
        sent_log, sent_source = _sentiment_log(work / "sentiment.jsonl", args.sentiment_rows, args.seed)
        print(f"recommendation: MovieLens-100k, {args.rec_rows} feedback rows (chat prompts); "
              f"sentiment: {sent_source}")

        results = [
            _compare("recommendation, filtered", _prepare(rec_log, work / "rec-f"), source, args, work),
            _compare("sentiment", _prepare(sent_log, work / "sent", rating=False), source, args, work),
        ]

        # Epoch wall time: GCSL-bey-NL (every row above the mean, once per goal) vs SFT on the top 25%.
        lines = (work / "rec.jsonl").read_text(encoding="utf-8").splitlines()[:args.epoch_rows]
        (work / "epoch.jsonl").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
        epochs = {}
        for method in ("gcsl-bey-nl", "sft"):
            data = _prepare(work / "epoch.jsonl", work / f"epoch-{method}", method=method)
            epochs[method] = _epoch_seconds(data, source, args, work / f"epoch-{method}-run")
        print(f"\n[epoch] {len(lines)} MovieLens feedback rows, one epoch each through the prefix-shared trainer:")
        for method, (seconds, packed) in epochs.items():
            print(f"  {method:12s} {packed.rows:4d} training rows ({packed.groups} feedback rows), "
                  f"{packed.sequences} sequences, {packed.packed_tokens:,} tokens (naive {packed.naive_tokens:,}): "
                  f"{seconds:.1f} s")
        print(f"  epoch time GCSL-bey-NL / SFT-top-25%: {epochs['gcsl-bey-nl'][0] / epochs['sft'][0]:.2f}x for "
              f"{epochs['gcsl-bey-nl'][1].rows / epochs['sft'][1].rows:.2f}x the training rows")

        results.append(_compare(FINAL, _prepare(rec_log, work / "rec-u", filter_goals=False), source, args, work))

    print(f"\nsummary (wall clock; total run {time.perf_counter() - start:.0f} s):")
    print(f"  {'':28s} {'ideal':>6s}  {'vs naive, same trainer':>28s}  {'vs TRL SFTTrainer':>24s}")
    for r in results:
        cells = [f"{r.ratio(arm):.2f}x ({r.ratio(arm) / r.ideal:.0%} of ideal)" for arm in ("naive-gcsl", "trl")]
        print(f"  {r.name:28s} {r.ideal:5.2f}x  {cells[0]:>28s}  {cells[1]:>24s}")
    final = next(r for r in results if r.name == FINAL)
    print(f"examples/s ratio (prefix-shared / TRL naive, {FINAL}): {final.ratio():.2f}")


if __name__ == "__main__":
    main()
