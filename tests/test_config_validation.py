"""Configs read from files are checked field by field, and JSON files are read safely."""

from __future__ import annotations

import os

import pytest

from moorelm.config import PRESETS, RECIPES, ModelConfig, TrainConfig, build_configs
from moorelm.errors import MoorelmError
from moorelm.jsonfile import check_text, loads_json, read_json


@pytest.mark.parametrize("cls, field, value, message", [
    (ModelConfig, "n_embd", 32.0, "'n_embd' must be an integer, got 32.0 (float)"),
    (ModelConfig, "n_head", True, "'n_head' must be an integer, got True (bool)"),
    (ModelConfig, "vocab_size", "322", "'vocab_size' must be an integer, got '322' (str)"),
    (ModelConfig, "seq_len", None, "'seq_len' must be an integer, got None (null)"),
    (ModelConfig, "n_kv_head", 1.5, "'n_kv_head' must be an integer or null"),
    (ModelConfig, "pos", 3, "'pos' must be a string, got 3 (int)"),
    (ModelConfig, "bias", 1, "'bias' must be true or false, got 1 (int)"),
    (ModelConfig, "rope_base", float("inf"), "'rope_base' must be a number, got inf"),
    (ModelConfig, "dropout", float("nan"), "'dropout' must be a number, got nan"),
    (ModelConfig, "norm_eps", 10**400, "'norm_eps' must be a number"),
    (ModelConfig, "n_layer", [2], "'n_layer' must be an integer, got [2] (list)"),
    (ModelConfig, "n_layer", {"a": 1}, "'n_layer' must be an integer, got {'a': 1} (dict)"),
    (TrainConfig, "lr", "0.1", "'lr' must be a number, got '0.1' (str)"),
    (TrainConfig, "max_steps", 1.5, "'max_steps' must be an integer or null, got 1.5"),
    (TrainConfig, "compile", "yes", "'compile' must be true or false"),
    (TrainConfig, "seed", "x" * 100, "'seed' must be an integer, got 'xxxxxxxxxxxxxxxxxx"),
])
def test_wrong_types_are_one_line(cls, field, value, message):
    """A field of the wrong JSON type is refused, naming the field, the value and the type
    expected (it used to reach the model as a float width or crash with a TypeError)."""
    with pytest.raises(MoorelmError, match="^" + ("model" if cls is ModelConfig else "train")
                       + " config field ") as e:
        cls.from_dict({field: value})
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("field, value", [
    ("rope_base", 0), ("rope_base", -10000.0), ("norm_eps", 0.0), ("norm_eps", -1e-5),
    ("logit_softcap", 0.0), ("mlp_hidden", 0), ("init_std", -0.1),
])
def test_model_ranges(field, value):
    """rope_base and norm_eps must be positive (they divided by zero or took logs of
    negatives at load); the other optional sizes have their ranges too."""
    with pytest.raises(MoorelmError, match=field):
        ModelConfig.from_dict({field: value})


@pytest.mark.parametrize("field, value", [
    ("beta1", 1.0), ("beta2", -0.1), ("eps", 0.0), ("weight_decay", -1.0), ("grad_clip", -1.0),
    ("log_interval", 0), ("keep_checkpoints", 0), ("threads", 0), ("peak_flops", 0.0),
    ("eval_interval", -1), ("muon_momentum", 1.5),
])
def test_train_ranges(field, value):
    """Every numeric training field has a range; values outside it are one line."""
    with pytest.raises(MoorelmError, match=field):
        TrainConfig.from_dict({field: value})


def test_valid_configs_still_round_trip():
    """Every recipe x preset builds and round-trips through from_dict; an integer is
    accepted where a number is expected, and null where a field is optional."""
    for recipe in RECIPES:
        for preset in PRESETS:
            m, t = build_configs(preset=preset, recipe=recipe)
            assert ModelConfig.from_dict(m.to_dict()) == m
            assert TrainConfig.from_dict(t.to_dict()) == t
    assert ModelConfig.from_dict({"rope_base": 500000, "n_kv_head": None}).rope_base == 500000
    with pytest.raises(MoorelmError, match="must be a JSON object, got list"):
        ModelConfig.from_dict([1, 2])


def _refused(path, match):
    with pytest.raises(MoorelmError, match=match) as e:
        read_json(path)
    assert "\n" not in str(e.value)


def test_hostile_json_files(tmp_path, monkeypatch):
    """A folder, a link to /dev/zero, a FIFO, a missing file, 100k-deep JSON, a 5000-digit
    integer, invalid UTF-8 and a file over the size cap are each one line."""
    _refused(tmp_path, "is a folder")
    os.symlink("/dev/zero", tmp_path / "zero.json")
    _refused(tmp_path / "zero.json", "is a device")
    os.mkfifo(tmp_path / "fifo.json")
    _refused(tmp_path / "fifo.json", "is a pipe")
    _refused(tmp_path / "none.json", "does not exist")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    _refused(deep, "nests JSON too deeply")
    digits = tmp_path / "digits.json"
    digits.write_text('{"n_embd": ' + "9" * 5000 + "}")
    _refused(digits, "a number too long")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"a": "\xff"}')
    _refused(bad, "not valid UTF-8")
    bad.write_text('{"a": ')
    _refused(bad, "not valid JSON")
    import moorelm.jsonfile as jsonfile

    monkeypatch.setattr(jsonfile, "MAX_JSON_BYTES", 10)
    bad.write_text('{"a": "0123456789"}')
    with pytest.raises(MoorelmError, match="at most 10"):
        jsonfile.read_json(bad, max_bytes=jsonfile.MAX_JSON_BYTES)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_json_file(tmp_path):
    """A file the user may not read is one line naming it."""
    p = tmp_path / "config.json"
    p.write_text("{}")
    p.chmod(0)
    _refused(p, "Permission denied")


def test_rows_and_text():
    """loads_json and check_text name where the bad row or string came from."""
    assert loads_json(b'{"a": 1}', "row") == {"a": 1}
    with pytest.raises(MoorelmError, match="^row 3 nests"):
        loads_json("[" * 50_000, "row 3")
    with pytest.raises(MoorelmError, match="lone surrogate"):
        check_text(loads_json('"a\\udc80"', "row"), "row")
    assert check_text("caf\u00e9 \U0001f642", "row") == "caf\u00e9 \U0001f642"
