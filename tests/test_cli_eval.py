"""``moorelm eval``: the verb over moorelm.harness (table, JSON, config files, help, the
missing extra)."""

from __future__ import annotations

import json
import sys

import pytest

from moorelm.cli import main

pytest.importorskip("lm_eval")


def test_eval_prints_the_table_and_writes_json(tiny_run, tmp_path, capsys):
    """A bundled task runs from a config file (flags on the command line win): lm-eval's
    table is printed and --out holds the same figures as JSON."""
    config = tmp_path / "eval.yaml"
    config.write_text("tasks: moorelm_genre,moorelm_dates\nlimit: 5\nbatch-size: 2\n",
                      encoding="utf-8")
    out = tmp_path / "results.json"
    rc = main(["eval", str(tiny_run), "--config", str(config), "--limit", "3", "--out", str(out),
               "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "|moorelm_genre" in printed and "acc" in printed and "exact_match" in printed
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["n-samples"]["moorelm_genre"]["effective"] == 3
    acc = saved["results"]["moorelm_genre"]["acc,none"]
    assert f"{acc:.4f}" in printed


def test_eval_print_config_reads_back(tiny_run, tmp_path, capsys):
    """--print-config prints the settings in a form --config reads back, running nothing."""
    rc = main(["eval", str(tiny_run), "--tasks", "moorelm_genre", "--limit", "4",
               "--num-fewshot", "1", "--print-config", "json"])
    settings = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert settings["tasks"] == "moorelm_genre" and settings["limit"] == 4
    assert settings["num_fewshot"] == 1 and settings["batch_size"] == 16


def test_eval_help_lists_the_flags(capsys):
    """moorelm eval --help names the flags and the bundled tasks, and the verb is listed."""
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--tasks", "--limit", "--num-fewshot", "--batch-size", "--out",
                 "--include-path", "--apply-chat-template", "moorelm_genre"):
        assert flag in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "eval " in capsys.readouterr().out


def test_eval_without_lm_eval_says_what_to_install(tiny_run, monkeypatch, capsys):
    """Without lm-eval installed the verb prints one line naming the extra."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    rc = main(["eval", str(tiny_run), "--tasks", "moorelm_genre"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1
    assert "pip install 'moorelm[eval]'" in err[0]
