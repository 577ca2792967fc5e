"""Figures written next to ``results.json`` (matplotlib, Agg backend).

Each figure must read in black and white: series differ by marker and line style
(and bars by hatch), not only by colour.

* ``curves.png`` -- accuracy, loss and non-zero ratio per epoch, base training
  followed by GSM training on one epoch axis; GSM epochs also show the test
  accuracy after a magnitude cut to Q at that epoch.
* ``layer_nonzero.png`` -- per-layer non-zero ratio after the final magnitude
  cut: GSM vs magnitude pruning of the base model at the same Q.
* ``weight_hist.png`` -- histogram of |w| (log scale) of the eligible weights
  before pruning, with the pruning thresholds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.fileio import atomic_save_figure  # noqa: E402

_STYLES = {
  "train": {"marker": "o", "linestyle": "-", "color": "black"},
  "test": {"marker": "s", "linestyle": "--", "color": "0.35"},
  "nonzero": {"marker": "^", "linestyle": "-.", "color": "black"},
  "cut": {"marker": "x", "linestyle": ":", "color": "black"},
}


def _series(history: list[dict[str, Any]], key: str, offset: int) -> tuple[np.ndarray, np.ndarray]:
  pts = [(h["epoch"] + offset, h[key]) for h in history if h.get(key) is not None]
  if not pts:
    return np.zeros(0), np.zeros(0)
  x, y = zip(*pts)
  return np.asarray(x, float), np.asarray(y, float)


def _markevery(n: int) -> int:
  return max(1, n // 15)  # ~15 markers per line, readable for 600-epoch runs


def plot_curves(results: dict[str, Any], path: Path) -> Path | None:
  """Accuracy, loss and non-zero ratio per epoch for the train and GSM phases."""
  phases = results.get("phases", {})
  train_h = phases.get("train", {}).get("history", [])
  gsm_h = phases.get("gsm", {}).get("history", [])
  if not train_h and not gsm_h:
    return None
  offset = len(train_h)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  title = results.get("config", {}).get("description", results.get("config_name", ""))
  fig.suptitle(title)
  for ax, (key_train, key_test, label, scale) in zip(
    axes[:2],
    [("train_acc", "test_acc", "accuracy (%)", 100.0), ("train_loss", "test_loss", "loss", 1.0)],
  ):
    for key, style_name, name in ((key_train, "train", "train"), (key_test, "test", "test")):
      xs, ys = [], []
      for hist, off in ((train_h, 0), (gsm_h, offset)):
        x, y = _series(hist, key, off)
        xs.append(x)
        ys.append(y * scale)
      x, y = np.concatenate(xs), np.concatenate(ys)
      if x.size:
        ax.plot(x, y, label=name, markevery=_markevery(x.size), markersize=4, **_STYLES[style_name])
    if key_test == "test_acc":
      # What the prune phase would give if GSM stopped at that epoch.
      x, y = _series(gsm_h, "test_acc_after_cut", offset)
      if x.size:
        ax.plot(
          x,
          y * scale,
          label="test, cut to Q",
          markevery=_markevery(x.size),
          markersize=4,
          **_STYLES["cut"],
        )
    ax.set_xlabel("epoch (base, then GSM)")
    ax.set_ylabel(label)
    if key_train == "train_loss":
      ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
  ax = axes[2]
  xs, ys = [], []
  for hist, off in ((train_h, 0), (gsm_h, offset)):
    x, y = _series(hist, "nonzero_ratio", off)
    xs.append(x)
    ys.append(y * 100)
  x, y = np.concatenate(xs), np.concatenate(ys)
  threshold = results.get("config", {}).get("nonzero_threshold", 1e-4)
  if x.size:
    ax.plot(
      x,
      y,
      label=f"|w| > {threshold:g}",
      markevery=_markevery(x.size),
      markersize=4,
      **_STYLES["nonzero"],
    )
  target = results.get("target", {})
  if target.get("nonzero_ratio"):
    ax.axhline(
      100 * target["nonzero_ratio"],
      color="0.4",
      linestyle=":",
      label=f"Q/N ({target.get('label', '')})",
    )
  ax.set_yscale("log")
  ax.set_xlabel("epoch (base, then GSM)")
  ax.set_ylabel("eligible weights non-zero (%)")
  ax.grid(True, alpha=0.3)
  ax.legend()
  if train_h and gsm_h:
    for a in axes:
      a.axvline(offset + 0.5, color="0.5", linestyle=":", linewidth=1)
      a.annotate(
        "GSM starts",
        (offset + 0.5, 0.02),
        xycoords=("data", "axes fraction"),
        fontsize=8,
        rotation=90,
        va="bottom",
        ha="right",
      )
  fig.tight_layout()
  atomic_save_figure(fig, path, dpi=120)
  plt.close(fig)
  return path


def _short_path(path: str) -> str:
  """``"['blocks'][3]['conv1']['kernel']"`` -> ``"blocks.3.conv1"``."""
  parts = [p.strip("'\"") for p in path.replace("]", "").split("[") if p]
  if parts and parts[-1] in ("kernel", "weight"):
    parts = parts[:-1]
  return ".".join(parts)


def plot_layer_nonzero(results: dict[str, Any], path: Path) -> Path | None:
  """Grouped bars of per-layer non-zero ratios after pruning (GSM vs magnitude)."""
  prune = results.get("phases", {}).get("prune", {})
  reports = [
    ("GSM + magnitude cut", prune.get("gsm", {}).get("sparsity_report"), "//", "0.3"),
    ("magnitude cut of base", prune.get("base", {}).get("sparsity_report"), "..", "white"),
  ]
  reports = [r for r in reports if r[1]]
  if not reports:
    return None
  layers = [leaf["path"] for leaf in reports[0][1]["leaves"] if leaf["eligible"]]
  n = len(layers)
  width = 0.8 / len(reports)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * n + 2), 4.5))
  x = np.arange(n)
  for i, (name, report, hatch, color) in enumerate(reports):
    ratio = {leaf["path"]: leaf["nonzero_ratio"] for leaf in report["leaves"]}
    ax.bar(
      x + (i - (len(reports) - 1) / 2) * width,
      [100 * ratio[layer] for layer in layers],
      width,
      label=name,
      hatch=hatch,
      color=color,
      edgecolor="black",
      linewidth=0.6,
    )
  target = results.get("target", {})
  if target.get("nonzero_ratio"):
    ax.axhline(
      100 * target["nonzero_ratio"], color="black", linestyle=":", linewidth=1, label="global Q/N"
    )
  ax.set_xticks(x)
  ax.set_xticklabels([_short_path(p) for p in layers], rotation=90, fontsize=7 if n > 20 else 9)
  ax.set_ylabel("non-zero weights (%)")
  ax.set_title(
    f"per-layer non-zero ratio at Q = {target.get('num_nonzero', '?')} ({target.get('label', '')})"
  )
  ax.legend()
  ax.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  atomic_save_figure(fig, path, dpi=120)
  plt.close(fig)
  return path


def plot_weight_histogram(results: dict[str, Any], path: Path) -> Path | None:
  """Histogram of |w| (log x axis) of eligible weights before the final cut."""
  prune = results.get("phases", {}).get("prune", {})
  hists = [
    ("GSM model", prune.get("gsm", {}), "-", "o", "black"),
    ("base model", prune.get("base", {}), "--", "s", "0.45"),
  ]
  hists = [h for h in hists if h[1].get("histogram")]
  if not hists:
    return None
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  for name, data, linestyle, marker, color in hists:
    hist = data["histogram"]
    edges = np.asarray(hist["edges"])
    counts = np.asarray(hist["counts"], float)
    centers = np.sqrt(edges[:-1] * edges[1:])
    label = name + (f" ({hist['zeros']} exact zeros)" if hist.get("zeros") else "")
    ax.step(
      centers, np.maximum(counts, 0.8), where="mid", linestyle=linestyle, color=color, label=label
    )
    ax.plot(
      centers,
      np.maximum(counts, 0.8),
      linestyle="none",
      marker=marker,
      markersize=3,
      color=color,
      markevery=_markevery(len(centers)),
    )
    if data.get("threshold") is not None:
      ax.axvline(
        data["threshold"],
        color=color,
        linestyle=linestyle,
        linewidth=1,
        label=f"{name}: Q-th largest |w| = {data['threshold']:.2e}",
      )
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_ylim(bottom=0.7)
  ax.set_xlabel("|w| of eligible weights (before pruning)")
  ax.set_ylabel("count")
  ax.set_title(f"weight magnitudes, Q = {results.get('target', {}).get('num_nonzero', '?')}")
  ax.legend(fontsize=8)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  atomic_save_figure(fig, path, dpi=120)
  plt.close(fig)
  return path


def write_all(results: dict[str, Any], out_dir: Path) -> list[Path]:
  """Writes every figure whose data is present; returns the written paths."""
  out_dir.mkdir(parents=True, exist_ok=True)
  written = [
    plot_curves(results, out_dir / "curves.png"),
    plot_layer_nonzero(results, out_dir / "layer_nonzero.png"),
    plot_weight_histogram(results, out_dir / "weight_hist.png"),
  ]
  return [p for p in written if p is not None]


_LINE_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "x", "D", "v")


def plot_after_cut(runs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
  """Test accuracy after a cut to Q at every GSM epoch, one line per run.

  Args:
    runs: label -> a GSM phase history (``results["phases"]["gsm"]["history"]``),
      whose entries hold ``test_acc_after_cut``.
    path: the PNG to write (atomically).

  Returns:
    ``path``. Lines differ by marker and dash pattern, so the figure reads in
    black and white.
  """
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for i, (label, history) in enumerate(runs.items()):
    x, y = _series(history, "test_acc_after_cut", 0)
    ax.plot(
      x,
      100 * y,
      color="black" if i % 2 == 0 else "0.4",
      linestyle=_LINE_STYLES[i % len(_LINE_STYLES)],
      marker=_MARKERS[i % len(_MARKERS)],
      markevery=_markevery(len(x)),
      markersize=4,
      linewidth=1.2,
      label=label,
    )
  ax.set_xlabel("GSM epoch")
  ax.set_ylabel("test accuracy after the cut to Q (%)")
  ax.grid(True, color="0.85")
  ax.legend(fontsize=8)
  fig.tight_layout()
  atomic_save_figure(fig, path, dpi=120)
  plt.close(fig)
  return path


def main(argv: list[str] | None = None) -> int:
  """``python -m experiments.plots after-cut OUT.png LABEL=results.json ...``."""
  import argparse
  import json

  parser = argparse.ArgumentParser(prog="python -m experiments.plots")
  sub = parser.add_subparsers(dest="plot", required=True)
  p = sub.add_parser("after-cut", help="accuracy after the cut against GSM epochs")
  p.add_argument("out", type=Path)
  p.add_argument("runs", nargs="+", metavar="LABEL=RESULTS_JSON")
  args = parser.parse_args(argv)
  runs = {}
  for item in args.runs:
    label, sep, file = item.partition("=")
    if not sep or not label:
      parser.error(f"{item!r}: expected LABEL=path/to/results.json")
    try:
      runs[label] = json.loads(Path(file).read_text())["phases"]["gsm"]["history"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      parser.error(f"{file}: not the results.json of a finished GSM phase ({e})")
  print(plot_after_cut(runs, args.out))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
