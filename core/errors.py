"""The one kind of error a user is meant to see as a sentence rather than a traceback.

Every check of an option, a file or a dataset raises `UserError` (or one of its two forms below)
with one sentence that says what is wrong and what to do. The entry points print exactly these as
one line (core/cli.py); any other exception is a bug, in our code or a library's, and keeps its
traceback.

`UserError` is a ValueError, and its two forms are also the built-in errors their situations
raise, so code that catches FileNotFoundError for a missing file still catches ours. A config's
own checks raise `FieldError`, which names the fields it is about by structure, so that one check
reads in field names to code and in option names on a command line. `warn_once` gives a warning
that a check run at start-up and again later must not repeat.
"""

from __future__ import annotations

import string
import warnings
from typing import Any, Mapping


class UserError(ValueError):
    """What the user asked for or gave cannot be done; the message says what to do instead."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class ExistsError(UserError, FileExistsError):
    """Writing would overwrite something that must be kept (a run, a dataset, a file)."""


class FieldError(UserError):
    """A config's check that names the fields it is about as {placeholders} of its message, its other
    placeholders filled from `values`:

        FieldError("{num_res_blocks} must be at least 1, got {value}.", value=0)

    reads "num_res_blocks must be at least 1, got 0." to code that built the config from fields (the
    Python API, a checkpoint), and a command that sets those fields by options spells them as its
    options (`naming`; `core.config.in_option_words`): "--num-res-blocks must be at least 1, got 0."
    Only the placeholders are names, so no word of the sentence or of a value is ever taken for one. A check
    across the sections of a stage's config names its fields by their dotted keys, "{train.batch_size}", as
    `core.config.flat_fields` spells them."""

    def __init__(self, template: str, **values: Any):
        super().__init__(template)  # (args hold the template alone: a copy or pickle rebuilds it, then its values)
        self.template, self.values = template, values

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields the message names, in order: its placeholders that are not values."""
        names = (name for _, name, _, _ in string.Formatter().parse(self.template) if name)
        return tuple(dict.fromkeys(name for name in names if name not in self.values))

    def naming(self, names: Mapping[str, str]) -> str:
        """The message with each field spelled as `names` spells it; a field `names` lacks keeps its own name."""
        return _WholeNames().vformat(self.template, (), {**{field: names.get(field, field) for field in self.fields},
                                                         **self.values})

    def __str__(self) -> str:
        return self.naming({})


class _WholeNames(string.Formatter):
    """`str.format` that looks a placeholder up whole, so that a check across a stage's config sections can name
    its fields by their dotted keys: "{train.batch_size}" is the key "train.batch_size", not attribute batch_size
    of train."""

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> Any:
        if field_name in kwargs:
            return kwargs[field_name], field_name
        return super().get_field(field_name, args, kwargs)


_WARNED: set[str] = set()


def warn_once(key: str, message: str | None = None, category: type[Warning] = UserWarning) -> None:
    """A warning shown once per process, however often the check that gives it runs (start-up, then build).

    `key` names what is warned about where `message` (default: the key) differs from one occasion to the next
    (the first file it concerns, say), so that the warning is still shown once. The warning carries its key
    (`once_key`), so that a process that shows the warnings of others (decoding workers) shows it once too."""
    if key not in _WARNED:
        _WARNED.add(key)
        warning = category(key if message is None else message)
        warning.once_key = key
        warnings.warn(warning, stacklevel=3)
