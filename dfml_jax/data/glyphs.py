"""Glyphs: an Omniglot-style few-shot benchmark rendered offline from matplotlib's bundled fonts.

* **Fonts**: every TrueType font in ``matplotlib/mpl-data/fonts/ttf`` (DejaVu Sans/Serif/Mono with
  their bold and oblique faces, STIX General, Computer Modern) except the LastResort fallback font
  (it draws placeholder boxes) and the symbol fonts ``cmex10``/``cmsy10`` (their character maps
  send letters to delimiters and math symbols).
* **Classes**: Unicode letters (categories Lu, Ll, Lo) with no decomposition (no accented or
  compatibility variants) that at least ``min_fonts`` (4) fonts cover, according to the fonts'
  character maps. Glyphs that render identically across scripts (Latin A, Greek Alpha, Cyrillic A)
  are merged: each class is rendered once in a reference font, and later duplicates (script
  priority: Latin, Greek, Cyrillic, then the rest) are dropped.
* **Alphabets** are Unicode scripts (from the character names). Meta-train / meta-validation /
  meta-test splits are disjoint by alphabet and fixed (:data:`SPLIT_ALPHABETS`):

  - train: Latin, Canadian syllabics, Arabic, Lisu, Hebrew, Old Italic;
  - validation: Greek, Armenian, Lao, Coptic;
  - test: Cyrillic, Georgian.

* **Instances**: 20 per class. Instance i uses the i-th covering font (cycling), plus seeded
  random stroke thickening, rotation (+-12 deg), scale (0.85-1.1), shear (+-0.2) and translation
  (+-6% of the side), rendered white-on-black, centred, at ``image_size`` (28 by default; 32 and
  84 available) with 1 channel (3 on request, replicated).

Building takes seconds and is cached on disk as ``.npz`` (uint8), keyed by every build parameter;
loading from the cache takes well under a second.
"""
from __future__ import annotations

import hashlib
import os
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .core import ClassDataset

__all__ = ["build_glyphs", "load_glyphs", "glyph_splits", "SPLIT_ALPHABETS", "cache_dir",
           "font_paths", "GLYPHS_VERSION"]

GLYPHS_VERSION = 1
SPLIT_ALPHABETS: Dict[str, Tuple[str, ...]] = {
    "train": ("Latin", "Canadian syllabics", "Arabic", "Lisu", "Hebrew", "Old Italic"),
    "validation": ("Greek", "Armenian", "Lao", "Coptic"),
    "test": ("Cyrillic", "Georgian"),
}
_EXCLUDED_FONTS = ("LastResort", "cmex10", "cmsy10")
_SCRIPT_PRIORITY = ("Latin", "Greek", "Cyrillic")
_RENDER = 96  # glyphs are drawn at this resolution, then transformed and downsampled


def cache_dir(path: Optional[str] = None) -> str:
    """The cache directory: ``path``, else ``$DFML_JAX_CACHE``, else ``~/.cache/dfml_jax``."""
    d = path or os.environ.get("DFML_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dfml_jax")
    os.makedirs(d, exist_ok=True)
    return d


def font_paths() -> List[str]:
    """Paths of the fonts used to render Glyphs (sorted, stable across machines)."""
    import matplotlib

    d = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    return [os.path.join(d, f) for f in sorted(os.listdir(d))
            if f.endswith(".ttf") and not f.startswith(_EXCLUDED_FONTS)]


def _script(cp: int) -> str:
    name = unicodedata.name(chr(cp), "")
    words = name.split(" ")
    if words[0] == "CANADIAN":
        return "Canadian syllabics"
    if words[0] == "OLD" and len(words) > 1:
        return "Old " + words[1].title()
    if words[0] in ("TURNED", "ROMAN"):  # letterlike symbols built from Latin letters
        return "Latin"
    return words[0].title()


def _candidates(min_fonts: int):
    from fontTools.ttLib import TTFont

    paths = font_paths()
    cover = []
    for p in paths:
        cmap = TTFont(p, lazy=True).getBestCmap() or {}
        cover.append(set(cmap))
    counts: Dict[int, List[int]] = {}
    for fi, cps in enumerate(cover):
        for cp in cps:
            ch = chr(cp)
            if unicodedata.category(ch) in ("Lu", "Ll", "Lo") and unicodedata.decomposition(ch) == "":
                counts.setdefault(cp, []).append(fi)
    chars = sorted(cp for cp, f in counts.items() if len(f) >= min_fonts)
    return paths, {cp: counts[cp] for cp in chars}


def _draw(font, ch: str, stroke: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("L", (2 * _RENDER, 2 * _RENDER), 0)
    ImageDraw.Draw(img).text((_RENDER // 2, _RENDER // 2), ch, fill=255, font=font,
                             stroke_width=stroke, stroke_fill=255)
    return np.asarray(img)


def _fit(canvas: np.ndarray, size: int, rng: Optional[np.random.Generator]) -> np.ndarray:
    """Crop the ink, apply the affine jitter, centre in a square, downsample to ``size``."""
    from PIL import Image

    ys, xs = np.nonzero(canvas > 16)
    if len(ys) == 0:
        return np.zeros((size, size), np.uint8)
    crop = canvas[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    side = int(max(h, w) / 0.8) + 2  # glyph spans 80% of the side
    sq = np.zeros((side, side), np.uint8)
    oy, ox = (side - h) // 2, (side - w) // 2
    sq[oy:oy + h, ox:ox + w] = crop
    img = Image.fromarray(sq)
    if rng is not None:
        ang = np.deg2rad(rng.uniform(-12, 12))
        scale = rng.uniform(0.85, 1.1)
        shear = rng.uniform(-0.2, 0.2)
        tx, ty = rng.uniform(-0.06, 0.06, size=2) * side
        c, s = np.cos(ang), np.sin(ang)
        fwd = np.array([[c, -s], [s, c]]) @ np.array([[1, shear], [0, 1]]) * scale
        inv = np.linalg.inv(fwd)
        ctr = np.array([side / 2, side / 2])
        off = ctr - inv @ (ctr + np.array([tx, ty]))
        img = img.transform((side, side), Image.AFFINE,
                            data=(inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1]),
                            resample=Image.BILINEAR)
    return np.asarray(img.resize((size, size), Image.LANCZOS))


def build_glyphs(image_size: int = 28, *, seed: int = 0, per_class: int = 20, min_fonts: int = 4,
                 max_classes: Optional[int] = None, progress: bool = True) -> dict:
    """Renders the Glyphs benchmark (no cache; see :func:`load_glyphs`).

    Args:
      image_size: output side (28, 32, 84...).
      seed: seed of the per-instance jitter.
      per_class: instances per class.
      min_fonts: minimum number of fonts covering a letter.
      max_classes: keep only the first classes of each alphabet, proportionally (tests).
      progress: show a tqdm bar.

    Returns:
      dict with ``images`` uint8 ``(classes, per_class, size, size)``, ``codepoints``, ``names``,
      ``alphabets``, ``split`` (``train``/``validation``/``test`` per class).
    """
    from PIL import ImageFont
    from tqdm.auto import tqdm

    paths, chars = _candidates(min_fonts)
    fonts: Dict[Tuple[int, int], object] = {}

    def font(fi: int, px: int = 64):
        if (fi, px) not in fonts:
            fonts[(fi, px)] = ImageFont.truetype(paths[fi], px)
        return fonts[(fi, px)]

    # De-duplicate identical renderings across scripts, in script priority order.
    prio = {s: i for i, s in enumerate(_SCRIPT_PRIORITY)}
    order = sorted(chars, key=lambda cp: (prio.get(_script(cp), len(prio)), cp))
    ref_font = {cp: min(chars[cp], key=lambda fi: (os.path.basename(paths[fi]) != "DejaVuSans.ttf", fi))
                for cp in order}
    seen, keep = set(), []
    for cp in order:
        canon = _fit(_draw(font(ref_font[cp]), chr(cp), 0), 32, None)
        if canon.max() == 0:
            continue  # the font claims the letter but draws nothing
        key = (os.path.basename(paths[ref_font[cp]]), hashlib.sha1((canon > 127).tobytes()).hexdigest())
        if key in seen:
            continue
        seen.add(key)
        keep.append(cp)
    keep.sort()
    split_of = {a: s for s, alphas in SPLIT_ALPHABETS.items() for a in alphas}
    keep = [cp for cp in keep if _script(cp) in split_of]
    if max_classes is not None:
        per_script: Dict[str, List[int]] = {}
        for cp in keep:
            per_script.setdefault(_script(cp), []).append(cp)
        frac = max_classes / len(keep)
        keep = sorted(cp for cps in per_script.values() for cp in cps[:max(1, int(round(len(cps) * frac)))])

    images = np.zeros((len(keep), per_class, image_size, image_size), np.uint8)
    for ci, cp in enumerate(tqdm(keep, desc=f"rendering glyphs {image_size}px", disable=not progress)):
        rng = np.random.default_rng([seed, cp])
        covering = chars[cp]
        start = int(rng.integers(len(covering)))
        for i in range(per_class):
            fi = covering[(start + i) % len(covering)]
            stroke = int(rng.integers(0, 3))
            images[ci, i] = _fit(_draw(font(fi), chr(cp), stroke), image_size, rng)
    alphabets = [_script(cp) for cp in keep]
    return {"images": images, "codepoints": np.asarray(keep, np.int32),
            "names": np.asarray([unicodedata.name(chr(cp)) for cp in keep]),
            "alphabets": np.asarray(alphabets), "split": np.asarray([split_of[a] for a in alphabets]),
            "fonts": np.asarray([os.path.basename(p) for p in paths])}


def _cache_file(image_size, seed, per_class, min_fonts, max_classes, directory) -> str:
    tag = f"glyphs_v{GLYPHS_VERSION}_s{image_size}_seed{seed}_n{per_class}_f{min_fonts}"
    if max_classes is not None:
        tag += f"_max{max_classes}"
    return os.path.join(cache_dir(directory), tag + ".npz")


def load_glyphs(image_size: int = 28, *, seed: int = 0, per_class: int = 20, min_fonts: int = 4,
                max_classes: Optional[int] = None, cache_dir: Optional[str] = None,
                progress: bool = True) -> dict:
    """Glyphs from the on-disk cache, building (and caching) it on first use.

    Args: as :func:`build_glyphs`, plus ``cache_dir`` (default ``$DFML_JAX_CACHE`` or
      ``~/.cache/dfml_jax``).

    Returns:
      The dict of :func:`build_glyphs`.
    """
    path = _cache_file(image_size, seed, per_class, min_fonts, max_classes, cache_dir)
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    data = build_glyphs(image_size, seed=seed, per_class=per_class, min_fonts=min_fonts,
                        max_classes=max_classes, progress=progress)
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez(tmp, **data)
    os.replace(tmp, path)  # atomic: a killed build never leaves a half-written cache
    return data


def glyph_splits(image_size: int = 28, channels: int = 1, **kw) -> Tuple[ClassDataset, ...]:
    """Glyphs as ``(train, validation, test)`` :class:`ClassDataset` s (disjoint alphabets)."""
    if channels not in (1, 3):
        raise ValueError(f"glyphs: channels must be 1 or 3, got {channels}")
    data = load_glyphs(image_size, **kw)
    out = []
    for split in ("train", "validation", "test"):
        m = data["split"] == split
        imgs = data["images"][m][..., None]
        if channels == 3:
            imgs = np.repeat(imgs, 3, axis=-1)
        names = [f"{n} (U+{cp:04X})" for n, cp in zip(data["names"][m], data["codepoints"][m])]
        out.append(ClassDataset(imgs, names, list(data["alphabets"][m]), name=f"glyphs/{split}"))
    return tuple(out)
