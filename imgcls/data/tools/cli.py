"""imgcls-data: tools for the data a recipe reads.

    imgcls-data mnist IDX_DIR OUT [--format png|jpg] [--lists]     MNIST IDX files -> train/val/test class folders
    imgcls-data check RECIPE|FOLDER [--json REPORT]                 every problem a training run would hit, at once
    imgcls-data stats RECIPE|FOLDER                                  per-channel mean/std, as TOML lines to paste
    imgcls-data shard RECIPE|FOLDER OUT --shard-size N              the splits as shards for data.source = "shards"

Each sub-command is one module of this package (`imgcls/data/tools/<name>.py`) with `add_arguments(parser)` and
`run(args) -> exit status`; heavy imports stay inside `run`, so `imgcls-data --help` is quick.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from imgcls.exitcodes import EXIT_USAGE
from imgcls.errors import DataError, RecipeError, ShardError

COMMANDS = ("mnist", "check", "stats", "shard")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgcls-data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"{__package__}.{name}")
        summary = module.__doc__.strip().split("\n")[0]
        module.add_arguments(sub.add_parser(name, help=summary, description=module.__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(f"{__package__}.{args.command}").run(args)
    except (RecipeError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ShardError as e:  # a shard that cannot be fetched or does not match its manifest
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
