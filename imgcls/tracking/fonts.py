"""Fonts for labels the default matplotlib font cannot draw (CJK class names, other scripts).

matplotlib's default font, DejaVu Sans, has no Chinese, Japanese or Korean glyphs, so such class names come out
as empty boxes. `family_for(texts)` finds the characters the default font lacks and, among the installed fonts
(matplotlib.font_manager), fonts that have them, well-known CJK fonts first; the plots pass the result as
`fontfamily=`, and matplotlib (>= 3.6) takes each glyph from the first font in the list that has it. When no
installed font has some of them, one warning (per process) names the glyphs and how to install a font.

    family = family_for(class_names)            # None: the default font draws every character
    ax.set_xticks(range(n), class_names, fontfamily=family)
"""
from __future__ import annotations

import functools
import logging
from typing import Iterable

log = logging.getLogger(__name__)

PREFERRED = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR", "Noto Sans CJK HK",
             "Source Han Sans", "Source Han Sans SC", "Noto Sans SC", "Noto Sans JP", "Noto Sans KR",
             "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback", "AR PL UMing CN", "AR PL UKai CN",
             "IPAGothic", "IPAexGothic", "TakaoGothic", "NanumGothic", "UnDotum", "Microsoft YaHei", "SimHei",
             "Yu Gothic", "Meiryo", "Malgun Gothic", "PingFang SC", "Hiragino Sans", "Apple SD Gothic Neo",
             "Arial Unicode MS")
# matplotlib's "Last Resort" font maps every code point to a placeholder box: it draws nothing readable
NOT_A_FALLBACK = ("Last Resort",)
SHOWN = 12  # missing glyphs named in the warning
_warned = False


def _default_font() -> str:
    """Path of the font matplotlib uses for text by default (rcParams font.family, usually DejaVu Sans)."""
    from matplotlib import font_manager

    return font_manager.findfont(font_manager.FontProperties())


@functools.lru_cache(maxsize=None)
def _charmap(path: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(path).get_charmap())


def _installed() -> list[tuple[str, str]]:
    """(family name, file) of each installed font family, its upright regular face where there is one."""
    from matplotlib import font_manager

    best: dict[str, tuple[tuple, str]] = {}
    for entry in font_manager.fontManager.ttflist:
        weight = entry.weight if isinstance(entry.weight, int) else 400
        rank = (entry.style != "normal", abs(weight - 400), entry.fname)
        if entry.name not in best or rank < best[entry.name][0]:
            best[entry.name] = (rank, entry.fname)
    return [(name, fname) for name, (_, fname) in best.items()]


def _candidates() -> list[tuple[str, str]]:
    """Installed fonts to take missing glyphs from: the preferred CJK fonts in their order, then the rest by name."""
    fonts = [f for f in _installed() if not f[0].startswith(NOT_A_FALLBACK)]
    order = {name: i for i, name in enumerate(PREFERRED)}
    return sorted(fonts, key=lambda f: (order.get(f[0], len(order)), f[0]))


@functools.lru_cache(maxsize=256)
def fallback_fonts(missing: frozenset[str]) -> tuple[tuple[str, ...], frozenset[str]]:
    """Font families that together have the `missing` characters (each added only if it has one still
    missing), and the characters none of them has."""
    chosen, left = [], set(missing)
    for name, path in _candidates():
        if not left:
            break
        has = {c for c in left if ord(c) in _charmap(path)}
        if has:
            chosen.append(name)
            left -= has
    return tuple(chosen), frozenset(left)


def family_for(texts: Iterable[str]) -> list[str] | None:
    """A `fontfamily` list (the default families, then fonts with the glyphs they lack) for these texts, or None
    when the default font has every glyph, or no installed font has any missing one."""
    from matplotlib import rcParams

    default = _charmap(_default_font())
    missing = frozenset(c for text in texts for c in str(text) if ord(c) not in default and not c.isspace())
    if not missing:
        return None
    chosen, unavailable = fallback_fonts(missing)
    if unavailable:
        _warn_once(unavailable)
    return [*rcParams["font.family"], *chosen] if chosen else None


def _warn_once(glyphs: frozenset[str]) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    import matplotlib

    shown = ", ".join(f"{c} (U+{ord(c):04X})" for c in sorted(glyphs)[:SHOWN])
    more = f" and {len(glyphs) - SHOWN} more" if len(glyphs) > SHOWN else ""
    log.warning("plots: no installed font has the glyphs %s%s of these labels, so matplotlib draws them as empty "
                "boxes; install a font that has them (for Chinese, Japanese or Korean names a CJK font, e.g. "
                "`apt-get install fonts-noto-cjk`), then delete matplotlib's font cache (%s/fontlist-*.json) so "
                "that it finds the new font", shown, more, matplotlib.get_cachedir())
