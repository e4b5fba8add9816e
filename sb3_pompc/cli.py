"""Command-line helpers shared by the package's scripts (``python -m sb3_pompc.train``, the benchmark).

``--set KEY=VALUE`` passes any keyword argument of :class:`~sb3_pompc.POMPC` on the command line; the value is a
Python literal when it parses as one, else a string.
"""

from __future__ import annotations

import ast
from typing import Any, Iterable

__all__ = ["parse_value", "parse_overrides"]

_INFINITY = {"inf": float("inf"), "+inf": float("inf"), "infinity": float("inf"), "-inf": float("-inf")}


def parse_value(text: str) -> Any:
    """One ``--set`` value: a Python literal (``3``, ``0.5``, ``None``, ``True``, ``(1, 2)``), ``inf`` / ``-inf``
    as floats, anything else as the string itself.

    :param text: the text after ``=``
    :return: the parsed value
    """
    text = text.strip()
    if text.lower() in _INFINITY:
        return _INFINITY[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["num_samples=64", "kl-warmup=100", "prior=forward"]`` → ``{"num_samples": 64, "kl_warmup": 100,
    "prior": "forward"}``. Dashes in keys become underscores; a later item wins over an earlier one.

    :param items: ``KEY=VALUE`` strings
    :return: the keyword arguments
    :raises ValueError: for an item without ``=`` or with an empty key
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        overrides[key] = parse_value(value)
    return overrides
