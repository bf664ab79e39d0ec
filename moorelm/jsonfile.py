"""Reading JSON that moorelm did not just write, in one guarded place.

A config, manifest or index file may be anything a user (or a download) left there: a folder,
a FIFO or a link to ``/dev/zero``, a huge file, invalid UTF-8, nesting deep enough to exhaust
the parser's recursion, or an integer too long for Python to convert. ``read_json`` refuses or
reports each of these as a one-line ``MoorelmError`` naming the file; ``loads_json`` does the
same for one JSON text (a JSONL row), and ``check_text`` refuses strings holding lone UTF-16
surrogates (valid JSON escapes, but not text that can be encoded or tokenized).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from moorelm.errors import MoorelmError, from_os_error

MAX_JSON_BYTES = 64 << 20  # larger than any config, manifest or weight index moorelm reads


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _read_bytes(path: Path, max_bytes: int, what: str = "a JSON file") -> bytes:
    """The bytes of the regular file ``path`` (at most ``max_bytes``), or one line."""
    try:
        st = os.stat(path)  # follows links: a link to /dev/zero is judged by its target
    except FileNotFoundError:
        raise MoorelmError(f"{path} does not exist") from None
    except OSError as e:
        raise from_os_error(e, f"read {path}") from None
    if not stat.S_ISREG(st.st_mode):
        raise MoorelmError(f"{path} is {_kind(st.st_mode)}, not {what}")
    if st.st_size > max_bytes:
        raise MoorelmError(f"{path} is {st.st_size:,} bytes; {what} here is at most "
                           f"{max_bytes:,}")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise from_os_error(e, f"read {path}") from None
    if len(data) > max_bytes:
        raise MoorelmError(f"{path} is larger than {max_bytes:,} bytes")
    return data


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The parsed content of the JSON file ``path``; anything but a readable regular file of
    at most ``max_bytes`` bytes holding valid UTF-8 JSON raises ``MoorelmError``."""
    path = Path(path)
    return loads_json(_read_bytes(path, max_bytes), str(path))


def read_mapping(path: str | os.PathLike, what: str = "config file") -> dict[str, Any]:
    """The mapping a settings file holds: YAML when its name ends in .yaml/.yml (PyYAML's
    safe loader), JSON otherwise, with ``read_json``'s guards; an empty file is {}. Every
    failure is one line naming ``what`` and the file (and where it stops parsing)."""
    path = Path(path)
    data = _read_bytes(path, MAX_JSON_BYTES, f"a {what}")
    where = f"{what} {path}"
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise MoorelmError(f"reading the YAML {what} {path} needs PyYAML (pip install "
                               "pyyaml); or write it as JSON") from None
        try:
            parsed = yaml.safe_load(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise MoorelmError(f"{where} is not valid UTF-8 (byte {e.start})") from None
        except RecursionError:
            raise MoorelmError(f"{where} nests too deeply to read") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or "not valid YAML"
            raise MoorelmError(f"{where} does not parse: not valid YAML{at}: {problem}") from None
    else:
        try:
            parsed = loads_json(data, where)
        except MoorelmError as e:
            why = str(e)[len(where):].strip()
            why = why[3:] if why.startswith("is ") else why
            raise MoorelmError(f"{where} does not parse: {why} (write JSON, or YAML in a "
                               ".yaml file)") from None
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        raise MoorelmError(f"{where} must hold a mapping of names to values, got "
                           f"{type(parsed).__name__}")
    return parsed


def loads_json(data: bytes | str, where: str) -> Any:
    """``json.loads`` whose every failure is a one-line ``MoorelmError`` about ``where``."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MoorelmError(f"{where} is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise MoorelmError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column "
                           f"{e.colno})") from None
    except RecursionError:
        raise MoorelmError(f"{where} nests JSON too deeply to read") from None
    except ValueError as e:  # e.g. an integer of more than sys.get_int_max_str_digits() digits
        reason = "a number too long to read" if "digits" in str(e) else str(e).split(":")[0]
        raise MoorelmError(f"{where} holds {reason}") from None


def lone_surrogate_at(text: str) -> int | None:
    """Where the first lone UTF-16 surrogate of ``text`` is (a JSON ``\\udXXX`` escape that
    pairs with nothing, or what Python makes of a byte that is not UTF-8 in an argument or on
    stdin), or None when ``text`` can be written as UTF-8. The one test behind ``check_text``,
    ``tokenizer.check_unicode`` and the server's ``schema.checked_text``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def check_text(text: str, where: str) -> str:
    """``text`` unchanged when it is encodable as UTF-8 (no lone surrogates), else an error."""
    at = lone_surrogate_at(text)
    if at is not None:
        raise MoorelmError(f"{where} holds a lone surrogate (\\u{ord(text[at]):04x}), "
                           "which is not text; fix the escape")
    return text
