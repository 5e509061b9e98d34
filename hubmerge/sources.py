"""Resolve what the user named (a local folder, or a Hub ID ``org/name[@revision]``) into a :class:`Source`: a local
folder holding the files, plus where they came from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


@dataclass
class Source:
    """A resolved input. ``path`` holds its files; Hub inputs also carry the repo, the revision asked for, the commit
    it resolved to, and the SHA256 the Hub records for each file."""

    spec: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Short name for messages: ``org/name@commit7`` or the folder as given."""
        if self.repo_id:
            return f"{self.repo_id}@{self.commit[:7]}" if self.commit else self.repo_id
        return self.spec

    @property
    def name(self) -> str:
        """Last component of the repo or folder name (default output folder names use it)."""
        return (self.repo_id or str(self.path.resolve())).rstrip("/").rsplit("/", 1)[-1]


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; None when ``spec`` is not shaped like a Hub ID."""
    m = _HUB_ID.match(spec)
    return (m["repo"], m["rev"]) if m else None


def resolve_local(spec: str | Path) -> Source | None:
    """A :class:`Source` for an existing local folder, or None. A folder wins over a Hub ID of the same name, as in
    transformers."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return Source(str(spec), path)
    if path.exists():
        raise InputError(f"{spec}: is a file; give the folder that holds it")
    return None
