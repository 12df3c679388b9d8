"""Parametric stroke generator: every image is a drawing of a few pen strokes, rendered in JAX.

A drop-in alternative to the DCGAN generator (:mod:`dfml_jax.models.generator`) for line-drawing
domains (Glyphs, digits): ``create_model("strokes", nz=..., img_size=..., nc=...)`` maps latents
``z (N, nz)`` to images ``(N, img_size, img_size, nc)`` in [0, 1], and ``functional(...)`` gives the
same ``init(key)`` / ``apply_batchstats(params, z)`` contract, so the BiDf-MKD inverter optimises
``(w, Z)`` exactly as for the DCGAN. Whatever the optimiser does, the output stays a drawing.

Strokes
-------
Each image has ``S = num_strokes`` quadratic Bezier strokes, each described by
:data:`PARAMS_PER_STROKE` = 8 unconstrained reals ``u`` (order :data:`PARAM_NAMES`), decoded by
:func:`decode_strokes` (coordinates are fractions of the side, ``x`` to the right, ``y`` down):

* end points ``p0 = 0.5 + extent / 2 * tanh(u[0:2])``, ``p1 = 0.5 + extent / 2 * tanh(u[2:4])``:
  always inside the central ``extent`` of the image (0.8: pixels 2.8 .. 25.2 of 28);
* control point ``c = m + along * tanh(u[4]) * d + bend * tanh(u[5]) * perp(d)`` with
  ``m = (p0 + p1) / 2``, ``d = p1 - p0`` and ``perp(d)`` the chord rotated by 90 degrees: the curve
  bulges by up to ``bend / 2`` chord lengths (0.5: a half-circle-like arc) and ``along`` shifts the
  apex along the chord (the curvature of the stroke, relative to its chord, so scribbles stay
  scribbles when the end points move);
* full width ``w_lo + (w_hi - w_lo) * sigmoid(u[6])`` with ``width_range = (w_lo, w_hi)`` as
  fractions of the side (default 0.03 .. 0.16: 0.8 .. 4.5 px at 28 px, 2.7 px at ``u = 0``; Glyphs
  strokes range from hairlines to bold 5 px, typically about 3 px);
* intensity ``sigmoid(u[7] + intensity_bias)`` (bias 3: about 0.95 at ``u = 0``; the optimiser can
  switch a stroke off).

Rendering (:func:`render_strokes`) samples ``T = num_points`` points along each curve, takes the
distance from every pixel centre to the polyline (min over its ``T - 1`` segments of the exact
point-to-segment distance, so stroke ends are round caps), turns it into ink
``intensity * sigmoid((width / 2 - dist) / softness)`` (``softness`` in pixels, 0.25: close to
the box-filtered pixel coverage of the supersampled Glyphs renders) and combines the strokes by
soft union ``1 - prod_s (1 - ink_s)``. Images are white strokes on black, the polarity of Glyphs
(``invert=True`` gives black on white), replicated to ``nc`` channels. Everything is vectorised
(no Python loop over pixels, segments or strokes), differentiable everywhere and
``jit``/``vmap``-friendly. The forward pass takes the min over the segments
(``N * S * (T - 1) * H * W`` work, nothing stored: zero-order queries through the renderer pay
only this); a custom VJP finds every pixel's nearest segment again and differentiates only the
distance to it, so the backward pass costs ``N * S * H * W`` (same value and, almost everywhere,
same gradient as differentiating the min). Rendering 2,000 images of 4 strokes at T = 16 and
28 px takes about 0.35 s forward on 2 CPU cores (the argmin-and-gather forward it replaced:
0.9 s).

Latent -> stroke parameters (``latent=``)
-----------------------------------------
* ``"linear"`` (default): ``u = z @ W + b`` with ``W ~ N(0, 1 / nz)``, ``b = 0``, for any ``nz``
  (default ``8 * num_strokes``). Like the DCGAN, the generator weights ``W`` are shared by the
  batch and ``z ~ N(0, I)`` gives ``u ~ N(0, 1)`` per coordinate at initialisation, so the
  inverter's ``(w, Z)`` optimisation and learning rate behave as with the DCGAN (a step on ``W``
  moves every image's strokes).
* ``"direct"``: ``u = z + b`` with a learnable shared offset ``b`` (initialised to 0): ``z`` *is*
  the stroke parameters (``nz`` must equal ``8 * num_strokes``, otherwise a ``ValueError``), so
  the inversion is literally over stroke parameters. ``init(key)`` then returns the same
  (all-zero) parameters for every key: all the randomness is in ``Z``. Adam moves each stroke
  parameter by at most ``lr`` per step, so this mode wants a larger inversion learning rate than
  the DCGAN's 1e-3 (the BiDf-MKD default: 0.1 for 30 iterations, with
  ``InversionConfig.zo_space="latent"``: zero-order directions over the stroke parameters).

``ngf`` is accepted and ignored (so callers can pass the DCGAN's keyword set); ``train`` is
accepted and ignored (there is no batch normalisation). ``experiments/strokes_grid.py`` draws fresh
generators next to real glyphs; ``experiments/strokes_inversion.py`` compares one inversion call
with the DCGAN (white- and black-box numbers in its docstring).

Example:

>>> import jax
>>> from dfml_jax.models import create_model, functional
>>> gen = functional(create_model("strokes", nz=32, img_size=28, nc=1, rngs_or_key=0))
>>> params, _ = jax.jit(gen.init)(jax.random.key(1))        # fresh generator weights
>>> x = gen.apply_batchstats(params, jax.random.normal(jax.random.key(2), (5, 32)))
>>> x.shape, bool(x.min() >= 0.0), bool(x.max() <= 1.0)
((5, 28, 28, 1), True, True)

A horizontal stroke 2.8 px wide along the centre line of pixel row 14 (``y = 14.5 / 28``), from
``x = 0.2`` to ``x = 0.8``; column 14 across rows 11..17, and a corner:

>>> import jax.numpy as jnp
>>> y = 14.5 / 28
>>> ink = render_strokes(jnp.array([[[0.2, y]]]), jnp.array([[[0.5, y]]]), jnp.array([[[0.8, y]]]),
...                      width=jnp.array([[0.1]]), intensity=jnp.array([[1.0]]), img_size=28)
>>> [round(float(v), 2) for v in ink[0, 11:18, 14]], round(float(ink[0, 0, 0]), 2)
([0.0, 0.08, 0.83, 1.0, 0.83, 0.08, 0.0], 0.0)
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dfml_jax.models.layers import Linear, normal_init, zeros_init

__all__ = ["StrokeGenerator", "StrokeParams", "decode_strokes", "encode_strokes",
           "render_strokes", "bezier_points", "PARAMS_PER_STROKE", "PARAM_NAMES", "LATENT_MODES"]

PARAMS_PER_STROKE = 8
PARAM_NAMES = ("x0", "y0", "x1", "y1", "bend_along", "bend_perp", "width", "intensity")
LATENT_MODES = ("linear", "direct")
_DIST_EPS = 1e-4  # px^2 under the square root: finite gradients on the stroke's centre line


class StrokeParams(NamedTuple):
    """Decoded strokes of a batch (coordinates and widths as fractions of the image side).

    Attributes:
      p0, control, p1: ``(..., S, 2)`` start, control and end points ``(x, y)``.
      width: ``(..., S)`` full stroke width.
      intensity: ``(..., S)`` ink intensity in (0, 1).
    """
    p0: jax.Array
    control: jax.Array
    p1: jax.Array
    width: jax.Array
    intensity: jax.Array


def _perp(d: jax.Array) -> jax.Array:
    return jnp.stack([-d[..., 1], d[..., 0]], axis=-1)


def decode_strokes(u: jax.Array, *, extent: float = 0.8,
                   width_range: Sequence[float] = (0.03, 0.16), bend: float = 1.0,
                   along: float = 0.25, intensity_bias: float = 3.0) -> StrokeParams:
    """Maps unconstrained stroke parameters to strokes (see the module docstring).

    Args:
      u: ``(..., S, 8)`` reals in the order of :data:`PARAM_NAMES`.
      extent, width_range, bend, along, intensity_bias: the decoding constants.

    Returns:
      :class:`StrokeParams`.
    """
    if u.shape[-1] != PARAMS_PER_STROKE:
        raise ValueError(f"decode_strokes: expected (..., S, {PARAMS_PER_STROKE}), got {u.shape}.")
    half = 0.5 * extent
    p0 = 0.5 + half * jnp.tanh(u[..., 0:2])
    p1 = 0.5 + half * jnp.tanh(u[..., 2:4])
    d = p1 - p0
    control = (0.5 * (p0 + p1) + along * jnp.tanh(u[..., 4:5]) * d
               + bend * jnp.tanh(u[..., 5:6]) * _perp(d))
    w_lo, w_hi = width_range
    width = w_lo + (w_hi - w_lo) * jax.nn.sigmoid(u[..., 6])
    intensity = jax.nn.sigmoid(u[..., 7] + intensity_bias)
    return StrokeParams(p0, control, p1, width, intensity)


def encode_strokes(p0: jax.Array, p1: jax.Array, bend_along: jax.Array, bend_perp: jax.Array,
                   width: jax.Array, intensity: jax.Array, *, extent: float = 0.8,
                   width_range: Sequence[float] = (0.03, 0.16), bend: float = 1.0,
                   along: float = 0.25, intensity_bias: float = 3.0) -> jax.Array:
    """Inverse of :func:`decode_strokes`: the ``u`` that draws the given strokes.

    Args:
      p0, p1: ``(..., S, 2)`` end points, strictly inside the central ``extent``.
      bend_along, bend_perp: ``(..., S)`` in (-1, 1): the ``tanh`` of the curvature parameters
        (0, 0: a straight stroke).
      width: ``(..., S)`` strictly inside ``width_range``.
      intensity: ``(..., S)`` in (0, 1).
      extent, width_range, bend, along, intensity_bias: as for :func:`decode_strokes`.

    Returns:
      ``(..., S, 8)`` (for ``latent="direct"`` these are the latents ``z`` when the offset is 0).
    """
    del bend, along  # the curvature parameters are given as their tanh
    half = 0.5 * extent
    w_lo, w_hi = width_range
    logit = lambda p: jnp.log(p) - jnp.log1p(-p)  # noqa: E731
    cols = [jnp.arctanh((jnp.asarray(p0) - 0.5) / half),
            jnp.arctanh((jnp.asarray(p1) - 0.5) / half),
            jnp.arctanh(jnp.asarray(bend_along))[..., None],
            jnp.arctanh(jnp.asarray(bend_perp))[..., None],
            logit((jnp.asarray(width) - w_lo) / (w_hi - w_lo))[..., None],
            (logit(jnp.asarray(intensity)) - intensity_bias)[..., None]]
    return jnp.concatenate(cols, axis=-1).astype(jnp.float32)


def bezier_points(p0: jax.Array, control: jax.Array, p1: jax.Array, num_points: int) -> jax.Array:
    """``num_points`` points at uniform ``t`` in [0, 1] on quadratic Bezier curves.

    Args:
      p0, control, p1: ``(..., 2)``.
      num_points: ``T >= 2``.

    Returns:
      ``(..., T, 2)``.
    """
    t = jnp.linspace(0.0, 1.0, num_points)[:, None]
    return ((1 - t) ** 2 * p0[..., None, :] + 2 * (1 - t) * t * control[..., None, :]
            + t ** 2 * p1[..., None, :])


def _point_segment_d2(qx, qy, ax, ay, abx, aby):
    """Squared distance from points ``(qx, qy)`` to segments ``a -> a + ab`` (broadcasting)."""
    apx, apy = qx - ax, qy - ay
    t = jnp.clip((apx * abx + apy * aby) / (abx * abx + aby * aby + 1e-8), 0.0, 1.0)
    return jnp.square(apx - t * abx) + jnp.square(apy - t * aby)


def _segment_d2(pts, grid):
    """``(N, S, T-1, H, W)`` squared distances from the pixel centres to every segment."""
    a = pts[..., :-1, :]
    ab = pts[..., 1:, :] - a
    e = lambda v: v[..., None, None]  # noqa: E731
    return _point_segment_d2(grid[None, :], grid[:, None], e(a[..., 0]), e(a[..., 1]),
                             e(ab[..., 0]), e(ab[..., 1]))


@jax.custom_vjp
def _polyline_d2(pts, grid):
    """``(N, S, H, W)`` squared distance from every pixel centre to each stroke's polyline.

    Forward: the min over the ``T - 1`` segments (``N * S * (T - 1) * H * W`` work, nothing
    stored). Backward: the nearest segment of every pixel is found again and only the distance
    to it is differentiated (``N * S * H * W`` backward work instead of the min's full-size
    mask); same value and, almost everywhere, the same gradient as differentiating the min.
    So forward-only callers (zero-order queries through the renderer) pay the cheap path.
    """
    return jnp.min(_segment_d2(pts, grid), axis=-3)


def _nearest_segment_d2(pts, grid):
    idx = jnp.argmin(_segment_d2(jax.lax.stop_gradient(pts), grid), axis=-3)  # (N, S, H, W)
    a = jnp.take_along_axis(pts[..., None, None, :-1, :], idx[..., None, None], axis=-2)[..., 0, :]
    b = jnp.take_along_axis(pts[..., None, None, 1:, :], idx[..., None, None], axis=-2)[..., 0, :]
    return _point_segment_d2(grid[None, :], grid[:, None], a[..., 0], a[..., 1],
                             b[..., 0] - a[..., 0], b[..., 1] - a[..., 1])


def _polyline_d2_fwd(pts, grid):
    return _polyline_d2(pts, grid), (pts, grid)


def _polyline_d2_bwd(res, ct):
    pts, grid = res
    _, vjp = jax.vjp(lambda p: _nearest_segment_d2(p, grid), pts)
    return vjp(ct)[0], jnp.zeros_like(grid)


_polyline_d2.defvjp(_polyline_d2_fwd, _polyline_d2_bwd)


def render_strokes(p0: jax.Array, control: jax.Array, p1: jax.Array, width: jax.Array,
                   intensity: jax.Array, *, img_size: int, num_points: int = 16,
                   softness: float = 0.25) -> jax.Array:
    """Renders quadratic Bezier strokes to ink images (white = 1 on black = 0).

    Args:
      p0, control, p1: ``(N, S, 2)`` points ``(x, y)`` as fractions of the side (``x`` = column,
        ``y`` = row; pixel ``(i, j)`` has its centre at ``((j + 0.5) / H, (i + 0.5) / H)``).
      width: ``(N, S)`` full widths (fractions of the side).
      intensity: ``(N, S)`` ink in [0, 1].
      img_size: side ``H = W`` in pixels.
      num_points: samples per curve (``T - 1`` segments).
      softness: edge softness in pixels (the sigmoid's scale).

    Returns:
      ``(N, H, W)`` in [0, 1].
    """
    if num_points < 2:
        raise ValueError(f"render_strokes: num_points must be >= 2, got {num_points}.")
    pts = bezier_points(p0, control, p1, num_points) * img_size  # (N, S, T, 2) in pixels
    d2 = _polyline_d2(pts, jnp.arange(img_size, dtype=jnp.float32) + 0.5)  # (N, S, H, W)
    dist = jnp.sqrt(d2 + _DIST_EPS)                               # (N, S, H, W) to the polyline
    half_w = 0.5 * width * img_size
    ink = intensity[..., None, None] * jax.nn.sigmoid((half_w[..., None, None] - dist) / softness)
    return 1.0 - jnp.prod(1.0 - ink, axis=-3)


class StrokeGenerator(nnx.Module):
    """Generator ``z (N, nz) -> drawings (N, img_size, img_size, nc)`` in [0, 1].

    Args:
      nz: latent size; default ``8 * num_strokes`` (required value for ``latent="direct"``).
      img_size: output side in pixels (any size >= 4).
      nc: output channels (the drawing is replicated).
      num_strokes: strokes per image ``S``.
      latent: ``"linear"`` (learnable ``Linear(nz -> 8 S)``) or ``"direct"`` (``z`` are the
        stroke parameters plus a learnable shared offset); see the module docstring.
      num_points: samples per curve ``T``.
      softness: edge softness in pixels.
      width_range: ``(min, max)`` full stroke width as fractions of the side.
      extent: end points lie in the central ``extent`` of the side.
      bend: maximal perpendicular control-point offset in chord lengths.
      along: maximal control-point offset along the chord in chord lengths.
      intensity_bias: added to the intensity logit.
      invert: black strokes on white instead of the Glyphs polarity (white on black).
      ngf: ignored (accepted for keyword compatibility with the DCGAN).
      rngs: ``nnx.Rngs``.

    Raises:
      ValueError: unknown ``latent``, ``nz`` not ``8 * num_strokes`` in direct mode, bad sizes.
    """

    def __init__(self, *, nz: int | None = None, img_size: int = 28, nc: int = 1,
                 num_strokes: int = 4, latent: str = "linear", num_points: int = 16,
                 softness: float = 0.25, width_range: Sequence[float] = (0.03, 0.16),
                 extent: float = 0.8, bend: float = 1.0, along: float = 0.25,
                 intensity_bias: float = 3.0, invert: bool = False, ngf: int | None = None,
                 rngs: nnx.Rngs):
        del ngf
        if latent not in LATENT_MODES:
            raise ValueError(f"StrokeGenerator: unknown latent {latent!r}; valid: "
                             f"{', '.join(LATENT_MODES)}.")
        if num_strokes < 1 or img_size < 4 or nc < 1 or num_points < 2:
            raise ValueError(f"StrokeGenerator: need num_strokes >= 1, img_size >= 4, nc >= 1, "
                             f"num_points >= 2; got {num_strokes}, {img_size}, {nc}, {num_points}.")
        n_out = PARAMS_PER_STROKE * num_strokes
        nz = n_out if nz is None else int(nz)
        if latent == "direct" and nz != n_out:
            raise ValueError(f"StrokeGenerator(latent='direct'): z holds the stroke parameters, so "
                             f"nz must be {PARAMS_PER_STROKE} * num_strokes = {n_out}, got {nz} "
                             f"(or use latent='linear' for any nz).")
        if nz < 1:
            raise ValueError(f"StrokeGenerator: nz must be >= 1, got {nz}.")
        w_lo, w_hi = (float(w) for w in width_range)
        if not 0 < w_lo < w_hi:
            raise ValueError(f"StrokeGenerator: width_range must be 0 < min < max, got "
                             f"{tuple(width_range)}.")
        self.nz, self.img_size, self.nc, self.num_strokes = nz, int(img_size), int(nc), num_strokes
        self.latent, self.num_points, self.softness = latent, num_points, float(softness)
        self.invert = bool(invert)
        # (plain hashable attributes: the graph definition must stay hashable)
        self.extent, self.width_range, self.bend = float(extent), (w_lo, w_hi), float(bend)
        self.along, self.intensity_bias = float(along), float(intensity_bias)
        if latent == "linear":
            self.fc = Linear(nz, n_out, kernel_init=normal_init(1.0 / math.sqrt(nz)),
                             bias_init=zeros_init, rngs=rngs)
            self.offset = None
        else:
            self.fc = None
            self.offset = nnx.Param(zeros_init(None, (n_out,)), init_spec=zeros_init)

    def strokes(self, z: jax.Array) -> StrokeParams:
        """The decoded strokes of latents ``z (N, nz)`` (each field ``(N, S, ...)``)."""
        if z.ndim != 2 or z.shape[-1] != self.nz:
            raise ValueError(f"StrokeGenerator: expected latents (N, {self.nz}), got {z.shape}.")
        u = self.fc(z) if self.fc is not None else z + self.offset[...]
        return decode_strokes(u.reshape(z.shape[0], self.num_strokes, PARAMS_PER_STROKE),
                              extent=self.extent, width_range=self.width_range, bend=self.bend,
                              along=self.along, intensity_bias=self.intensity_bias)

    def __call__(self, z: jax.Array, *, train: bool = True) -> jax.Array:
        """Draws images.

        Args:
          z: ``(N, nz)`` latents.
          train: ignored (no batch normalisation).

        Returns:
          ``(N, img_size, img_size, nc)`` float32 in [0, 1].
        """
        del train
        sp = self.strokes(z)
        ink = render_strokes(*sp, img_size=self.img_size, num_points=self.num_points,
                             softness=self.softness)
        if self.invert:
            ink = 1.0 - ink
        return jnp.broadcast_to(ink[..., None], ink.shape + (self.nc,))
