"""Errors meant for people.

A `StropError` is something the user can fix (a config key, a file, a flag); the CLI prints its
message on one line per problem and exits with status 2. Anything else that escapes is a bug in
strop and keeps its traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2


class StropError(Exception):
    """A problem with the user's input, with a message that says what and how to fix it."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        # One problem, one line: values quoted from the user's file may hold line breaks.
        self.problems = [" ".join(p.splitlines()) for p in (problems or [message])]

    def __str__(self) -> str:  # one line per problem
        return "\n".join(self.problems)


class ConfigError(StropError):
    """One or more problems found in a config (file, overrides or cross-field rules)."""

    def __init__(self, problems: list[str]):
        head = problems[0] if len(problems) == 1 else f"{len(problems)} problems in the config"
        super().__init__(head, problems)


class ReportedByRank0(StropError):
    """Rank 0 of a multi-process run met a StropError it reports itself: the other ranks end
    quietly instead of repeating it, or printing the broken connection it leaves them."""

    def __init__(self) -> None:
        super().__init__("rank 0 reports the error")


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of a library's error message (at most `limit` characters), or the
    exception's type when it has no message: what goes in parentheses in a StropError."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else type(err).__name__
