"""The command line: ``moorelm VERB ...`` (also ``python -m moorelm``).

A thin layer: each verb's module adds its flags and calls the Python API. Verbs are listed
in ``VERBS`` (name -> module under moorelm.cli); each module defines ``add_parser(sub)``
which registers its verb(s) with a ``func(args)`` to run. User errors (``MoorelmError``,
bad flags, a config file that does not fit, an optional extra that is not installed) print
one line and exit with status 2; warnings print one line each. Every verb takes ``--config
FILE`` and ``--print-config`` (``moorelm.cli.config_files``).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import warnings

from moorelm.cli import config_files
from moorelm.errors import MoorelmError, environment_error

# module (under moorelm.cli) -> the verbs it registers, in the order --help lists them
VERBS: dict[str, tuple[str, ...]] = {
    "core": ("corpus", "prepare", "train", "generate", "evaluate"),
    "eval": ("eval",),
    "finetune": ("finetune", "finetune-eval", "finetune-demo-data"),
    "classify": ("finetune-classifier", "classify", "genre-data"),
    "interop": ("export", "import"),
    "serve": ("serve",),
    "inspect": ("inspect",),
    "chat": ("chat",),
    "scale": ("scale", "trend"),
}


# top-level module an optional feature imports -> the extra of pyproject.toml that installs it
EXTRAS: dict[str, str] = {
    "fastapi": "serve", "uvicorn": "serve", "httptools": "serve", "uvloop": "serve",
    "starlette": "serve", "transformers": "hf", "accelerate": "hf",
    "tensorboard": "track", "wandb": "track", "trackio": "track", "yaml": "yaml",
    "lm_eval": "eval", "prometheus_client": "serve", "xgrammar": "serve", "peft": "hf",
    "gguf": "hf", "jinja2": "hf",
}


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) with exit status 2.

    Flags must be spelled out: with argparse's prefix matching, a mistyped ``--text FILE``
    on ``evaluate`` silently set ``--text-field`` and scored the bundled corpus instead."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401
        raise MoorelmError(f"{message} (see '{self.prog} --help')")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but a flag the verb lacks is named with the verb's help and the
        closest flag it has (argparse's own message points at the top-level help)."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            verb = getattr(ns, "verb", None)
            sp = config_files.subparser(self, verb) if verb else None
            where = sp.prog if sp is not None else self.prog
            unknown = [a.split("=", 1)[0] for a in extras if a.startswith("--")]
            flags = sorted((sp or self)._option_string_actions)
            close = ([f for f in flags if f.startswith(unknown[0])]  # what prefix matching took
                     or difflib.get_close_matches(unknown[0], flags, n=1)) if unknown else []
            hint = f"; did you mean {close[0]}?" if close else ""
            raise MoorelmError(f"unrecognized arguments: {' '.join(extras)}{hint} "
                               f"(see '{where} --help')")
        return ns


def missing_extra(e: ImportError, verb: str | None) -> MoorelmError | None:
    """One line naming the extra that installs the module ``e`` could not import, or None
    when that module is not an optional dependency (a real bug, left to surface)."""
    name = (getattr(e, "name", None) or "").split(".")[0]
    extra = EXTRAS.get(name)
    if extra is None:
        return None
    what = f"'moorelm {verb}'" if verb else "this"
    if extra == "yaml":
        return MoorelmError(f"{what} needs PyYAML, which is not installed: pip install pyyaml")
    return MoorelmError(f"{what} needs {name}, which is not installed: "
                        f"pip install 'moorelm[{extra}]'")


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
    config_files.install(sub)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"moorelm: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    warnings.showwarning = _one_line_warnings
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = argv[0] if argv and not argv[0].startswith("-") else None
    try:
        parser = build_parser()
        argv, config_path = config_files.apply(parser, argv)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        if getattr(args, "print_config", None):
            settings = config_files.resolved(args, config_files.subparser(parser, args.verb))
            fmt = config_files.print_format(args.print_config, config_path)
            sys.stdout.write(config_files.dump(settings, fmt))
            return 0
        result = args.func(args)
        return int(result or 0)
    except MoorelmError as e:
        print(f"moorelm: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        err = missing_extra(e, verb)
        if err is None:
            raise
        print(f"moorelm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moorelm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a full or read-only disk, a folder not the user's, met by a
        error = environment_error(e)  # write no check above words (a plot, a log, a mkdir)
        if error is None:
            raise
        print(f"moorelm: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
