"""Helpers shared by the model families: initialisers, padding, parameter counts.

Eligibility follows the ``optax_gsm`` default: a parameter takes part in global
sparse momentum (and in pruning) when it is a floating point array with at least
two dimensions, i.e. a dense or convolution kernel.  Biases and BatchNorm scales and
offsets are 1-D and therefore never eligible, and BatchNorm running statistics are
``nnx.BatchStat`` rather than ``nnx.Param`` so the optimizer never sees them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def flat_variance_scaling(
  scale: float,
  mode: str,
  distribution: str,
) -> Callable[..., jax.Array]:
  """Variance-scaling initialiser that draws a flat vector and reshapes it.

  Same distribution as :func:`jax.nn.initializers.variance_scaling` for kernels
  whose last axis is the output and whose leading axes are the receptive field
  (flax ``Linear`` ``(in, out)`` and ``Conv`` ``(kh, kw, in, out)`` kernels).

  Why not the stock initialiser: with ``jax_threefry_partitionable`` (the default
  since JAX 0.5) XLA:CPU needs ~3 s to compile a random draw of a 4-D shape but
  ~0.3 s for a 1-D one, and every distinct kernel shape is a new compilation.
  Building DenseNet-40 (36 distinct kernel shapes) took ~2 minutes with the stock
  initialiser on a 2-core machine.  Here the draw is 1-D and its length is rounded
  up to a power of two (then sliced), so the 36 shapes share a handful of
  compilations.  The values are i.i.d. with the same distribution as the stock
  initialiser's, only from a different stream.
  """
  if mode not in ("fan_in", "fan_out", "fan_avg"):
    raise ValueError(f"invalid mode {mode!r}")
  if distribution not in ("normal", "truncated_normal"):
    raise ValueError(f"invalid distribution {distribution!r}")

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    shape = tuple(int(d) for d in shape)
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in = (shape[-2] if len(shape) > 1 else shape[-1]) * receptive
    fan_out = shape[-1] * receptive
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    std = np.sqrt(scale / max(1.0, fan))
    n = int(np.prod(shape))
    bucket = 1 << max(0, (n - 1).bit_length())  # next power of two >= n
    if distribution == "normal":
      flat = jax.random.normal(key, (bucket,), dtype)
    else:
      # Std of a unit normal truncated to [-2, 2], as in jax.nn.initializers.
      std = std / 0.87962566103423978
      flat = jax.random.truncated_normal(key, -2.0, 2.0, (bucket,), dtype)
    return (flat[:n] * jnp.asarray(std, dtype)).reshape(shape)

  return init


# He et al. (2015) initialisation, fan-out variant, as used by the reference
# PyTorch implementations of ResNet/DenseNet (``kaiming_normal_(mode="fan_out")``).
# The NNX default (LeCun normal) halves the variance, which slows the first epochs
# of deep ReLU networks noticeably.
he_normal_fan_out = flat_variance_scaling(2.0, "fan_out", "normal")

# NNX's default kernel initialiser (LeCun truncated normal), compile-friendly.
lecun_normal = flat_variance_scaling(1.0, "fan_in", "truncated_normal")


def same_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric ``kernel_size // 2`` padding, as PyTorch's ``padding=k // 2``.

  ``padding="SAME"`` in XLA pads asymmetrically for strided convolutions (more at
  the bottom/right), which would make weights trained here incompatible with the
  usual PyTorch layout of the same architecture.  Explicit symmetric padding keeps
  the two interchangeable.
  """
  p = kernel_size // 2
  return ((p, p), (p, p))


def is_eligible(x: Any) -> bool:
  """True for arrays that GSM may prune: floating point with ``ndim >= 2``."""
  # Duck-typed so that it also works on jax.ShapeDtypeStruct (abstract params).
  return (
    hasattr(x, "ndim")
    and hasattr(x, "dtype")
    and x.ndim >= 2
    and jnp.issubdtype(x.dtype, jnp.floating)
  )


def eligible_mask(params: Any) -> Any:
  """Boolean pytree with the structure of ``params``: True where :func:`is_eligible`.

  Usable as ``mask=`` for :func:`optax.add_decayed_weights` so that weight decay
  hits kernels only (the authors' code sets ``weight_decay_bias=0`` and applies no
  decay to BatchNorm parameters).
  """
  return jax.tree.map(is_eligible, params)


def param_counts(model: nnx.Module) -> dict[str, int]:
  """Counts of trainable parameters of ``model``.

  Returns:
    A dict with ``total`` (all ``nnx.Param`` elements) and ``eligible`` (elements
    of eligible leaves, see :func:`is_eligible`).
  """
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  total = sum(int(np.prod(x.shape)) for x in leaves)
  eligible = sum(int(np.prod(x.shape)) for x in leaves if is_eligible(x))
  return {"total": total, "eligible": eligible}
