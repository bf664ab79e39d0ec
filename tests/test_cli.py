"""The command line: every verb listed, bad input gives one line and exit status 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from moorelm.cli import VERBS, build_parser, main
from tests.conftest import TINY_MODEL


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_verb(capsys):
    """`moorelm --help` names every registered subcommand."""
    out = build_parser().format_help()
    for verbs in VERBS.values():
        for verb in verbs:
            assert verb in out


def test_console_script_and_module_entry_points():
    """`python -m moorelm --help` works in a fresh process."""
    r = subprocess.run([sys.executable, "-m", "moorelm", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout
    if shutil.which("moorelm"):
        r = subprocess.run(["moorelm", "train", "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "gpt2-baseline" in r.stdout


def one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("moorelm: error:") and needle in lines[0], err
    assert "Traceback" not in err


TRAIN = ["train", "--quiet", "--max-steps", "2", "--batch-size", "2", "--n-layer", "1",
         "--n-head", "1", "--n-embd", "16"]


@pytest.mark.parametrize(
    "setup,extra,needle",
    [
        (lambda p: None, [], "does not exist"),
        (lambda p: p.write_text(""), [], "empty"),
        (lambda p: p.write_bytes(b"\x00\x01\x02binary" * 10), [], "binary"),
        (lambda p: p.write_bytes("na\xefve caf\xe9\n".encode("latin-1") * 50), [], "UTF-8"),
        (lambda p: p.write_text("tiny corpus\n" * 3), ["--seq-len", "64"], "corpus too small"),
    ],
    ids=["missing", "empty", "binary", "non-utf8", "too-short"],
)
def test_bad_corpus(capsys, tmp_path, setup, extra, needle):
    """Missing, empty, binary, non-UTF-8 and too-short corpora: one line, exit 2."""
    corpus = tmp_path / "c.txt"
    setup(corpus)
    code, _, err = run_cli(capsys, *TRAIN, "--corpus", str(corpus), "--out", str(tmp_path / "r"), *extra)
    one_line_error(code, err, needle)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--preset", "gpt5"], "'gpt5' is not a preset"),
        (["train", "--recipe", "magic"], "'magic' is not a recipe"),
        (["train", "--pos", "alibi"], "invalid choice"),
        (["train", "--max-steps", "many"], "invalid int value"),
        (["train", "--no-such-flag"], "unrecognized arguments"),
        (["generate"], "required"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_flags(capsys, argv, needle):
    """Unknown presets, recipes, choices and flags: one line, exit 2."""
    code, _, err = run_cli(capsys, *argv)
    one_line_error(code, err, needle)


def test_flags_are_not_abbreviated(capsys):
    """A flag the verb lacks is refused even when it begins one it has (argparse's prefix
    matching took ``evaluate --text FILE`` for ``--text-field`` and scored the bundled
    corpus); the line names the verb's help and the flag it resembles."""
    code, _, err = run_cli(capsys, "evaluate", "run", "--text", "notes.txt")
    one_line_error(code, err, "unrecognized arguments: --text notes.txt")
    assert "did you mean --text-field?" in err and "'moorelm evaluate --help'" in err
    code, _, err = run_cli(capsys, "generate", "run", "--temprature", "0.5")
    one_line_error(code, err, "did you mean --temperature?")
    code, _, err = run_cli(capsys, "generate", "run", "--max-new", "3")
    one_line_error(code, err, "did you mean --max-new-tokens?")


def test_run_folder_errors(capsys, tmp_path, tiny_run):
    """No checkpoint, corrupt/truncated weights, mismatched config: one line each, exit 2."""
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(*run_cli(capsys, "generate", str(empty))[::2], "not a moorelm run folder")
    one_line_error(*run_cli(capsys, "generate", str(tmp_path / "nope"))[::2], "not a moorelm run folder")

    no_ckpt = tmp_path / "no_ckpt"
    shutil.copytree(tiny_run, no_ckpt)
    shutil.rmtree(no_ckpt / "checkpoints")
    one_line_error(*run_cli(capsys, "generate", str(no_ckpt))[::2], "no checkpoint")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_run, corrupt)
    weights = next((corrupt / "checkpoints").iterdir()) / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    one_line_error(*run_cli(capsys, "generate", str(corrupt))[::2], "truncated or corrupt")
    weights.write_bytes(b"\xff" * 100)
    one_line_error(*run_cli(capsys, "generate", str(corrupt))[::2], "truncated or corrupt")

    mismatch = tmp_path / "mismatch"
    shutil.copytree(tiny_run, mismatch)
    cfg = json.loads((mismatch / "config.json").read_text())
    cfg["model"]["n_embd"] = 64
    (mismatch / "config.json").write_text(json.dumps(cfg))
    one_line_error(*run_cli(capsys, "generate", str(mismatch))[::2], "does not match config.json")

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "config.json").write_text("{not json")
    one_line_error(*run_cli(capsys, "generate", str(broken))[::2], "not valid JSON")


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--temperature", "-1"], "temperature"),
        (["--temperature", "nan"], "temperature must be >= 0 and finite, got nan"),
        (["--temperature", "inf"], "temperature must be >= 0 and finite, got inf"),
        (["--top-p", "0"], "top-p"),
        (["--top-p", "1.2"], "top-p"),
        (["--top-k", "0"], "top-k"),
        (["--max-new-tokens", "-5"], "max-new-tokens"),
    ],
)
def test_bad_sampling_flags(capsys, tiny_run, flags, needle):
    """Invalid sampling values: one line, exit 2."""
    one_line_error(*run_cli(capsys, "generate", str(tiny_run), *flags)[::2], needle)


def test_prompt_that_is_not_utf8(capsys, tiny_run):
    """A prompt argument holding a byte that is not UTF-8 (Python reads it as a lone
    surrogate): one line naming it, exit 2, not a traceback from the tokenizer."""
    one_line_error(*run_cli(capsys, "generate", str(tiny_run), "--prompt", "ab\udcff")[::2],
                   "--prompt is not valid Unicode: character 2 is a lone surrogate (U+DCFF")


def test_seeds_at_the_ends_of_torchs_range(capsys, tiny_run):
    """A seed outside torch's range (-2**63..2**64-1) is one line; the top seed with several
    samples works (sample i's seed wraps modulo 2**64 instead of overflowing), and the wrapped
    seed draws what that seed draws."""
    one_line_error(*run_cli(capsys, "generate", str(tiny_run), "--seed", str(10**20))[::2],
                   "seed must be an integer in -2**63..2**64-1, got 100000000000000000000")
    flags = ["--max-new-tokens", "8", "--temperature", "1.0", "--no-stream"]
    code, out, err = run_cli(capsys, "generate", str(tiny_run), "--seed", str(2**64 - 1),
                             "--num-samples", "2", *flags)
    assert code == 0, err
    second = out.split("-" * 40 + "\n")[1]
    code, alone, _ = run_cli(capsys, "generate", str(tiny_run), "--seed", "0", *flags)
    assert code == 0 and second == alone


def test_generate_streams_and_warns_on_long_prompt(capsys, tiny_run):
    """generate prints the prompt and its continuation; a long prompt warns in one line."""
    code, out, err = run_cli(capsys, "generate", str(tiny_run), "--prompt", "ROMEO " * 40,
                             "--max-new-tokens", "10", "--seed", "1", "--num-samples", "2")
    assert code == 0
    assert out.count("ROMEO " * 40) == 2
    assert "moorelm: warning: prompt is" in err and "Traceback" not in err


def test_train_generate_evaluate_end_to_end(capsys, tmp_path, small_corpus):
    """train -> generate -> evaluate through the CLI, then --resume extends the run."""
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, *TRAIN, "--corpus", str(small_corpus), "--out", str(run),
                             "--seq-len", "32")
    assert code == 0, err
    assert "run folder:" in out
    code, out, _ = run_cli(capsys, "generate", str(run), "--prompt", "JULIET:",
                           "--max-new-tokens", "5", "--temperature", "0", "--no-stream")
    assert code == 0 and out.startswith("JULIET:")
    code, out, _ = run_cli(capsys, "evaluate", str(run), "--corpus", str(small_corpus), "--quiet")
    assert code == 0 and "bits/byte" in out
    code, _, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--max-steps", "4", "--quiet")
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--out", str(run), "--resume", "--n-layer", "3")
    one_line_error(code, err, "--resume continues")


def test_prepare_and_train_from_prepared_data(capsys, tmp_path, small_corpus):
    """`prepare` writes a dataset that `train --data` uses directly."""
    data = tmp_path / "data"
    code, out, _ = run_cli(capsys, "prepare", "--corpus", str(small_corpus), "--out", str(data),
                           "--tokenizer", "bpe", "--vocab-size", "300", "--quiet")
    assert code == 0 and "train" in out
    model = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_MODEL.items()]
    code, _, err = run_cli(capsys, "train", "--data", str(data), "--out", str(tmp_path / "r"),
                           "--max-steps", "2", "--quiet", *model)
    assert code == 0, err


def test_corpus_lists_plays(capsys):
    """`moorelm corpus` lists the bundled plays with their genre."""
    code, out, _ = run_cli(capsys, "corpus")
    assert code == 0 and "hamlet" in out and "tragedy" in out
