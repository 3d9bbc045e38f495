"""Text a user reads: counted nouns, durations and plain-text tables whose columns fit their longest cell."""
from __future__ import annotations

from collections.abc import Sequence


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``"1 epoch"``, ``"2 epochs"``, ``"0 epochs"`` (``many``: an irregular plural, e.g. ``"processes"``)."""
    return f"{n} {noun if n == 1 else many or noun + 's'}"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str, gap: int = 2) -> list[str]:
    """Lines of a table whose every column is as wide as its longest cell (header included).

    Args:
        header: the column titles.
        rows: the cells, already formatted as text.
        align: one letter per column, ``l`` (left) or ``r`` (right).
        gap: spaces between columns.
    """
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [f"{c:<{w}}" if a == "l" else f"{c:>{w}}" for c, w, a in zip(map(str, cells), widths, align)]
        return (" " * gap).join(parts).rstrip()

    return [line(header), *(line(r) for r in rows)]


def format_duration(seconds: float, fine: bool = False) -> str:
    """``"12 h 06 min"``, ``"5 min"`` or ``"40 s"``; ``fine``: to the second below ten minutes
    (``"8.4 s"``, ``"4 min 05 s"``), for durations a user compares run by run."""
    if fine and seconds < 600:
        return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds) // 60} min {int(seconds) % 60:02d} s"
    m = int(round(seconds / 60))
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else (f"{m} min" if m else f"{seconds:.0f} s")
