"""Per-layer and total sparsity of a parameter pytree."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import jax
import numpy as np

from optax_gsm import eligibility

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LeafSparsity:
  """Sparsity of one leaf (or of a total)."""

  path: str
  shape: tuple[int, ...]
  size: int
  nonzeros: int
  eligible: bool

  @property
  def nonzero_ratio(self) -> float:
    return self.nonzeros / self.size if self.size else 0.0

  @property
  def compression(self) -> Optional[float]:
    """``size / nonzeros``; None when every entry is zero."""
    return self.size / self.nonzeros if self.nonzeros else None

  def to_dict(self) -> dict:
    return {
      "path": self.path,
      "shape": list(self.shape),
      "size": self.size,
      "nonzeros": self.nonzeros,
      "nonzero_ratio": self.nonzero_ratio,
      "compression": self.compression,
      "eligible": self.eligible,
    }


@dataclasses.dataclass(frozen=True)
class SparsityReport:
  """What :func:`sparsity_report` returns.

  Attributes:
    leaves: one row per leaf, in ``jax.tree.leaves`` order.
    eligible: the total over the eligible leaves (what GSM compresses).
    total: the total over every leaf.
  """

  leaves: tuple[LeafSparsity, ...]
  eligible: LeafSparsity
  total: LeafSparsity

  def to_dict(self) -> dict:
    """A JSON-ready dict: ``{'leaves': [...], 'eligible': {...}, 'total': {...}}``."""
    return {
      "leaves": [leaf.to_dict() for leaf in self.leaves],
      "eligible": self.eligible.to_dict(),
      "total": self.total.to_dict(),
    }

  def to_json(self, **kwargs) -> str:
    return json.dumps(self.to_dict(), **kwargs)

  def table(self) -> str:
    """A fixed-width table with one row per leaf and the two totals."""
    rows = [("leaf", "shape", "size", "non-zeros", "ratio", "compression")]
    for r in (*self.leaves, self.eligible, self.total):
      name = r.path + ("" if r.eligible or r in (self.eligible, self.total) else " (not eligible)")
      shape = "x".join(map(str, r.shape)) if r.shape else "-"
      comp = f"{r.compression:.2f}x" if r.compression is not None else "inf"
      rows.append(
        (name, shape, f"{r.size:,}", f"{r.nonzeros:,}", f"{100 * r.nonzero_ratio:.2f}%", comp)
      )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
      cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
      lines.append("  ".join(cells))
      if j == 0 or j == len(self.leaves):
        lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()


def sparsity_report(params: PyTree, where: eligibility.Where = None) -> SparsityReport:
  """Counts the non-zero entries of each leaf, of the eligible leaves and of all.

  Args:
    params: the parameter pytree.
    where: the eligible leaves; see :func:`optax_gsm.global_top_q`. Default:
      floating-point leaves with ``ndim >= 2``.

  Returns:
    A :class:`SparsityReport`. ``report.to_dict()`` is JSON-ready and
    ``print(report)`` prints a table.

  Example:
    >>> import jax.numpy as jnp
    >>> params = {'w': jnp.array([[0.0, 1.0], [0.0, 0.0]]), 'b': jnp.ones(2)}
    >>> report = sparsity_report(params)
    >>> report.eligible.nonzeros, report.eligible.compression
    (1, 4.0)
    >>> print(report)
    leaf                  shape  size  non-zeros    ratio  compression
    --------------------  -----  ----  ---------  -------  -----------
    ['b'] (not eligible)      2     2          2  100.00%        1.00x
    ['w']                   2x2     4          1   25.00%        4.00x
    --------------------  -----  ----  ---------  -------  -----------
    eligible                  -     4          1   25.00%        4.00x
    total                     -     6          3   50.00%        2.00x
  """
  flags = eligibility.resolve_where(where, params)
  path_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  rows = []
  for (path, leaf), flag in zip(path_leaves, flags):
    arr = np.asarray(jax.device_get(leaf))
    rows.append(
      LeafSparsity(
        path=jax.tree_util.keystr(path),
        shape=tuple(arr.shape),
        size=int(arr.size),
        nonzeros=int(np.count_nonzero(arr)),
        eligible=flag,
      )
    )

  def total(name, selected):
    return LeafSparsity(
      path=name,
      shape=(),
      eligible=True,
      size=sum(r.size for r in selected),
      nonzeros=sum(r.nonzeros for r in selected),
    )

  return SparsityReport(
    leaves=tuple(rows),
    eligible=total("eligible", [r for r in rows if r.eligible]),
    total=total("total", rows),
  )
