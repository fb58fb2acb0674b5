"""Every problem imgcls-train would hit on a dataset, listed at once: broken images, rare classes, duplicates, sizes.

    imgcls-data check RECIPE|FOLDER [section.key=value ...] [--image-size H W] [--channels 1|3] [--json REPORT]

Finds, without stopping at the first: every unreadable image (with its error), class folders without images,
rare classes (fewer than 5 images, or in one split only), the readable images per class and split (after the
val carve a run does) with each split's imbalance (largest class / smallest class), exact duplicates by content
(sha256) within a split and across splits (train/test leakage), and images whose shorter side is far from the
working size's (read from their headers). Prints a one-screen summary with at most 10 examples of each kind;
--json REPORT writes all of it (every problem, every duplicate group, all counts).

Exit status 1 when imgcls-train would stop on this data (unreadable images or a class folder without images
with data.on_bad_image = "error", rare classes without data.allow_rare_classes, a split without images); 0
otherwise, even with warnings (duplicates, imbalance, sizes); 2 when the data cannot be indexed at all (no
such folder, a bad recipe). The summary's last line says which, and why.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from imgcls.atomic import write_text
from imgcls.errors import DataError
from imgcls.data.tools.target import add_target_arguments, data_config_of

if TYPE_CHECKING:
    from imgcls.data.tools.check_report import DuplicateGroup, Report, SplitCounts

SHOWN = 10           # examples of each kind of problem in the summary
TABLE_CLASSES = 20   # with more classes the summary gives each split's largest and smallest class, not a table
GROUP_SHOWN = 3      # images of one duplicate group in the summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target_arguments(p)
    p.add_argument("--json", metavar="REPORT", default=None,
                   help="also write the full report (every problem, every duplicate group, all counts) as JSON")


def run(args: argparse.Namespace) -> int:
    from imgcls.data.tools.check_report import build_report

    cfg = data_config_of(args)
    out = Path(args.json) if args.json else None
    if out is not None and out.is_dir():
        raise DataError(f"--json {out}: is a folder; give a file name, e.g. {out / 'check.json'}")
    report = build_report(cfg)
    if out is not None:
        write_json(out, report.to_json())
    print("\n".join(summary(report, args.json)))
    return report.exit_status


def write_json(path: Path, data: dict) -> None:
    """`data` as JSON at `path`, atomically: a reader sees the old file or the whole new one."""
    try:
        write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        raise DataError(f"--json {path}: cannot write the report ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- the summary
def summary(report: Report, json_path: str | None) -> list[str]:
    """The one-screen text: source, counts, each kind of problem with at most SHOWN examples, the verdict."""
    h, w = report.working_size
    lines = [f'data.source = "{report.source}": {report.location}; working size {w}x{h} (width x height)',
             *_counts(report)]
    more = f"all in {json_path}" if json_path else "--json REPORT lists them all"
    for title, examples in _sections(report):
        if examples:
            lines += ["", title, *examples[:SHOWN]]
            if len(examples) > SHOWN:
                lines.append(f"  ... and {len(examples) - SHOWN} more ({more})")
    return [*lines, "", verdict(report)]


def verdict(report: Report) -> str:
    if fatal := report.fatal():
        return f"exit 1: imgcls-train would stop on this data: {'; '.join(fatal)}"
    if warnings := report.warnings():
        return f"exit 0: imgcls-train would start on this data; warnings: {'; '.join(warnings)}"
    return "exit 0: imgcls-train would start on this data; no problems found"


def _ratio(s: SplitCounts) -> str:
    if not s.total:
        return "-"
    return "inf" if s.imbalance is None else f"{s.imbalance:.1f}x"


def _counts(report: Report) -> list[str]:
    from imgcls.data.tools.check_report import plural

    names, splits = report.class_names, report.splits
    carved = " (val carved from train)" if report.val_carved else ""
    lines = [f"{plural(len(names), 'class', 'classes')}; readable images: "
             f"{', '.join(f'{s.name} {s.total}' for s in splits)}{carved}"]
    if len(names) > TABLE_CLASSES:
        for s in splits:
            (big, n_big), (small, n_small) = s.extremes()
            lines.append(f"  {s.name}: largest {big!r} {n_big}, smallest {small!r} {n_small}, "
                         f"imbalance {_ratio(s)}")
        return lines
    first = max(len("imbalance"), *(len(c) for c in names))
    cols = [max(6, len(s.name)) for s in splits]

    def row(head: str, cells: list) -> str:
        return f"{head:<{first}}" + "".join(f"  {cell:>{col}}" for cell, col in zip(cells, cols))
    lines.append(row("class", [s.name for s in splits]))
    lines += [row(c, [s.counts[c] for s in splits]) for c in names]
    lines.append(row("imbalance", [_ratio(s) for s in splits]) + "  (largest class / smallest class)")
    return lines


def _group(g: DuplicateGroup) -> str:
    shown = " = ".join(f"{item.split} {item.image}" for item in g.images[:GROUP_SHOWN])
    rest = f" (+{len(g.images) - GROUP_SHOWN} more)" if len(g.images) > GROUP_SHOWN else ""
    labels = sorted({item.label for item in g.images})
    differ = f" (classes differ: {', '.join(labels)})" if len(labels) > 1 else ""
    return f"  {shown}{rest}{differ}"


def _sections(report: Report) -> Iterator[tuple[str, list[str]]]:
    """(title, one line per problem) for each kind of problem, in the order a run meets them."""
    from imgcls.data.labels import MIN_IMAGES_PER_CLASS, rare_class_line
    from imgcls.data.tools.check_report import DOWNSCALE_LIMIT, UPSCALE_LIMIT, plural

    consequence = "left out" if report.on_bad_image == "skip" else "imgcls-train stops"
    yield (f'unreadable images: {len(report.unreadable)} (data.on_bad_image = "{report.on_bad_image}": '
           f'{consequence})', [f"  {u.image}: {u.error}" for u in report.unreadable])
    yield (f"class folders without images: {len(report.empty_folders)} ({consequence})",
           [f"  {folder}" for folder in report.empty_folders])
    allowed = "true: trained with" if report.allow_rare_classes else "false: imgcls-train stops"
    yield (f"rare classes (fewer than {MIN_IMAGES_PER_CLASS} images, or in one split only): {len(report.rare)} "
           f"(data.allow_rare_classes = {allowed})",
           [rare_class_line(c, n, report.first_seen) for c, n in report.rare.items()])
    yield (f"splits without images: {len(report.unusable_splits)}",
           [f"  {split}: {why}" for split, why in report.unusable_splits.items()])
    across, within = report.duplicate_groups(True), report.duplicate_groups(False)
    yield (f"exact duplicates across splits (leakage: evaluated on images it trained on): "
           f"{plural(len(across), 'group')}", [_group(g) for g in across])
    yield f"exact duplicates within a split: {plural(len(within), 'group')}", [_group(g) for g in within]
    below, above = report.size_limits
    side = min(report.working_size)
    yield (f"images far below the working size: {len(report.too_small)} (shorter side under {below:g} px, "
           f"1/{UPSCALE_LIMIT} of {side}: upscaled a lot)",
           [f"  {s.image}: {s.width}x{s.height}" for s in report.too_small])
    yield (f"images far above the working size: {len(report.too_large)} (shorter side over {above} px, "
           f"{DOWNSCALE_LIMIT}x {side}: decoded at great cost, then shrunk)",
           [f"  {s.image}: {s.width}x{s.height}" for s in report.too_large])
