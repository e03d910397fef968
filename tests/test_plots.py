"""The charts are measurements too: bar heights proportional to their values, confusion cells shaded
by their share of the row, bad input refused."""

from __future__ import annotations

import numpy as np
import pytest

from classify.plots import PALETTE, bar_chart, confusion_matrix_image, scatter_plot

DARK = (8, 48, 107)   # the shade of a cell holding its whole row


def pixels_of(image, colour) -> np.ndarray:
    return np.all(np.asarray(image) == np.array(colour, dtype=np.uint8), axis=-1)


def test_bar_heights_are_proportional_to_the_values():
    image = bar_chart(["a", "b", "c"], [10.0, 20.0, 35.0])
    # Rows of each bar's colour, less the one row a filled rectangle adds by including both edges.
    heights = [pixels_of(image, PALETTE[k]).any(axis=1).sum() - 1 for k in range(3)]
    assert heights[1] / heights[0] == pytest.approx(2, abs=0.03) and heights[2] / heights[0] == pytest.approx(3.5, abs=0.05)


def test_a_perfect_confusion_matrix_is_dark_on_the_diagonal_only():
    image = confusion_matrix_image(np.diag([4, 7, 2]), ["x", "y", "z"])
    dark = pixels_of(image, DARK)
    rows, cols = np.nonzero(dark)
    # The dark pixels form three squares along the diagonal: sorted by column, they go down.
    columns = np.unique(cols)
    runs = np.split(columns, np.nonzero(np.diff(columns) > 1)[0] + 1)
    assert len(runs) == 3
    tops = [rows[np.isin(cols, run)].min() for run in runs]
    assert tops[0] < tops[1] < tops[2]
    # A row split half and half has no fully dark cell: only the all-correct second row does.
    half = pixels_of(confusion_matrix_image(np.array([[1, 1], [0, 2]]), ["x", "y"]), DARK)
    assert len(np.split(np.unique(np.nonzero(half)[1]), np.nonzero(np.diff(np.unique(np.nonzero(half)[1])) > 1)[0] + 1)) == 1


@pytest.mark.parametrize("call, message", [
    (lambda: bar_chart(["a"], [float("nan")]), "NaN"),
    (lambda: bar_chart(["a", "b"], [1.0]), "do not match"),
    (lambda: scatter_plot([], []), "empty"),
    (lambda: confusion_matrix_image(np.zeros((2, 3)), ["a", "b"]), "must be 2x2"),
])
def test_bad_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
