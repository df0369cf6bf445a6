"""Markdown tables, as the asset pages, reports and run summaries show them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_cell(value: Any, limit: int = 160) -> str:
    """One table cell as text: floats to 4 decimals, whitespace collapsed, long text cut."""
    if isinstance(value, float):
        return f"{value:.4f}"
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], limit: int = 160) -> str:
    """A Markdown table; cells are formatted by format_cell and their pipes escaped."""
    def cell(value: Any) -> str:
        return format_cell(value, limit).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def wrap_words(words: Sequence[str], width: int) -> list[str]:
    """Lines of at most `width` characters, joining `words` with spaces and breaking only between them (a word
    longer than `width` stands on its own line)."""
    lines, current = [], ""
    for word in words:
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    return [*lines, current] if current else lines
