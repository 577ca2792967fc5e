r"""Meshes and FSDP-style partition specs for running GSM on many devices.

:func:`optax_gsm.gsm` and :func:`optax_gsm.global_top_q` need no special
code to run under :func:`jax.jit` on a :class:`jax.sharding.Mesh`: their
threshold selection is made of elementwise operations and per-leaf sums, so
XLA's SPMD partitioner keeps every leaf where it is and only all-reduces
scalar counts. The selection stays *global*: it ranks the scores of all
eligible weights of the whole model, computed from the gradient averaged over
all data-parallel replicas, exactly as on one device (see
``docs/distributed.md`` for the communication per step).

This module holds the small helpers a user needs around that:

* :func:`parse_mesh_shape` and :func:`make_mesh` turn a string such as
  ``"data=4,model=2"`` into a mesh, with clear errors;
* :func:`fsdp_partition_specs` shards the largest divisible axis of every
  large leaf of a pytree (params, or the optimizer state from
  ``jax.eval_shape(tx.init, params)``) over a mesh axis;
* :func:`validate_partition_specs` checks a pytree of
  :class:`~jax.sharding.PartitionSpec` against a pytree of arrays and a mesh
  before :func:`jax.jit` or :func:`jax.device_put` would fail with a less
  specific message;
* :func:`named_shardings` maps specs to :class:`~jax.sharding.NamedSharding`.

Example:
  A data-parallel + FSDP step (a sketch; ``loss_fn`` and ``batch`` are yours)::

    mesh = make_mesh("data=4,model=2")
    tx = optax_gsm.gsm(0.1, compression=10)
    p_specs = fsdp_partition_specs(params, mesh, axis="model")
    s_specs = fsdp_partition_specs(jax.eval_shape(tx.init, params), mesh,
                                   axis="model")
    p_sh, s_sh = named_shardings(p_specs, mesh), named_shardings(s_specs, mesh)
    b_sh = NamedSharding(mesh, PartitionSpec("data"))

    @partial(jax.jit, in_shardings=(p_sh, s_sh, b_sh),
             out_shardings=(p_sh, s_sh))
    def step(params, state, batch):
      grads = jax.grad(loss_fn)(params, batch)   # mean over the global batch
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

PyTree = Any
MeshLike = Union[Mesh, Mapping[str, int], Any]
AxisSpec = Union[str, Sequence[str]]

_AXIS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

__all__ = (
  "fsdp_partition_specs",
  "make_mesh",
  "mesh_axis_sizes",
  "named_shardings",
  "parse_mesh_shape",
  "validate_partition_specs",
)


def parse_mesh_shape(spec: str) -> dict[str, int]:
  """Parses a mesh shape string ``"name=size,name=size,..."``.

  Axis names are Python identifiers; sizes are positive integers, and at most
  one size may be ``-1``, meaning "all remaining devices" (resolved by
  :func:`make_mesh`). Whitespace around names, sizes and commas is ignored.

  Args:
    spec: the string, for example ``"data=4,model=2"``.

  Returns:
    A dict from axis name to size, in the order given (the mesh's axis order).

  Raises:
    TypeError: if ``spec`` is not a string.
    ValueError: if an entry is not ``name=size``, a name is repeated or not an
      identifier, a size is not an integer >= 1 (or ``-1``), or more than one
      size is ``-1``.

  Example:
    >>> parse_mesh_shape("data=4,model=2")
    {'data': 4, 'model': 2}
    >>> parse_mesh_shape(" fsdp = -1 ")
    {'fsdp': -1}
    >>> parse_mesh_shape("data=4,model")
    Traceback (most recent call last):
    ...
    ValueError: mesh shape 'data=4,model': entry 'model' is not of the form ...
  """
  if not isinstance(spec, str):
    raise TypeError(
      f"mesh shape must be a string like \"data=4,model=2\", got "
      f"{spec!r} of type {type(spec).__name__}."
    )
  if not spec.strip():
    raise ValueError(
      f"mesh shape {spec!r} is empty; expected \"name=size,...\" such as \"data=4,model=2\"."
    )
  out: dict[str, int] = {}
  for entry in spec.split(","):
    entry = entry.strip()
    if entry.count("=") != 1:
      raise ValueError(
        f"mesh shape {spec!r}: entry {entry!r} is not of the form name=size "
        "(e.g. \"data=4,model=2\")."
      )
    name, size = (part.strip() for part in entry.split("="))
    if not _AXIS_NAME.match(name):
      raise ValueError(f"mesh shape {spec!r}: axis name {name!r} is not a Python identifier.")
    if name in out:
      raise ValueError(f"mesh shape {spec!r}: axis name {name!r} appears more than once.")
    try:
      value = int(size)
    except ValueError:
      raise ValueError(
        f"mesh shape {spec!r}: size {size!r} of axis {name!r} is not an integer."
      ) from None
    if value < 1 and value != -1:
      raise ValueError(
        f"mesh shape {spec!r}: size {value} of axis {name!r} must be >= 1 "
        "(or -1 for all remaining devices)."
      )
    out[name] = value
  if sum(v == -1 for v in out.values()) > 1:
    raise ValueError(f"mesh shape {spec!r}: at most one axis size may be -1.")
  return out


def make_mesh(
  spec: Union[str, Mapping[str, int]], *, devices: Optional[Sequence[Any]] = None
) -> Mesh:
  """Builds a :class:`jax.sharding.Mesh` over all devices from a shape spec.

  The mesh covers *every* device (of all processes, under
  :func:`jax.distributed.initialize`), so the product of the sizes must equal
  the device count; a ``-1`` size takes whatever is left. The axes are
  ``AxisType.Auto``, so that :func:`jax.jit` with ``in_shardings`` /
  ``out_shardings`` lets XLA partition the computation (the mode the GSM
  transformations are tested in).

  Args:
    spec: a string for :func:`parse_mesh_shape` (``"data=4,model=2"``) or a
      mapping from axis name to size.
    devices: the devices to lay out; default :func:`jax.devices`.

  Returns:
    A mesh with the given axis names and sizes, devices laid out by
    :func:`jax.make_mesh`.

  Raises:
    TypeError: if ``spec`` is neither a string nor a mapping.
    ValueError: if the spec is malformed (see :func:`parse_mesh_shape`) or the
      product of the sizes is not the number of devices.

  Example:
    >>> import jax
    >>> n = jax.device_count()
    >>> mesh = make_mesh(f"data={n}")
    >>> dict(mesh.shape) == {'data': n}
    True
    >>> make_mesh(f"data={n},model=3")
    Traceback (most recent call last):
    ...
    ValueError: mesh shape ... devices, but there are ... devices ...
  """
  if isinstance(spec, str):
    shape = parse_mesh_shape(spec)
    shown = repr(spec)
  elif isinstance(spec, Mapping):
    shown = repr(dict(spec))
    if not spec:
      raise ValueError("mesh shape mapping is empty; give at least one axis.")
    for k, v in spec.items():
      if not isinstance(k, str) or not _AXIS_NAME.match(k):
        raise ValueError(f"mesh shape {shown}: axis name {k!r} is not a Python identifier.")
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(
          f"mesh shape {shown}: size of axis {k!r} must be an int, got "
          f"{v!r} of type {type(v).__name__}."
        )
      if v < 1 and v != -1:
        raise ValueError(
          f"mesh shape {shown}: size {v} of axis {k!r} must be >= 1 (or -1 "
          "for all remaining devices)."
        )
    if sum(v == -1 for v in spec.values()) > 1:
      raise ValueError(f"mesh shape {shown}: at most one axis size may be -1.")
    shape = {k: int(v) for k, v in spec.items()}
  else:
    raise TypeError(
      f"mesh shape must be a string like \"data=4,model=2\" or a mapping "
      f"name -> size, got {spec!r} of type {type(spec).__name__}."
    )
  if devices is None:
    devices = jax.devices()
  devices = list(devices)
  n = len(devices)
  known = math.prod(v for v in shape.values() if v != -1)
  if -1 in shape.values():
    if known == 0 or n % known:
      raise ValueError(
        f"mesh shape {shown}: the other axes have {known} devices, which "
        f"does not divide the {n} devices available, so the -1 axis cannot "
        "be sized."
      )
    shape = {k: (n // known if v == -1 else v) for k, v in shape.items()}
  total = math.prod(shape.values())
  if total != n:
    raise ValueError(
      f"mesh shape {shown} has {' x '.join(map(str, shape.values()))} = "
      f"{total} devices, but there are {n} devices "
      f"({devices[0].platform if devices else 'none'}); the product of the "
      "axis sizes must equal the device count. On CPU, emulate more devices "
      "with jax.config.update('jax_num_cpu_devices', N) or "
      "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX "
      "starts."
    )
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is None:
    # jax < 0.5 has no axis types: every mesh axis is what later became Auto.
    return jax.make_mesh(tuple(shape.values()), tuple(shape.keys()), devices=devices)
  return jax.make_mesh(
    tuple(shape.values()),
    tuple(shape.keys()),
    axis_types=(axis_type.Auto,) * len(shape),
    devices=devices,
  )


def mesh_axis_sizes(mesh: MeshLike) -> dict[str, int]:
  """The axis sizes of a mesh: a :class:`~jax.sharding.Mesh`, an
  :class:`~jax.sharding.AbstractMesh` or a plain ``{name: size}`` mapping.

  Raises:
    TypeError: for anything else, or a non-int size.

  Example:
    >>> mesh_axis_sizes({'data': 4, 'model': 2})
    {'data': 4, 'model': 2}
  """
  shape = getattr(mesh, "shape", None) if not isinstance(mesh, Mapping) else mesh
  if not isinstance(shape, Mapping):
    raise TypeError(
      f"mesh must be a jax.sharding.Mesh, an AbstractMesh or a mapping "
      f"axis name -> size, got {mesh!r} of type {type(mesh).__name__}."
    )
  out = {}
  for k, v in shape.items():
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise TypeError(f"mesh axis {k!r} must have a positive int size, got {v!r}.")
    out[str(k)] = int(v)
  return out


def on_mesh(arrays: Sequence[Any]) -> bool:
  """Whether any of ``arrays`` is placed on a mesh of more than one device.

  For the library's own choices of layout (:mod:`optax_gsm.budget`,
  :mod:`optax_gsm.fast_select`): under :func:`jax.jit` a value computed from
  arrays sharded over a mesh carries that (abstract) mesh in its type, also
  with automatic axes; on one device the mesh is empty. Anything without a
  mesh (numpy, Python scalars, a jax without :func:`jax.typeof`) counts as
  not.
  """
  for x in arrays:
    try:
      shape = jax.typeof(x).sharding.mesh.shape
      size = math.prod(int(v) for v in dict(shape).values())
    except Exception:  # no sharding or no mesh (one device, numpy, old jax)
      continue
    if size > 1:
      return True
  return False


def _axis_names(axis: Any, sizes: Mapping[str, int], argname: str) -> tuple[str, ...]:
  """Normalises a mesh-axis entry (a name or a tuple of names); checks it."""
  names = (axis,) if isinstance(axis, str) else axis
  if (
    not isinstance(names, (tuple, list)) or not names or not all(isinstance(a, str) for a in names)
  ):
    raise TypeError(
      f"`{argname}` must be a mesh axis name or a tuple of names, got "
      f"{axis!r} of type {type(axis).__name__}."
    )
  for a in names:
    if a not in sizes:
      raise ValueError(
        f"`{argname}`={axis!r}: {a!r} is not an axis of the mesh; the mesh axes are {tuple(sizes)}."
      )
  if len(set(names)) != len(names):
    raise ValueError(f"`{argname}`={axis!r} names a mesh axis twice.")
  return tuple(names)


def _shape_of(leaf: Any) -> Optional[tuple[int, ...]]:
  shape = getattr(leaf, "shape", None)
  if shape is None:
    if isinstance(leaf, (int, float, complex, bool, np.number)):
      return ()
    return None
  return tuple(int(d) for d in shape)


def fsdp_partition_specs(
  tree: PyTree, mesh: MeshLike, axis: AxisSpec = "model", *, min_size: int = 2**14
) -> PyTree:
  r"""FSDP-style specs: shard the largest divisible axis of each large leaf.

  For every leaf with :math:`\mathrm{size} \ge` ``min_size`` the spec shards
  the largest dimension :math:`d` *other than the last* with
  :math:`d \bmod S = 0` over ``axis``, where :math:`S` is the size of
  ``axis`` (the product of the sizes when ``axis`` is a tuple of names);
  among equally large dimensions the first wins. The last dimension is
  sharded only when no other one divides: the ``"search"`` selection splits
  the last axis into rows of up to 32 keys, and a shard of the last axis that
  is not a multiple of the row width would make XLA regather the leaf in
  every counting pass. Smaller leaves, scalars and leaves with no divisible dimension are
  replicated (``PartitionSpec()``). The rule depends only on shapes, so
  applying it to the params and to ``jax.eval_shape(tx.init, params)`` shards
  the momentum (and any score average) exactly like the weights it belongs
  to, while GSM's scalar state (count, Q, threshold) stays replicated.

  Args:
    tree: a pytree of arrays or :class:`jax.ShapeDtypeStruct`.
    mesh: a :class:`~jax.sharding.Mesh`, an
      :class:`~jax.sharding.AbstractMesh`, or a ``{name: size}`` mapping.
    axis: the mesh axis (or tuple of axes) to shard over.
    min_size: leaves with fewer entries stay replicated (an int >= 0).

  Returns:
    A pytree of :class:`~jax.sharding.PartitionSpec` with the structure of
    ``tree``.

  Raises:
    ValueError: if ``axis`` is not an axis of ``mesh`` or ``min_size < 0``.
    TypeError: if ``mesh``, ``axis`` or ``min_size`` has the wrong type.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'w': jnp.zeros((6, 8)), 'b': jnp.zeros(8),
    ...           'odd': jnp.zeros((3, 5))}
    >>> specs = fsdp_partition_specs(params, {'data': 2, 'model': 4}, 'model',
    ...                              min_size=8)
    >>> {k: tuple(s) for k, s in specs.items()}
    {'b': ('model',), 'odd': (), 'w': (None, 'model')}
    >>> fsdp_partition_specs(params, {'data': 2}, 'model')
    Traceback (most recent call last):
    ...
    ValueError: `axis`='model': 'model' is not an axis of the mesh; ...
  """
  sizes = mesh_axis_sizes(mesh)
  names = _axis_names(axis, sizes, "axis")
  if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)):
    raise TypeError(f"`min_size` must be an int, got {min_size!r}.")
  if min_size < 0:
    raise ValueError(f"`min_size` must be >= 0, got {min_size}.")
  s = math.prod(sizes[a] for a in names)
  entry = names[0] if len(names) == 1 else names

  def spec(leaf):
    shape = _shape_of(leaf)
    if not shape or math.prod(shape) < min_size:
      return PartitionSpec()
    best = None
    # The last axis only as a fallback: the "search" backend splits the last
    # axis into rows, and rows that straddle shards make XLA regather them.
    for i, d in enumerate(shape[:-1]):
      if d > 0 and d % s == 0 and (best is None or d > shape[best]):
        best = i
    if best is None and shape[-1] > 0 and shape[-1] % s == 0:
      best = len(shape) - 1
    if best is None:
      return PartitionSpec()
    parts: list[Any] = [None] * len(shape)
    parts[best] = entry
    while parts and parts[-1] is None:
      parts.pop()
    return PartitionSpec(*parts)

  return jax.tree.map(spec, tree)


def validate_partition_specs(
  tree: PyTree, specs: PyTree, mesh: MeshLike, *, name: str = "specs"
) -> None:
  """Checks that ``specs`` can shard ``tree`` on ``mesh``; raises otherwise.

  A spec is valid for a leaf when it is a :class:`~jax.sharding.PartitionSpec`
  with at most ``leaf.ndim`` entries, each entry is ``None``, a mesh axis name
  or a tuple of names, no mesh axis is used twice, and every sharded dimension
  is divisible by the product of the sizes of its mesh axes (JAX requires
  evenly divisible input shardings).

  Args:
    tree: a pytree of arrays or :class:`jax.ShapeDtypeStruct`.
    specs: a pytree of ``PartitionSpec`` with the structure of ``tree`` (a
      single ``PartitionSpec`` is applied to every leaf).
    mesh: a mesh or ``{name: size}`` mapping (see :func:`mesh_axis_sizes`).
    name: how the specs are called in error messages.

  Returns:
    None.

  Raises:
    TypeError: if a spec is not a ``PartitionSpec`` or an entry is not a
      name, a tuple of names or None.
    ValueError: if the structures differ, a spec has more entries than its
      leaf has dimensions, names an axis that is not in the mesh or twice, or
      a dimension is not divisible by its mesh axes.

  Example:
    >>> import jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {'w': jnp.zeros((6, 8))}
    >>> validate_partition_specs(params, {'w': P(None, 'model')}, {'model': 4})
    >>> validate_partition_specs(params, {'w': P('model')}, {'model': 4})
    Traceback (most recent call last):
    ...
    ValueError: specs['w'] = P('model'): dimension 0 of the leaf (shape (6, 8))
    has size 6, which is not divisible by 4, the size of mesh axis 'model'.
  """
  sizes = mesh_axis_sizes(mesh)
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  if isinstance(specs, PartitionSpec):
    spec_leaves = [specs] * len(leaves_with_path)
  else:
    try:
      spec_leaves = treedef.flatten_up_to(specs)
    except (ValueError, TypeError) as e:
      raise ValueError(
        f"`{name}` must be a pytree of PartitionSpec with the structure of "
        f"the arrays ({treedef}); details: {e}"
      ) from None
  for (path, leaf), spec in zip(leaves_with_path, spec_leaves):
    where = f"{name}{jax.tree_util.keystr(path)}"
    if not isinstance(spec, PartitionSpec):
      raise TypeError(
        f"{where} must be a jax.sharding.PartitionSpec, got {spec!r} of type {type(spec).__name__}."
      )
    shape = _shape_of(leaf)
    if shape is None:
      continue
    if len(spec) > len(shape):
      raise ValueError(
        f"{where} = {_fmt(spec)} has {len(spec)} entries, but the leaf has "
        f"only {len(shape)} dimensions (shape {shape})."
      )
    used: list[str] = []
    for dim, entry in enumerate(spec):
      if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        continue
      names = _axis_names(entry, sizes, f"{where}[{dim}]")
      for a in names:
        if a in used:
          raise ValueError(
            f"{where} = {_fmt(spec)} uses mesh axis {a!r} for more than one dimension."
          )
        used.append(a)
      s = math.prod(sizes[a] for a in names)
      if shape[dim] % s:
        what = (
          f"the size of mesh axis {names[0]!r}"
          if len(names) == 1
          else f"the product of the sizes of mesh axes {names}"
        )
        raise ValueError(
          f"{where} = {_fmt(spec)}: dimension {dim} of the leaf (shape "
          f"{shape}) has size {shape[dim]}, which is not divisible by {s}, "
          f"{what}."
        )


def _fmt(spec: PartitionSpec) -> str:
  return "P(" + ", ".join(repr(e) for e in spec) + ")"


def named_shardings(specs: PyTree, mesh: Mesh) -> PyTree:
  """Maps a pytree of ``PartitionSpec`` to ``NamedSharding`` on ``mesh``.

  Args:
    specs: a pytree of :class:`~jax.sharding.PartitionSpec` (for example
      from :func:`fsdp_partition_specs`).
    mesh: a concrete :class:`~jax.sharding.Mesh`.

  Returns:
    A pytree of :class:`~jax.sharding.NamedSharding` with the same structure.

  Raises:
    TypeError: if ``mesh`` is not a ``Mesh`` or a leaf is not a
      ``PartitionSpec``.

  Example:
    >>> import jax
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = make_mesh(f"data={jax.device_count()}")
    >>> named_shardings({'w': P('data'), 'b': P()}, mesh)['w'].spec == P('data')
    True
  """
  if not isinstance(mesh, Mesh):
    raise TypeError(
      f"`mesh` must be a concrete jax.sharding.Mesh, got {mesh!r} of type {type(mesh).__name__}."
    )
  is_spec = lambda x: isinstance(x, PartitionSpec)

  def to_sharding(spec):
    if not is_spec(spec):
      raise TypeError(
        f"`specs` must hold jax.sharding.PartitionSpec leaves, got {spec!r}"
        f" of type {type(spec).__name__}."
      )
    return NamedSharding(mesh, spec)

  return jax.tree.map(to_sharding, specs, is_leaf=is_spec)
