"""User-facing errors.

Anything the user can get wrong (a path, a flag, a request, a checkpoint) is checked where it
enters moorelm and reported as a ``MoorelmError``: one line saying what was wrong and what to
do. The CLI prints it and exits with status 2; the server turns it into a 4xx JSON error.
Internal invariants use ``assert``.
"""


class MoorelmError(Exception):
    """A problem with the user's input, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
