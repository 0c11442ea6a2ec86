"""The `lutengine` command line."""
from __future__ import annotations

import argparse
import sys

from models import catalog


def _cmd_pull(args: argparse.Namespace) -> int:
    path = catalog.pull(args.name, progress=not args.quiet)
    size = path.stat().st_size
    print(f"{args.name}: {path} ({size:,} bytes, {size / 2**20:.1f} MiB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lutengine", description="CPU inference for 1-4 bit LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    known = "\n".join(f"  {m.name:30} {m.description}" for m in catalog.CATALOG.values())
    pull = sub.add_parser("pull", help="download a catalog model into the cache and verify it",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          description=f"Catalog models:\n{known}")
    pull.add_argument("name", nargs="?", default=catalog.DEFAULT, metavar="NAME",
                      help=f"catalog name (default: {catalog.DEFAULT})")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    pull.set_defaults(func=_cmd_pull)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except catalog.CatalogError as e:
        print(f"lutengine: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lutengine: interrupted", file=sys.stderr)
        return 130
