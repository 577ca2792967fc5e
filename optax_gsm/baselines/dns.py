r"""Dynamic Network Surgery (Guo, Yao and Chen, NeurIPS 2016).

"Dynamic Network Surgery for Efficient DNNs" keeps, next to every eligible
weight matrix :math:`W_\ell`, a 0/1 mask :math:`T_\ell`. The forward pass
uses :math:`W_\ell \odot T_\ell`; the gradient with respect to that product
updates **all** of :math:`W_\ell`, pruned entries included ("splicing": a
pruned weight that grows back is restored). The masks follow a hysteresis on
the magnitudes, with per-layer thresholds computed once from the mean
:math:`\mu_\ell` and standard deviation :math:`\sigma_\ell` of
:math:`|W_\ell|` at the start:

.. math::

   t_\ell &= \max(\mu_\ell + c\,\sigma_\ell,\, 0) \\
   T_{ij} &\leftarrow \begin{cases}
      0 & \text{if } T_{ij} = 1 \text{ and } |W_{ij}| < 0.9\, t_\ell \\
      1 & \text{if } T_{ij} = 0 \text{ and } |W_{ij}| > 1.1\, t_\ell \\
      T_{ij} & \text{otherwise (the band keeps its state).}
   \end{cases}

The masks are updated at iteration :math:`k` with probability
:math:`\sigma(k) = (1 + \gamma k)^{-p}` (surgery becomes rarer as training
converges) and never after a stop step; :math:`c` ("crate") sets the
compression.

Here, :func:`dynamic_network_surgery` is the mask bookkeeping as an optax
transformation (it passes the updates through unchanged: splicing), and
:func:`surgery_forward` is the forward-pass helper that gives the model
:math:`W \odot T` while the gradient reaches all of :math:`W`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from optax_gsm import _checks
from optax_gsm import eligibility
from optax_gsm.baselines import magnitude as magnitude_lib

PyTree = Any


class DNSState(NamedTuple):
  """State of :func:`dynamic_network_surgery`.

  Attributes:
    count: updates so far (int32); the iteration :math:`k`.
    key: the PRNG key (``uint32[2]``) that draws the surgery coin flips.
    thresholds: :math:`t_\\ell`, one float32 per eligible leaf (leaf order) in
      a vector of shape ``(num_eligible_leaves,)``, fixed at init.
    masks: :math:`T`, a pytree of bool arrays shaped like ``params`` (every
      leaf; the leaves that are not eligible stay all True and are never
      updated), so ``optax.tree_utils.tree_map_params`` maps it like a
      momentum buffer and sharding, jit and orbax see plain arrays.
  """

  count: jax.Array
  key: jax.Array
  thresholds: jax.Array
  masks: PyTree


def dns_thresholds(
  params: PyTree, c_rate: Union[float, Sequence[float]], *, where: eligibility.Where = None
) -> list[jax.Array]:
  r"""Per-leaf thresholds :math:`t_\ell = \max(\mu_\ell + c_\ell \sigma_\ell, 0)`.

  :math:`\mu_\ell` and :math:`\sigma_\ell` are the mean and (population)
  standard deviation of :math:`|W_\ell|` over all entries of the leaf.

  Args:
    params: the parameter pytree.
    c_rate: :math:`c`, one number for every leaf or one per eligible leaf.
    where: eligible leaves (see :func:`optax_gsm.global_top_q`).

  Returns:
    A list of float32 scalars, one per eligible leaf.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[1.0, -3.0]])             # |w|: mean 2, std 1
    >>> [float(t) for t in dns_thresholds({'w': w}, 0.5)]
    [2.5]
    >>> [float(t) for t in dns_thresholds({'w': w}, -5.0)]
    [0.0]
  """
  leaves = jax.tree.leaves(params)
  flags = eligibility.resolve_where(where, params)
  eligible = [l for l, f in zip(leaves, flags) if f]
  rates = _rates(c_rate, len(eligible))
  out = []
  for leaf, c in zip(eligible, rates):
    a = jnp.abs(jnp.asarray(leaf, jnp.float32))
    out.append(jnp.maximum(jnp.mean(a) + c * jnp.std(a), 0.0))
  return out


def _rates(c_rate, n: int) -> list[float]:
  if isinstance(c_rate, (int, float)) and not isinstance(c_rate, bool):
    return [float(c_rate)] * n
  try:
    # A bool is not iterable either: the TypeError below reports it.
    rates = [float(c) for c in c_rate]  # pyright: ignore[reportGeneralTypeIssues]
  except (TypeError, ValueError):
    raise TypeError(
      f"`c_rate` must be a number or a sequence of numbers (one per eligible leaf), got {c_rate!r}."
    ) from None
  if len(rates) != n:
    raise ValueError(
      f"`c_rate` has {len(rates)} values but there are {n} eligible leaves; "
      "give one number for all or one per eligible leaf."
    )
  return rates


def dns_update_masks(
  masks: jax.Array, weights: jax.Array, threshold, *, low: float = 0.9, high: float = 1.1
) -> jax.Array:
  r"""One hysteresis step: prune below ``low * t``, splice back above ``high * t``.

  Entries with :math:`0.9\,t \le |w| \le 1.1\,t` keep their state.

  Args:
    masks: bool array :math:`T`.
    weights: :math:`W`, same shape.
    threshold: :math:`t \ge 0`.
    low, high: the band factors (0.9 and 1.1 in the paper).

  Returns:
    The new bool mask.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([0.5, 0.95, 1.05, 2.0, 0.5, 0.95, 1.05, 2.0])
    >>> t = jnp.array([True] * 4 + [False] * 4)
    >>> dns_update_masks(t, w, 1.0).astype(int).tolist()
    [0, 1, 1, 1, 0, 0, 0, 1]
  """
  a = jnp.abs(weights)
  t = jnp.asarray(threshold, a.dtype)
  drop = masks & (a < low * t)
  grow = (~masks) & (a > high * t)
  return (masks & ~drop) | grow


def surgery_forward(params: PyTree, masks: PyTree) -> PyTree:
  r"""Weights for the forward pass: value :math:`W \odot T`, gradient to all of :math:`W`.

  Implemented as :math:`W + \mathrm{stop\_gradient}(W \odot T - W)`, so
  :math:`\partial L / \partial W = \partial L / \partial (W \odot T)`
  (a straight-through estimator): pruned weights keep learning and can be
  spliced back. Pruned entries are exactly zero in the value.

  Args:
    params: the parameter pytree.
    masks: bool arrays matching ``params`` (see :func:`dns_masks`).

  Returns:
    A pytree like ``params`` to run the model with.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> p = {'w': jnp.array([2.0, 3.0])}
    >>> m = {'w': jnp.array([True, False])}
    >>> surgery_forward(p, m)['w'].tolist()
    [2.0, 0.0]
    >>> g = jax.grad(lambda p: jnp.sum(surgery_forward(p, m)['w'] * 5.0))(p)
    >>> g['w'].tolist()      # the pruned weight gets the gradient too
    [5.0, 5.0]
  """
  from optax_gsm.baselines import masking  # pylint: disable=g-import-not-at-top

  leaves, treedef = jax.tree.flatten(params)
  ms = masking.mask_leaves(masks, params)
  out = [
    w + jax.lax.stop_gradient(jnp.where(m, w, jnp.zeros([], w.dtype)) - w)
    for w, m in zip(leaves, ms)
  ]
  return jax.tree.unflatten(treedef, out)


def dynamic_network_surgery(
  c_rate: Union[float, Sequence[float]] = 0.0,
  *,
  gamma: float = 1e-4,
  power: float = 1.0,
  stop_step: Optional[int] = None,
  seed: int = 0,
  low: float = 0.9,
  high: float = 1.1,
  where: eligibility.Where = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The DNS mask updates as an optax transformation (updates pass through).

  At init, :math:`t_\ell = \max(\mu_\ell + c\,\sigma_\ell, 0)` from the
  magnitudes of ``params`` (:func:`dns_thresholds`) and all masks are 1. At
  every update :math:`k`, with probability :math:`(1 + \gamma k)^{-p}` and
  only while :math:`k <` ``stop_step``, the masks take one hysteresis step
  (:func:`dns_update_masks`) on the current weights. The updates are returned
  unchanged: every weight, pruned or not, is trained (splicing). The model
  must run on ``surgery_forward(params, dns_masks(opt_state, params))``, which
  makes the gradient the one with respect to :math:`W \odot T`.

  The coin flip at :math:`k = 0` always succeeds, so the first update prunes.
  The mask of step :math:`k` is decided after the gradient of step
  :math:`k` was computed with the previous mask (a one-step lag compared with
  Caffe, where the mask is updated inside the forward pass).

  Args:
    c_rate: :math:`c`, one number or one per eligible leaf; larger prunes more.
    gamma: :math:`\gamma \ge 0`.
    power: :math:`p \ge 0`.
    stop_step: no surgery from this update on (None: never stops).
    seed: seeds the coin flips.
    low, high: the hysteresis band factors, ``0 <= low <= high``.
    where: eligible leaves (see :func:`optax_gsm.global_top_q`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` needs ``params``)
    with state :class:`DNSState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> params = {'w': jnp.array([[0.1, -2.0], [3.0, 0.2]])}
    >>> tx = optax.chain(dynamic_network_surgery(0.0), optax.sgd(0.1))
    >>> state = tx.init(params)              # t = mean |w| = 1.325
    >>> _, state = tx.update({'w': jnp.zeros((2, 2))}, state, params)
    >>> dns_masks(state, params)['w'].tolist()
    [[False, True], [True, False]]

  References:
    Y. Guo, A. Yao, Y. Chen. Dynamic Network Surgery for Efficient DNNs.
    NeurIPS 2016. https://arxiv.org/abs/1608.04493
  """
  rates_check = c_rate
  if isinstance(rates_check, bool):
    raise TypeError(f"`c_rate` must be a number, got {c_rate!r}.")
  for name, v in (("gamma", gamma), ("power", power), ("low", low), ("high", high)):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise TypeError(f"`{name}` must be a number, got {v!r}.")
    if not v >= 0:
      raise ValueError(f"`{name}` must be >= 0, got {v!r}.")
  if low > high:
    raise ValueError(
      f"`low` ({low}) must be <= `high` ({high}): the hysteresis band is [low * t, high * t]."
    )
  if stop_step is not None:
    magnitude_lib._check_int("stop_step", stop_step, 0)  # pylint: disable=protected-access
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise TypeError(f"`seed` must be an int, got {seed!r}.")

  def init_fn(params):
    leaves = jax.tree.leaves(params)
    masks = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
    if not leaves:
      # optax.tree_utils.tree_map_params calls init on a placeholder with
      # no leaves to find the params-shaped trees (here `masks`); there is
      # nothing to resolve, and update() still refuses empty params.
      thresholds = jnp.zeros((0,), jnp.float32)
    else:
      thresholds = jnp.stack(dns_thresholds(params, c_rate, where=where))
    return DNSState(
      count=jnp.zeros([], jnp.int32),
      key=jax.random.PRNGKey(seed),
      thresholds=thresholds,
      masks=masks,
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
        "dynamic_network_surgery updates its masks from the weight "
        "magnitudes, so update() needs params: call tx.update(grads, state, "
        "params)."
      )
    leaves = jax.tree.leaves(params)
    flags = eligibility.resolve_where(where, params)
    mask_leaves, mask_def = jax.tree.flatten(state.masks)
    magnitude_lib._check_mask_count("DNSState", mask_leaves, leaves)  # pylint: disable=protected-access
    k = state.count
    key, sub = jax.random.split(state.key)
    prob = (1.0 + gamma * k.astype(jnp.float32)) ** (-float(power))
    do = jax.random.uniform(sub) < prob
    if stop_step is not None:
      do = do & (k < stop_step)
    eligible = [i for i, f in enumerate(flags) if f]
    for j, i in enumerate(eligible):
      m = mask_leaves[i]
      mask_leaves[i] = jnp.where(
        do, dns_update_masks(m, leaves[i], state.thresholds[j], low=low, high=high), m
      )
    return updates, DNSState(
      count=_checks.increment(k),
      key=key,
      thresholds=state.thresholds,
      masks=jax.tree.unflatten(mask_def, mask_leaves),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dns_masks(opt_state: Any, params: PyTree, where: eligibility.Where = None) -> PyTree:
  """The current DNS masks :math:`T`, shaped like ``params``.

  Args:
    opt_state: an optimizer state containing a :class:`DNSState`.
    params: the parameter pytree (for the structure; any pytree with the
      same leaves in the same order, e.g. the plain dict of an
      ``flax.nnx.State``).
    where: accepted for compatibility and ignored: the state holds the mask
      of every leaf (all True on the leaves that are not eligible).

  Returns:
    A pytree of bool arrays like ``params`` (all True on non-eligible leaves).

  Raises:
    ValueError: if the state's masks do not have one array per leaf of
      ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'w': jnp.ones((2, 2)), 'b': jnp.ones(2)}
    >>> tx = dynamic_network_surgery(1.0)
    >>> dns_masks(tx.init(params), params)['w'].tolist()
    [[True, True], [True, True]]
  """
  del where  # the state is params-shaped
  st = magnitude_lib.find_state(opt_state, DNSState)
  leaves, treedef = jax.tree.flatten(params)
  mask_leaves = jax.tree.leaves(st.masks)
  magnitude_lib._check_mask_count("DNSState", mask_leaves, leaves)  # pylint: disable=protected-access
  return jax.tree.unflatten(treedef, mask_leaves)
