"""Classifier architectures: Conv4, CIFAR-style ResNet-10/18, LeNet-5, MLP (Flax NNX).

Every ``__call__`` takes NHWC float32 inputs (already normalised, see
:mod:`dfml_jax.models.preprocess`) and an explicit ``train`` flag:

* ``train=True``: BatchNorm uses batch statistics and updates its running statistics.
* ``train=False``: BatchNorm uses running statistics (teachers / APIs in eval mode).
* Models built with ``track_running_stats=False`` (the meta-model) have no running statistics and
  always normalise with batch statistics, whatever ``train`` says (transductive BN).

Architectures and initialisation follow ``shared/specs/bidf_mkd.md`` section 1.1 (Conv4, ResNets)
and ``shared/specs/ideal_dfme.md`` section 3.6 (LeNet-5 = IDEAL's ``CNN``, MLP 784-512-128-K).
"""
from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from dfml_jax.models.layers import BatchNorm, Conv2d, Linear, conv_normal_init, global_avg_pool, \
    global_max_pool, max_pool2

__all__ = ["Conv4", "ResNet", "BasicBlock", "LeNet5", "MLP"]


def _check_input(x: jax.Array, input_shape: tuple[int, int, int], name: str, *,
                 any_spatial: bool = False) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name}: expected NHWC input of rank 4, got shape {x.shape}.")
    if any_spatial:
        if x.shape[-1] != input_shape[-1]:
            raise ValueError(f"{name}: expected {input_shape[-1]} channels, got input {x.shape}.")
    elif tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{name}: built for inputs (N, {', '.join(map(str, input_shape))}), got "
                         f"{x.shape}. Resize the images or rebuild the model with this input_shape "
                         f"(Conv4 also accepts any resolution with global_pool=True).")


class Conv4(nnx.Module):
    """Conv4: ``depth`` x [Conv3x3 pad 1 (bias) -> BN -> ReLU -> MaxPool2], flatten, Linear.

    Args:
      num_classes: output logits.
      input_shape: ``(H, W, C)``.
      width: channels of every block (32 in the spec).
      depth: number of blocks (4 in the spec).
      global_pool: adaptive max pool to 1x1 before the Linear (accepts any resolution >= 2**depth).
      track_running_stats: keep BN running statistics (teachers); ``False`` for the meta-model.
      conv_impl: convolution back-end (see :mod:`dfml_jax.models.layers`).
      layout: activation layout inside the blocks: ``"NHWC"`` or ``"CNHW"`` (channel-major: the
        input is transposed once, the features back before the Linear; the same parameters and
        function, with matmuls that need no transposes, see :mod:`dfml_jax.models.layers`).
      rngs: ``nnx.Rngs``.
    """

    def __init__(self, num_classes: int, input_shape: Sequence[int], *, width: int = 32,
                 depth: int = 4, global_pool: bool = False, track_running_stats: bool = True,
                 conv_impl: str | None = None, layout: str = "NHWC", rngs: nnx.Rngs):
        h, w, c = input_shape
        if min(h, w) < 2 ** depth:
            raise ValueError(f"Conv4 with depth {depth} needs inputs of at least {2 ** depth}x"
                             f"{2 ** depth}, got {h}x{w}; lower depth or upsample the images.")
        convs, bns = [], []
        cin = c
        self.layout = layout
        for _ in range(depth):
            convs.append(Conv2d(cin, width, 3, padding=1, use_bias=True,
                                kernel_init=conv_normal_init(3, width), impl=conv_impl,
                                layout=layout, rngs=rngs))
            bns.append(BatchNorm(width, track_running_stats=track_running_stats,
                                 channel_axis=0 if layout == "CNHW" else -1, rngs=rngs))
            cin = width
        self.convs = nnx.List(convs)
        self.bns = nnx.List(bns)
        if global_pool:
            feat = width
        else:
            fh, fw = h, w
            for _ in range(depth):
                fh, fw = fh // 2, fw // 2
            feat = width * fh * fw
        self.feature_dim = feat
        self.global_pool = global_pool
        self.input_shape = tuple(input_shape)
        self.classifier = Linear(feat, num_classes, rngs=rngs)

    def features(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Flattened (or globally max-pooled) features ``(N, feature_dim)``."""
        _check_input(x, self.input_shape, "Conv4", any_spatial=self.global_pool)
        cm = self.layout == "CNHW"
        if cm:
            x = x.transpose(3, 0, 1, 2)
        for conv, bn in zip(self.convs, self.bns):
            x = max_pool2(jax.nn.relu(bn(conv(x), train=train)), self.layout)
        if cm:
            x = x.transpose(1, 2, 3, 0)
        if self.global_pool:
            return global_max_pool(x)
        return x.reshape(x.shape[0], -1)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits ``(N, num_classes)`` for NHWC input ``x``."""
        return self.classifier(self.features(x, train=train))


class BasicBlock(nnx.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU.

    The shortcut is a 1x1 conv (no bias) + BN when the stride or the width changes.
    """

    def __init__(self, cin: int, cout: int, stride: int, *, track_running_stats: bool,
                 conv_impl: str | None, rngs: nnx.Rngs):
        kw = dict(use_bias=False, impl=conv_impl, rngs=rngs)
        self.conv1 = Conv2d(cin, cout, 3, stride=stride, padding=1,
                            kernel_init=conv_normal_init(3, cout), **kw)
        self.bn1 = BatchNorm(cout, track_running_stats=track_running_stats, rngs=rngs)
        self.conv2 = Conv2d(cout, cout, 3, stride=1, padding=1,
                            kernel_init=conv_normal_init(3, cout), **kw)
        self.bn2 = BatchNorm(cout, track_running_stats=track_running_stats, rngs=rngs)
        if stride != 1 or cin != cout:
            self.short_conv = Conv2d(cin, cout, 1, stride=stride, padding=0,
                                     kernel_init=conv_normal_init(1, cout), **kw)
            self.short_bn = BatchNorm(cout, track_running_stats=track_running_stats, rngs=rngs)
        else:
            self.short_conv = None
            self.short_bn = None

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        out = self.bn2(self.conv2(out), train=train)
        short = x if self.short_conv is None else self.short_bn(self.short_conv(x), train=train)
        return jax.nn.relu(out + short)


class ResNet(nnx.Module):
    """CIFAR-style ResNet (spec section 1.1): 3x3 stem, 4 stages of basic blocks, GAP, Linear.

    Args:
      num_classes: output logits.
      input_shape: ``(H, W, C)``.
      blocks: blocks per stage, ``(1, 1, 1, 1)`` for ResNet-10, ``(2, 2, 2, 2)`` for ResNet-18.
      width: stem/first-stage width (64 in the spec); stages use ``width * (1, 2, 4, 8)``.
      stem_relu: apply ReLU after the stem BN. The spec's code has none (default ``False``).
      track_running_stats, conv_impl, rngs: as in :class:`Conv4`.
    """

    def __init__(self, num_classes: int, input_shape: Sequence[int], *,
                 blocks: Sequence[int] = (2, 2, 2, 2), width: int = 64, stem_relu: bool = False,
                 track_running_stats: bool = True, conv_impl: str | None = None, rngs: nnx.Rngs):
        c = input_shape[-1]
        self.input_shape = tuple(input_shape)
        self.stem_relu = stem_relu
        self.stem_conv = Conv2d(c, width, 3, padding=1, use_bias=False,
                                kernel_init=conv_normal_init(3, width), impl=conv_impl, rngs=rngs)
        self.stem_bn = BatchNorm(width, track_running_stats=track_running_stats, rngs=rngs)
        layers = []
        cin = width
        for stage, n in enumerate(blocks):
            cout = width * (2 ** stage)
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(BasicBlock(cin, cout, stride, track_running_stats=track_running_stats,
                                         conv_impl=conv_impl, rngs=rngs))
                cin = cout
        self.layers = nnx.List(layers)
        self.feature_dim = cin
        self.classifier = Linear(cin, num_classes, rngs=rngs)

    def features(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Globally average-pooled features ``(N, feature_dim)``."""
        _check_input(x, self.input_shape, "ResNet", any_spatial=True)
        x = self.stem_bn(self.stem_conv(x), train=train)
        if self.stem_relu:
            x = jax.nn.relu(x)
        for block in self.layers:
            x = block(x, train=train)
        return global_avg_pool(x)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits ``(N, num_classes)``."""
        return self.classifier(self.features(x, train=train))


class LeNet5(nnx.Module):
    """LeNet-5 as in IDEAL's ``CNN`` (ideal_dfme spec section 3.6).

    conv5x5(C->16, pad 2, bias) -> BN -> ReLU -> MaxPool2 -> conv5x5(16->32, pad 2, bias) -> BN ->
    ReLU -> MaxPool2 -> flatten -> Linear (1568 inputs at 28x28, 2048 at 32x32). PyTorch default
    initialisation everywhere.

    Args:
      num_classes, input_shape: as in :class:`Conv4`.
      channels: the two conv widths.
      track_running_stats, conv_impl, rngs: as in :class:`Conv4`.
    """

    def __init__(self, num_classes: int, input_shape: Sequence[int], *,
                 channels: Sequence[int] = (16, 32), track_running_stats: bool = True,
                 conv_impl: str | None = None, rngs: nnx.Rngs):
        h, w, c = input_shape
        if min(h, w) < 4:
            raise ValueError(f"LeNet5 needs inputs of at least 4x4, got {h}x{w}.")
        c1, c2 = channels
        self.input_shape = tuple(input_shape)
        self.conv1 = Conv2d(c, c1, 5, padding=2, impl=conv_impl, rngs=rngs)
        self.bn1 = BatchNorm(c1, track_running_stats=track_running_stats, rngs=rngs)
        self.conv2 = Conv2d(c1, c2, 5, padding=2, impl=conv_impl, rngs=rngs)
        self.bn2 = BatchNorm(c2, track_running_stats=track_running_stats, rngs=rngs)
        self.feature_dim = c2 * (h // 4) * (w // 4)
        self.classifier = Linear(self.feature_dim, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits ``(N, num_classes)``."""
        _check_input(x, self.input_shape, "LeNet5")
        x = max_pool2(jax.nn.relu(self.bn1(self.conv1(x), train=train)))
        x = max_pool2(jax.nn.relu(self.bn2(self.conv2(x), train=train)))
        return self.classifier(x.reshape(x.shape[0], -1))


class MLP(nnx.Module):
    """MLP on flattened inputs: Linear-ReLU per hidden layer, then a Linear to the logits.

    IDEAL's MNIST MLP is 784-512-128-K with a softmax inside ``forward``; here the model returns
    logits (the output mode is chosen by the black-box wrapper). No BatchNorm, so ``train`` has no
    effect.

    Args:
      num_classes, input_shape: as in :class:`Conv4`.
      hidden: hidden layer sizes.
      rngs: ``nnx.Rngs``.
    """

    def __init__(self, num_classes: int, input_shape: Sequence[int], *,
                 hidden: Sequence[int] = (512, 128), rngs: nnx.Rngs):
        self.input_shape = tuple(input_shape)
        d = 1
        for s in input_shape:
            d *= int(s)
        dims = [d, *hidden]
        self.hidden = nnx.List([Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.classifier = Linear(dims[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits ``(N, num_classes)``; ``train`` is accepted for interface uniformity."""
        del train
        _check_input(x, self.input_shape, "MLP")
        x = x.reshape(x.shape[0], -1)
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.classifier(x)
