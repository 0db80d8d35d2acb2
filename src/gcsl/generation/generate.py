"""Goal-conditioned sampling: prompts in, one JSONL row per (prompt, sample) out.

``generate`` reads top to bottom: load the prompts, look at what an earlier run already wrote,
load the model, write the goal into every prompt the way ``gcsl prepare`` did, tokenize, plan
length-sorted batches, sample, append rows, and finally write the sorted output. With
``rank_catalogue`` the sampling step is replaced by ranking a recommendation catalogue's titles
by the model's probability of answering each (:mod:`gcsl.generation.ranking`).

Resuming. Rows go to ``<out>.partial`` and are flushed after every batch; a killed run leaves
only that file (never a finished-looking ``<out>``). A rerun with the same options reads
``<out>`` and ``<out>.partial``, drops a torn last line, skips every (prompt_id, sample) already
written and generates the rest; nothing is ever written twice. When every row exists, they are
written to ``<out>`` sorted by prompt (input order) then sample, and the partial file goes away.

Determinism. Batches are planned over *all* requested rows (sorted by prompt length), whatever
was already written, and each batch's random generator is seeded from ``seed`` and the ids of
its members. A resumed run regenerates a half-written batch whole and keeps only its missing
rows, so with the same options on the same machine (same hardware, library versions and
dtype) the final file is identical whether or not the run was interrupted. Changing
``batch_size``, ``num_samples`` or ``limit`` changes which rows share a batch, and so changes
the samples drawn (they remain valid samples of the same distribution); other hardware or
library versions may change them too, since sampling follows floating-point results.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gcsl.config import config_to_dict, field
from gcsl.errors import ConfigError, DataError, StageError
from gcsl.runinfo import atomic_write_text, write_run_record
from gcsl.stages import ModelFolder, iter_jsonl, json_line

__all__ = ["GenerateConfig", "PromptRow", "generate", "load_prompts"]

ROW_INDEX = "#row"
# Options that change what a row contains; rows written under other values cannot be mixed in.
_SAMPLING_OPTIONS = ("model", "prompts", "split", "id_field", "prompt_field", "goal", "template_text_prompts",
                     "top_p", "top_k", "temperature", "max_new_tokens", "seed", "expert", "anti_expert", "alpha",
                     "classifier", "pplm_step_size", "pplm_iterations", "pplm_window", "pplm_horizon", "pplm_gamma",
                     "pplm_kl_scale", "pplm_gm_scale", "rank_catalogue", "dtype")
_TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass
class GenerateConfig:
    model: str = field(help="a `gcsl train` output folder, a merged model folder, a base model path or hub id, "
                            "or a built-in name (smollm2-135m-instruct)")
    prompts: str = field(help="JSONL file ({\"id\", \"prompt\", ...} per line), a CSV/Parquet file, a saved "
                              "dataset folder or a Hugging Face dataset name")
    out: Path = field(help="output JSONL file (one row per prompt and sample); rerunning resumes it")
    goal: str = field("top", help="goal to generate at: top (the highest retained threshold), a value in the "
                                  "metric's units, scale:<factor> (the top goal made more ambitious by the factor) "
                                  "or level:<k> (level k's goal as trained); with several aspects, one per "
                                  "aspect as name=request,name=request (left out: top); ignored by "
                                  "goal-free models (SFT, DPO, base models)")
    num_samples: int = field(1, help="samples per prompt")
    top_p: float = field(0.9, help="nucleus sampling probability mass")
    top_k: int = field(0, help="top-k filter; 0 turns it off (transformers would otherwise apply 50)")
    temperature: float = field(1.0, help="sampling temperature")
    max_new_tokens: int = field(64, help="most tokens generated per sample")
    batch_size: int = field(8, help="sequences sampled together; batches are sorted by prompt length")
    seed: int = field(0, help="random seed; the same seed and options give the same samples on one machine")
    device: str | None = field(None, help="cuda, cuda:1, cpu...; default: cuda if available, else cpu")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(
        "auto", help="weights' dtype: auto = bf16 on GPUs that have it (fp16 on older ones), fp32 on CPUs; bf16 "
                     "on a CPU with AVX512-BF16 or AMX is about 2.5x faster than fp32 (benchmarks/cpu_bf16.py)")
    limit: int | None = field(None, help="use only the first N prompts")
    id_field: str = field("id", help=f"field holding the prompt id; {ROW_INDEX} numbers the prompts from 0")
    prompt_field: str = field("prompt", help="field holding the prompt (text or chat messages); a dotted "
                                             "name such as prompt.text reaches into a nested record")
    split: str = field("train", help="split to read when --prompts is a dataset with splits")
    expert: str | None = field(None, help="DExperts: a `gcsl train` output folder of the expert adapter (e.g. "
                                          "sft), trained on --model; needs --anti-expert")
    anti_expert: str | None = field(None, help="DExperts: a `gcsl train` output folder of the anti-expert adapter "
                                               "(e.g. sft-bottom), trained on --model")
    alpha: float = field(2.0, help="DExperts: sample from base + alpha x (expert - anti_expert) logits; 0 = the "
                                   "base model (the paper's default is 2.0)")
    # PPLM's defaults: uber-research/PPLM README, detoxification command (stepsize 0.02, num_iterations 10,
    # gamma 1.0), and run_pplm.py's defaults for the rest (window 0, horizon 1, kl_scale 0.01, gm_scale 0.9).
    classifier: str | None = field(None, help="PPLM: an attribute classifier folder (trained on --model's hidden "
                                              "states; `gcsl experiment` trains one for method pplm); steers "
                                              "sampling towards its desired class")
    pplm_step_size: float = field(0.02, help="PPLM: size of each normalised gradient step on the key/value "
                                             "history; 0 = the base model")
    pplm_iterations: int = field(10, help="PPLM: gradient steps on the history per generated token; 0 = the "
                                          "base model")
    pplm_window: int = field(0, help="PPLM: newest history positions perturbed; 0 = all of them")
    pplm_horizon: int = field(1, help="PPLM: future positions (fed the expected next-token embedding) the "
                                      "classifier reads")
    pplm_gamma: float = field(1.0, help="PPLM: gradients are divided by their norm to this power")
    pplm_kl_scale: float = field(0.01, help="PPLM: weight of KL(perturbed || unperturbed next-token "
                                            "distribution) in the loss")
    pplm_gm_scale: float = field(0.9, help="PPLM: sample from p_perturbed^gm x p_unperturbed^(1-gm)")
    rank_catalogue: Path | None = field(None, help="rank instead of sampling: score every title of this `gcsl data "
                                        "recommendation` folder's catalogue (catalogue.jsonl) by the model's "
                                        "log-probability of answering it (quoted, then end of turn) and write "
                                        "the titles most probable first in each row's `ranking`, the top one "
                                        "as the completion; one row per prompt (num_samples 1), sampling "
                                        "options unused, batch_size = answers scored together")
    template_text_prompts: Literal["auto", "always", "never"] = field(
        "auto", help="apply the chat template to text prompts as one user message: auto = for models not "
                     "fine-tuned by gcsl whose tokenizer has one (gcsl fine-tunes on text prompts without a "
                     "template, so its models see them raw); chat-message prompts always use the template")

    def validate(self) -> list[str]:
        problems = []
        for name in ("num_samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k: must be 0 (off) or positive, got {self.top_k}")
        if self.temperature <= 0:
            problems.append(f"temperature: must be positive, got {self.temperature}")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit: must be at least 1, got {self.limit}")
        if self.out.suffix == ".partial" or self.out.is_dir():
            problems.append(f"out: {self.out} must be a file name such as gens.jsonl")
        if (self.expert is None) != (self.anti_expert is None):
            given, missing = ("expert", "anti_expert") if self.expert is not None else ("anti_expert", "expert")
            problems.append(f"{missing}: DExperts needs both adapters; {given} is given, give {missing} too "
                            "(or neither)")
        if not self.alpha >= 0:  # also refuses NaN
            problems.append(f"alpha: must be >= 0, got {self.alpha}")
        if self.classifier is not None and self.expert is not None:
            problems.append("classifier: PPLM and DExperts steer the same sampling two ways; give classifier or "
                            "expert/anti_expert, not both")
        from gcsl.generation.pplm import settings_problems

        problems.extend(settings_problems(self.__dict__))
        if self.rank_catalogue is not None:
            if self.num_samples != 1:
                problems.append(f"num_samples: a ranking is deterministic; with rank_catalogue give 1, got "
                                f"{self.num_samples}")
            if self.expert is not None or self.classifier is not None:
                problems.append("rank_catalogue: ranking scores the model's own probabilities; it cannot be "
                                "combined with DExperts (expert) or PPLM (classifier)")
        if self.expert is not None and (Path(str(self.model)).expanduser() / "adapter_config.json").is_file():
            problems.append(f"model: {self.model} is an adapter folder; with expert/anti_expert give the base model "
                            "they were trained on")
        return problems


@dataclass(frozen=True)
class PromptRow:
    """One prompt to sample from: its id, the prompt as given (no goal) and its other fields."""

    id: str
    prompt: str | list[dict[str, str]]
    meta: dict[str, Any]


def generate(cfg: GenerateConfig) -> Path:
    """Samples ``num_samples`` completions per prompt at the requested goal and writes them as JSONL.

    >>> cfg = GenerateConfig(model="runs/gcsl-bey-nl", prompts="prompts.jsonl", out=Path("gens.jsonl"),
    ...                      num_samples=2)
    >>> generate(cfg)  # doctest: +SKIP
    PosixPath('gens.jsonl')
    """
    import torch
    from tqdm.auto import tqdm

    from gcsl.models import load_for_inference, parse_dtype

    out = Path(cfg.out)
    partial = out.with_name(out.name + ".partial")
    record_path = out.with_name(out.name + ".run.json")
    prompts = load_prompts(cfg.prompts, id_field=cfg.id_field, prompt_field=cfg.prompt_field, split=cfg.split,
                           limit=cfg.limit)
    wanted = [(p.id, s) for p in prompts for s in range(cfg.num_samples)]

    # What an earlier run left: rows to keep, and a check that they were made the same way.
    done = _read_existing(out, partial, set(wanted))
    if done:
        _check_same_settings(record_path, cfg)
    missing = [key for key in wanted if key not in done]
    if not missing:
        return _finish(out, partial, prompts, done, cfg.num_samples)

    # DExperts samples from the base model but reads prompts as its (goal-free, gcsl-trained) experts did.
    setup = ModelFolder(Path(cfg.expert or cfg.model)).goal_setup()  # None for a goal-free or base model
    goal = None
    if setup is not None:
        from gcsl.goals import inference_goal

        goal = inference_goal(setup, cfg.goal)  # a bad goal request fails before the weights load
    if cfg.expert is not None:
        from gcsl.generation.dexperts import load_dexperts

        lm = load_dexperts(cfg.model, cfg.expert, cfg.anti_expert, cfg.alpha, device=cfg.device,
                           dtype=parse_dtype(cfg.dtype))
    elif cfg.classifier is not None:
        from gcsl.generation.pplm import PPLMSettings, load_pplm

        lm = load_pplm(cfg.model, cfg.classifier, PPLMSettings(
            step_size=cfg.pplm_step_size, num_iterations=cfg.pplm_iterations, window=cfg.pplm_window,
            horizon=cfg.pplm_horizon, gamma=cfg.pplm_gamma, kl_scale=cfg.pplm_kl_scale,
            gm_scale=cfg.pplm_gm_scale), device=cfg.device, dtype=parse_dtype(cfg.dtype))
    else:
        lm = load_for_inference(cfg.model, device=cfg.device, dtype=parse_dtype(cfg.dtype))
    tokenizer, model = lm.tokenizer, lm.model
    goal_text = goal.text if goal is not None else None
    # gcsl-noquant-embed states its goal as a number fed through a trained conditioner, not as text.
    goal_value = goal.value if goal is not None and goal_text is None else None
    if goal_value is not None:
        from gcsl.goal_embedding import apply_goal_embedding, load_goal_embedding

        if cfg.rank_catalogue is not None:
            raise ConfigError(f"rank_catalogue: method {setup.method} states its goal through an embedding, which "
                              "ranking does not feed; sample from it instead")
        if load_goal_embedding(model, cfg.model) is None:
            raise StageError(f"{cfg.model}: method {setup.method} needs its goal embedding (goal_embedding.json) "
                             "beside the weights; re-run `gcsl train` or `gcsl merge`")
    goal_request = cfg.goal if goal_text is not None or goal_value is not None else None

    # Goal placement and templating mirror training: prepare placed the goal, TRL templated chat prompts.
    template_text = cfg.template_text_prompts == "always" or (
        cfg.template_text_prompts == "auto" and setup is None and tokenizer.chat_template is not None)
    encoded = {}
    for p in prompts:
        placed = setup.place(p.prompt, goal_text) if goal_text is not None else p.prompt
        encoded[p.id] = _encode(tokenizer, placed, template_text, p.id)
    pad_id = tokenizer.pad_token_id

    _write_record(record_path, cfg, lm, setup, goal, complete=False, rows=len(done))
    if cfg.rank_catalogue is not None:
        _rank(cfg, model, tokenizer, prompts, encoded, missing, done, partial, goal_text, goal_request)
        path = _finish(out, partial, prompts, done, cfg.num_samples)
        _write_record(record_path, cfg, lm, setup, goal, complete=True, rows=len(done))
        return path
    batches = _plan_batches(wanted, {pid: len(ids) for pid, ids in encoded.items()}, cfg.batch_size)
    partial.parent.mkdir(parents=True, exist_ok=True)
    prompt_by_id = {p.id: p for p in prompts}
    with open(partial, "a", encoding="utf-8") as sink, \
            tqdm(total=len(missing), desc="generate", unit="sample", disable=None) as progress:
        for batch in batches:
            todo = [i for i, key in enumerate(batch) if key not in done]
            if not todo:  # a batch is regenerated whole if any member is missing: same members, same seed
                continue
            input_ids, attention = _left_pad([encoded[pid] for pid, _ in batch], pad_id)
            width = input_ids.shape[1]
            inputs = {"input_ids": input_ids.to(model.device), "attention_mask": attention.to(model.device)}
            torch.manual_seed(_batch_seed(cfg.seed, batch))
            with torch.inference_mode():
                if goal_value is not None:
                    embeds, mask = apply_goal_embedding(model, inputs["input_ids"], inputs["attention_mask"], goal_value)
                    inputs = {"inputs_embeds": embeds, "attention_mask": mask}
                output = model.generate(**inputs, do_sample=True, top_p=cfg.top_p, top_k=cfg.top_k,
                                        temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                        pad_token_id=pad_id)
            # Given input ids, generate returns prompt + new tokens; given embeddings, only the new ones.
            new_tokens = output[:, width:] if "input_ids" in inputs else output
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i in todo:
                pid, sample = batch[i]
                p = prompt_by_id[pid]
                row = {"prompt_id": pid, "prompt": p.prompt, "goal": goal_text, "goal_request": goal_request,
                       "sample": sample, "completion": texts[i], "meta": p.meta}
                sink.write(json_line(row))
                done[batch[i]] = row
            sink.flush()
            progress.update(len(todo))
    path = _finish(out, partial, prompts, done, cfg.num_samples)
    _write_record(record_path, cfg, lm, setup, goal, complete=True, rows=len(done))
    return path


def _rank(cfg: GenerateConfig, model, tokenizer, prompts: list[PromptRow], encoded: dict[str, list[int]],
          missing: list[tuple[str, int]], done: dict, partial: Path, goal_text: str | None,
          goal_request: str | None) -> None:
    """Ranks the catalogue's titles for every missing prompt (:mod:`gcsl.generation.ranking`), one row each,
    appended to ``partial`` as it goes. Ties keep catalogue order."""
    from tqdm.auto import tqdm

    from gcsl.generation.ranking import answer_ids, candidate_logprobs
    from gcsl.tasks.recommendation.prompts import catalogue_answers

    titles, answers = catalogue_answers(Path(cfg.rank_catalogue))
    candidates = answer_ids(tokenizer, answers)
    prompt_by_id = {p.id: p for p in prompts}
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "a", encoding="utf-8") as sink:
        for pid, sample in tqdm(missing, desc="rank", unit="prompt", disable=None):
            scores = candidate_logprobs(model, encoded[pid], candidates, batch_size=cfg.batch_size)
            order = sorted(range(len(titles)), key=lambda j: (-scores[j], j))
            p = prompt_by_id[pid]
            row = {"prompt_id": pid, "prompt": p.prompt, "goal": goal_text, "goal_request": goal_request,
                   "sample": sample, "completion": answers[order[0]], "ranking": [titles[j] for j in order],
                   "ranking_logprobs": [round(scores[j], 4) for j in order], "meta": p.meta}
            sink.write(json_line(row))
            sink.flush()
            done[(pid, sample)] = row


def load_prompts(source: str | Path, *, id_field: str = "id", prompt_field: str = "prompt", split: str = "train",
                 limit: int | None = None) -> list[PromptRow]:
    """Reads and validates prompts from JSONL, CSV/Parquet, a saved dataset or a hub dataset.

    Every problem is a one-line DataError naming the file and line (or row) and the fix.

    >>> load_prompts("prompts.jsonl", limit=2)[0].id  # doctest: +SKIP
    'p0'
    """
    path = Path(str(source)).expanduser()
    records = (((f"{path}:{n}", obj) for n, obj in iter_jsonl(path, "prompts")) if path.suffix in (".jsonl", ".json")
               else _dataset_records(str(source), split))
    rows: list[PromptRow] = []
    first_seen: dict[str, str] = {}
    for number, (where, record) in enumerate(records):
        if limit is not None and number >= limit:
            break
        row = _prompt_row(record, where, number, id_field, prompt_field)
        if row.id in first_seen:
            raise DataError(f"{where}: duplicate id {row.id!r} (first at {first_seen[row.id]}); prompt ids must be "
                            f"unique, or pass --id-field {ROW_INDEX} to number the prompts")
        first_seen[row.id] = where
        rows.append(row)
    if not rows:
        raise DataError(f"{source}: no prompts found; give a file with one prompt per line")
    return rows


def _dataset_records(source: str, split: str):
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_dir():
            try:
                data = datasets.load_from_disk(str(path))
            except FileNotFoundError:  # a folder of data files rather than a saved dataset
                data = datasets.load_dataset(str(path), split=split)
        elif path.is_file():
            builder = _TABLE_SUFFIXES.get(path.suffix)
            if builder is None:
                raise DataError(f"{path}: unsupported prompts file type; use .jsonl, .csv, .parquet or a dataset")
            data = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif source.startswith((".", "/", "~")) or path.suffix:
            raise DataError(f"{path}: prompts file not found; check --prompts")
        else:
            data = datasets.load_dataset(source, split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (offline, missing script, bad split...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{source}: cannot load prompts ({first}); give a JSONL file or a local dataset") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{source}: no split {split!r}; available: {', '.join(data)} (set --split)")
        data = data[split]
    for index, record in enumerate(data):
        yield f"{source} row {index}", record


def _prompt_row(record: dict[str, Any], where: str, number: int, id_field: str, prompt_field: str) -> PromptRow:
    if id_field == ROW_INDEX:
        prompt_id = str(number)
    elif id_field not in record or record[id_field] is None:
        raise DataError(f"{where}: missing field {id_field!r}; add it, set --id-field, or pass --id-field "
                        f"{ROW_INDEX} to number the prompts")
    else:
        prompt_id = str(record[id_field])
    prompt: Any = record
    for part in prompt_field.split("."):
        if not isinstance(prompt, dict) or part not in prompt:
            raise DataError(f"{where}: missing field {prompt_field!r}; add it or set --prompt-field")
        prompt = prompt[part]
    if isinstance(prompt, list):
        for message in prompt:
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)):
                raise DataError(f"{where}: field {prompt_field!r} must be text or a list of "
                                "{\"role\": ..., \"content\": ...} messages")
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
        if not prompt:
            raise DataError(f"{where}: field {prompt_field!r} is an empty message list")
    elif not isinstance(prompt, str):
        raise DataError(f"{where}: field {prompt_field!r} must be text or a list of chat messages, "
                        f"got {type(prompt).__name__}")
    hidden = {id_field, prompt_field}
    meta = {k: v for k, v in record.items() if k not in hidden}
    return PromptRow(id=prompt_id, prompt=prompt, meta=meta)


def _encode(tokenizer, prompt: str | list[dict[str, str]], template_text: bool, prompt_id: str) -> list[int]:
    """Token ids of a prompt as the trainer saw it: chat messages through the template, text raw."""
    if isinstance(prompt, str) and template_text:
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        if tokenizer.chat_template is None:
            raise ConfigError(f"prompt {prompt_id!r} needs a chat template (chat messages, or "
                              "--template-text-prompts always) but the model's tokenizer has none; give text "
                              "prompts or use a chat model")
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise DataError(f"prompt {prompt_id!r} is empty; every prompt needs some text")
    return list(ids)


def _plan_batches(keys: list[tuple[str, int]], lengths: dict[str, int], batch_size: int) -> list[list[tuple[str, int]]]:
    """Batches of (prompt_id, sample), longest prompts first so that padding stays small."""
    position = {key: i for i, key in enumerate(keys)}
    ordered = sorted(keys, key=lambda key: (-lengths[key[0]], position[key]))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def _left_pad(sequences: list[list[int]], pad_id: int):
    """Input ids and attention mask, padded on the left so every prompt ends where sampling starts."""
    import torch

    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids):] = 1
    return input_ids, attention


def _batch_seed(seed: int, batch: list[tuple[str, int]]) -> int:
    digest = hashlib.sha256(json.dumps([seed, batch], ensure_ascii=False).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _read_existing(out: Path, partial: Path, wanted: set[tuple[str, int]]) -> dict[tuple[str, int], dict]:
    """Rows already written to ``out`` or ``partial`` (the resume journal's own reader: unlike
    :func:`gcsl.stages.iter_jsonl` it forgives a torn last line).

    Lines are written whole and end with a newline, so only a last line without one can be torn
    by a killed run: it is dropped (and cut from the partial file before appending resumes).
    Any other unreadable line means the file is not ours to extend.
    """
    rows: dict[tuple[str, int], dict] = {}
    for path in (out, partial):
        if not path.is_file():
            continue
        data = path.read_bytes()
        lines = data.split(b"\n")
        complete_bytes = len(data)
        if lines[-1] != b"":  # the last line has no newline: a run died while writing it
            complete_bytes -= len(lines[-1])
        lines = lines[:-1]
        for line_no, line in enumerate(lines, start=1):
            where = f"{path}:{line_no}"
            try:
                row = json.loads(line)
            except ValueError:
                raise DataError(f"{where}: not a valid generation row; move the file away or choose another "
                                "--out") from None
            if not (isinstance(row, dict) and isinstance(row.get("prompt_id"), str)
                    and isinstance(row.get("sample"), int) and isinstance(row.get("completion"), str)):
                raise DataError(f"{where}: not a gcsl generation row (needs prompt_id, sample, completion); "
                                "choose another --out")
            key = (row["prompt_id"], row["sample"])
            if key not in wanted:
                raise StageError(f"{where}: row for prompt {key[0]!r} sample {key[1]} is outside this request; "
                                 "resume with the original --prompts/--limit/--num-samples or choose another --out")
            rows.setdefault(key, row)
        if path == partial and complete_bytes < len(data):
            with open(partial, "r+b") as handle:
                handle.truncate(complete_bytes)
    return rows


def _check_same_settings(record_path: Path, cfg: GenerateConfig) -> None:
    if not record_path.is_file():
        return
    try:
        old = json.loads(record_path.read_text(encoding="utf-8")).get("config", {})
    except ValueError:
        return  # a damaged record says nothing about the rows; the rows themselves were validated
    new = config_to_dict(cfg)
    changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in _SAMPLING_OPTIONS if k in old and old[k] != new[k]]
    if changed:
        raise StageError(f"{cfg.out}: holds generations made with other settings ({'; '.join(changed)}); rerun with "
                         "the same settings to resume, or choose another --out")


def _finish(out: Path, partial: Path, prompts: list[PromptRow], done: dict, num_samples: int) -> Path:
    lines = [json_line(done[(p.id, s)]) for p in prompts for s in range(num_samples)]
    atomic_write_text(out, "".join(lines))
    if partial.exists():
        os.unlink(partial)
    return out


def _write_record(path: Path, cfg: GenerateConfig, lm, setup, goal, *, complete: bool, rows: int) -> None:
    goals = None
    if setup is not None:
        goals = {"method": setup.method, "request": cfg.goal, "text": goal.text, "level": goal.level,
                 "threshold": goal.threshold, "value": goal.value, "setup": setup.to_json()}
        if goal.aspects:  # a multi-aspect goal: each aspect's resolved level and threshold
            goals["aspects"] = [{"name": a.metric.name, "request": g.request, "level": g.level,
                                 "threshold": g.threshold, "note": g.note} for a, g in zip(setup.aspects, goal.aspects)]
    write_run_record(path.parent, stage="generate", config=cfg, seed=cfg.seed, goals=goals, filename=path.name,
                     extra={"base_model": lm.base_model, "dtype": str(lm.model.dtype).removeprefix("torch."),
                            "device": str(lm.model.device), "complete": complete, "rows": rows,
                            **({"pplm": lm.model.record()} if cfg.classifier is not None else {})})
