"""Regular expressions from adapter configs (``target_modules``, ``exclude_modules``, ``rank_pattern`` keys), matched
as PEFT matches them but never with unbounded cost.

Python's ``re`` backtracks: ``(a+)+`` against a long non-matching name runs for ever, and cannot be interrupted from
another thread. So a pattern is refused when it can backtrack badly: a repetition nested in a repetition, an
alternation repeated, a backreference, more than :data:`MAX_OPEN_REPEATS` open-ended repetitions. What remains
matches a module name (at most :data:`MAX_NAME` characters) in at most ~n^3 steps of a short n, and a whole
adapter's matching still stops at a deadline.
"""

from __future__ import annotations

import importlib
import re
import sys
import time
from pathlib import Path

from ..errors import InputError

# The parser re.compile itself uses (private, stable since Python 3.0): its tree tells which constructs backtrack.
_sre_parse = importlib.import_module("re._parser" if sys.version_info >= (3, 11) else "sre_parse")

MAX_PATTERN = 1000  # characters; real target_modules regexes are well under 300
MAX_GROUPS = 50
MAX_NAME = 128  # characters of a module name; LLaMA's are under 60
MAX_OPEN_REPEATS = 3
MATCH_SECONDS = 2.0  # for all the matching one adapter needs

_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}


def _risk(tree, under_repeat: bool, open_repeats: list[int]) -> str | None:
    """Why matching ``tree`` (a parsed pattern) may backtrack without bound, or None."""
    for op, av in tree:
        kind = str(op)
        if kind.startswith("GROUPREF"):
            return "uses a backreference"
        if kind in _REPEATS:
            low, high, body = av
            repeats = high > 1
            if repeats and under_repeat and low != high:
                return "nests a repetition in a repetition, like (a+)+"
            if high > low and high > 1:
                open_repeats[0] += 1
            found = _risk(body, under_repeat or repeats, open_repeats)
        elif kind == "BRANCH":
            if under_repeat:
                return "repeats an alternation, like (a|ab)*"
            found = next((r for b in av[1] if (r := _risk(b, under_repeat, open_repeats))), None)
        elif kind == "SUBPATTERN":
            found = _risk(av[3], under_repeat, open_repeats)
        elif kind in ("ASSERT", "ASSERT_NOT"):
            found = _risk(av[1], under_repeat, open_repeats)
        elif kind == "ATOMIC_GROUP":
            found = _risk(av, under_repeat, open_repeats)
        else:
            continue
        if found:
            return found
    if open_repeats[0] > MAX_OPEN_REPEATS:
        return f"has more than {MAX_OPEN_REPEATS} open-ended repetitions"
    return None


def compile_pattern(pattern: object, where: Path, key: str, template: str = "{}") -> re.Pattern[str]:
    """Compile a config's regex (placed into ``template``, e.g. PEFT's ``(.*\\.)?({})$`` for rank_pattern keys).

    Raises:
        InputError: naming the file and key, when the pattern is not a string, too long, invalid, or may backtrack
        without bound.
    """
    fix = f"write {key} as a list of module names"
    if not isinstance(pattern, str):
        raise InputError(f"{where}: {key} entry {str(pattern)[:60]!r} is not a string; {fix}")
    if len(pattern) > MAX_PATTERN:
        raise InputError(f"{where}: {key} is a regex of {len(pattern)} characters (at most {MAX_PATTERN}); {fix}")
    if pattern.count("(") > MAX_GROUPS:  # also keeps re's recursive parser far from the recursion limit
        raise InputError(f"{where}: {key} is a regex of more than {MAX_GROUPS} groups; {fix}")
    try:
        tree = _sre_parse.parse(pattern)
        compiled = re.compile(template.format(pattern))
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        raise InputError(f"{where}: {key} {pattern[:80]!r} is not a valid regular expression ({exc}); {fix}") from None
    problem = _risk(tree, False, [0])
    if problem:
        raise InputError(
            f"{where}: {key} {pattern[:80]!r} {problem}, which can take practically forever to match; {fix}"
        )
    return compiled


class Deadline:
    """Bounds the total time of an adapter's pattern matching (each single match is short by construction)."""

    def __init__(self, where: Path, seconds: float = MATCH_SECONDS):
        self.where, self.seconds = where, seconds
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        """Raise InputError once the time is spent."""
        if time.monotonic() > self.end:
            raise InputError(
                f"{self.where}: matching its module patterns took over {self.seconds:g} s; "
                "write target_modules as a list of module names"
            )
