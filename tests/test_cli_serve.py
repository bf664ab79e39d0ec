"""`moorelm serve`'s limit flags: they reach ``ServerLimits``, bad values are one line with
exit 2, and ``--help`` shows the defaults ``ServerLimits`` really applies."""

from __future__ import annotations

import dataclasses
import re
import resource

import pytest

import moorelm.serve
from moorelm.cli import main
from moorelm.cli.serve import LIMIT_FLAGS
from moorelm.serve import ServerLimits


@pytest.fixture
def served(monkeypatch):
    """Calls of ``moorelm.serve.serve`` recorded instead of serving."""
    calls: list[dict] = []

    def fake_serve(run, **kwargs):
        calls.append(dict(kwargs, run=run))

    monkeypatch.setattr(moorelm.serve, "serve", fake_serve)
    return calls


def test_limit_flags_reach_server_limits(served, capsys):
    """Each limit flag sets its ServerLimits field; flags left out keep the dataclass's
    defaults, so a plain `moorelm serve RUN` serves with ServerLimits()."""
    assert main(["serve", "runs/x"]) == 0
    assert served[-1]["limits"] == ServerLimits()
    argv = ["serve", "runs/x", "--drain", "12.5", "--keep-alive", "0", "--header-timeout", "3",
            "--body-timeout", "7", "--max-connections", "40"]
    assert main(argv) == 0
    assert served[-1]["limits"] == ServerLimits(keep_alive_s=0, header_timeout_s=3,
                                                body_timeout_s=7, max_connections=40,
                                                drain_s=12.5)
    assert served[-1]["run"] == "runs/x" and served[-1]["max_batch"] is None  # the engine's
    assert served[-1]["threads"] >= 1 and served[-1]["kv_dtype"] == "auto"
    assert main(["serve", "runs/x", "--kv-dtype", "bf16"]) == 0
    assert served[-1]["kv_dtype"] == "bf16"
    assert main(["serve", "runs/x", "--drain", "0"]) == 0
    assert served[-1]["limits"].drain_s == 0


@pytest.mark.parametrize("argv, needle", [
    (["--drain", "-1"], "--drain must be a number of seconds, 0 or more"),
    (["--keep-alive", "-0.5"], "--keep-alive must be a number of seconds, 0 or more"),
    (["--header-timeout", "0"], "--header-timeout must be a number of seconds, more than 0"),
    (["--body-timeout", "0"], "--body-timeout must be a number of seconds, more than 0"),
    (["--body-timeout", "-3"], "--body-timeout must be a number of seconds, more than 0"),
    (["--drain", "nan"], "--drain must be a number of seconds"),
    (["--keep-alive", "inf"], "--keep-alive must be a number of seconds"),
    (["--max-connections", "0"], "--max-connections must be at least 1"),
    (["--max-connections", "-4"], "--max-connections must be at least 1"),
    (["--max-connections", "2.5"], "invalid int value"),
    (["--drain", "soon"], "invalid float value"),
])
def test_bad_limit_flags_are_one_line(served, capsys, argv, needle):
    """A negative, zero (where zero makes no sense), non-finite or non-numeric limit is
    refused with one line and exit status 2, before anything is served."""
    code = main(["serve", "runs/x", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and served == []


def test_help_shows_the_real_defaults(capsys):
    """--help documents every limit flag with the default ServerLimits applies."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = {f.name: f.default for f in dataclasses.fields(ServerLimits)}
    for flag, (name, _) in LIMIT_FLAGS.items():
        m = re.search(re.escape(flag) + r" SECONDS .*?\(default ([0-9.]+)[;)]", text)
        assert m, flag
        assert float(m.group(1)) == defaults[name], flag
    assert defaults["max_connections"] is None
    assert re.search(r"--max-connections N .*?\(default: half the open-file limit", text)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft > 16:
        assert ServerLimits().connections() == min(1024, soft // 2)
    assert {n for n, _ in LIMIT_FLAGS.values()} | {"max_connections"} == set(defaults)
