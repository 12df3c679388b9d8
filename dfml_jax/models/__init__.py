"""Models of dfml_jax (Flax NNX) and their pure functional views.

Architectures (registry :data:`MODELS`, built with :func:`create_model`):

============  ==================================================================================
``conv4``     4 x [Conv3x3 (bias) -> BN -> ReLU -> MaxPool2], 32 channels, flatten, Linear.
              Options ``width``, ``depth``, ``global_pool`` (adaptive max pool before the Linear).
``resnet10``  CIFAR-style ResNet, basic blocks [1, 1, 1, 1], widths ``width * (1, 2, 4, 8)``.
``resnet18``  Same with blocks [2, 2, 2, 2]. ``width`` defaults to 64.
``lenet5``    IDEAL's LeNet-5 (two 5x5 conv+BN+pool stages, Linear), option ``channels``.
``mlp``       Flatten, hidden ReLU layers (``hidden=(512, 128)``), Linear.
``dcgan``     Generator of BiDf-MKD/IDEAL (sigmoid) or DFME (``head="tanh_bn"``); options ``nz``,
              ``ngf``, ``img_size``, ``nc``, ``upsample`` (``"subpixel"``: its upsample-conv pairs at
              the lower resolution). Built without ``num_classes``/``input_shape``.
``strokes``   Stroke generator for line drawings (:mod:`dfml_jax.models.strokes`): every image is
              ``num_strokes`` differentiably rendered Bezier strokes; options ``nz``,
              ``img_size``, ``nc``, ``num_strokes``, ``latent`` (``"linear"``/``"direct"``), ...
              (``ngf`` is accepted and ignored). Same functional contract as ``dcgan``.
============  ==================================================================================

Classifier options shared by the conv models: ``track_running_stats`` (``False`` for the
meta-model: no BN state at all, batch statistics always) and ``conv_impl`` (``"im2col"`` default,
or ``"lax"``; see :mod:`dfml_jax.models.layers`).

Inputs are NHWC float32. Dataset images are in [0, 1]; per-dataset normalisation lives in
:mod:`dfml_jax.models.preprocess` and is applied by the caller (or the API wrapper) before the
model.

BatchNorm modes (explicit, never hidden in module attributes):

* teachers / APIs: ``train=False`` -> running statistics (eval mode); training them uses
  ``train=True`` (batch statistics + running-statistics update).
* meta-model: built with ``track_running_stats=False`` (or called through
  :attr:`FunctionalModel.apply_batchstats`): batch statistics in training, adaptation and test
  (transductive), no state.
* generator: always batch statistics (``train=True``, no running statistics by default).

Functional view (the contract other modules rely on)
----------------------------------------------------
``fm = functional(model)`` returns a :class:`FunctionalModel` NamedTuple:

* ``fm.params``: ``nnx.State`` pytree of the ``nnx.Param`` variables (leaves are arrays);
* ``fm.state``: ``nnx.State`` of the BN running statistics (``nnx.BatchStat``), possibly empty;
* ``fm.apply(params, state, x, *, train, **kw) -> (out, new_state)``: pure. ``train=True`` uses
  batch statistics and returns updated running statistics; ``train=False`` uses the running
  statistics and returns ``state`` unchanged. Extra keywords go to the module (e.g.
  ``pre_activation=True`` for the generator);
* ``fm.apply_batchstats(params, x, **kw) -> out``: batch statistics, no state (meta-model,
  generator);
* ``fm.init(key) -> (params, state)``: fresh parameters from a PRNG key with the architecture's
  initialisation (jittable and vmappable over keys);
* ``fm.graphdef``: the NNX graph definition (``nnx.merge(fm.graphdef, params, state)`` rebuilds a
  module).

All functions are pure and close over nothing but the static graph definition, so they can be
jitted once and ``jax.vmap``-ed over a population of parameters with a leading axis, e.g.
``jax.vmap(functools.partial(fm.apply, train=True))(P, S, X)``. They are implemented with
``nnx.merge`` inside the traced function: after ``jax.jit`` this compiles to exactly the same XLA
program as a hand-written functional forward pass (``experiments/bench/bench_conv.py`` measures the
runtime and the trace/compile overhead of both).

Initialisation: every parameter carries its distribution as ``init_spec`` metadata
(:class:`dfml_jax.models.layers.Init`). :func:`create_model` builds the module abstractly and
fills all variables from ONE normal and ONE uniform draw of the key
(:func:`dfml_jax.models.layers.materialize`) in a jitted initialiser cached per configuration:
compiling one threefry draw per tensor costs about a second per tensor on CPU. Results are a
deterministic function of the key, identical under ``jax.vmap`` over keys. (Instantiating the
classes directly, e.g. ``Conv4(..., rngs=nnx.Rngs(0))``, draws tensor by tensor instead: same
distributions, other values.) Population helpers: :func:`stack_trees`, :func:`unstack_tree`.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dfml_jax.models import layers, preprocess
from dfml_jax.models.classifiers import MLP, BasicBlock, Conv4, LeNet5, ResNet
from dfml_jax.models.generator import GENERATOR_HEADS, DCGANGenerator
from dfml_jax.models.layers import count_params, get_default_conv_impl, set_default_conv_impl
from dfml_jax.models.preprocess import DATASET_STATS, NORM_STATS, normalize
from dfml_jax.models.strokes import StrokeGenerator

__all__ = [
    "MODELS", "CLASSIFIERS", "GENERATORS", "create_model", "functional", "FunctionalModel",
    "model_config", "count_params", "Conv4", "ResNet", "BasicBlock", "LeNet5", "MLP",
    "DCGANGenerator", "GENERATOR_HEADS", "StrokeGenerator", "normalize", "NORM_STATS",
    "DATASET_STATS", "layers",
    "preprocess", "get_default_conv_impl", "set_default_conv_impl", "as_rngs",
    "apply_from_graphdef", "stack_trees", "unstack_tree", "scale_kernels",
]


def _resnet10(num_classes, input_shape, *, rngs, **kw):
    return ResNet(num_classes, input_shape, blocks=(1, 1, 1, 1), rngs=rngs, **kw)


def _resnet18(num_classes, input_shape, *, rngs, **kw):
    return ResNet(num_classes, input_shape, blocks=(2, 2, 2, 2), rngs=rngs, **kw)


#: name -> constructor ``f(num_classes, input_shape, *, rngs, **kw)`` (classifiers) or
#: ``f(*, rngs, **kw)`` (generators).
MODELS: dict[str, Callable[..., nnx.Module]] = {
    "conv4": Conv4,
    "resnet10": _resnet10,
    "resnet18": _resnet18,
    "lenet5": LeNet5,
    "mlp": MLP,
    "dcgan": DCGANGenerator,
    "strokes": StrokeGenerator,
}
CLASSIFIERS: tuple[str, ...] = ("conv4", "resnet10", "resnet18", "lenet5", "mlp")
GENERATORS: tuple[str, ...] = ("dcgan", "strokes")


def as_rngs(rngs_or_key: Any) -> nnx.Rngs:
    """Turns an ``nnx.Rngs``, a PRNG key (typed or raw ``uint32[2]``) or an int seed into Rngs.

    Args:
      rngs_or_key: the randomness source.

    Returns:
      ``nnx.Rngs`` with a ``params`` stream.
    """
    if isinstance(rngs_or_key, nnx.Rngs):
        return rngs_or_key
    if isinstance(rngs_or_key, int):
        return nnx.Rngs(params=jax.random.key(rngs_or_key))
    key = rngs_or_key
    if not _is_typed_key(key):
        key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    return nnx.Rngs(params=key)


def _is_typed_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def create_model(name: str, *, num_classes: int | None = None,
                 input_shape: Sequence[int] | None = None, rngs_or_key: Any = 0,
                 **kw) -> nnx.Module:
    """Builds a registered architecture.

    Args:
      name: one of :data:`MODELS` (case-insensitive).
      num_classes: number of logits (classifiers only).
      input_shape: ``(H, W, C)`` of the (normalised) inputs (classifiers only).
      rngs_or_key: ``nnx.Rngs``, PRNG key or int seed for the initialisation.
      **kw: architecture options (see the module docstring), e.g. ``width=8``.

    Returns:
      The NNX module. Its construction arguments are recorded (as a JSON string attribute
      ``config_json``, so that graph definitions stay hashable); :func:`model_config` returns them
      as a dict and ``create_model(**model_config(m))`` rebuilds the architecture.

    Raises:
      ValueError: unknown name (the message lists the valid ones), missing/invalid shapes.
      TypeError: unknown architecture option.
    """
    key = str(name).lower()
    if key not in MODELS:
        raise ValueError(f"Unknown model {name!r}; valid: {', '.join(sorted(MODELS))}.")
    if key in GENERATORS:
        if num_classes is not None or input_shape is not None:
            raise ValueError(f"{key} is a generator: give its options (nz, img_size, nc, ...), not "
                             f"num_classes/input_shape.")
        args: tuple = ()
        config = {"name": key, **_jsonable(kw)}
    else:
        if num_classes is None or input_shape is None:
            raise ValueError(f"create_model({key!r}) needs num_classes and input_shape=(H, W, C).")
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError(f"input_shape must be (H, W, C) with positive sizes, got "
                             f"{input_shape}.")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        args = (int(num_classes), input_shape)
        config = {"name": key, "num_classes": int(num_classes), "input_shape": list(input_shape),
                  **_jsonable(kw)}
    param_key = as_rngs(rngs_or_key).params()
    frozen = tuple(sorted((k, _hashable(v)) for k, v in kw.items()))
    graphdef, init = _constructor(key, args, frozen, get_default_conv_impl())
    model = nnx.merge(graphdef, init(param_key))
    model.config_json = json.dumps(config, sort_keys=True)
    return model


def _hashable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(a) for a in v)
    return v


@functools.lru_cache(maxsize=256)
def _constructor(name: str, args: tuple, frozen_kw: tuple, default_impl: str):
    """Graph definition and a jitted ``key -> state`` initialiser for one configuration.

    Building the variables eagerly compiles one small XLA program per parameter shape, and a
    jitted initialiser with one threefry draw per tensor compiles in ~1 s per tensor on CPU. The
    model is therefore built abstractly (``nnx.eval_shape``) and its variables are filled by
    :func:`dfml_jax.models.layers.materialize` from two flat draws, in a jitted function that is
    compiled once per configuration and reused for every member of a population.
    """
    del default_impl  # part of the cache key: Conv2d reads the process default at construction
    kw = dict(frozen_kw)

    def build():
        return MODELS[name](*args, rngs=nnx.Rngs(params=jax.random.key(0)), **kw)

    graphdef, abstract_state = nnx.split(nnx.eval_shape(build))

    @jax.jit
    def init(key):
        return layers.materialize(abstract_state, key)

    return graphdef, init


def _jsonable(kw: dict) -> dict:
    out = {}
    for k, v in kw.items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def model_config(model: nnx.Module) -> dict:
    """Returns the ``create_model`` arguments (without the key) that rebuild ``model``."""
    cfg = getattr(model, "config_json", None)
    if not isinstance(cfg, str):
        raise ValueError("model_config: this module was not built with create_model().")
    return json.loads(cfg)


def _rebuild(config: dict, key) -> nnx.Module:
    cfg = dict(config)
    name = cfg.pop("name")
    if "input_shape" in cfg:
        cfg["input_shape"] = tuple(cfg["input_shape"])
    for k, v in list(cfg.items()):
        if isinstance(v, list) and k != "input_shape":
            cfg[k] = tuple(v)
    return create_model(name, rngs_or_key=key, **cfg)


class FunctionalModel(NamedTuple):
    """Pure view of an NNX model; see the module docstring for the contract.

    Attributes:
      params: ``nnx.State`` of ``nnx.Param`` variables.
      state: ``nnx.State`` of ``nnx.BatchStat`` running statistics (may be empty).
      apply: ``(params, state, x, *, train, **kw) -> (out, new_state)``.
      apply_batchstats: ``(params, x, **kw) -> out`` with batch statistics and no state.
      init: ``key -> (params, state)`` re-initialisation with the architecture's init.
      graphdef: NNX graph definition.
    """
    params: Any
    state: Any
    apply: Callable[..., tuple[jax.Array, Any]]
    apply_batchstats: Callable[..., jax.Array]
    init: Callable[[jax.Array], tuple[Any, Any]]
    graphdef: Any


def functional(model: nnx.Module) -> FunctionalModel:
    """Splits an NNX model into parameters, BN state and pure apply functions.

    Args:
      model: a module from :func:`create_model` (or any NNX module whose variables are only
        ``nnx.Param`` and ``nnx.BatchStat`` and whose ``__call__`` takes ``(x, *, train)``).

    Returns:
      :class:`FunctionalModel`. ``init`` is available only for modules built by
      :func:`create_model` (it raises otherwise).

    Raises:
      ValueError: the module holds variables other than ``Param``/``BatchStat``.
    """
    try:
        graphdef, params, state = nnx.split(model, nnx.Param, nnx.BatchStat)
    except ValueError as e:  # leftover variable types
        raise ValueError(f"functional(): model has variables other than nnx.Param/nnx.BatchStat "
                         f"({e}).") from e
    cfg = getattr(model, "config_json", None)
    config = json.loads(cfg) if isinstance(cfg, str) else None
    return _functional_from(graphdef, params, state, config)


@functools.lru_cache(maxsize=512)
def apply_from_graphdef(graphdef) -> Callable[..., tuple[jax.Array, Any]]:
    """The pure ``apply(params, state, x, *, train, **kw) -> (out, new_state)`` of a graph.

    Cached per (hashable) graph definition: models of one configuration share ONE function
    object, so caches keyed on it (compiled training epochs, API groups) are shared too.
    """

    def apply(params, state, x, *, train: bool, **kw):
        module = nnx.merge(graphdef, params, state, copy=True)
        out = module(x, train=train, **kw)
        return out, nnx.state(module, nnx.BatchStat)

    return apply


def _functional_from(graphdef, params, state, config) -> FunctionalModel:
    try:
        apply = apply_from_graphdef(graphdef)
    except TypeError:  # unhashable graph (module not built by create_model)
        apply = apply_from_graphdef.__wrapped__(graphdef)

    empty_state = jax.tree.map(lambda a: a, state)

    def apply_batchstats(params, x, **kw):
        module = nnx.merge(graphdef, params, empty_state, copy=True)
        return module(x, train=True, **kw)

    def init(key):
        if config is None:
            raise ValueError("FunctionalModel.init: the model was not built with create_model().")
        _, p, s = nnx.split(_rebuild(config, key), nnx.Param, nnx.BatchStat)
        return p, s

    return FunctionalModel(params=params, state=state, apply=apply,
                           apply_batchstats=apply_batchstats, init=init, graphdef=graphdef)


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stacks identical-structure pytrees along a new leading axis (a population)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(tree: Any, index: int) -> Any:
    """Member ``index`` of a stacked population pytree."""
    return jax.tree.map(lambda a: a[index], tree)


def scale_kernels(params, factor: float):
    """Multiplies every convolution / linear KERNEL of a parameter tree by ``factor``.

    A kernel is a leaf whose path holds the key ``kernel`` (the weight of every ``Conv2d`` and
    ``Linear`` of :mod:`dfml_jax.models`); biases, BatchNorm scales and offsets and any other leaf
    are returned unchanged.

    Args:
      params: a parameter pytree (``nnx.State`` or nested dicts).
      factor: the multiplier.

    Returns:
      ``(scaled params, paths)``: a tree of the same structure, and the ``jax.tree_util.keystr``
      paths of the scaled leaves.

    Raises:
      ValueError: the tree holds no kernel.
    """
    scaled = []

    def one(path, leaf):
        if any(getattr(k, "key", None) == "kernel" for k in path):
            scaled.append(jax.tree_util.keystr(path))
            return leaf * jnp.asarray(factor, leaf.dtype)
        return leaf

    out = jax.tree_util.tree_map_with_path(one, params)
    if not scaled:
        raise ValueError("scale_kernels: no leaf named 'kernel' in the parameters; random_scaled "
                         "needs a meta-model built from dfml_jax.models conv / linear layers.")
    return out, scaled
