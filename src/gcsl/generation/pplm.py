"""PPLM (Dathathri et al., ICLR 2020), discriminator variant: sampling from the base model while gradient
steps on its key/value history push an attribute classifier towards the desired class.

Two parts:

* :func:`train_classifier` fits the attribute model: one linear layer on the base model's mean final
  hidden state (the paper's discriminator head; uber-research/PPLM run_pplm_discrim_train.py, whose
  language model stays frozen). Its two classes come from the feedback log: *desired* = the rows SFT
  keeps (the top ``sft_top`` fraction by oriented score, or those at or above ``sft_cutoff``),
  *undesired* = the rows sft-bottom keeps, i.e. exactly DExperts' expert and anti-expert data. Binary,
  not regression, because PPLM's loss is the cross-entropy towards a class; top against bottom, not a
  fixed threshold, because logged scores are often skewed (most RealToxicityPrompts continuations are
  barely toxic) and the two fractions keep the classes balanced whatever the metric. A held-out part
  of the rows measures its accuracy. The folder holds ``classifier.safetensors``, ``classifier.json``
  (its shape, classes, base model and accuracies), ``train_metrics.json`` and ``run.json``, written
  whole or not at all.
* :class:`PPLMModel` samples like a model (``generate``): at every step the history ``H_t`` (the key and
  value tensors of every layer) gets ``num_iterations`` normalised gradient steps ``dH -= step_size *
  g / ||g||^gamma`` on the classifier's cross-entropy towards *desired* plus ``kl_scale`` x KL(perturbed
  || unperturbed next-token distribution); the classifier reads the mean of the unperturbed hidden
  states of the text so far, the perturbed one of the newest token and ``horizon`` more positions fed
  the expected next-token embedding. The next token is drawn from the geometric mean
  ``p_pert^gm_scale * p_unpert^(1 - gm_scale)``, through the same temperature / top-k / top-p warpers
  as plain sampling. The perturbed history is kept for the next step, as in the reference.

Differences from the reference run_pplm.py, all for batches of left-padded prompts: gradients are
normalised per sequence (the reference has one sequence); ``window`` covers the newest positions of
the history (the reference's mask covers the oldest ones); temperature acts on the fused distribution
(the reference divides only the perturbed logits; at temperature 1, the paper's, they agree). With
``step_size = 0`` or ``num_iterations = 0`` the history is never perturbed, the two distributions are
one and the scores are the base model's own logits, so samples follow the base model.

Only the perturbation receives gradients: the model's weights are frozen (``requires_grad`` off).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gcsl.config import field, resolve_config
from gcsl.errors import DataError, StageError

__all__ = ["ClassifierConfig", "CLASSIFIER_SET_BY_RUNNER", "PPLMSettings", "AttributeClassifier", "PPLMModel",
           "train_classifier", "load_classifier", "load_pplm", "settings_problems"]

CLASSES = ("undesired", "desired")
DESIRED = CLASSES.index("desired")
_WEIGHTS, _META = "classifier.safetensors", "classifier.json"
# The reference adds this to probabilities at or below it before taking the KL's logarithms.
_SMALL = 1e-15


# ClassifierConfig options `gcsl experiment` sets itself for method pplm (its `classifier` block may not).
CLASSIFIER_SET_BY_RUNNER = ("model", "data", "out", "seed", "overwrite", "prepare")


@dataclass
class ClassifierConfig:
    model: str = field(help="base model whose mean final hidden state the classifier reads (the model PPLM steers)")
    data: str = field(help="feedback log (JSONL/CSV/Parquet/dataset), read as `gcsl prepare` reads it")
    out: Path = field(help="output folder (classifier.safetensors, classifier.json, run.json)")
    prepare: dict = field(default_factory=dict, cli=False,
                          help="PrepareConfig options saying how to read and orient the log (columns, data_format, "
                               "lower_is_better, range, kind, categories) and which rows form the classes "
                               "(sft_top, sft_cutoff: desired = the sft rows, undesired = the sft-bottom rows)")
    # uber-research/PPLM run_pplm_discrim_train.py: 10 epochs, Adam at 1e-4, batches of 64, sequences of at
    # most 100 tokens, 10% of the rows held out.
    epochs: int = field(10, help="passes over the training rows")
    learning_rate: float = field(1e-4, help="Adam learning rate of the linear head")
    batch_size: int = field(64, help="rows per optimizer step (and per forward pass of the frozen model)")
    max_length: int = field(100, help="tokens of each response the classifier reads (longer ones are cut)")
    held_out: float = field(0.1, help="fraction of the classified rows kept out of training to measure accuracy")
    seed: int = field(0, help="random seed (held-out split, head initialisation, batch order)")
    device: str | None = field(None, help="cuda, cpu...; default: cuda if available, else cpu")
    overwrite: bool = field(False, help="replace an existing --out folder")

    def validate(self) -> list[str]:
        problems = [f"{name}: must be at least 1, got {getattr(self, name)}"
                    for name in ("epochs", "batch_size", "max_length") if getattr(self, name) < 1]
        if not self.learning_rate > 0:
            problems.append(f"learning_rate: must be positive, got {self.learning_rate}")
        if not 0 <= self.held_out < 1:
            problems.append(f"held_out: must be in [0, 1), got {self.held_out}")
        return problems


@dataclass(frozen=True)
class PPLMSettings:
    """The perturbation's hyper-parameters; defaults: uber-research/PPLM README, detoxification command
    (step size 0.02, 10 iterations, gamma 1.0) and run_pplm.py's defaults for the rest."""

    step_size: float = 0.02
    num_iterations: int = 10
    window: int = 0  # 0 = the whole history
    horizon: int = 1
    gamma: float = 1.0
    kl_scale: float = 0.01
    gm_scale: float = 0.9

    @property
    def steers(self) -> bool:
        return self.step_size > 0 and self.num_iterations > 0


class AttributeClassifier:
    """The linear head and what it was trained for (``meta``: embed_size, classes, model, accuracies)."""

    def __init__(self, head, meta: dict[str, Any]) -> None:
        self.head = head
        self.meta = meta

    def log_probs(self, features):
        """Class log-probabilities of mean hidden states (rows of ``features``)."""
        import torch

        return torch.log_softmax(self.head(features.float()), dim=-1)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, str(folder / _WEIGHTS))
        (folder / _META).write_text(json.dumps(self.meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _linear(embed_size: int):
    import torch

    return torch.nn.Linear(embed_size, len(CLASSES))


def load_classifier(folder: str | Path, device=None) -> AttributeClassifier:
    """A classifier saved by :func:`train_classifier`; a missing or damaged folder is a one-line StageError.

    >>> load_classifier("runs/pplm/seed0/model").meta["held_accuracy"]  # doctest: +SKIP
    0.81
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / _META).read_text(encoding="utf-8"))
        head = _linear(int(meta["embed_size"]))
        head.load_state_dict(load_file(str(folder / _WEIGHTS)))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(f"classifier: {folder} is not a finished PPLM classifier ({first}); train it with "
                         "gcsl.generation.pplm.train_classifier (`gcsl experiment` does for method pplm)") from None
    head.requires_grad_(False).eval()
    return AttributeClassifier(head.to(device) if device is not None else head, meta)


def _final_hidden(model, **inputs):
    """The final hidden states (after the last norm, as the reference's discriminator reads them) and the output."""
    out = model(**inputs, output_hidden_states=True)
    return out.hidden_states[-1], out


def _mean_features(model, tokenizer, texts: list[str], max_length: int, batch_size: int, device) -> Any:
    """Each text's mean final hidden state over its tokens (float32), the frozen model run without gradients."""
    import torch

    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, padding_side="right",
                          truncation=True, max_length=max_length)
        mask = batch["attention_mask"].to(device)
        with torch.no_grad():
            hidden, _ = _final_hidden(model, input_ids=batch["input_ids"].to(device), attention_mask=mask)
        weights = mask.unsqueeze(-1).float()
        rows.append(((hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1)).cpu())
    return torch.cat(rows)


def _classes(cfg: ClassifierConfig):
    """Response texts and labels (1 = desired) read, validated and oriented as `gcsl prepare` does."""
    import numpy as np

    from gcsl.data.load import column_numpy, read_feedback, validate_feedback
    from gcsl.data.prepare import PrepareConfig
    from gcsl.goals.formulate import formulate_sft, formulate_sft_bottom

    prep = resolve_config(PrepareConfig, overrides={**cfg.prepare, "data": cfg.data, "out": cfg.out, "method": "sft"})
    spec = prep.metric_spec()
    table, fmt = read_feedback(prep.data, prompt_column=prep.prompt_column, response_column=prep.response_column,
                               score_column=prep.score_column, fmt=prep.data_format, split=prep.split)
    log = validate_feedback(table, prep.data, fmt, spec, bins=prep.bins)
    oriented = spec.orient(column_numpy(log.table.column("score")))
    top = set(formulate_sft(oriented, top_fraction=prep.sft_top, cutoff=prep.sft_cutoff).rows.tolist())
    bottom = set(formulate_sft_bottom(oriented, fraction=prep.sft_top, cutoff=prep.sft_cutoff).rows.tolist())
    # Ties at both boundaries can put a row in both classes: it says nothing about either, so it is left out.
    top, bottom = top - bottom, bottom - top
    if not top or not bottom:
        raise DataError(f"{cfg.data}: the top and bottom sft_top {prep.sft_top} of the scores leave no row in one "
                        "class (too many equal scores); lower sft_top or give a log with more varied scores")
    rows = np.array(sorted(top | bottom), dtype=np.int64)
    responses = column_numpy(log.table.column("response"))
    return [str(responses[i]) for i in rows], np.array([int(i in top) for i in rows], dtype=np.int64)


def train_classifier(cfg: ClassifierConfig) -> Path:
    """Fits PPLM's attribute classifier on the feedback log and saves it (with its accuracies) to ``cfg.out``.

    >>> train_classifier(ClassifierConfig(model="smollm2-135m-instruct", data="log.jsonl",
    ...                                   out=Path("clf")))  # doctest: +SKIP
    PosixPath('clf')
    """
    import numpy as np
    import torch

    from gcsl.models import default_device, load_causal_lm, load_tokenizer
    from gcsl.runinfo import atomic_dir, atomic_write_json, write_run_record

    texts, labels = _classes(cfg)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(texts))
    n_held = int(round(cfg.held_out * len(texts)))
    if len(texts) - n_held < 2:
        raise DataError(f"{cfg.data}: only {len(texts) - n_held} rows left to train the classifier on; give a "
                        "longer log or lower held_out")
    held, train = order[:n_held], order[n_held:]
    device = cfg.device or default_device()
    started = time.monotonic()
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, device=device).eval()
    # The model is frozen: its features are computed once and the head trains on them (the reference's cached mode).
    features = _mean_features(model, tokenizer, texts, cfg.max_length, cfg.batch_size, device)
    targets = torch.as_tensor(labels)
    torch.manual_seed(cfg.seed)
    head = _linear(features.shape[1])
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.learning_rate)
    train_idx = torch.as_tensor(train)

    def loss_on(idx) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(head(features[idx]), targets[idx]))

    losses = [loss_on(train_idx)]
    steps = 0
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        for batch in train_idx[torch.randperm(len(train_idx), generator=generator)].split(cfg.batch_size):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(head(features[batch]), targets[batch]).backward()
            optimizer.step()
            steps += 1
        losses.append(loss_on(train_idx))

    def accuracy(idx) -> float | None:
        if len(idx) == 0:
            return None
        with torch.no_grad():
            return float((head(features[idx]).argmax(-1) == targets[idx]).float().mean())

    meta = {"embed_size": int(features.shape[1]), "classes": list(CLASSES), "desired_class": DESIRED,
            "model": str(cfg.model), "features": "mean final hidden state over the response's tokens",
            "train_rows": len(train), "held_rows": len(held), "desired_rows": int(labels.sum()),
            "train_accuracy": accuracy(train_idx), "held_accuracy": accuracy(torch.as_tensor(held)),
            "train_loss": losses}
    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        AttributeClassifier(head, meta).save(tmp)
        # The experiment report's training table reads these facts.
        atomic_write_json(tmp / "train_metrics.json", {
            "train_rows": len(train), "epochs": cfg.epochs, "optimizer_steps": steps, "train_tokens": None,
            "train_seconds": round(time.monotonic() - started, 3), "rows_per_step": cfg.batch_size})
        write_run_record(tmp, stage="pplm-classifier", config=cfg, seed=cfg.seed,
                         extra={"rows": len(train), **{k: meta[k] for k in ("train_accuracy", "held_accuracy")}})
    return Path(cfg.out)


# -- decoding ---------------------------------------------------------------------------------------------

def _positions(mask):
    """Position ids as ``generate`` numbers them: the cumulative count of real tokens."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _cache(layers):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k, v) for k, v in layers])


def _shifted(past, deltas) -> list[tuple[Any, Any]]:
    """The history plus its perturbation (kept in float32, added in the model's dtype)."""
    return [(k + dk.to(k.dtype), v + dv.to(v.dtype)) for (k, v), (dk, dv) in zip(past, deltas)]


def _layers(cache) -> list[tuple[Any, Any]]:
    return [(layer.keys.detach(), layer.values.detach()) for layer in cache.layers]


class PPLMModel:
    """The base model steered by an attribute classifier, sampled from like a model: ``generate``, ``device``,
    ``dtype``. ``step_scores`` is one decoding step, for checks."""

    def __init__(self, model, classifier: AttributeClassifier, settings: PPLMSettings) -> None:
        model.requires_grad_(False)  # gradients go to the perturbation only
        self.model = model.eval()
        self.classifier = classifier
        self.classifier.head.to(model.device)
        self.settings = settings

    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return self.model.dtype

    def record(self) -> dict[str, Any]:
        """The resolved settings and the classifier they steer with, for the run record."""
        keep = ("model", "classes", "desired_class", "train_accuracy", "held_accuracy", "train_rows", "held_rows")
        return {**asdict(self.settings), "classifier": {k: self.classifier.meta.get(k) for k in keep}}

    def _forward(self, input_ids=None, *, mask, positions, layers, inputs_embeds=None):
        """One forward over new tokens after the history ``layers``: logits (float32) of the last position, the
        final hidden states of the new positions, and the history extended by them."""
        cache = _cache(layers) if layers else None
        hidden, out = _final_hidden(self.model, input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=mask,
                                    position_ids=positions, cache=cache, use_cache=True)
        return out.logits[:, -1, :].float(), hidden, out.cache

    def _steered(self, deltas, *, past, last, mask, unpert_layers, context_sum, count):
        """The classifier's log-probabilities and the next-token probabilities with the history ``past + deltas``."""
        import torch

        logits, hidden, _ = self._forward(last, mask=mask, positions=_positions(mask)[:, -1:],
                                          layers=_shifted(past, deltas))
        probs = torch.softmax(logits, -1)
        total = context_sum + hidden[:, -1, :].float()
        # The horizon: positions fed the expected embedding of the next token after the unperturbed history
        # (reference run_pplm.py feeds the same distribution at every horizon position).
        embeddings = self.model.get_input_embeddings().weight
        expected = (probs[:, : embeddings.shape[0]] @ embeddings.float()).to(embeddings.dtype).unsqueeze(1)
        layers, horizon_mask = unpert_layers, mask
        for _ in range(self.settings.horizon):
            horizon_mask = torch.cat([horizon_mask, horizon_mask.new_ones((mask.shape[0], 1))], 1)
            _, h, cache = self._forward(mask=horizon_mask, positions=_positions(horizon_mask)[:, -1:], layers=layers,
                                        inputs_embeds=expected)
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            total = total + h[:, -1, :].float()
        features = total / (count + self.settings.horizon).unsqueeze(-1)
        return self.classifier.log_probs(features), probs

    def _perturb(self, unpert_logits, **inputs):
        """The accumulated perturbation of the history after the settings' gradient steps (a list of (dK, dV))."""
        import torch

        s = self.settings
        past, rows = inputs["past"], inputs["last"].shape[0]
        length = past[0][0].shape[-2]
        window = torch.ones(length, device=self.device)
        if 0 < s.window < length:
            window[: length - s.window] = 0
        window = window.view(1, 1, length, 1)
        deltas = [(torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32))
                  for k, v in past]
        unpert_probs = torch.softmax(unpert_logits, -1)
        unpert_probs = unpert_probs + _SMALL * (unpert_probs <= _SMALL).float()
        target = torch.full((rows,), DESIRED, dtype=torch.long, device=self.device)
        for _ in range(s.num_iterations):
            leaves = [(dk.clone().requires_grad_(True), dv.clone().requires_grad_(True)) for dk, dv in deltas]
            class_log_probs, probs = self._steered(leaves, **inputs)
            # Summed over rows, so each sequence's gradient is its own (normalised per sequence below).
            loss = torch.nn.functional.nll_loss(class_log_probs, target, reduction="sum")
            if s.kl_scale > 0:
                corrected = probs + _SMALL * (probs <= _SMALL).float().detach()
                loss = loss + s.kl_scale * (corrected * (corrected / unpert_probs).log()).sum()
            grads = torch.autograd.grad(loss, [t for pair in leaves for t in pair])
            for layer, (dk, dv) in enumerate(deltas):
                gk, gv = grads[2 * layer] * window, grads[2 * layer + 1] * window
                # One norm per layer and sequence over its keys and values together (the reference stacks them).
                norm = (gk.pow(2).sum((1, 2, 3)) + gv.pow(2).sum((1, 2, 3))).sqrt() + _SMALL
                scale = (s.step_size / norm.pow(s.gamma)).view(rows, 1, 1, 1)
                deltas[layer] = (dk - scale * gk, dv - scale * gv)
        return deltas

    def observe(self, state: dict[str, Any]):
        """Runs the unperturbed model over the tokens added to ``state`` since the last call; returns its
        next-token logits and what the perturbation reads (None when not steering or without a history yet)."""
        import torch

        ids, mask = state["ids"], state["mask"]
        new = slice(state["seen"], ids.shape[1])
        with torch.no_grad():
            unpert_logits, hidden, cache = self._forward(ids[:, new], mask=mask, positions=_positions(mask)[:, new],
                                                         layers=state["unpert"])
        state["unpert"], state["seen"] = _layers(cache), ids.shape[1]
        state["sum"] = state["sum"] + (hidden.float() * mask[:, new].unsqueeze(-1).float()).sum(1)
        if not self.settings.steers or (state["past"] is None and ids.shape[1] == 1):
            return unpert_logits, None  # nothing to steer, or no history to perturb yet (as in the reference)
        if state["past"] is None:  # the history before the newest token, built once from the prompt
            with torch.no_grad():
                _, _, cache = self._forward(ids[:, :-1], mask=mask[:, :-1], positions=_positions(mask)[:, :-1],
                                            layers=None)
            state["past"] = _layers(cache)
        newest = hidden[:, -1, :].float() * mask[:, -1:].float()
        return unpert_logits, {"past": state["past"], "last": ids[:, -1:], "mask": mask, "unpert_layers": state["unpert"],
                               "context_sum": state["sum"] - newest, "count": mask.sum(1).float()}

    def step_scores(self, state: dict[str, Any]):
        """Next-token scores for the sequences in ``state`` (see :meth:`start`), updating its histories: the fused
        log-probabilities, or the base model's own logits when not steering."""
        import torch

        unpert_logits, inputs = self.observe(state)
        if inputs is None:
            return unpert_logits
        deltas = self._perturb(unpert_logits, **inputs)
        with torch.no_grad():
            pert_logits, _, cache = self._forward(inputs["last"], mask=inputs["mask"],
                                                  positions=_positions(inputs["mask"])[:, -1:],
                                                  layers=_shifted(inputs["past"], deltas))
        # The perturbed history, now with the newest token, is the next step's history (as in the reference).
        state["past"] = _layers(cache)
        gm = self.settings.gm_scale
        return gm * torch.log_softmax(pert_logits, -1) + (1 - gm) * torch.log_softmax(unpert_logits, -1)

    def start(self, input_ids, attention_mask) -> dict[str, Any]:
        """The decoding state of left-padded prompts: tokens, mask, the unperturbed and perturbed histories and
        the running sum of the unperturbed final hidden states over real tokens."""
        import torch

        return {"ids": input_ids, "mask": attention_mask, "seen": 0, "unpert": None, "past": None,
                "sum": torch.zeros((input_ids.shape[0], self.model.config.get_text_config().hidden_size),
                                   device=input_ids.device)}

    def generate(self, *, input_ids, attention_mask, do_sample=True, top_p=1.0, top_k=0, temperature=1.0,
                 max_new_tokens=20, pad_token_id=None, **_):
        """Prompt + sampled tokens, like ``transformers`` generate: finished rows are padded with
        ``pad_token_id``, and sampling stops when every row has ended or after ``max_new_tokens``."""
        import torch
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        warpers = LogitsProcessorList()
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        eos = self.model.generation_config.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        # generate() runs under inference mode; the perturbation needs autograd, so it is switched back on here.
        with torch.inference_mode(False), torch.enable_grad():
            state = self.start(input_ids.clone(), attention_mask.clone())
            running = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for _ in range(max_new_tokens):
                scores = warpers(state["ids"], self.step_scores(state))
                probs = torch.softmax(scores, -1)
                token = (torch.multinomial(probs, 1).squeeze(1) if do_sample else probs.argmax(-1))
                token = torch.where(running, token, torch.full_like(token, pad))
                state["ids"] = torch.cat([state["ids"], token[:, None]], 1)
                state["mask"] = torch.cat([state["mask"], state["mask"].new_ones((token.shape[0], 1))], 1)
                running = running & ~torch.isin(token, eos)
                if not running.any():
                    break
            return state["ids"].detach()


def load_pplm(model: str, classifier: str, settings: PPLMSettings, device=None, dtype=None):
    """The base ``model`` steered by the ``classifier`` folder (:func:`train_classifier`); returns a
    :class:`gcsl.models.InferenceModel` whose ``model`` is a :class:`PPLMModel`. A classifier trained on the
    hidden states of another model is a one-line StageError."""
    from gcsl.generation.dexperts import _same_model
    from gcsl.models import InferenceModel, load_for_inference

    clf = load_classifier(classifier)
    trained_on = str(clf.meta.get("model"))
    if not _same_model(trained_on, str(model)):
        raise StageError(f"classifier: {classifier} was trained on the hidden states of {trained_on!r}, not of model "
                         f"{model!r}; give that model or train a classifier on this one")
    lm = load_for_inference(model, device=device, dtype=dtype)
    width = lm.model.config.get_text_config().hidden_size
    if width != clf.meta["embed_size"]:
        raise StageError(f"classifier: {classifier} reads {clf.meta['embed_size']}-wide hidden states, model {model!r} "
                         f"has {width}; train the classifier on this model")
    return InferenceModel(model=PPLMModel(lm.model, clf, settings), tokenizer=lm.tokenizer, base_model=lm.base_model)


def settings_problems(values: dict[str, Any]) -> list[str]:
    """Why PPLM settings (GenerateConfig's pplm_* options, by field name) cannot be used."""
    problems = []
    for name in ("pplm_step_size", "pplm_kl_scale", "pplm_gamma"):
        if not values[name] >= 0:  # also refuses NaN
            problems.append(f"{name}: must be >= 0, got {values[name]}")
    for name in ("pplm_iterations", "pplm_window", "pplm_horizon"):
        if values[name] < 0:
            problems.append(f"{name}: must be >= 0, got {values[name]}")
    if not 0 <= values["pplm_gm_scale"] <= 1:
        problems.append(f"pplm_gm_scale: must be in [0, 1], got {values['pplm_gm_scale']}")
    return problems
