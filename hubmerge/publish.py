"""Publish: upload a merge's HF output to a Hub repo (private unless asked otherwise) with a model card built from
its ``hubmerge.json`` recipe: sources pinned to commits, the merge recipe, and the SHA256 of every uploaded file."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import HubAccessError, InputError, OutputError, UnsafeFileError, VerificationError
from .inputs.hub import Hub, hub_errors
from .output.recipe import RECIPE_NAME, read_recipe, reproduce_command
from .progress import Progress
from .verification.hashing import file_digest

TAGS = ["hubmerge", "lora", "merge"]  # and the family's model_type


@dataclass
class PushResult:
    """Where the upload went: the repo page URL, the commit, its visibility, the uploaded files' SHA256, the model
    card, and the recipe (``hubmerge.json``) published with them."""

    repo_id: str
    url: str
    commit: str | None
    private: bool
    files: dict[str, str]
    card: str
    recipe: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PushTarget:
    """What a push to ``repo_id`` would do, found before anything is downloaded or created.

    ``exists``/``files``: the repo's state (its file count, .gitattributes aside); ``will_create``: the push creates
    it (with visibility ``private``; for an existing repo, ``private`` is its visibility); ``can_write``: the push
    may go ahead (the token can write that namespace, and an existing repo is empty or ``overwrite`` was given);
    ``message``: one line saying what will happen, or why not.
    """

    repo_id: str
    exists: bool
    files: int
    will_create: bool
    private: bool
    can_write: bool
    message: str

    def require(self) -> PushTarget:
        """This target when the push may go ahead.

        Raises:
            OutputError: the repo has files and no overwrite was given. HubAccessError: the token cannot write there.
        """
        if self.can_write:
            return self
        if self.exists and self.files:
            raise OutputError(self.message, repo_id=self.repo_id, remedy="overwrite")
        raise HubAccessError(self.message, repo_id=self.repo_id, remedy="login")


_WRITE_ROLES = {"admin", "write", "contributor"}
_WRITE_SCOPES = {"repo.write", "repo.content.write"}


def _namespace_problem(whoami: dict[str, Any], namespace: str) -> str | None:
    """Why the token of this ``whoami`` answer cannot write repos of ``namespace`` (None: it can)."""
    user = str(whoami.get("name") or "")
    token = (whoami.get("auth") or {}).get("accessToken") or {}
    role = token.get("role")
    if role == "fineGrained":
        scoped = (token.get("fineGrained") or {}).get("scoped") or []
        if not any(
            (s.get("entity") or {}).get("name") == namespace and _WRITE_SCOPES & set(s.get("permissions") or [])
            for s in scoped
        ):
            return f"your fine-grained token has no write permission on {namespace}; add it, or use a write token"
    elif role != "write":
        return f"your token may not write (role {role!r}); use a token with write access to {namespace}"
    if namespace == user:
        return None
    org = next((o for o in whoami.get("orgs") or [] if o.get("name") == namespace), None)
    if org is None:
        return f"you ({user}) may not write to {namespace}: not your namespace nor one of your organizations"
    if str(org.get("roleInOrg", "")).lower() not in _WRITE_ROLES:
        return f"you ({user}) may not write to {namespace}: your role in it is {org.get('roleInOrg')!r}"
    return None


def check_push_target(repo_id: str, hub: Hub, *, overwrite: bool = False, private: bool = True) -> PushTarget:
    """Find out, before any download, whether a push to ``repo_id`` can succeed and what it will do: whoami, the
    token's role for the namespace (its own user or an organization it can write), and the repo's state (absent: it
    will be created, private unless ``private`` is False; exists and empty; exists with files: refused unless
    ``overwrite``). Creates nothing.

    Returns:
        a :class:`PushTarget` (``can_write`` False with the reason in ``message`` when the push would be refused;
        ``.require()`` turns that into the error).
    Raises:
        InputError: ``repo_id`` is not ``namespace/name``. HubAccessError: the Hub could not be asked, or refused
        the token (401).
    """
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    namespace, _, name = repo_id.partition("/")
    if not namespace or not name or "/" in name:
        raise InputError(f"{repo_id}: a repo to push to is named namespace/name, e.g. your-name/merged-model")
    if not hub.has_token():
        return PushTarget(
            repo_id, False, 0, False, private, False,
            f"{repo_id}: pushing needs a token with write access; log in (`hf auth login` or HF_TOKEN)",
        )  # fmt: skip
    api = hub.api()
    with hub_errors(hub, repo_id, action="write to"):
        problem = _namespace_problem(api.whoami(), namespace)
    if problem:
        return PushTarget(repo_id, False, 0, False, private, False, f"{repo_id}: {problem}")
    with hub_errors(hub, repo_id, action="write to"):
        try:
            info = api.model_info(repo_id)
        except RepositoryNotFoundError as exc:
            if isinstance(exc, GatedRepoError):
                raise
            info = None
    if info is None:
        visibility = "private" if private else "public"
        return PushTarget(repo_id, False, 0, True, private, True, f"{repo_id}: will be created ({visibility})")
    files = [s.rfilename for s in info.siblings or [] if s.rfilename != ".gitattributes"]
    state = f"{repo_id}: exists ({'private' if info.private else 'public'})"
    if not files:
        return PushTarget(repo_id, True, 0, False, bool(info.private), True, f"{state} and is empty; will be filled")
    if not overwrite:
        return PushTarget(
            repo_id, True, len(files), False, bool(info.private), False,
            f"{repo_id}: the repository already has {_plural(len(files), 'file')}; pass --overwrite to replace them, "
            "or choose another name",
        )  # fmt: skip
    return PushTarget(
        repo_id, True, len(files), False, bool(info.private), True,
        f"{state} with {_plural(len(files), 'file')}; --overwrite replaces them",
    )  # fmt: skip


def _source_cells(hub_url: str, record: dict[str, Any]) -> str:
    """The source and commit cells of a card row: the repo linked to the tree at its full commit, the commit shown
    short (the full one is in the link, the command and hubmerge.json) so the table stays narrow enough to read."""
    if record.get("repo_id"):
        commit = record["commit"]
        return f"[{record['repo_id']}]({hub_url}/{record['repo_id']}/tree/{commit}) | `{commit[:12]}`"
    return f"`{record['source']}` | local folder"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def model_card(recipe: dict[str, Any], repo_id: str, hub_url: str, files: dict[str, str]) -> str:
    """The README.md for a published merge: metadata the Hub understands (base_model, tags, library_name, license
    when the sources state one) and a body that pins every source and lists every file's SHA256."""
    from huggingface_hub import ModelCard, ModelCardData

    sources = [recipe["base"], *recipe["adapters"]]
    licenses = sorted({s["license"] for s in sources if s.get("license")})
    family = recipe["merge"].get("family", "llama")  # recipes written before families were data: LLaMA
    data = ModelCardData(
        base_model=[s["repo_id"] for s in sources if s.get("repo_id")] or None,
        tags=[TAGS[0], family, *TAGS[1:]],
        library_name="transformers",
        license=licenses[0] if len(licenses) == 1 else ("other" if licenses else None),
    )
    m = recipe["merge"]
    lines = [
        f"# {repo_id.rsplit('/', 1)[-1]}",
        "",
        f"{_plural(len(recipe['adapters']), 'LoRA adapter')} merged into a {family} base by hubmerge, in this "
        "order (r, lora_alpha and the scale each applies are the adapters' own).",
        "",
        "## Sources",
        "",
        "| step | source | commit | layout | r | alpha | scale | replaces | vocab |",
        "|---|---|---|---|--:|--:|--:|---|--:|",
        f"| base | {_source_cells(hub_url, recipe['base'])} | | | | | | |",
    ]
    for i, a in enumerate(recipe["adapters"], 1):
        replaces = ", ".join(n.rsplit(".", 2)[-2] for n in a["replaces"]) or "-"
        lines.append(
            f"| {i} | {_source_cells(hub_url, a)} | {a['layout']} | {a['r']} | {a['lora_alpha']:g} | "
            f"{', '.join(f'{s:g}' for s in a['scaling']) or '-'}{' (rslora)' if a['use_rslora'] else ''} | "
            f"{replaces} | {a['vocab_size'] or '-'} |"
        )
    if len(licenses) > 1:
        lines += [
            "",
            "Licenses stated by the sources: "
            + "; ".join(f"{s.get('repo_id') or s['source']}: {s['license']}" for s in sources if s.get("license")),
        ]
    lines += [
        "",
        "## Merge",
        "",
        f"- W = W0 + sum_i scaling_i * B_i A_i in float32, cast once to {m['dtype']}; whole matrices "
        "(modules_to_save) replace the earlier ones in adapter order.",
        f"- vocabulary: {m['vocab_size']} tokens (tokenizer from {m['tokenizer']}); "
        f"{m['changed']} of {m['tensors']} tensors changed.",
        f"- formats: {', '.join(recipe['formats'])}; tools: "
        + ", ".join(f"{k} {v}" for k, v in recipe["tools"].items()),
        "",
        "## Files (SHA256)",
        "",
        "| file | sha256 |",
        "|---|---|",
    ]
    lines += [f"| {name} | `{digest}` |" for name, digest in sorted(files.items())]
    lines += [
        "",
        "## Reproduce",
        "",
        "The same files, made on your own machine with hubmerge's command line (every source pinned to the commit "
        "used here; the same command is `command` in hubmerge.json):",
        "",
        "```bash",
        reproduce_command(recipe, wrapped=True),
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        "```",
        "",
    ]
    return str(
        ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}", body="\n".join(lines))
    )


def _inside(root: Path, rel: object) -> Path:
    """``root / rel`` for a relative path of the recipe that stays inside ``root``, through no symbolic link.

    Raises:
        UnsafeFileError: an absolute path, a ``..``, or a symbolic link on the way.
    """
    recipe = root / RECIPE_NAME
    if not isinstance(rel, str) or "\\" in rel or PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
        raise UnsafeFileError(
            f"{recipe}: names {rel!r}, outside {root}; `hubmerge push` uploads only files inside the folder it "
            "is given: merge again to get a clean output",
            path=recipe,
        )
    path = root
    for part in PurePosixPath(rel).parts:
        path = path / part
        if path.is_symlink():
            raise UnsafeFileError(
                f"{path}: is a symbolic link; `hubmerge push` uploads only regular files inside {root}: "
                "replace it by the file hubmerge wrote, or merge again",
                path=path,
            )
    return path


def _hf_files(folder: Path, recipe: dict[str, Any], uploaded: Collection[str] = ()) -> tuple[Path, dict[str, str]]:
    """The HF-format folder of a merge output and ``{name in repo: sha256}`` of what to upload, from the recipe:
    only regular files inside ``folder``, whatever the recipe names (the ``uploaded`` ones may be gone already).

    Raises:
        InputError: no HF format, or a listed file is missing. UnsafeFileError: the recipe names a path outside
        ``folder`` or through a symbolic link.
    """
    formats, listed = recipe.get("formats"), recipe.get("files")
    hf = formats.get("hf") if isinstance(formats, dict) else None
    if not isinstance(hf, dict) or not isinstance(listed, dict):
        raise InputError(f"{folder}: the output holds no HF format; merge with --format hf to publish it")
    root = folder.resolve()
    _inside(root, RECIPE_NAME)
    hf_dir = _inside(root, hf.get("folder", "."))
    files = {}
    for rel, digest in listed.items():
        path = _inside(root, rel)
        if path.parent == hf_dir:
            if not path.is_file() and path.name not in uploaded:
                raise InputError(f"{path}: listed in {RECIPE_NAME} but missing; merge again", path=path)
            files[path.name] = digest
    return hf_dir, files


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    overwrite: bool = False,
    hub: Hub | None = None,
    verify: bool = True,
    progress: Progress | None = None,
    uploaded: Mapping[str, Any] | None = None,
) -> PushResult:
    """Publish the HF output of a hubmerge result folder to ``repo_id``.

    The repo is created private unless ``private=False``. Pushing into a repo that already has files needs
    ``overwrite=True``; the files it holds that the merge did not write are then deleted in the same commit.
    ``uploaded`` maps file names to ``CommitOperationAdd`` operations already pre-uploaded (a streamed push): they
    join the commit as they are (their local files may be gone), checked against the recipe's SHA256.

    Returns:
        a :class:`PushResult`.
    Raises:
        InputError: not a hubmerge output. UnsafeFileError: its recipe names files outside ``folder`` or through a
        symbolic link (nothing outside the folder is ever uploaded). VerificationError: a file differs from its
        recipe hash.
        OutputError: the repo has files and ``overwrite`` is False. HubAccessError: auth / permission problems.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    hub = hub or Hub()
    folder = Path(folder)
    try:
        recipe = read_recipe(folder)
        if not isinstance(recipe, dict):
            raise ValueError(RECIPE_NAME)
    except (OSError, ValueError, RecursionError):
        raise InputError(
            f"{folder}: no readable {RECIPE_NAME}; `hubmerge push` publishes folders written by hubmerge"
        ) from None
    uploaded = dict(uploaded or {})
    hf_dir, files = _hf_files(folder, recipe, uploaded)
    for name, op in uploaded.items():
        if files.get(name) != op.upload_info.sha256.hex():
            raise VerificationError(
                f"{name}: the uploaded file's SHA256 differs from {RECIPE_NAME}; merge again", repo_id=repo_id
            )
    if verify:
        for name, digest in files.items():
            if name not in uploaded and file_digest(hf_dir / name) != digest:
                raise VerificationError(
                    f"{hf_dir / name}: SHA256 differs from {RECIPE_NAME}; the file changed since the merge, merge again"
                )
    files[RECIPE_NAME] = file_digest(folder / RECIPE_NAME)
    target = check_push_target(repo_id, hub, overwrite=overwrite, private=private).require()
    api = hub.api()
    with hub_errors(hub, repo_id, action="create or write to"):
        # exist_ok only for a repo that was there: one this run creates is deleted again if the push fails
        api.create_repo(repo_id, private=private, exist_ok=not target.will_create)
    try:
        with hub_errors(hub, repo_id, action="create or write to"):
            info = api.model_info(repo_id)
            existing = [s.rfilename for s in info.siblings or [] if s.rfilename != ".gitattributes"]
        if existing and not overwrite:
            raise OutputError(
                f"{repo_id}: the repository already has {_plural(len(existing), 'file')}; pass --overwrite to replace "
                "them, or choose another name",
                repo_id=repo_id,
                remedy="overwrite",
            )
        card = model_card(recipe, repo_id, hub.url, files)
        ops: list[Any] = [
            CommitOperationAdd(
                path_in_repo=name,
                path_or_fileobj=str(folder / RECIPE_NAME if name == RECIPE_NAME else hf_dir / name),
            )
            for name in files
            if name not in uploaded
        ]
        progress = progress or Progress()
        for op in ops:  # uploaded one by one so each file reports; the commit below then only names them
            size = Path(str(op.path_or_fileobj)).stat().st_size
            with progress.task("upload", op.path_in_repo, size) as update, hub_errors(hub, repo_id, action="write to"):
                api.preupload_lfs_files(repo_id, additions=[op])
                update(size)
        ops += uploaded.values()
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
        ops += [
            CommitOperationDelete(path_in_repo=name) for name in existing if name not in files and name != "README.md"
        ]
        with hub_errors(hub, repo_id, action="write to"):
            commit = api.create_commit(
                repo_id,
                ops,
                commit_message="Upload model merged by hubmerge",
                commit_description=json.dumps({"hubmerge_recipe_sha256": files[RECIPE_NAME]}),
            )
    except BaseException:  # a failed or cancelled (Ctrl-C) push leaves no empty repo that it created
        if target.will_create:
            with contextlib.suppress(Exception), hub_errors(hub, repo_id, action="delete"):
                api.delete_repo(repo_id)
        raise
    url = f"{hub.url}/{repo_id}"
    return PushResult(repo_id, url, getattr(commit, "oid", None), bool(info.private), files, card, recipe)
