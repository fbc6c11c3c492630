"""``python -m benchmarks [bench options]``: the same as ``inferq bench``."""

from __future__ import annotations

import argparse
import logging
import sys

from inferq.benchmarks.cli import add_parser
from inferq.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--config", help="TOML settings file (default: built-in defaults, INFERQ_* overrides)")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    head = argv[:2] if argv[:1] == ["--config"] else []
    rest = argv[len(head):]
    if not rest or rest[0] not in ("bench", "-h", "--help"):
        rest = ["bench", *rest]
    argv = head + rest
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(Settings.load(args.config), args)


if __name__ == "__main__":
    sys.exit(main())
