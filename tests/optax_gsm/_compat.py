"""What the tests need from jax releases older than the development one.

The library's floor (setup.cfg, .ci/min-versions.txt) is older than some of
the jax APIs the tests use; each name here is the new API where it exists and
its older spelling elsewhere.
"""

import jax

try:  # jax >= 0.8
  enable_x64 = jax.enable_x64
except AttributeError:
  from jax.experimental import enable_x64  # noqa: F401


def as_pure(state):
  """``flax.nnx.as_pure`` (flax >= 0.12.5): the state's Variables as arrays.

  Older flax keeps ``VariableState`` leaves in an ``nnx.State``; its pure
  form maps each one to its value (``State.map`` keeps the State type, so
  ``nnx.merge`` and ``nnx.update`` still take it).
  """
  from flax import nnx

  if hasattr(nnx, "as_pure"):
    return nnx.as_pure(state)
  return jax.tree.map(
    lambda v: v.value if isinstance(v, nnx.VariableState) else v,
    state,
    is_leaf=lambda v: isinstance(v, nnx.VariableState),
  )


def set_mesh(mesh):
  """``jax.set_mesh`` (jax >= 0.7.1), else ``jax.sharding.use_mesh``."""
  if hasattr(jax, "set_mesh"):
    return jax.set_mesh(mesh)
  return jax.sharding.use_mesh(mesh)
