"""`gcsl probe`: does the goal control the model? A forward-pass test, no generation.

For a trained goal-conditioned model and held-out feedback rows, the probe scores every row's
logged response under every goal the model was trained on: the mean per-token log-probability
of the response given the prompt with that goal placed exactly as training placed it. Rows are
grouped by the bin their score falls in (the model's own thresholds), which gives a matrix

    M[b, g] = mean over rows of bin b of  log p(response | prompt, goal g) / tokens

and one number, the **sensitivity**: how much more the highest goal favours top-bin responses
over bottom-bin responses than the lowest goal does,

    S = (M[top, high] - M[bottom, high]) - (M[top, low] - M[bottom, low]),

computed per row as d = log p(. | high goal) - log p(. | low goal), S = mean_top(d) - mean_bottom(d),
with a bootstrap interval that resamples the rows of each of the two bins. S > 0 means asking for
more shifts probability toward the responses that scored more; S near 0 means the model ignores
the goal, whatever its outputs look like on average. A few hundred forward passes: minutes on a CPU.

The two extreme bins may hold few held-out rows, so the probe also reports the **trend**, which
uses every row: the least-squares slope of d on the row's bin (nats per token per level), with a
bootstrap interval over rows. Both say the same thing when the goal steers; the trend is tighter.

Writes ``OUT/probe.json`` (matrix, sensitivity, interval, counts, goals), ``OUT/rows.jsonl`` (each
row's log-probabilities, so the numbers can be re-analysed), ``OUT/probe.png`` (a heatmap of the
matrix with each bin's mean over goals subtracted, which shows the goal's effect alone) and
``OUT/run.json``, all appearing together once the probe has finished.

A multi-aspect model is probed one aspect at a time (``--aspect``): that aspect's goal runs over its trained
levels while every other aspect asks for its top goal, and rows are binned by that aspect's own column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gcsl.config import field
from gcsl.errors import ConfigError, DataError, StageError
from gcsl.runinfo import atomic_dir, atomic_write_json, write_run_record
from gcsl.stages import ModelFolder, write_jsonl

__all__ = ["ProbeConfig", "ProbeGoal", "probe_goals", "run_probe", "sensitivity", "trend"]


@dataclass
class ProbeConfig:
    model: str = field(help="a `gcsl train` output folder (adapter + goals.json) or a merged model folder with "
                            "goals.json")
    data: str = field(help="held-out feedback rows (JSONL, CSV, Parquet or a dataset), same columns as for "
                           "`gcsl prepare`; rows the model trained on overstate the goal's effect")
    out: Path = field(help="output folder for probe.json, rows.jsonl, probe.png and run.json")
    prompt_column: str = field("prompt", help="column holding the prompt (text or chat messages)")
    response_column: str = field("response", help="column holding the logged response")
    score_column: str = field("score", help="column holding the feedback score (multi-aspect models: each "
                                            "aspect reads the column it was trained on)")
    aspect: str | None = field(None, help="multi-aspect models: the aspect whose goal is varied, by name or column "
                                          "(default: the first); it runs over that aspect's trained levels while "
                                          "every other aspect asks for its top goal, and rows are binned by its "
                                          "column")
    limit: int | None = field(None, help="use only the first N rows")
    batch_size: int = field(8, help="sequences per forward pass")
    max_length: int = field(1024, help="longest prompt + response in tokens (longer ones are cut at the end, "
                                       "as in training)")
    ci_samples: int = field(2000, help="bootstrap resamples for the sensitivity interval")
    confidence: float = field(0.95, help="interval confidence")
    seed: int = field(0, help="bootstrap seed")
    device: str | None = field(None, help="cuda, cpu...; default: cuda if available, else cpu")
    overwrite: bool = field(False, help="replace an existing output folder")

    def validate(self) -> list[str]:
        problems = []
        for name in ("batch_size", "max_length", "ci_samples"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 2:
            problems.append(f"limit: the probe needs at least 2 rows, got {self.limit}")
        if not 0 < self.confidence < 1:
            problems.append(f"confidence: must be in (0, 1), got {self.confidence}")
        return problems


@dataclass(frozen=True)
class ProbeGoal:
    """One requested goal: its level, threshold (display units), label, and text or scalar value."""

    level: int
    threshold: float
    label: str
    text: str | None
    value: float | None = None


def probe_goals(setup, aspect: int | None = None) -> list[ProbeGoal]:
    """The goals the model trained on, lowest first: retained levels for beyond methods, all levels otherwise.

    No-quantization methods trained on raw scores, so they are asked for each bin's threshold. For a
    multi-aspect setup, ``aspect`` (an index) runs over its own trained levels, every other aspect at its
    top goal (:func:`gcsl.goals.aspects.aspect_inference_goal`).

    >>> from gcsl.goals import GoalSetup
    >>> from gcsl.goals.render import default_templates
    >>> from gcsl.goals.spec import MetricSpec
    >>> spec = MetricSpec(name="quality", low=0, high=1)
    >>> s = GoalSetup("gcsl-bey-snl", spec, (0.2, 0.5, 0.8), (2, 3), 0.45, 3, default_templates(spec))
    >>> [(g.level, g.text) for g in probe_goals(s)]  # doctest: +NORMALIZE_WHITESPACE
    [(2, 'Generate a response with a quality score greater than 0.50.'),
     (3, 'Generate a response with a quality score greater than 0.80.')]
    """
    from gcsl.methods import get_method

    method = get_method(setup.method)
    # One aspect of a multi-aspect setup: its levels and metric, labelled with its name.
    view = setup.aspects[aspect] if aspect is not None else setup
    prefix = f"{view.metric.name} " if aspect is not None else ""
    goals = []
    for k in view.trained_levels if method.is_goal_conditioned else ():
        threshold = view.threshold_display(k)
        label = f"{prefix}L{k} ({view.metric.format_value(threshold)})"
        if aspect is not None:
            from gcsl.goals.aspects import aspect_inference_goal

            request = f"{view.metric.name}=level:{k}"
            goals.append(ProbeGoal(k, threshold, label, aspect_inference_goal(setup, request, quiet=True).text))
        elif method.goal_input == "embedding":
            goals.append(ProbeGoal(k, threshold, label, None, setup.metric.round(threshold)))
        elif method.goal_request == "value":
            goals.append(ProbeGoal(k, threshold, label, setup.value_text(setup.metric.round(threshold))))
        else:
            goals.append(ProbeGoal(k, threshold, label, setup.goal_text(k)))
    return goals


def sensitivity(delta: np.ndarray, bins: np.ndarray, *, confidence: float = 0.95, n_boot: int = 2000,
                seed: int = 0):
    """Mean of ``delta`` over the top bin minus over the bottom bin, with a bootstrap interval.

    ``delta`` is each row's log p under the highest goal minus under the lowest; top and bottom are
    the highest and lowest bins that hold rows.

    >>> r = sensitivity(np.array([0.3, 0.5, 0.0, 0.0]), np.array([5, 5, 1, 1]), n_boot=50)
    >>> round(r.mean, 6), r.n
    (0.4, 4)
    """
    from gcsl.metrics.stats import difference_ci

    present = np.unique(bins)
    if present.size < 2:
        raise DataError("the probe needs rows from at least two score bins; give held-out rows whose scores "
                        "differ more")
    top, bottom = delta[bins == present.max()], delta[bins == present.min()]
    return difference_ci(top, bottom, confidence=confidence, n_boot=n_boot, seed=seed)


def trend(delta: np.ndarray, bins: np.ndarray, *, confidence: float = 0.95, n_boot: int = 2000,
          seed: int = 0) -> tuple[float, float, float]:
    """Least-squares slope of ``delta`` on ``bins`` with a percentile bootstrap interval over rows.

    Resamples in which every row has the same bin have no slope and are left out.

    >>> slope, low, high = trend(np.array([0.0, 0.1, 0.2, 0.3]), np.array([1, 2, 3, 4]), n_boot=50)
    >>> round(slope, 6), round(low, 6), round(high, 6)
    (0.1, 0.1, 0.1)
    """
    x, y = bins.astype(np.float64), delta.astype(np.float64)

    def slope(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        xc = xs - xs.mean(-1, keepdims=True)
        var = (xc * xc).sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (xc * (ys - ys.mean(-1, keepdims=True))).sum(-1) / var

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    boot = slope(x[idx], y[idx])
    boot = boot[np.isfinite(boot)]
    alpha = 1.0 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2]) if boot.size else (np.nan, np.nan)
    return float(slope(x, y)), float(low), float(high)


def run_probe(cfg: ProbeConfig) -> dict[str, Any]:
    """Scores held-out responses under every trained goal; writes and returns the probe summary.

    >>> run_probe(ProbeConfig(model="runs/gcsl-bey-nl", data="validation.jsonl", out=Path("probe")))  # doctest: +SKIP
    {'sensitivity': 0.031, 'ci_low': 0.012, 'ci_high': 0.05, ...}
    """
    from gcsl.data.load import read_feedback, validate_feedback
    from gcsl.goals.quantize import assign_levels
    from gcsl.models import load_for_inference

    problems = cfg.validate()
    if problems:
        raise ConfigError("invalid ProbeConfig: " + "; ".join(problems))
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise StageError(f"{out}: output directory exists and is not empty; pass --overwrite or choose another --out")

    # 1. The model and the goals it trained on.
    setup = ModelFolder(Path(cfg.model)).goal_setup()
    if setup is None:
        raise ConfigError(f"{cfg.model}: no goals.json beside the weights, so there is no goal to probe; give a "
                          "`gcsl train` output folder of a goal-conditioned method")
    # A multi-aspect model is probed one aspect at a time: that aspect's metric, thresholds and column.
    aspect = _aspect_index(setup, cfg.aspect, cfg.model)
    view = setup.aspects[aspect] if aspect is not None else setup
    score_column = view.extra.get("column", cfg.score_column) if aspect is not None else cfg.score_column
    goals = probe_goals(setup, aspect)
    if len(goals) < 2:
        raise ConfigError(f"{cfg.model}: method {setup.method} trained {len(goals)} goal(s); the probe compares "
                          "at least two (goal-free methods have none, a filtered expansion may keep one)")
    lm = load_for_inference(cfg.model, device=cfg.device)

    # 2. Held-out rows, each in its bin by the model's own thresholds.
    table, fmt = read_feedback(cfg.data, prompt_column=cfg.prompt_column, response_column=cfg.response_column,
                               score_column=score_column)
    if cfg.limit is not None:
        table = table.slice(0, cfg.limit)
    log = validate_feedback(table, cfg.data, fmt, view.metric, bins=1)
    scores = np.asarray(log.table.column("score").to_numpy(), dtype=np.float64)
    oriented = view.metric.orient(scores)
    # Held-out scores may fall below the lowest training score: they belong to the bottom bin.
    bins = np.maximum(assign_levels(oriented, view.thresholds), 1)
    prompts = log.table.column("prompt").to_pylist()
    responses = log.table.column("response").to_pylist()

    # 3. log p(response | prompt with goal g) for every row and goal.
    logp, tokens = _score_rows(lm, setup, goals, prompts, responses, cfg)

    # 4. The matrix, the sensitivity and its interval.
    levels = list(view.levels)
    matrix = [[float(logp[bins == b, j].mean()) if np.any(bins == b) else None for j in range(len(goals))]
              for b in levels]
    result = sensitivity(logp[:, -1] - logp[:, 0], bins, confidence=cfg.confidence, n_boot=cfg.ci_samples,
                         seed=cfg.seed)
    present = sorted(set(int(b) for b in bins))
    slope, slope_low, slope_high = trend(logp[:, -1] - logp[:, 0], bins, confidence=cfg.confidence,
                                         n_boot=cfg.ci_samples, seed=cfg.seed)
    summary = {
        "model": str(cfg.model),
        "method": setup.method,
        **({"aspect": view.metric.name, "score_column": score_column} if aspect is not None else {}),
        "data": str(cfg.data),
        "n_rows": int(len(bins)),
        "sensitivity": result.mean,
        "ci_low": result.low,
        "ci_high": result.high,
        "trend": slope,
        "trend_low": slope_low,
        "trend_high": slope_high,
        "confidence": cfg.confidence,
        "ci_samples": cfg.ci_samples,
        "top_bin": present[-1],
        "bottom_bin": present[0],
        "rows_per_bin": {str(b): int(np.sum(bins == b)) for b in levels},
        "goal_labels": [g.label for g in goals],
        "goal_levels": [g.level for g in goals],
        "goals": [g.text if g.text is not None else g.value for g in goals],
        "bin_labels": [f"bin {b} (>= {view.metric.format_value(view.threshold_display(b))})" for b in levels],
        "matrix": matrix,
        "matrix_centered": _centered(matrix),
        "mean_tokens": float(tokens.mean()),
        "note": result.note,
    }

    # 5. Outputs appear together, only once everything is computed.
    with atomic_dir(out, overwrite=cfg.overwrite) as tmp:
        atomic_write_json(tmp / "probe.json", summary)
        write_jsonl(tmp / "rows.jsonl", [{"row": i, "score": float(scores[i]), "bin": int(bins[i]),
                                          "tokens": int(tokens[i]),
                                          "logp": {g.label: float(logp[i, j]) for j, g in enumerate(goals)}}
                                         for i in range(len(bins))])
        plot_probe(summary, tmp / "probe.png")
        write_run_record(tmp, stage="probe", config=cfg, seed=cfg.seed, goals=setup.to_json(),
                         extra={"sensitivity": result.mean, "ci_low": result.low, "ci_high": result.high})
    return summary


def _aspect_index(setup, wanted: str | None, model: str) -> int | None:
    """The probed aspect's index in a multi-aspect setup (None for a single-aspect one)."""
    if not hasattr(setup, "aspects"):
        if wanted is not None:
            raise ConfigError(f"aspect: {model} has one goal aspect ({setup.metric.name}); drop --aspect")
        return None
    if wanted is None:
        return 0
    for i, a in enumerate(setup.aspects):
        if wanted in (a.metric.name, a.extra.get("column")):
            return i
    raise ConfigError(f"aspect: {model} has no aspect {wanted!r}; its aspects are {', '.join(setup.names)}")


def _score_rows(lm, setup, goals: list[ProbeGoal], prompts: list, responses: list[str],
                cfg: ProbeConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rows x goals) mean per-token log p of each response, and each response's token count."""
    import torch

    from gcsl.goals.render import training_row
    from gcsl.methods import get_method
    from gcsl.training.packing import tokenize_prompt_completion

    tokenizer, model = lm.tokenizer, lm.model
    embedding = None
    if get_method(setup.method).goal_input == "embedding":
        from gcsl.goal_embedding import load_goal_embedding

        embedding = load_goal_embedding(model, cfg.model)
        if embedding is None:
            raise StageError(f"{cfg.model}: method {setup.method} needs its goal embedding (goal_embedding.json) "
                             "beside the weights; re-run `gcsl train`")
    items = []  # (row, goal index, input ids, labels)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        for j, goal in enumerate(goals):
            row = training_row(prompt, goal.text, response, setup.placement, setup.separator,
                               chat=isinstance(prompt, list))
            ids, labels = tokenize_prompt_completion(*row, tokenizer, max_length=cfg.max_length)
            if all(t == -100 for t in labels[1:]):
                raise DataError(f"{cfg.data}: row {i}: no response token fits in --max-length {cfg.max_length}; "
                                "raise it")
            items.append((i, j, ids, labels))
    logp = np.zeros((len(prompts), len(goals)))
    tokens = np.zeros(len(prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(items)), key=lambda k: len(items[k][2]))  # similar lengths share a batch
    device = model.device
    for start in range(0, len(order), cfg.batch_size):
        batch = [items[k] for k in order[start:start + cfg.batch_size]]
        width = max(len(b[2]) for b in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (_, _, ids, lab) in enumerate(batch):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            labels[r, :len(lab)] = torch.tensor(lab)
            mask[r, :len(ids)] = 1
        inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
        with torch.inference_mode():
            if embedding is not None:
                from gcsl.goal_embedding import apply_goal_embedding, insert_before_first_token

                values = torch.tensor([goals[j].value for _, j, _, _ in batch], dtype=torch.float32)
                embeds, new_mask = apply_goal_embedding(model, inputs["input_ids"], inputs["attention_mask"],
                                                        values.to(device))
                labels = insert_before_first_token(labels, mask, -100)
                inputs = {"inputs_embeds": embeds, "attention_mask": new_mask}
            logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        targets = labels[:, 1:].to(logits.device)
        keep = targets != -100
        token_logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        sums = (token_logp * keep).sum(-1).cpu().numpy()
        counts = keep.sum(-1).cpu().numpy()
        for r, (i, j, _, _) in enumerate(batch):
            logp[i, j] = sums[r] / counts[r]
            tokens[i] = counts[r]
    return logp, tokens


def _centered(matrix: list[list[float | None]]) -> list[list[float | None]]:
    """Each bin's row minus its mean over goals: what the goal adds, without the bin's own likelihood."""
    out = []
    for row in matrix:
        if any(v is None for v in row):
            out.append([None] * len(row))
            continue
        mean = sum(row) / len(row)
        out.append([v - mean for v in row])
    return out


def plot_probe(summary: dict[str, Any], path: Path) -> Path | None:
    """Heatmap of the centred matrix (bins x goals); None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    data = np.array([[np.nan if v is None else v for v in row] for row in summary["matrix_centered"]])
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * data.shape[1], 1.2 + 0.55 * data.shape[0]))
    limit = np.nanmax(np.abs(data)) if np.isfinite(data).any() else 1.0
    image = ax.imshow(data, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", origin="lower")
    ax.set_xticks(range(data.shape[1]), summary["goal_labels"], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(data.shape[0]), [f"{label}, n={n}" for label, n in
                                         zip(summary["bin_labels"], summary["rows_per_bin"].values())], fontsize=8)
    for (r, c), v in np.ndenumerate(data):
        if np.isfinite(v):
            ax.text(c, r, f"{v:+.3f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("requested goal")
    ax.set_ylabel("response's score bin")
    ax.set_title(f"{summary['method']}: sensitivity {summary['sensitivity']:+.4f} "
                 f"[{summary['ci_low']:+.4f}, {summary['ci_high']:+.4f}] nats/token, n={summary['n_rows']}",
                 fontsize=9)
    fig.colorbar(image, ax=ax, label="log p per token minus the bin's mean")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
