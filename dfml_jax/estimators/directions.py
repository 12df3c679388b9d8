"""Direction samplers for zero-order estimators, regenerated from a key chunk by chunk.

Every family draws directions ``u`` with ``E[u u^T] = I / d`` (unit length on average), so one
estimator formula serves all of them::

    g_hat = (d / q) * sum_j  Delta_j * u_j,   Delta_j = (f(x + mu u_j) - f(x)) / mu     (forward)
                                              Delta_j = (f(x + mu u_j) - f(x - mu u_j)) / (2 mu)  (central)

and ``smoothing`` (``mu``) is the step length in input units whatever the family (for
``"gaussian"`` it is the RMS step length: ``u = z / sqrt(d)``, ``z ~ N(0, I)``, i.e. Gaussian
smoothing with ``sigma = mu / sqrt(d)``).

Families (``DIRECTION_FAMILIES``):

* ``"sphere"``: uniform on the unit sphere (normalised Gaussians), the DFME / MAZE / BiDf-MKD choice.
* ``"gaussian"``: ``N(0, I / d)``, Nesterov-Spokoiny Gaussian smoothing.
* ``"rademacher"``: ``{+-1}^d / sqrt(d)``, SPSA.
* ``"orthogonal"``: blockwise-orthonormal unit directions (Choromanski et al. 2018): the directions
  of one chunk are exactly orthonormal (in blocks of at most ``d``); different chunks independent.
* ``"coordinate"``: random standard basis vectors, distinct within a chunk (blocks of at most ``d``).

Every sample draws its own directions from its own key: direction ``j`` of sample ``b`` comes from
``fold_in(fold_in(key, j), b)`` (i.i.d. families) and the block of chunk ``c`` of sample ``b`` from
``fold_in(fold_in(key, c), b)`` (blockwise families), with ``b`` the sample's index in the *whole*
batch. A device that holds samples ``offset .. offset+n-1`` of a sharded batch passes
``sample_offset=offset`` and draws exactly the directions a single device would have drawn for those
samples, so an estimate is the same on 1 or 8 devices. i.i.d. families do not depend on the chunking
either. Blockwise families (orthogonal, coordinate) couple the directions of one chunk: with
``chunk_size=None`` and ``q <= d`` all ``q`` directions of a sample are orthonormal / distinct; with
chunking, only within a chunk. Nothing is stored: the directions of a chunk are recomputed from the
key whenever they are needed (the "seed trick" of MeZO).

References:
  Nesterov & Spokoiny, "Random gradient-free minimization of convex functions", FoCM 2017.
  Choromanski et al., "Structured evolution with compact architectures for scalable policy
  optimization", ICML 2018 (arXiv 1804.02395).
  Malladi et al., "Fine-Tuning Language Models with Just Forward Passes" (MeZO), arXiv 2305.17333.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["DirectionFamily", "DIRECTION_FAMILIES", "sample_directions"]


class DirectionFamily(NamedTuple):
    """A direction distribution with ``E[u u^T] = I / d``.

    Attributes:
      name: registry name.
      sample: i.i.d. families: ``sample(key, dim) -> (dim,)``, one sample's direction drawn from
        ``key``; blockwise families: ``sample(key, count, dim) -> (count, dim)``, one sample's block
        of coupled directions.
      blockwise: whether directions are coupled within a chunk (then they depend on the chunking).
    """

    name: str
    sample: Callable[..., jax.Array]
    blockwise: bool


def _normalise(z):
    return z * jax.lax.rsqrt(jnp.sum(z * z, axis=-1, keepdims=True))


def _sphere(key, dim):
    return _normalise(jax.random.normal(key, (dim,), jnp.float32))


def _gaussian(key, dim):
    return jax.random.normal(key, (dim,), jnp.float32) * (1.0 / math.sqrt(dim))


def _rademacher(key, dim):
    return jax.random.rademacher(key, (dim,), jnp.float32) * (1.0 / math.sqrt(dim))


def _blocks(count, dim):
    """Split ``count`` directions into blocks of at most ``dim`` (static sizes)."""
    sizes = [dim] * (count // dim)
    if count % dim:
        sizes.append(count % dim)
    return sizes


def _orthonormalise(z):
    """Orthonormalise the ``m`` rows of every sample of ``z`` ``(batch, m, dim)``: the Q factor of
    the QR decomposition of each ``(dim, m)`` block with ``diag(R) > 0``, i.e. a Haar frame.

    Tall blocks (``m <= dim / 4``, the usual case) use CholeskyQR: Gram matrix, Cholesky factor,
    multiplication by its inverse, all batched matrix products (fast on every backend). Gaussian
    blocks that tall have condition number <= 3, so one round is orthonormal to ~1e-6 in fp32.
    Square-ish blocks use Householder QR with the sign fix of Mezzadri (2007).
    """
    _, m, dim = z.shape
    hi = jax.lax.Precision.HIGHEST            # no reduced-precision passes (TPU / GPU tf32)
    if 4 * m <= dim:
        gram = jnp.matmul(z, jnp.swapaxes(z, 1, 2), precision=hi)          # (batch, m, m)
        low = jnp.linalg.cholesky(gram)                                   # gram = L L^T
        low_inv = jax.scipy.linalg.solve_triangular(
            low, jnp.broadcast_to(jnp.eye(m, dtype=z.dtype), low.shape), lower=True)
        return jnp.matmul(low_inv, z, precision=hi)                       # rows of L^-1 Z
    qm, r = jnp.linalg.qr(jnp.swapaxes(z, 1, 2), mode="reduced")         # (batch, dim, m)
    sign = jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))
    qm = qm * jnp.where(sign == 0, 1.0, sign)[:, None, :]
    return jnp.swapaxes(qm, 1, 2)


def _orthogonal_blocks(keys, count, dim):
    """Per-sample keys ``(batch,)`` -> ``(batch, count, dim)`` orthonormal blocks."""
    out = []
    for i, m in enumerate(_blocks(count, dim)):
        block_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
        # one direction at a time over the batch (cache-friendly, as for i.i.d. families)
        z = jax.lax.map(lambda j: jax.vmap(lambda k: jax.random.normal(
            jax.random.fold_in(k, j), (dim,), jnp.float32))(block_keys), jnp.arange(m))
        out.append(_orthonormalise(jnp.swapaxes(z, 0, 1)))
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)


def _coordinate(key, count, dim):
    out = []
    for i, m in enumerate(_blocks(count, dim)):
        scores = jax.random.uniform(jax.random.fold_in(key, i), (dim,))
        _, idx = jax.lax.top_k(scores, m)                         # m distinct coordinates
        out.append(jax.nn.one_hot(idx, dim, dtype=jnp.float32))   # (m, dim)
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=0)


def _orthogonal(key, count, dim):
    return _orthogonal_blocks(key[None], count, dim)[0]


DIRECTION_FAMILIES = {
    "sphere": DirectionFamily("sphere", _sphere, blockwise=False),
    "gaussian": DirectionFamily("gaussian", _gaussian, blockwise=False),
    "rademacher": DirectionFamily("rademacher", _rademacher, blockwise=False),
    "orthogonal": DirectionFamily("orthogonal", _orthogonal, blockwise=True),
    "coordinate": DirectionFamily("coordinate", _coordinate, blockwise=True),
}


def _sample_keys(key, batch, sample_offset):
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(sample_offset + jnp.arange(batch))


def sample_directions(family: str | DirectionFamily, key: jax.Array, chunk_index, start, count: int,
                      batch: int, dim: int, sample_offset=0) -> jax.Array:
    """Directions ``start .. start+count-1`` of every sample, for one chunk.

    Args:
      family: a name in :data:`DIRECTION_FAMILIES` or a :class:`DirectionFamily`.
      key: the estimate's PRNG key.
      chunk_index: index of the chunk (may be traced); used by blockwise families.
      start: index of the chunk's first direction (may be traced); used by i.i.d. families.
      count: number of directions in the chunk (static).
      batch: number of samples B (static).
      dim: flattened sample dimension d (static).
      sample_offset: global index of the first sample (may be traced): a device holding a shard of
        a batch passes its shard's offset and draws the same directions as one device would.

    Returns:
      ``(count, batch, dim)`` float32 directions with ``E[u u^T] = I / d``.

    Example:
      >>> u = sample_directions("sphere", jax.random.key(0), 0, 0, 3, 2, 5)
      >>> u.shape, bool(jnp.allclose(jnp.linalg.norm(u, axis=-1), 1.0))
      ((3, 2, 5), True)
      >>> tail = sample_directions("sphere", jax.random.key(0), 0, 0, 3, 1, 5, sample_offset=1)
      >>> bool(jnp.array_equal(tail[:, 0], u[:, 1]))        # shard-invariant
      True
    """
    fam = DIRECTION_FAMILIES[family] if isinstance(family, str) else family
    if fam.blockwise:
        keys = _sample_keys(jax.random.fold_in(key, chunk_index), batch, sample_offset)
        if fam.sample is _orthogonal:
            blocks = _orthogonal_blocks(keys, count, dim)          # batched CholeskyQR
        else:
            blocks = jax.vmap(lambda k: fam.sample(k, count, dim))(keys)
        return jnp.swapaxes(blocks, 0, 1)                          # (count, batch, dim)

    def draw(j):
        keys = _sample_keys(jax.random.fold_in(key, j), batch, sample_offset)
        return jax.vmap(lambda k: fam.sample(k, dim))(keys)        # (batch, dim)

    if count == 1:
        return draw(start)[None]
    # One direction at a time (lax.map) rather than one big draw: each step's working set stays in
    # cache, which measured ~2.5x faster on CPU than drawing (count, batch, dim) at once.
    return jax.lax.map(lambda i: draw(start + i), jnp.arange(count))
