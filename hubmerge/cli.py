"""Command line: argument parsing, progress and messages only; every step is a call into the public API.

``hubmerge ADAPTER [ADAPTER ...] --base BASE`` merges (the ``merge`` subcommand is implied); other subcommands are
listed by ``hubmerge --help``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .errors import HubmergeError
from .pipeline import merge, plan_merge
from .write import FORMATS

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: ``configure`` adds its arguments, the decorated function runs it."""
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (help_text, configure, run)
        return run
    return register


def _formats(value: str) -> list[str]:
    formats = [f.strip() for f in value.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise argparse.ArgumentTypeError(f"unknown format {','.join(bad) or value!r}; choose from {', '.join(FORMATS)}")
    return formats


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapters", nargs="+", metavar="ADAPTER",
                   help="LoRA adapter folder or Hub ID (org/name[@revision]); several apply in the order given")
    p.add_argument("--base", required=True, help="base model: HF-format folder or Hub ID")
    p.add_argument("--out", help="output folder (default: ./<last adapter name>-merged)")
    p.add_argument("--format", dest="formats", type=_formats, default=["hf"],
                   help="hf, pth or hf,pth (default: hf); with several, each goes to OUT/<format>/")
    p.add_argument("--dtype", help="output dtype: float16, bfloat16 or float32 (default: the base's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest HF safetensors shard (default: 5GB)")
    p.add_argument("--pth-shards", type=int, help="pth model-parallel shards (default: by model size, 7B=1 ... 65B=8)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the plan; write nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary, only errors")


@command("merge", "merge adapters into a base (the default command)", _merge_args)
def _run_merge(args: argparse.Namespace) -> int:
    say = (lambda *_: None) if args.quiet else print
    if args.dry_run:
        plan = plan_merge(args.adapters, args.base, dtype=args.dtype)
        for line in plan.describe():
            print(line)
        return 0
    result = merge(args.adapters, args.base, args.out, formats=args.formats, dtype=args.dtype,
                   max_shard_size=args.max_shard_size, pth_shards=args.pth_shards, overwrite=args.overwrite,
                   progress=not args.quiet)
    for w in result.plan.warnings:
        say(f"warning: {w}")
    for line in result.summary():
        say(line)
    return 0


def build_parser(name: str) -> argparse.ArgumentParser:
    help_text, configure, _ = COMMANDS[name]
    others = "\n".join(f"  hubmerge {n:<8} {h}" for n, (h, _, _) in COMMANDS.items() if n != "merge")
    parser = argparse.ArgumentParser(
        prog="hubmerge" if name == "merge" else f"hubmerge {name}", description=help_text,
        epilog=f"other commands:\n{others}" if name == "merge" else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hubmerge`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and argv[0] in COMMANDS else "merge"
    args = build_parser(name).parse_args(argv)
    try:
        return COMMANDS[name][2](args)
    except HubmergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: stopped cleanly, nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
