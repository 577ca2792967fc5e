"""``optax._src.test_utils`` for optax releases that predate it (< 0.2.5).

The checks of ``test_optax_common.py`` use optax's private test helpers; the
oldest optax the library supports (setup.cfg) does not have that module, so
the same assertions come from chex, and ``log_compilations`` is rebuilt on
``jax.log_compiles``.
"""

import contextlib
import logging
import re
import threading

import chex
import jax

assert_trees_all_close = chex.assert_trees_all_close
assert_trees_all_equal = chex.assert_trees_all_equal
assert_trees_all_equal_structs = chex.assert_trees_all_equal_structs
assert_trees_all_equal_dtypes = chex.assert_trees_all_equal_dtypes
assert_trees_all_equal_shapes = chex.assert_trees_all_equal_shapes
assert_tree_all_finite = chex.assert_tree_all_finite

_LOCK = threading.Lock()


class _ToList(logging.Handler):
  def __init__(self):
    super().__init__(logging.DEBUG)
    self.records = []

  def emit(self, record):
    self.records.append(record)


@contextlib.contextmanager
def log_compilations():
  """Yields a list that receives jax's "Finished ... compilation" records."""
  logger = logging.getLogger("jax")
  handler = _ToList()
  compilations = []
  with _LOCK, jax.log_compiles():
    logger.addHandler(handler)
    try:
      yield compilations
    finally:
      logger.removeHandler(handler)
  compilations.extend(
    r for r in handler.records if re.search(r"Finished .* compilation", r.getMessage())
  )
