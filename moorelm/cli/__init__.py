"""The command line: ``moorelm VERB ...`` (also ``python -m moorelm``).

A thin layer: each verb's module adds its flags and calls the Python API. Verbs are listed
in ``VERBS`` (name -> module under moorelm.cli); each module defines ``add_parser(sub)``
which registers its verb(s) with a ``func(args)`` to run. User errors (``MoorelmError``,
bad flags) print one line and exit with status 2; warnings print one line each.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from moorelm.errors import MoorelmError

# module (under moorelm.cli) -> the verbs it registers, in the order --help lists them
VERBS: dict[str, tuple[str, ...]] = {
    "core": ("corpus", "prepare", "train", "generate", "evaluate"),
    "finetune": ("finetune", "finetune-eval", "finetune-demo-data"),
    "classify": ("finetune-classifier", "classify", "genre-data"),
    "interop": ("export", "import"),
    "serve": ("serve",),
    "inspect": ("inspect",),
    "scale": ("scale", "trend"),
}


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) with exit status 2."""

    def error(self, message: str):  # noqa: D401
        raise MoorelmError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moorelm",
        description="Build, pretrain, fine-tune, serve and measure transformer language models.",
    )
    from moorelm import __version__

    parser.add_argument("--version", action="version", version=f"moorelm {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=Parser)
    for module in VERBS:
        importlib.import_module(f"moorelm.cli.{module}").add_parser(sub)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"moorelm: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _one_line_warnings
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        result = args.func(args)
        return int(result or 0)
    except MoorelmError as e:
        print(f"moorelm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moorelm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
