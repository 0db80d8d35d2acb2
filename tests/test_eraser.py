"""LLMEraser instance removal (gcsl.training.eraser) on a tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gcsl.config import resolve_config
from gcsl.errors import ConfigError, DataError

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prepared(feedback_log, tmp_path_factory):
    """The adapter's rows (sft-all: all 32) and the rows to erase (sft-bottom: the worst quarter) of one log."""
    from gcsl.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("prep")
    for method in ("sft-all", "sft-bottom"):
        prepare(PrepareConfig(data=str(feedback_log), out=root / method, method=method, score_range=[1.0, 5.0],
                              metric_name="rating", quiet=True))
    return root / "sft-all", root / "sft-bottom"


@pytest.fixture(scope="module")
def full_adapter(prepared, tiny_llama_dir, tmp_path_factory) -> Path:
    from gcsl.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "sft-all"
    train(TrainConfig(data=prepared[0], out=out, model=str(tiny_llama_dir), max_steps=4, per_device_batch_size=8,
                      learning_rate=1e-2, lora_r=4, report_to="none", save_steps=50))
    return out


def _config(prepared, model: Path, out: Path, **overrides):
    from gcsl.training.eraser import EraseConfig

    return resolve_config(EraseConfig, overrides={"model": model, "data": prepared[0], "erase": prepared[1],
                                                  "out": out, **overrides})


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_hessian_vector_product_matches_finite_differences_of_the_gradient(full_adapter, prepared):
    from gcsl.training.eraser import (
        add_to_parameters,
        hessian_vector_product,
        load_trainable_adapter,
        loss_gradient,
        tokenized_rows,
    )

    model, tokenizer = load_trainable_adapter(full_adapter)
    model.double()  # central differences need more digits than float32 holds
    params = [p for p in model.parameters() if p.requires_grad]
    table = pq.read_table(prepared[0] / "train.parquet").to_pydict()
    rows = tokenized_rows(table["prompt"][:6], table["completion"][:6], tokenizer, 1024)
    pad = tokenizer.pad_token_id
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = v.to(params[0].device)  # the adapter sits on the GPU where there is one
    v /= v.norm()  # a unit direction: eps is then the length of the finite-difference step
    hv = hessian_vector_product(model, params, rows, v, 4, pad)

    def mean_gradient_at(shift: float) -> torch.Tensor:
        add_to_parameters(params, v, shift)
        g = loss_gradient(model, params, rows, 4, pad) / len(rows)
        add_to_parameters(params, v, -shift)
        return g

    # Llama's RMSNorm computes in float32 even in a float64 model, so the gradient carries float32 rounding
    # (~1e-7); a step of 1e-2 keeps that noise and the central difference's O(eps^2) error both near 1e-5.
    eps = 1e-2
    numeric = (mean_gradient_at(eps) - mean_gradient_at(-eps)) / (2 * eps)
    error = float((hv - numeric).norm() / hv.norm())
    print(f"relative error of the Hessian-vector product: {error:.2e}")
    assert hv.norm() > 0
    assert error < 1e-3


def test_the_update_matches_its_first_order_prediction_and_raises_the_erased_loss(full_adapter, prepared):
    """delta = (H + lambda I)^-1 b with b = (1/n) sum_E grad L_i predicts d(mean erased loss) = (n/|E|) b.delta
    for a small step t delta, positive when H + lambda I is positive definite: the erased rows become less likely."""
    from gcsl.training.eraser import (
        add_to_parameters,
        hessian_vector_product,
        load_trainable_adapter,
        loss_gradient,
        row_losses,
        solve_influence,
        tokenized_rows,
    )

    model, tokenizer = load_trainable_adapter(full_adapter)
    model.double()
    params = [p for p in model.parameters() if p.requires_grad]
    # The first 16 training rows as the training set keep the float64 products cheap; the algebra is the same.
    full = pq.read_table(prepared[0] / "train.parquet").slice(0, 16).to_pydict()
    bottom = set(pq.read_table(prepared[1] / "train.parquet").column("row_id").to_pylist())
    rows = tokenized_rows(full["prompt"], full["completion"], tokenizer, 1024)
    assert 0 < len(bottom & set(full["row_id"])) < 16
    erased = [r for i, r in enumerate(rows) if full["row_id"][i] in bottom]
    retained = [r for i, r in enumerate(rows) if full["row_id"][i] not in bottom]
    # The tiny adapter's Hessian has eigenvalues from about -60 to 60 (a LoRA loss is a saddle in A and B):
    # damping 100 makes the system positive definite, as CG needs.
    pad, damping = tokenizer.pad_token_id, 100.0
    b = loss_gradient(model, params, erased, 8, pad) / len(rows)
    hvp = lambda v: hessian_vector_product(model, params, rows, v, 16, pad)  # noqa: E731
    x = solve_influence(hvp, b, solver="cg", iterations=10, damping=damping, tolerance=1e-6)
    residual = (hvp(x) + damping * x - b).norm() / b.norm()
    assert residual < 1e-3  # CG solved the damped system

    def mean_losses(step: float) -> tuple[float, float]:
        add_to_parameters(params, x, step)
        with torch.no_grad():
            out = float(row_losses(model, erased, pad).mean()), float(row_losses(model, retained, pad).mean())
        add_to_parameters(params, x, -step)
        return out

    predicted = float(len(rows) / len(erased) * (b @ x))
    assert predicted > 0
    t = 1e-3
    (erased_0, _), (erased_t, _) = mean_losses(0.0), mean_losses(t)
    assert (erased_t - erased_0) / t == pytest.approx(predicted, rel=0.02)
    # The whole update: the erased rows' loss rises, and more than the retained rows' does.
    (erased_1, retained_1), (_, retained_0) = mean_losses(1.0), mean_losses(0.0)
    assert erased_1 > erased_0
    assert erased_1 - erased_0 > retained_1 - retained_0


def test_erase_writes_an_adapter_that_loads_and_generates(full_adapter, prepared, tmp_path):
    from gcsl.models import load_for_inference
    from gcsl.training.eraser import erase

    out = tmp_path / "llmeraser"
    result = erase(_config(prepared, full_adapter, out, solver="cg", iterations=8, damping=100.0, batch_size=16))
    record = json.loads((out / "run.json").read_text())
    assert (record["stage"], record["method"], record["rows"], record["erased_rows"]) == ("erase", "llmeraser", 32, 8)
    assert record["solver"]["solver"] == "cg" and record["solver"]["damping"] == 100.0
    assert record["relative_residual"] == result.residual < 1e-2
    assert record["erase_seconds"] > 0 and record["config"]["model"]  # the base the loaders read
    assert result.losses["erased_after"] > result.losses["erased_before"]
    before, after = _adapter_tensors(full_adapter), _adapter_tensors(out)
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    loaded = load_for_inference(str(out), device="cpu")
    ids = loaded.tokenizer("Describe item 3.", return_tensors="pt")
    generated = loaded.model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 4


def test_a_sampled_hessian_solves_its_own_system_and_still_erases(full_adapter, prepared, tmp_path):
    from gcsl.training.eraser import erase

    result = erase(_config(prepared, full_adapter, tmp_path / "sampled", solver="cg", iterations=8, damping=100.0,
                           batch_size=16, hessian_rows=12))
    record = json.loads((tmp_path / "sampled" / "run.json").read_text())
    assert (record["rows"], record["hessian_rows"], record["solver"]["hessian_rows"]) == (32, 12, 12)
    assert 1 <= record["hessian_products"] <= 8
    assert result.residual < 1e-2
    assert result.losses["erased_after"] > result.losses["erased_before"]
    # A sample as large as the rows is all of them: the same weights as the default, bit for bit.
    erase(_config(prepared, full_adapter, tmp_path / "all", solver="cg", iterations=8, damping=100.0,
                  batch_size=16, hessian_rows=32))
    erase(_config(prepared, full_adapter, tmp_path / "default", solver="cg", iterations=8, damping=100.0,
                  batch_size=16))
    every, default, sampled = (_adapter_tensors(tmp_path / name) for name in ("all", "default", "sampled"))
    assert all(torch.equal(every[k], default[k]) for k in every)
    assert any(not torch.equal(sampled[k], default[k]) for k in every)


def test_the_papers_adam_solver_runs_with_its_defaults(full_adapter, prepared, tmp_path):
    from gcsl.training.eraser import EraseConfig, erase

    assert (EraseConfig.iterations, EraseConfig.learning_rate, EraseConfig.init, EraseConfig.damping,
            EraseConfig.batch_size) == (20, 1e-5, 1e-6, 1e-5, 1)
    result = erase(_config(prepared, full_adapter, tmp_path / "adam"))
    record = json.loads((tmp_path / "adam" / "run.json").read_text())
    assert record["solver"]["solver"] == "adam" and record["solver"]["iterations"] == record["hessian_products"] == 20
    assert result.residual is not None and result.residual > 0
    before, after = _adapter_tensors(full_adapter), _adapter_tensors(tmp_path / "adam")
    # An Adam step moves each entry by about the step size (a little more when the gradient's sign flips):
    # 20 steps of 1e-5 from 1e-6 stay well within 1.5 x 20 x 1e-5.
    moved = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert 0 < moved <= 1.5 * 20 * 1e-5


def test_an_empty_erase_set_leaves_the_adapter_unchanged_bit_for_bit(full_adapter, prepared, tmp_path):
    from gcsl.training.eraser import erase

    empty = tmp_path / "empty"
    empty.mkdir()
    table = pq.read_table(prepared[1] / "train.parquet")
    pq.write_table(table.slice(0, 0), empty / "train.parquet")
    result = erase(_config((prepared[0], empty), full_adapter, tmp_path / "same"))
    assert (result.erased, result.residual) == (0, None)
    before, after = _adapter_tensors(full_adapter), _adapter_tensors(tmp_path / "same")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bad_settings_are_one_line_config_errors(full_adapter, prepared, tmp_path):
    with pytest.raises(ConfigError) as info:
        _config(prepared, full_adapter, tmp_path / "x", iterations=0, damping=-1.0)
    message = str(info.value)
    assert "\n" not in message
    assert "iterations: must be positive, got 0" in message and "damping: must be >= 0" in message
    with pytest.raises(ConfigError, match="hessian_rows: must be >= 0"):
        _config(prepared, full_adapter, tmp_path / "x", hessian_rows=-1)
    with pytest.raises(ConfigError, match="solver: 'newton' is not one of adam, cg"):
        _config(prepared, full_adapter, tmp_path / "x", solver="newton")
    with pytest.raises(ConfigError, match="out: must differ from --model"):
        _config(prepared, full_adapter, full_adapter)
    with pytest.raises(ConfigError, match="exists and is not empty; pass --overwrite"):
        _config(prepared, full_adapter, prepared[0])  # refused before any work, not after the solve


def test_erase_rows_from_another_log_are_a_data_error(full_adapter, prepared, tmp_path):
    from gcsl.training.eraser import erase

    other = tmp_path / "other"
    other.mkdir()
    table = pq.read_table(prepared[1] / "train.parquet").to_pydict()
    table["completion"] = [c + " changed" for c in table["completion"]]
    import pyarrow as pa

    pq.write_table(pa.table(table), other / "train.parquet")
    with pytest.raises(DataError, match="row_id .* is not a row of"):
        erase(_config((prepared[0], other), full_adapter, tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_the_experiment_runner_trains_the_full_adapter_and_erases_from_it(feedback_log, tiny_llama_dir, tmp_path):
    from gcsl.experiments.layout import ExperimentLayout
    from gcsl.experiments.runner import _GENERATORS, ExperimentConfig, expand_variants
    from gcsl.methods import get_method

    cfg = ExperimentConfig(name="erase", out=tmp_path / "exp", task="sentiment", data=str(feedback_log),
                           eval_prompts=str(feedback_log), model=str(tiny_llama_dir), methods=["llmeraser"],
                           seeds=[0], prepare={"score_range": [1.0, 5.0], "metric_name": "rating", "quiet": True},
                           train={"max_steps": 2, "per_device_batch_size": 8, "lora_r": 4, "report_to": "none"},
                           erase={"solver": "cg", "iterations": 4, "damping": 100.0, "batch_size": 16})
    (v,) = expand_variants(cfg)
    layout = ExperimentLayout(cfg.out)
    generator = _GENERATORS[get_method(v.method).variant_kind](cfg, layout, v, 0, None)
    model = layout.stage("llmeraser", 0).model
    assert generator.model == str(model)
    record = json.loads((model / "run.json").read_text())
    assert (record["stage"], record["rows"], record["erased_rows"]) == ("erase", 32, 8)
    assert record["full_adapter"] == str(model.with_name("full"))
    assert json.loads((model.with_name("full") / "run.json").read_text())["method"] == "sft-all"
    assert (layout.stage("llmeraser").prepared.parent / "erase" / "prepared" / "goals.json").is_file()
    stamp = (model / "run.json").stat().st_mtime_ns
    _GENERATORS["erased"](cfg, layout, v, 0, None)  # a finished model is not made again
    assert (model / "run.json").stat().st_mtime_ns == stamp

    # The report's training table: the adapter erased from (kept in records/ like any model), then the erase step.
    from gcsl.experiments.report import _training_table

    layout.keep_records()
    assert (cfg.out / "records" / "llmeraser" / "seed0" / "full" / "run.json").is_file()
    adapter, step = _training_table(cfg, [v])
    assert (adapter["variant"], adapter["train_rows"], adapter["optimizer_steps"]) == (
        "llmeraser (sft-all adapter)", [32], [2])
    assert (step["variant"], step["train_rows"], step["optimizer_steps"]) == ("llmeraser (erase)", [8], [None])
    assert step["train_seconds"] == [record["erase_seconds"]]


def test_an_unknown_erase_option_is_caught_before_training(feedback_log, tmp_path):
    from gcsl.experiments.runner import ExperimentConfig

    with pytest.raises(ConfigError, match=r"erase\.damp: unknown option of EraseConfig"):
        resolve_config(ExperimentConfig, overrides={
            "name": "e", "out": tmp_path, "task": "sentiment", "data": str(feedback_log),
            "eval_prompts": str(feedback_log), "methods": ["llmeraser"], "erase": {"damp": 1.0}})
