"""The one kind of error a user is meant to see as a sentence rather than a traceback.

Every check of an option, a file or a dataset raises `UserError` (or one of its two forms below)
with one sentence that says what is wrong and what to do. The entry points print exactly these as
one line (core/cli.py); any other exception is a bug, in our code or a library's, and keeps its
traceback.

`UserError` is a ValueError, and its two forms are also the built-in errors their situations
raise, so code that catches FileNotFoundError for a missing file still catches ours. `warn_once`
gives a warning that a check run at start-up and again later must not repeat.
"""

from __future__ import annotations

import warnings


class UserError(ValueError):
    """What the user asked for or gave cannot be done; the message says what to do instead."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class ExistsError(UserError, FileExistsError):
    """Writing would overwrite something that must be kept (a run, a dataset, a file)."""


_WARNED: set[str] = set()


def warn_once(key: str, message: str | None = None, category: type[Warning] = UserWarning) -> None:
    """A warning shown once per process, however often the check that gives it runs (start-up, then build).

    `key` names what is warned about where `message` (default: the key) differs from one occasion to the next
    (the first file it concerns, say), so that the warning is still shown once."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(key if message is None else message, category, stacklevel=3)
