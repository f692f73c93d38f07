"""Version numbers compared as tuples of ints (the original compared dot-stripped strings: 11.0 < 10.2.9)."""
from __future__ import annotations

import re

_VERSION = re.compile(r"\d+(?:\.\d+)+|\d+")


def parse_version(text: str) -> tuple[int, ...]:
    """The first dotted number in text, e.g. 'ceph version 16.2.15 (...)' -> (16, 2, 15).

    :raises ValueError: no number in text.
    """
    match = _VERSION.search(text)
    if match is None:
        raise ValueError(f"no version number in {text!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def at_least(found: tuple[int, ...], minimum: tuple[int, ...]) -> bool:
    # Pad with zeros so that 1.0 == 1.0.0.
    width = max(len(found), len(minimum))
    return found + (0,) * (width - len(found)) >= minimum + (0,) * (width - len(minimum))
