"""Every ``moorelm ...`` command the READMEs and docs/ show names a verb that exists, and its
flags parse.

The commands are read from the shell code blocks of README.md, README.zh-CN.md and
docs/*.md: lines
that run ``moorelm``, ``python -m moorelm`` or ``torchrun ... -m moorelm`` (others, such as
``make`` or ``curl``, are skipped), with ``\\`` continuations joined, comments dropped and
the command cut at a redirect or pipe. Each is parsed by the real parser
(``moorelm.cli.build_parser``) without running: placeholders such as RUN or FILE are just
positionals, and a synopsis's optional groups (``[--lora-alpha 16]``) are parsed as if given.
A failure names the file's line, the command and what the parser said.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from moorelm.cli import build_parser
from moorelm.errors import MoorelmError

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "README.zh-CN.md")
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console", "zsh"}
CUT = {">", ">>", "<", "|", "||", "&&", ";", "&", "2>", "2>&1"}


def commands_in(text: str) -> list[tuple[int, list[str]]]:
    """(line number, argv after ``moorelm``) for every moorelm command in the shell blocks
    of a Markdown text."""
    found = []
    lang = None  # None outside a code block, else the block's language
    lines = text.splitlines()
    n = 0
    while n < len(lines):
        line, start = lines[n], n + 1
        n += 1
        fence = re.match(r"^\s*```\s*([\w+-]*)", line)
        if fence:
            lang = fence.group(1).lower() if lang is None else None
            continue
        if lang not in SHELL_BLOCKS:
            continue
        while line.rstrip().endswith("\\") and n < len(lines):
            line = line.rstrip()[:-1] + " " + lines[n]
            n += 1
        argv = moorelm_argv(line.lstrip("$ ").strip())
        if argv is not None:
            found.append((start, argv))
    return found


def moorelm_argv(line: str) -> list[str] | None:
    """The arguments after ``moorelm`` on one shell line, or None when it runs something
    else."""
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: not a command we can read
        return None
    for i, tok in enumerate(tokens):
        if tok in CUT:
            tokens = tokens[:i]
            break
    if tokens[:1] == ["moorelm"]:
        return tokens[1:]
    for i in range(len(tokens) - 1):  # python -m moorelm, torchrun ... -m moorelm
        if tokens[i] == "-m" and tokens[i + 1] == "moorelm":
            head = tokens[0]
            if head.startswith("python") or head.endswith("python") or head == "torchrun":
                return tokens[i + 2:]
    return None


def _all_commands() -> list[tuple[str, int, list[str]]]:
    out = []
    docs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    for name in (*READMES, *docs):
        path = ROOT / name
        if path.exists():
            out += [(name, line, [a.lstrip("[").rstrip("]") or a for a in argv])
                    for line, argv in commands_in(path.read_text(encoding="utf-8"))]
    return out


COMMANDS = _all_commands()


def _verbs(parser) -> dict:
    for action in parser._actions:
        if action.dest == "verb":
            return action.choices
    raise AssertionError("the moorelm parser has no subcommands")


@pytest.mark.parametrize("readme,line,argv", COMMANDS,
                         ids=[f"{r}:{n}" for r, n, _ in COMMANDS])
def test_readme_command_parses(readme, line, argv):
    """The command on this README line names an existing verb and the real parser accepts
    its flags."""
    shown = "moorelm " + " ".join(shlex.quote(a) for a in argv)
    where = f"{readme}:{line}: `{shown}`"
    parser = build_parser()
    verbs = _verbs(parser)
    if not argv or argv[0].startswith("-"):  # moorelm --help / --version
        verb_ok = True
    else:
        verb_ok = argv[0] in verbs
    if not verb_ok:
        pytest.fail(f"{where}: there is no verb {argv[0]!r} (moorelm has: "
                    f"{', '.join(verbs)}); add the verb or fix the README line", pytrace=False)
    try:
        parser.parse_args(argv)
    except MoorelmError as e:
        pytest.fail(f"{where}: the {argv[0]!r} parser refuses it: {e}. Fix the README line, "
                    "or the flag was renamed/removed in moorelm/cli", pytrace=False)
    except SystemExit as e:  # --help and --version exit 0 after printing
        assert e.code == 0, f"{where}: argparse exited with {e.code}"


def test_both_readmes_show_commands():
    """Both READMEs are read, and each shows a good number of commands (an extractor that
    silently found none would make the test above vacuous)."""
    per = {name: sum(1 for r, _, _ in COMMANDS if r == name) for name in READMES}
    assert per["README.md"] >= 20, per
    assert per["README.zh-CN.md"] >= 10, per
    assert sum(1 for r, _, _ in COMMANDS if r.startswith("docs/")) >= 40
    assert {argv[0] for _, _, argv in COMMANDS} >= {"train", "generate", "serve", "chat",
                                                     "import", "scale"}


def test_extractor_reads_shell_lines():
    """Continuations are joined, comments and redirects dropped, python -m and torchrun
    lines read, other programs and non-shell blocks skipped, line numbers kept."""
    text = "\n".join([
        "intro `moorelm nope` in prose",           # 1: not in a block
        "```bash",                                # 2
        "make demo   # moorelm train",            # 3: another program
        "moorelm train --preset tiny \\",         # 4: continued
        "    --max-steps 5   # a comment",        # 5
        "moorelm train --print-config yaml > t.yaml",  # 6
        "python -m moorelm generate RUN --prompt 'a b'",  # 7
        "torchrun --nproc_per_node=2 -m moorelm train --fsdp",  # 8
        "$ moorelm corpus | head",                # 9
        "```",                                    # 10
        "```python",                              # 11
        "moorelm.load('x')",                      # 12
        "```",
    ])
    assert commands_in(text) == [
        (4, ["train", "--preset", "tiny", "--max-steps", "5"]),
        (6, ["train", "--print-config", "yaml"]),
        (7, ["generate", "RUN", "--prompt", "a b"]),
        (8, ["train", "--fsdp"]),
        (9, ["corpus"]),
    ]
