r"""Multiplicative channel gates.

A gate is an array :math:`\gamma` with one entry per channel (the last axis)
that multiplies a layer's output, :math:`y \mapsto \gamma \odot y`. With
:math:`\gamma = 1` the network is unchanged, and
:math:`\partial L / \partial \gamma_k` is the spatial sum of
:math:`a \, \partial L / \partial a` over channel :math:`k` (see
:mod:`optax_gsm.structured.criteria`). A gate with a leading batch axis,
shape ``(N, C)``, gives per-example gradients from one backward pass. A gate
of 0 removes the channel: for a gate after the last linear or normalisation
op of a layer (before or after a ReLU), the next layer sees exact zeros, as
if the channel were physically removed.
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp


def apply_gate(x: jax.Array, gate: jax.Array) -> jax.Array:
  """Multiplies channel ``k`` (last axis) of ``x`` by ``gate[..., k]``.

  Args:
    x: activations ``(N, ..., C)``.
    gate: ``(C,)`` (shared by all examples) or ``(N, C)`` (per example).

  Returns:
    ``x`` with each channel scaled, same shape and dtype.

  Raises:
    ValueError: if the gate does not fit ``x``.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.ones((2, 3, 3, 2))
    >>> apply_gate(x, jnp.array([[1., 0.], [2., 1.]]))[:, 0, 0, :].tolist()
    [[1.0, 0.0], [2.0, 1.0]]
  """
  x = jnp.asarray(x)
  gate = jnp.asarray(gate)
  c = x.shape[-1]
  if gate.ndim == 1 and gate.shape == (c,):
    return x * gate.astype(x.dtype)
  if gate.ndim == 2 and gate.shape == (x.shape[0], c) and x.ndim >= 2:
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (c,)
    return x * gate.reshape(shape).astype(x.dtype)
  raise ValueError(
    f"`gate` must have shape ({c},) or ({x.shape[0]}, {c}) "
    f"for activations of shape {x.shape}, got {gate.shape}."
  )


def ones_gates(widths: Mapping[str, int], batch_size: Optional[int] = None) -> dict:
  """Gates of ones: ``{name: (C,)}`` or per example ``{name: (N, C)}``.

  Args:
    widths: layer name -> number of channels.
    batch_size: ``N`` for per-example gates; None for shared gates.

  Returns:
    A dict of float32 arrays of ones.

  Example:
    >>> {k: v.shape for k, v in ones_gates({'conv1': 4}, 8).items()}
    {'conv1': (8, 4)}
  """
  lead = () if batch_size is None else (int(batch_size),)
  return {k: jnp.ones(lead + (int(c),), jnp.float32) for k, c in widths.items()}
