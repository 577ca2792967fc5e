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
  """``flax.nnx.as_pure`` (newer flax): the state's Variables as arrays.

  Older flax (>= 0.12.1, the floor) keeps ``Variable`` leaves in an
  ``nnx.State``; its pure form maps each one to its value (the tree map keeps
  the State type, so ``nnx.merge`` and ``nnx.update`` still take it).
  """
  from flax import nnx

  if hasattr(nnx, "as_pure"):
    return nnx.as_pure(state)
  is_variable = lambda v: isinstance(v, nnx.Variable)  # noqa: E731
  return jax.tree.map(lambda v: v[...] if is_variable(v) else v, state, is_leaf=is_variable)


def set_mesh(mesh):
  """``jax.set_mesh`` (jax >= 0.7.1), else ``jax.sharding.use_mesh``."""
  if hasattr(jax, "set_mesh"):
    return jax.set_mesh(mesh)
  return jax.sharding.use_mesh(mesh)
