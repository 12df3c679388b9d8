"""Shared layers for every model in :mod:`dfml_jax.models`.

One convolution implementation (:func:`conv2d`) is used by all architectures. It has two
back-ends with identical semantics (NHWC inputs, HWIO kernels, symmetric zero padding):

* ``"im2col"`` (the default): the ``kh*kw`` shifted (strided) slices of the padded input are
  concatenated along the channel axis and multiplied with the reshaped kernel in one matmul.
* ``"lax"``: :func:`jax.lax.conv_general_dilated`.

Measured on 2 CPU cores (``experiments/bench/bench_conv.py``, which prints the numbers): im2col is
7-13x faster whenever ``vmap`` batches the kernels (a meta-batch of second-order MAML tasks, a
population of teachers: lax's batching rule turns these into grouped convolutions, which XLA:CPU
runs slowly) and 1.3-1.6x faster for second-order MAML on one task; lax is 2-3x faster for
single-model forward passes and first-order gradients, and ~5x for eval-mode forward passes of
1024 images (API queries). The default is im2col, because the training loops of this library
are vmapped and second-order; :func:`dfml_jax.teachers.load_pool` builds its black-box APIs with
``"lax"``. Change it per model (``conv_impl=...``) or globally with
:func:`set_default_conv_impl`.

Activations are NHWC by default. :func:`conv2d`, :func:`batch_norm` and :func:`max_pool2` also
take channel-major ``"CNHW"`` activations (``layout=`` / ``channel_axis=0``; kernels stay HWIO),
with which im2col's matmuls need no transposes: the forward is ``(C_out, K) @ (K, N*H*W)`` and
the kernel gradient contracts the minor axis of both operands, which XLA:CPU's matmul takes as
it is, where in NHWC it materialises the transposes of the patches and of the output gradient
(the row ``kd_task`` of ``experiments/bench/bench_torch_reference.py`` measures both).

The other layers (BatchNorm, pooling, upsampling, Linear) are written as pure functions plus thin
Flax NNX modules that hold the variables, so the NNX models and their functional views (see
:mod:`dfml_jax.models`) execute exactly the same arithmetic.

BatchNorm follows PyTorch semantics: normalisation uses the biased batch variance, the running
variance is updated with the unbiased one, ``running = (1 - momentum) * running + momentum * batch``
with ``momentum=0.1``, ``eps=1e-5``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "CONV_IMPLS", "LAYOUTS", "get_default_conv_impl", "set_default_conv_impl", "conv2d",
    "conv2d_im2col", "conv2d_lax", "batch_norm", "max_pool2", "global_max_pool", "global_avg_pool",
    "upsample_nearest2", "upsample2_conv3x3", "UPSAMPLE_CONV_IMPLS", "Init", "torch_uniform_init",
    "conv_normal_init", "normal_init", "zeros_init", "ones_init", "materialize", "leaky_relu",
    "count_params", "Conv2d", "BatchNorm", "Linear",
]

ConvImpl = Literal["im2col", "lax"]
CONV_IMPLS: tuple[str, ...] = ("im2col", "lax")
_DEFAULT_CONV_IMPL: list[str] = ["im2col"]
#: Activation layouts of :func:`conv2d` / :func:`max_pool2` (kernels are HWIO in both).
LAYOUTS: tuple[str, ...] = ("NHWC", "CNHW")


def get_default_conv_impl() -> str:
    """Returns the convolution back-end used when a model is built without ``conv_impl``."""
    return _DEFAULT_CONV_IMPL[0]


def set_default_conv_impl(impl: str) -> None:
    """Sets the process-wide default convolution back-end for models built afterwards.

    Args:
      impl: ``"im2col"`` or ``"lax"``.

    Raises:
      ValueError: for any other name.
    """
    _check_impl(impl)
    _DEFAULT_CONV_IMPL[0] = impl


def _check_impl(impl: str) -> str:
    if impl not in CONV_IMPLS:
        raise ValueError(f"Unknown conv_impl {impl!r}; valid: {', '.join(CONV_IMPLS)}.")
    return impl


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}.")
    return layout


def _out_size(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def conv2d_im2col(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0,
                  layout: str = "NHWC") -> jax.Array:
    """Convolution as im2col: shifted slices concatenated on channels, then one matmul.

    Args:
      x: ``(N, H, W, C_in)`` input (``(C_in, N, H, W)`` with ``layout="CNHW"``).
      kernel: ``(kh, kw, C_in, C_out)`` kernel (HWIO).
      stride: spatial stride (both axes).
      padding: symmetric zero padding (both axes).
      layout: ``"NHWC"`` or ``"CNHW"`` (input and output).

    Returns:
      ``(N, H_out, W_out, C_out)`` (``(C_out, N, H_out, W_out)``) with
      ``H_out = (H + 2*padding - kh) // stride + 1``.
    """
    kh, kw, cin, cout = kernel.shape
    cm = _check_layout(layout) == "CNHW"
    hax, cax = (2, 0) if cm else (1, -1)
    if x.shape[cax] != cin:
        raise ValueError(f"conv2d: input has {x.shape[cax]} channels ({layout}), kernel expects "
                         f"{cin}.")
    if padding:
        pads = [(0, 0)] * 4
        pads[hax] = pads[hax + 1] = (padding, padding)
        x = jnp.pad(x, pads)
    h, w = x.shape[hax], x.shape[hax + 1]
    ho, wo = _out_size(h, kh, stride, 0), _out_size(w, kw, stride, 0)
    cols = [_spatial_slice(x, hax, slice(i, i + (ho - 1) * stride + 1, stride),
                           slice(j, j + (wo - 1) * stride + 1, stride))
            for i in range(kh) for j in range(kw)]
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=cax)
    k2 = kernel.reshape(kh * kw * cin, cout)
    if cm:
        n = x.shape[1]
        return (k2.T @ patches.reshape(kh * kw * cin, n * ho * wo)).reshape(cout, n, ho, wo)
    return patches @ k2


def _spatial_slice(x: jax.Array, hax: int, rows: slice, cols: slice) -> jax.Array:
    """``x`` sliced on its two spatial axes ``hax``, ``hax + 1`` (the others whole)."""
    idx = [slice(None)] * x.ndim
    idx[hax], idx[hax + 1] = rows, cols
    return x[tuple(idx)]


def conv2d_lax(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0,
               layout: str = "NHWC") -> jax.Array:
    """Same contract as :func:`conv2d_im2col`, computed with ``lax.conv_general_dilated``."""
    layout = _check_layout(layout)
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
        dimension_numbers=(layout, "HWIO", layout))


def conv2d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, stride: int = 1,
           padding: int = 0, impl: str | None = None, layout: str = "NHWC") -> jax.Array:
    """2-D convolution (HWIO kernels), the single implementation every model uses.

    Args:
      x: ``(N, H, W, C_in)`` input, or ``(C_in, N, H, W)`` with ``layout="CNHW"``.
      kernel: ``(kh, kw, C_in, C_out)``.
      bias: optional ``(C_out,)``.
      stride: spatial stride.
      padding: symmetric zero padding.
      impl: ``"im2col"`` or ``"lax"``; ``None`` uses :func:`get_default_conv_impl`.
      layout: one of :data:`LAYOUTS`, of the input and the output.

    Returns:
      ``(N, H_out, W_out, C_out)`` (``(C_out, N, H_out, W_out)`` for ``"CNHW"``).

    >>> x = jax.random.normal(jax.random.key(0), (2, 6, 5, 3))
    >>> k = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    >>> a = conv2d(x, k, padding=1)
    >>> b = conv2d(x.transpose(3, 0, 1, 2), k, padding=1, layout="CNHW").transpose(1, 2, 3, 0)
    >>> a.shape, bool(jnp.allclose(a, b, atol=1e-5))
    ((2, 6, 5, 4), True)
    """
    impl = _check_impl(impl or get_default_conv_impl())
    fn = conv2d_im2col if impl == "im2col" else conv2d_lax
    y = fn(x, kernel, stride=stride, padding=padding, layout=layout)
    if bias is not None:
        y = y + (bias if layout == "NHWC" else bias[:, None, None, None])
    return y


def batch_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None,
               mean: jax.Array | None, var: jax.Array | None, *, use_batch_stats: bool,
               momentum: float = 0.1, eps: float = 1e-5, channel_axis: int = -1
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """PyTorch-style BatchNorm over all axes but the channel axis.

    Args:
      x: ``(..., C)`` input (``(C, ...)`` with ``channel_axis=0``).
      scale, bias: affine parameters ``(C,)`` or ``None`` (no affine transform).
      mean, var: running statistics ``(C,)`` or ``None`` (not tracked).
      use_batch_stats: normalise with the statistics of ``x`` (training / transductive mode);
        otherwise with the running statistics (which must then be given).
      momentum: running-statistics momentum (PyTorch convention).
      eps: variance epsilon.
      channel_axis: ``-1`` (NHWC activations) or ``0`` (CNHW).

    Returns:
      ``(y, new_stats)`` where ``new_stats`` is ``(new_mean, new_var)`` when batch statistics were
      used and running statistics are tracked, else ``None``.
    """
    if channel_axis not in (-1, 0):
        raise ValueError(f"batch_norm: channel_axis must be -1 or 0, got {channel_axis}.")
    cm = channel_axis == 0
    axes = tuple(range(1, x.ndim)) if cm else tuple(range(x.ndim - 1))

    def per_channel(a):  # a (C,) vector broadcast against x
        return a.reshape((-1,) + (1,) * (x.ndim - 1)) if cm and a is not None else a

    new_stats = None
    if use_batch_stats:
        mu = jnp.mean(x, axis=axes, keepdims=cm)
        v = jnp.mean(jnp.square(x - mu), axis=axes, keepdims=cm)
        if mean is not None and var is not None:
            n = math.prod(x.shape[a] for a in axes)
            unbiased = v * (n / max(n - 1, 1))
            new_stats = (
                (1.0 - momentum) * mean + momentum * jax.lax.stop_gradient(mu.reshape(mean.shape)),
                (1.0 - momentum) * var + momentum * jax.lax.stop_gradient(
                    unbiased.reshape(var.shape)),
            )
    else:
        if mean is None or var is None:
            raise ValueError("batch_norm: running statistics are not tracked by this layer; "
                             "use batch statistics (train=True / apply_batchstats).")
        mu, v = per_channel(mean), per_channel(var)
    y = (x - mu) * jax.lax.rsqrt(v + eps)
    if scale is not None:
        y = y * per_channel(scale)
    if bias is not None:
        y = y + per_channel(bias)
    return y, new_stats


def _pool_windows(x, layout: str = "NHWC"):
    """The four strided sub-grids of a 2x2 / stride-2 pool (floor mode) over the spatial axes
    of ``layout``."""
    hax = 2 if layout == "CNHW" else 1
    h, w = x.shape[hax] // 2 * 2, x.shape[hax + 1] // 2 * 2
    return tuple(_spatial_slice(x, hax, slice(a, h, 2), slice(b, w, 2))
                 for a, b in ((0, 0), (1, 0), (0, 1), (1, 1)))


def max_pool2(x: jax.Array, layout: str = "NHWC") -> jax.Array:
    """2x2 max pool, stride 2, floor mode (odd trailing rows/columns are dropped, as in PyTorch).

    The elementwise maximum of the four strided sub-grids, with the derivative of ``jnp.max``
    (ties share the tangent equally) written on the same sub-grids: selects and one division at
    every order, no scatter as in ``lax.reduce_window``'s. The earlier reshape + ``jnp.max``
    form was miscompiled by XLA:CPU under ``jit`` in a second-order derivative (a Conv4 of width
    32 on 16x16 inputs: Hessian-vector products 18% off the eager and finite-difference values in
    float64 on one device, 32% in float32 on 8 emulated devices; measured by
    ``experiments/bench/bench_max_pool2.py``, guarded by ``tests/test_models.py``); values and
    gradients are bit-identical to it elsewhere, second derivatives at tied windows to rounding.

    Args:
      x: ``(N, H, W, C)`` (``(C, N, H, W)`` with ``layout="CNHW"``).
      layout: one of :data:`LAYOUTS`.
    """
    return _max_pool2(x, _check_layout(layout))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_pool2(x: jax.Array, layout: str) -> jax.Array:
    a, b, c, d = _pool_windows(x, layout)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


@_max_pool2.defjvp
def _max_pool2_jvp(layout, primals, tangents):
    (x,), (t,) = primals, tangents
    out = _max_pool2(x, layout)  # not jnp.maximum again: its derivative would split ties unevenly
    hits = [(v == out).astype(x.dtype) for v in _pool_windows(x, layout)]
    count = (hits[0] + hits[1]) + (hits[2] + hits[3])
    ts = _pool_windows(t, layout)
    return out, ((ts[0] * hits[0] + ts[1] * hits[1]) + (ts[2] * hits[2] + ts[3] * hits[3])) / count


def global_max_pool(x: jax.Array) -> jax.Array:
    """Adaptive max pool to 1x1, flattened: ``(N, H, W, C) -> (N, C)``."""
    return jnp.max(x, axis=(1, 2))


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Global average pool: ``(N, H, W, C) -> (N, C)``."""
    return jnp.mean(x, axis=(1, 2))


def upsample_nearest2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour upsampling by 2 on both spatial axes."""
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
    return x.reshape(n, 2 * h, 2 * w, c)


#: How :func:`upsample2_conv3x3` computes "nearest x2 upsampling, then a 3x3 convolution".
UPSAMPLE_CONV_IMPLS: tuple[str, ...] = ("upsample_then_conv", "subpixel")


def _phase_taps(k: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """The 2-tap kernels that output phases 0 and 1 of a 3-tap kernel see after upsampling x2.

    Output row ``2i`` reads upsampled rows ``2i-1, 2i, 2i+1`` = input rows ``i-1, i, i``; output
    row ``2i+1`` reads ``2i, 2i+1, 2i+2`` = input rows ``i, i, i+1``.
    """
    t0, t1, t2 = (jnp.take(k, i, axis=axis) for i in range(3))
    return jnp.stack([t0, t1 + t2], axis=axis), jnp.stack([t0 + t1, t2], axis=axis)


def upsample2_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *,
                      method: str = "upsample_then_conv", impl: str | None = None) -> jax.Array:
    """Nearest-neighbour upsampling by 2, then a 3x3 convolution with zero padding 1.

    ``method="upsample_then_conv"`` computes it literally. ``method="subpixel"`` computes the
    same function at the INPUT resolution: each of the four output phases ``(a, b)`` (output
    pixel ``(2i+a, 2j+b)``) is a 2x2 convolution of the input whose taps are sums of the 3x3
    kernel's taps (:func:`_phase_taps`), and the phases are interleaved. That is 4 x 4 = 16 taps
    at ``H x W`` instead of 9 taps at ``2H x 2W`` (2.25x fewer multiply-adds); the result equals
    the literal form up to float rounding (the kernel's taps are summed before, not after, the
    products). Both run through :func:`conv2d`.

    Args:
      x: ``(N, H, W, C_in)`` input (before upsampling).
      kernel: ``(3, 3, C_in, C_out)`` HWIO kernel.
      bias: optional ``(C_out,)``.
      method: one of :data:`UPSAMPLE_CONV_IMPLS`.
      impl: convolution back-end of :func:`conv2d`.

    Returns:
      ``(N, 2H, 2W, C_out)``.

    >>> x = jax.random.normal(jax.random.key(0), (2, 4, 5, 3))
    >>> k = jax.random.normal(jax.random.key(1), (3, 3, 3, 8))
    >>> a = upsample2_conv3x3(x, k)
    >>> b = upsample2_conv3x3(x, k, method="subpixel")
    >>> a.shape, bool(jnp.allclose(a, b, atol=1e-5))
    ((2, 8, 10, 8), True)
    """
    if method not in UPSAMPLE_CONV_IMPLS:
        raise ValueError(f"upsample2_conv3x3: unknown method {method!r}; valid: "
                         f"{', '.join(UPSAMPLE_CONV_IMPLS)}.")
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"upsample2_conv3x3: needs a 3x3 kernel, got {kernel.shape[:2]}.")
    if method == "upsample_then_conv":
        return conv2d(upsample_nearest2(x), kernel, bias, padding=1, impl=impl)
    n, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    phases = []
    for a, kr in enumerate(_phase_taps(kernel, 0)):
        for b, kc in enumerate(_phase_taps(kr, 1)):
            phases.append(conv2d(xp[:, a : a + h + 1, b : b + w + 1], kc, impl=impl))
    y = jnp.stack(phases).reshape(2, 2, n, h, w, -1)
    y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * h, 2 * w, -1)
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------- initialisers

class Init(NamedTuple):
    """A parameter initialiser that also describes itself (stored as ``init_spec`` metadata).

    ``kind`` is ``"normal"`` (``a`` = mean, ``b`` = std), ``"uniform"`` (``a`` = low, ``b`` = high)
    or ``"const"`` (``a`` = value). Calling it draws one array; :func:`materialize` instead fills
    all parameters of a model from two flat draws (one normal, one uniform), which compiles in a
    second instead of ~1 s per parameter tensor for per-tensor threefry draws on CPU.
    """
    kind: str
    a: float
    b: float = 0.0

    def __call__(self, key, shape, dtype=jnp.float32):
        if self.kind == "normal":
            return self.a + self.b * jax.random.normal(key, shape, dtype)
        if self.kind == "uniform":
            return jax.random.uniform(key, shape, dtype, self.a, self.b)
        if self.kind == "const":
            return jnp.full(shape, self.a, dtype)
        raise ValueError(f"Unknown init kind {self.kind!r}; valid: normal, uniform, const.")


def torch_uniform_init(fan_in: int) -> Init:
    """PyTorch's default ``Linear``/``Conv`` init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return Init("uniform", -bound, bound)


def conv_normal_init(k: int, c_out: int) -> Init:
    """``N(0, 2 / (k*k*C_out))`` (He/fan-out init used by Conv4 and the ResNets of the spec)."""
    return Init("normal", 0.0, math.sqrt(2.0 / (k * k * c_out)))


def normal_init(std: float, mean: float = 0.0) -> Init:
    """``N(mean, std^2)``."""
    return Init("normal", float(mean), float(std))


zeros_init = Init("const", 0.0)
ones_init = Init("const", 1.0)


def _param(init: Init, rngs: nnx.Rngs | None, shape, cls=nnx.Param):
    if not isinstance(init, Init):
        raise TypeError(f"initialisers must be dfml_jax.models.layers.Init, got {init!r}.")
    if init.kind == "const" or rngs is None:
        value = init(None, shape)
    else:
        value = init(rngs.params(), shape)
    return cls(value, init_spec=init)


def materialize(state: Any, key: jax.Array) -> Any:
    """Fills every variable of an (abstract) NNX state from its ``init_spec`` metadata.

    All ``normal`` variables are slices of ONE ``jax.random.normal`` draw and all ``uniform`` ones
    of ONE ``jax.random.uniform`` draw (in the state's flattening order), so the result is a
    deterministic function of ``key`` that is also identical under ``jax.vmap`` over keys.

    Args:
      state: ``nnx.State`` whose leaves are variables carrying ``init_spec`` (values may be
        ``ShapeDtypeStruct``).
      key: PRNG key.

    Returns:
      The state with concrete values.

    Raises:
      ValueError: a variable has no ``init_spec``.
    """
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    leaves, treedef = jax.tree.flatten(state, is_leaf=is_var)
    specs = []
    for v in leaves:
        spec = v.get_metadata().get("init_spec") if is_var(v) else None
        if spec is None:
            raise ValueError(f"materialize: variable {v!r} has no init_spec metadata; build "
                             f"parameters with dfml_jax.models.layers.Init initialisers.")
        specs.append(Init(*spec))
    sizes = [math.prod(v.shape) for v in leaves]
    kn, ku = jax.random.split(key)
    draws = {}
    for kind, k in (("normal", kn), ("uniform", ku)):
        total = sum(n for n, sp in zip(sizes, specs) if sp.kind == kind)
        if total:
            draws[kind] = (jax.random.normal(k, (total,)) if kind == "normal"
                           else jax.random.uniform(k, (total,)))
    offsets = {"normal": 0, "uniform": 0}
    out = []
    for v, n, sp in zip(leaves, sizes, specs):
        if sp.kind == "const":
            val = jnp.full(v.shape, sp.a, jnp.float32)
        else:
            o = offsets[sp.kind]
            raw = draws[sp.kind][o:o + n].reshape(v.shape)
            offsets[sp.kind] = o + n
            val = sp.a + sp.b * raw if sp.kind == "normal" else sp.a + (sp.b - sp.a) * raw
        out.append(v.replace(value=val))
    return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- NNX modules

class Conv2d(nnx.Module):
    """Square convolution (HWIO kernel) computed by :func:`conv2d`.

    Args:
      in_ch, out_ch: channels.
      kernel_size: ``k`` for a ``k x k`` kernel.
      stride, padding: as in :func:`conv2d`.
      use_bias: add a learnable bias.
      kernel_init, bias_init: :class:`Init` initialisers; defaults are PyTorch's uniform.
      impl: convolution back-end (``None``: process default at construction time).
      layout: activation layout (:data:`LAYOUTS`).
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int = 1, use_bias: bool = True, kernel_init=None, bias_init=None,
                 impl: str | None = None, layout: str = "NHWC", rngs: nnx.Rngs):
        fan_in = in_ch * kernel_size * kernel_size
        kernel_init = kernel_init or torch_uniform_init(fan_in)
        bias_init = bias_init or torch_uniform_init(fan_in)
        self.kernel = _param(kernel_init, rngs, (kernel_size, kernel_size, in_ch, out_ch))
        self.bias = _param(bias_init, rngs, (out_ch,)) if use_bias else None
        self.stride = stride
        self.padding = padding
        self.impl = _check_impl(impl or get_default_conv_impl())
        self.layout = _check_layout(layout)

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return conv2d(x, self.kernel[...], bias, stride=self.stride, padding=self.padding,
                      impl=self.impl, layout=self.layout)


class BatchNorm(nnx.Module):
    """BatchNorm with an explicit mode flag (no hidden train/eval attribute).

    Args:
      num_features: channels.
      affine: learnable ``scale``/``bias`` parameters.
      track_running_stats: keep ``mean``/``var`` as ``nnx.BatchStat`` (teachers). Without them the
        layer always normalises with batch statistics (meta-model, generator).
      momentum, eps: PyTorch conventions.
      scale_init: initialiser of ``scale`` (default ones).
      channel_axis: ``-1`` (NHWC activations) or ``0`` (CNHW).
      rngs: ``nnx.Rngs`` (used only by a random ``scale_init``).
    """

    def __init__(self, num_features: int, *, affine: bool = True, track_running_stats: bool = True,
                 momentum: float = 0.1, eps: float = 1e-5, scale_init=None, channel_axis: int = -1,
                 rngs: nnx.Rngs):
        scale_init = scale_init or ones_init
        if affine:
            self.scale = _param(scale_init, rngs, (num_features,))
            self.bias = _param(zeros_init, rngs, (num_features,))
        else:
            self.scale = None
            self.bias = None
        if track_running_stats:
            self.mean = _param(zeros_init, None, (num_features,), nnx.BatchStat)
            self.var = _param(ones_init, None, (num_features,), nnx.BatchStat)
        else:
            self.mean = None
            self.var = None
        self.momentum = momentum
        self.eps = eps
        self.channel_axis = channel_axis

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Normalises ``x``.

        Args:
          x: ``(..., C)`` (``(C, ...)`` with ``channel_axis=0``).
          train: ``True`` uses batch statistics and updates the running statistics (if tracked);
            ``False`` uses the running statistics, or batch statistics if none are tracked.

        Returns:
          The normalised ``x``.
        """
        tracked = self.mean is not None
        use_batch = train or not tracked
        y, new = batch_norm(
            x, None if self.scale is None else self.scale[...],
            None if self.bias is None else self.bias[...],
            self.mean[...] if tracked else None, self.var[...] if tracked else None,
            use_batch_stats=use_batch, momentum=self.momentum, eps=self.eps,
            channel_axis=self.channel_axis)
        if new is not None:
            self.mean[...] = new[0]
            self.var[...] = new[1]
        return y


class Linear(nnx.Module):
    """Dense layer ``x @ kernel + bias`` with ``kernel`` of shape ``(in, out)``.

    Args:
      in_features, out_features: sizes.
      use_bias: add a bias.
      kernel_init, bias_init: initialisers; defaults are PyTorch's uniform.
      rngs: ``nnx.Rngs``.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 kernel_init=None, bias_init=None, rngs: nnx.Rngs):
        kernel_init = kernel_init or torch_uniform_init(in_features)
        bias_init = bias_init or torch_uniform_init(in_features)
        self.kernel = _param(kernel_init, rngs, (in_features, out_features))
        self.bias = _param(bias_init, rngs, (out_features,)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def leaky_relu(x: jax.Array, slope: float = 0.2) -> jax.Array:
    """LeakyReLU with a fixed negative slope."""
    return jnp.where(x >= 0, x, slope * x)


def count_params(tree) -> int:
    """Number of scalar entries in a pytree (e.g. an ``nnx.State`` of parameters)."""
    return int(sum(math.prod(l.shape) for l in jax.tree.leaves(tree)))


