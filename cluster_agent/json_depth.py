"""JSON nested deeper than the parser goes, made parseable so that one deep item does not lose its neighbours.

Python's json module recurses once per level and raises RecursionError near 1000 levels, for the whole document.
`cut_deep()` copies the text with every array or object nested deeper than `max_depth` replaced by the string
TOO_DEEP; the caller then refuses just the items that hold it. The scan jumps from bracket to bracket with one
regular expression (strings are skipped whole, escapes included), so it stays fast on large answers.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["TOO_DEEP", "cut_deep", "holds_too_deep", "nesting_depth"]

TOO_DEEP = "\u0000radix: nested too deep"
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)
_MARKER = json.dumps(TOO_DEEP).encode()


def cut_deep(data: bytes, max_depth: int) -> bytes:
    """`data` with each array or object deeper than `max_depth` levels replaced by the JSON string TOO_DEEP."""
    out: list[bytes] = []
    depth = 0
    kept_from = 0  # start of the text not yet copied
    cut_at: int | None = None  # depth at which the current cut began
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token[:1] == b'"':
            continue
        if token in (b"[", b"{"):
            depth += 1
            if cut_at is None and depth > max_depth:
                out.append(data[kept_from:match.start()])
                out.append(_MARKER)
                cut_at = depth
        else:
            if cut_at is not None and depth == cut_at:
                kept_from = match.end()
                cut_at = None
            depth -= 1
    if cut_at is None:
        out.append(data[kept_from:])
    return b"".join(out)


def holds_too_deep(value: Any) -> bool:
    """Whether TOO_DEEP is anywhere in `value` (a parsed item; at most `max_depth` deep by then)."""
    return _MARKER in json.dumps(value).encode()


def nesting_depth(value: Any) -> int:
    """How deep lists and objects nest in `value` (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest
