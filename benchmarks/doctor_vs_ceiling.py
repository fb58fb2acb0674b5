"""imgcls-doctor against benchmarks/ceiling.py, interleaved in one run; and a doctor's advice followed.

    HF_HUB_OFFLINE=1 python benchmarks/doctor_vs_ceiling.py recipes/mnist.toml [section.key=value ...]
        [--rounds 2] [--steps 150] [--threads N]
    HF_HUB_OFFLINE=1 python benchmarks/doctor_vs_ceiling.py --follow-advice RECIPE [section.key=value ...]

The first form measures, per round: ceiling.py's bare loop and trainer (each a fresh process, as ceiling.py
does), then `imgcls-doctor` with the same overrides, steps and threads (one process: its own bare loop, input
pipeline and trainer). It prints both ratios trainer / bare loop, their difference and the doctor's limit; the
doctor agrees with the reference when every round's difference is within 0.1. The second form runs the doctor,
applies its first advice that is one `section.key = value` (e.g. `data.workers = 1`) as an override, and runs it
again: the trainer's speed before and after. Writes benchmarks/out/doctor_vs_ceiling_<name>.json.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from ceiling import bare_loop_process, round_args, trainer, write_rounds

from imgcls.recipe import load_recipe

ONE_SETTING = re.compile(r"^([a-z_]+\.[a-z_.]+) = (\S+)$")


def doctor(recipe: str, overrides: list[str], steps: int, threads: int, report: Path) -> dict:
    cmd = [sys.executable, "-m", "imgcls.doctor", recipe, *overrides, f"train.cpu_threads={threads}", "--steps",
           str(steps), "--seconds", "60", "--report", str(report)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(report.read_text())


def compare(args, name: str, out: Path) -> list[dict]:
    rows = []
    for k in range(args.rounds):
        ceiling = bare_loop_process(args.recipe, args.overrides, args.steps, args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            speed, wait = trainer(args.recipe, args.overrides, args.steps, args.threads, Path(tmp))
        d = doctor(args.recipe, args.overrides, args.steps, args.threads, out / f"doctor_{name}_{k}.json")
        row = {"round": k, "ceiling": {"bare": ceiling, "trainer": speed, "ratio": speed / ceiling,
                                       "data_wait_fraction": wait},
               "doctor": {**d["images_per_s"], "ratio": d["ratio_trainer_bare"], "limit": d["limit"],
                          "data_wait_fraction": d["data_wait_fraction"]}}
        row["difference"] = row["doctor"]["ratio"] - row["ceiling"]["ratio"]
        rows.append(row)
        c, dd = row["ceiling"], row["doctor"]
        print(f"round {k}: ceiling.py bare {c['bare']:,.0f} trainer {c['trainer']:,.0f} ratio {c['ratio']:.2f} | "
              f"doctor bare {dd['bare']:,.0f} input {dd['input']:,.0f} trainer {dd['trainer']:,.0f} ratio "
              f"{dd['ratio']:.2f}, limit {dd['limit']} | difference {row['difference']:+.2f}", flush=True)
    worst = max(abs(r["difference"]) for r in rows)
    print(f"{name}: doctor vs ceiling.py ratio differences within {worst:.2f} over {args.rounds} rounds "
          f"({'within' if worst <= 0.1 else 'NOT within'} 0.1); {args.threads} threads, {args.steps} steps")
    return rows


def follow_advice(args, name: str, out: Path) -> list[dict]:
    before = doctor(args.recipe, args.overrides, args.steps, args.threads, out / f"doctor_{name}_before.json")
    settings = [m.groups() for a in before["advice"] if (m := ONE_SETTING.match(a["setting"]))]
    print(f"before: trainer {before['images_per_s']['trainer']:,.0f} images/s, limit {before['limit']}; advice: "
          + "; ".join(a["setting"] for a in before["advice"]))
    if not settings:
        print("no advice of the form section.key = value to follow")
        return [{"before": before}]
    key, value = settings[0]
    after = doctor(args.recipe, [*args.overrides, f"{key}={value}"], args.steps, args.threads,
                   out / f"doctor_{name}_after.json")
    gain = after["images_per_s"]["trainer"] / before["images_per_s"]["trainer"]
    print(f"after {key}={value}: trainer {after['images_per_s']['trainer']:,.0f} images/s (x{gain:.2f}), "
          f"limit {after['limit']}")
    return [{"before": before, "followed": f"{key}={value}", "after": after, "trainer_gain": gain}]


def main(argv=None) -> int:
    p = round_args(__doc__, steps=150)
    p.add_argument("--follow-advice", action="store_true", help="run the doctor, follow its advice, run it again")
    args = p.parse_intermixed_args(argv)
    name = load_recipe(args.recipe, args.overrides).name
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    rows = (follow_advice if args.follow_advice else compare)(args, name, out)
    write_rounds("doctor_vs_ceiling", name, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
