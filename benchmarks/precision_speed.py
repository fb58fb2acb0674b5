"""bf16 autocast against fp32 for a recipe's own model: the bare loop of `ceiling.py` (one in-memory batch,
forward + backward + optimizer step), each in a fresh process, interleaved fp32, bf16, fp32, bf16.

    python benchmarks/precision_speed.py recipes/cifar10.toml [section.key=value ...] [--rounds 2] [--steps 20]

Prints both speeds per round and the ratio bf16 / fp32 (only ratios of the same round are compared: the machine
drifts). Writes benchmarks/out/precision_<name>.json. A CPU without AVX512-BF16/AMX emulates bf16: expect < 1.
"""
from __future__ import annotations

import sys

from ceiling import bare_loop_process, round_args, write_rounds

from imgcls.recipe import load_recipe


def main(argv=None) -> int:
    args = round_args(__doc__, steps=20).parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    rows = []
    for k in range(args.rounds):
        speed = {prec: bare_loop_process(args.recipe, [*args.overrides, f'train.mixed_precision="{prec}"'],
                                         args.steps, args.threads) for prec in ("no", "bf16")}
        rows.append({"round": k, "fp32": speed["no"], "bf16": speed["bf16"], "ratio": speed["bf16"] / speed["no"]})
        print(f"round {k}: fp32 {speed['no']:,.0f} images/s, bf16 {speed['bf16']:,.0f} images/s, ratio "
              f"{rows[-1]['ratio']:.2f}", flush=True)
    print(f"{recipe.name} ({recipe.model.name}, batch {recipe.train.global_batch_size}, channels_last "
          f"{recipe.train.channels_last}): bf16 / fp32 {min(r['ratio'] for r in rows):.2f}-"
          f"{max(r['ratio'] for r in rows):.2f} over {args.rounds} rounds, {args.threads} threads")
    write_rounds("precision", recipe.name, args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
