"""Train an image classifier from a TOML recipe.

    accelerate launch -m imgcls.train recipes/mnist.toml [section.key=value ...] [--resume auto|RUN] [--dry-run]
    python -m imgcls.train recipes/mnist.toml train.epochs=1          # one process, no launcher needed
    python -m imgcls.train --resume runs/mnist/20261123-101500        # continue that run with its own recipe

Argument parsing and one call: `imgcls.training.trainer.train` (the Trainer and its parts live there).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgcls.errors import CheckpointError, DataError, NonFiniteLoss, PreflightError, RecipeError, ShardError
from imgcls.exitcodes import EXIT_PREEMPTED, EXIT_USAGE  # noqa: F401 (EXIT_PREEMPTED: for callers of main)
from imgcls.training.runinfo import load_run_recipe
from imgcls.training.trainer import Trainer, plan_text, train  # noqa: F401 (the Python API: imgcls.train.train(recipe))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="imgcls-train", description=__doc__.split("\n\n")[0])
    p.add_argument("words", nargs="*", metavar="[RECIPE] [section.key=value ...]",
                   help="recipe TOML file (optional with --resume RUN), then overrides read as TOML, "
                        "e.g. train.epochs=3")
    p.add_argument("--resume", default="", help="a run folder or checkpoint (without a RECIPE, the run's own "
                                                "recipe.toml is used; with one, it is checked against the run), or "
                                                "'auto' (newest complete checkpoint of the RECIPE's runs)")
    p.add_argument("--dry-run", action="store_true", help="build data and model, print the plan, train nothing")
    args = p.parse_intermixed_args(argv)
    first = args.words[0] if args.words else ""
    is_recipe = bool(first) and ("=" not in first or Path(first).is_file())
    args.recipe, args.overrides = (first, args.words[1:]) if is_recipe else ("", args.words)
    if not args.recipe and (not args.resume or args.resume == "auto"):
        p.error("a recipe file is needed (only --resume RUN_FOLDER can do without one: it uses the run's recipe)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_run_recipe(args.recipe, args.overrides, args.resume)
        if args.dry_run:
            text = plan_text(recipe)
            if text is not None:
                print(text)
            return 0
        return train(recipe, resume=args.resume)
    except (RecipeError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (PreflightError, ShardError, NonFiniteLoss, CheckpointError) as e:  # the environment, not the recipe
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the loop's own handler is installed: nothing was trained or saved
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
