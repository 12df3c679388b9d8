"""Device meshes and sharding helpers: one code path for 1 CPU, 8 GPUs and a multi-host TPU slice.

dfml_jax parallelises along one mesh axis (``"data"`` by default) built with :func:`jax.make_mesh`
(``AxisType.Auto``: the compiler propagates shardings through ``jit``):

* **black-box work** (the samples and zero-order directions of an inversion) runs inside
  :func:`jax.shard_map`, so that each device's host callback answers only that device's shard,
  in parallel host threads (under a plain sharded ``jit`` a ``pure_callback`` would receive the
  whole gathered array, once);
* **white-box work** (the generator, the meta-model, the MAML outer gradient) runs under ``jit``
  with :class:`~jax.sharding.NamedSharding` constraints: parameters replicated, batch/task axes
  sharded, gradients all-reduced by the compiler.

Helpers here build the mesh with clear errors (:func:`make_mesh`, :func:`check_divisible`), place
arrays (:func:`shard_batch`, :func:`replicate`, :func:`constrain_batch`), wrap ``shard_map``
(:func:`shard_over`, :func:`shard_offset`) and start multi-host runs
(:func:`initialize_multihost`, :func:`global_batch`).

Multi-host (a TPU slice, several GPU nodes): start the same command on every host with
``--multihost`` (which calls :func:`jax.distributed.initialize`; on Cloud TPU it needs no argument,
elsewhere set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``). The mesh
then spans every host's devices; each host's callbacks answer only the shards of its own devices
(each host's ledger counts its own queries), and per-host data enters through
:func:`global_batch`.

Example:
  >>> mesh = make_mesh(1)
  >>> mesh.shape["data"], check_divisible(12, mesh, what="batch")
  (1, 12)
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Union

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["AXIS", "P", "make_mesh", "mesh_size", "check_divisible", "valid_device_counts",
           "largest_valid_count", "batch_sharding", "replicated_sharding", "shard_batch",
           "replicate", "constrain_batch", "shard_over", "shard_offset", "sharded_group_query",
           "initialize_multihost", "global_batch", "resolve_devices"]

AXIS = "data"


def _describe(devices) -> str:
    kinds = {}
    for d in devices:
        kinds.setdefault(f"{d.platform}", []).append(d.id)
    return ", ".join(f"{len(ids)} {k} (ids {ids[0]}..{ids[-1]})" for k, ids in kinds.items())


def resolve_devices(devices: Union[None, int, Sequence[Any]] = None, *, local: bool = False) -> list:
    """The devices a run uses: all (None), the first ``n`` (an int) or an explicit list.

    Args:
      devices: None, a count or a list of devices.
      local: choose among this host's devices (``jax.local_devices()``) instead of all hosts'.

    Returns:
      A list of distinct devices.

    Raises:
      ValueError: ``n < 1``, more devices asked for than exist (the message lists them), an empty
        list or a repeated device.
    """
    have = jax.local_devices() if local else jax.devices()
    if devices is None:
        return list(have)
    if isinstance(devices, int) or (hasattr(devices, "__index__") and not hasattr(devices, "__len__")):
        n = int(devices)
        if n < 1:
            raise ValueError(f"the device count must be >= 1, got {n}")
        if n > len(have):
            raise ValueError(
                f"asked for {n} devices but only {len(have)} exist: {_describe(have)}. Pass "
                f"--devices between 1 and {len(have)} (emulate more CPU devices with "
                "jax.config.update('jax_num_cpu_devices', N) before JAX starts).")
        return list(have[:n])
    devs = list(devices)
    if not devs:
        raise ValueError("the device list is empty; pass None (all devices), a count or devices")
    if len(set(devs)) != len(devs):
        raise ValueError(f"the device list repeats a device: {devs}")
    return devs


def make_mesh(devices: Union[None, int, Sequence[Any]] = None, axis: str = AXIS) -> Mesh:
    """A 1-D ``jax.make_mesh`` mesh (``AxisType.Auto``) over the chosen devices.

    Args:
      devices: None (all devices, of every host in a multi-host run), a count ``n`` (the first
        ``n``), or a list of :class:`jax.Device`.
      axis: the mesh axis name.

    Returns:
      A :class:`jax.sharding.Mesh` with one axis ``axis``.

    Raises:
      ValueError: asking for more devices than exist (the message lists what is there).
    """
    devs = resolve_devices(devices)
    return jax.make_mesh((len(devs),), (axis,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devs)


def mesh_size(mesh: Optional[Mesh], axis: str = AXIS) -> int:
    """Number of devices along ``axis`` (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[axis])


def valid_device_counts(size: int, limit: Optional[int] = None) -> list:
    """Device counts ``1..limit`` that divide ``size`` (``limit``: the devices that exist)."""
    limit = len(jax.devices()) if limit is None else int(limit)
    return [d for d in range(1, limit + 1) if size % d == 0]


def largest_valid_count(sizes: Sequence[int], limit: Optional[int] = None) -> int:
    """The largest device count ``<= limit`` dividing every size in ``sizes``."""
    limit = len(jax.devices()) if limit is None else int(limit)
    return max(d for d in range(1, limit + 1) if all(s % d == 0 for s in sizes))


def check_divisible(size: int, mesh: Union[Mesh, int, None], *, what: str = "batch",
                    axis: str = AXIS, fix: str = "") -> int:
    """Checks that ``size`` splits evenly over the mesh; returns the per-device size.

    Raises:
      ValueError: naming the size, the device count, the valid device counts and the fix.
    """
    n = mesh if isinstance(mesh, int) else mesh_size(mesh, axis)
    if size % n:
        raise ValueError(
            f"{what} of {size} cannot be split evenly over {n} devices ({size} % {n} = "
            f"{size % n}). Valid device counts for {size}: {valid_device_counts(size)}"
            f"{'; or ' + fix if fix else ''}.")
    return size // n


def batch_sharding(mesh: Mesh, axis: str = AXIS) -> NamedSharding:
    """Leading axis sharded over ``axis``, the rest replicated."""
    return NamedSharding(mesh, P(axis))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Fully replicated over the mesh."""
    return NamedSharding(mesh, P())


def shard_batch(tree, mesh: Mesh, axis: str = AXIS):
    """``device_put`` every leaf with its leading axis sharded (sizes must divide)."""
    for leaf in jax.tree.leaves(tree):
        check_divisible(leaf.shape[0], mesh, what="leading axis", axis=axis)
    return jax.device_put(tree, batch_sharding(mesh, axis))


def replicate(tree, mesh: Mesh):
    """``device_put`` every leaf replicated on every device of the mesh."""
    return jax.device_put(tree, replicated_sharding(mesh))


def constrain_batch(tree, mesh: Optional[Mesh], axis: str = AXIS):
    """Inside ``jit``: ask for the leading axis of every leaf sharded over ``axis``.

    A no-op without a mesh or on a 1-device mesh. Sizes that do not divide are padded by the
    compiler (use :func:`check_divisible` beforehand where an even split matters).
    """
    if mesh is None or mesh_size(mesh, axis) == 1:
        return tree
    return jax.lax.with_sharding_constraint(tree, batch_sharding(mesh, axis))


def shard_over(fn: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
    """``jax.shard_map(fn, mesh=mesh, in_specs=..., out_specs=...)`` for black-box work.

    Inside ``fn`` every array has its per-device shape; host callbacks (``BlackBoxAPI`` queries)
    run once per device on that device's shard. ``check_vma`` is off because host callbacks
    carry no varying-manual-axes information.
    """
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def sharded_group_query(group, mesh: Mesh, axis: str = AXIS) -> Callable:
    """``query(index, x, operand)``: an :class:`~dfml_jax.api.APIGroup` answering ``x``
    (leading axis sharded over ``axis``) with one host call per device shard, jitted once.

    Unlike an eager ``api(x)`` (which gathers ``x`` to the host), this also works when ``x`` spans
    several hosts: each host answers its own devices' rows. Pass ``operand`` already on the mesh
    (:func:`replicate`), as every argument of one jitted call must live on the same devices.
    """
    def local(index, x, operand):
        return group(index, x, operand)

    specs = (P(), P(axis), P())
    return jax.jit(shard_over(local, mesh, specs, P(axis)))


def shard_offset(local_size: int, axis: str = AXIS) -> jax.Array:
    """Inside :func:`shard_over`: the global index of this device's first element."""
    return jax.lax.axis_index(axis) * local_size


def initialize_multihost(**kwargs) -> dict:
    """Starts JAX's multi-host runtime (``jax.distributed.initialize``) and describes it.

    On Cloud TPU slices no argument is needed; on GPU clusters set ``JAX_COORDINATOR_ADDRESS``
    (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` or pass
    ``coordinator_address=``, ``num_processes=``, ``process_id=``. Call before any other JAX use.

    Returns:
      ``{"process_index", "process_count", "local_devices", "global_devices"}``.
    """
    env = {"coordinator_address": os.environ.get("JAX_COORDINATOR_ADDRESS"),
           "num_processes": os.environ.get("JAX_NUM_PROCESSES"),
           "process_id": os.environ.get("JAX_PROCESS_ID")}
    for k, v in env.items():
        if v is not None and k not in kwargs:
            kwargs[k] = int(v) if k != "coordinator_address" else v
    jax.distributed.initialize(**kwargs)
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "global_devices": jax.device_count()}


def global_batch(local_tree, mesh: Mesh, axis: str = AXIS):
    """Per-host data -> one global array sharded over ``axis`` (multi-host data loading).

    Each host passes the rows it loaded or sampled itself (its devices' share of the leading
    axis); the result is a global ``jax.Array`` whose leading axis is the concatenation over
    hosts. On one host it is :func:`shard_batch`.
    """
    sharding = batch_sharding(mesh, axis)
    if jax.process_count() == 1:
        return shard_batch(local_tree, mesh, axis)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local_tree)
