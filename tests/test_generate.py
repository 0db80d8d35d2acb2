"""gcsl generate: rows, determinism, resume, goal placement and input errors, on a tiny random Llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gcsl.cli import main as cli_main
from gcsl.config import resolve_config
from gcsl.errors import ConfigError, DataError, StageError
from gcsl.generation import GenerateConfig, generate, load_prompts

PROMPTS = [
    {"id": "poem", "prompt": "Write a poem about the sea.", "difficulty": "easy", "target_rating": 4},
    {"id": "chat", "prompt": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "How do I boil an egg?"}]},
    {"id": "short", "prompt": "Tell me"},
]
ROW_KEYS = {"prompt_id", "prompt", "goal", "goal_request", "sample", "completion", "meta"}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", PROMPTS)


@pytest.fixture(scope="module")
def echo_llama_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny Llama with its (tied) embeddings scaled x10.

    At initialisation the tiny model's next-token distribution is nearly uniform whatever the
    input, so equal seeds would give equal samples for any prompt and a test could not see the
    prompt at all. Scaled, the model mostly echoes its last input token (p ~0.3-0.8) and still
    samples other tokens.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("echo-llama")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(tiny_llama_dir)).save_pretrained(str(out))
    return out


def _cfg(model, prompts, out, **kw) -> GenerateConfig:
    values = {"model": str(model), "prompts": str(prompts), "out": str(out), "num_samples": 2,
              "max_new_tokens": 4, "batch_size": 2, "device": "cpu", **kw}
    return resolve_config(GenerateConfig, overrides=values)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, echo_llama_dir, prompts_file) -> Path:
    """One uninterrupted run with the default test options: 3 prompts x 2 samples in batches of 2."""
    return generate(_cfg(echo_llama_dir, prompts_file, tmp_path_factory.mktemp("reference") / "full.jsonl"))


def _copy_run(reference: Path, dest: Path) -> Path:
    """``dest`` as a run with the reference's settings, its rows still to be written by the caller."""
    shutil.copy(reference.with_name(reference.name + ".run.json"), dest.with_name(dest.name + ".run.json"))
    return dest


def _setup_dir(tiny_llama_dir: Path, dest: Path, method: str) -> Path:
    """A merged gcsl model folder: the tiny model's files plus goals.json."""
    from gcsl.goals import GoalSetup, MetricSpec, default_templates

    shutil.copytree(tiny_llama_dir, dest)
    spec = MetricSpec(name="quality", low=0, high=1)
    setup = GoalSetup(method, spec, (0.2, 0.5, 0.8), (2, 3), 0.45, 3, default_templates(spec))
    (dest / "goals.json").write_text(json.dumps(setup.to_json()))
    return dest


def test_rows_fields_and_counts(reference):
    rows = _rows(reference)
    assert len(rows) == 6
    assert all(set(r) == ROW_KEYS for r in rows)
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [(p["id"], s) for p in PROMPTS for s in (0, 1)]
    by_id = {r["prompt_id"]: r for r in rows}
    assert by_id["chat"]["prompt"] == PROMPTS[1]["prompt"]
    assert by_id["poem"]["meta"] == {"difficulty": "easy", "target_rating": 4}
    assert by_id["short"]["meta"] == {}
    assert all(r["goal"] is None and r["goal_request"] is None for r in rows)  # a base model takes no goal
    assert all(isinstance(r["completion"], str) and r["completion"] for r in rows)
    assert not reference.with_name("full.jsonl.partial").exists()
    record = json.loads(reference.with_name("full.jsonl.run.json").read_text())
    assert record["stage"] == "generate" and record["complete"] is True and record["rows"] == 6
    assert record["seed"] == 0 and record["config"]["top_p"] == 0.9 and "torch" in record["versions"]


def test_same_seed_same_samples_other_seed_others(echo_llama_dir, prompts_file, tmp_path, reference):
    first = reference.read_text()
    again = generate(_cfg(echo_llama_dir, prompts_file, tmp_path / "b.jsonl")).read_text()
    other = generate(_cfg(echo_llama_dir, prompts_file, tmp_path / "c.jsonl", seed=1)).read_text()
    assert first == again
    assert first != other
    # the samples of one prompt differ from each other
    rows = _rows(reference)
    assert rows[0]["completion"] != rows[1]["completion"]


@pytest.mark.parametrize("torn", ["partial", "out"])
def test_resume_after_a_torn_file_gives_the_uninterrupted_result(echo_llama_dir, prompts_file, tmp_path, torn,
                                                                 reference):
    full = reference.read_bytes()
    out = _copy_run(reference, tmp_path / "resumed.jsonl")
    # A killed run: 2.5 rows written, the last one cut mid-line (partial file), or a finished file truncated.
    lines = full.split(b"\n")
    cut = b"\n".join(lines[:2]) + b"\n" + lines[2][: len(lines[2]) // 2]
    (tmp_path / ("resumed.jsonl.partial" if torn == "partial" else "resumed.jsonl")).write_bytes(cut)
    generate(_cfg(echo_llama_dir, prompts_file, out))
    assert out.read_bytes() == full
    assert not (tmp_path / "resumed.jsonl.partial").exists()


def test_resume_keeps_written_rows_and_never_duplicates(echo_llama_dir, prompts_file, tmp_path, reference):
    full = _rows(reference)
    kept = [dict(full[0], completion="KEPT-0"), dict(full[3], completion="KEPT-3")]
    partial = tmp_path / "g.jsonl.partial"
    partial.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"prompt_id": "sh')
    rows = _rows(generate(_cfg(echo_llama_dir, prompts_file, tmp_path / "g.jsonl")))
    assert [(r["prompt_id"], r["sample"]) for r in rows] == [(r["prompt_id"], r["sample"]) for r in full]
    assert rows[0]["completion"] == "KEPT-0" and rows[3]["completion"] == "KEPT-3"
    assert [r["completion"] for i, r in enumerate(rows) if i not in (0, 3)] == \
        [r["completion"] for i, r in enumerate(full) if i not in (0, 3)]


def test_resume_refuses_rows_made_with_other_settings(echo_llama_dir, prompts_file, tmp_path, reference):
    out = _copy_run(reference, tmp_path / "g.jsonl")
    out.write_text("".join(reference.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(StageError, match=r"seed: 0 -> 5"):
        generate(_cfg(echo_llama_dir, prompts_file, out, seed=5))
    with pytest.raises(StageError, match="outside this request"):
        generate(_cfg(echo_llama_dir, prompts_file, out, limit=1))


def test_goal_is_placed_like_prepare_did(echo_llama_dir, prompts_file, tmp_path):
    """A goal model's samples equal a base model's samples on the prompts with the goal written in."""
    from gcsl.goals import GoalSetup, inference_goal

    model = _setup_dir(echo_llama_dir, tmp_path / "trained", "gcsl-bey-snl")
    setup = GoalSetup.load(model / "goals.json")
    goal = inference_goal(setup, "scale:1.1").text
    assert goal == "Generate a response with a quality score greater than 0.88."
    rows = _rows(generate(_cfg(model, prompts_file, tmp_path / "goal.jsonl", goal="scale:1.1")))
    assert all(r["goal"] == goal and r["goal_request"] == "scale:1.1" for r in rows)
    assert [r["prompt"] for r in rows[::2]] == [p["prompt"] for p in PROMPTS]  # rows keep the goal-free prompt
    record = json.loads((tmp_path / "goal.jsonl.run.json").read_text())
    assert record["goals"]["text"] == goal and record["goals"]["method"] == "gcsl-bey-snl"

    # The same weights without goals.json, given prompts that already hold the goal, and no chat
    # template on text prompts (gcsl trains text prompts raw): identical ids, identical samples.
    written = [dict(p, prompt=setup.place(p["prompt"], goal)) for p in PROMPTS]
    assert written[0]["prompt"] == "Write a poem about the sea.\n\n" + goal
    assert written[1]["prompt"][-1]["content"] == "How do I boil an egg?\n\n" + goal
    base_rows = _rows(generate(_cfg(echo_llama_dir, _write_jsonl(tmp_path / "placed.jsonl", written),
                                    tmp_path / "base.jsonl", template_text_prompts="never")))
    assert [r["completion"] for r in base_rows] == [r["completion"] for r in rows]
    templated = _rows(generate(_cfg(echo_llama_dir, tmp_path / "placed.jsonl", tmp_path / "tmpl.jsonl")))
    # auto templates text prompts for base models: the model sees "assistant\n" last, not the goal
    assert [r["completion"] for r in templated] != [r["completion"] for r in rows]
    assert [r["completion"] for r in templated[2::2]] != [r["completion"] for r in rows[2::2]]


def test_goal_free_method_gets_no_goal(echo_llama_dir, prompts_file, tmp_path):
    model = _setup_dir(echo_llama_dir, tmp_path / "sft", "sft")
    rows = _rows(generate(_cfg(model, prompts_file, tmp_path / "g.jsonl", num_samples=1)))
    assert all(r["goal"] is None and r["goal_request"] is None for r in rows)


def _embed_model_dir(echo_llama_dir: Path, dest: Path) -> Path:
    """A merged gcsl-noquant-embed model: weights, goals.json and the scalar-goal conditioner."""
    from transformers import AutoModelForCausalLM

    from gcsl.goal_embedding import (
        GOAL_EMBEDDING_MODULE,
        GoalEmbeddingConfig,
        attach_goal_embedding,
        save_goal_embedding,
    )

    _setup_dir(echo_llama_dir, dest, "gcsl-noquant-embed")
    model = AutoModelForCausalLM.from_pretrained(str(dest))
    torch.manual_seed(0)
    with torch.no_grad():  # stronger attention outputs, so the soft goal token visibly moves the samples
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.mul_(10)
            layer.self_attn.o_proj.weight.mul_(10)
    attach_goal_embedding(model, GoalEmbeddingConfig(model.config.hidden_size, 0.0, 1.0, layers=1))
    save_goal_embedding(model, dest, weights=True)
    delattr(model, GOAL_EMBEDDING_MODULE)
    model.save_pretrained(str(dest))
    return dest


def test_scalar_goal_goes_through_the_goal_embedding(echo_llama_dir, prompts_file, tmp_path):
    model = _embed_model_dir(echo_llama_dir, tmp_path / "embed")
    high = _rows(generate(_cfg(model, prompts_file, tmp_path / "high.jsonl", goal="0.9")))
    low = _rows(generate(_cfg(model, prompts_file, tmp_path / "low.jsonl", goal="0.1")))
    assert all(r["goal"] is None and r["goal_request"] == "0.9" for r in high)
    assert json.loads((tmp_path / "high.jsonl.run.json").read_text())["goals"]["value"] == 0.9
    assert [r["completion"] for r in high] != [r["completion"] for r in low]
    (model / "goal_embedding.json").unlink()
    with pytest.raises(StageError, match="goal embedding"):
        generate(_cfg(model, prompts_file, tmp_path / "none.jsonl", goal="0.9"))


def test_bad_goal_request_is_a_config_error(echo_llama_dir, prompts_file, tmp_path):
    model = _setup_dir(echo_llama_dir, tmp_path / "trained", "gcsl-bey-snl")
    with pytest.raises(ConfigError, match="scale:"):
        generate(_cfg(model, prompts_file, tmp_path / "g.jsonl", goal="scale:lots"))


@pytest.mark.parametrize(("content", "message"), [
    ('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n', r"prompts.jsonl:2: not valid JSON"),
    ('{"id": "a", "text": "x"}\n', r"prompts.jsonl:1: missing field 'prompt'"),
    ('{"prompt": "x"}\n', r"prompts.jsonl:1: missing field 'id'"),
    ('{"id": "a", "prompt": "x"}\n\n{"id": "a", "prompt": "y"}\n', r"prompts.jsonl:3: duplicate id 'a'"),
    ('{"id": "a", "prompt": [{"role": "user"}]}\n', r"prompts.jsonl:1: field 'prompt' must be text or a list"),
    ('["a", "x"]\n', r"prompts.jsonl:1: expected a JSON object"),
])
def test_bad_prompt_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        load_prompts(path)
    assert "\n" not in str(err.value)


def test_missing_prompts_file(tmp_path, echo_llama_dir):
    with pytest.raises(DataError, match="nope.jsonl: prompts file not found"):
        generate(_cfg(echo_llama_dir, tmp_path / "nope.jsonl", tmp_path / "g.jsonl"))


def test_config_validation_lists_every_problem(tmp_path):
    with pytest.raises(ConfigError) as err:
        _cfg("m", "p.jsonl", tmp_path / "g.jsonl", top_p=1.5, temperature=0, num_samples=0)
    assert "top_p" in str(err.value) and "temperature" in str(err.value) and "num_samples" in str(err.value)


def test_prompts_from_parquet_with_nested_field_and_row_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": [{"text": "So I said", "toxicity": 0.1}, {"text": "Then they", "toxicity": 0.7}],
                      "challenging": [False, True]})
    pq.write_table(table, tmp_path / "rtp.parquet")
    rows = load_prompts(tmp_path / "rtp.parquet", id_field="#row", prompt_field="prompt.text")
    assert [(r.id, r.prompt) for r in rows] == [("0", "So I said"), ("1", "Then they")]
    assert rows[1].meta == {"prompt": {"text": "Then they", "toxicity": 0.7}, "challenging": True}
    assert len(load_prompts(tmp_path / "rtp.parquet", id_field="#row", prompt_field="prompt.text", limit=1)) == 1


def test_cli_generates_and_reports_errors_in_one_line(echo_llama_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    code = cli_main(["generate", "--model", str(echo_llama_dir), "--prompts", str(prompts_file), "--goal", "top",
                     "--num-samples", "1", "--max-new-tokens", "3", "--device", "cpu", "--out", str(out)])
    assert code == 0 and len(_rows(out)) == 3
    capsys.readouterr()
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"id": "x"}])
    code = cli_main(["generate", "--model", str(echo_llama_dir), "--prompts", str(bad), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "bad.jsonl:1: missing field 'prompt'" in err
