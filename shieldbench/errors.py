"""The one exception type users see.

Anything a user can get wrong (an unknown name, a value out of range, a
missing or corrupt file) raises :class:`UserError` with a one-line message
that says what, where and what is allowed. The CLI prints that line and exits
with code 2; programming errors stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input, reported as one line (exit code 2)."""

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line message would break the CLI contract.
        super().__init__(" ".join(str(message).split()))
