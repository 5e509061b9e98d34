"""Command line: argument parsing, progress and messages only; every step is a call into the public API.

``hubmerge ADAPTER [ADAPTER ...] --base BASE`` merges (the ``merge`` subcommand is implied); other subcommands are
listed by ``hubmerge --help``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Sequence

from . import __version__
from .constants import DEFAULT_FORMATS, DEFAULT_MAX_SHARD_SIZE
from .errors import HubmergeError, Interrupted
from .output.formats import check_formats

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: ``configure`` adds its arguments, the decorated function runs it."""

    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help_text, configure, run)
        return run

    return register


def _formats(value: str) -> list[str]:
    try:
        return check_formats([f.strip() for f in value.split(",") if f.strip()])
    except HubmergeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _output_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that writes a model."""
    p.add_argument(
        "--format",
        dest="formats",
        type=_formats,
        default=list(DEFAULT_FORMATS),
        help="hf, pth, gguf, gguf:<type> or a list like hf,gguf:q8_0 (default: hf); with several, each goes to "
        "OUT/<format>/; gguf writes OUT/model-<type>.gguf, its type following --dtype, or the type named as "
        "llama.cpp's --outtype: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0",
    )
    p.add_argument("--dtype", help="output dtype: float16, bfloat16 or float32 (default: the base's)")
    p.add_argument(
        "--max-shard-size",
        help=f"largest HF safetensors shard (default: {DEFAULT_MAX_SHARD_SIZE}; with --push-to, a sixteenth of the "
        "model within 128MB..2GB)",
    )
    p.add_argument("--pth-shards", type=int, help="pth model-parallel shards (default: by model size, 7B=1 ... 65B=8)")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip checking a Meta checkpoint against checklist.chk and the known SHA256 of the release",
    )


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "adapters",
        nargs="+",
        metavar="ADAPTER",
        help="LoRA adapter folder or Hub ID (org/name[@revision]); several apply in the order given",
    )
    p.add_argument(
        "--base",
        required=True,
        help="base model: HF-format folder, Hub ID, or Meta checkpoint folder (consolidated.*.pth)",
    )
    p.add_argument("--out", help="output folder (default: ./<last adapter name>-merged)")
    _output_args(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it exists (and, with --push-to, the files of an existing repo)",
    )
    p.add_argument("--push-to", metavar="ORG/NAME", help="publish the HF output to this Hub repo (private)")
    p.add_argument("--public", action="store_true", help="with --push-to: create the repo public")
    p.add_argument(
        "--no-keep-downloads",
        dest="keep_downloads",
        action="store_false",
        help="with --push-to: remove each base shard this run downloads once it is merged (by default they stay "
        "in the cache when the disk holds them; files cached before are never touched)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve everything and print the plan; download no weights, write nothing",
    )
    _hub_args(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary, only errors")


LOGIN = (
    "Hub login: run `hf auth login` once, or set HF_TOKEN; hubmerge uses them by itself. --token works too, but\n"
    "other users of this machine can read a command line (ps): pass it only where nobody else logs in."
)


def _hub_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token",
        help="prefer HF_TOKEN or `hf auth login` (used by default, in that order): a token given here is visible "
        "to other users of this machine in `ps`",
    )
    p.epilog = f"{p.epilog}\n\n{LOGIN}" if p.epilog else LOGIN
    p.add_argument("--cache-dir", help="download cache (default: the standard Hugging Face cache)")


@command("merge", "merge adapters into a base (the default command)", _merge_args)
def _run_merge(args: argparse.Namespace) -> int:
    started = time.monotonic()  # the summary's time is the user's wait: the head start and torch's import count
    say = (lambda *_: None) if args.quiet else print
    if args.dry_run:
        from .dryrun import preview

        for line in preview(
            args.adapters,
            args.base,
            out=args.out,
            formats=args.formats,
            dtype=args.dtype,
            token=args.token,
            cache_dir=args.cache_dir,
            progress=not args.quiet,
            push_to=args.push_to,
            max_shard_size=args.max_shard_size,
            keep_downloads=args.keep_downloads,
            overwrite=args.overwrite,
            public=args.public,
        ):
            print(line)
        return 0
    from .verification.hashing import prehash

    prehash([*args.adapters, args.base])  # on the other core, while torch imports
    if args.push_to:  # a streamed push: the first base shard downloads meanwhile too
        from .headstart import HEAD_START_WAIT, head_start
        from .inputs.hub import hub_from_args

        hub = hub_from_args(args.token, args.cache_dir, None)
        head_start(args.base, hub, args.push_to, overwrite=args.overwrite).begun.wait(HEAD_START_WAIT)
    # torch's import makes a few hundred thousand objects that the collector would walk again and again as they
    # are made (~0.25 s of CPU); none of them is garbage, so it is off meanwhile, and they are frozen after.
    gc.disable()
    from .pipeline import merge

    gc.enable()
    gc.freeze()

    result = merge(
        args.adapters,
        args.base,
        args.out,
        formats=args.formats,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        pth_shards=args.pth_shards,
        overwrite=args.overwrite,
        push_to=args.push_to,
        public=args.public,
        token=args.token,
        cache_dir=args.cache_dir,
        verify=args.verify,
        progress=not args.quiet,
        keep_downloads=args.keep_downloads,
    )
    result.seconds = time.monotonic() - started
    for line in result.summary():
        say(line)
    return 0


def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a folder written by hubmerge (it holds hubmerge.json)")
    p.add_argument("repo_id", metavar="ORG/NAME", help="the Hub repo to publish to (created private)")
    p.add_argument("--public", action="store_true", help="create the repo public")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a repo that already has some")
    _hub_args(p)


@command("push", "publish an existing hubmerge output to a private Hub repo with a model card", _push_args)
def _run_push(args: argparse.Namespace) -> int:
    from .inputs.hub import hub_from_args
    from .publish import push

    result = push(
        args.folder,
        args.repo_id,
        private=not args.public,
        overwrite=args.overwrite,
        hub=hub_from_args(args.token, args.cache_dir, None),
    )
    print(
        f"published {result.url} ({'private' if result.private else 'public'}): {len(result.files)} files + model card"
    )
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target", help="a Hub repo (org/name[@revision]), an HF cache snapshot folder, or a folder with hubmerge.json"
    )
    p.add_argument("--checklist", help="a md5sum/sha256sum-style file to verify the folder against")
    _hub_args(p)


@command("verify", "verify files against the Hub's record, a hubmerge.json recipe or a checklist", _verify_args)
def _run_verify(args: argparse.Namespace) -> int:
    from .inputs.hub import hub_from_args
    from .verification.checklists import format_table
    from .verify import verify_target

    rows = verify_target(args.target, checklist=args.checklist, hub=hub_from_args(args.token, args.cache_dir, None))
    for line in format_table(rows):
        print(line)
    bad = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(bad)} of {len(rows)} files verified" + (f"; {len(bad)} FAILED" if bad else ""))
    return 1 if bad else 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", action="store_true", help="keep the demo's files and print where they are")
    p.add_argument("--workdir", help="folder for the demo's files (default: a new temporary folder)")


@command("demo", "run the whole flow offline on tiny models against a local Hub server", _demo_args)
def _run_demo(args: argparse.Namespace) -> int:
    from .testing.demo import run

    return run(keep=args.keep, workdir=args.workdir)


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        metavar="META_DIR",
        help="Meta checkpoint folder (consolidated.*.pth, params.json; tokenizer.model here or in the "
        "parent folder), or an HF-format folder",
    )
    p.add_argument("--out", required=True, help="output folder")
    _output_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary, only errors")


@command("convert", "convert a Meta LLaMA checkpoint (or any base) to HF safetensors, GGUF or pth", _convert_args)
def _run_convert(args: argparse.Namespace) -> int:
    from .conversion import convert
    from .verification.checklists import format_table

    result = convert(
        args.source,
        args.out,
        formats=args.formats,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size or DEFAULT_MAX_SHARD_SIZE,
        pth_shards=args.pth_shards,
        verify=args.verify,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if not args.quiet:
        checks = result.plan.base.checks
        if checks:
            print(f"verified {len(checks)} files:")
            for line in format_table(checks):
                print(f"  {line}")
        for line in result.summary():
            print(line)
    return 0


EXAMPLES = """examples:
  hubmerge ziqingyang/chinese-alpaca-lora-7b --base ./llama-hf
  hubmerge ziqingyang/chinese-llama-plus-lora-7b ziqingyang/chinese-alpaca-plus-lora-7b --base ./llama-hf \\
           --out ./alpaca-plus-7b --format hf,gguf --push-to you/chinese-alpaca-plus-7b
  hubmerge ziqingyang/chinese-alpaca-lora-7b --base you/llama-7b-hf --push-to you/chinese-alpaca-7b
           (no --out: Hub to Hub as one stream, a few shards on disk at a time)
  hubmerge org/adapter@v1.0 --base you/llama-7b-hf --dry-run
  hubmerge convert ./LLaMA/7B --out ./llama-7b-hf
  hubmerge demo"""


def build_parser(name: str) -> argparse.ArgumentParser:
    help_text, configure, _ = COMMANDS[name]
    others = "\n".join(f"  hubmerge {n:<8} {h}" for n, (h, _, _) in COMMANDS.items() if n != "merge")
    parser = argparse.ArgumentParser(
        prog="hubmerge" if name == "merge" else f"hubmerge {name}",
        description=help_text,
        epilog=f"{EXAMPLES}\n\nother commands:\n{others}" if name == "merge" else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hubmerge {__version__}")
    configure(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hubmerge`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and argv[0] in COMMANDS else "merge"
    args = build_parser(name).parse_args(argv)
    if getattr(args, "quiet", False):
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()  # the client's retry notices; errors still end in our one line
    try:
        return COMMANDS[name][2](args)
    except Interrupted as exc:  # its message already starts with "interrupted:" and says how to resume
        print(exc, file=sys.stderr)
        return exc.exit_code
    except HubmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # before anything was written (resolving, downloading: downloads resume by themselves)
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
