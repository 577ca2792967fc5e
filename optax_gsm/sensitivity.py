r"""Layer sensitivity: does GSM keep more weights where pruning hurts more?

The GSM paper (Fig. 2 and the rebuttal) argues that the global top-Q
selection finds, without being told, which layers are sensitive to pruning.
:func:`layer_sensitivity` measures both sides:

(a) the ground truth: prune one eligible leaf at a time by magnitude, removing
    a fraction :math:`r` of its weights (the smallest :math:`|w|`, ties by
    lower index), evaluate, restore; the *drop* is
    :math:`\text{eval}(\theta) - \text{eval}(\theta_{\ell, r})` (so
    ``eval_fn`` returns a higher-is-better metric such as accuracy);
(b) GSM's signal: the per-layer non-zero ratio of the GSM-trained params
    after :func:`optax_gsm.magnitude_prune` to Q, and/or the per-layer share
    of the global top-Q over a run (from :func:`accumulate_selection_counts`);
(c) the Spearman rank correlation between the mean drop per layer and each
    signal (:func:`spearman`, average ranks for ties).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from optax_gsm import eligibility
from optax_gsm import pruning
from optax_gsm import selection as selection_lib

PyTree = Any

SIGNALS = ("nonzero_ratio", "selection_density", "selection_share")


def rankdata(x: npt.ArrayLike) -> np.ndarray:
  """Ranks from 1 to n, ties given the average of the ranks they span.

  Example:
    >>> rankdata([10, 30, 20, 20]).tolist()
    [1.0, 4.0, 2.5, 2.5]
  """
  x = np.asarray(x, np.float64).reshape(-1)
  order = np.argsort(x, kind="stable")
  xs = x[order]
  ranks = np.empty(x.size, np.float64)
  start = 0
  while start < x.size:
    stop = start + 1
    while stop < x.size and xs[stop] == xs[start]:
      stop += 1
    ranks[order[start:stop]] = (start + stop + 1) / 2.0  # mean of start+1..stop
    start = stop
  return ranks


def spearman(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
  r"""Spearman's rank correlation :math:`\rho` (Pearson's r of average ranks).

  Args:
    x, y: sequences of the same length (no NaN).

  Returns:
    :math:`\rho \in [-1, 1]`; NaN when fewer than two points or when either
    side is constant (as :func:`scipy.stats.spearmanr`).

  Raises:
    ValueError: if the lengths differ or a value is NaN.

  Example:
    >>> spearman([1, 2, 3, 4], [10, 20, 30, 25])
    0.8
  """
  x = np.asarray(x, np.float64).reshape(-1)
  y = np.asarray(y, np.float64).reshape(-1)
  if x.size != y.size:
    raise ValueError(f"spearman needs x and y of the same length, got {x.size} and {y.size}.")
  if np.isnan(x).any() or np.isnan(y).any():
    raise ValueError("spearman: x and y must not contain NaN.")
  if x.size < 2:
    return float("nan")
  rx, ry = rankdata(x), rankdata(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  denom = math.sqrt(float(np.sum(rx * rx)) * float(np.sum(ry * ry)))
  if denom == 0.0:
    return float("nan")
  return float(np.clip(np.sum(rx * ry) / denom, -1.0, 1.0))


def accumulate_selection_counts(
  masks: Iterable[PyTree], initial: Optional[PyTree] = None
) -> PyTree:
  """Counts, per weight, how many of the given masks select it.

  Args:
    masks: an iterable of pytrees of bool arrays, all of one structure
      (e.g. the global top-Q mask of each GSM step).
    initial: optional counts to add to (from an earlier call).

  Returns:
    A pytree of int32 numpy arrays with that structure.

  Raises:
    ValueError: if no masks and no ``initial`` are given, or structures or
      shapes differ.

  Example:
    >>> import numpy as np
    >>> counts = accumulate_selection_counts(
    ...     [{'w': np.array([True, False])}, {'w': np.array([True, True])}])
    >>> counts['w'].tolist()
    [2, 1]
  """
  counts = (
    None
    if initial is None
    else jax.tree.map(lambda c: np.array(jax.device_get(c), np.int32), initial)
  )
  for i, m in enumerate(masks):
    m = jax.tree.map(lambda a: np.asarray(jax.device_get(a)).astype(np.int32), m)
    if counts is None:
      counts = m
      continue
    try:
      counts = jax.tree.map(np.add, counts, m)
    except ValueError as e:
      raise ValueError(
        f"mask {i} does not match the structure or shapes of the earlier masks: {e}"
      ) from None
  if counts is None:
    raise ValueError("accumulate_selection_counts needs at least one mask (or `initial`).")
  return counts


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
  """Sensitivity of one eligible leaf.

  Attributes:
    path: its key path.
    size: its number of weights.
    accuracies: ``eval_fn`` with this leaf pruned, one per ratio.
    drops: ``baseline - accuracy``, one per ratio.
    nonzero_ratio: fraction of the leaf kept by GSM + magnitude pruning, or
      None when no ``gsm_params`` were given.
    selection_share: the leaf's share of all top-Q selections, or None.
    selection_density: the leaf's selections per weight relative to the
      average over all eligible weights (1 = its proportional share), or None.
  """

  path: str
  size: int
  accuracies: tuple[float, ...]
  drops: tuple[float, ...]
  nonzero_ratio: Optional[float] = None
  selection_share: Optional[float] = None
  selection_density: Optional[float] = None

  @property
  def mean_drop(self) -> float:
    return float(np.mean(self.drops)) if self.drops else float("nan")

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["accuracies"] = list(self.accuracies)
    d["drops"] = list(self.drops)
    d["mean_drop"] = _json_float(self.mean_drop)
    return d


@dataclasses.dataclass(frozen=True)
class SensitivityResult:
  """What :func:`layer_sensitivity` returns.

  Attributes:
    ratios: the fractions of each layer's weights removed.
    baseline: ``eval_fn(params)`` before pruning.
    layers: one row per eligible leaf, in ``jax.tree.leaves`` order.
    spearman: Spearman's rho between the layers' mean drops and each GSM
      signal that was given (``"nonzero_ratio"``, ``"selection_share"``,
      ``"selection_density"``); NaN when undefined (a constant side).
  """

  ratios: tuple[float, ...]
  baseline: float
  layers: tuple[LayerSensitivity, ...]
  spearman: dict[str, float]

  def to_dict(self) -> dict:
    """A JSON-ready dict (NaN becomes None)."""
    return {
      "ratios": list(self.ratios),
      "baseline": self.baseline,
      "layers": [layer.to_dict() for layer in self.layers],
      "spearman": {k: _json_float(v) for k, v in self.spearman.items()},
    }

  def to_json(self, **kwargs) -> str:
    return json.dumps(self.to_dict(), **kwargs)

  def table(self) -> str:
    """A fixed-width table: drop per layer and ratio, GSM signals, rho."""
    head = ["layer", "size"] + [f"drop@{r:g}" for r in self.ratios] + ["mean drop"]
    signals = [s for s in SIGNALS if any(getattr(l, s) is not None for l in self.layers)]
    head += signals
    rows = [head]
    for layer in self.layers:
      row = [layer.path, f"{layer.size:,}"]
      row += [f"{d:+.4f}" for d in layer.drops] + [f"{layer.mean_drop:+.4f}"]
      row += [f"{getattr(layer, s):.4f}" for s in signals]
      rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for j, row in enumerate(rows):
      cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
      lines.append("  ".join(cells))
      if j == 0:
        lines.append("  ".join("-" * w for w in widths))
    lines.append(f"baseline: {self.baseline:.4f}")
    for k, v in self.spearman.items():
      lines.append(f"spearman(mean drop, {k}) = {v:+.3f}")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()


def layer_sensitivity(
  params: PyTree,
  eval_fn: Callable[[PyTree], Any],
  *,
  ratios: Sequence[float] = (0.5, 0.7, 0.9),
  where: eligibility.Where = None,
  gsm_params: Optional[PyTree] = None,
  num_nonzero: Optional[int] = None,
  compression: Optional[float] = None,
  selection_counts: Optional[PyTree] = None,
) -> SensitivityResult:
  r"""Per-layer pruning sensitivity and its rank correlation with GSM's choice.

  For each eligible leaf :math:`\ell` and each ratio :math:`r`, the
  :math:`\operatorname{round}(r n_\ell)` entries of smallest :math:`|w|` in
  that leaf alone are zeroed (ties: the higher index goes first), ``eval_fn``
  is called, and the leaf is restored. ``eval_fn`` is called
  ``1 + n_layers * len(ratios)`` times.

  Args:
    params: the (dense, trained) parameter pytree.
    eval_fn: ``params -> float``, a higher-is-better metric (accuracy).
    ratios: fractions in ``[0, 1]`` of each layer's weights to remove.
    where: the eligible leaves (the "layers"); see
      :func:`optax_gsm.global_top_q`.
    gsm_params: optional params after a GSM run, shaped like ``params``.
      With ``num_nonzero`` or ``compression`` they are first pruned with
      :func:`optax_gsm.magnitude_prune` to that Q; without, they are taken as
      already pruned. Gives each layer's ``nonzero_ratio``.
    num_nonzero: Q for ``gsm_params``.
    compression: or C for ``gsm_params``.
    selection_counts: optional pytree (shaped like ``params``) of how often
      each weight was in the global top-Q (see
      :func:`accumulate_selection_counts`). Gives ``selection_share`` and
      ``selection_density``.

  Returns:
    A :class:`SensitivityResult`; ``to_dict()`` is JSON-ready and ``print``
    shows a table.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'a': jnp.array([[1.0, 2.0], [3.0, 4.0]]),
    ...           'b': jnp.array([[0.1, 0.2], [0.3, 0.4]])}
    >>> def eval_fn(p):  # 'a' matters ten times more than 'b'
    ...   return float(-jnp.sum((p['a'] - params['a']) ** 2)
    ...                - 0.1 * jnp.sum((p['b'] - params['b']) ** 2))
    >>> res = layer_sensitivity(params, eval_fn, ratios=(0.5,),
    ...                         gsm_params=params, num_nonzero=3)
    >>> [(l.path, round(l.drops[0], 3), l.nonzero_ratio) for l in res.layers]
    [("['a']", 5.0, 0.75), ("['b']", 0.005, 0.0)]
    >>> res.spearman
    {'nonzero_ratio': 1.0}

  References:
    X. Ding, G. Ding, X. Zhou, Y. Guo, J. Han, J. Liu. Global Sparse
    Momentum SGD for Pruning Very Deep Neural Networks. NeurIPS 2019.
    https://arxiv.org/abs/1909.12778
  """
  ratios = tuple(_check_ratio(r) for r in ratios)
  if not ratios:
    raise ValueError("`ratios` must hold at least one fraction in [0, 1].")
  if not callable(eval_fn):
    raise TypeError(f"`eval_fn` must be a callable params -> float, got {eval_fn!r}.")
  if gsm_params is None and (num_nonzero is not None or compression is not None):
    raise ValueError("`num_nonzero` / `compression` apply to `gsm_params`, which was not given.")
  leaves, treedef = jax.tree.flatten(params)
  flags = eligibility.resolve_where(where, params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  # Check the optional inputs before the (expensive) evaluations.
  if gsm_params is not None:
    gsm_leaves = _same_structure(gsm_params, treedef, "gsm_params", leaves, paths)
  if selection_counts is not None:
    count_leaves = _same_structure(selection_counts, treedef, "selection_counts", leaves, paths)
  baseline = _as_float(eval_fn(params), "eval_fn(params)")

  rows = []
  eligible = [i for i, f in enumerate(flags) if f]
  for i in eligible:
    leaf = leaves[i]
    n = int(np.size(leaf))
    accs = []
    for r in ratios:
      keep = n - int(round(r * n))
      if keep >= n:
        pruned_leaf = leaf
      elif keep <= 0:
        pruned_leaf = jnp.zeros_like(leaf)
      else:
        pruned_leaf = _prune_leaf(leaf, jnp.int32(keep))
      trial = list(leaves)
      trial[i] = pruned_leaf
      accs.append(
        _as_float(
          eval_fn(jax.tree.unflatten(treedef, trial)), f"eval_fn(params with {paths[i]} pruned)"
        )
      )
    rows.append(
      dict(path=paths[i], size=n, accuracies=tuple(accs), drops=tuple(baseline - a for a in accs))
    )

  if gsm_params is not None:
    if num_nonzero is not None or compression is not None:
      _, masks = pruning.magnitude_prune(
        gsm_params, num_nonzero, compression=compression, where=where
      )
      kept = [np.asarray(m) for m in treedef.flatten_up_to(masks)]
      kept = [np.asarray(m) & (np.asarray(g) != 0) for m, g in zip(kept, gsm_leaves)]
    else:
      kept = [np.asarray(g) != 0 for g in gsm_leaves]
    for row, i in zip(rows, eligible):
      row["nonzero_ratio"] = float(np.count_nonzero(kept[i])) / row["size"] if row["size"] else 0.0

  if selection_counts is not None:
    sums = [float(np.sum(np.asarray(count_leaves[i], np.float64))) for i in eligible]
    total = sum(sums)
    n_total = sum(row["size"] for row in rows)
    for row, s in zip(rows, sums):
      share = s / total if total else 0.0
      row["selection_share"] = share
      row["selection_density"] = share * n_total / row["size"] if row["size"] else 0.0

  layers = tuple(LayerSensitivity(**row) for row in rows)
  mean_drops = [layer.mean_drop for layer in layers]
  rho = {}
  for s in SIGNALS:
    if all(getattr(layer, s) is not None for layer in layers) and layers:
      rho[s] = spearman(mean_drops, [getattr(layer, s) for layer in layers])
  return SensitivityResult(ratios=ratios, baseline=baseline, layers=layers, spearman=rho)


@jax.jit
def _prune_leaf(leaf: jax.Array, keep: jax.Array) -> jax.Array:
  """Keeps the ``keep`` largest |w| of one leaf (ties: lower index first).

  ``keep`` is traced, so each leaf shape compiles once for every ratio.
  """
  keys = selection_lib.scores_to_keys(jnp.abs(leaf.astype(jnp.float32)))
  mask = selection_lib.top_q_keys([keys], keep, method="threshold")[0][0]
  return jnp.where(mask, leaf, jnp.zeros([], leaf.dtype))


def _check_ratio(r) -> float:
  if isinstance(r, bool) or not isinstance(r, (int, float, np.number)):
    raise TypeError(f"`ratios` must hold numbers in [0, 1], got {r!r}.")
  r = float(r)
  if not 0.0 <= r <= 1.0:
    raise ValueError(f"`ratios` must hold fractions in [0, 1], got {r!r}.")
  return r


def _as_float(value, what: str) -> float:
  try:
    v = float(np.asarray(jax.device_get(value)))
  except (TypeError, ValueError):
    raise TypeError(f"{what} must return a scalar number, got {value!r}.") from None
  return v


def _same_structure(tree: PyTree, treedef, name: str, like: list, paths: list) -> list:
  try:
    leaves = treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f"`{name}` must have the structure of params: {e}") from None
  out = [np.asarray(jax.device_get(x)) for x in leaves]
  for x, p, path in zip(out, like, paths):
    if x.shape != np.shape(p):
      raise ValueError(f"`{name}` has shape {x.shape} at {path}, but params have {np.shape(p)}.")
  return out


def _json_float(v: float) -> Optional[float]:
  return None if v is None or (isinstance(v, float) and math.isnan(v)) else v
