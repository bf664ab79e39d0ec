"""Config files (--config, --print-config), honest --help, --resume with agreeing flags, one
error prefix and missing optional extras named: the CLI layer shared by every verb."""

from __future__ import annotations

import json
import sys

import pytest

from moorelm.cli import main
from tests.conftest import TINY_MODEL


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _printed(capsys, argv: list[str]) -> dict:
    rc, out, err = _run(capsys, [*argv, "--print-config", "json"])
    assert rc == 0, err
    return json.loads(out)


def test_every_verb_takes_config_and_print_config(capsys):
    """Every registered verb has --config and --print-config in its --help."""
    from moorelm.cli import VERBS

    for verb in (v for verbs in VERBS.values() for v in verbs):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        out = capsys.readouterr().out
        assert "--config FILE" in out and "--print-config" in out, verb


def test_print_config_round_trips_and_command_line_wins(capsys, tmp_path):
    """--print-config's JSON fed back with --config resolves to the same settings; keys may
    use dashes or underscores; a flag on the command line beats the file."""
    first = _printed(capsys, ["train", "--preset", "tiny", "--max-steps", "3", "--no-compile",
                              "--logger", "tensorboard", "--logger", "wandb"])
    assert first["logger"] == ["tensorboard", "wandb"]
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(first), encoding="utf-8")
    assert _printed(capsys, ["train", "--config", str(saved)]) == first

    (tmp_path / "b.json").write_text(json.dumps({"max-steps": 7, "lr": 0.01, "quiet": True}))
    got = _printed(capsys, ["train", "--config", str(tmp_path / "b.json"), "--lr", "0.02"])
    assert (got["max_steps"], got["lr"], got["quiet"]) == (7, 0.02, True)
    got = _printed(capsys, ["train", "--config", str(saved), "--logger", "trackio"])
    assert got["logger"] == ["trackio"]  # a repeatable flag replaces the file's list


def test_print_config_shows_the_recipe_values(capsys):
    """Unset training flags print as the default recipe resolves them, not as None or the
    dataclass defaults."""
    got = _printed(capsys, ["train"])
    assert (got["recipe"], got["optimizer"], got["lr"]) == ("moorelm", "muon", 0.006)
    got = _printed(capsys, ["train", "--recipe", "gpt2-baseline"])
    assert (got["optimizer"], got["lr"]) == ("adamw", 0.001)


def test_yaml_config_prints_yaml(capsys, tmp_path):
    """A YAML config file is read, and --print-config answers in YAML when the file was YAML
    (or when asked with --print-config yaml)."""
    yaml = pytest.importorskip("yaml")
    f = tmp_path / "c.yaml"
    f.write_text("preset: tiny\nmax_steps: 5\nbatch-size: 4\n", encoding="utf-8")
    rc, out, err = _run(capsys, ["train", "--config", str(f), "--print-config"])
    assert rc == 0, err
    got = yaml.safe_load(out)
    assert (got["preset"], got["max_steps"], got["batch_size"]) == ("tiny", 5, 4)
    rc, out, _ = _run(capsys, ["generate", "RUN", "--print-config", "yaml"])
    assert rc == 0 and yaml.safe_load(out)["run"] == "RUN"


def test_positional_from_config_file(capsys, tmp_path):
    """A verb's positional (generate's run folder) may come from the file; the command line's
    still wins."""
    f = tmp_path / "g.json"
    f.write_text(json.dumps({"run": "runs/a", "temperature": 0, "max_new_tokens": 5,
                             "prompt": "--dash"}))
    got = _printed(capsys, ["generate", "--config", str(f)])
    assert (got["run"], got["temperature"], got["max_new_tokens"]) == ("runs/a", 0, 5)
    assert got["prompt"] == "--dash"  # a value that looks like a flag stays a value
    assert _printed(capsys, ["generate", "runs/b", "--config", str(f)])["run"] == "runs/b"


@pytest.mark.parametrize("content, suffix, needles", [
    ('{"lr": 1', ".json", ["does not parse", "line 1"]),
    ("a: [1\n", ".yaml", ["does not parse", "line 2"]),
    ('[1, 2]', ".json", ["must hold a mapping"]),
    ('{"max_step": 3, "lr": "high"}', ".json", ["unknown key", "'max_step'",
                                                 "did you mean 'max_steps'"]),
    ('{"lr": "high"}', ".json", ["'lr' must be a number", "'high'"]),
    ('{"max_steps": 2.5}', ".json", ["'max_steps' must be an integer", "2.5"]),
    ('{"compile": "yes"}', ".json", ["'compile' must be true or false"]),
    ('{"optimizer": "sgd"}', ".json", ["'optimizer' must be one of adamw, muon"]),
])
def test_bad_config_files(capsys, tmp_path, content, suffix, needles):
    """A config file that does not parse, has unknown keys (named, with the closest flag) or
    values of the wrong type: one line, exit 2, no traceback."""
    if suffix == ".yaml":
        pytest.importorskip("yaml")
    f = tmp_path / f"c{suffix}"
    f.write_text(content, encoding="utf-8")
    rc, out, err = _run(capsys, ["train", "--config", str(f), "--print-config"])
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("moorelm: error: "), err
    for n in needles:
        assert n in err, err


def test_missing_config_file(capsys, tmp_path):
    """A config file that is not there: one line naming it."""
    rc, _, err = _run(capsys, ["evaluate", "RUN", "--config", str(tmp_path / "nope.json")])
    assert rc == 2 and "nope.json does not exist" in err


def test_print_config_refuses_invalid_flags(capsys):
    """--print-config validates as a run would: a bad value is one line and exit 2."""
    rc, out, err = _run(capsys, ["train", "--lr", "-1", "--print-config"])
    assert rc == 2 and out == "" and err.count("\n") == 1
    rc, _, err = _run(capsys, ["train", "--logger", "mlflow", "--print-config"])
    assert rc == 2 and "mlflow" in err


def test_train_help_shows_the_recipe_defaults(capsys):
    """train --help shows the values the default recipe trains with (Muon, lr 6e-3) and says
    where they come from, not the dataclass defaults (AdamW, 1e-3)."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default muon)" in out and "(default 0.006)" in out
    assert "(default adamw)" not in out and "(default 0.001)" not in out
    assert "default recipe, moorelm" in out


@pytest.mark.parametrize("argv", [["bogus"], ["generate", "RUN", "--bogus"],
                                  ["train", "--optimizer", "sgd"]])
def test_errors_have_one_prefix(capsys, argv):
    """A bad flag or verb prints 'moorelm: error:' once, not 'moorelm: error: moorelm: ...'."""
    rc, _, err = _run(capsys, argv)
    assert rc == 2 and err.count("moorelm: error:") == 1
    assert not err.startswith("moorelm: error: moorelm")


def test_missing_extra_is_named(capsys, monkeypatch, tiny_run):
    """A verb whose optional extra is not installed says which extra installs it."""
    for name in [m for m in sys.modules if m == "moorelm.serve" or m.startswith("moorelm.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    rc, _, err = _run(capsys, ["serve", str(tiny_run), "--port", "0"])
    assert rc == 2 and "pip install 'moorelm[serve]'" in err and err.count("\n") == 1, err


def test_missing_extra_mapping():
    """The central map names the extra for each optional module, and leaves other import
    errors alone (they are bugs, not missing extras)."""
    from moorelm.cli import missing_extra

    def err(name):
        return missing_extra(ModuleNotFoundError(f"No module named {name!r}", name=name), "x")

    assert "moorelm[hf]" in str(err("transformers"))
    assert "moorelm[track]" in str(err("wandb"))
    assert "moorelm[serve]" in str(err("uvicorn"))
    assert err("numpy") is None


def test_run_config_and_resume_with_the_same_command_line(capsys, tmp_path, small_corpus):
    """A run folder's config.json works as --config (its model and train sections map onto
    the flags); the same train command line with --resume added continues the run, and only
    flags that conflict with it are refused, each named."""
    out = tmp_path / "run"
    model = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_MODEL.items()]
    argv = ["train", "--out", str(out), "--corpus", str(small_corpus), "--recipe", "moorelm",
            *model, "--batch-size", "4", "--eval-iters", "1", "--threads", "1", "--quiet"]
    rc, _, err = _run(capsys, [*argv, "--max-steps", "2"])
    assert rc == 0, err
    again = _printed(capsys, ["train", "--config", str(out / "config.json")])
    assert again["n_layer"] == TINY_MODEL["n_layer"] and again["batch_size"] == 4
    assert again["recipe"] == "moorelm" and again["optimizer"] == "muon"

    rc, _, err = _run(capsys, [*argv, "--max-steps", "3", "--resume"])
    assert rc == 0, err
    from moorelm.run import RunFolder

    assert RunFolder(out).latest().name.endswith("-00000003")

    rc, _, err = _run(capsys, [*argv, "--n-layer", "3", "--recipe", "gpt2-baseline",
                               "--max-steps", "4", "--resume"])
    assert rc == 2 and err.count("\n") == 1
    assert "--n-layer 3" in err and "--recipe gpt2-baseline" in err
    assert "--n-embd" not in err  # agreeing flags are not named
