"""Smoke test of benchmarks/compaction.py: one synthetic row, no timings checked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from flax import nnx

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compaction.py"


def _load():
  spec = importlib.util.spec_from_file_location("compaction_benchmark", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_gsm_like_keeps_the_erk_counts():
  bench = _load()
  from experiments.models import get_model
  from optax_gsm.baselines import layer_densities

  dense = get_model("lenet5", rngs=nnx.Rngs(0))
  pruned = bench.gsm_like(dense, 125, seed=0, sigma=1.0)
  kernels = [
    (n, m)
    for (_, n), (_, m) in zip(nnx.iter_graph(dense), nnx.iter_graph(pruned))
    if isinstance(n, (nnx.Conv, nnx.Linear))
  ]
  densities = layer_densities([np.asarray(n.kernel[...]) for n, _ in kernels], 1 / 125)
  for (n, m), d in zip(kernels, densities):
    k = np.asarray(m.kernel[...])
    assert np.count_nonzero(k) == max(1, round(d * k.size))
  # Small layers keep more than 1/125: conv1 is not emptied.
  assert np.count_nonzero(np.asarray(pruned.conv1.kernel[...])) > 500 / 125


def test_one_row_end_to_end(tmp_path):
  bench = _load()
  out = tmp_path / "bench.json"
  assert (
    bench.main(
      [
        "--rows",
        "lenet5_300x",
        "--batch-sizes",
        "2",
        "--rounds",
        "1",
        "--min-rounds",
        "1",
        "--seconds",
        "0",
        "--layer-repeats",
        "1",
        "--out",
        str(out),
      ]
    )
    == 0
  )
  data = json.loads(out.read_text())
  (row,) = data["results"]
  assert row["weights"].startswith("synthetic")
  entry = row["batches"]["2"]
  scale = max(1.0, entry["max_abs_output"])
  assert all(d <= 1e-4 * scale for d in entry["max_abs_diff"].values())
  static = row["static"]
  assert static["compacted"]["params"] < static["pruned"]["params"]
  assert static["compacted"]["macs"] < static["pruned"]["macs"]
  assert static["compacted"]["file_bytes"] < static["pruned"]["file_bytes"]
  assert "| lenet5_300x | synthetic GSM-like | compacted |" in data["table"]
