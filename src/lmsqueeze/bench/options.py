"""Parsing and checking of benchmark options (lengths, batch sizes, variant names)."""

from __future__ import annotations

from collections.abc import Iterable

from lmsqueeze.errors import LmsqueezeError


def parse_int_list(text: str | Iterable[int], what: str = "lengths") -> list[int]:
    """Positive integers from "32768,131072" (a "k" suffix means x1024: "32k,128k"), or a list of ints."""
    if isinstance(text, str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        values = []
        for item in items:
            mult = 1024 if item[-1:] in ("k", "K") else 1
            digits = item[:-1] if mult > 1 else item
            if not digits.isdigit():
                raise LmsqueezeError(f"bad {what} {text!r}; give comma-separated positive integers, e.g. 32768,131072")
            values.append(int(digits) * mult)
    else:
        values = list(text)
    return check_positive(values, what)


def check_positive(values: list[int], what: str) -> list[int]:
    """`values` if it is a non-empty list of positive ints; LmsqueezeError otherwise."""
    if not values:
        raise LmsqueezeError(f"no {what} given; give comma-separated positive integers, e.g. 32768,131072")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LmsqueezeError(f"bad {what} value {v!r}; each must be a positive integer")
    return values


def parse_names(text: str | Iterable[str], known: Iterable[str], what: str = "variant") -> list[str]:
    """Names from "a,b" (or a list), each one of `known`; order kept, duplicates dropped."""
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    names = list(dict.fromkeys(n for n in names if n))
    known = list(known)
    if not names:
        raise LmsqueezeError(f"no {what} given; use one or more of {', '.join(known)}")
    for n in names:
        if n not in known:
            raise LmsqueezeError(f"unknown {what} {n!r}; use one of {', '.join(known)}")
    return names
