"""The pictures of the judging tools, drawn with Pillow: a confusion matrix, a bar chart with error
bars, scatter plots of requested against predicted values, and line charts of a measure against a
setting. Each returns a `PIL.Image` that
`data.imageio.atomic_save_image` writes; nothing here depends on a plotting library.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (0, 0, 0), (120, 120, 120), (225, 225, 225)
BLUE, ORANGE = (31, 92, 168), (222, 120, 30)
PALETTE = [(31, 92, 168), (222, 120, 30), (44, 150, 70), (196, 52, 52), (120, 84, 170), (140, 90, 70)]


def _font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _finite(values: Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"Nothing to plot: {what} is empty.")
    if not np.isfinite(array).all():
        raise ValueError(f"Cannot plot {what}: it holds NaN or infinite values.")
    return array


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (steps of 1, 2 or 5 times a power of ten)."""
    span = max(high - low, 1e-12)
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = min((m * power for m in (1, 2, 5, 10) if m * power >= raw), default=10 * power)
    first = math.ceil(low / step - 1e-9) * step
    return [first + k * step for k in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}"


def confusion_matrix_image(matrix, class_names: Sequence[str], title: str = "", cell: int = 0) -> Image.Image:
    """Rows: true class; columns: predicted class. Each cell is shaded by its share of its row (white
    to dark blue) and shows its count; the right margin gives each row's accuracy."""
    counts = np.asarray(matrix, dtype=np.int64)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"A confusion matrix over {k} classes must be {k}x{k}, got {counts.shape}.")
    cell = cell or max(28, min(64, 640 // max(k, 1)))
    font = _font(max(9, min(14, cell // 3)))
    names = [n if len(n) <= 14 else n[:13] + "…" for n in class_names]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_size(probe, n, font)[0] for n in names) + 10
    top, left = 48 + label_w, 24 + label_w
    width, height = left + k * cell + 70, top + k * cell + 30
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill=BLACK, font=_font(14))
    draw.text((left, 28), "predicted", fill=GREY, font=font)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    for i in range(k):
        y = top + i * cell
        draw.text((left - 6 - _text_size(draw, names[i], font)[0], y + cell // 2 - 6), names[i], fill=BLACK, font=font)
        for j in range(k):
            x = left + j * cell
            s = float(shares[i, j])
            shade = tuple(int(round(w + (b - w) * s)) for w, b in zip(WHITE, (8, 48, 107)))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=shade, outline=LIGHT)
            text = str(int(counts[i, j]))
            tw, th = _text_size(draw, text, font)
            draw.text((x + (cell - tw) / 2, y + (cell - th) / 2 - 1), text, fill=WHITE if s > 0.5 else BLACK, font=font)
        row = counts[i].sum()
        accuracy = f"{100 * counts[i, i] / row:.0f}%" if row else "-"
        draw.text((left + k * cell + 8, y + cell // 2 - 6), accuracy, fill=BLACK, font=font)
    column_names = Image.new("RGB", (label_w, k * cell), WHITE)  # drawn sideways, then rotated upright
    cdraw = ImageDraw.Draw(column_names)
    for j, name in enumerate(names):
        cdraw.text((4, j * cell + cell // 2 - 6), name, fill=BLACK, font=font)
    image.paste(column_names.rotate(90, expand=True), (left, top - label_w - 4))
    return image


def bar_chart(labels: Sequence[str], means: Sequence[float], stds: Sequence[float] | None = None, title: str = "",
              ylabel: str = "") -> Image.Image:
    """Vertical bars from 0 with +-std error bars, each bar's value written above it."""
    values = _finite(means, "the bar values")
    errors = np.zeros_like(values) if stds is None else _finite(stds, "the error bars")
    if len(labels) != len(values) or len(errors) != len(values):
        raise ValueError(f"{len(labels)} labels, {len(values)} values and {len(errors)} error bars do not match.")
    font = _font(13)
    bar, gap, left, top, bottom = 56, 28, 70, 50, 70
    height = 300
    width = left + len(values) * (bar + gap) + gap
    image = Image.new("RGB", (width, top + height + bottom), WHITE)
    draw = ImageDraw.Draw(image)
    high = max(float((values + errors).max()), 1e-12) * 1.12
    low = min(0.0, float((values - errors).min()) * 1.12)
    ticks = _ticks(low, high)
    high = max(high, ticks[-1])

    def y(v: float) -> float:
        return top + height * (high - v) / (high - low)

    draw.text((10, 10), title, fill=BLACK, font=_font(14))
    draw.text((10, 28), ylabel, fill=GREY, font=font)
    for t in ticks:
        draw.line([left - 4, y(t), width - gap // 2, y(t)], fill=LIGHT)
        draw.text((left - 8 - _text_size(draw, _label(t), font)[0], y(t) - 7), _label(t), fill=GREY, font=font)
    draw.line([left, top, left, y(low)], fill=BLACK)
    draw.line([left, y(0), width - gap // 2, y(0)], fill=BLACK)
    for k, (name, v, e) in enumerate(zip(labels, values, errors)):
        x = left + gap + k * (bar + gap)
        draw.rectangle([x, min(y(v), y(0)), x + bar - 1, max(y(v), y(0))], fill=PALETTE[k % len(PALETTE)])
        if e > 0:
            centre = x + bar / 2
            draw.line([centre, y(v + e), centre, y(v - e)], fill=BLACK, width=2)
            for end in (v + e, v - e):
                draw.line([centre - 8, y(end), centre + 8, y(end)], fill=BLACK, width=2)
        text = f"{v:.3g}"
        tw, _ = _text_size(draw, text, font)
        draw.text((x + (bar - tw) / 2, y(max(v + e, v)) - 18), text, fill=BLACK, font=font)
        short = name if len(name) <= 12 else name[:11] + "…"
        tw, _ = _text_size(draw, short, font)
        draw.text((x + (bar - tw) / 2, y(low) + 8), short, fill=BLACK, font=font)
    return image


def scatter_plot(x: Sequence[float], y: Sequence[float], title: str = "", xlabel: str = "requested",
                 ylabel: str = "predicted", size: int = 320) -> Image.Image:
    """Points (x, y) over the diagonal y = x, both axes over the same range covering every point."""
    xs, ys = _finite(x, "x"), _finite(y, "y")
    if xs.shape != ys.shape:
        raise ValueError(f"x and y must have the same length, got {len(xs)} and {len(ys)}.")
    font = _font(12)
    lo, hi = float(min(xs.min(), ys.min())), float(max(xs.max(), ys.max()))
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    lo, hi = lo - pad, hi + pad
    left, top, margin = 56, 46, 40
    image = Image.new("RGB", (left + size + 16, top + size + margin), WHITE)
    draw = ImageDraw.Draw(image)

    def px(vx: float, vy: float) -> tuple[float, float]:
        return left + size * (vx - lo) / (hi - lo), top + size * (hi - vy) / (hi - lo)

    draw.text((8, 8), title, fill=BLACK, font=_font(14))
    for t in _ticks(lo, hi):
        (tx, ty) = px(t, t)
        draw.line([tx, top, tx, top + size], fill=LIGHT)
        draw.line([left, ty, left + size, ty], fill=LIGHT)
        draw.text((tx - _text_size(draw, _label(t), font)[0] / 2, top + size + 4), _label(t), fill=GREY, font=font)
        draw.text((left - 6 - _text_size(draw, _label(t), font)[0], ty - 7), _label(t), fill=GREY, font=font)
    draw.rectangle([left, top, left + size, top + size], outline=BLACK)
    draw.line([*px(lo, lo), *px(hi, hi)], fill=GREY, width=1)
    for vx, vy in zip(xs, ys):
        cx, cy = px(float(vx), float(vy))
        draw.ellipse([cx - 2.5, cy - 2.5, cx + 2.5, cy + 2.5], fill=BLUE)
    draw.text((left + size / 2 - 30, top + size + 20), xlabel, fill=GREY, font=font)
    draw.text((8, top - 16), ylabel, fill=GREY, font=font)
    return image


def line_chart(x: Sequence[float], lines: dict[str, Sequence[float]], title: str = "", xlabel: str = "",
               ylabel: str = "", size: tuple[int, int] = (340, 220)) -> Image.Image:
    """One line per entry of `lines` (name -> y at each x; NaN leaves a gap), with a legend below. The x
    positions are evenly spaced and labelled with their values, since settings are rarely even."""
    xs = _finite(x, "x")
    ys = {name: np.asarray(values, dtype=np.float64).reshape(-1) for name, values in lines.items()}
    if any(len(v) != len(xs) for v in ys.values()):
        raise ValueError(f"every line needs one value per x ({len(xs)}).")
    seen = np.concatenate([v[np.isfinite(v)] for v in ys.values()] or [np.zeros(0)])
    if seen.size == 0:
        raise ValueError("Nothing to plot: every value is NaN.")
    font = _font(12)
    left, top, right, width, height = 60, 46, 20, *size
    legend = 18 * len(ys) + 34
    image = Image.new("RGB", (left + width + right, top + height + legend), WHITE)
    draw = ImageDraw.Draw(image)
    low, high = float(seen.min()), float(seen.max())
    pad = 0.08 * (high - low) if high > low else max(abs(high), 1.0) * 0.1
    ticks = _ticks(low - pad, high + pad)
    low, high = min(low - pad, ticks[0]), max(high + pad, ticks[-1])

    def px(k: int) -> float:
        return left + width * (k + 0.5) / len(xs)

    def py(v: float) -> float:
        return top + height * (high - v) / (high - low)

    draw.text((8, 8), title, fill=BLACK, font=_font(14))
    draw.text((8, 26), ylabel, fill=GREY, font=font)
    for t in ticks:
        draw.line([left, py(t), left + width, py(t)], fill=LIGHT)
        draw.text((left - 6 - _text_size(draw, _label(t), font)[0], py(t) - 7), _label(t), fill=GREY, font=font)
    draw.rectangle([left, top, left + width, top + height], outline=BLACK)
    for k, v in enumerate(xs):
        text = _label(float(v))
        draw.text((px(k) - _text_size(draw, text, font)[0] / 2, top + height + 4), text, fill=GREY, font=font)
    draw.text((left + width / 2 - _text_size(draw, xlabel, font)[0] / 2, top + height + 18), xlabel, fill=GREY,
              font=font)
    for n, (name, values) in enumerate(ys.items()):
        colour = PALETTE[n % len(PALETTE)]
        points = [(px(k), py(float(v))) if np.isfinite(v) else None for k, v in enumerate(values)]
        for a, b in zip(points, points[1:]):
            if a and b:
                draw.line([*a, *b], fill=colour, width=2)
        for point in filter(None, points):
            draw.ellipse([point[0] - 3, point[1] - 3, point[0] + 3, point[1] + 3], fill=colour)
        y = top + height + 36 + 18 * n
        draw.line([left, y + 7, left + 20, y + 7], fill=colour, width=3)
        draw.text((left + 26, y), name, fill=BLACK, font=font)
    return image


def side_by_side(images: Sequence[Image.Image]) -> Image.Image:
    """Panels next to each other on white, top-aligned."""
    width = sum(im.width for im in images)
    out = Image.new("RGB", (width, max(im.height for im in images)), WHITE)
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width
    return out
