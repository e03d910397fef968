"""Progress bars that keep warnings on lines of their own.

A tqdm bar is redrawn in place, on a line that does not end until the bar closes, so a warning printed
meanwhile (Python's own `warnings.showwarning`, as the Python API and --debug show them) continues the bar's
line. `warnings_above` writes each one through `tqdm.write` instead, which clears the bar, writes the line and
draws the bar again below it; `progress` is a bar that does so for its whole life. (`core.cli.print_warning`,
the commands' one-line warnings, writes through tqdm itself.)
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


@contextlib.contextmanager
def warnings_above(bar: tqdm) -> Iterator[None]:
    """While the body runs, each warning shown goes above `bar` on a line of its own, in the form the
    `warnings.showwarning` in place gives it (to stderr, or where the warning names); warnings recorded rather
    than shown (`warnings.catch_warnings(record=True)`, pytest's) stay recorded. `warnings.showwarning` is
    restored however the body ends."""
    if bar.disable:  # no bar on screen
        yield
        return
    shown = warnings.showwarning

    def above(message, category, filename, lineno, file=None, line=None) -> None:
        if file is not None:  # a stream of the caller's choosing: as it would be
            shown(message, category, filename, lineno, file, line)
            return
        text = io.StringIO()
        shown(message, category, filename, lineno, text, line)  # (nothing written where the warning is recorded)
        if text.getvalue():
            bar.write(text.getvalue().rstrip("\n"), file=sys.stderr)

    warnings.showwarning = above
    try:
        yield
    finally:
        warnings.showwarning = shown


def progress(items: Iterable[T], **options) -> Iterator[T]:
    """`items` with a tqdm bar (`options` are tqdm's), warnings raised while it is on screen above it
    (`warnings_above`); the bar closes when the iteration ends or is left."""
    with tqdm(items, **options) as bar, warnings_above(bar):
        yield from bar
