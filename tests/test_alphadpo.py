"""AlphaDPO (`--preference-loss alphadpo`): the loss against the paper's formula, and a tiny-model run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from gcsl.config import resolve_config
from gcsl.errors import ConfigError

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Two pairs of length-normalised (per-token average) log-probabilities: policy and reference.
CHOSEN, REJECTED = [-1.0, -0.5], [-2.0, -0.7]
REF_CHOSEN, REF_REJECTED = [-1.5, -0.6], [-1.5, -0.9]


def _pairs(requires_grad: bool = False):
    return [torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad)
            for v in (CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)]


def test_loss_matches_the_paper_formula_by_hand():
    from gcsl.training.preference import alphadpo_loss

    losses, normalised = alphadpo_loss(*_pairs(), beta=2.0, gamma=1.0, alpha=0.5, mean=0.25, std=0.5)
    # M = (r_w - r_l) - (rho_w - rho_l):  pair 1: (-1 + 2) - (-1.5 + 1.5) = 1.0
    #                                      pair 2: (-0.5 + 0.7) - (-0.6 + 0.9) = 0.2 - 0.3 = -0.1
    # M* = (M - 0.25) / 0.5:               1.5 and -0.7
    # z = beta (r_w - r_l) - gamma - alpha beta M*:
    #   pair 1: 2 * 1.0 - 1 - 0.5 * 2 * 1.5 = -0.5
    #   pair 2: 2 * 0.2 - 1 - 0.5 * 2 * (-0.7) = 0.1
    # loss = -log sigmoid(z) = log(1 + exp(-z)): log(1 + e^0.5) = 0.974077, log(1 + e^-0.1) = 0.644397
    assert normalised.tolist() == pytest.approx([1.5, -0.7])
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(0.5)), math.log1p(math.exp(-0.1))])
    assert losses.tolist() == pytest.approx([0.974077, 0.644397], abs=1e-6)


def test_alpha_zero_is_simpo():
    from trl.experimental.cpo import CPOTrainer

    from gcsl.training.preference import alphadpo_loss

    chosen, rejected, ref_chosen, ref_rejected = _pairs()
    losses, _ = alphadpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=2.0, gamma=0.5, alpha=0.0,
                              mean=0.25, std=0.5)
    # SimPO (Meng et al. 2024): -log sigmoid(beta (r_w - r_l) - gamma), no reference term.
    simpo = -torch.nn.functional.logsigmoid(2.0 * (chosen - rejected) - 0.5)
    assert torch.allclose(losses, simpo)
    # TRL's own SimPO loss on the same length-normalised log-probs (CPOTrainer, loss_type="simpo").
    stub = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.5, beta=2.0, label_smoothing=0.0,
                           accelerator=SimpleNamespace(device=chosen.device))
    trl_losses, _, _ = CPOTrainer.cpo_loss(stub, chosen, rejected)
    assert torch.allclose(losses, trl_losses)


def test_the_adaptive_margin_carries_no_gradient():
    from gcsl.training.preference import alphadpo_loss

    chosen, rejected, ref_chosen, ref_rejected = _pairs(requires_grad=True)
    losses, normalised = alphadpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=2.0, gamma=1.0, alpha=0.5,
                                       mean=0.25, std=0.5)
    assert not normalised.requires_grad
    losses.sum().backward()
    # The reference enters only through M, which is detached: no gradient reaches it.
    assert ref_chosen.grad is None and ref_rejected.grad is None
    # The policy's gradient is SimPO's with the margin gamma + alpha beta M* held constant:
    # d/d r_w of -log sigmoid(z) = -beta sigmoid(-z), and +beta sigmoid(-z) for r_l.
    z = 2.0 * (chosen - rejected).detach() - 1.0 - 0.5 * 2.0 * normalised
    assert torch.allclose(chosen.grad, -2.0 * torch.sigmoid(-z))
    assert torch.allclose(rejected.grad, 2.0 * torch.sigmoid(-z))


@pytest.fixture(scope="module")
def dpo_data(feedback_log, tmp_path_factory) -> Path:
    from gcsl.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prep") / "dpo"
    prepare(PrepareConfig(data=str(feedback_log), out=out, method="dpo", score_range=[1.0, 5.0],
                          metric_name="rating", quiet=True))
    return out


def _config(data: Path, out: Path, model: Path, **overrides):
    from gcsl.training.train import TrainConfig

    values = dict(data=data, out=out, model=str(model), max_steps=2, per_device_batch_size=4, logging_steps=1,
                  save_steps=50, report_to="none", learning_rate=1e-3, preference_loss="alphadpo")
    values.update(overrides)
    return TrainConfig(**values)


def test_alphadpo_trains_on_pairs(dpo_data, tiny_llama_dir, tmp_path):
    from gcsl.training.card import read_card_metadata
    from gcsl.training.preference import AlphaDPOConfig
    from gcsl.training.train import _trainer_arguments, _trainer_config, resolve_precision, train

    result = train(_config(dpo_data, tmp_path / "alphadpo", tiny_llama_dir))
    assert result.global_step == 2 and result.method == "dpo"
    assert math.isfinite(result.train_loss) and result.train_loss > 0
    logged = [h for h in result.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["loss"]) for h in logged)
    assert all("rewards/margins" in h and "alphadpo/margin_std" in h for h in logged)
    record = json.loads((result.out / "run.json").read_text())
    assert record["method"] == "alphadpo" and record["config"]["preference_loss"] == "alphadpo"
    assert math.isfinite(json.loads((result.out / "train_metrics.json").read_text())["train_loss"])
    card = (result.out / "README.md").read_text()
    assert "alphadpo fine-tune of" in card and "alphadpo" in read_card_metadata(card)["tags"]
    assert (result.out / "adapter_model.safetensors").is_file()

    # The paper's constants unless given.
    def trainer_config(**overrides):
        cfg = _config(dpo_data, tmp_path / "o", tiny_llama_dir, **overrides)
        return _trainer_config(cfg, "dpo", _trainer_arguments(cfg, tmp_path / "work", resolve_precision(cfg)))

    args = trainer_config()
    assert isinstance(args, AlphaDPOConfig)
    assert (args.beta, args.alphadpo_gamma, args.alphadpo_alpha) == (2.5, 1.5, 0.2)
    args = trainer_config(beta=1.0, alphadpo_gamma=0.3, alphadpo_alpha=0.05)
    assert (args.beta, args.alphadpo_gamma, args.alphadpo_alpha) == (1.0, 0.3, 0.05)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"alphadpo_alpha": 0.1}, "alphadpo_alpha"),  # with the default dpo loss
    ({"preference_loss": "simpo", "alphadpo_alpha": 0.1}, "alphadpo_alpha"),
    ({"preference_loss": "alphadpo", "alphadpo_alpha": -0.1}, "alphadpo_alpha"),
    ({"preference_loss": "alphadpo", "alphadpo_alpha": math.inf}, "alphadpo_alpha"),
    ({"preference_loss": "alphadpo", "alphadpo_gamma": -1.0}, "alphadpo_gamma"),
    ({"alphadpo_gamma": 1.0}, "alphadpo_gamma"),  # with the default dpo loss
    ({"preference_loss": "alphadpo", "beta": 0.0}, "beta"),
    ({"preference_loss": "alphadpo2"}, "preference_loss"),
])
def test_bad_alphadpo_options_fail_with_one_line(overrides, field):
    from gcsl.training.train import TrainConfig

    with pytest.raises(ConfigError) as err:
        resolve_config(TrainConfig, overrides={"data": "d", "out": "o", **overrides})
    message = str(err.value)
    assert "\n" not in message and field in message


def test_alphadpo_needs_dpo_pairs(feedback_log, tiny_llama_dir, tmp_path):
    from gcsl.data.prepare import PrepareConfig, prepare
    from gcsl.training.train import train

    data = tmp_path / "sft"
    prepare(PrepareConfig(data=str(feedback_log), out=data, method="sft", score_range=[1.0, 5.0],
                          metric_name="rating", quiet=True))
    with pytest.raises(ConfigError, match="preference_loss: alphadpo needs DPO pairs"):
        train(_config(data, tmp_path / "x", tiny_llama_dir))
    assert not (tmp_path / "x").exists()


def test_rosepo_loss_needs_the_smoothing_column(dpo_data, tiny_llama_dir, tmp_path):
    # Plain `gcsl prepare --method dpo` pairs carry no per-pair smoothing: the RosePO loss is refused up front.
    from gcsl.training.train import train

    with pytest.raises(ConfigError, match="preference_loss: rosepo reads each pair's smoothing column") as err:
        train(_config(dpo_data, tmp_path / "x", tiny_llama_dir, preference_loss="rosepo"))
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()
