r"""Dead units of pruned layers, constant folding and sparse products, on arrays.

Pruning at 60x-300x leaves many units (neurons, channels) with no incoming
or no outgoing weight. Such a unit can be removed from the dense tensors
exactly, which makes the pruned model really smaller and faster (the zeros
of a merely masked model still cost their multiply-adds). For a unit
:math:`c` produced by a layer with kernel :math:`W` and bias :math:`b`,
then an activation :math:`\phi`, and read by a layer with kernel :math:`V`
and bias :math:`d`:

* **no outgoing weight**, :math:`V_{\cdot, c, \cdot} = 0`: the unit's value
  is multiplied by zeros only. Removing it (its column of :math:`W`, its
  entry of :math:`b`, its rows of :math:`V`) leaves the outputs unchanged.
  :func:`unread_inputs` finds them.
* **no incoming weight**, :math:`W_{\cdot, c} = 0`: the unit outputs the
  constant :math:`v_c = \phi(b_c)` (or :math:`\phi(\mathrm{BN}(b_c))` with a
  BatchNorm in evaluation mode in between, :func:`batch_norm_constant`),
  whatever the input. When the reader applies its kernel to a constant map
  without padding (a dense layer, a ``VALID`` convolution, after max or
  average pooling or a flatten), the unit adds the same amount to every
  output position, which is folded into the reader's bias
  (:func:`fold_constant_inputs`):

  .. math::

     d'_o = d_o + \sum_{c \text{ constant}} v_c \sum_t V_{t, c, o},

  :math:`t` running over the kernel taps (and over the flattened positions
  of a dense layer after a flatten). A zero-padded convolution sees the
  padding's zeros next to the constant at the borders, so there only units
  with :math:`v_c = 0` can be removed exactly.
  :func:`unfed_outputs` finds them.

Removing units can make more units dead (a unit fed only by constant units
becomes constant; a unit read only by removed units becomes unread), so a
compaction repeats the two steps until nothing changes (the NNX model
surgery is :mod:`experiments.compaction`).

What is left is a smaller dense model whose kernels are still sparse.
:func:`coo_kernel` and :func:`coo_matmul` compute ``x @ kernel`` from the
non-zero entries only (a gather of the inputs, a product with the values
and a segment sum per output), which is faster than the dense product for
large, very sparse kernels on a CPU, and slower for small or denser ones:
measure before choosing (``benchmarks/compaction.py``).

Example:
  >>> import numpy as np
  >>> w = np.array([[1., 0., 2.], [0., 0., 3.]])    # (in=2, out=3)
  >>> v = np.array([[4., 5.], [0., 0.], [6., 0.]])  # (in=3, out=2)
  >>> unfed_outputs(w).tolist()   # unit 1 has no incoming weight
  [False, True, False]
  >>> unread_inputs(v).tolist()   # unit 1 has no outgoing weight either
  [False, True, False]

References:
  X. Ding, G. Ding, X. Zhou, Y. Guo, J. Han, J. Liu. Global Sparse Momentum
  SGD for Pruning Very Deep Neural Networks. NeurIPS 2019.
  https://arxiv.org/abs/1909.12778

  H. Hu, R. Peng, Y.-W. Tai, C.-K. Tang. Network Trimming: A Data-Driven
  Neuron Pruning Approach towards Efficient Deep Architectures. 2016 (zero
  activations make a neuron removable). https://arxiv.org/abs/1607.03250
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np

ArrayLike = Any


def _kernel(kernel: ArrayLike, name: str = "kernel") -> np.ndarray:
  k = np.asarray(kernel)
  if k.ndim < 2:
    raise ValueError(
      f"`{name}` must have at least 2 dimensions (..., inputs, outputs), got shape {k.shape}."
    )
  return k


def _spatial_view(kernel: np.ndarray, spatial: int) -> np.ndarray:
  """The kernel as ``(taps, positions, channels, outputs)``."""
  if not isinstance(spatial, (int, np.integer)) or isinstance(spatial, bool) or spatial < 1:
    raise ValueError(f"`spatial` must be a positive integer, got {spatial!r}.")
  cin, cout = kernel.shape[-2:]
  channels = cin // spatial
  if channels * spatial != cin:
    raise ValueError(
      f"`spatial`={spatial} does not divide the kernel's {cin} inputs "
      "(expected positions x channels, NHWC flatten order)."
    )
  taps = int(np.prod(kernel.shape[:-2], dtype=np.int64))
  return kernel.reshape(taps, spatial, channels, cout)


def unread_inputs(kernel: ArrayLike, *, spatial: int = 1) -> np.ndarray:
  r"""The input channels that ``kernel`` does not read: no non-zero entry.

  A unit is removable outright when every layer that reads it has
  :math:`V_{\cdot, c, \cdot} = 0`: AND the results over the readers.

  Args:
    kernel: ``(..., inputs, outputs)``: a dense kernel ``(in, out)`` or a
      convolution kernel ``(*window, in, out)``.
    spatial: for a dense layer after an NHWC flatten, the number of
      positions per channel (input index ``s * C + c``); 1 otherwise.

  Returns:
    bool ``(C,)``, ``C = inputs // spatial``: True where channel ``c`` has no
    non-zero weight at any tap, position or output.

  Example:
    >>> import numpy as np
    >>> k = np.zeros((2 * 3, 4)); k[1 * 3 + 2, 0] = 1.0   # position 1, channel 2
    >>> unread_inputs(k, spatial=2).tolist()
    [True, True, False]
  """
  k = _spatial_view(_kernel(kernel), spatial)
  return ~np.any(k != 0, axis=(0, 1, 3))


def unfed_outputs(kernel: ArrayLike) -> np.ndarray:
  r"""The output units of ``kernel`` with no non-zero incoming entry.

  Such a unit's pre-activation is its bias alone (0 without one).

  Args:
    kernel: ``(..., inputs, outputs)``.

  Returns:
    bool ``(outputs,)``: True where :math:`W_{\cdot, o} = 0`.

  Example:
    >>> import numpy as np
    >>> unfed_outputs(np.array([[0., 1.], [0., 2.]])).tolist()
    [True, False]
  """
  k = _kernel(kernel)
  return ~np.any(k.reshape(-1, k.shape[-1]) != 0, axis=0)


def batch_norm_constant(
  x: ArrayLike,
  *,
  mean: ArrayLike,
  var: ArrayLike,
  epsilon: float,
  scale: Optional[ArrayLike] = None,
  bias: Optional[ArrayLike] = None,
) -> np.ndarray:
  r"""BatchNorm in evaluation mode applied to a per-channel constant.

  .. math::

     y_c = \frac{x_c - \mu_c}{\sqrt{\sigma^2_c + \epsilon}} \gamma_c + \beta_c,

  computed in the order of Flax's ``nnx.BatchNorm`` (``(x - mean) *
  (rsqrt(var + eps) * scale) + bias``), in the dtype of ``mean``.

  Args:
    x: ``(C,)`` the constant input of each channel.
    mean: ``(C,)`` running mean :math:`\mu`.
    var: ``(C,)`` running variance :math:`\sigma^2`.
    epsilon: :math:`\epsilon`.
    scale: ``(C,)`` :math:`\gamma`, or None for 1.
    bias: ``(C,)`` :math:`\beta`, or None for 0.

  Returns:
    ``(C,)`` the normalised constants.

  Example:
    >>> import numpy as np
    >>> batch_norm_constant(np.zeros(2), mean=np.array([1., -1.]),
    ...                     var=np.array([3., 0.]), epsilon=1.0,
    ...                     bias=np.array([0., 0.5])).tolist()
    [-0.5, 1.5]
  """
  mean = np.asarray(mean)
  dtype = mean.dtype
  arrays = {"x": x, "var": var, "scale": scale, "bias": bias}
  for name, value in arrays.items():
    if value is not None and np.shape(value) != mean.shape:
      raise ValueError(
        f"`{name}` must have the shape of `mean` {mean.shape}, got {np.shape(value)}."
      )
  mul = 1 / np.sqrt(np.asarray(var, dtype) + np.asarray(epsilon, dtype))
  if scale is not None:
    mul = mul * np.asarray(scale, dtype)
  y = (np.asarray(x, dtype) - mean) * mul
  if bias is not None:
    y = y + np.asarray(bias, dtype)
  return y.astype(dtype)


def fold_constant_inputs(
  kernel: ArrayLike, bias: Optional[ArrayLike], values: ArrayLike, *, spatial: int = 1
) -> np.ndarray:
  r"""The reader's bias with constant input channels folded in.

  .. math::

     d'_o = d_o + \sum_c v_c \sum_{t, s} V_{t, s C + c, o}

  (the sum in float64, the result in the bias's dtype, or the kernel's when
  there is no bias). Exact up to rounding when the reader applies the kernel
  to a constant map without padding; the folded channels are then removed
  from the kernel by the caller.

  Args:
    kernel: the reader's kernel ``(..., spatial * C, outputs)``.
    bias: the reader's bias ``(outputs,)``, or None for zeros.
    values: ``(C,)`` the constant value of each input channel; 0 for the
      channels that are not folded (they contribute nothing).
    spatial: positions per channel for a dense layer after a flatten.

  Returns:
    ``(outputs,)`` the new bias.

  Raises:
    ValueError: if ``values`` or ``bias`` do not match the kernel.

  Example:
    >>> import numpy as np
    >>> k = np.array([[1., 2.], [3., 4.]])       # (in=2, out=2)
    >>> fold_constant_inputs(k, np.array([0.5, 0.5]), np.array([0., 2.])).tolist()
    [6.5, 8.5]
  """
  k = _kernel(kernel)
  view = _spatial_view(k, spatial)
  values = np.asarray(values)
  if values.shape != (view.shape[2],):
    raise ValueError(
      f"`values` must have shape ({view.shape[2]},), one per input channel "
      f"of the kernel {k.shape} with spatial={spatial}; got {values.shape}."
    )
  out_dtype = np.asarray(bias).dtype if bias is not None else k.dtype
  if bias is not None and np.shape(bias) != (k.shape[-1],):
    raise ValueError(f"`bias` must have shape ({k.shape[-1]},), got {np.shape(bias)}.")
  summed = view.astype(np.float64).sum(axis=(0, 1))  # (C, out)
  shift = values.astype(np.float64) @ summed
  base = np.zeros(k.shape[-1]) if bias is None else np.asarray(bias, np.float64)
  return (base + shift).astype(out_dtype)


def coo_kernel(kernel: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  r"""The non-zero entries of a 2-D kernel, for :func:`coo_matmul`.

  Args:
    kernel: ``(inputs, outputs)``.

  Returns:
    ``(rows, cols, values)``: int32 input and output indices and the values
    of the non-zero entries, in row-major order.

  Example:
    >>> import numpy as np
    >>> [a.tolist() for a in coo_kernel(np.array([[0., 2.], [3., 0.]]))]
    [[0, 1], [1, 0], [2.0, 3.0]]
  """
  k = np.asarray(kernel)
  if k.ndim != 2:
    raise ValueError(f"`kernel` must be 2-D (inputs, outputs), got shape {k.shape}.")
  rows, cols = np.nonzero(k)
  return rows.astype(np.int32), cols.astype(np.int32), k[rows, cols]


def coo_matmul(
  x: jax.Array, rows: jax.Array, cols: jax.Array, values: jax.Array, out_features: int
) -> jax.Array:
  r"""``x @ kernel`` from the kernel's non-zero entries (:func:`coo_kernel`).

  .. math::

     y_{b, o} = \sum_{k : \mathrm{cols}_k = o} x_{b, \mathrm{rows}_k}
     \mathrm{values}_k,

  as a gather of the inputs' rows, a product and a segment sum: its cost is
  proportional to the number of non-zeros, not to ``inputs * outputs``.
  Equal to the dense product up to the order of the summation.

  Args:
    x: ``(..., inputs)``.
    rows, cols, values: the kernel's non-zero entries.
    out_features: the kernel's number of outputs.

  Returns:
    ``(..., out_features)``.

  Example:
    >>> import numpy as np, jax.numpy as jnp
    >>> k = np.array([[0., 2.], [3., 0.]], np.float32)
    >>> coo_matmul(jnp.ones((1, 2)), *coo_kernel(k), 2).tolist()
    [[3.0, 2.0]]
  """
  lead = x.shape[:-1]
  xt = x.reshape(-1, x.shape[-1]).T  # (inputs, batch)
  terms = xt[rows] * values[:, None].astype(x.dtype)  # (nnz, batch)
  y = jax.ops.segment_sum(terms, cols, num_segments=int(out_features))
  return y.T.reshape(*lead, int(out_features))


__all__ = (
  "batch_norm_constant",
  "coo_kernel",
  "coo_matmul",
  "fold_constant_inputs",
  "unfed_outputs",
  "unread_inputs",
)
