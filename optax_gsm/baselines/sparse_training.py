r"""Dynamic sparse training: RigL (Evci et al., ICML 2020) and SET (Mocanu et al., 2018).

Both methods train a network that is sparse from the start and stays at a
fixed number of non-zeros per layer, while the *topology* changes: every
:math:`\Delta T` updates, in each eligible leaf :math:`\ell` with
:math:`n_\ell` active (mask-True) entries,

1. **drop** the :math:`k_\ell = \lfloor f(t)\, n_\ell \rfloor` active
   entries of smallest magnitude :math:`|w|`;
2. **grow** :math:`k_\ell` entries among those not kept (the just-dropped
   ones included): RigL takes the largest :math:`|\partial L / \partial w|`
   of the *dense* gradient, SET takes them uniformly at random.

New connections start at exactly zero, and the inner optimizer's
params-shaped buffers (momentum, Adam moments) are reset to zero on every
entry whose mask changed. The drop fraction decays with a cosine (RigL's
:math:`f_\text{decay}`), or stays constant (SET as published):

.. math::

   f(t) = \frac{\alpha}{2}\left(1 + \cos\frac{\pi t}{T_\text{end}}\right)
   \quad\text{or}\quad f(t) = \alpha, \qquad
   t \in \{\Delta T, 2\Delta T, \dots\},\ t < T_\text{end}.

Pieces:

* :func:`layer_densities`: the per-leaf densities of the uniform and the
  Erdős–Rényi-Kernel (ERK) distributions for a target overall density.
* :func:`density_prune`: a starting mask with those densities, by magnitude
  (from a trained network) or at random (from scratch).
* :func:`drop_and_grow`: one topology update of one leaf.
* :func:`rigl` and :func:`sparse_evolutionary_training`: optax wrappers
  around the user's optimizer; :func:`sparse_training_masks` reads the
  current masks out of the optimizer state.

Differences from the papers: the mask update happens *after* the optimizer
step of the same update (as in jaxpruner), instead of replacing it (RigL's
Algorithm 1); the magnitudes are those of the weights after the step, the
gradient is the one of the step. A weight that is dropped and regrown in the
same update simply stays (it keeps its value and its momentum).

References:
  * U. Evci, T. Gale, J. Menick, P. S. Castro, E. Elsen. Rigging the
    Lottery: Making All Tickets Winners. ICML 2020.
    https://arxiv.org/abs/1911.11134
  * D. C. Mocanu, E. Mocanu, P. Stone, P. H. Nguyen, M. Gibescu,
    A. Liotta. Scalable training of artificial neural networks with adaptive
    sparse connectivity inspired by network science. Nature Communications
    9, 2383 (2018). https://www.nature.com/articles/s41467-018-04316-3
  * jaxpruner (Lee et al., 2023), ``jaxpruner/algorithms/sparse_trainers.py``
    and ``jaxpruner/sparsity_distributions.py``.
    https://github.com/google-research/jaxpruner
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.core  # jax.core.Tracer (pyright needs the submodule imported)
import jax.numpy as jnp
import numpy as np
import optax

from optax_gsm import _checks
from optax_gsm import eligibility
from optax_gsm import selection as selection_lib

PyTree = Any

DISTRIBUTIONS = ("erk", "uniform")
DECAYS = ("cosine", "constant")

# Keys (see optax_gsm.selection): NaN scores of candidates rank just above
# the non-candidates, which get the NaN key and are never selected.
_EXCLUDED = selection_lib.NAN_KEY
_NAN_CANDIDATE = selection_lib.NAN_KEY + 1


# ---------------------------------------------------------------- densities


def _check_density(density: Any) -> float:
  if isinstance(density, (bool, np.bool_)):
    raise TypeError(f"`density` must be a number in (0, 1], got {density!r}.")
  d = _checks.concrete(density)
  if d is None:
    raise TypeError(
      f"`density` must be a number in (0, 1] (the fraction of eligible "
      f"weights kept), got {density!r}."
    )
  if not 0.0 < d <= 1.0:
    raise ValueError(
      f"`density` must be in (0, 1] (the fraction of eligible weights "
      f"kept; 1 keeps all), got {d!r}."
    )
  return float(d)


def layer_densities(
  params: PyTree, density: float, distribution: str = "erk", *, where: eligibility.Where = None
) -> PyTree:
  r"""Per-leaf densities that keep the fraction ``density`` of the eligible weights.

  ``"uniform"``: every eligible leaf gets :math:`d_\ell = d`.

  ``"erk"`` (Erdős–Rényi-Kernel, Evci et al. 2020, Section 3): a leaf of
  shape :math:`(s_1, \dots, s_r)` with :math:`n_\ell = \prod_i s_i` entries
  gets

  .. math::

     d_\ell = \min\Bigl(1,\ \varepsilon\,
              \frac{\sum_i s_i}{\prod_i s_i}\Bigr),
     \qquad \sum_\ell d_\ell\, n_\ell = d \sum_\ell n_\ell,

  so small layers (few entries per dimension) stay denser. :math:`\varepsilon`
  is solved in closed form; a leaf whose density would exceed 1 is made dense
  and :math:`\varepsilon` is solved again for the rest (the leaves with the
  largest ratio first), as in RigL's and jaxpruner's code. A scalar leaf
  counts as ratio 1; a zero-size leaf gets 1.0.

  Args:
    params: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
    density: :math:`d \in (0, 1]`, the fraction of eligible weights kept.
    distribution: ``"erk"`` or ``"uniform"``.
    where: eligible leaves (see :func:`optax_gsm.global_top_q`).

  Returns:
    A pytree of Python floats shaped like ``params``: :math:`d_\ell` on the
    eligible leaves, 1.0 on the others.

  Raises:
    ValueError, TypeError: for a ``density`` outside (0, 1] or an unknown
      ``distribution``, before anything is computed.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'a': jnp.ones((100, 100)), 'b': jnp.ones((100, 10)),
    ...           'bias': jnp.ones(10)}
    >>> d = layer_densities(params, 0.1)   # ratios 0.02, 0.11: eps = 1100 / 310
    >>> round(d['a'], 4), round(d['b'], 4), d['bias']
    (0.071, 0.3903, 1.0)
    >>> d = layer_densities(params, 0.3)   # 'b' would get 1.16: dense, 'a' the rest
    >>> d['a'], d['b']
    (0.23, 1.0)
    >>> layer_densities(params, 0.1, 'uniform')['b']
    0.1
  """
  d = _check_density(density)
  _checks.check_choice("distribution", distribution, DISTRIBUTIONS)
  leaves, treedef = jax.tree.flatten(params)
  flags = eligibility.resolve_where(where, params)
  out = [1.0] * len(leaves)
  idx = [i for i, f in enumerate(flags) if f and math.prod(jnp.shape(leaves[i])) > 0]
  if distribution == "uniform":
    for i in idx:
      out[i] = d
    return jax.tree.unflatten(treedef, out)
  sizes = {i: math.prod(jnp.shape(leaves[i])) for i in idx}
  ratio = {i: (sum(jnp.shape(leaves[i])) / sizes[i]) if jnp.shape(leaves[i]) else 1.0 for i in idx}
  target = d * sum(sizes.values())
  dense: set[int] = set()
  while True:
    rest = [i for i in idx if i not in dense]
    if not rest:
      break
    eps = (target - sum(sizes[i] for i in dense)) / sum(ratio[i] * sizes[i] for i in rest)
    top = max(ratio[i] for i in rest)
    if eps * top <= 1.0:
      for i in rest:
        out[i] = min(1.0, eps * ratio[i])
      break
    dense.update(i for i in rest if ratio[i] == top)
  for i in dense:
    out[i] = 1.0
  return jax.tree.unflatten(treedef, out)


def _apportion(exact: list[float], sizes: list[int], total: int) -> list[int]:
  """Integer counts near ``exact`` (each in [0, size]) that sum to ``total``.

  Largest remainder: round every count down, then add one to the counts of
  largest fractional part (ties: the earlier leaf) until the sum is reached;
  or, if the floors are already above it, take one from the counts of
  smallest fractional part.
  """
  counts = [min(int(math.floor(e)), s) for e, s in zip(exact, sizes)]
  frac = [e - c for e, c in zip(exact, counts)]
  short = total - sum(counts)
  order = sorted(range(len(counts)), key=lambda i: (-frac[i], i))
  if short < 0:
    order = sorted(range(len(counts)), key=lambda i: (frac[i], i))
  step = 1 if short > 0 else -1
  while short != 0:
    moved = False
    for i in order:
      if short == 0:
        break
      if 0 <= counts[i] + step <= sizes[i]:
        counts[i] += step
        short -= step
        moved = True
    if not moved:
      break
  return counts


@jax.jit
def _top_count(score: jax.Array, count: jax.Array) -> jax.Array:
  # One compilation per shape: the count is traced.
  keys = selection_lib.scores_to_keys(score)
  return selection_lib.top_q_keys([keys], count, method="threshold")[0][0]


def density_prune(
  params: PyTree,
  densities: Union[float, PyTree],
  *,
  num_nonzero: Optional[int] = None,
  key: Optional[Union[int, jax.Array]] = None,
  where: eligibility.Where = None,
) -> tuple[PyTree, PyTree]:
  r"""Prunes every eligible leaf to its own density: by magnitude, or at random.

  Leaf :math:`\ell` keeps :math:`c_\ell \approx d_\ell\, n_\ell` entries: the
  :math:`c_\ell` largest :math:`|w|` (ties to the lower flat index), or, with
  ``key``, :math:`c_\ell` entries drawn uniformly without replacement. The
  counts are :math:`\lfloor d_\ell n_\ell \rfloor` plus one for the leaves of
  largest remainder, so that they sum exactly to ``num_nonzero`` (default:
  :math:`\mathrm{round}(\sum_\ell d_\ell n_\ell)`).

  Args:
    params: the parameter pytree.
    densities: a pytree of numbers in [0, 1] shaped like ``params`` (e.g. from
      :func:`layer_densities`; the values of non-eligible leaves are ignored),
      or one number for every eligible leaf.
    num_nonzero: the exact total of kept eligible entries; it must be within
      one per eligible leaf of :math:`\sum_\ell d_\ell n_\ell`.
    key: None to prune by magnitude; an int seed or a PRNG key for a random
      mask (sparse training from scratch).
    where: eligible leaves (see :func:`optax_gsm.global_top_q`).

  Returns:
    ``(pruned_params, masks)``: bool masks shaped like ``params`` (all True on
    non-eligible leaves) and the params with the masked entries set to 0.

  Raises:
    ValueError, TypeError: for densities outside [0, 1], a densities tree
      that does not match ``params``, or a ``num_nonzero`` the densities
      cannot give.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'w': jnp.array([[0.1, -4.0], [3.0, 0.2]]),
    ...           'v': jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    >>> pruned, masks = density_prune(params, {'w': 0.5, 'v': 0.25})
    >>> pruned['w'].tolist(), pruned['v'].tolist()
    ([[0.0, -4.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 4.0]])
  """
  leaves, treedef = jax.tree.flatten(params)
  flags = eligibility.resolve_where(where, params)
  if isinstance(densities, (bool, np.bool_)):
    raise TypeError(f"`densities` must be numbers in [0, 1], got {densities!r}.")
  if _checks.concrete(densities) is not None:
    dens = [_checks.concrete(densities)] * len(leaves)
  else:
    try:
      dens = treedef.flatten_up_to(densities)
    except (ValueError, TypeError):
      diff = eligibility.structure_difference(params, densities, "densities")
      raise ValueError(
        "`densities` must be one number or a pytree of numbers shaped like "
        f"params (see layer_densities); {diff}."
      ) from None
  sizes, exact, idx = [], [], []
  for i, (leaf, f) in enumerate(zip(leaves, flags)):
    if not f:
      continue
    v = dens[i]
    c = None if isinstance(v, (bool, np.bool_)) else _checks.concrete(v)
    if c is None:
      raise TypeError(f"`densities` must hold numbers in [0, 1]; leaf {i} holds {v!r}.")
    if not 0.0 <= c <= 1.0:
      raise ValueError(f"`densities` must hold numbers in [0, 1]; leaf {i} holds {c!r}.")
    n = math.prod(jnp.shape(leaf))
    idx.append(i)
    sizes.append(n)
    exact.append(c * n)
  want = sum(exact)
  if num_nonzero is None:
    total = int(round(want))
  else:
    if isinstance(num_nonzero, (bool, np.bool_)) or not isinstance(num_nonzero, (int, np.integer)):
      raise TypeError(f"`num_nonzero` must be an int, got {num_nonzero!r}.")
    total = int(num_nonzero)
    if abs(total - want) > len(idx):
      raise ValueError(
        f"`num_nonzero`={total} does not match the densities, which keep "
        f"{want:.1f} of the {sum(sizes)} eligible weights; the two may "
        f"differ by at most the number of eligible leaves ({len(idx)})."
      )
  counts = _apportion(exact, sizes, total)
  if key is not None:
    key = _as_raw_key(key, "key")
  masks = [jnp.ones(jnp.shape(leaf), bool) for leaf in leaves]
  for j, (i, c) in enumerate(zip(idx, counts)):
    leaf = leaves[i]
    if key is None:
      a = jnp.abs(jnp.asarray(leaf, jnp.float32))
      score = jnp.where(jnp.isnan(a), -1.0, a)
    else:
      score = jax.random.uniform(jax.random.fold_in(key, j), jnp.shape(leaf))
    masks[i] = _top_count(score, jnp.int32(c))
  pruned = [
    jnp.where(m, leaf, jnp.zeros([], jnp.result_type(leaf))) if f else leaf
    for leaf, m, f in zip(leaves, masks, flags)
  ]
  return jax.tree.unflatten(treedef, pruned), jax.tree.unflatten(treedef, masks)


# ---------------------------------------------------------------- one update


def drop_and_grow(
  mask: jax.Array, drop_scores: jax.Array, grow_scores: jax.Array, num_swap
) -> jax.Array:
  r"""One topology update of a leaf: drop the ``k`` lowest, grow the ``k`` highest.

  With :math:`A` the active set (``mask``), :math:`|A| = n`, and
  :math:`k = \min(\text{num\_swap}, n)`:

  .. math::

     K &= \text{the } n - k \text{ entries of } A
          \text{ with the largest drop score}, \\
     G &= \text{the } k \text{ entries outside } K
          \text{ with the largest grow score}, \qquad
     \text{new mask} = K \cup G,

  so the new mask has exactly :math:`n` entries. Ties go to the lower flat
  index (it is kept, or grown); NaN scores rank below every number. Works
  under ``jit`` with a traced ``num_swap``.

  Args:
    mask: bool array, the active entries.
    drop_scores: float array of the same shape (e.g. :math:`|w|`).
    grow_scores: float array of the same shape (e.g. :math:`|g|`).
    num_swap: :math:`k`, an int (may be traced); clipped to :math:`[0, n]`.

  Returns:
    The new bool mask, with as many True entries as ``mask``.

  Example:
    >>> import jax.numpy as jnp
    >>> mask = jnp.array([True, True, True, False, False])
    >>> w = jnp.array([0.5, -3.0, 0.1, 0.0, 0.0])
    >>> g = jnp.array([9.0, 0.0, 0.0, -2.0, 1.0])
    >>> drop_and_grow(mask, jnp.abs(w), jnp.abs(g), 2).tolist()
    [True, True, False, True, False]
  """
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"`mask` must be a bool array, got dtype {mask.dtype}.")
  for name, s in (("drop_scores", drop_scores), ("grow_scores", grow_scores)):
    if jnp.shape(s) != mask.shape:
      raise ValueError(f"`{name}` has shape {jnp.shape(s)}, but `mask` has shape {mask.shape}.")
  n = jnp.sum(mask, dtype=jnp.int32)
  k = jnp.clip(jnp.asarray(num_swap, jnp.int32), 0, n)

  def candidate_keys(scores, candidates):
    keys = selection_lib.scores_to_keys(scores)
    keys = jnp.where(keys == selection_lib.NAN_KEY, _NAN_CANDIDATE, keys)
    return jnp.where(candidates, keys, _EXCLUDED)

  keep = selection_lib.top_q_keys([candidate_keys(drop_scores, mask)], n - k, method="threshold")[
    0
  ][0]
  grow = selection_lib.top_q_keys([candidate_keys(grow_scores, ~keep)], k, method="threshold")[0][0]
  return keep | grow


# ---------------------------------------------------------------- transforms


class RigLState(NamedTuple):
  """State of :func:`rigl`.

  Attributes:
    count: updates so far (int32), the step :math:`t`.
    masks: bool arrays shaped like ``params`` (every leaf; the leaves that are
      not eligible keep the mask they were given), so that
      ``optax.tree_utils.tree_map_params`` maps them like a momentum buffer.
    inner_state: the state of the wrapped optimizer.
  """

  count: jax.Array
  masks: PyTree
  inner_state: Any


class SETState(NamedTuple):
  """State of :func:`sparse_evolutionary_training`.

  Attributes:
    count: updates so far (int32), the step :math:`t`.
    key: the PRNG key (``uint32[2]``); the growth of step :math:`t` draws from
      ``fold_in(key, t)``, so a run is reproducible from its key.
    masks: bool arrays shaped like ``params`` (as in :class:`RigLState`).
    inner_state: the state of the wrapped optimizer.
  """

  count: jax.Array
  key: jax.Array
  masks: PyTree
  inner_state: Any


def _as_raw_key(key: Any, name: str) -> jax.Array:
  if isinstance(key, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be an int seed or a PRNG key, got {key!r}.")
  if isinstance(key, (int, np.integer)):
    return jax.random.PRNGKey(int(key))
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  arr = key if isinstance(key, jax.core.Tracer) else None
  if arr is None:
    try:
      arr = jnp.asarray(key)
    except TypeError:
      raise TypeError(f"`{name}` must be an int seed or a PRNG key, got {key!r}.") from None
  if arr.dtype == jnp.uint32 and arr.shape == (2,):
    return arr
  if jnp.issubdtype(arr.dtype, jnp.integer) and arr.shape == ():
    return jax.random.PRNGKey(arr)
  raise TypeError(
    f"`{name}` must be an int seed or a PRNG key (jax.random.key(s) or "
    f"jax.random.PRNGKey(s)), got an array of dtype {arr.dtype} and shape "
    f"{arr.shape}."
  )


def _check_count(name: str, value: Any, lo: int) -> None:
  """An int >= lo, or an int array (inject_hyperparams), or a tracer."""
  if isinstance(value, jax.core.Tracer):
    return
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be an int, got {value!r}.")
  v = _checks.concrete(value)
  if v is None or not float(v).is_integer():
    raise TypeError(f"`{name}` must be an int, got {value!r}.")
  if v < lo:
    raise ValueError(f"`{name}` must be >= {lo}, got {value!r}.")


def _check_inner(inner: Any) -> None:
  if not (
    hasattr(inner, "init")
    and hasattr(inner, "update")
    and callable(inner.init)
    and callable(inner.update)
  ):
    raise TypeError(
      "`inner` must be an optax.GradientTransformation (the optimizer whose "
      f"updates are masked, e.g. optax.sgd(0.1, 0.9)), got {inner!r}."
    )


def _mask_leaves(masks: PyTree, params: PyTree) -> list:
  """``masks`` matched to ``params`` leaf by leaf (bool, same shapes)."""
  p_leaves, treedef = jax.tree.flatten(params)
  try:
    leaves = treedef.flatten_up_to(masks)
  except (ValueError, TypeError):
    leaves = jax.tree.leaves(masks)
    if len(leaves) != len(p_leaves):
      diff = eligibility.structure_difference(params, masks, "masks")
      raise ValueError(
        "`masks` must hold one bool array per leaf of params (e.g. the "
        "masks of density_prune); "
        f"{diff or f'{len(leaves)} leaves for {len(p_leaves)}'}."
      ) from None
  out = []
  for i, (m, p) in enumerate(zip(leaves, p_leaves)):
    m = jnp.asarray(m)
    if m.dtype != jnp.bool_:
      raise TypeError(f"`masks` must hold bool arrays; leaf {i} has dtype {m.dtype}.")
    if m.shape != jnp.shape(p):
      raise ValueError(
        f"`masks` leaf {i} has shape {m.shape}, but the parameter has shape {jnp.shape(p)}."
      )
    out.append(m)
  return out


def _reset_where(inner: optax.GradientTransformation, inner_state: Any, changed: PyTree) -> Any:
  """Zeroes the params-shaped buffers of ``inner_state`` where ``changed``."""

  def zero(v, c):
    if isinstance(v, optax.MaskedNode) or not hasattr(v, "shape") or (jnp.shape(v) != jnp.shape(c)):
      return v
    return jnp.where(c, jnp.zeros([], v.dtype), v)

  return optax.tree_utils.tree_map_params(
    inner, zero, inner_state, changed, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
  )


def _dynamic_sparse(
  grow: str,
  inner,
  masks,
  key,
  update_interval,
  end_step,
  drop_fraction,
  decay,
  where,
  reset_inner_state,
):
  _check_inner(inner)
  _check_count("update_interval", update_interval, 1)
  _check_count("end_step", end_step, 0)
  if callable(drop_fraction):
    raise TypeError(
      f"`drop_fraction` must be a number in [0, 1] (decayed by `decay`), "
      f"got the callable {drop_fraction!r}."
    )
  _checks.check_range("drop_fraction", drop_fraction, 0.0, 1.0)
  _checks.check_choice("decay", decay, DECAYS)
  if not isinstance(reset_inner_state, bool):
    raise TypeError(f"`reset_inner_state` must be a bool, got {reset_inner_state!r}.")
  if masks is None:
    raise TypeError(
      "`masks` must be a pytree of bool arrays shaped like params (the "
      "starting topology, e.g. from density_prune), got None."
    )
  raw_key = None if key is None else _as_raw_key(key, "key")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    inner_state = inner.init(params)
    count = jnp.zeros([], jnp.int32)
    if not jax.tree.leaves(params):
      # optax.tree_utils.tree_map_params calls init on a placeholder with no
      # leaves to find the params-shaped trees (here `masks`).
      state_masks = jax.tree.map(lambda p: p, params)
    else:
      eligibility.resolve_where(where, params)
      treedef = jax.tree.structure(params)
      # Copies: a training loop that donates the state must not delete the
      # caller's masks.
      state_masks = jax.tree.unflatten(
        treedef, [jnp.array(m, copy=True) for m in _mask_leaves(masks, params)]
      )
      if reset_inner_state:
        try:
          optax.tree_utils.tree_map_params(
            inner, lambda v: v, inner_state, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
          )
        except Exception as e:  # pylint: disable=broad-except
          raise ValueError(
            "cannot find the params-shaped buffers of `inner`'s state "
            "(optax.tree_utils.tree_map_params failed on it: "
            f"{type(e).__name__}: {e}); pass reset_inner_state=False to "
            "leave them as they are."
          ) from e
    if grow == "gradient":
      return RigLState(count=count, masks=state_masks, inner_state=inner_state)
    assert raw_key is not None  # sparse_evolutionary_training requires it
    return SETState(count=count, key=raw_key, masks=state_masks, inner_state=inner_state)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
        f"{'rigl' if grow == 'gradient' else 'sparse_evolutionary_training'}"
        " drops weights by magnitude and zeroes the pruned ones, so update() "
        "needs params: call tx.update(grads, state, params)."
      )
    p_leaves, treedef = jax.tree.flatten(params)
    g_leaves = treedef.flatten_up_to(updates)
    m_leaves = treedef.flatten_up_to(state.masks)
    flags = eligibility.resolve_where(where, params)
    masked = [jnp.where(m, g, jnp.zeros([], g.dtype)) for g, m in zip(g_leaves, m_leaves)]
    u, inner_state = inner.update(
      jax.tree.unflatten(treedef, masked), state.inner_state, params, **extra_args
    )
    u_leaves = treedef.flatten_up_to(u)
    t = jnp.asarray(state.count, jnp.int32)  # pyright: ignore[reportAttributeAccessIssue]
    on = (t > 0) & (t % update_interval == 0) & (t < end_step)
    idx = [i for i, f in enumerate(flags) if f]

    def new_masks(_):
      tf = t.astype(jnp.float32)
      frac = jnp.asarray(drop_fraction, jnp.float32)
      if decay == "cosine":
        frac = (
          frac
          * 0.5
          * (1.0 + jnp.cos(jnp.pi * tf / jnp.maximum(jnp.asarray(end_step, jnp.float32), 1.0)))
        )
      out = list(m_leaves)
      for j, i in enumerate(idx):
        m = m_leaves[i]
        w = (p_leaves[i] + jnp.where(m, u_leaves[i], 0)).astype(jnp.float32)
        n = jnp.sum(m, dtype=jnp.int32)
        k = jnp.floor(frac * n.astype(jnp.float32)).astype(jnp.int32)
        if grow == "gradient":
          score = jnp.abs(g_leaves[i].astype(jnp.float32))
        else:
          sub = jax.random.fold_in(jax.random.fold_in(state.key, t), j)
          score = jax.random.uniform(sub, m.shape)
        out[i] = drop_and_grow(m, jnp.abs(w), score, k)
      return tuple(out)

    if idx:
      m_new = jax.lax.cond(on, new_masks, lambda _: tuple(m_leaves), None)
    else:
      m_new = tuple(m_leaves)
    if reset_inner_state:
      changed = jax.tree.unflatten(treedef, [a != b for a, b in zip(m_leaves, m_new)])
      inner_state = _reset_where(inner, inner_state, changed)
    out = [
      jnp.where(a & b, du, -w.astype(du.dtype))
      for du, w, a, b in zip(u_leaves, p_leaves, m_leaves, m_new)
    ]
    new_count = _checks.increment(t)
    new_masks = jax.tree.unflatten(treedef, list(m_new))
    if grow == "gradient":
      new_state = RigLState(count=new_count, masks=new_masks, inner_state=inner_state)
    else:
      new_state = SETState(count=new_count, key=state.key, masks=new_masks, inner_state=inner_state)
    return jax.tree.unflatten(treedef, out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rigl(
  inner: optax.GradientTransformation,
  masks: PyTree,
  *,
  update_interval: int = 100,
  end_step: int,
  drop_fraction: float = 0.3,
  decay: str = "cosine",
  where: eligibility.Where = None,
  reset_inner_state: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""RigL (Evci et al., 2020): drop the smallest weights, regrow by the largest dense gradients.

  At update :math:`t` (``count``, from 0) the wrapped optimizer ``inner``
  gets the gradient with the inactive entries zeroed, :math:`g \odot M`, and
  proposes :math:`u`. When :math:`t > 0`, :math:`t \bmod \Delta T = 0` and
  :math:`t < T_\text{end}`, every eligible leaf swaps
  :math:`k_\ell = \lfloor f(t)\, n_\ell \rfloor` of its :math:`n_\ell`
  active entries (:func:`drop_and_grow`): drop by :math:`|W + M \odot u|`,
  grow by the largest :math:`|g|` of the dense gradient (the gradient
  ``update`` receives, before masking). The update returned is

  .. math::  u'_i = \begin{cases} u_i & i \in M \cap M' \\
                                    -W_i & \text{otherwise,} \end{cases}

  so after ``optax.apply_updates`` the weights are exactly zero outside the
  new mask :math:`M'` (newly grown weights start at 0) and every eligible
  leaf keeps exactly :math:`n_\ell` mask entries at every update. With
  ``reset_inner_state`` the params-shaped buffers of ``inner``'s state
  (momentum, Adam moments; found with ``optax.tree_utils.tree_map_params``)
  are zeroed where the mask changed. Leaves that are not eligible keep the
  mask they were given (usually all True).

  Args:
    inner: the optimizer to wrap, e.g. ``optax.sgd(lr, momentum=0.9)``.
    masks: the starting topology, bool arrays shaped like ``params`` (e.g.
      from :func:`density_prune`); the params given to ``init`` should already
      be zero outside it (the first update zeroes them otherwise).
    update_interval: :math:`\Delta T \ge 1` (100 in the paper).
    end_step: :math:`T_\text{end} \ge 0`: no topology update from this step
      on (75% of the training steps in the paper).
    drop_fraction: :math:`\alpha \in [0, 1]` (0.3 in the paper).
    decay: ``"cosine"`` (the paper's :math:`f_\text{decay}`) or
      ``"constant"`` (:math:`f = \alpha`).
    where: eligible leaves (see :func:`optax_gsm.global_top_q`).
    reset_inner_state: zero ``inner``'s params-shaped buffers on the entries
      whose mask changed.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` needs
    ``params``; extra arguments go on to ``inner``) with state
    :class:`RigLState`; read the masks with :func:`sparse_training_masks`.

  Raises:
    TypeError, ValueError: for a bad argument, when the factory is called (the
      masks are matched to ``params`` in ``init``).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> params = {'w': jnp.array([[2.0, 0.1], [0.0, 0.0]])}
    >>> masks = {'w': jnp.array([[True, True], [False, False]])}
    >>> tx = rigl(optax.sgd(0.1), masks, update_interval=1, end_step=10,
    ...           drop_fraction=0.5, decay='constant')
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.array([[1.0, 1.0], [5.0, 0.0]])}
    >>> params = optax.apply_updates(params, tx.update(grads, state, params)[0])
    >>> updates, state = tx.update(grads, state._replace(count=jnp.int32(1)),
    ...                           params)
    >>> sparse_training_masks(state)['w'].tolist()   # 0.0 dropped, (1, 0) grown
    [[True, False], [True, False]]
    >>> optax.apply_updates(params, updates)['w'].tolist()
    [[1.7999999523162842, 0.0], [0.0, 0.0]]

  References:
    U. Evci, T. Gale, J. Menick, P. S. Castro, E. Elsen. Rigging the Lottery:
    Making All Tickets Winners. ICML 2020. https://arxiv.org/abs/1911.11134
  """
  return _dynamic_sparse(
    "gradient",
    inner,
    masks,
    None,
    update_interval,
    end_step,
    drop_fraction,
    decay,
    where,
    reset_inner_state,
  )


def sparse_evolutionary_training(
  inner: optax.GradientTransformation,
  masks: PyTree,
  *,
  key: Union[int, jax.Array],
  update_interval: int = 100,
  end_step: int,
  drop_fraction: float = 0.3,
  decay: str = "cosine",
  where: eligibility.Where = None,
  reset_inner_state: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""SET (Mocanu et al., 2018): drop the smallest weights, regrow at random.

  At update :math:`t` (``count``, from 0) the wrapped optimizer ``inner``
  gets the gradient with the inactive entries zeroed, :math:`g \odot M`, and
  proposes :math:`u`. When :math:`t > 0`, :math:`t \bmod \Delta T = 0` and
  :math:`t < T_\text{end}`, every eligible leaf swaps
  :math:`k_\ell = \lfloor f(t)\, n_\ell \rfloor` of its :math:`n_\ell`
  active entries (:func:`drop_and_grow`): drop by :math:`|W + M \odot u|`,
  grow by uniformly random scores drawn from ``fold_in(fold_in(key, t), j)``
  for the :math:`j`-th eligible leaf (the same key gives the same run).
  The update returned is

  .. math::  u'_i = \begin{cases} u_i & i \in M \cap M' \\
                                    -W_i & \text{otherwise,} \end{cases}

  so after ``optax.apply_updates`` the weights are exactly zero outside the
  new mask :math:`M'` (newly grown weights start at 0) and every eligible
  leaf keeps exactly :math:`n_\ell` mask entries at every update. With
  ``reset_inner_state`` the params-shaped buffers of ``inner``'s state
  (momentum, Adam moments; found with ``optax.tree_utils.tree_map_params``)
  are zeroed where the mask changed. Leaves that are not eligible keep the
  mask they were given (usually all True).

  The paper drops a constant fraction (``decay="constant"``); the default
  cosine decay is RigL's, so that both methods differ only in the growth.

  Args:
    inner: the optimizer to wrap, e.g. ``optax.sgd(lr, momentum=0.9)``.
    masks: the starting topology, bool arrays shaped like ``params``.
    key: an int seed or a PRNG key (``jax.random.key`` or
      ``jax.random.PRNGKey``), kept in the state.
    update_interval: :math:`\Delta T \ge 1`.
    end_step: :math:`T_\text{end} \ge 0`.
    drop_fraction: :math:`\alpha \in [0, 1]` (the paper's :math:`\zeta`, 0.3).
    decay: ``"cosine"`` or ``"constant"``.
    where: eligible leaves (see :func:`optax_gsm.global_top_q`).
    reset_inner_state: zero ``inner``'s params-shaped buffers on the entries
      whose mask changed.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (``update`` needs
    ``params``) with state :class:`SETState`; read the masks with
    :func:`sparse_training_masks`.

  Raises:
    TypeError, ValueError: for a bad argument, when the factory is called.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> params = {'w': jnp.arange(1.0, 17.0).reshape(4, 4)}
    >>> pruned, masks = density_prune(params, 0.25)
    >>> tx = sparse_evolutionary_training(optax.sgd(0.1), masks, key=0,
    ...                                   update_interval=1, end_step=10)
    >>> state = tx.init(pruned)._replace(count=jnp.int32(1))
    >>> _, state = tx.update(jax.tree.map(jnp.ones_like, pruned), state, pruned)
    >>> int(sparse_training_masks(state)['w'].sum())     # 1 of 4 swapped
    4

  References:
    D. C. Mocanu, E. Mocanu, P. Stone, P. H. Nguyen, M. Gibescu, A. Liotta.
    Scalable training of artificial neural networks with adaptive sparse
    connectivity inspired by network science. Nature Communications 9, 2383
    (2018). https://www.nature.com/articles/s41467-018-04316-3
  """
  if key is None:
    raise TypeError("`key` must be an int seed or a PRNG key (SET grows at random), got None.")
  return _dynamic_sparse(
    "random",
    inner,
    masks,
    key,
    update_interval,
    end_step,
    drop_fraction,
    decay,
    where,
    reset_inner_state,
  )


def sparse_training_masks(opt_state: Any) -> PyTree:
  """The current masks of :func:`rigl` or :func:`sparse_evolutionary_training`.

  Args:
    opt_state: an optimizer state that contains a :class:`RigLState` or a
      :class:`SETState` (possibly inside ``optax.chain``,
      ``optax.inject_hyperparams``, ...).

  Returns:
    The bool masks, shaped like ``params``.

  Raises:
    ValueError: if there is no such state.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> masks = {'w': jnp.array([[True, False]])}
    >>> tx = rigl(optax.sgd(0.1), masks, end_step=10)
    >>> sparse_training_masks(tx.init({'w': jnp.ones((1, 2))}))['w'].tolist()
    [[True, False]]
  """
  types = (RigLState, SETState)
  for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, types)):
    if isinstance(x, types):
      return x.masks
  raise ValueError(
    "no RigLState or SETState inside the optimizer state; was rigl(...) or "
    "sparse_evolutionary_training(...) part of the optimizer?"
  )
