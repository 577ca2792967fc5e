r"""Magnitude pruning with retraining (Han, Pool, Tran and Dally, NeurIPS 2015).

"Learning both Weights and Connections for Efficient Neural Networks": train
densely, remove the connections of small magnitude, retrain the survivors
with the pruned ones held at zero, optionally repeat. Three pieces:

* the cut. Per layer, Han et al. remove :math:`|w| < q\,\sigma_\ell` where
  :math:`\sigma_\ell` is the standard deviation of the layer's weights and
  :math:`q` a "quality parameter" (:func:`layerwise_threshold_prune`).
  Globally to an exact count Q, keep the Q largest :math:`|w|` over all
  eligible layers (:func:`optax_gsm.magnitude_prune`).
* the retraining with a fixed mask:
  :func:`optax_gsm.baselines.masking.masked_updates`.
* gradual pruning (Zhu and Gupta, 2017, as in TensorFlow Model Optimization's
  ``PolynomialDecay``): the target sparsity follows

  .. math::  s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{n}\right)^3,
             \quad t_0 \le t \le t_0 + n,

  and every ``frequency`` steps the weights are re-pruned to :math:`s_t`
  (:func:`polynomial_sparsity_schedule`, :func:`scheduled_magnitude_prune`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from optax_gsm import _checks
from optax_gsm import eligibility
from optax_gsm import selection as selection_lib

PyTree = Any
Schedule = Callable[[chex.Numeric], chex.Numeric]

SCOPES = ("global", "layer")


def _check_sparsity(name: str, value: Any) -> float:
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise TypeError(f"`{name}` must be a number in [0, 1), got {value!r}.") from None
  if not 0.0 <= v < 1.0:
    raise ValueError(
      f"`{name}` must be a sparsity in [0, 1) (the fraction of eligible "
      f"weights removed; 1 would remove all), got {v!r}."
    )
  return v


def _check_int(name: str, value: Any, lo: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(f"`{name}` must be an int, got {value!r}.")
  if value < lo:
    raise ValueError(f"`{name}` must be >= {lo}, got {value!r}.")
  return value


def layerwise_threshold_prune(
  params: PyTree, quality: float, *, where: eligibility.Where = None
) -> tuple[PyTree, PyTree]:
  r"""Han et al.'s per-layer cut: removes :math:`|w| < q \cdot \mathrm{std}(W_\ell)`.

  Each eligible leaf :math:`W_\ell` keeps the entries with
  :math:`|w| \ge q\,\sigma_\ell`, where :math:`\sigma_\ell` is the standard
  deviation of all entries of the leaf (computed before pruning). A larger
  ``quality`` prunes more; the compression is a result, not an input.

  Args:
    params: the parameter pytree.
    quality: :math:`q \ge 0`.
    where: eligible leaves (see :func:`optax_gsm.global_top_q`).

  Returns:
    ``(pruned_params, masks)``; masks are all True on leaves not eligible.

  Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([[-2.0, 0.1], [0.2, 2.0]])   # std 1.417: cut at 0.708
    >>> pruned, masks = layerwise_threshold_prune({'w': w}, 0.5)
    >>> masks['w'].tolist()
    [[True, False], [False, True]]

  References:
    S. Han, J. Pool, J. Tran, W. J. Dally. Learning both Weights and
    Connections for Efficient Neural Networks. NeurIPS 2015.
    https://arxiv.org/abs/1506.02626
  """
  try:
    q = float(quality)
  except (TypeError, ValueError):
    raise TypeError(f"`quality` must be a number, got {quality!r}.") from None
  if not q >= 0.0:
    raise ValueError(f"`quality` must be >= 0, got {quality!r}.")
  leaves, treedef = jax.tree.flatten(params)
  flags = eligibility.resolve_where(where, params)
  masks, pruned = [], []
  for leaf, f in zip(leaves, flags):
    if not f:
      masks.append(jnp.ones(jnp.shape(leaf), bool))
      pruned.append(leaf)
      continue
    w = jnp.asarray(leaf, jnp.float32)
    m = jnp.abs(w) >= q * jnp.std(w)
    masks.append(m)
    pruned.append(jnp.where(m, leaf, jnp.zeros([], leaf.dtype)))
  return jax.tree.unflatten(treedef, pruned), jax.tree.unflatten(treedef, masks)


def polynomial_sparsity_schedule(
  initial_sparsity: float,
  final_sparsity: float,
  begin_step: int,
  end_step: int,
  power: float = 3.0,
) -> Schedule:
  r"""TF-MOT's ``PolynomialDecay`` sparsity as an optax-style schedule.

  .. math::

     s(t) = s_f + (s_i - s_f)\left(1 - p\right)^{k},\qquad
     p = \mathrm{clip}\!\left(\frac{t - t_0}{t_1 - t_0}, 0, 1\right)

  so :math:`s = s_i` up to ``begin_step`` :math:`t_0` and :math:`s = s_f`
  from ``end_step`` :math:`t_1` on; with :math:`k = 3` the sparsity rises
  fast at first and slowly at the end (Zhu and Gupta, 2017).

  Args:
    initial_sparsity: :math:`s_i` in [0, 1).
    final_sparsity: :math:`s_f` in [0, 1), >= ``initial_sparsity``.
    begin_step: :math:`t_0 \ge 0`.
    end_step: :math:`t_1 > t_0`.
    power: the exponent :math:`k > 0` (3 in TF-MOT and Zhu and Gupta).

  Returns:
    A function ``step -> sparsity`` (float32; works on traced steps).

  Example:
    >>> s = polynomial_sparsity_schedule(0.0, 0.8, begin_step=0, end_step=100)
    >>> [round(float(s(t)), 4) for t in (0, 50, 100, 200)]
    [0.0, 0.7, 0.8, 0.8]

  References:
    M. Zhu, S. Gupta. To prune, or not to prune: exploring the efficacy of
    pruning for model compression. 2017. https://arxiv.org/abs/1710.01878
  """
  s_i = _check_sparsity("initial_sparsity", initial_sparsity)
  s_f = _check_sparsity("final_sparsity", final_sparsity)
  if s_f < s_i:
    raise ValueError(
      f"`final_sparsity` ({s_f}) must be >= `initial_sparsity` ({s_i}): "
      "pruning never grows weights back."
    )
  t0 = _check_int("begin_step", begin_step, 0)
  t1 = _check_int("end_step", end_step, 0)
  if t1 <= t0:
    raise ValueError(f"`end_step` ({t1}) must be > `begin_step` ({t0}).")
  try:
    k = float(power)
  except (TypeError, ValueError):
    raise TypeError(f"`power` must be a number, got {power!r}.") from None
  if not k > 0:
    raise ValueError(f"`power` must be > 0, got {power!r}.")

  def schedule(step):
    p = jnp.clip((jnp.asarray(step, jnp.float32) - t0) / (t1 - t0), 0.0, 1.0)
    return jnp.asarray(s_f + (s_i - s_f) * (1.0 - p) ** k, jnp.float32)

  return schedule


class ScheduledPruneState(NamedTuple):
  """State of :func:`scheduled_magnitude_prune`.

  Attributes:
    count: updates so far (int32).
    masks: a pytree of bool arrays shaped like ``params`` (every leaf; the
      leaves that are not eligible stay all True); False = pruned. Being
      params-shaped, ``optax.tree_utils.tree_map_params`` maps it like a
      momentum buffer, and sharding, jit and orbax see plain arrays.
  """

  count: jax.Array
  masks: PyTree


def _keep_count(n: int, sparsity) -> jax.Array:
  # round((1 - s) * n) as n - round(s * n): the kept count of a layer then
  # never exceeds n, and s = 0 keeps everything exactly.
  s = jnp.asarray(sparsity, jnp.float32)
  return jnp.int32(n) - jnp.round(s * n).astype(jnp.int32)


def scheduled_magnitude_prune(
  sparsity: Schedule,
  *,
  frequency: int,
  begin_step: int = 0,
  end_step: Optional[int] = None,
  scope: str = "global",
  where: eligibility.Where = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradual magnitude pruning: re-prunes to ``sparsity(step)`` every ``frequency`` steps.

  Chain it **last** (after the learning rate). At a pruning step :math:`t`
  (:math:`t_0 \le t \le t_1` and :math:`(t - t_0) \bmod f = 0`, plus
  :math:`t_1` itself so the final sparsity is always reached) the weights
  after this step, :math:`W' = W + u`, are pruned by magnitude among the
  surviving entries to keep

  .. math::  K = N - \mathrm{round}(s(t)\,N)

  entries, where :math:`N` is the eligible count (``scope="global"``: one
  exact top-K over all eligible leaves, ties to the lower global index) or
  each leaf's size (``scope="layer"``: every leaf to the same sparsity, as in
  TF-MOT). Between pruning steps the mask is fixed. Pruned entries get the
  update :math:`-W`, so they are exactly zero after ``optax.apply_updates``
  and stay zero; surviving entries get :math:`u` unchanged. The masks only
  shrink. Non-eligible leaves pass through.

  Args:
    sparsity: a schedule ``step -> sparsity in [0, 1)``, e.g.
      :func:`polynomial_sparsity_schedule`.
    frequency: prune every this many steps (>= 1).
    begin_step: first pruning step :math:`t_0`.
    end_step: last pruning step :math:`t_1` (None: no end).
    scope: ``"global"`` or ``"layer"``.
    where: eligible leaves (see :func:`optax_gsm.global_top_q`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` needs ``params``)
    with state :class:`ScheduledPruneState`; read the masks with
    :func:`scheduled_masks`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> params = {'w': jnp.array([[1.0, -4.0], [3.0, 2.0]])}
    >>> tx = optax.chain(optax.sgd(0.0), scheduled_magnitude_prune(
    ...     lambda t: 0.5, frequency=1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones((2, 2))}, state, params)
    >>> optax.apply_updates(params, updates)['w'].tolist()
    [[0.0, -4.0], [3.0, 0.0]]

  References:
    M. Zhu, S. Gupta. To prune, or not to prune: exploring the efficacy of
    pruning for model compression. 2017. https://arxiv.org/abs/1710.01878
  """
  if not callable(sparsity):
    raise TypeError(
      f"`sparsity` must be a schedule step -> sparsity (e.g. "
      f"polynomial_sparsity_schedule(...) or lambda t: 0.9), got "
      f"{sparsity!r}."
    )
  frequency = _check_int("frequency", frequency, 1)
  begin_step = _check_int("begin_step", begin_step, 0)
  if end_step is not None:
    end_step = _check_int("end_step", end_step, begin_step)
  if scope not in SCOPES:
    raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}.")

  def init_fn(params):
    if jax.tree.leaves(params):
      # Checked here so that a bad `where` fails at init. Skipped without
      # leaves: optax.tree_utils.tree_map_params calls init on a placeholder
      # with none to find the params-shaped trees (here `masks`); update()
      # still refuses empty params.
      eligibility.resolve_where(where, params)
    # Shaped like params, every leaf; the masks start all True.
    return ScheduledPruneState(
      count=jnp.zeros([], jnp.int32),
      masks=jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
        "scheduled_magnitude_prune prunes by weight magnitude, so update() "
        "needs params: call tx.update(grads, state, params)."
      )
    p_leaves, treedef = jax.tree.flatten(params)
    u_leaves = treedef.flatten_up_to(updates)
    flags = eligibility.resolve_where(where, params)
    idx = [i for i, f in enumerate(flags) if f]
    mask_leaves, mask_def = jax.tree.flatten(state.masks)
    _check_mask_count("ScheduledPruneState", mask_leaves, p_leaves)
    t = state.count
    on = (t >= begin_step) & ((t - begin_step) % frequency == 0)
    if end_step is not None:
      on = (on & (t <= end_step)) | (t == end_step)

    def prune(masks):
      s = sparsity(t)
      # Pruned entries are already zero after this step, so ranking |W + u|
      # with them masked out keeps the mask monotone (it only shrinks).
      mags = [
        jnp.where(m, jnp.abs((p_leaves[i] + u_leaves[i]).astype(jnp.float32)), -1.0)
        for i, m in zip(idx, masks)
      ]
      keys = [selection_lib.scores_to_keys(a) for a in mags]
      if scope == "global":
        n = sum(int(a.size) for a in mags)
        new, _ = selection_lib.top_q_keys(keys, _keep_count(n, s), method="threshold")
      else:
        new = [
          selection_lib.top_q_keys([k], _keep_count(int(k.size), s), method="threshold")[0][0]
          for k in keys
        ]
      return tuple(jnp.logical_and(a, b) for a, b in zip(new, masks))

    masks = jax.lax.cond(on, prune, lambda m: tuple(m), tuple(mask_leaves[i] for i in idx))
    out = list(u_leaves)
    for i, m in zip(idx, masks):
      u, w = u_leaves[i], p_leaves[i]
      out[i] = jnp.where(m, u, -w.astype(u.dtype))
      mask_leaves[i] = m
    new_state = ScheduledPruneState(
      count=_checks.increment(t), masks=jax.tree.unflatten(mask_def, mask_leaves)
    )
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_state(opt_state: Any, state_type: type) -> Any:
  """The first sub-state of type ``state_type`` inside a (chained) optax state.

  Args:
    opt_state: an optax state, possibly nested in tuples (``optax.chain``).
    state_type: the NamedTuple class to look for.

  Returns:
    That sub-state.

  Raises:
    ValueError: if there is none.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> tx = optax.chain(optax.sgd(0.1), scheduled_magnitude_prune(
    ...     lambda t: 0.5, frequency=1))
    >>> st = find_state(tx.init({'w': jnp.ones((2, 2))}), ScheduledPruneState)
    >>> int(st.count)
    0
  """
  found = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, state_type))
  for x in found:
    if isinstance(x, state_type):
      return x
  raise ValueError(
    f"no {state_type.__name__} inside the optimizer state; was the "
    "transformation part of the chain?"
  )


def scheduled_masks(opt_state: Any, params: PyTree, where: eligibility.Where = None) -> PyTree:
  """The current masks of :func:`scheduled_magnitude_prune`, shaped like params.

  Args:
    opt_state: the optimizer state that contains a :class:`ScheduledPruneState`.
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
    >>> tx = scheduled_magnitude_prune(lambda t: 0.5, frequency=1)
    >>> params = {'w': jnp.ones((2, 2)), 'b': jnp.ones(2)}
    >>> scheduled_masks(tx.init(params), params)['b'].tolist()
    [True, True]
  """
  del where  # the state is params-shaped
  st = find_state(opt_state, ScheduledPruneState)
  leaves, treedef = jax.tree.flatten(params)
  mask_leaves = jax.tree.leaves(st.masks)
  _check_mask_count("ScheduledPruneState", mask_leaves, leaves)
  return jax.tree.unflatten(treedef, mask_leaves)


def _check_mask_count(state_name: str, mask_leaves: list, param_leaves: list) -> None:
  if len(mask_leaves) != len(param_leaves):
    raise ValueError(
      f"the {state_name} holds {len(mask_leaves)} masks but params have "
      f"{len(param_leaves)} leaves; the state must come from init on "
      "params of this structure (a state saved before the masks became "
      "params-shaped holds only the eligible leaves' masks: re-initialise "
      "it)."
    )
