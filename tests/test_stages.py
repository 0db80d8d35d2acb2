"""The stage files: the one JSONL reader/writer and the model folder's state."""

from __future__ import annotations

import json
import math

import pytest

from gcsl.errors import DataError
from gcsl.stages import ModelFolder, iter_jsonl, json_safe, read_generations, write_jsonl


def test_jsonl_round_trip_makes_nan_null_and_escapes_lone_surrogates(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"a": math.nan, "b": "x\udcff", "c": (1, 2)}, {"a": 1.5}])
    assert [obj for _, obj in iter_jsonl(path)] == [{"a": None, "b": "x\\udcff", "c": [1, 2]}, {"a": 1.5}]
    assert not list(tmp_path.glob("*.partial"))  # written under a temporary name, then renamed


def test_jsonl_reader_names_the_bad_line(tmp_path):
    path = tmp_path / "gens.jsonl"
    path.write_text('{"prompt_id": "a", "completion": "x"}\n\n[1, 2]\n')
    with pytest.raises(DataError, match=r"gens.jsonl:3: expected a JSON object, got list"):
        list(iter_jsonl(path, "generations"))
    path.write_text('{"prompt_id": "a"}\n')
    with pytest.raises(DataError, match=r"gens.jsonl:1: missing field 'completion'"):
        read_generations(path)


def test_json_safe_converts_numpy_scalars_and_paths(tmp_path):
    np = pytest.importorskip("numpy")
    assert json_safe({"x": np.float32(0.5), "p": tmp_path, "inf": math.inf}) == {"x": 0.5, "p": str(tmp_path),
                                                                                  "inf": None}


def test_model_folder_states_and_last_whole_checkpoint(tmp_path):
    folder = ModelFolder(tmp_path / "model")
    assert folder.state == "absent" and folder.last_checkpoint is None and folder.goal_setup() is None
    checkpoints = folder.partial / "checkpoints"
    for step, state in ((25, "{}"), (50, "{}"), (75, '{"half')):  # step 75 was killed mid-write
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        (checkpoints / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (checkpoints / "checkpoint-100").mkdir()  # no trainer state at all yet
    assert folder.state == "partial" and folder.last_checkpoint == checkpoints / "checkpoint-50"
    folder.path.mkdir()
    (folder.path / "run.json").write_text(json.dumps({"config": {}}))
    assert folder.state == "complete"
