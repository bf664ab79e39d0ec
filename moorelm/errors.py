"""User-facing errors.

Anything the user can get wrong (a path, a flag, a request, a checkpoint) is checked where it
enters moorelm and reported as a ``MoorelmError``: one line saying what was wrong and what to
do. The CLI prints it and exits with status 2; the server turns it into a 4xx JSON error.
Internal invariants use ``assert``.
"""

from __future__ import annotations

import errno
import os


class MoorelmError(Exception):
    """A problem with the user's input, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def first_line(e: BaseException | str, limit: int = 200) -> str:
    """The first non-blank line of an exception's message (at most ``limit`` characters), or
    the exception's type name when the message is empty: what an error line quotes from a
    library's exception. A ``KeyError()`` has no message, so ``str(e).splitlines()[0]``
    would fail instead."""
    text = e if isinstance(e, str) else str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines:
        return lines[0][:limit]
    return "" if isinstance(e, str) else type(e).__name__


def from_os_error(e: OSError, action: str,
                  again: str = "run the same command again") -> MoorelmError:
    """One line for an ``OSError`` met while ``action`` ("write data/train-00000.bin"): a full
    disk says so and what to do (free some space, then ``again``); anything else gives the
    system's reason."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return MoorelmError(f"cannot {action}: no space left on the device; free some space "
                            f"and {again}")
    reason = e.strerror or str(e) or type(e).__name__
    name = _shown_path(e.filename)
    where = f" ({name})" if name else ""
    return MoorelmError(f"cannot {action}: {reason}{where}")


def _shown_path(filename: str | bytes | None) -> str | None:
    """An ``OSError``'s file name as an error line gives it: a temporary file or folder
    (``.out.x1y2.tmp``, what an atomic write makes beside its target) as the folder it was
    made in, which is what the user chose."""
    if filename is None:
        return None
    name = os.fsdecode(filename)
    base = os.path.basename(name)
    if base.startswith(".") and base.endswith(".tmp"):
        return os.path.dirname(name) or "."
    return name


# what the system says of the user's disk and permissions, never of moorelm's code
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                errno.EPERM})


def environment_error(e: BaseException) -> MoorelmError | None:
    """One line for an error no check before it worded that comes from the user's disk or
    permissions (full, read-only, not allowed: ``ENVIRONMENT_ERRNOS``, or a library's error
    quoting a full disk), else None."""
    if disk_full(e):
        return MoorelmError("no space left on the device; free some space and run the same "
                            "command again")
    if not isinstance(e, OSError) or e.errno not in ENVIRONMENT_ERRNOS:
        return None
    name = _shown_path(e.filename)
    reason = e.strerror or type(e).__name__
    return MoorelmError(f"{reason}: {name}" if name else reason)


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` says the disk (or the user's quota) is full: an ``OSError`` with ENOSPC
    or EDQUOT, or a library error that only quotes it (safetensors' ``SafetensorError`` reads
    "I/O error: No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return any(mark in text for mark in ("No space left", "os error 28", "code: 28",
                                         "StorageFull", "Disk quota exceeded"))


def from_write_error(e: BaseException, action: str,
                     again: str | None = None) -> MoorelmError | None:
    """One line for a failed write while ``action`` ("export to out/"): an ``OSError`` as
    ``from_os_error`` words it, or safetensors' own ``SafetensorError`` (a full disk said as
    such, anything else its first line); None for other exceptions, which are not write
    failures. ``again``: what to do once there is room (``from_os_error``'s)."""
    again = again or "run the same command again"
    if isinstance(e, OSError):
        return from_os_error(e, action, again)
    if type(e).__name__ != "SafetensorError":
        return None
    if disk_full(e):
        return from_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), action, again)
    return MoorelmError(f"cannot {action}: {first_line(e)}")
