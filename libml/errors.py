"""User-facing errors: one line that names the problem and the fix, then a non-zero exit."""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user (flag, dataset name, file). The message is shown as-is."""


def first_line(e: Exception) -> str:
    """The first line of an exception's message (at most 200 characters), for one-line errors."""
    text = (getattr(e, "message", None) or str(e)).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
