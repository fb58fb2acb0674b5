"""Is my GPU waiting for data? Three speeds of one recipe on this machine's device, the limit, and what to change.

    imgcls-doctor recipes/mnist.toml [section.key=value ...] [--steps 100] [--seconds 20] [--report PATH]
    python -m imgcls.doctor recipes/cifar10.toml data.workers=8          # the same, without the console script

Measures the recipe's model alone in a bare loop on the device, the input pipeline alone (no model) and the
trainer itself, each for --steps steps or --seconds, whichever comes first (imgcls/training/doctor.py); prints
the speeds in images/s, the ratio trainer / bare loop, the limit and advice with numbers, and writes a JSON
report (default: doctor_<recipe name>.json in the current folder). Nothing is written under the recipe's runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imgcls.errors import CheckpointError, DataError, NonFiniteLoss, PreflightError, RecipeError, ShardError
from imgcls.exitcodes import EXIT_USAGE
from imgcls.training.doctor import diagnose
from imgcls.training.doctor_advice import LIMITS


def summary(report: dict, path: Path) -> str:
    s, inp, tr = report["images_per_s"], report["input"], report["trainer"]
    on = report["gpu"] or f"cpu, {report['cores']} cores"
    lines = [
        f"imgcls-doctor {report['name']} on {report['device']} ({on}): precision {report['precision']}, "
        f"per-device batch {report['per_device_batch']}, channels_last {str(report['channels_last']).lower()}, "
        f"workers {report['workers']}, cache {report['cache']}, decode {report['decode']}",
        f"  bare loop (model alone)     {s['bare']:>10,.0f} images/s",
        f"  input pipeline (no model)   {s['input']:>10,.0f} images/s   (loader {inp['fetch_images_per_s']:,.0f}, "
        f"on the device {inp['prepare_images_per_s']:,.0f}; first batch after {inp['first_batch_s']:.1f} s)",
        f"  trainer                     {s['trainer']:>10,.0f} images/s   (waiting for data "
        f"{100 * report['data_wait_fraction']:.0f} % of the time, {tr['steps']} steps)",
        f"  trainer / bare loop         {report['ratio_trainer_bare']:>10.2f}",
        f"  limit: {LIMITS[report['limit']]}  (ms per image: " +
        ", ".join(f"{k} {v:.3f}" for k, v in report["ms_per_image"].items()) + ")",
        "  advice:"]
    lines += [f"    - {a['setting']}: {a['why']}" for a in report["advice"]]
    lines.append(f"  report: {path} ({report['total_s']:.0f} s)")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="imgcls-doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="recipe TOML file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides read as TOML, as in train")
    p.add_argument("--steps", type=int, default=100, help="steps per phase (default 100)")
    p.add_argument("--seconds", type=float, default=20.0, help="at most this long per phase (default 20)")
    p.add_argument("--report", type=Path, default=None,
                   help="JSON report path (default: doctor_<recipe name>.json in the current folder)")
    args = p.parse_intermixed_args(argv)
    if args.steps < 2 or args.seconds <= 0:
        p.error("--steps must be >= 2 and --seconds > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = diagnose(args.recipe, args.overrides, args.steps, args.seconds)
    except (RecipeError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (PreflightError, ShardError, NonFiniteLoss, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    path = args.report or Path(f"doctor_{report['name']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    print(summary(report, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
