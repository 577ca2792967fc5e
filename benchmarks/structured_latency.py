"""Inference latency of dense, channel-gated and physically pruned models.

Structured pruning only pays off when the removed channels are cut out of the
tensors: a gated (masked) model does the dense model's work. This script
times, for each pruned configuration:

* ``dense``: the original model;
* ``masked``: the original model with the channel gates applied (what the
  pruning procedures train);
* ``slim``: the smaller model from :func:`experiments.structured.remove_channels`;

with the MACs and parameter counts of each. The configurations come from the
result files of ``python -m experiments.structured`` in
``docs/results/structured/`` (the widths reached at each FLOPs level;
latency does not depend on the weight values, so random weights are used),
plus a half-width small VGG-like CIFAR net.

  python benchmarks/structured_latency.py [--batch-sizes 1 256] [--repeats 50]

Prints a markdown table and writes ``docs/results/structured/latency.json``.
Timings are wall-clock medians of ``--repeats`` jitted calls after a warm-up,
on whatever device JAX uses (the host CPU here); on a shared machine they are
noisy, so compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from experiments import structured as S  # noqa: E402


def first_k_alive(widths: dict[str, int], keep: dict[str, int]) -> dict:
  """Alive masks that keep the first ``keep[site]`` channels of each site."""
  out = {}
  for name, c in widths.items():
    a = np.zeros(c, bool)
    a[: max(1, int(keep[name]))] = True
    out[name] = a
  return out


def time_call(fn, *args, repeats: int) -> float:
  """Median seconds of ``fn(*args)`` (jitted, synchronised), after warm-up."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_config(
  model_name: str, label: str, keep: dict[str, int], batch_sizes: list[int], repeats: int
) -> list[dict]:
  """Rows for one pruned configuration of ``model_name``."""
  model = S.build_model(model_name)
  plan = S.plan_for(model)
  gm = S.GatedModel(model, plan)
  alive = first_k_alive(gm.widths, keep)
  slim = S.remove_channels(model, alive, plan)
  counter = S.StructureCounter(model, plan)
  dense_counts = S.count_structure(model, plan.input_shape)
  slim_counts = S.count_structure(slim, plan.input_shape)
  gates = S._gate_vectors(alive)  # pylint: disable=protected-access

  @jax.jit
  def masked_fn(params, rest, x):
    return gm.apply(params, rest, x, gates, train=False)[0]

  @jax.jit
  def dense_fn(params, rest, x):
    return gm.apply(params, rest, x, None, train=False)[0]

  slim.eval()
  slim_def, slim_state = nnx.split(slim)

  @jax.jit
  def slim_fn(state, x):
    return nnx.merge(slim_def, state)(x)

  rows = []
  for bs in batch_sizes:
    x = jnp.asarray(np.random.default_rng(0).standard_normal((bs,) + plan.input_shape), jnp.float32)
    diff = float(jnp.max(jnp.abs(masked_fn(gm.params, gm.rest, x) - slim_fn(slim_state, x))))
    t_dense = time_call(dense_fn, gm.params, gm.rest, x, repeats=repeats)
    t_masked = time_call(masked_fn, gm.params, gm.rest, x, repeats=repeats)
    t_slim = time_call(slim_fn, slim_state, x, repeats=repeats)
    rows.append(
      {
        "model": model_name,
        "config": label,
        "batch_size": bs,
        "widths": S.alive_widths(alive),
        "dense_widths": gm.widths,
        "dense_macs": dense_counts["macs"],
        "dense_params": dense_counts["params"],
        "slim_macs": slim_counts["macs"],
        "slim_params": slim_counts["params"],
        "macs_fraction": slim_counts["macs"] / dense_counts["macs"],
        "analytic_macs": counter.count(alive)[0],
        "dense_ms": 1e3 * t_dense,
        "masked_ms": 1e3 * t_masked,
        "slim_ms": 1e3 * t_slim,
        "speedup_vs_masked": t_masked / t_slim,
        "max_abs_output_diff": diff,
      }
    )
  return rows


def configs_from_results(results_dir: Path) -> list[tuple[str, str, dict]]:
  """(model, label, widths) of every level in the structured result files."""
  out = []
  for path in sorted(results_dir.glob("*.json")):
    if path.name == "latency.json" or path.stem.endswith("_mock"):
      continue
    try:
      result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
      continue
    model = result.get("model")
    if not model:
      continue
    for level in result.get("levels", []):
      out.append((model, f"{result['method']} {level['target']}", level["widths"]))
    if "widths" in result and "macs" in result and "levels" not in result:
      out.append((model, result["method"], result["widths"]))
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--results", default=str(S.RESULTS_DIR))
  p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
  p.add_argument("--repeats", type=int, default=50)
  p.add_argument("--out", default=None)
  p.add_argument(
    "--no-vgg", action="store_true", help="skip the half-width small VGG configuration"
  )
  args = p.parse_args(argv)
  configs = configs_from_results(Path(args.results))
  if not configs:
    # No result files yet: a fixed LeNet-5 configuration at about 10% FLOPs.
    configs.append(("lenet5", "fixed 8-12-100", {"conv1": 8, "conv2": 12, "fc1": 100}))
  if not args.no_vgg:
    half = {f"convs.{i}": c // 2 for i, c in enumerate(c for c in S.VGG_SMALL_LAYOUT if c != "M")}
    configs.append(("vgg_small", "half width", half))
  rows = []
  for model, label, widths in configs:
    rows += bench_config(model, label, widths, args.batch_sizes, args.repeats)
  print(
    "| model | config | batch | MACs dense -> slim | params dense -> slim "
    "| dense ms | masked ms | slim ms | slim speed-up |"
  )
  print("| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |")
  for r in rows:
    print(
      f"| {r['model']} | {r['config']} | {r['batch_size']} | "
      f"{r['dense_macs']:,} -> {r['slim_macs']:,} ({r['macs_fraction']:.1%}) | "
      f"{r['dense_params']:,} -> {r['slim_params']:,} | "
      f"{r['dense_ms']:.3f} | {r['masked_ms']:.3f} | {r['slim_ms']:.3f} | "
      f"{r['speedup_vs_masked']:.2f}x |"
    )
  out = Path(args.out) if args.out else Path(args.results) / "latency.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(
    json.dumps(
      {
        "rows": rows,
        "repeats": args.repeats,
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "command": "python benchmarks/structured_latency.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
      },
      indent=1,
    )
    + "\n"
  )
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
