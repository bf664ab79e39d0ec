"""Config files for every verb: ``--config FILE`` and ``--print-config [json|yaml]``.

A config file (YAML or JSON) holds the same keys as a verb's flags, spelled with dashes or
underscores (``max-steps: 200`` or ``"max_steps": 200``); flags given on the command line win.
A run folder's config.json (``{"model": {...}, "train": {...}, ...}``) is accepted as well: its
model and train sections map onto the flags of the same names. ``--print-config`` prints the
fully resolved settings of the command line (JSON, or YAML when the file given was YAML or
``--print-config yaml``) in a form ``--config`` reads back, and exits.

This is done once for every verb, on the parser: ``install`` adds the two flags to each
subcommand, ``apply`` turns a file into flags placed before the command line's own (argparse
keeps the last value given, so the command line wins).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
from pathlib import Path
from typing import Any

from moorelm.errors import MoorelmError
from moorelm.jsonfile import read_mapping

CONFIG_FLAGS = ("config", "print_config")
# a verb may set ``resolve=f(args) -> dict`` with its parser's defaults: the settings that
# actually apply (a recipe's values in place of unset flags), checked as a run would check them
RESOLVE = "resolve"
# run folder config.json sections whose keys are a verb's flags; other top-level keys (data,
# params, world_size, a prompt template) describe the run, not how to start it
RUN_SECTIONS = ("model", "train")
RUN_KEYS = ("recipe", "preset")
RUN_SKIP = {"vocab_size", "device"}  # the data's vocabulary; where this machine trains


def install(sub: argparse._SubParsersAction) -> None:
    """Add ``--config`` and ``--print-config`` to every verb registered on ``sub``."""
    for parser in sub.choices.values():
        g = parser.add_argument_group("config files")
        g.add_argument("--config", metavar="FILE", default=None,
                       help="read flags from a YAML or JSON file (same keys as the flags; "
                       "a run folder's config.json works too); flags on the command line win")
        g.add_argument("--print-config", nargs="?", const="auto", default=None,
                       choices=("auto", "json", "yaml"), metavar="json|yaml",
                       help="print the resolved settings (JSON, or YAML when --config was "
                       "YAML) and exit; feed the output back with --config")


def _config_path(argv: list[str]) -> str | None:
    path = None
    for i, a in enumerate(argv):
        if a == "--":
            break
        if a == "--config":
            if i + 1 >= len(argv):
                raise MoorelmError("--config needs a FILE")
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    return path


def _is_yaml(path: str | Path) -> bool:
    return Path(path).suffix.lower() in (".yaml", ".yml")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a config file holds (YAML by suffix .yaml/.yml, else JSON), or one line."""
    return read_mapping(path, "config file")


def _flatten_run_config(data: dict[str, Any], known: dict[str, argparse.Action]) -> dict[str, Any]:
    """A run folder's config.json as flags: its model and train fields, recipe and preset.
    Fields this verb has no flag for are left out (they describe the run)."""
    flat: dict[str, Any] = {}
    for section in RUN_SECTIONS:
        for k, v in (data.get(section) or {}).items():
            if k not in RUN_SKIP and k in known and v is not None:
                flat[k] = v
    for k in RUN_KEYS:
        if data.get(k) is not None and k in known:
            flat[k] = data[k]
    return flat


def _is_run_config(data: dict[str, Any]) -> bool:
    return isinstance(data.get("model"), dict) and isinstance(data.get("train"), dict)


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """key (a long option without dashes, underscored; or a positional's name) -> action."""
    out: dict[str, argparse.Action] = {}
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            continue
        if not a.option_strings:
            out[a.dest.replace("-", "_")] = a
            continue
        for s in a.option_strings:
            if s.startswith("--") and not s.startswith("--no-"):
                out[s[2:].replace("-", "_")] = a
    for k in CONFIG_FLAGS:
        out.pop(k, None)
    return out


def _is_bool(a: argparse.Action) -> bool:
    return isinstance(a, (argparse.BooleanOptionalAction, argparse._StoreTrueAction,
                          argparse._StoreFalseAction))


def _expected(a: argparse.Action) -> str:
    if _is_bool(a):
        return "true or false"
    if a.choices is not None and a.type in (None, str):
        return "one of " + ", ".join(map(str, a.choices))
    return {int: "an integer", float: "a number"}.get(a.type, "a string")


def _check_value(key: str, value: Any, a: argparse.Action, path: str) -> None:
    if isinstance(a, argparse._AppendAction) and isinstance(value, list):
        for v in value:  # a repeatable flag: a list of values, each checked
            _check_value(key, v, a, path)
        return
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    if _is_bool(a):
        ok = isinstance(value, bool)
    elif isinstance(value, bool) or isinstance(value, (list, dict)):
        ok = False
    elif a.type is int:
        ok = isinstance(value, int)
    elif a.type is float:
        ok = isinstance(value, (int, float)) and math.isfinite(float(value))
    else:
        ok = isinstance(value, (str, int, float))  # a number is fine where text is expected
    if ok and a.choices is not None and not _is_bool(a):
        ok = value in a.choices
    if not ok:
        raise MoorelmError(f"config file {path}: {key!r} must be {_expected(a)}, got {shown} "
                           f"({type(value).__name__})")


def _tokens(value: Any, a: argparse.Action) -> list[str]:
    flag = next((s for s in a.option_strings if s.startswith("--")), None)
    if isinstance(a, argparse.BooleanOptionalAction):
        return [flag] if value else ["--no-" + flag[2:]]
    if isinstance(a, argparse._StoreTrueAction):
        return [flag] if value else []
    if isinstance(a, argparse._StoreFalseAction):
        return [] if value else [flag]
    if isinstance(a, argparse._AppendAction) and isinstance(value, list):
        return [t for v in value for t in _tokens(v, a)]
    # --flag=VALUE: a value that starts with a dash stays a value
    return [f"{flag}={value if isinstance(value, str) else repr(value)}"]


def subparser(parser: argparse.ArgumentParser, verb: str) -> argparse.ArgumentParser | None:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices.get(verb)
    return None


def apply(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` with the flags of its ``--config`` file placed before the command line's own
    (and file positionals given as defaults); returns the new argv and the file's path."""
    if not argv or argv[0].startswith("-"):
        return argv, None
    sp = subparser(parser, argv[0])
    path = _config_path(argv) if sp is not None else None
    if path is None:
        return argv, None
    data = read_config_file(path)
    known = _actions(sp)
    if _is_run_config(data):
        data = _flatten_run_config(data, known)
    unknown = [str(k) for k in data if str(k).replace("-", "_") not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k.replace("-", "_"), known, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise MoorelmError(f"config file {path} has unknown key(s) for 'moorelm {argv[0]}': "
                           + ", ".join(hints))
    given = {t.split("=", 1)[0] for t in argv[1:] if t.startswith("--")}
    flags: list[str] = []
    for raw, value in data.items():
        key = str(raw).replace("-", "_")
        a = known[key]
        if value is None:
            continue  # null: the flag's default
        if isinstance(a, argparse._AppendAction) and given & set(a.option_strings):
            continue  # a repeatable flag on the command line replaces the file's list
        _check_value(str(raw), value, a, path)
        if not a.option_strings:  # a positional: the file's value unless the command line gives one
            a.required, a.nargs, a.default = False, "?", value
            continue
        flags += _tokens(value, a)
    return [argv[0], *flags, *argv[1:]], path


def resolved(args: argparse.Namespace, sp: argparse.ArgumentParser) -> dict[str, Any]:
    """The settings of a parsed command line, keyed by flag name (underscored), with what a
    verb's ``resolve`` hook says actually applies in place of unset values."""
    out: dict[str, Any] = {}
    seen: set[int] = set()
    for key, a in _actions(sp).items():
        if id(a) in seen:  # one key per flag (its first long spelling)
            continue
        seen.add(id(a))
        out[key] = getattr(args, a.dest, None)
    hook = getattr(args, RESOLVE, None)
    if hook is not None:
        out.update(hook(args))
    return out


def dump(settings: dict[str, Any], fmt: str) -> str:
    if fmt == "yaml":
        try:
            import yaml
        except ImportError:
            raise MoorelmError("--print-config yaml needs PyYAML (pip install pyyaml); "
                               "--print-config json works without it") from None
        return yaml.safe_dump(settings, sort_keys=False, allow_unicode=True)
    return json.dumps(settings, indent=2, ensure_ascii=False) + "\n"


def print_format(choice: str, path: str | None) -> str:
    if choice != "auto":
        return choice
    return "yaml" if path is not None and _is_yaml(path) else "json"
