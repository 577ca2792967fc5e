"""Plot a layer-sensitivity result in the style of Fig. 2 of the GSM paper.

Per layer (x axis, in model order): grouped bars of the accuracy drop when
that layer alone is pruned at each ratio (left axis), and, on a second axis,
GSM's non-zero ratio per layer (and the top-Q selection density when given)
as lines with markers. Bars differ by hatch and grey level and lines by
marker and dash, so the figure reads in black and white.

    from optax_gsm.sensitivity import layer_sensitivity
    from experiments.sensitivity_plot import plot_sensitivity
    res = layer_sensitivity(params, eval_fn, gsm_params=gsm_params,
                            compression=60)
    plot_sensitivity(res, "sensitivity.pdf", title="LeNet-300-100")
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from optax_gsm.sensitivity import SensitivityResult  # noqa: E402

_HATCHES = ("", "///", "xxx", "...", "\\\\\\", "+++", "ooo")
_GREYS = ("0.85", "0.6", "0.35", "0.15", "0.7", "0.5", "0.25")


def _short(path: str) -> str:
  """``"['fc1']['kernel']"`` -> ``"fc1/kernel"``."""
  parts = [p.strip("[]'\".") for p in path.replace("][", "]|[").split("|")]
  parts = [p for p in parts if p and p != "value"]
  return "/".join(parts) if parts else path


def plot_sensitivity(
  result: Union[SensitivityResult, dict],
  path: Optional[Union[str, os.PathLike]] = None,
  *,
  title: Optional[str] = None,
  labels: Optional[list] = None,
  figsize: tuple = (7.0, 3.6),
) -> Any:
  """Draws the per-layer accuracy drops and GSM's per-layer keep ratio.

  Args:
    result: a :class:`~optax_gsm.sensitivity.SensitivityResult` or its
      ``to_dict()`` (e.g. read back from JSON).
    path: optional file to save to (format from the suffix: png, pdf, svg).
    title: optional title.
    labels: optional layer names for the x axis (default: shortened paths).
    figsize: figure size in inches.

  Returns:
    The matplotlib ``Figure``.
  """
  d = result.to_dict() if isinstance(result, SensitivityResult) else result
  layers = d["layers"]
  ratios = d["ratios"]
  n = len(layers)
  if labels is None:
    labels = [_short(layer["path"]) for layer in layers]
  if len(labels) != n:
    raise ValueError(f"`labels` must name the {n} layers, got {len(labels)}.")

  fig, ax = plt.subplots(figsize=figsize)
  x = np.arange(n)
  width = 0.8 / max(len(ratios), 1)
  for j, r in enumerate(ratios):
    drops = [layer["drops"][j] for layer in layers]
    ax.bar(
      x - 0.4 + width * (j + 0.5),
      drops,
      width,
      color=_GREYS[j % len(_GREYS)],
      edgecolor="black",
      linewidth=0.6,
      hatch=_HATCHES[j % len(_HATCHES)],
      label=f"drop, {100 * r:g}% pruned",
    )
  ax.axhline(0.0, color="black", linewidth=0.6)
  ax.set_ylabel("accuracy drop (layer pruned alone)")
  ax.set_xticks(x)
  ax.set_xticklabels(labels, rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center")
  handles, names = ax.get_legend_handles_labels()

  lines = [
    ("nonzero_ratio", "GSM non-zero ratio", "o", "-"),
    ("selection_density", "top-Q selection density (rel.)", "s", "--"),
  ]
  present = [spec for spec in lines if all(layer.get(spec[0]) is not None for layer in layers)]
  if present:
    ax2 = ax.twinx()
    for key, name, marker, style in present:
      ax2.plot(
        x,
        [layer[key] for layer in layers],
        color="black",
        marker=marker,
        linestyle=style,
        markerfacecolor="white",
        markersize=6,
        linewidth=1.2,
        label=name,
      )
    values = [layer[key] for key, *_ in present for layer in layers]
    if min(values) > 0 and max(values) > 10 * min(values):
      # The non-zero ratio (~Q/N) and the relative density (~1) differ by
      # orders of magnitude; on a linear axis one of them is a flat line.
      ax2.set_yscale("log")
      ax2.set_ylabel("GSM keep ratio / density (log)")
    else:
      ax2.set_ylabel("GSM keep ratio")
      ax2.set_ylim(bottom=0.0)
    h2, n2 = ax2.get_legend_handles_labels()
    handles, names = handles + h2, names + n2
  rho = {k: v for k, v in d.get("spearman", {}).items() if v is not None}
  heading = [title] if title else []
  if rho:
    heading.append("Spearman vs mean drop: " + ", ".join(f"{k} {v:+.2f}" for k, v in rho.items()))
  if heading:
    ax.set_title("\n".join(heading), fontsize=9)
  # Below the axes, where it cannot hide a bar or a marker.
  ncol = min(len(handles), 3)
  rows = -(-len(handles) // ncol)
  fig.legend(handles, names, fontsize=7, loc="lower center", ncol=ncol, frameon=False)
  fig.tight_layout(rect=(0.0, 0.045 * rows + 0.01, 1.0, 1.0))
  if path is not None:
    fig.savefig(os.fspath(path), dpi=150)
  return fig
