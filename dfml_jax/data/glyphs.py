"""Glyphs: an Omniglot-style few-shot benchmark rendered offline from matplotlib's bundled fonts.

* **Fonts**: every TrueType font in ``matplotlib/mpl-data/fonts/ttf`` (DejaVu Sans/Serif/Mono with
  their bold and oblique faces, STIX General, Computer Modern) except :data:`EXCLUDED_FONTS`: the
  LastResort fallback font (it draws placeholder boxes) and the symbol fonts ``cmex10``/``cmsy10``
  (their character maps send letters to delimiters and math symbols).
* **Classes**: Unicode letters (categories Lu, Ll, Lo) with no decomposition (no accented,
  compatibility or presentation-form variants) that at least ``min_fonts`` (4) fonts draw (a
  non-empty outline, checked on a reference render, not only the character map).
* **Alphabets** are Unicode scripts (``fontTools.unicodedata.script``; "Canadian Aboriginal" is
  called "Canadian syllabics"). Meta-train / meta-validation / meta-test splits are disjoint by
  alphabet and fixed (:data:`SPLIT_ALPHABETS`):

  - train: Latin, Canadian syllabics, Arabic, Lisu, Hebrew, Old Italic;
  - validation: Greek, Armenian, Lao, Coptic;
  - test: Cyrillic, Georgian.

  With matplotlib 3.11's fonts this gives 1,481 classes: 951 / 183 / 347 (see
  ``experiments/build_glyphs.py``, which prints the counts per split and alphabet).
* **De-duplication**: letters that render identically (Latin A, Greek Alpha, Cyrillic A, Lisu A;
  Latin u and Armenian seh...) are merged. Two letters are duplicates when their reference renders
  (32 px, no jitter) differ by more than half the intensity in at most :data:`DEDUP_MAX_PIXELS`
  (2) of the 1,024 pixels in *every* font that draws both (a missing dot, as Arabic tah / zah,
  already differs in 4 or more); groups are closed transitively and
  represented by their first member in script priority (Latin, Greek, Cyrillic, then the others)
  then code-point order; the merged code points are kept in ``aliases``.
* **Instances**: ``per_class`` (20) per class. Instance ``i`` of a letter drawn by fonts
  ``f_0..f_{n-1}`` uses font ``f[perm[i % n]]`` (``perm`` a seeded permutation), plus seeded random
  jitter: rotation (+-12 deg), scale (0.85-1.1), shear (+-0.15), translation (+-6% of the side)
  and stroke thickness (thinner unless that would erase hairlines, normal or bolder). Glyphs are
  white (255) on black, centred on their bounding box at a fixed em size (the side: capitals span
  about 70% of it), so lower-case letters stay smaller than capitals (``x`` and ``X`` remain
  distinguishable); a glyph wider or taller than 80% of the side is shrunk to fit. Rendering is
  supersampled (at least 2x, 112 px or more) and box-downsampled. Sizes: 28 by default, 32 and 84
  available (any size >= 8 works); 1 channel, or 3 replicated.
* **Determinism**: every instance has its own ``numpy`` generator seeded with
  ``(seed, code point, instance)``; the result depends only on the build parameters and the
  font files.

Building takes about half a minute at 28 px on one core and is cached on disk as an uncompressed
``.npz`` (uint8); loading it takes a few tens of milliseconds. The cache describes itself
(:func:`cache_key`): its key covers every build parameter, every rendering and selection constant,
the renderer version (:data:`GLYPHS_VERSION`) and a digest of the rendering code, the SHA-256 of
every font file's bytes, and the versions of the libraries that rasterise, parse and classify the
letters (Pillow and its FreeType, matplotlib and its FreeType, fontTools, Python's Unicode
database, NumPy). The file name is a readable prefix plus a short hash of the key
(:func:`cache_file`); the full key is stored in the file and checked on load, so a changed input
never reuses stale data.
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .core import ClassDataset
# Private aliases: the names the hashed functions used when the cache key was defined (their
# syntax trees are part of it, see cache_key).
from .digests import canonical_json as _canonical
from .digests import code_digest as _code_digest
from .digests import digest_key as _digest_key
from .digests import font_hashes as _font_hashes
from .digests import fonts_digest as _fonts_digest
from .digests import key_differences as _key_differences

__all__ = ["build_glyphs", "load_glyphs", "glyph_splits", "glyph_split_counts", "render_glyph",
           "SPLIT_ALPHABETS", "cache_dir", "cache_file", "cache_key", "cache_key_digest",
           "font_paths", "GLYPHS_VERSION"]

#: Renderer version, part of the cache key: bump it for any change of the rendered content that the
#: key would not otherwise see (the key already covers the parameters, the constants below, the
#: rendering code's syntax tree, the font bytes and the library versions).
#: v2: size-preserving rendering, tolerance-based cross-font de-duplication.
GLYPHS_VERSION = 2
SPLIT_ALPHABETS: Dict[str, Tuple[str, ...]] = {
    "train": ("Latin", "Canadian syllabics", "Arabic", "Lisu", "Hebrew", "Old Italic"),
    "validation": ("Greek", "Armenian", "Lao", "Coptic"),
    "test": ("Cyrillic", "Georgian"),
}
EXCLUDED_FONTS = ("LastResort", "cmex10", "cmsy10")  # file-name prefixes
DEDUP_MAX_PIXELS = 2  # renders differing in at most this many pixels (by > 1/2) are identical
REFERENCE_SIZE = 32
_DEDUP_PREFILTER = 0.1
_SCRIPT_PRIORITY = ("Latin", "Greek", "Cyrillic")
_SCRIPT_RENAME = {"Canadian Aboriginal": "Canadian syllabics"}

# Rendering and jitter parameters (see the module docstring).
_EM_FRACTION = 1.0
_FIT_FRACTION = 0.80
_ROTATION_DEG = 12.0
_SCALE_RANGE = (0.85, 1.10)
_SHEAR = 0.15
_TRANSLATION = 0.06
_STROKE_LEVELS = (-1, 0, 0, 1, 2)  # in units of canvas/112 px; negative = erosion
_MIN_INK = 8.0  # total ink (in full-intensity pixels) below which a reference render is empty
_SUPERSAMPLE_PX = 112  # render on a canvas of at least this side (and at least 2x), then reduce
_SRC_PAD = 2  # margin (px) around a glyph's box on its source canvas
_MIN_EM = 4  # smallest font size (px) asked of FreeType
_THIN_KEEP = 0.5  # thinning is kept only if it leaves at least this fraction of the ink


def _resolve_cache_dir(path: Optional[str] = None) -> str:
    d = path or os.environ.get("DFML_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dfml_jax")
    d = os.path.expanduser(d)
    os.makedirs(d, exist_ok=True)
    return d


def cache_dir(path: Optional[str] = None) -> str:
    """The cache directory (created if needed).

    Args:
      path: explicit directory; else ``$DFML_JAX_CACHE``; else ``~/.cache/dfml_jax``.

    Returns:
      The directory path.
    """
    return _resolve_cache_dir(path)


def font_paths() -> List[str]:
    """Paths of the fonts used to render Glyphs (sorted by file name, stable across machines)."""
    import matplotlib

    d = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    paths = [os.path.join(d, f) for f in sorted(os.listdir(d))
             if f.endswith(".ttf") and not f.startswith(EXCLUDED_FONTS)]
    if not paths:
        raise FileNotFoundError(f"no usable TrueType font in {d}; is matplotlib installed completely?")
    return paths


def _script(cp: int) -> str:
    from fontTools import unicodedata as fud

    name = fud.script_name(fud.script(chr(cp)))
    return _SCRIPT_RENAME.get(name, name)


def _is_letter(cp: int) -> bool:
    ch = chr(cp)
    return unicodedata.category(ch) in ("Lu", "Ll", "Lo") and unicodedata.decomposition(ch) == ""


# ----------------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=512)
def _font(path: str, em: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, em, layout_engine=ImageFont.Layout.BASIC)


def _jitter(rng: np.random.Generator) -> Tuple[float, float, float, float, float, int]:
    """(rotation deg, scale, shear, tx, ty (fractions of the side), stroke level)."""
    lo, hi = _SCALE_RANGE
    return (float(rng.uniform(-_ROTATION_DEG, _ROTATION_DEG)),
            float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
            float(rng.uniform(-_SHEAR, _SHEAR)),
            float(rng.uniform(-_TRANSLATION, _TRANSLATION)),
            float(rng.uniform(-_TRANSLATION, _TRANSLATION)),
            int(rng.choice(_STROKE_LEVELS)))


def render_glyph(font_path: str, codepoint: int, image_size: int,
                 jitter: Sequence[float] = (0.0, 1.0, 0.0, 0.0, 0.0, 0)) -> np.ndarray:
    """Renders one letter, centred on its bounding box, with optional affine and stroke jitter.

    Args:
      font_path: a TrueType file.
      codepoint: the Unicode code point to draw.
      image_size: output side ``S``.
      jitter: ``(rotation_deg, scale, shear, tx, ty, stroke)``; translations are fractions of the
        side, ``stroke`` a thickness level (negative thins). Identity by default.

    Returns:
      uint8 ``(S, S)`` image, ink 255 on a 0 background.
    """
    from PIL import Image, ImageDraw, ImageFilter

    rot, scale, shear, tx, ty, stroke = jitter
    ss = max(2, math.ceil(_SUPERSAMPLE_PX / image_size))  # supersampling factor
    canvas = image_size * ss
    font = _font(font_path, max(_MIN_EM, round(_EM_FRACTION * canvas)))
    ch = chr(codepoint)
    stroke_px = int(round(stroke * canvas / _SUPERSAMPLE_PX))
    grow = max(stroke_px, 0)
    l0, t0, r0, b0 = font.getbbox(ch)
    w0, h0 = max(r0 - l0, 1), max(b0 - t0, 1)
    fit = min(1.0, _FIT_FRACTION * canvas / max(w0, h0))
    pad = _SRC_PAD + grow
    src = Image.new("L", (w0 + 2 * pad, h0 + 2 * pad), 0)
    ImageDraw.Draw(src).text((pad - l0, pad - t0), ch, font=font, fill=255, stroke_width=grow,
                             stroke_fill=255)
    if stroke_px < 0:  # thinning, unless it would erase hairlines (less than half the ink left)
        thin = src.filter(ImageFilter.MinFilter(2 * (-stroke_px) + 1))
        if np.asarray(thin, np.float32).sum() >= _THIN_KEEP * np.asarray(src, np.float32).sum():
            src = thin
    gx, gy = pad + w0 / 2.0, pad + h0 / 2.0
    th = math.radians(rot)
    fwd = (np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
           @ np.array([[1.0, shear], [0.0, 1.0]]) * (scale * fit))
    inv = np.linalg.inv(fwd)
    cx, cy = canvas / 2.0 + tx * canvas, canvas / 2.0 + ty * canvas
    data = (inv[0, 0], inv[0, 1], gx - inv[0, 0] * cx - inv[0, 1] * cy,
            inv[1, 0], inv[1, 1], gy - inv[1, 0] * cx - inv[1, 1] * cy)
    out = src.transform((canvas, canvas), Image.Transform.AFFINE, data,
                        resample=Image.Resampling.BILINEAR, fillcolor=0)
    return np.asarray(out.reduce(ss), np.uint8)


# ----------------------------------------------------------------------------- class selection


@functools.lru_cache(maxsize=4)
def _select(paths: Tuple[str, ...], min_fonts: int, fonts_digest: str = ""):
    """Letters drawn by >= ``min_fonts`` fonts, de-duplicated (memoised: a pure function of the
    font files, independent of image size and seed).

    Args:
      paths: the font files.
      min_fonts: minimum number of fonts drawing a letter.
      fonts_digest: digest of the fonts' bytes (memo key only: edited font files are re-read).

    Returns:
      ``(codepoints, fonts, aliases)``: kept code points (sorted), the font indices drawing each,
      and the code points merged into each.
    """
    from matplotlib import ft2font

    del fonts_digest  # memo key only
    cover: Dict[int, List[int]] = {}
    for fi, p in enumerate(paths):
        for cp, gid in ft2font.FT2Font(p).get_charmap().items():
            if gid != 0 and _is_letter(cp):
                cover.setdefault(cp, []).append(fi)
    refs: Dict[Tuple[int, int], np.ndarray] = {}
    drawn: Dict[int, List[int]] = {}
    for cp in sorted(c for c, f in cover.items() if len(f) >= min_fonts):
        for fi in cover[cp]:
            img = render_glyph(paths[fi], cp, REFERENCE_SIZE).astype(np.float32) / 255.0
            if img.sum() >= _MIN_INK:  # the font claims the letter but may draw nothing
                refs[(cp, fi)] = img.ravel()
                drawn.setdefault(cp, []).append(fi)
    kept = sorted(cp for cp, f in drawn.items() if len(f) >= min_fonts)
    pos = {cp: i for i, cp in enumerate(kept)}
    n = len(kept)
    # Cheap pre-filter on whole matrices: the largest relative squared distance over the fonts
    # drawing both letters must be small; then the exact test on the few surviving pairs.
    worst = np.full((n, n), np.inf)
    for fi in range(len(paths)):
        members = [cp for cp in kept if fi in drawn[cp]]
        if len(members) < 2:
            continue
        ix = np.array([pos[cp] for cp in members])
        x = np.stack([refs[(cp, fi)] for cp in members])
        sq = (x * x).sum(1)
        d = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)) / np.maximum(sq[:, None] + sq[None, :], 1e-6)
        sub = np.ix_(ix, ix)
        worst[sub] = np.where(np.isinf(worst[sub]), d, np.maximum(worst[sub], d))
    np.fill_diagonal(worst, np.inf)
    dup_pairs = []
    for i, j in zip(*np.nonzero(np.triu(worst < _DEDUP_PREFILTER))):
        a, b = kept[i], kept[j]
        if all(int((np.abs(refs[(a, f)] - refs[(b, f)]) > 0.5).sum()) <= DEDUP_MAX_PIXELS
               for f in set(drawn[a]) & set(drawn[b])):
            dup_pairs.append((int(i), int(j)))
    prio = {s: i for i, s in enumerate(_SCRIPT_PRIORITY)}
    rank = {cp: (prio.get(_script(cp), len(prio)), cp) for cp in kept}
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in dup_pairs:
        a, b = find(i), find(j)
        if a != b:
            keep, drop = (a, b) if rank[kept[a]] < rank[kept[b]] else (b, a)
            parent[drop] = keep
    groups: Dict[int, List[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(kept[i])
    reps = sorted(kept[r] for r in groups)
    aliases = {kept[r]: [cp for cp in members if cp != kept[r]] for r, members in groups.items()}
    return reps, {cp: drawn[cp] for cp in reps}, aliases


# -------------------------------------------------------------------------------- build / cache


def build_glyphs(image_size: int = 28, *, seed: int = 0, per_class: int = 20, min_fonts: int = 4,
                 max_classes: Optional[int] = None, progress: bool = True) -> dict:
    """Renders the Glyphs benchmark in memory (no cache; see :func:`load_glyphs`).

    Args:
      image_size: output side (28 default; 32 and 84 standard; any integer >= 8).
      seed: seed of the per-instance font permutation and jitter.
      per_class: instances per class.
      min_fonts: minimum number of fonts drawing a letter.
      max_classes: small builds for tests: keep about this many classes, the first ones (by code
        point) of every alphabet in proportion to the alphabet's size (at least one each).
      progress: show a tqdm bar.

    Returns:
      dict with ``images`` uint8 ``(classes, per_class, size, size)``, ``codepoints`` int32,
      ``names`` (Unicode names), ``alphabets``, ``split`` (``train``/``validation``/``test`` per
      class), ``fonts`` (font file names), ``instance_fonts`` int16 ``(classes, per_class)`` (index
      into ``fonts``) and ``aliases`` (merged duplicates, ``"U+0391 U+0410"``). Classes are sorted
      by code point.

    Raises:
      ValueError: for ``image_size < 8``, ``per_class < 1``, ``min_fonts < 1`` or
        ``max_classes < 1``.
    """
    from tqdm.auto import tqdm

    if int(image_size) != image_size or image_size < 8:
        raise ValueError(f"glyphs: image_size must be an integer >= 8 (28, 32 and 84 are standard), "
                         f"got {image_size!r}")
    for nm, v in (("per_class", per_class), ("min_fonts", min_fonts)):
        if int(v) != v or v < 1:
            raise ValueError(f"glyphs: {nm} must be a positive integer, got {v!r}")
    if max_classes is not None and max_classes < 1:
        raise ValueError(f"glyphs: max_classes must be a positive integer or None, got {max_classes!r}")
    image_size = int(image_size)
    paths = font_paths()
    reps, drawn, aliases = _select(tuple(paths), int(min_fonts), _fonts_digest(tuple(paths)))
    split_of = {a: s for s, alphas in SPLIT_ALPHABETS.items() for a in alphas}
    # A script no split lists (a future matplotlib with new fonts) goes to meta-train.
    keep = list(reps)
    if max_classes is not None:
        per_script: Dict[str, List[int]] = {}
        for cp in keep:
            per_script.setdefault(_script(cp), []).append(cp)
        frac = max_classes / len(keep)
        keep = sorted(cp for cps in per_script.values() for cp in cps[:max(1, int(round(len(cps) * frac)))])

    images = np.zeros((len(keep), per_class, image_size, image_size), np.uint8)
    inst_fonts = np.zeros((len(keep), per_class), np.int16)
    for ci, cp in enumerate(tqdm(keep, desc=f"rendering glyphs {image_size}px", unit="class",
                                 disable=not progress)):
        fonts = drawn[cp]
        perm = np.random.default_rng([seed, cp]).permutation(len(fonts))
        for i in range(per_class):
            fi = fonts[perm[i % len(fonts)]]
            images[ci, i] = render_glyph(paths[fi], cp, image_size,
                                         _jitter(np.random.default_rng([seed, cp, i])))
            inst_fonts[ci, i] = fi
    alphabets = [_script(cp) for cp in keep]
    return {"images": images, "codepoints": np.asarray(keep, np.int32),
            "names": np.asarray([unicodedata.name(chr(cp)) for cp in keep]),
            "alphabets": np.asarray(alphabets),
            "split": np.asarray([split_of.get(a, "train") for a in alphabets]),
            "fonts": np.asarray([os.path.basename(p) for p in paths]),
            "instance_fonts": inst_fonts,
            "aliases": np.asarray([" ".join(f"U+{a:04X}" for a in aliases[cp]) for cp in keep])}


def _library_versions() -> Dict[str, str]:
    """Versions of the libraries the rendered content depends on."""
    import PIL
    import fontTools
    import matplotlib
    from matplotlib import ft2font
    from PIL import features

    return {"python_unicodedata": unicodedata.unidata_version,  # categories, decompositions, names
            "pillow": PIL.__version__,  # affine resampling, filters, text drawing
            "pillow_freetype": str(features.version("freetype2")),  # glyph rasterisation
            "matplotlib": matplotlib.__version__,  # ships the fonts (their bytes are keyed too)
            "matplotlib_freetype": str(ft2font.__freetype_version__),  # character maps
            "fonttools": str(fontTools.version),  # Unicode script of each letter
            "numpy": np.__version__}  # seeded generators (permutations, jitter)


def cache_key(image_size: int = 28, *, seed: int = 0, per_class: int = 20, min_fonts: int = 4,
              max_classes: Optional[int] = None) -> dict:
    """Everything the content of one Glyphs build depends on (the cache key, as a JSON dict).

    Args:
      image_size, seed, per_class, min_fonts, max_classes: as :func:`build_glyphs`.

    Returns:
      ``{"renderer_version", "params", "constants", "code_sha256", "fonts", "libraries"}``: the
      build parameters; every rendering, jitter, selection and split constant; a digest of the
      rendering code's syntax trees; ``[file name, SHA-256 of the bytes]`` of every font of
      :func:`font_paths`; the versions of the libraries involved. Two builds with equal keys
      render the same arrays.
    """
    return {
        "renderer_version": GLYPHS_VERSION,
        "params": {"image_size": int(image_size), "stored_channels": 1, "seed": int(seed),
                   "per_class": int(per_class), "min_fonts": int(min_fonts),
                   "max_classes": None if max_classes is None else int(max_classes)},
        "constants": {
            "split_alphabets": {k: list(v) for k, v in SPLIT_ALPHABETS.items()},
            "excluded_fonts": list(EXCLUDED_FONTS), "dedup_max_pixels": DEDUP_MAX_PIXELS,
            "reference_size": REFERENCE_SIZE, "dedup_prefilter": _DEDUP_PREFILTER,
            "script_priority": list(_SCRIPT_PRIORITY), "script_rename": dict(_SCRIPT_RENAME),
            "em_fraction": _EM_FRACTION, "fit_fraction": _FIT_FRACTION,
            "rotation_deg": _ROTATION_DEG, "scale_range": list(_SCALE_RANGE), "shear": _SHEAR,
            "translation": _TRANSLATION, "stroke_levels": list(_STROKE_LEVELS),
            "min_ink": _MIN_INK, "supersample_px": _SUPERSAMPLE_PX, "src_pad": _SRC_PAD,
            "min_em": _MIN_EM, "thin_keep": _THIN_KEEP},
        "code_sha256": _code_digest((render_glyph, _jitter, _select, build_glyphs, _font, _script,
                                     _is_letter, font_paths)),
        "fonts": _font_hashes(font_paths()),
        "libraries": _library_versions(),
    }


def cache_key_digest(image_size: int = 28, **kw) -> str:
    """SHA-256 (hex) of :func:`cache_key` (canonical JSON): the content key of a Glyphs build.

    Args:
      image_size, **kw: as :func:`cache_key`.

    Returns:
      64 hex digits.
    """
    return _digest_key(cache_key(image_size, **kw))


def _file_name(key: dict) -> str:
    p = key["params"]
    tag = (f"glyphs_v{key['renderer_version']}_s{p['image_size']}_c1_seed{p['seed']}"
           f"_n{p['per_class']}_f{p['min_fonts']}")
    if p["max_classes"] is not None:
        tag += f"_max{p['max_classes']}"
    return f"{tag}-{_digest_key(key)[:12]}.npz"


def cache_file(image_size: int = 28, *, seed: int = 0, per_class: int = 20, min_fonts: int = 4,
               max_classes: Optional[int] = None, cache_dir: Optional[str] = None) -> str:
    """Path of the cache file of one Glyphs configuration.

    The name is a readable prefix (renderer version, image size, stored channels (always 1:
    3-channel views are replicated at load time), seed, instances per class, minimum fonts, the
    optional class cap) plus the first 12 hex digits of the SHA-256 of :func:`cache_key`, e.g.
    ``glyphs_v2_s28_c1_seed0_n20_f4-0123456789ab.npz``: a change of any parameter, constant,
    rendering code, font file or library version gives another file.

    Args:
      image_size, seed, per_class, min_fonts, max_classes: as :func:`build_glyphs`.
      cache_dir: directory (default: see :func:`cache_dir`).

    Returns:
      The file path (the file may not exist yet).
    """
    key = cache_key(image_size, seed=seed, per_class=per_class, min_fonts=min_fonts,
                    max_classes=max_classes)
    return os.path.join(_resolve_cache_dir(cache_dir), _file_name(key))


def _read_cache(path: str, key: dict) -> Optional[dict]:
    """The cached arrays if ``path`` holds a build whose stored key equals ``key``, else None
    (a message on stderr says why the file is not used)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = str(z["_cache_key"]) if "_cache_key" in z.files else None
            if stored == _canonical(key):
                return {k: z[k] for k in z.files if k != "_cache_key"}
    except (OSError, ValueError, EOFError) as e:
        print(f"glyphs: cache file {path} is unreadable ({e}); rebuilding it.", file=sys.stderr)
        return None
    if stored is None:
        why = "records no key (written by older code)"
    else:
        diff = _key_differences(json.loads(stored), key)
        why = f"was built with another key (differs in {diff})"
    print(f"glyphs: cache file {path} {why}; not reused, rebuilding it.", file=sys.stderr)
    return None


def load_glyphs(image_size: int = 28, *, seed: int = 0, per_class: int = 20, min_fonts: int = 4,
                max_classes: Optional[int] = None, cache_dir: Optional[str] = None,
                progress: bool = True, rebuild: bool = False) -> dict:
    """Glyphs from the on-disk cache, building (and caching) it on first use.

    The cache file (:func:`cache_file`) stores its full :func:`cache_key`; a file whose stored key
    differs from the current one (or records none) is rebuilt, never reused. Writing is atomic
    (a temporary file renamed into place), so a killed build leaves no half-written cache.

    Args:
      image_size, seed, per_class, min_fonts, max_classes, progress: as :func:`build_glyphs`.
      cache_dir: cache directory (default ``$DFML_JAX_CACHE`` or ``~/.cache/dfml_jax``).
      rebuild: rebuild even if a valid cache file exists.

    Returns:
      The dict of :func:`build_glyphs`.
    """
    key = cache_key(image_size, seed=seed, per_class=per_class, min_fonts=min_fonts,
                    max_classes=max_classes)
    path = os.path.join(_resolve_cache_dir(cache_dir), _file_name(key))
    if os.path.exists(path) and not rebuild:
        data = _read_cache(path, key)
        if data is not None:
            return data
    data = build_glyphs(image_size, seed=seed, per_class=per_class, min_fonts=min_fonts,
                        max_classes=max_classes, progress=progress)
    tmp = path + f".tmp{os.getpid()}.npz"
    try:
        np.savez(tmp, _cache_key=np.asarray(_canonical(key)), **data)
        os.replace(tmp, path)  # atomic: a killed build never leaves a half-written cache
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return data


def glyph_split_counts(data: dict) -> Dict[str, Dict[str, int]]:
    """Class counts per split and alphabet of a :func:`load_glyphs` dict.

    Args:
      data: the dict of :func:`build_glyphs` / :func:`load_glyphs`.

    Returns:
      ``{split: {alphabet: classes, ..., "total": classes}}`` for train, validation, test.
    """
    out: Dict[str, Dict[str, int]] = {}
    for s in ("train", "validation", "test"):
        alph = data["alphabets"][data["split"] == s].tolist()
        counts = {a: alph.count(a) for a in sorted(set(alph))}
        counts["total"] = len(alph)
        out[s] = counts
    return out


def glyph_splits(image_size: int = 28, channels: int = 1, **kw) -> Tuple[ClassDataset, ...]:
    """Glyphs as ``(train, validation, test)`` :class:`ClassDataset` s (disjoint alphabets).

    Args:
      image_size: image side.
      channels: 1, or 3 (grey replicated as a read-only broadcast view: no extra memory).
      **kw: :func:`load_glyphs` options (``seed``, ``cache_dir``, ``max_classes``, ``progress``...).

    Returns:
      Three :class:`ClassDataset` s of uint8 images ``(classes, per_class, S, S, channels)``;
      class names are ``"LATIN SMALL LETTER A (U+0061)"``, groups the alphabets.
    """
    if channels not in (1, 3):
        raise ValueError(f"glyphs: channels must be 1 or 3, got {channels!r}")
    data = load_glyphs(image_size, **kw)
    out = []
    for split in ("train", "validation", "test"):
        m = data["split"] == split
        imgs = data["images"][m][..., None]
        if channels == 3:
            imgs = np.broadcast_to(imgs, imgs.shape[:-1] + (3,))
        names = [f"{n} (U+{cp:04X})" for n, cp in zip(data["names"][m], data["codepoints"][m])]
        out.append(ClassDataset(imgs, names, list(data["alphabets"][m]), name=f"glyphs/{split}"))
    return tuple(out)
