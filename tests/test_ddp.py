"""Scale-out: `gcsl train` under `accelerate launch` with two CPU processes (gloo), and the shipped configs."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import write_feedback_log

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
SHIPPED = ("cpu_2proc_gloo", "multi_gpu_ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_accelerate_configs_parse_and_name_their_launch_command(name):
    from accelerate.commands.config.config_args import ClusterConfig

    path = CONFIGS / f"{name}.yaml"
    text = path.read_text(encoding="utf-8")
    assert f"accelerate launch --config_file configs/accelerate/{name}.yaml -m gcsl.cli train" in text
    raw = yaml.safe_load(text)
    cluster = ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader rejects unknown keys
    assert cluster.num_processes == raw["num_processes"] >= 2
    assert str(cluster.mixed_precision) == "no"  # precision is gcsl train's --precision
    expected = {"cpu_2proc_gloo": "MULTI_GPU", "multi_gpu_ddp": "MULTI_GPU", "fsdp": "FSDP",
                "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}[name]
    assert str(cluster.distributed_type).endswith(expected)
    if name.startswith("deepspeed"):
        assert cluster.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "fsdp":
        assert cluster.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_train_and_write_exactly_one_adapter(tmp_path, tiny_llama_dir):
    from gcsl.data.prepare import PrepareConfig, prepare

    log = write_feedback_log(tmp_path / "log.jsonl", seed=2)
    data = tmp_path / "prep"
    prepare(PrepareConfig(data=str(log), out=data, method="gcsl-bey-nl", score_range=[1.0, 5.0], quiet=True))
    rows_prepared = pq.read_metadata(data / "train.parquet").num_rows

    runs = tmp_path / "runs"
    out = runs / "ddp"
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc_gloo.yaml"),
            "--main_process_port", str(_free_port()), "-m", "gcsl.cli", "train", "--data", str(data),
            "--out", str(out), "--model", str(tiny_llama_dir), "--max-steps", "3", "--per-device-batch-size", "2",
            "--logging-steps", "1", "--save-steps", "2", "--report-to", "none",
            # a small token budget, so the prefix-shared sequences outnumber one step's 2 x 2
            "--max-length", "96", "--pack-tokens", "96"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1

    assert [p.relative_to(runs) for p in runs.rglob("adapter_model.safetensors")] == [Path("ddp/adapter_model.safetensors")]
    assert sorted(p.name for p in runs.iterdir()) == ["ddp"]  # no .partial left behind
    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 2 and record["status"] == "finished" and record["global_step"] == 3
    state = json.loads((out / "trainer_state.json").read_text())
    first = next(h for h in state["log_history"] if h.get("step") == 1 and "loss" in h)
    # Every process packed the same sequences (printed once), and each optimizer step consumed
    # 2 processes x 2 of them: the processes split the data.
    summaries = re.findall(r"prefix sharing: (\d+) rows of \d+ feedback rows in (\d+) sequences", proc.stdout)
    assert len(summaries) == 1 and int(summaries[0][0]) == rows_prepared
    sequences = int(summaries[0][1])
    assert sequences > 4
    per_process = -(-sequences // 2)  # the distributed sampler pads to an even split
    assert first["epoch"] == pytest.approx(1 / -(-per_process // 2))
