"""LLMEraser instance removal (Ding et al., ICLR 2025): unlearn rows from a trained LoRA adapter, no retraining.

One workflow, :func:`erase`, read top to bottom. The adapter was trained on the ``n`` rows of its prepared
data (``data``, e.g. ``sft-all``: every response); ``erase`` names the rows to remove (a prepared folder
of the same log, e.g. ``sft-bottom``: the worst-rated ones, matched by ``row_id``). With ``L_i`` the mean
next-token loss of row ``i``'s completion and ``H`` the Hessian of the training loss ``(1/n) sum_i L_i`` over
the adapter weights only, the weights move by

    delta = (H + damping I)^-1 b,    b = (1/n) sum_{i erased} grad L_i.

Why this sign: the retained rows' objective is the full one minus the erased rows' terms; one Newton step
from the trained weights, where the full gradient vanishes, is this ``delta`` (Koh & Liang 2017: removing a
row is up-weighting it by -1/n; LLMEraser's instance-removal case). What it predicts, to first order: the
erased rows' summed loss rises by ``n b^T delta`` (so their mean loss by ``n/|E| b^T delta``), positive
whenever ``H + damping I`` is positive definite, and at a stationary point the retained rows' part of the
training loss falls by ``b^T delta``.

``H^-1 b`` is never formed: as in the paper it is the minimiser of the finite-sum quadratic
``1/2 x^T (H + damping I) x - b^T x``, solved with Adam on one mini-batch Hessian-vector product per step
(``solver="adam"``, as ``cg_process_grad`` in the reference code's attack_demo.py; 20 such steps leave the
system far from solved, a relative residual near 0.9 on SmolLM2-135M, and that residual is recorded);
``solver="cg"`` runs conjugate gradient with full-batch products instead, which solves it, but only when the
damping exceeds the most negative curvature: a LoRA loss is a saddle in its A and B factors, so ``H`` is
indefinite (eigenvalues below -3 on SmolLM2-135M). Hessian-vector products are exact (double backward through
the loss). The model runs in float32 and eval mode (no LoRA dropout), so the loss whose curvature is used is a
deterministic function of the weights. ``hessian_rows`` estimates ``H`` on a fixed seeded sample of the training
rows when a product over all of them costs too much (each row is a double backward).

>>> erase(EraseConfig(model=Path("runs/sft-all"), data=Path("prep/sft-all"), erase=Path("prep/sft-bottom"),
...                   out=Path("runs/llmeraser")))  # doctest: +SKIP
EraseResult(out=PosixPath('runs/llmeraser'), erased=8, rows=32, ...)
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gcsl.config import config_to_dict, field
from gcsl.errors import DataError, StageError
from gcsl.runinfo import atomic_dir, write_run_record
from gcsl.stages import ModelFolder

if TYPE_CHECKING:
    import torch

__all__ = ["EraseConfig", "EraseResult", "erase", "load_trainable_adapter", "tokenized_rows", "row_losses",
           "loss_gradient", "hessian_vector_product", "solve_influence", "add_to_parameters"]

IGNORE = -100
# Files of the full adapter's folder that the erased one does not inherit: its weights and records are its own.
_NOT_COPIED = {"adapter_model.safetensors", "adapter_model.bin", "run.json", "train_metrics.json", "trainer_state.json",
               "README.md", "logs", "checkpoints"}


@dataclass
class EraseConfig:
    model: Path = field(help="`gcsl train` output folder of the LoRA adapter to unlearn from, trained on every row of "
                             "--data (e.g. method sft-all)")
    data: Path = field(help="prepared data the adapter was trained on (train.parquet): the n rows of the Hessian")
    erase: Path = field(help="prepared data of the rows to remove (train.parquet of the same log, e.g. sft-bottom), "
                             "matched to --data by row_id")
    out: Path = field(help="output folder: the unlearned adapter, loadable like any `gcsl train` output")
    solver: Literal["adam", "cg"] = field("adam", help="how (H + damping I) x = b is solved: adam (the paper's "
                                                       "stochastic minimisation of the quadratic, one mini-batch "
                                                       "Hessian-vector product per step) or cg (conjugate gradient, "
                                                       "full-batch products)")
    # The solver's defaults: LLMEraser's reference code, attack_demo.py arguments (x_iter 20, x_lr 1e-5,
    # x_init 1e-6, x_adjust 1e-5 as Adam's weight decay, x_batch 1).
    iterations: int = field(20, help="solver steps (paper: 20)")
    learning_rate: float = field(1e-5, help="adam: step size on the quadratic (paper: 1e-5)")
    init: float = field(1e-6, help="adam: the value every entry of x starts from (paper: 1e-6)")
    damping: float = field(1e-5, help="added to the Hessian's diagonal, H + damping I (paper: 1e-5, as Adam's "
                                      "weight decay on x)")
    batch_size: int = field(1, help="adam: training rows per Hessian-vector product (paper: 1); also the "
                                    "batch of the full-batch passes")
    tolerance: float = field(1e-6, help="cg: stop once the relative residual falls below it")
    # Each Hessian-vector product costs a double backward per row (about 2 s per 100-token row on one CPU thread
    # for SmolLM2-135M), so a CG step over hundreds of rows takes minutes; a fixed sample estimates the same mean.
    hessian_rows: int = field(0, help="training rows that estimate H, drawn once with --seed (0: all of them); the "
                                      "solver and the recorded residual both use this estimate")
    max_length: int = field(1024, help="longest tokenized prompt + completion (as `gcsl train`)")
    seed: int = field(0, help="seed of the adam solver's mini-batch order")
    overwrite: bool = field(False, help="replace an existing --out")

    def validate(self) -> list[str]:
        problems = []
        for name in ("iterations", "learning_rate", "batch_size", "max_length", "tolerance"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}: must be positive, got {getattr(self, name)}")
        if self.hessian_rows < 0:
            problems.append(f"hessian_rows: must be >= 0 (0 uses every row), got {self.hessian_rows}")
        for name in ("damping", "init"):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value >= 0 or name == "init")):
                problems.append(f"{name}: must be {'>= 0 and ' if name == 'damping' else ''}finite, got {value}")
        if not (Path(self.model) / "adapter_config.json").is_file():
            problems.append(f"model: {self.model} holds no adapter_config.json; give a `gcsl train` output folder")
        for name in ("data", "erase"):
            if not (Path(getattr(self, name)) / "train.parquet").is_file():
                problems.append(f"{name}: {getattr(self, name)} holds no train.parquet; give a `gcsl prepare` output "
                                "folder")
        if Path(self.out).resolve() == Path(self.model).resolve():
            problems.append("out: must differ from --model (the full adapter is kept)")
        elif Path(self.out).is_dir() and any(Path(self.out).iterdir()) and not self.overwrite:
            problems.append(f"out: {self.out} exists and is not empty; pass --overwrite or choose another --out")
        return problems


@dataclass
class EraseResult:
    """What :func:`erase` did: the new folder and the numbers its run.json records."""

    out: Path
    erased: int
    rows: int
    residual: float | None
    seconds: float
    losses: dict[str, float | None]


def erase(cfg: EraseConfig) -> EraseResult:
    """Writes ``cfg.out``: the adapter of ``cfg.model`` with the rows of ``cfg.erase`` unlearned (see the module)."""
    import torch

    started = time.perf_counter()
    # 1. The rows: every training row, and which of them to erase.
    prompts, completions, erased = _training_rows(Path(cfg.data), Path(cfg.erase))
    gone = set(erased)
    retained = [i for i in range(len(prompts)) if i not in gone]
    folder = ModelFolder(cfg.model)
    if folder.state != "complete":
        raise StageError(f"model: {cfg.model} is not a finished `gcsl train` output (no run.json); train it first")

    # 2. The adapter, trainable, and the rows tokenized as `gcsl train` tokenized them.
    model, tokenizer = load_trainable_adapter(Path(cfg.model))
    params = [p for p in model.parameters() if p.requires_grad]
    rows = tokenized_rows(prompts, completions, tokenizer, cfg.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    before = _split_losses(model, rows, erased, retained, cfg.batch_size, pad)

    # 3. b = (1/n) sum of the erased rows' gradients; x = (H + damping I)^-1 b; the weights move by x.
    residual, curvature_rows, products = None, rows, 0  # products: Hessian-vector products the solver used
    if erased:
        b = loss_gradient(model, params, [rows[i] for i in erased], cfg.batch_size, pad) / len(rows)
        generator = torch.Generator().manual_seed(cfg.seed)
        if 0 < cfg.hessian_rows < len(rows):
            curvature_rows = [rows[i] for i in sorted(torch.randperm(len(rows), generator=generator)[:cfg.hessian_rows]
                                                      .tolist())]

        def full(v: torch.Tensor) -> torch.Tensor:
            return hessian_vector_product(model, params, curvature_rows, v, cfg.batch_size, pad)

        def sampled(v: torch.Tensor) -> torch.Tensor:
            picked = torch.randint(len(curvature_rows), (cfg.batch_size,), generator=generator).tolist()
            return hessian_vector_product(model, params, [curvature_rows[i] for i in picked], v, cfg.batch_size, pad)

        def counted(v: torch.Tensor) -> torch.Tensor:
            nonlocal products
            products += 1
            return sampled(v) if cfg.solver == "adam" else full(v)

        x = solve_influence(counted, b, solver=cfg.solver, iterations=cfg.iterations, damping=cfg.damping,
                            learning_rate=cfg.learning_rate, init=cfg.init, tolerance=cfg.tolerance)
        # How well x solves the damped system, by one product over all of H's rows (the adam solver never sees
        # one); not one of the solver's products.
        residual = float((full(x) + cfg.damping * x - b).norm() / b.norm().clamp_min(1e-30))
        add_to_parameters(params, x)
    after = _split_losses(model, rows, erased, retained, cfg.batch_size, pad) if erased else before
    seconds = time.perf_counter() - started

    # 4. The new folder: the full adapter's tokenizer and goals, the moved weights, a run record.
    losses = {"erased_before": before[0], "retained_before": before[1], "erased_after": after[0],
              "retained_after": after[1]}
    with atomic_dir(Path(cfg.out), overwrite=cfg.overwrite) as work:
        for item in Path(cfg.model).iterdir():
            if item.name not in _NOT_COPIED:
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, work / item.name)
        model.save_pretrained(str(work))
        # save_pretrained names the base as the live model knows it; keep the full adapter's record of it.
        shutil.copy2(Path(cfg.model) / "adapter_config.json", work / "adapter_config.json")
        full_record = _read_record(folder.path)
        # `config` stays the full adapter's training config (its `model` is the base that gcsl.models loads a
        # built-in base by), with the erase settings beside it.
        write_run_record(work, stage="erase", config=cfg, seed=cfg.seed, goals=full_record.get("goals"), extra={
            "status": "finished", "method": "llmeraser", "config": {**full_record.get("config", {}),
                                                                    "erase": config_to_dict(cfg)},
            "base_model": full_record.get("base_model"), "full_adapter": str(cfg.model), "rows": len(rows),
            "erased_rows": len(erased), "retained_rows": len(retained),
            "hessian_rows": len(curvature_rows) if erased else 0, "adapter_parameters": sum(p.numel() for p in params),
            "solver": {k: getattr(cfg, k) for k in ("solver", "iterations", "learning_rate", "init", "damping",
                                                    "batch_size", "tolerance", "hessian_rows")},
            "hessian_products": products, "relative_residual": residual,
            "erase_seconds": round(seconds, 3), "losses": losses})
    return EraseResult(out=Path(cfg.out), erased=len(erased), rows=len(rows), residual=residual, seconds=seconds,
                       losses=losses)


# -- the pieces (public for tests and measurements) ---------------------------------------------

def load_trainable_adapter(folder: Path):
    """``(PeftModel, tokenizer)``: a `gcsl train` output on its base model, float32, LoRA weights trainable, eval mode."""
    import torch
    from peft import PeftModel

    from gcsl.models import default_device, library_deprecations_silenced, load_causal_lm, load_tokenizer

    base = _read_record(folder).get("config", {}).get("model")
    if not base:
        raise StageError(f"{folder / 'run.json'}: the base model (config.model) is missing; re-run `gcsl train`")
    # Only goal-free methods are erased from (gcsl.methods checks `erases`), so no goal token grew the vocabulary:
    # the base model's embedding matrix fits the adapter as it is.
    tokenizer = load_tokenizer(str(folder))
    # float32 whatever the hardware: second derivatives in 16 bits would drown the update in rounding.
    model = load_causal_lm(base, dtype=torch.float32, device=default_device())
    try:
        with library_deprecations_silenced():
            model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise StageError(f"{folder}: cannot load the adapter onto {base!r} ({exc}); check the base model") from None
    model.eval()
    return model, tokenizer


def tokenized_rows(prompts: Sequence[Any], completions: Sequence[Any], tokenizer,
                   max_length: int | None) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per row, exactly as `gcsl train` (TRL) tokenizes prompt-completion rows."""
    from gcsl.training.packing import tokenize_prompt_completion

    rows = [tokenize_prompt_completion(p, c, tokenizer, max_length=max_length) for p, c in zip(prompts, completions)]
    empty = [i for i, (_, labels) in enumerate(rows) if all(x == IGNORE for x in labels)]
    if empty:
        raise DataError(f"row {empty[0]}: no completion token is left within max_length {max_length}; raise "
                        "--max-length")
    return rows


def add_to_parameters(params: list, vector: torch.Tensor, scale: float = 1.0) -> None:
    """Adds ``scale * vector`` (flat, in the order of ``params``) to the parameters in place."""
    import torch

    with torch.no_grad():
        offset = 0
        for p in params:
            p.add_(scale * vector[offset:offset + p.numel()].view_as(p).to(p.dtype))
            offset += p.numel()


def row_losses(model, rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Each row's mean next-token loss over its completion tokens (one padded batch; differentiable)."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([i + [pad_id] * (width - len(i)) for i, _ in rows], device=device)
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows], device=device)
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows], device=device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32, never less than the model
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
    scored = (target != IGNORE).float()
    return (nll * scored).sum(1) / scored.sum(1)


def _batches(rows: Sequence, size: int):
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def loss_gradient(model, params: list, rows: Sequence, batch_size: int, pad_id: int) -> torch.Tensor:
    """The gradient of the rows' summed losses over ``params``, flattened."""
    import torch

    total = None
    for batch in _batches(rows, batch_size):
        grads = torch.autograd.grad(row_losses(model, batch, pad_id).sum(), params)
        flat = torch.cat([g.reshape(-1) for g in grads])
        total = flat if total is None else total + flat
    return total


def hessian_vector_product(model, params: list, rows: Sequence, vector: torch.Tensor, batch_size: int,
                           pad_id: int) -> torch.Tensor:
    """``H v`` for ``H`` the Hessian over ``params`` of the rows' mean loss, by double backward."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    total = torch.zeros_like(vector)
    for batch in _batches(rows, batch_size):
        # The fused attention kernels have no second derivative; the plain (math) one does.
        with sdpa_kernel(SDPBackend.MATH):
            losses = row_losses(model, batch, pad_id)
        grads = torch.autograd.grad(losses.sum(), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        hv = torch.autograd.grad(flat @ vector.detach(), params)
        total += torch.cat([h.reshape(-1) for h in hv])
    return total / len(rows)


def solve_influence(hvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *, solver: str, iterations: int,
                    damping: float, learning_rate: float = 1e-5, init: float = 1e-6,
                    tolerance: float = 1e-6) -> torch.Tensor:
    """Approximately ``(H + damping I)^-1 b`` from products ``hvp(v) = H v``.

    ``adam`` (LLMEraser): minimises ``1/2 x^T (H + damping I) x - b^T x`` with Adam, whose gradient
    ``H x - b`` takes one product per step and whose weight decay adds the ``damping x`` term, starting
    from every entry at ``init``. ``cg``: conjugate gradient from zero, stopped at ``tolerance``; a
    StageError if ``H + damping I`` shows negative curvature (CG needs it positive definite).
    """
    import torch

    if solver == "adam":
        x = torch.full_like(b, init, requires_grad=True)
        optimizer = torch.optim.Adam([x], lr=learning_rate, weight_decay=damping)
        for _ in range(iterations):
            optimizer.zero_grad()
            x.grad = hvp(x.detach()) - b
            optimizer.step()
        return x.detach()
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    for _ in range(iterations):
        if rr.sqrt() <= tolerance * b.norm():
            break
        ap = hvp(p) + damping * p
        curvature = p @ ap
        if curvature <= 0:
            # A LoRA adapter's loss is a saddle in (A, B): its Hessian has negative eigenvalues, and the damped
            # system then has no minimiser for CG to find.
            raise StageError(f"solver cg: the damped Hessian H + {damping:g} I has negative curvature "
                             f"({float(curvature / (p @ p)):.3g} along a search direction); raise --damping above "
                             "the most negative eigenvalue's size or use --solver adam")
        step = rr / curvature
        x += step * p
        r -= step * ap
        rr, previous = r @ r, rr
        p = r + (rr / previous) * p
    return x


# -- private ----------------------------------------------------------------------------------

def _training_rows(data: Path, erase_dir: Path) -> tuple[list, list, list[int]]:
    """The adapter's training rows (prompt, completion) and the positions among them of the rows to erase."""
    import pyarrow.parquet as pq

    tables = {}
    for path in (data, erase_dir):
        parquet = path / "train.parquet"
        names = pq.read_schema(parquet).names
        missing = [c for c in ("prompt", "completion", "row_id") if c not in names]
        if missing:
            raise DataError(f"{parquet}: column(s) {', '.join(missing)} missing; re-run `gcsl prepare`")
        tables[path] = pq.read_table(parquet, columns=["prompt", "completion", "row_id"]).to_pydict()
    full, gone = tables[data], tables[erase_dir]
    if not full["row_id"]:
        raise DataError(f"{data / 'train.parquet'}: no training rows; check `gcsl prepare`'s report")
    if len(set(full["row_id"])) != len(full["row_id"]):
        raise DataError(f"{data / 'train.parquet'}: a feedback row appears more than once (a goal expansion); the "
                        "adapter to erase from must train on each row once, e.g. method sft-all")
    where = {row: i for i, row in enumerate(full["row_id"])}
    erased = []
    for row, completion in zip(gone["row_id"], gone["completion"]):
        i = where.get(row)
        if i is None or full["completion"][i] != completion:
            raise DataError(f"{erase_dir / 'train.parquet'}: row_id {row} is not a row of {data / 'train.parquet'}; "
                            "prepare both folders from the same feedback log")
        erased.append(i)
    return full["prompt"], full["completion"], sorted(set(erased))


def _split_losses(model, rows: list, erased: list[int], retained: list[int], batch_size: int,
                  pad_id: int) -> tuple[float | None, float | None]:
    """Mean loss of the erased rows and of the retained rows (None for an empty set)."""
    import torch

    def mean(indices: list[int]) -> float | None:
        if not indices:
            return None
        with torch.no_grad():
            chosen = [rows[i] for i in indices]
            return float(torch.cat([row_losses(model, b, pad_id) for b in _batches(chosen, batch_size)]).mean())

    return mean(erased), mean(retained)


def _read_record(folder: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads((Path(folder) / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageError(f"{folder / 'run.json'}: cannot read it ({exc}); re-run `gcsl train`") from None
