"""Training throughput: `gcsl train`'s loop against a bare PyTorch LoRA loop on the same batches.

Both sides train SmolLM2-135M-Instruct (the built-in offline model) with the same LoRA config
(r=13, alpha=32, dropout 0.05, all linear layers), AdamW at the same learning rate, the same
precision (from the hardware), in the same process. `gcsl train` runs with its defaults
(TensorBoard logging, progress bar); its data loader's batches are recorded as they are made,
and the bare loop (peft model + AdamW, the model's own loss) replays them. Tokens are the
attention-masked tokens of each batch; the first ``--warmup`` steps of each side are not timed.

    python benchmarks/train_throughput.py --steps 12 --warmup 2

Target: gcsl / bare >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

WORDS = ("the plot moves quickly and the acting is strong though the ending drags a little while the music "
         "lifts every scene with warmth and the photography shows the city at night in cold blue light").split()


def _feedback_log(path: Path, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = []
    for i in range(rows):
        prompt = f"Write a short review of film number {i} for a weekly newsletter."
        response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 110))).capitalize() + "."
        lines.append(json.dumps({"prompt": prompt, "response": response, "score": round(rng.uniform(1, 5), 2)}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class _StepClock(TrainerCallback):
    """Wall-clock time at the end of every optimizer step (data loading and logging included)."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


class _BatchRecorder(TrainerCallback):
    """Keeps a copy of every batch the trainer's data loader yields (its collate function, wrapped)."""

    def __init__(self):
        self.batches: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)  # under accelerate's wrapper
        collate = loader.collate_fn

        def recording_collate(examples):
            batch = collate(examples)
            self.batches.append({k: batch[k].clone() for k in ("input_ids", "attention_mask", "labels")})
            return batch

        loader.collate_fn = recording_collate


def _gcsl_run(data: Path, out: Path, steps: int, warmup: int, batch_size: int, lr: float):
    from gcsl.training.train import TrainConfig, train

    clock, recorder = _StepClock(), _BatchRecorder()
    cfg = TrainConfig(data=data, out=out, max_steps=warmup + steps, per_device_batch_size=batch_size,
                      learning_rate=lr, max_length=512,
                      # the bare loop does not checkpoint activations either (a 135M model needs no saving)
                      gradient_checkpointing=False,
                      # ordinary batches: this measures the loop's overhead; packing's gain is prefix_sharing.py's
                      prefix_sharing=False)
    train(cfg, callbacks=[clock, recorder])
    tokens = sum(int(b["attention_mask"].sum()) for b in recorder.batches[warmup:warmup + steps])
    seconds = clock.ends[warmup + steps - 1] - clock.ends[warmup - 1]
    return tokens, seconds, recorder.batches, cfg


def _bare_run(batches, cfg, steps: int, warmup: int):
    from peft import LoraConfig, get_peft_model

    from gcsl.models import choose_dtype, load_causal_lm

    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = choose_dtype(device)  # what `gcsl train --precision auto` picks
    # fp16 hardware: gcsl keeps fp32 weights under fp16 autocast; bf16: bf16 weights under bf16 autocast.
    model = load_causal_lm(cfg.model, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32,
                           device=device)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    tokens, start = 0, None
    for step, batch in enumerate(batches[:warmup + steps]):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            tokens += int(batch["attention_mask"].sum())
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    opts = parser.parse_args()
    if opts.warmup < 1:
        parser.error("--warmup must be at least 1 (the first step's time includes setup)")
    if opts.threads:
        torch.set_num_threads(opts.threads)

    from gcsl.data.prepare import PrepareConfig, prepare

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        log = _feedback_log(tmp / "log.jsonl", rows=64, seed=0)
        prepare(PrepareConfig(data=str(log), out=tmp / "prep", method="gcsl-bey-nl", score_range=[1.0, 5.0],
                              metric_name="rating", quiet=True))
        g_tokens, g_seconds, batches, cfg = _gcsl_run(tmp / "prep", tmp / "run", opts.steps, opts.warmup,
                                                      opts.batch_size, opts.lr)
        b_tokens, b_seconds = _bare_run(batches, cfg, opts.steps, opts.warmup)

    assert g_tokens == b_tokens, "both sides must see the same batches"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x {torch.get_num_threads()} threads"
    gcsl_tps, bare_tps = g_tokens / g_seconds, b_tokens / b_seconds
    print(f"device: {device}; {opts.steps} timed steps after {opts.warmup} warm-up; {g_tokens} tokens per side")
    print(f"gcsl train loop : {gcsl_tps:8.1f} tokens/s ({g_seconds:.1f} s)")
    print(f"bare LoRA loop  : {bare_tps:8.1f} tokens/s ({b_seconds:.1f} s)")
    print(f"ratio gcsl/bare : {gcsl_tps / bare_tps:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
