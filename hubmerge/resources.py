"""What the machine has (memory, free disk) and the preflight checks built on it, so a run that cannot fit stops
with one line before it writes anything."""

from __future__ import annotations

import resource
import shutil
from pathlib import Path

from .errors import OutputError
from .sizes import format_size


def _proc_bytes(path: str, key: str) -> int | None:
    """A ``key: N kB`` value of a Linux /proc file, in bytes; None where there is no such file or key."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """Peak resident memory of this process, in bytes.

    VmHWM of /proc/self/status where there is one: ru_maxrss survives exec, so a process started from a big parent
    (a test runner, a notebook) would report the parent's peak as its own.
    """
    peak = _proc_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory() -> int | None:
    """Bytes of memory the kernel says a new allocation can get (MemAvailable), or None where unknown."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def check_disk(folder: Path, needed: int, what: str = "the output") -> None:
    """Raise OutputError when ``folder``'s disk has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(
            f"{folder}: {format_size(free)} free but {what} need {format_size(needed)}; "
            "free some space or choose another folder"
        )


def check_memory(needed: int) -> None:
    """Raise OutputError when the machine has less than ``needed`` bytes of memory available."""
    available = available_memory()
    if available is not None and available < needed:
        raise OutputError(
            f"the merge needs about {format_size(needed)} of memory but {format_size(available)} is "
            "available; close other programs and run again"
        )
