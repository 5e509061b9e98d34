"""Build the Space repository and, optionally, upload it.

A Space installs ``requirements.txt`` before the repository is copied in, so hubmerge cannot be installed from the
repository itself, and it is not on PyPI. The Space therefore carries a copy of the ``hubmerge`` package next to
``app.py`` (``python app.py`` puts that folder first on ``sys.path``); ``requirements.txt`` lists its dependencies.

    python space/deploy.py --out build/space           # assemble only: app.py, README.md, requirements.txt, hubmerge/
    python space/deploy.py you/hubmerge                # assemble and upload to the Space you/hubmerge (created if
                                                       # needed), with your own login (HF_TOKEN or `hf auth login`)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "hubmerge"
FILES = ("app.py", "README.md", "requirements.txt")


def assemble(out: Path) -> Path:
    """Write the Space's files into ``out`` (replacing what was there) and return it."""
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in FILES:
        shutil.copy2(HERE / name, out / name)
    shutil.copytree(PACKAGE, out / "hubmerge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "testing"))
    return out


def upload(
    folder: Path, space_id: str, *, private: bool = False, endpoint: str | None = None, token: str | None = None
) -> str:
    """Create the Space if needed and upload ``folder`` as its content; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=space_id,
        repo_type="space",
        folder_path=folder,
        commit_message="Deploy the hubmerge Space",
        delete_patterns=["hubmerge/**"],
    )
    return str(commit)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("space", nargs="?", help="Space to upload to, e.g. you/hubmerge (omit with --out)")
    p.add_argument("--out", type=Path, help="assemble into this folder (default: a temporary one)")
    p.add_argument("--private", action="store_true", help="create the Space private")
    args = p.parse_args(argv)
    if not args.space and not args.out:
        p.error("name a Space to upload to, or --out to assemble only")
    with tempfile.TemporaryDirectory() as tmp:
        folder = assemble(args.out or Path(tmp) / "space")
        print(f"assembled {folder}")
        if args.space:
            print(f"uploaded: {upload(folder, args.space, private=args.private)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
