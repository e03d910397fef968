"""One row of the benchmark table, and the one printer for all of them."""

from __future__ import annotations

from dataclasses import dataclass

COLUMNS = ("row", "size", "ours fp32 img/s", "ours fastest img/s", "fastest settings", "peer", "peer img/s",
           "fastest / peer", "fp32 / peer", "best fp32 / peer", "peak MiB: fp32 / fastest / peer", "notes")


@dataclass
class Row:
    """Our throughput (plain fp32, and with the fastest settings measured) beside the peer's default.

    A number that could not be measured is None (the peer is not installed, our kernel needs CUDA);
    `peer` and `settings` then say why.
    """
    name: str                           # what is measured, e.g. "U-Net train step"
    size: str                           # the configuration, e.g. "ddpm-cifar10 35.7M, batch 4"
    ours_fp32: float | None             # images/s, eager fp32
    ours_fastest: float | None          # images/s with `settings`
    settings: str                       # label of the fastest candidate settings
    peer: str                           # the peer's name, "no peer", or why it is missing
    peer_default: float | None = None   # images/s of the peer as shipped (fp32 eager: its default, so also its fp32)
    memory: tuple[int | None, int | None, int | None] = (None, None, None)  # peak bytes: ours fp32, fastest, peer
    notes: str = ""
    # The fastest fp32 candidate (eager, channels_last, compiled), for the equal-precision comparison
    best_fp32: float | None = None
    best_fp32_settings: str = ""


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _ratio(ours: float | None, peer: float | None) -> str:
    return "-" if ours is None or not peer else f"{ours / peer:.2f}x"


def _best_fp32(r: Row) -> str:
    ratio = _ratio(r.best_fp32, r.peer_default)
    return ratio if ratio == "-" else f"{ratio} ({r.best_fp32_settings})"


def _mebibytes(memory: tuple[int | None, ...]) -> str:
    if all(m is None for m in memory):
        return "-"
    return " / ".join("-" if m is None else f"{m / 2**20:.0f}" for m in memory)


def format_table(rows: list[Row]) -> str:
    """The rows as one markdown table; ratios above 1 mean ours is faster."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = (r.name, r.size, _rate(r.ours_fp32), _rate(r.ours_fastest), r.settings, r.peer, _rate(r.peer_default),
                 _ratio(r.ours_fastest, r.peer_default), _ratio(r.ours_fp32, r.peer_default), _best_fp32(r),
                 _mebibytes(r.memory), r.notes)
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)
