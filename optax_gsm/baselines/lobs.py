r"""Layer-wise Optimal Brain Surgeon (L-OBS; Dong, Chen and Pan, NeurIPS 2017).

"Learning to Prune Deep Neural Networks via Layer-wise Optimal Brain
Surgeon" prunes each layer on its own, keeping the layer's *output* close to
the dense one. For a dense layer :math:`y = W^\top x` with inputs
:math:`x \in \mathbb{R}^d` (taken from the dense network), the error of
output neuron :math:`j` after changing its weights :math:`w_{:j}` by
:math:`\delta` is

.. math::

   E = \tfrac{1}{2}\,\delta^\top H \delta, \qquad
   H = \frac{1}{n}\sum_{k=1}^{n} x_k x_k^\top

with one Hessian :math:`H` shared by all output neurons. Removing weight
:math:`q` (of neuron :math:`j`) with the best compensation of the others
costs, and compensates by (Optimal Brain Surgeon, Hassibi and Stork 1993):

.. math::

   L_q = \frac{w_q^2}{2\,[H^{-1}]_{qq}}, \qquad
   \delta = -\frac{w_q}{[H^{-1}]_{qq}}\, H^{-1} e_q .

:math:`H` is damped, :math:`H + \lambda \bar h I` with :math:`\bar h` the
mean of its diagonal, so that it is invertible (inputs that are always zero,
such as MNIST's border pixels, make it singular).

Two ways to prune a set of weights are implemented
(:func:`lobs_prune_layer`):

* ``mode="joint"`` (default): rank the layer's weights by :math:`L_q`
  (computed once), and for each output neuron remove its selected set
  :math:`P` at once with the exact constrained least-squares compensation

  .. math::  \delta = -H^{-1}_{:,P}\,\big(H^{-1}_{PP}\big)^{-1} w_P ,

  which is what applying the single-weight OBS step above in that order gives
  when :math:`H^{-1}` is updated after each removal; it minimises
  :math:`\lVert X (w - w') \rVert^2` subject to :math:`w'_P = 0`.
* ``mode="sequential"``: the paper's literal loop: prune in ascending
  :math:`L_q` order, applying the single-weight step with the *unchanged*
  :math:`H^{-1}` each time and resetting the already-pruned weights of the
  neuron to zero (an approximation of the joint solution).

Convolutions are dense layers on image patches: :func:`conv_patches` turns
NHWC inputs into rows ordered like ``kernel.reshape(-1, out)``, whose
Hessian is then used as above. A bias is handled by appending a constant 1
to the inputs (``with_bias=True``): it is never pruned but takes part in the
compensation.

This module works in numpy float64 (an offline, one-shot step on the host).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np

MODES = ("joint", "sequential")
ALLOCATIONS = ("magnitude", "sensitivity")


def layer_hessian(inputs: Any, *, with_bias: bool = False) -> np.ndarray:
  r"""The layer Hessian :math:`H = \frac{1}{n} X^\top X` of inputs ``X``.

  Args:
    inputs: array ``(n, d)`` (rows are the layer's input vectors).
    with_bias: append a constant 1 to every row, giving a ``(d+1, d+1)``
      Hessian whose last index is the bias.

  Returns:
    ``(d, d)`` or ``(d+1, d+1)`` float64 array.

  Example:
    >>> layer_hessian([[1.0, 2.0], [3.0, 0.0]]).tolist()
    [[5.0, 1.0], [1.0, 2.0]]
  """
  acc = HessianAccumulator()
  acc.add(inputs, with_bias=with_bias)
  return acc.hessian()


class HessianAccumulator:
  """Streams :math:`\\sum_k x_k x_k^\\top` over batches of inputs.

  Example:
    >>> acc = HessianAccumulator()
    >>> acc.add([[1.0, 2.0]]); acc.add([[3.0, 0.0]])
    >>> acc.hessian().tolist(), acc.count
    ([[5.0, 1.0], [1.0, 2.0]], 2)
  """

  def __init__(self):
    self.total: Optional[np.ndarray] = None
    self.count = 0

  def add(self, inputs: Any, *, with_bias: bool = False) -> None:
    """Adds the rows of ``inputs`` (shape ``(n, d)``)."""
    x = np.asarray(jax.device_get(inputs), np.float64)
    if x.ndim != 2:
      raise ValueError(
        f"`inputs` must be a 2-D array (n rows of layer inputs), got shape "
        f"{x.shape}; flatten conv inputs with conv_patches first."
      )
    if with_bias:
      x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    if self.total is not None and self.total.shape[0] != x.shape[1]:
      raise ValueError(
        f"`inputs` has {x.shape[1]} columns (bias included) but earlier "
        f"batches had {self.total.shape[0]}."
      )
    xtx = x.T @ x
    self.total = xtx if self.total is None else self.total + xtx
    self.count += x.shape[0]

  def hessian(self) -> np.ndarray:
    """The mean :math:`\\frac{1}{n}\\sum_k x_k x_k^\\top`."""
    if self.total is None or self.count == 0:
      raise ValueError("HessianAccumulator has no inputs yet; call add().")
    return self.total / self.count


def conv_patches(
  x: Any,
  kernel_shape: Sequence[int],
  *,
  strides: Sequence[int] = (1, 1),
  padding: Union[str, Sequence[tuple[int, int]]] = "VALID",
) -> jax.Array:
  """Image patches of NHWC ``x`` as rows that multiply ``kernel.reshape(-1, out)``.

  For a ``(kh, kw, in, out)`` kernel, ``conv(x, kernel)`` equals
  ``conv_patches(x, kernel.shape) @ kernel.reshape(-1, out)`` (up to the
  reshape of the output to ``(N * H' * W', out)``), so a conv layer is a
  dense layer on these rows.

  Args:
    x: inputs ``(N, H, W, in)``.
    kernel_shape: ``(kh, kw, in, out)``.
    strides: window strides.
    padding: ``"VALID"``, ``"SAME"`` or explicit pairs, as in
      ``jax.lax.conv_general_dilated``.

  Returns:
    ``(N * H' * W', kh * kw * in)`` array.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    >>> conv_patches(x, (2, 2, 1, 1)).tolist()
    [[0.0, 1.0, 3.0, 4.0], [1.0, 2.0, 4.0, 5.0], [3.0, 4.0, 6.0, 7.0], [4.0, 5.0, 7.0, 8.0]]
  """
  kh, kw, cin = (int(v) for v in kernel_shape[:3])
  if np.ndim(x) != 4 or np.shape(x)[-1] != cin:
    raise ValueError(
      f"`x` must be NHWC with {cin} channels for a kernel of shape "
      f"{tuple(kernel_shape)}, got shape {np.shape(x)}."
    )
  p = jax.lax.conv_general_dilated_patches(
    jax.numpy.asarray(x),
    (kh, kw),
    tuple(strides),
    padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  n, h, w, _ = p.shape
  # The patch features come channel-major (in, kh, kw); the kernel flattens
  # as (kh, kw, in).
  p = p.reshape(n, h, w, cin, kh, kw).transpose(0, 1, 2, 4, 5, 3)
  return p.reshape(n * h * w, kh * kw * cin)


def _damped(hessian: Any, damping: float) -> np.ndarray:
  h = np.asarray(hessian, np.float64)
  if h.ndim != 2 or h.shape[0] != h.shape[1]:
    raise ValueError(f"`hessian` must be a square matrix, got shape {h.shape}.")
  if not damping >= 0:
    raise ValueError(f"`damping` must be >= 0, got {damping!r}.")
  lam = damping * float(np.mean(np.diag(h))) if damping else 0.0
  return h + lam * np.eye(h.shape[0])


def damped_inverse(hessian: Any, damping: float = 1e-4) -> np.ndarray:
  r""":math:`(H + \lambda \bar h I)^{-1}` with :math:`\bar h` the mean diagonal of H.

  Example:
    >>> damped_inverse([[2.0, 0.0], [0.0, 4.0]], damping=0.0).tolist()
    [[0.5, 0.0], [0.0, 0.25]]
  """
  return np.linalg.inv(_damped(hessian, damping))


def obs_sensitivity(weights: Any, hinv: Any) -> np.ndarray:
  r""":math:`L_{qj} = w_{qj}^2 / (2 [H^{-1}]_{qq})` for a ``(d, out)`` kernel.

  Example:
    >>> obs_sensitivity([[2.0], [1.0]], [[0.5, 0.0], [0.0, 2.0]]).tolist()
    [[4.0], [0.25]]
  """
  w = np.asarray(weights, np.float64)
  d = np.diag(np.asarray(hinv, np.float64))[: w.shape[0]]
  return w**2 / (2.0 * d[:, None])


def obs_correction(column: Any, hinv: Any, q: int) -> np.ndarray:
  r"""Removes weight ``q`` of one neuron with the OBS compensation.

  .. math::  w' = w - \frac{w_q}{[H^{-1}]_{qq}} H^{-1} e_q

  (so :math:`w'_q = 0` exactly; it is set to 0 to remove rounding).

  Args:
    column: the neuron's weights :math:`w`, shape ``(d,)``.
    hinv: :math:`H^{-1}`, ``(d, d)``.
    q: the index removed.

  Returns:
    :math:`w'` as a float64 array.

  Example:
    >>> obs_correction([1.0, 2.0], [[1.0, 0.5], [0.5, 1.0]], 0).tolist()
    [0.0, 1.5]
  """
  w = np.asarray(column, np.float64).copy()
  h = np.asarray(hinv, np.float64)
  w = w - (w[q] / h[q, q]) * h[:, q]
  w[q] = 0.0
  return w


def _ranked_prune_set(sens: np.ndarray, num_prune: int) -> np.ndarray:
  """Bool mask of the ``num_prune`` smallest entries (ties: lower flat index)."""
  flat = sens.reshape(-1)
  order = np.argsort(flat, kind="stable")
  out = np.zeros(flat.size, bool)
  out[order[:num_prune]] = True
  return out.reshape(sens.shape)


def lobs_prune_layer(
  kernel: Any,
  hessian: Any,
  num_keep: int,
  *,
  bias: Any = None,
  damping: float = 1e-4,
  mode: str = "joint",
) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
  r"""Prunes one layer to ``num_keep`` weights with L-OBS.

  Args:
    kernel: ``(d, out)`` dense kernel or any ``(..., out)`` kernel whose
      leading axes flatten to the rows of the Hessian (conv: ``(kh, kw, in,
      out)``, see :func:`conv_patches`).
    hessian: :math:`H`, ``(d, d)``; ``(d+1, d+1)`` with the bias last when
      ``bias`` is given (see :func:`layer_hessian` ``with_bias``).
    num_keep: weights of the layer to keep, ``0 <= num_keep <= kernel.size``.
    bias: optional ``(out,)`` bias, compensated but never pruned.
    damping: :math:`\lambda`, relative to the mean diagonal of :math:`H`.
    mode: ``"joint"`` or ``"sequential"`` (see the module docstring).

  Returns:
    ``(new_kernel, mask, new_bias)``: float64 arrays shaped like the inputs
    (``new_bias`` is None without ``bias``); pruned weights are exactly 0 and
    ``mask.sum() == num_keep``.

  Example:
    >>> import numpy as np
    >>> x = np.array([[1.0, 1.0], [1.0, -1.0], [2.0, 1.0]])
    >>> w = np.array([[1.0], [0.5]])
    >>> new, mask, _ = lobs_prune_layer(w, layer_hessian(x), 1, damping=0.0)
    >>> mask.ravel().tolist(), np.round(new.ravel(), 4).tolist()
    ([True, False], [1.1667, 0.0])

  References:
    X. Dong, S. Chen, S. J. Pan. Learning to Prune Deep Neural Networks via
    Layer-wise Optimal Brain Surgeon. NeurIPS 2017.
    https://arxiv.org/abs/1705.07565
  """
  if mode not in MODES:
    raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
  k = np.asarray(kernel, np.float64)
  shape = k.shape
  if k.ndim < 2:
    raise ValueError(f"`kernel` must have ndim >= 2 (..., out), got {shape}.")
  w = k.reshape(-1, shape[-1])
  d, out = w.shape
  h = np.asarray(hessian, np.float64)
  d_h = d + (1 if bias is not None else 0)
  if h.shape != (d_h, d_h):
    raise ValueError(
      f"`hessian` must be ({d_h}, {d_h}) for a kernel with {d} inputs"
      f"{' plus the bias' if bias is not None else ''}; got {h.shape}."
    )
  if isinstance(num_keep, bool) or not isinstance(num_keep, (int, np.integer)):
    raise TypeError(f"`num_keep` must be an int, got {num_keep!r}.")
  if not 0 <= num_keep <= w.size:
    raise ValueError(f"`num_keep` must be in [0, {w.size}] for this kernel, got {num_keep}.")
  hd = _damped(h, damping)
  hinv = np.linalg.inv(hd)
  if bias is not None:
    b = np.asarray(bias, np.float64).reshape(1, out)
    wa = np.concatenate([w, b], axis=0)
  else:
    wa = w.copy()
  sens = obs_sensitivity(w, hinv)
  pruned = _ranked_prune_set(sens, w.size - int(num_keep))
  pruned_a = np.concatenate([pruned, np.zeros((d_h - d, out), bool)], axis=0)
  if mode == "joint":
    hw = hd @ wa
    for j in range(out):
      p = np.flatnonzero(pruned_a[:, j])
      if p.size == 0:
        continue
      keep = np.flatnonzero(~pruned_a[:, j])
      if keep.size <= p.size:
        # The same minimiser from the normal equations of the kept weights,
        # H_KK w'_K = (H w)_K: a smaller system when most weights go.
        if keep.size:
          wa[keep, j] = np.linalg.solve(hd[np.ix_(keep, keep)], hw[keep, j])
      else:
        lam = np.linalg.solve(hinv[np.ix_(p, p)], wa[p, j])
        wa[:, j] -= hinv[:, p] @ lam
      wa[p, j] = 0.0
  else:
    order = np.argsort(sens.reshape(-1), kind="stable")[: w.size - int(num_keep)]
    done = np.zeros_like(pruned_a)
    for flat in order:
      q, j = divmod(int(flat), out)
      col = wa[:, j]
      col -= (col[q] / hinv[q, q]) * hinv[:, q]
      done[q, j] = True
      col[done[:, j]] = 0.0
  new_w = wa[:d].reshape(shape)
  new_b = None if bias is None else wa[d]
  return new_w, ~pruned.reshape(shape), new_b


def lobs_prune(
  kernels: Mapping[str, Any],
  hessians: Mapping[str, Any],
  num_nonzero: int,
  *,
  biases: Optional[Mapping[str, Any]] = None,
  allocation: Union[str, Mapping[str, int]] = "magnitude",
  damping: float = 1e-4,
  mode: str = "joint",
) -> dict[str, dict[str, Any]]:
  r"""L-OBS on several layers, keeping exactly ``num_nonzero`` weights in total.

  How the budget is split across layers (the paper sets per-layer ratios by
  hand):

  * ``"magnitude"`` (default): the per-layer counts that a global magnitude
    cut to ``num_nonzero`` would keep; L-OBS then chooses *which* weights and
    compensates within each layer.
  * ``"sensitivity"``: keep the ``num_nonzero`` weights of largest
    :math:`L_q` across all layers together (ties: earlier layer in
    ``kernels`` order, then lower index). :math:`L_q` measures the error of
    *its own layer's* output, so the values of different layers are not on
    one scale: on LeNet-300-100 at 30x this ranking left the first layer
    with no weight at all.
  * a dict ``name -> count`` that sums to ``num_nonzero``.

  Args:
    kernels: ``name -> kernel`` (see :func:`lobs_prune_layer`).
    hessians: ``name -> H`` for the same names.
    num_nonzero: Q, the total number of weights kept.
    biases: optional ``name -> bias``; their Hessians must include the bias.
    allocation: see above.
    damping: see :func:`lobs_prune_layer`.
    mode: see :func:`lobs_prune_layer`.

  Returns:
    ``name -> {"kernel", "mask", "bias", "num_keep"}``.

  Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((50, 4))
    >>> out = lobs_prune({'a': rng.standard_normal((4, 3))},
    ...                  {'a': layer_hessian(x)}, 5)
    >>> int(out['a']['mask'].sum()), int((out['a']['kernel'] != 0).sum())
    (5, 5)

  References:
    X. Dong, S. Chen, S. J. Pan. Learning to Prune Deep Neural Networks via
    Layer-wise Optimal Brain Surgeon. NeurIPS 2017.
    https://arxiv.org/abs/1705.07565
  """
  names = list(kernels)
  if set(names) != set(hessians):
    raise ValueError(
      f"`kernels` and `hessians` must have the same names; got "
      f"{sorted(names)} and {sorted(hessians)}."
    )
  biases = dict(biases or {})
  sizes = {n: int(np.size(kernels[n])) for n in names}
  total = sum(sizes.values())
  if isinstance(num_nonzero, bool) or not isinstance(num_nonzero, (int, np.integer)):
    raise TypeError(f"`num_nonzero` must be an int, got {num_nonzero!r}.")
  if not 1 <= num_nonzero <= total:
    raise ValueError(
      f"`num_nonzero` must be in [1, {total}] (the weights of the given layers), got {num_nonzero}."
    )
  if isinstance(allocation, Mapping):
    counts = {n: int(allocation[n]) for n in names}
    if sum(counts.values()) != num_nonzero:
      raise ValueError(
        f"`allocation` counts sum to {sum(counts.values())}, not num_nonzero={num_nonzero}."
      )
  elif allocation in ALLOCATIONS:
    scores = []
    for n in names:
      w = np.asarray(kernels[n], np.float64)
      w2 = w.reshape(-1, w.shape[-1])
      if allocation == "sensitivity":
        hinv = damped_inverse(hessians[n], damping)
        scores.append(obs_sensitivity(w2, hinv).reshape(-1))
      else:
        scores.append(np.abs(w2).reshape(-1))
    flat = np.concatenate(scores)
    # Largest first; a stable sort of the negated scores breaks ties by the
    # lower global index.
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:num_nonzero]] = True
    counts, start = {}, 0
    for n in names:
      counts[n] = int(keep[start : start + sizes[n]].sum())
      start += sizes[n]
  else:
    raise ValueError(
      f"`allocation` must be one of {ALLOCATIONS} or a dict name -> count, got {allocation!r}."
    )
  out = {}
  for n in names:
    k, m, b = lobs_prune_layer(
      kernels[n], hessians[n], counts[n], bias=biases.get(n), damping=damping, mode=mode
    )
    out[n] = {"kernel": k, "mask": m, "bias": b, "num_keep": counts[n]}
  return out
