"""DCGAN-style generator of BiDf-MKD / IDEAL (sigmoid head) and DFME (final BN + tanh head).

Architecture (``shared/specs/bidf_mkd.md`` section 2.1, ``ideal_dfme.md`` sections 3.5 and 4.2),
with ``s0 = img_size // 4``::

    Linear(nz -> 2*ngf*s0*s0, bias) -> reshape (s0, s0, 2*ngf) -> BN -> Upsample x2
    Conv3x3(2*ngf -> 2*ngf, no bias) -> BN -> LeakyReLU(0.2) -> Upsample x2
    Conv3x3(2*ngf -> ngf, no bias) -> BN -> LeakyReLU(0.2)
    Conv3x3(ngf -> nc, bias) -> head

``head="sigmoid"``: images in [0, 1] (BiDf-MKD, IDEAL). ``head="tanh_bn"``: BN(nc, affine=False)
then tanh, images in [-1, 1] (DFME's ``GeneratorA``). ``pre_activation=True`` returns the tensor
before the final sigmoid/tanh (DFME perturbs there).

Initialisation is the spec's ``reset_model``: Conv/Linear weights N(0, 0.02^2), biases 0, BN
scale N(1, 0.02^2), BN bias 0. To re-initialise from a key (e.g. at every synthesis call) use
``functional(gen).init(key)`` from :mod:`dfml_jax.models`, which is jittable. The generator is
always run with batch statistics; by default it keeps no running statistics at all.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dfml_jax.models.layers import UPSAMPLE_CONV_IMPLS, BatchNorm, Conv2d, Linear, leaky_relu, \
    normal_init, upsample2_conv3x3, zeros_init

__all__ = ["DCGANGenerator", "GENERATOR_HEADS"]

GENERATOR_HEADS = ("sigmoid", "tanh_bn")


class DCGANGenerator(nnx.Module):
    """Generator ``z (N, nz) -> images (N, img_size, img_size, nc)``.

    Args:
      nz: latent size (256 in the papers).
      ngf: base width (64 in the papers); the first stages use ``2 * ngf`` channels.
      img_size: output side, a multiple of 4.
      nc: output channels.
      head: ``"sigmoid"`` or ``"tanh_bn"``.
      track_running_stats: keep BN running statistics (unused by the algorithms; default off).
      conv_impl: convolution back-end.
      upsample: how each "Upsample x2, Conv3x3" pair is computed (:func:`upsample2_conv3x3`):
        ``"upsample_then_conv"`` (literally, the default) or ``"subpixel"`` (the same function
        at the lower resolution, 2.25x fewer multiply-adds in those two convolutions; equal up
        to float rounding, so results change in the last bits).
      rngs: ``nnx.Rngs``.
    """

    def __init__(self, *, nz: int = 256, ngf: int = 64, img_size: int = 32, nc: int = 3,
                 head: str = "sigmoid", track_running_stats: bool = False,
                 conv_impl: str | None = None, upsample: str = "upsample_then_conv",
                 rngs: nnx.Rngs):
        if img_size % 4 or img_size < 4:
            raise ValueError(f"DCGANGenerator: img_size must be a positive multiple of 4, got "
                             f"{img_size}.")
        if head not in GENERATOR_HEADS:
            raise ValueError(f"DCGANGenerator: unknown head {head!r}; valid: "
                             f"{', '.join(GENERATOR_HEADS)}.")
        if upsample not in UPSAMPLE_CONV_IMPLS:
            raise ValueError(f"DCGANGenerator: unknown upsample {upsample!r}; valid: "
                             f"{', '.join(UPSAMPLE_CONV_IMPLS)}.")
        self.nz, self.ngf, self.img_size, self.nc, self.head = nz, ngf, img_size, nc, head
        self.upsample = upsample
        self.s0 = img_size // 4
        w = normal_init(0.02)
        g = normal_init(0.02, 1.0)
        bn = dict(track_running_stats=track_running_stats, scale_init=g, rngs=rngs)
        conv = dict(kernel_init=w, bias_init=zeros_init, impl=conv_impl, rngs=rngs)
        self.fc = Linear(nz, 2 * ngf * self.s0 * self.s0, kernel_init=w, bias_init=zeros_init,
                         rngs=rngs)
        self.bn0 = BatchNorm(2 * ngf, **bn)
        self.conv1 = Conv2d(2 * ngf, 2 * ngf, 3, padding=1, use_bias=False, **conv)
        self.bn1 = BatchNorm(2 * ngf, **bn)
        self.conv2 = Conv2d(2 * ngf, ngf, 3, padding=1, use_bias=False, **conv)
        self.bn2 = BatchNorm(ngf, **bn)
        self.conv3 = Conv2d(ngf, nc, 3, padding=1, use_bias=True, **conv)
        if head == "tanh_bn":
            self.bn_out = BatchNorm(nc, affine=False, track_running_stats=track_running_stats,
                                    rngs=rngs)
        else:
            self.bn_out = None

    def __call__(self, z: jax.Array, *, train: bool = True, pre_activation: bool = False
                 ) -> jax.Array:
        """Generates images.

        Args:
          z: ``(N, nz)`` latents.
          train: BN mode; with no running statistics tracked (default) batch statistics are used
            either way.
          pre_activation: return the tensor before the final sigmoid/tanh.

        Returns:
          ``(N, img_size, img_size, nc)`` float32, in [0, 1] (sigmoid) or [-1, 1] (tanh_bn) unless
          ``pre_activation``.
        """
        if z.ndim != 2 or z.shape[-1] != self.nz:
            raise ValueError(f"DCGANGenerator: expected latents (N, {self.nz}), got {z.shape}.")
        h = self.fc(z).reshape(z.shape[0], self.s0, self.s0, 2 * self.ngf)
        h = self._upsample_conv(self.conv1, self.bn0(h, train=train))
        h = leaky_relu(self.bn1(h, train=train), 0.2)
        h = self._upsample_conv(self.conv2, h)
        h = leaky_relu(self.bn2(h, train=train), 0.2)
        h = self.conv3(h)
        if self.bn_out is not None:
            h = self.bn_out(h, train=train)
        if pre_activation:
            return h
        return jnp.tanh(h) if self.head == "tanh_bn" else jax.nn.sigmoid(h)

    def _upsample_conv(self, conv: Conv2d, h: jax.Array) -> jax.Array:
        """``conv(upsample_nearest2(h))`` (a 3x3, stride-1, padding-1 conv) computed as
        ``self.upsample`` says."""
        bias = None if conv.bias is None else conv.bias[...]
        return upsample2_conv3x3(h, conv.kernel[...], bias, method=self.upsample, impl=conv.impl)
