"""README front matter for the local Hub: split it off and parse the small YAML subset model cards use.

Standard library only, so this is not a YAML implementation: it handles block mappings, block lists (also of
mappings, as in ``model-index``), flow lists ``[a, b]``, quoted and plain scalars, booleans, null and numbers.
Anything else raises ``ValueError``; the server then simply omits ``cardData`` (it is optional on the Hub too).
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["split_front_matter", "parse_yaml_subset", "card_data"]

_INT_RE = re.compile(r"^[-+]?\d+$")
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?$")


def split_front_matter(text: str) -> tuple[str | None, str]:
    """Return ``(yaml_source, body)``; ``yaml_source`` is ``None`` when the text has no ``---`` header.

    Raises ``ValueError`` when a header is opened but never closed.
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None, text
    for i in range(1, len(lines)):
        if lines[i].strip() in ("---", "..."):
            return "\n".join(lines[1:i]), "\n".join(lines[i + 1 :])
    raise ValueError("YAML front matter is opened with '---' but never closed")


def _scalar(tok: str) -> Any:
    tok = tok.strip()
    if not tok:
        return None
    if tok[0] == '"':
        return json.loads(tok)  # YAML double-quoted strings are close enough to JSON strings
    if tok[0] == "'":
        if len(tok) < 2 or tok[-1] != "'":
            raise ValueError(f"unterminated string: {tok}")
        return tok[1:-1].replace("''", "'")
    if tok[0] == "[":
        if tok[-1] != "]":
            raise ValueError(f"unsupported flow sequence: {tok}")
        inner = tok[1:-1].strip()
        return [_scalar(p) for p in _split_flow(inner)] if inner else []
    if tok == "{}":
        return {}
    if tok[0] in "{&*!|>%@`":
        raise ValueError(f"unsupported YAML construct: {tok}")
    if " #" in tok:
        tok = tok.split(" #", 1)[0].rstrip()
    low = tok.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("null", "~"):
        return None
    if _INT_RE.match(tok):
        return int(tok)
    if _FLOAT_RE.match(tok):
        return float(tok)
    return tok


def _split_flow(inner: str) -> list[str]:
    parts, depth, quote, cur = [], 0, "", ""
    for ch in inner:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return parts


def _key_value(content: str) -> tuple[str, str] | None:
    # "key: value" or "key:" outside quotes; returns None for a plain scalar.
    m = re.match(r"""^("(?:[^"\\]|\\.)*"|'[^']*'|[^'"\s][^:]*?)\s*:(?:\s+(.*)|$)""", content)
    if not m:
        return None
    key = m.group(1)
    if key[0] in "\"'":
        key = _scalar(key)
    return str(key), (m.group(2) or "")


def parse_yaml_subset(src: str) -> Any:
    """Parse ``src`` (see module docstring for the subset); return dicts/lists/scalars. Raises ``ValueError``."""
    lines: list[tuple[int, str]] = []
    for raw in src.splitlines():
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError("tabs are not allowed in YAML indentation")
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        lines.append((len(raw) - len(raw.lstrip(" ")), stripped))
    if not lines:
        return None
    value, i = _block(lines, 0, lines[0][0])
    if i != len(lines):
        raise ValueError(f"unexpected content: {lines[i][1]!r}")
    return value


def _block(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][1].startswith("- ") or lines[i][1] == "-":
        out_list: list[Any] = []
        while i < len(lines) and lines[i][0] == indent and (lines[i][1].startswith("- ") or lines[i][1] == "-"):
            rest = lines[i][1][1:].strip()
            if not rest:
                if i + 1 < len(lines) and lines[i + 1][0] > indent:
                    item, i = _block(lines, i + 1, lines[i + 1][0])
                else:
                    item, i = None, i + 1
            elif _key_value(rest) is not None and not rest.startswith(("[", '"', "'")):
                # "- key: v" starts a mapping whose keys sit two columns right of the dash.
                lines[i] = (indent + 2, rest)
                item, i = _block(lines, i, indent + 2)
            else:
                item, i = _scalar(rest), i + 1
            out_list.append(item)
        return out_list, i
    out: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent:
        kv = _key_value(lines[i][1])
        if kv is None:
            raise ValueError(f"expected 'key: value', got {lines[i][1]!r}")
        key, rest = kv
        if rest.strip() and not rest.strip().startswith("#"):
            out[key] = _scalar(rest)
            i += 1
            continue
        i += 1
        nested_list_same_indent = i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("-")
        if i < len(lines) and (lines[i][0] > indent or nested_list_same_indent):
            out[key], i = _block(lines, i, lines[i][0])
        else:
            out[key] = None
    if i < len(lines) and lines[i][0] > indent:
        raise ValueError(f"bad indentation at {lines[i][1]!r}")
    return out, i


def card_data(readme: str) -> dict[str, Any] | None:
    """Return the README's front matter as a dict, or ``None`` if absent or outside the supported subset."""
    try:
        src, _ = split_front_matter(readme)
        if src is None:
            return None
        data = parse_yaml_subset(src)
    except (ValueError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
