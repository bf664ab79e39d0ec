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


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The parsed content of the JSON file ``path``; anything but a readable regular file of
    at most ``max_bytes`` bytes holding valid UTF-8 JSON raises ``MoorelmError``."""
    path = Path(path)
    try:
        st = os.stat(path)  # follows links: a link to /dev/zero is judged by its target
    except FileNotFoundError:
        raise MoorelmError(f"{path} does not exist") from None
    except OSError as e:
        raise from_os_error(e, f"read {path}") from None
    if not stat.S_ISREG(st.st_mode):
        raise MoorelmError(f"{path} is {_kind(st.st_mode)}, not a JSON file")
    if st.st_size > max_bytes:
        raise MoorelmError(f"{path} is {st.st_size:,} bytes; a JSON file here is at most "
                           f"{max_bytes:,}")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise from_os_error(e, f"read {path}") from None
    if len(data) > max_bytes:
        raise MoorelmError(f"{path} is larger than {max_bytes:,} bytes")
    return loads_json(data, str(path))


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


def check_text(text: str, where: str) -> str:
    """``text`` unchanged when it is encodable as UTF-8 (no lone surrogates), else an error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise MoorelmError(f"{where} holds a lone surrogate (\\u{ord(text[e.start]):04x}), "
                           "which is not text; fix the escape") from None
    return text
