"""Training of teacher classifiers as populations (the API-pool recipe).

Many small teachers of ONE architecture are trained together: their parameters, BN running
statistics, optimiser states and data are stacked on a leading population axis, and one jitted
function runs a whole epoch for all of them. Per teacher the epoch is a ``lax.scan`` over its
mini-batches; over the population it is either ``jax.vmap`` (strategy ``"vmap"``) or ``lax.map``,
a loop inside the same compiled program (strategy ``"map"``). Teacher ``i`` only ever sees its own
data, shuffling key and parameters, so the result equals training it alone (up to float
reassociation, which Adam amplifies for parameters whose true gradient is zero, e.g. conv biases
in front of BatchNorm).

Strategy: ``vmap`` is the natural choice on accelerators. On CPU, XLA runs the batched matmuls
that ``vmap`` makes of the per-teacher matmuls several times slower per FLOP than unbatched ones,
so ``"map"`` is the CPU default (:func:`default_strategy`); ``experiments/bench/bench_pool.py``
measures both against training one teacher at a time. The population axis can also be split over several
devices (``devices=``: ``jax.shard_map`` over a 1-D ``"teachers"`` mesh, each device running the
strategy on its share), e.g. several GPUs, or emulated CPU devices that each run on their own
thread.

Recipe (``shared/specs/bidf_mkd.md`` section 1.1): batch 128, cross-entropy, gradient-norm
clipping at 50, the learning rate stepped per epoch by a MultiStep schedule (gamma 0.2).

* Conv4: Adam(lr 0.01), milestones [70].
* ResNet-10/18: SGD(lr 0.01, momentum 0.9, weight decay 5e-4, PyTorch-style coupled decay after
  clipping), milestones [30, 50, 80].
* LeNet-5 / MLP (not in the spec): IDEAL's ``pretrain.py`` recipe, SGD(lr 0.1, momentum 0.9), no
  weight decay, no schedule (``ideal_dfme.md`` section 3.6).

Augmentation (``TrainRecipe.augment``, a name of :data:`dfml_jax.training.augment.AUGMENTATIONS`):
the official code trains its APIs without any (``"none"``, the paper's recipe and the default of
:data:`RECIPES`). Pools default to the domain-faithful choice of their dataset
(:func:`default_augment`): ``"crop"`` (random shift by up to ``augment_pad`` pixels, zero i.e.
black border, never a mirror image) for glyphs, handwriting and digits, whose identity changes
under a horizontal flip, and ``"crop_flip"`` for natural images. Each mini-batch is augmented
inside the compiled epoch with a fresh per-sample draw; the keys are a pure function of the
teacher's key, the epoch and the step, so a teacher trained in a population, on another device
or alone sees the same augmented images.

Each epoch visits every training sample once, in a fresh per-teacher permutation, as PyTorch's
``DataLoader(shuffle=True, drop_last=False)`` does: ``n // batch`` full batches plus one final
smaller batch of ``n % batch`` samples (a second static shape in the same compiled epoch). The
final weights are returned (the spec's "best checkpoint" is, through a bug in the original code,
the last epoch too: section 9.9).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dfml_jax import parallel
from dfml_jax.models import FunctionalModel
from dfml_jax.teachers.recipe import (DEFAULT_AUGMENT, RECIPES, TrainRecipe, augment_pad_for,
                                      default_augment, make_optimizer, recipe_for, resolve_augment)
from dfml_jax.training.augment import augment_images

__all__ = ["TrainRecipe", "RECIPES", "recipe_for", "make_optimizer", "PopulationResult",
           "train_population", "evaluate_population", "predict_population",
           "population_sharding", "resolve_devices", "teacher_mesh", "TEACHER_AXIS",
           "STRATEGIES", "default_strategy", "DEFAULT_AUGMENT", "default_augment",
           "resolve_augment", "augment_pad_for", "TRAINER_VERSION"]

#: Version of the training program (what an epoch does with a recipe); part of pool build keys.
#: Bump it for any change of the trained weights the recipe fields do not describe.
#: v2: per-sample augmentation inside the epoch (``TrainRecipe.augment``).
TRAINER_VERSION = 2


class PopulationResult(NamedTuple):
    """Output of :func:`train_population`.

    Attributes:
      params: stacked parameters ``(P, ...)``.
      state: stacked BN running statistics ``(P, ...)``.
      losses: ``(epochs, P)`` mean training loss per epoch and teacher.
    """
    params: Any
    state: Any
    losses: np.ndarray


def _trace_guard(fn, what: str):
    """Raises if ``fn`` (to be wrapped by ``jax.jit``) is traced more than once.

    ``chex.assert_max_traces`` counts traces per definition site, so it cannot guard functions
    built by a cached factory (one compiled function per configuration); this guard counts per
    closure instead.
    """
    count = [0]

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] > 1:
            raise AssertionError(
                f"{what} was traced a second time (shapes or dtypes of its inputs changed between "
                f"calls); it is compiled once per (model, recipe, data size, population size).")
        return fn(*args, **kwargs)

    return wrapped


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


#: How a population is mapped inside the jitted epoch: ``"vmap"`` (batched kernels) or ``"map"``
#: (``lax.map``: a loop over teachers inside the same compiled program).
STRATEGIES = ("vmap", "map")


def default_strategy() -> str:
    """``"map"`` on CPU, ``"vmap"`` on accelerators.

    XLA:CPU runs batched matmuls (the ``vmap`` of per-teacher matmuls) several times slower per
    FLOP than unbatched ones, so on CPU a loop over teachers inside the compiled epoch is 2-3x
    faster than ``vmap`` (``experiments/bench/bench_pool.py``). Both give the same results.
    """
    return "map" if jax.default_backend() == "cpu" else "vmap"


#: Stream tag of the augmentation keys (``fold_in(teacher key, _AUG_STREAM)``), apart from the
#: shuffling keys ``fold_in(teacher key, epoch)``.
_AUG_STREAM = 0x61756700


def _augment_keys(key: jax.Array, epoch_idx, steps: int) -> jax.Array:
    """``(steps,)`` augmentation keys of one teacher's epoch (a pure function of its key)."""
    return jax.random.split(jax.random.fold_in(jax.random.fold_in(key, _AUG_STREAM), epoch_idx),
                            steps)


@functools.lru_cache(maxsize=64)
def _epoch_fn(fm_apply, recipe: TrainRecipe, n: int, population: int, devices: tuple,
              strategy: str, fill: tuple = (0.0,)):
    """Jitted ``(params, state, opt, x, y, keys, epoch) -> (params, state, opt, loss)``.

    Cached per (model, recipe, data size, population size, devices, strategy, fill) so that
    training many populations of the same shape (e.g. teachers one at a time) compiles once; each
    cached function may trace only once (:func:`_trace_guard`). With several ``devices`` the epoch
    is a ``jax.shard_map`` over the teacher axis: every device runs the strategy's program on its
    own ``population / len(devices)`` teachers (no communication at all). ``recipe.augment_pad``
    must be resolved (an int) when ``recipe.augment`` is not ``"none"``.
    """
    bs = min(recipe.batch_size, n)
    n_full, rest = divmod(n, bs)
    steps = n_full + (1 if rest else 0)
    tx = make_optimizer(recipe, steps)
    augment = recipe.augment

    def augmented(xb, k):
        if augment == "none":
            return xb
        return augment_images(xb, k, augment, int(recipe.augment_pad), fill)

    def step(p, s, o, x, y):
        def loss_fn(p):
            logits, new_s = fm_apply(p, s, x, train=True)
            return _ce(logits, y), new_s

        (loss, new_s), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), new_s, o, loss

    def teacher_epoch(p, s, o, x, y, key, epoch_idx):
        """One epoch of ONE teacher: ``n // bs`` full batches (scan) + one batch of the rest.

        Step ``t`` augments its batch with ``_augment_keys(key, epoch, steps)[t]``."""
        perm = jax.random.permutation(jax.random.fold_in(key, epoch_idx), n)
        aug_keys = _augment_keys(key, epoch_idx, steps)

        def body(carry, batch):
            idx, k = batch
            p, s, o = carry
            p, s, o, loss = step(p, s, o, augmented(x[idx], k), y[idx])
            return (p, s, o), loss * idx.shape[0]

        carry, total = (p, s, o), jnp.zeros(())
        if n_full:
            carry, losses = jax.lax.scan(
                body, carry, (perm[: n_full * bs].reshape(n_full, bs), aug_keys[:n_full]))
            total = total + losses.sum()
        if rest:
            carry, loss = body(carry, (perm[n_full * bs:], aug_keys[n_full]))
            total = total + loss
        return (*carry, total / n)

    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown population strategy {strategy!r}; valid: {', '.join(STRATEGIES)}.")
    local = population // max(len(devices), 1)  # teachers per device

    def epoch(params, state, opt, x, y, keys, epoch_idx):
        args = (params, state, opt, x, y, keys)
        if local == 1:  # one teacher: a plain unbatched program, whatever the strategy
            one = jax.tree.map(lambda a: a[0], args)
            return jax.tree.map(lambda a: a[None], teacher_epoch(*one, epoch_idx))
        if strategy == "vmap":
            return jax.vmap(teacher_epoch, in_axes=(0, 0, 0, 0, 0, 0, None))(*args, epoch_idx)
        return jax.lax.map(lambda a: teacher_epoch(*a, epoch_idx), args)

    if len(devices) > 1:
        mesh = teacher_mesh(devices)
        spec = jax.sharding.PartitionSpec(TEACHER_AXIS)
        epoch = jax.shard_map(epoch, mesh=mesh, out_specs=spec,
                              in_specs=(spec,) * 6 + (jax.sharding.PartitionSpec(),))
    return jax.jit(_trace_guard(epoch, "train_population's epoch step")), tx


#: Name of the mesh axis a population is split over.
TEACHER_AXIS = "teachers"


def resolve_devices(devices: int | Sequence[jax.Device] | None, population: int | None = None, *,
                    strict: bool = True) -> tuple[jax.Device, ...]:
    """The devices to split a population of ``population`` teachers over.

    Args:
      devices: ``None`` (one device: no split), a device count (the first ``devices`` of
        ``jax.local_devices()``) or a sequence of devices.
      population: number of teachers of the population (``None``: not checked).
      strict: with ``False`` a count that does not divide ``population`` is lowered to the
        largest one that does (used for the default "all local devices").

    Returns:
      A tuple of distinct devices (length 1: no split).

    Raises:
      ValueError: a count below 1, more devices than exist (the error lists them), repeated
        devices, or (``strict``) a count that does not divide ``population`` (the error names both
        numbers and the valid counts).

    Example:
      >>> len(resolve_devices(None, 20))
      1
    """
    local = jax.local_devices()
    if devices is None:
        return (local[0],)
    devs = tuple(parallel.resolve_devices(devices, local=True))
    if population is not None and population % len(devs):
        if not strict:
            return devs[:parallel.largest_valid_count([population], len(devs))]
        valid = parallel.valid_device_counts(population, len(local))
        raise ValueError(
            f"{len(devs)} devices do not divide the {population} teachers of a population "
            f"(each device trains an equal share); valid device counts for {population} teachers "
            f"and {len(local)} local devices: {valid}.")
    return devs


def teacher_mesh(devices: Sequence[jax.Device]) -> jax.sharding.Mesh:
    """1-D mesh (axis :data:`TEACHER_AXIS`, ``AxisType.Auto``) over ``devices``."""
    return parallel.make_mesh(list(devices), axis=TEACHER_AXIS)


def population_sharding(population: int, devices: int | Sequence[jax.Device] | None):
    """``NamedSharding(mesh, P("teachers"))`` splitting a population over devices, or ``None``.

    Args:
      population: number of teachers (the leading axis).
      devices: as in :func:`resolve_devices` (strict).

    Returns:
      The sharding, or ``None`` for a single device.

    Raises:
      ValueError: see :func:`resolve_devices`.
    """
    devs = resolve_devices(devices, population)
    if len(devs) < 2:
        return None
    return jax.sharding.NamedSharding(teacher_mesh(devs),
                                      jax.sharding.PartitionSpec(TEACHER_AXIS))


def train_population(fm: FunctionalModel, params: Any, state: Any, x: jax.Array, y: jax.Array,
                     keys: jax.Array, recipe: TrainRecipe, *, progress: bool = True,
                     desc: str = "teachers", devices: int | Sequence[jax.Device] | None = None,
                     strategy: str | None = None,
                     fill: float | Sequence[float] = 0.0) -> PopulationResult:
    """Trains P teachers of one architecture together (one jitted call per epoch for all).

    Args:
      fm: functional view of the architecture (only ``apply`` is used; compiled epochs are cached
        per ``fm.apply``, so reuse one view for many populations of the same architecture).
      params: stacked initial parameters ``(P, ...)``.
      state: stacked initial BN running statistics ``(P, ...)``.
      x: ``(P, n, H, W, C)`` normalised training images of each teacher.
      y: ``(P, n)`` int labels in ``[0, num_classes)``.
      keys: ``(P,)`` typed PRNG keys of each teacher: per-epoch shuffling and, with
        ``recipe.augment``, the per-step augmentation draws.
      recipe: optimisation recipe (``epochs`` and ``augment`` included).
      progress: show a tqdm bar over epochs.
      desc: progress-bar label.
      devices: split the teacher axis over devices (``jax.shard_map`` on a 1-D ``"teachers"``
        mesh; parameters, optimiser states and data are placed with
        ``NamedSharding(mesh, P("teachers"))``): a count (the first N local devices) or a sequence
        of devices; must divide P. ``None``: one device. Each device runs ``strategy`` on its
        share; the result equals the single-device one up to float reassociation.
      strategy: ``"vmap"`` (vectorised population) or ``"map"`` (loop over teachers inside the
        compiled epoch); default :func:`default_strategy` (``"map"`` on CPU, where it is faster).
      fill: the value of a black pixel in ``x``'s space, one per channel or a constant: the crop
        augmentation's border (``-mean / std`` for images normalised with ``mean``/``std``).

    Returns:
      :class:`PopulationResult` with the final (last-epoch) weights (sharded like the inputs when
      ``devices`` split them).

    Raises:
      ValueError: inconsistent population sizes or shapes, unknown strategy or augmentation, a
        device count that does not divide P or exceeds the local devices.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    P = x.shape[0]
    _check_population(params, state, x, y, keys)
    recipe, fill_t = _resolved_recipe(recipe, x, fill)
    n = int(x.shape[1])
    strategy = strategy or default_strategy()
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown population strategy {strategy!r}; valid: {', '.join(STRATEGIES)}.")
    devs = resolve_devices(devices, P)
    dev_key = devs if len(devs) > 1 else ()
    # the compiled epoch does not depend on the number of epochs: keep it out of the cache key
    epoch_fn, tx = _epoch_fn(fm.apply, dataclasses.replace(recipe, epochs=0), n, P, dev_key,
                             strategy, fill_t)
    opt = jax.vmap(tx.init)(params)
    if len(devs) > 1:
        sharding = population_sharding(P, devs)
        params, state, opt, x, y, keys = jax.device_put((params, state, opt, x, y, keys), sharding)
    losses = []
    bar = tqdm(range(recipe.epochs), desc=desc, disable=not progress, leave=False)
    for e in bar:
        params, state, opt, loss = epoch_fn(params, state, opt, x, y, keys, jnp.int32(e))
        losses.append(loss)
        if progress:
            bar.set_postfix(loss=f"{float(jnp.mean(loss)):.3f}")
    losses = np.stack([np.asarray(l) for l in losses]) if losses else np.zeros((0, P), np.float32)
    return PopulationResult(params, state, losses)


def _check_population(params, state, x, y, keys) -> None:
    P = x.shape[0]
    sizes = {P, y.shape[0], keys.shape[0]} | {a.shape[0] for a in jax.tree.leaves((params, state))}
    if len(sizes) != 1:
        raise ValueError(f"train_population: the leading (population) axes differ: {sorted(sizes)}. "
                         f"Stack params, state, x, y and keys for the same P teachers.")
    if x.ndim != 5 or y.shape != x.shape[:2]:
        raise ValueError(f"train_population: expected x (P, n, H, W, C) and y (P, n), got "
                         f"{x.shape} and {y.shape}.")


def _resolved_recipe(recipe: TrainRecipe, x, fill):
    """The recipe with its augmentation and crop pad resolved, and the crop's fill per channel."""
    if recipe.epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {recipe.epochs}.")
    augment = resolve_augment(recipe.augment)
    fill_t = tuple(float(v) for v in np.ravel(np.asarray(fill, np.float64)))
    if len(fill_t) not in (1, x.shape[-1]):
        raise ValueError(f"train_population: fill has {len(fill_t)} values for {x.shape[-1]} "
                         f"channels; give one value or one per channel.")
    if augment == "none":
        return dataclasses.replace(recipe, augment=augment, augment_pad=None), (0.0,)
    recipe = dataclasses.replace(recipe, augment=augment,
                                 augment_pad=augment_pad_for(recipe, int(x.shape[2])))
    if recipe.augment_pad < 0:
        raise ValueError(f"augment_pad must be >= 0, got {recipe.augment_pad}.")
    return recipe, fill_t


@functools.lru_cache(maxsize=64)
def _predict_fn(fm_apply, batch: int, shapes: tuple):
    """Jitted eval-mode logits of a population; one cached function (one trace) per shape."""
    del shapes  # cache key only

    def predict(params, state, x):
        def one(p, s, xs):
            def chunk(_, xb):
                return None, fm_apply(p, s, xb, train=False)[0]
            n = xs.shape[0]
            m = n // batch
            out = []
            if m:
                _, full = jax.lax.scan(chunk, None, xs[: m * batch].reshape(m, batch, *xs.shape[1:]))
                out.append(full.reshape(m * batch, -1))
            if n % batch:
                out.append(fm_apply(p, s, xs[m * batch:], train=False)[0])
            return jnp.concatenate(out, 0)
        return jax.vmap(one)(params, state, x)

    return jax.jit(_trace_guard(predict, "predict_population"))


def predict_population(fm: FunctionalModel, params: Any, state: Any, x: jax.Array, *,
                       batch_size: int = 256) -> jax.Array:
    """Eval-mode (running-statistics) logits of each teacher on its own images.

    Args:
      fm: functional view of the architecture.
      params, state: stacked ``(P, ...)``.
      x: ``(P, n, H, W, C)`` normalised images.
      batch_size: evaluation chunk size (memory bound only; results do not depend on it).

    Returns:
      ``(P, n, num_classes)`` logits.
    """
    x = jnp.asarray(x)
    leaves = jax.tree.leaves((params, state))
    shapes = (x.shape, str(x.dtype), tuple(l.shape for l in leaves))
    return _predict_fn(fm.apply, int(batch_size), shapes)(params, state, x)


def evaluate_population(fm: FunctionalModel, params: Any, state: Any, x: jax.Array,
                        y: jax.Array, *, batch_size: int = 256) -> np.ndarray:
    """Eval-mode accuracy of each teacher on its own labelled images.

    Args:
      fm, params, state, x, batch_size: as in :func:`predict_population`.
      y: ``(P, n)`` labels.

    Returns:
      ``(P,)`` float accuracies (NaN for a teacher with no images).
    """
    if x.shape[1] == 0:
        return np.full((x.shape[0],), np.nan)
    logits = predict_population(fm, params, state, x, batch_size=batch_size)
    return np.asarray(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y), axis=1))
