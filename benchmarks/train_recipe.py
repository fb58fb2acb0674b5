"""Time-to-accuracy of a shipped recipe: train it as a user would, then print the README's results row.

    HF_HUB_OFFLINE=1 python benchmarks/train_recipe.py recipes/mnist.toml [--config_file CFG] [section.key=value ...]

Runs `accelerate launch -m imgcls.train RECIPE ...` in a fresh run directory, measures the wall time of the
whole command (start-up, data loading, training, evaluation, calibration), and prints one markdown row from the
run's results.json and env.json. Writes the row and the numbers to benchmarks/out/<name>.json.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from imgcls.recipe import load_recipe


def main(argv: list[str]) -> int:
    recipe_path, overrides = argv[0], argv[1:]
    launch = []
    if "--config_file" in overrides:  # an accelerate config: hardware for `accelerate launch`
        at = overrides.index("--config_file")
        launch, overrides = overrides[at:at + 2], overrides[:at] + overrides[at + 2:]
    recipe = load_recipe(recipe_path, overrides)
    runs = Path(recipe.checkpoint.output_dir) / recipe.name
    before = set(runs.iterdir()) if runs.is_dir() else set()
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "imgcls.train", recipe_path, *overrides]
    code = subprocess.call(cmd)
    wall = time.perf_counter() - start
    if code:
        print(f"training failed with exit code {code}", file=sys.stderr)
        return code
    (run,) = set(runs.iterdir()) - before
    results = json.loads((run / "results.json").read_text())
    env = json.loads((run / "env.json").read_text())
    row = (f"| `{recipe_path}` | {recipe.train.epochs}, seed {recipe.seed} | {results['val']['top1']:.2%} | "
           f"**{results['test']['top1']:.2%}** | {wall / 60:.1f} min | {env['world_size']} x {env['device']}, "
           f"{env['torch_threads']} threads, {env['mixed_precision']} |")
    print(row)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / f"{recipe.name}.json").write_text(json.dumps({"row": row, "wall_s": wall, "results": results,
                                                         "env": env}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
