r"""Feature-map importance from channel-gate gradients: Taylor and Fisher.

Every prunable feature map (channel) :math:`k` of a layer is multiplied by a
gate :math:`\gamma_k = 1`. For an example :math:`n` with activation
:math:`a_{n,m,k}` at spatial position :math:`m` (the map *after* the gate),
the chain rule gives

.. math::
   G_{nk} := \gamma_k \frac{\partial L_n}{\partial \gamma_k}
          = \sum_m a_{n,m,k} \, \frac{\partial L_n}{\partial a_{n,m,k}},

so one ordinary backward pass with per-example gates (shape ``(N, C)``, all
ones) yields every :math:`G_{nk}`, without hooks on the activations. From
running sums of :math:`G` (:class:`GateStats`) the criteria are:

* **Taylor, first order** (Molchanov et al., ICLR 2017):
  :math:`\Theta_k = \frac{1}{N}\sum_n \left|\frac{1}{M}\sum_m a_{n,m,k}
  \frac{\partial L}{\partial a_{n,m,k}}\right| = \frac{1}{NM}\sum_n |G_{nk}|`,
  :math:`M` the map's spatial size; then L2-normalised within each layer
  (:func:`l2_normalize`) and optionally penalised by FLOPs
  (:func:`cost_adjusted`).
* **Taylor, gate** (Molchanov et al., CVPR 2019):
  :math:`I_k = \frac{1}{B}\sum_b \left(\gamma_k
  \frac{\partial \bar L_b}{\partial \gamma_k}\right)^2` with
  :math:`\bar L_b` the mean loss of minibatch :math:`b` (so the inner term
  is :math:`\frac{1}{|b|}\sum_{n \in b} G_{nk}`), averaged over :math:`B`
  minibatches.
* **Fisher** (Theis et al., 2018): :math:`\Delta_k = \frac{1}{2N}\sum_n
  G_{nk}^2`, the diagonal Fisher estimate of the loss increase when the map
  is removed; optionally :math:`\Delta_k - \beta \cdot \mathrm{FLOPs}_k`.

A map with a smaller score is less important; :func:`lowest_ranked` picks the
next map to remove.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

Scores = Mapping[str, Any]


class GateStats(NamedTuple):
  """Running sums of gate gradients, per layer (a dict keyed by layer name).

  Attributes:
    abs_sum: :math:`\\sum_n |G_{nk}|`, float32 ``(C,)`` per layer.
    sq_sum: :math:`\\sum_n G_{nk}^2`.
    batch_sq_sum: :math:`\\sum_b (\\frac{1}{|b|}\\sum_{n \\in b} G_{nk})^2`.
    num_examples: :math:`N`, examples accumulated (float32 scalar).
    num_batches: :math:`B`, minibatches accumulated (float32 scalar).
  """

  abs_sum: dict
  sq_sum: dict
  batch_sq_sum: dict
  num_examples: jax.Array
  num_batches: jax.Array


def _check_widths(widths: Mapping[str, int]) -> dict:
  if not isinstance(widths, Mapping) or not widths:
    raise TypeError(
      f"`widths` must be a non-empty mapping layer name -> number of channels, got {widths!r}."
    )
  out = {}
  for name, c in widths.items():
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
      raise ValueError(f"`widths[{name!r}]` must be a positive int, got {c!r}.")
    out[name] = int(c)
  return out


def init_gate_stats(widths: Mapping[str, int]) -> GateStats:
  """Empty :class:`GateStats` for layers with the given channel counts.

  Args:
    widths: layer name -> number of channels (gates) of that layer.

  Returns:
    Zero sums.

  Example:
    >>> stats = init_gate_stats({'conv1': 3})
    >>> stats.abs_sum['conv1'].tolist(), float(stats.num_examples)
    ([0.0, 0.0, 0.0], 0.0)
  """
  widths = _check_widths(widths)
  # Built on the host and transferred: an eager jnp.zeros compiles once per
  # shape, which adds up for many layers in short runs.
  zeros = {k: jax.device_put(np.zeros((c,), np.float32)) for k, c in widths.items()}
  zero = jax.device_put(np.zeros((), np.float32))
  return GateStats(
    abs_sum=zeros, sq_sum=dict(zeros), batch_sq_sum=dict(zeros), num_examples=zero, num_batches=zero
  )


def accumulate_gate_stats(
  stats: GateStats,
  per_example: Mapping[str, jax.Array],
  gates: Optional[Mapping[str, jax.Array]] = None,
) -> GateStats:
  r"""Adds one minibatch of per-example gate gradients to ``stats``.

  Args:
    stats: the running sums.
    per_example: layer name -> :math:`\partial L_n / \partial \gamma_{nk}`,
      shape ``(N, C)``: the gradient of the **sum** of per-example losses
      with respect to per-example gates (or ``N`` times that of the mean).
    gates: optional layer name -> gate values ``(C,)`` or ``(N, C)``;
      :math:`G = \gamma \, \partial L / \partial \gamma` (the gradients are
      used as given when omitted, i.e. gates of one).

  Returns:
    The updated sums. Jit-compatible.

  Raises:
    ValueError: if the layer names or the channel counts do not match.

  Example:
    >>> import jax.numpy as jnp
    >>> stats = init_gate_stats({'fc': 2})
    >>> stats = accumulate_gate_stats(stats, {'fc': jnp.array([[1., -2.], [3., 2.]])})
    >>> stats.abs_sum['fc'].tolist(), stats.batch_sq_sum['fc'].tolist()
    ([4.0, 4.0], [4.0, 0.0])
  """
  if set(per_example) != set(stats.abs_sum):
    raise ValueError(
      f"`per_example` has layers {sorted(per_example)}, the stats have {sorted(stats.abs_sum)}."
    )
  abs_sum, sq_sum, batch_sq = {}, {}, {}
  n = 0
  for name, g in per_example.items():
    g = jnp.asarray(g, jnp.float32)
    c = stats.abs_sum[name].shape[0]
    if g.ndim != 2 or g.shape[1] != c:
      raise ValueError(f"`per_example[{name!r}]` must have shape (N, {c}), got {g.shape}.")
    if gates is not None and name in gates:
      g = g * jnp.asarray(gates[name], jnp.float32)
    n = g.shape[0]
    abs_sum[name] = stats.abs_sum[name] + jnp.sum(jnp.abs(g), 0)
    sq_sum[name] = stats.sq_sum[name] + jnp.sum(g * g, 0)
    batch_sq[name] = stats.batch_sq_sum[name] + jnp.mean(g, 0) ** 2
  return GateStats(abs_sum, sq_sum, batch_sq, stats.num_examples + n, stats.num_batches + 1)


def _safe_div(x, d):
  return x / jnp.maximum(d, 1.0)


def taylor_first_order(stats: GateStats, spatial_sizes: Optional[Mapping[str, int]] = None) -> dict:
  r"""Molchanov et al. (2017): :math:`\Theta_k = \frac{1}{NM}\sum_n |G_{nk}|`.

  Args:
    stats: accumulated :class:`GateStats`.
    spatial_sizes: layer name -> :math:`M`, the number of spatial positions
      of its maps (1 for dense layers, the default). It only rescales a layer
      and cancels in :func:`l2_normalize`.

  Returns:
    Layer name -> float32 scores ``(C,)``.

  Example:
    >>> import jax.numpy as jnp
    >>> s = accumulate_gate_stats(init_gate_stats({'c': 2}),
    ...                           {'c': jnp.array([[2., -4.], [-2., 0.]])})
    >>> taylor_first_order(s, {'c': 4})['c'].tolist()
    [0.5, 0.5]

  References:
    P. Molchanov, S. Tyree, T. Karras, T. Aila, J. Kautz. Pruning
    Convolutional Neural Networks for Resource Efficient Inference.
    ICLR 2017. https://arxiv.org/abs/1611.06440
  """
  sizes = dict(spatial_sizes or {})
  out = {}
  for name, v in stats.abs_sum.items():
    m = sizes.get(name, 1)
    if not isinstance(m, (int, np.integer)) or m < 1:
      raise ValueError(f"`spatial_sizes[{name!r}]` must be a positive int, got {m!r}.")
    out[name] = _safe_div(v, stats.num_examples) / m
  return out


def taylor_gate(stats: GateStats) -> dict:
  r"""Molchanov et al. (2019): :math:`I_k = \frac{1}{B}\sum_b
  (\gamma_k \partial \bar L_b / \partial \gamma_k)^2`.

  Args:
    stats: accumulated :class:`GateStats`.

  Returns:
    Layer name -> float32 scores ``(C,)``.

  Example:
    >>> import jax.numpy as jnp
    >>> s = accumulate_gate_stats(init_gate_stats({'c': 2}),
    ...                           {'c': jnp.array([[2., -4.], [-2., 0.]])})
    >>> taylor_gate(s)['c'].tolist()   # (mean over the batch)^2
    [0.0, 4.0]

  References:
    P. Molchanov, A. Mallya, S. Tyree, I. Frosio, J. Kautz. Importance
    Estimation for Neural Network Pruning. CVPR 2019.
    https://arxiv.org/abs/1906.10771
  """
  return {k: _safe_div(v, stats.num_batches) for k, v in stats.batch_sq_sum.items()}


def fisher(stats: GateStats) -> dict:
  r"""Theis et al. (2018): :math:`\Delta_k = \frac{1}{2N}\sum_n G_{nk}^2`.

  Args:
    stats: accumulated :class:`GateStats`.

  Returns:
    Layer name -> float32 scores ``(C,)``.

  Example:
    >>> import jax.numpy as jnp
    >>> s = accumulate_gate_stats(init_gate_stats({'c': 2}),
    ...                           {'c': jnp.array([[2., -4.], [-2., 0.]])})
    >>> fisher(s)['c'].tolist()
    [2.0, 4.0]

  References:
    L. Theis, I. Korshunova, A. Tejani, F. Huszar. Faster gaze prediction
    with dense networks and Fisher pruning. 2018.
    https://arxiv.org/abs/1801.05787
  """
  return {k: _safe_div(v, stats.num_examples) / 2.0 for k, v in stats.sq_sum.items()}


def per_example_from_activations(activations: jax.Array, grads: jax.Array) -> jax.Array:
  r""":math:`G_{nk} = \sum_m a_{n,m,k} \, \partial L_n / \partial a_{n,m,k}`.

  The direct definition, from activations and their gradients (what hooks
  on the feature maps would give); equal to the gate gradient at gate 1.

  Args:
    activations: feature maps, ``(N, ..., C)`` (NHWC or ``(N, C)``).
    grads: :math:`\partial L / \partial a` shaped like ``activations``.

  Returns:
    ``(N, C)``.

  Example:
    >>> import jax.numpy as jnp
    >>> a = jnp.ones((1, 2, 2, 1)); g = jnp.full((1, 2, 2, 1), 0.5)
    >>> per_example_from_activations(a, g).tolist()
    [[2.0]]
  """
  activations = jnp.asarray(activations)
  grads = jnp.asarray(grads)
  if activations.shape != grads.shape or activations.ndim < 2:
    raise ValueError(
      f"`activations` {activations.shape} and `grads` {grads.shape} must "
      "have the same shape (N, ..., C)."
    )
  axes = tuple(range(1, activations.ndim - 1))
  prod = activations.astype(jnp.float32) * grads.astype(jnp.float32)
  return jnp.sum(prod, axis=axes) if axes else prod


def l2_normalize(scores: Scores, alive: Optional[Scores] = None) -> dict:
  r"""Divides each layer's scores by their L2 norm, :math:`\Theta /
  \|\Theta\|_2` (Molchanov et al. 2017, Sec. 2.3).

  Args:
    scores: layer name -> scores ``(C,)``.
    alive: optional layer name -> bool ``(C,)``; only alive channels enter
      the norm (removed maps have meaningless scores).

  Returns:
    Layer name -> normalised float32 scores (a zero layer stays zero).

  Example:
    >>> import jax.numpy as jnp
    >>> l2_normalize({'a': jnp.array([3., 4.])})['a'].tolist()
    [0.6, 0.8]
  """
  out = {}
  for name, s in scores.items():
    s = jnp.asarray(s, jnp.float32)
    kept = s if alive is None else jnp.where(jnp.asarray(alive[name]), s, 0.0)
    norm = jnp.sqrt(jnp.sum(kept * kept))
    out[name] = jnp.where(norm > 0, s / jnp.where(norm > 0, norm, 1.0), s)
  return out


def cost_adjusted(scores: Scores, costs: Scores, weight: float) -> dict:
  r"""Subtracts a resource term: :math:`s_k - \lambda \, c_k`.

  With :math:`c_k` the FLOPs saved by removing map :math:`k`, this is the
  FLOPs regulariser of Molchanov et al. (2017) and the cost term of Theis et
  al. (2018): expensive maps rank lower and go first. Scale :math:`c_k`
  (e.g. as a fraction of the model's FLOPs) so that :math:`\lambda` is
  comparable with the scores.

  Args:
    scores: layer name -> scores ``(C,)``.
    costs: layer name -> cost of each map ``(C,)`` or a scalar per layer.
    weight: :math:`\lambda \ge 0`.

  Returns:
    Layer name -> adjusted float32 scores.

  Example:
    >>> import jax.numpy as jnp
    >>> cost_adjusted({'a': jnp.array([1., 2.])}, {'a': 10.0}, 0.1)['a'].tolist()
    [0.0, 1.0]
  """
  weight = float(weight)
  if not math.isfinite(weight) or weight < 0:
    raise ValueError(f"`weight` must be a finite number >= 0, got {weight!r}.")
  missing = set(scores) - set(costs)
  if missing:
    raise ValueError(f"`costs` lacks the layers {sorted(missing)}.")
  return {
    k: jnp.asarray(s, jnp.float32) - weight * jnp.asarray(costs[k], jnp.float32)
    for k, s in scores.items()
  }


def lowest_ranked(scores: Scores, alive: Scores, *, min_alive: int = 1) -> tuple[str, int]:
  """The alive map with the smallest score across all layers (global rank).

  Ties go to the earlier layer (mapping order), then the lower index; NaN
  scores rank lowest. Layers with only ``min_alive`` alive maps left are
  skipped, so no layer is ever emptied.

  Args:
    scores: layer name -> scores ``(C,)``.
    alive: layer name -> bool ``(C,)``.
    min_alive: the fewest maps a layer keeps (>= 1).

  Returns:
    ``(layer name, channel index)``.

  Raises:
    ValueError: if no layer has more than ``min_alive`` alive maps, or the
      shapes disagree.

  Example:
    >>> import numpy as np
    >>> scores = {'a': np.array([0.5, 0.1]), 'b': np.array([0.2, 0.05])}
    >>> alive = {'a': np.array([True, True]), 'b': np.array([True, False])}
    >>> lowest_ranked(scores, alive)
    ('a', 1)
  """
  if isinstance(min_alive, bool) or not isinstance(min_alive, int) or min_alive < 1:
    raise ValueError(f"`min_alive` must be an int >= 1, got {min_alive!r}.")
  best = None
  for name, s in scores.items():
    s = np.asarray(s, np.float64)
    a = np.asarray(alive[name], bool)
    if s.shape != a.shape:
      raise ValueError(f"scores[{name!r}] has shape {s.shape} but alive[{name!r}] has {a.shape}.")
    if a.sum() <= min_alive:
      continue
    s = np.where(np.isnan(s), -np.inf, s)
    idx = np.flatnonzero(a)
    j = idx[np.argmin(s[idx])]
    if best is None or s[j] < best[0]:
      best = (s[j], name, int(j))
  if best is None:
    raise ValueError(
      f"No layer has more than min_alive={min_alive} alive maps; nothing left to remove."
    )
  return best[1], best[2]
