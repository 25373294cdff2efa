"""Data parallelism: per-sample statistics where the samples are, reduced across devices.

A batch placed with ``jax.device_put(batch, NamedSharding(mesh, P("data")))`` is split over the
mesh's ``data`` axis along its sample axis. JAX's SPMD partitioner already gives every
quantity its single-device value on such a batch, but the chunked per-sample pass reshapes the
sample axis into chunks, and the partitioner answers that by gathering the batch onto every
device. :func:`over_samples` runs the pass under ``jax.shard_map`` instead: each device goes
through its own samples in chunks of its own memory budget, per-sample outputs stay split
like the batch and sums are added across devices with one ``psum`` (exactly, for
:class:`~lmd4ml.stats.histogram.Counts`). Mesh axes the batch is not split over (a
parameter-sharding axis, say) stay with the partitioner.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lmd4ml.stats._types import PyTree
from lmd4ml.stats.histogram import Counts


class DataAxis(NamedTuple):
    """The mesh axes a batch's sample axis is split over: ``names`` of axes of ``mesh``."""

    mesh: Mesh
    names: tuple[str, ...]


def data_axis(batch: PyTree) -> DataAxis | None:
    """How ``batch`` is split along its sample axis, or ``None`` when it is not split.

    A batch counts as split when every array in it has one ``NamedSharding`` (same mesh,
    same mesh axes on axis 0) and that mesh has more than one device on those axes.

    Example:
      >>> import numpy as np
      >>> data_axis((np.zeros((4, 2)), np.zeros(4))) is None
      True
    """
    axes = {sharding_axis(getattr(x, "sharding", None)) for x in jax.tree.leaves(batch)}
    return axes.pop() if len(axes) == 1 else None


def sharding_axis(sharding: object) -> DataAxis | None:
    """The mesh axes that ``sharding`` splits an array's first (sample) axis over, or ``None``
    when it is no ``NamedSharding`` or splits that axis over one device only.

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
      >>> sharding_axis(NamedSharding(mesh, P("data"))) is None  # one device: not split
      True
    """
    names = sample_axis_names(sharding)
    if names is None or all(sharding.mesh.shape[n] == 1 for n in names):
        return None
    return DataAxis(sharding.mesh, names)


def sample_axis_names(sharding: object) -> tuple[str, ...] | None:
    """The mesh axis names a ``NamedSharding`` puts on an array's first axis; ``None`` for no
    names or another kind of sharding."""
    if not isinstance(sharding, NamedSharding) or not sharding.spec or sharding.spec[0] is None:
        return None
    names = sharding.spec[0]
    return (names,) if isinstance(names, str) else tuple(names)


def params_mesh(params: PyTree) -> Mesh | None:
    """The mesh of more than one device that every leaf of ``params`` is placed on, if any.

    Example:
      >>> import numpy as np
      >>> params_mesh({"w": np.zeros(3)}) is None
      True
    """
    meshes = {_mesh_of(x) for x in jax.tree.leaves(params)}
    mesh = meshes.pop() if len(meshes) == 1 else None
    return mesh if isinstance(mesh, Mesh) and mesh.size > 1 else None


def on_mesh_of(params: PyTree, tree: PyTree) -> PyTree:
    """``tree`` with every leaf not yet on the mesh of ``params`` (:func:`params_mesh`)
    replicated over it; unchanged when ``params`` are on no such mesh.

    A state made by ``init`` from placed params holds new leaves (counters, estimates) on
    one device, which a step over the mesh gives back replicated: the next step would see
    other input shardings and compile again.
    """
    mesh = params_mesh(params)
    if mesh is None:
        return tree
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: x if _mesh_of(x) == mesh else jax.device_put(x, replicated), tree)


def _mesh_of(leaf: object) -> object:
    return getattr(getattr(leaf, "sharding", None), "mesh", None)


def over_samples(
    fn: Callable[[PyTree, PyTree], dict[str, jax.Array]],
    combine: Mapping[str, Literal["concat", "sum"]],
    data: DataAxis,
) -> Callable[[PyTree, PyTree], dict[str, jax.Array]]:
    """``fn(params, batch)`` run on each device's share of the batch, outputs joined across
    devices as ``combine`` says: ``"concat"`` along the sample axis, ``"sum"`` added."""
    split, whole = PartitionSpec(data.names), PartitionSpec()

    def add(v: jax.Array | Counts) -> jax.Array | Counts:
        return v.psum(data.names) if isinstance(v, Counts) else jax.lax.psum(v, data.names)

    def local(params: PyTree, batch: PyTree) -> dict[str, jax.Array]:
        out = fn(params, batch)
        return {k: v if combine[k] == "concat" else add(v) for k, v in out.items()}

    return jax.shard_map(
        local,
        mesh=data.mesh,
        in_specs=(whole, split),
        out_specs={k: split if c == "concat" else whole for k, c in combine.items()},
        axis_names=frozenset(data.names),
        # Ghost norms replay the loss's jaxpr traced outside the map, which carries no
        # record of which values vary across devices; the pass's outputs are declared above.
        check_vma=False,
    )
