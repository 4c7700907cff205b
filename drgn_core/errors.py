"""User-facing errors.

A `DrgnError` carries a complete one-line message that names the file and the problem. The CLI prints
it as ``drgn <command>: error: <message>`` and exits 2, without a traceback: users should never have to
read a stack trace from inside numpy to learn that row 17 of their STAR file points at a missing stack.
Raise it at the layer that knows the file name, so no message loses it.
"""

from __future__ import annotations


class DrgnError(Exception):
    """An error in the user's input or request, with a message fit to print as is."""

    def __init__(self, message: str, path: str | None = None):
        self.path = str(path) if path is not None else None
        text = f"{self.path}: {message}" if self.path else message
        # One line, always: a damaged file can put line breaks into the names we quote.
        super().__init__(text.replace("\r", "\\r").replace("\n", "\\n"))


class InputError(DrgnError):
    """A problem with an input file (missing, malformed, inconsistent)."""


def collect(problems: list[str], path: str | None = None, what: str = "problems") -> None:
    """Raise one InputError listing every problem found, so the user fixes them in one pass."""
    if problems:
        shown = problems[:20]
        more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise InputError(f"{len(problems)} {what}: " + "; ".join(shown) + more, path)
