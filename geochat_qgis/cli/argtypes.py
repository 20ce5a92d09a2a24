"""argparse types that refuse impossible numbers with a message naming the value."""
from __future__ import annotations

import argparse
import math
from typing import Callable


def _number(kind: type, test: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a whole number above 0")
positive_float = _number(float, lambda v: v > 0, "a number above 0")
non_negative_float = _number(float, lambda v: v >= 0, "a number of 0 or more")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")
