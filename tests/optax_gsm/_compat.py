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
