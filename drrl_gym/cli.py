"""argparse value types shared by the command-line scripts: bounded numbers and lists of them."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

NOUNS = {int: "an integer", float: "a number"}


def number_in(kind: type[int] | type[float], low: float, high: float | None = None, *,
              low_exclusive: bool = False, high_inclusive: bool = False) -> Callable[[str], int | float]:
    """argparse type: ``kind`` (int or float), finite, >= low (> if ``low_exclusive``), below ``high`` if given
    (<= if ``high_inclusive``). Bounds follow the count/seed conventions: counts ``number_in(int, 1)``, numpy seeds
    ``number_in(int, 0, 2**32)``."""
    lower = f"> {low}" if low_exclusive else f">= {low}"
    if high is None:
        rule = lower
    elif low_exclusive or high_inclusive:
        rule = f"{lower} and {'<=' if high_inclusive else '<'} {high}"
    else:
        rule = f"in [{low}, {high})"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {NOUNS[kind]} (must be {rule})") from None
        too_low = value <= low if low_exclusive else value < low
        too_high = high is not None and (value > high if high_inclusive else value >= high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"{value} must be {rule}")
        return value

    return parse


def int_list(low: int = 1) -> Callable[[str], tuple[int, ...]]:
    """argparse type: comma-separated ints >= ``low``, e.g. rank choices ``4,8,12,16`` or layer sizes ``64,64``."""
    item = number_in(int, low)

    def parse(text: str) -> tuple[int, ...]:
        return tuple(int(item(part)) for part in text.split(","))

    return parse
