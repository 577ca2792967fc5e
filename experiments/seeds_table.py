"""Mean and standard deviation over seeds of finished ``experiments.run`` runs.

    python -m experiments.seeds_table "LeNet-300-100 60x=runs/lenet300_60x_short_s*" ...

Each argument is ``LABEL=GLOB``; the glob names run folders (each holding a
``results.json`` with a finished prune phase). Prints one markdown row per
label: seeds, dense base, GSM before and after the cut (mean +- sample sd over
the seeds, in percent), the worst cut loss, and the GSM wall time.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path


def _mean_sd(values: Sequence[float]) -> str:
  mean = statistics.fmean(values)
  if len(values) < 2:
    return f"{100 * mean:.2f}"
  return f"{100 * mean:.2f} +- {100 * statistics.stdev(values):.2f}"


def summarize(label: str, folders: Sequence[Path]) -> str:
  rows = [json.loads((folder / "results.json").read_text())["summary"] for folder in folders]
  base = [r["base_test_acc"] for r in rows]
  before = [r["gsm_test_acc_before_cut"] for r in rows]
  after = [r["gsm_test_acc_after_cut"] for r in rows]
  worst = max(b - a for b, a in zip(before, after))
  wall = statistics.fmean(r["gsm_wall_seconds"] for r in rows)
  return (
    f"| {label} | {len(rows)} | {_mean_sd(base)} | {_mean_sd(before)} | "
    f"**{_mean_sd(after)}** | {100 * worst:+.2f} | {wall:.0f} s |"
  )


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.seeds_table", description=__doc__.split("\n\n")[0]
  )
  parser.add_argument("rows", nargs="+", metavar="LABEL=GLOB")
  args = parser.parse_args(argv)
  lines = [
    "| row | seeds | dense base | GSM before the cut | after the cut | worst cut loss "
    "(points) | GSM wall (mean) |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for item in args.rows:
    label, sep, pattern = item.partition("=")
    if not sep or not label:
      parser.error(f"{item!r}: expected LABEL=GLOB")
    folders = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "results.json").is_file())
    finished = []
    for folder in folders:
      try:
        summary = json.loads((folder / "results.json").read_text()).get("summary", {})
      except ValueError as e:
        parser.error(f"{folder / 'results.json'}: not JSON ({e})")
      if "gsm_test_acc_after_cut" in summary:  # the prune phase has run
        finished.append(folder)
    if not finished:
      parser.error(f"{pattern!r}: no finished run folder matches")
    lines.append(summarize(label, finished))
  sys.stdout.write("\n".join(lines) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
