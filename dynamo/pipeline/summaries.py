"""Headline numbers as text: one formatting of values for the terminal, the JSON and the report."""

from __future__ import annotations

import math
from collections.abc import Mapping

from dynamo.partition import Partition

SKIPPED_KEYS = ("result", "figures", "captions")  # paths and their captions, not numbers
MAX_LIST = 12  # longer lists are cut with "…" on the page and in the terminal


def format_value(value) -> str:
    """A number rounded to 4 significant digits; a partition as ``[1-3][4-6]``; a list as ``[a, b, c]`` (cut after `MAX_LIST`)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return "; ".join(f"{key} {format_value(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)) and value and all(isinstance(item, list) for item in value):
        return str(Partition(value))  # a partition: [1-3][4-6]...
    if isinstance(value, (list, tuple)):
        shown = ", ".join(format_value(item) for item in value[:MAX_LIST])
        return f"[{shown}{', …' if len(value) > MAX_LIST else ''}]"
    return str(value)


def headline_rows(numbers: Mapping) -> dict[str, str]:
    """``{quantity: formatted value}``, one row per headline number (paths left out)."""
    return {str(key): format_value(value) for key, value in numbers.items() if key not in SKIPPED_KEYS}


def headline_lines(numbers: Mapping) -> list[str]:
    """``key: value`` lines of `headline_rows`."""
    return [f"{key}: {value}" for key, value in headline_rows(numbers).items()]
