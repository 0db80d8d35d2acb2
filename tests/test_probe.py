"""`gcsl probe` on tiny trained models: the numbers it reports are the model's real log-probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from gcsl.cli import main as cli_main
from gcsl.errors import ConfigError, DataError

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(feedback_log, tiny_llama_dir, tmp_path_factory):
    from gcsl.data.prepare import PrepareConfig, prepare
    from gcsl.training.train import TrainConfig, train

    runs: dict[str, tuple[Path, Path]] = {}

    def get(method: str) -> tuple[Path, Path]:
        if method not in runs:
            root = tmp_path_factory.mktemp(method)
            prepare(PrepareConfig(data=str(feedback_log), out=root / "prep", method=method, score_range=[1.0, 5.0],
                                  metric_name="rating", quiet=True))
            train(TrainConfig(data=root / "prep", out=root / "run", model=str(tiny_llama_dir), max_steps=2,
                              per_device_batch_size=4, save_steps=50, report_to="none", learning_rate=1e-2))
            runs[method] = (root / "prep", root / "run")
        return runs[method]

    return get


def _reference_logp(model_dir: Path, prompt, completion) -> float:
    """Mean per-token log p of a prepared row's completion, by a plain forward of the loaded model."""
    from gcsl.models import load_for_inference
    from gcsl.training.packing import tokenize_prompt_completion

    lm = load_for_inference(str(model_dir), device="cpu")
    ids, labels = tokenize_prompt_completion(prompt, completion, lm.tokenizer)
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    targets = torch.tensor(labels[1:])
    keep = targets != -100
    logp = logits.log_softmax(-1)[keep].gather(-1, targets[keep][:, None]).squeeze(-1)
    return float(logp.mean())


@pytest.mark.parametrize("method", ["gcsl-nl", "gcsl"])
def test_probe_scores_each_row_under_each_trained_goal_as_training_placed_it(method, trained, feedback_log,
                                                                             tmp_path):
    from gcsl.probe import ProbeConfig, run_probe

    prep, run = trained(method)
    summary = run_probe(ProbeConfig(model=str(run), data=str(feedback_log), out=tmp_path / "probe", ci_samples=200))
    goals = json.loads((prep / "goals.json").read_text())
    bins = goals["bins_used"]
    assert summary["goal_levels"] == list(range(1, bins + 1))  # classic methods train every level
    assert len(summary["matrix"]) == bins and all(len(r) == bins for r in summary["matrix"])
    rows = [json.loads(line) for line in (tmp_path / "probe" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == summary["n_rows"] == 32
    # Every row's bin follows the model's thresholds.
    thresholds = goals["thresholds"]
    for r in rows:
        assert r["bin"] == max(k + 1 for k, t in enumerate(thresholds) if r["score"] >= t)

    # One (row, goal) pair recomputed from the exact prompt + completion that training used.
    table = pq.read_table(prep / "train.parquet").to_pylist()
    row = next(r for r in table if r["row_id"] == 5)
    label = summary["goal_labels"][summary["goal_levels"].index(row["goal_level"])]
    assert rows[5]["logp"][label] == pytest.approx(_reference_logp(run, row["prompt"], row["completion"]), abs=1e-5)

    # The matrix and the sensitivity follow from the per-row numbers.
    labels = summary["goal_labels"]
    logp = np.array([[r["logp"][g] for g in labels] for r in rows])
    b = np.array([r["bin"] for r in rows])
    for k in range(1, bins + 1):
        if np.any(b == k):
            assert summary["matrix"][k - 1] == pytest.approx(logp[b == k].mean(0).tolist(), abs=1e-9)
    delta = logp[:, -1] - logp[:, 0]
    expected = delta[b == b.max()].mean() - delta[b == b.min()].mean()
    assert summary["sensitivity"] == pytest.approx(expected, abs=1e-9)
    assert summary["ci_low"] <= summary["sensitivity"] <= summary["ci_high"]
    slope = np.polyfit(b.astype(float), delta, 1)[0]  # the trend: least-squares slope of delta on the bin
    assert summary["trend"] == pytest.approx(slope, abs=1e-9)
    assert summary["trend_low"] <= summary["trend"] <= summary["trend_high"]
    assert (tmp_path / "probe" / "probe.png").stat().st_size > 1000
    record = json.loads((tmp_path / "probe" / "run.json").read_text())
    assert record["stage"] == "probe" and record["goals"]["method"] == method


def test_probe_beyond_method_uses_only_retained_goals(trained, feedback_log, tmp_path):
    from gcsl.probe import ProbeConfig, run_probe

    prep, run = trained("gcsl-bey-nl")
    retained = json.loads((prep / "goals.json").read_text())["retained_levels"]
    if len(retained) < 2:
        pytest.skip("the fixture's filtering kept a single goal")
    summary = run_probe(ProbeConfig(model=str(run), data=str(feedback_log), out=tmp_path / "p", ci_samples=100))
    assert summary["goal_levels"] == sorted(retained)
    assert all("greater than" in g for g in summary["goals"])


def test_probe_refuses_goal_free_models_and_single_bin_data(trained, feedback_log, tmp_path):
    from gcsl.probe import ProbeConfig, run_probe

    _, sft = trained("sft")
    with pytest.raises(ConfigError, match="no goals.json|trained 0 goal"):
        run_probe(ProbeConfig(model=str(sft), data=str(feedback_log), out=tmp_path / "a"))
    _, nl = trained("gcsl-nl")
    one_bin = tmp_path / "one.jsonl"
    one_bin.write_text("\n".join(json.dumps({"prompt": f"p{i}", "response": "r", "score": 1.0 + 0.01 * i})
                                 for i in range(3)) + "\n")
    with pytest.raises(DataError, match="at least two score bins"):
        run_probe(ProbeConfig(model=str(nl), data=str(one_bin), out=tmp_path / "b"))
    assert not (tmp_path / "b").exists()  # nothing half-written
    with pytest.raises(ConfigError, match="aspect: .* has one goal aspect .*; drop --aspect"):
        run_probe(ProbeConfig(model=str(nl), data=str(feedback_log), out=tmp_path / "c", aspect="brevity"))


def test_probe_cli_prints_sensitivity_and_refuses_to_overwrite(trained, feedback_log, tmp_path, capsys):
    _, run = trained("gcsl-nl")
    out = tmp_path / "probe"
    argv = ["probe", "--model", str(run), "--data", str(feedback_log), "--out", str(out), "--ci-samples", "100",
            "--limit", "16"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "goal sensitivity (gcsl-nl, n=16 rows" in printed and str(out / "probe.json") in printed
    assert cli_main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
