"""Resuming `gcsl train` after SIGKILL gives the run an uninterrupted `gcsl train` gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_feedback_log
from gcsl.errors import ConfigError

torch = pytest.importorskip("torch")

STEPS = 12


@pytest.fixture(autouse=True)
def _deterministic_torch():
    # --deterministic switches torch to deterministic algorithms process-wide; put it back after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed subprocess runs with one thread too: same float summation order
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


def _prepared(tmp_path: Path) -> Path:
    from gcsl.data.prepare import PrepareConfig, prepare

    log = write_feedback_log(tmp_path / "log.jsonl", seed=1)
    out = tmp_path / "prep"
    prepare(PrepareConfig(data=str(log), out=out, method="gcsl-bey-nl", score_range=[1.0, 5.0], quiet=True))
    return out


def _options(data: Path, model: Path) -> dict:
    # lora_dropout stays on: resuming must restore the dropout RNG from the checkpoint too.
    return dict(data=data, model=str(model), max_steps=STEPS, save_steps=3, per_device_batch_size=2, logging_steps=1,
                learning_rate=5e-3, deterministic=True, report_to="none", seed=3)


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_llama_dir):
    from gcsl.stages import ModelFolder
    from gcsl.training.train import TrainConfig, train

    data = _prepared(tmp_path)
    options = _options(data, tiny_llama_dir)
    killed = tmp_path / "killed"
    argv = [sys.executable, "-m", "gcsl.cli", "train", "--out", str(killed)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "train.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        folder = ModelFolder(killed)
        deadline = time.monotonic() + 300
        # a whole checkpoint, with the training seconds written into it after it was saved
        while ((folder.last_checkpoint is None or not (folder.last_checkpoint / "gcsl_train_seconds.json").exists())
               and proc.poll() is None and time.monotonic() < deadline):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resume_from = folder.last_checkpoint
    assert resume_from is not None, (tmp_path / "train.log").read_text()[-2000:]
    killed_at = int(resume_from.name.split("-")[1])
    earlier = json.loads((resume_from / "gcsl_train_seconds.json").read_text())["train_seconds"]
    assert killed_at < STEPS and not killed.exists(), "the run finished before it could be killed"

    # What a kill during saving leaves: a newer checkpoint without trainer_state.json (written last).
    checkpoints = folder.partial / "checkpoints"
    torn = checkpoints / "checkpoint-999"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"")
    half = checkpoints / "checkpoint-998"  # killed while writing trainer_state.json itself
    half.mkdir()
    (half / "trainer_state.json").write_text('{"global_step": 9', encoding="utf-8")
    assert folder.last_checkpoint == resume_from
    with pytest.raises(ConfigError, match="lora_r"):
        train(TrainConfig(out=killed, resume=True, **{**options, "lora_r": 8}))
    # A record made before an option existed resumes at that option's default, and only there.
    record = folder.partial / "run.json"
    saved = json.loads(record.read_text())
    del saved["config"]["entropy_coef"]
    record.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"entropy_coef differ \(was: entropy_coef=0.0\)"):
        train(TrainConfig(out=killed, resume=True, **{**options, "entropy_coef": 0.5}))

    resumed = train(TrainConfig(out=killed, resume=True, **options))
    straight = train(TrainConfig(out=tmp_path / "straight", **options))

    assert not folder.partial.exists() and not torn.exists() and not half.exists()
    assert json.loads((killed / "run.json").read_text())["resumed_from_step"] == killed_at
    # Training time adds up over sittings: the killed sitting's seconds, recorded in its checkpoint, count.
    total = json.loads((killed / "train_metrics.json").read_text())["train_seconds"]
    assert 0 < earlier < total and "train_seconds_from_step" not in json.loads(
        (killed / "train_metrics.json").read_text())
    assert resumed.global_step == straight.global_step == STEPS
    assert resumed.train_loss == pytest.approx(straight.train_loss, abs=1e-5)
    resumed_losses = {h["step"]: h["loss"] for h in resumed.log_history if "loss" in h}
    straight_losses = {h["step"]: h["loss"] for h in straight.log_history if "loss" in h}
    assert set(range(killed_at + 1, STEPS + 1)) <= set(resumed_losses)
    for step in range(killed_at + 1, STEPS + 1):
        assert resumed_losses[step] == pytest.approx(straight_losses[step], abs=1e-5), step
    a, b = _adapter(killed), _adapter(tmp_path / "straight")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
