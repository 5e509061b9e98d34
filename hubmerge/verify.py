"""``hubmerge verify TARGET``: check a Hub repo, a cache snapshot or an output folder against its record."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import hf_hub_download

from .errors import InputError
from .inputs.hub import Hub, hub_errors
from .inputs.sources import resolve
from .jsonio import json_field
from .output.recipe import RECIPE_NAME, read_recipe
from .verification.checklists import CheckRow, check_files, read_checklist


def _cache_expectations(folder: Path) -> tuple[dict[str, str], set[str]] | None:
    """For a snapshot folder of the HF cache: each file's expected digest is the name of the blob it links to
    (SHA256 for LFS files, git blob id otherwise). None when ``folder`` is not such a snapshot."""
    if folder.parent.name != "snapshots" or not folder.parent.parent.name.startswith(("models--", "datasets--")):
        return None
    expected, blobs = {}, set()
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or path.is_file():
            etag = path.resolve().name
            name = path.relative_to(folder).as_posix()
            expected[name] = etag
            if len(etag) == 40:
                blobs.add(name)
    return expected, blobs


def verify_target(target: str, *, checklist: str | Path | None = None, hub: Hub | None = None) -> list[CheckRow]:
    """Verify a local folder, an HF cache snapshot or a Hub repo (``org/name[@revision]``).

    A folder is checked against ``checklist`` when given, else its ``hubmerge.json``, else (a cache snapshot) the
    blob names the cache stores, else Meta's ``checklist.chk``. A Hub repo is downloaded into the cache and every
    file is checked against the Hub's record.

    Returns:
        one :class:`CheckRow` per file.
    Raises:
        InputError: nothing to verify against. HubAccessError: the Hub refused.
    """
    folder = Path(target).expanduser()
    if checklist is not None:
        return check_files(folder, read_checklist(Path(checklist)))
    if folder.is_dir():
        if (folder / RECIPE_NAME).is_file():
            files = json_field(read_recipe(folder), "files", dict, folder / RECIPE_NAME)
            if not files or not all(isinstance(d, str) for d in files.values()):
                raise InputError(f"{folder / RECIPE_NAME}: not a hubmerge recipe; restore it or use --checklist")
            return check_files(folder, files)
        cached = _cache_expectations(folder)
        if cached is not None:
            return check_files(folder, cached[0], git_blob=cached[1])
        if (folder / "checklist.chk").is_file():
            return check_files(folder, read_checklist(folder / "checklist.chk"))
        raise InputError(
            f"{folder}: nothing to verify against (no hubmerge.json, checklist.chk or cache "
            "snapshot); give --checklist FILE"
        )
    return _verify_repo(target, hub)


def _verify_repo(target: str, hub: Hub | None) -> list[CheckRow]:
    hub = hub or Hub()
    source = resolve(target, "base", hub)
    repo_id = source.repo_id or target
    rows = []
    for name, record in sorted(source.remote.items()):
        with hub_errors(hub, repo_id, revision=source.revision, filename=name, expected=record.expected):
            local = Path(
                hf_hub_download(
                    repo_id,
                    name,
                    revision=source.commit,
                    cache_dir=hub.cache_dir,
                    token=hub.token,
                    endpoint=hub.url,
                )
            )
        rows += check_files(
            local.parent,
            {local.name: record.sha256 or record.blob_id or ""},
            git_blob=() if record.sha256 else (local.name,),
        )
        rows[-1].file = name
    return rows
