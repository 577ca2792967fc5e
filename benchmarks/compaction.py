"""Pruned models made smaller and faster: compaction and sparse layers, on CPU.

For each row (``--rows``), four variants of one model are compared:

* ``dense``: the unpruned model (same shapes as the pruned one);
* ``pruned``: the pruned model with its dense shapes (zeros multiplied:
  "mock sparsity");
* ``compacted``: :func:`experiments.compaction.compact` of the pruned model
  (dead units removed, constants folded);
* ``compacted+sparse``: :func:`experiments.compaction.sparsify` of that,
  ``choice="time"``: each layer sparse only where it was timed faster, at
  the batch size of the measurement.

Columns: parameter entries stored (``param_counts``: kernels, biases,
BatchNorm scales and offsets; a sparse layer stores its non-zeros) and the
non-zero ones, MACs per example as executed (a dense kernel counts in full,
zeros included), the bytes of the :func:`optax_gsm.save_sparse` file of the
whole state, and the latency of one jitted forward call at batch 1 and 256.
The variants are timed in one process, interleaved (each round calls every
variant once, in turn, the round's first variant rotating), after two
warm-up calls each; the table gives, per
variant, the median over rounds of its time divided by the dense model's in
the same round, with the 25th-75th percentile of that ratio. The outputs of
the compacted and sparse variants are checked against the pruned model's on
the timing batch (max abs difference).

Rows:

* ``lenet300_60x``: LeNet-300-100, real GSM weights at 60x from
  ``python -m experiments.rule_study from-base --gsm-epochs 40 --shrinks 1e-2
  --save-params runs/compaction/lenet300`` (``--lenet300-dir``); dense =
  the trained base. Accuracy on the MNIST test set (inputs in [0, 1]).
* ``lenet5_125x``, ``lenet5_300x``: LeNet-5; real weights from an
  ``experiments.run`` result folder (``--lenet5-125x DIR``, ``--lenet5-300x
  DIR``: ``DIR/prune/pruned_model``, accuracy on MNIST normalised as the
  trainer does), else synthetic (below).
* ``resnet56_10x``: ResNet-56 (CIFAR, option-A shortcuts), synthetic, 10x.

Synthetic "GSM-like" weights (said so in the table): the random initial
weights, each unit's incoming and outgoing kernel entries scaled by one
log-normal factor per unit (sigma ``--sigma``, shared by the unit's two
sides, as GSM decays the weights of an unimportant unit on both sides), then
a cut of each kernel to its entries of the largest magnitude, as many as the
Erdos-Renyi-Kernel density of the layer for ``1 / compression`` overall
(:func:`optax_gsm.baselines.layer_densities`: small layers such as LeNet-5's
``conv1`` stay denser, as they do under GSM's global cut; a uniform density
of 1/125 would leave ``conv1`` 4 of its 500 entries and no signal through
it); the units with small factors keep fewer. Random biases and BatchNorm
scales and offsets; BatchNorm means and variances then set from one random
batch (:func:`calibrate_batch_norm`: random ones make ResNet-56 overflow). This gives dead units, but how many is a choice of ``--sigma``
and of the ERK densities, not a measurement of GSM.

  python benchmarks/compaction.py --rows lenet300_60x lenet5_125x lenet5_300x resnet56_10x

Prints a markdown table and writes ``--out`` (JSON; default
``runs/compaction/benchmark.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import optax_gsm  # noqa: E402
from optax_gsm.baselines import layer_densities  # noqa: E402
from experiments import compaction as C  # noqa: E402
from experiments import rule_study  # noqa: E402
from experiments.data import DATASETS  # noqa: E402
from experiments.models import get_model, param_counts  # noqa: E402

ROWS = ("lenet300_60x", "lenet5_125x", "lenet5_300x", "resnet56_10x")
VARIANTS = ("dense", "pruned", "compacted", "compacted+sparse")
DATA_ROOT = REPO / ".." / "shared" / "datasets"


# --------------------------------------------------------------------------
# Models.


def _set(module, name, value) -> None:
  old = getattr(module, name)
  setattr(module, name, type(old)(jax.device_put(np.asarray(value, np.float32))))


def lenet300_from_mlp(params: dict) -> nnx.Module:
  """The NNX LeNet-300-100 holding ``rule_study``'s MLP params."""
  model = get_model("lenet_300_100", rngs=nnx.Rngs(0))
  for i, name in enumerate(("fc1", "fc2", "fc3")):
    layer = getattr(model, name)
    _set(layer, "kernel", params[f"dense{i}"]["kernel"])
    _set(layer, "bias", params[f"dense{i}"]["bias"])
  return model


def restore_run(model: nnx.Module, run_dir: Path) -> tuple[nnx.Module, str]:
  """``model`` with the pruned state of an ``experiments.run`` folder.

  ``run_dir/prune/pruned_model`` when the prune phase has written it; else
  the newest intact checkpoint of ``run_dir/gsm/checkpoints`` cut by
  :func:`optax_gsm.magnitude_prune` to the run's ``num_nonzero`` (as the
  prune phase does), for a run still in its GSM phase. Returns the model and
  a description of the weights.
  """
  pruned_dir = run_dir / "prune" / "pruned_model"
  if pruned_dir.exists():
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
      pure = ckptr.restore(pruned_dir.resolve())
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model, f"real GSM (experiments.run, {run_dir})"
  from experiments.training import param_dict, restore_model_state, set_params

  results = json.loads((run_dir / "results.json").read_text())
  q = int(results["target"]["num_nonzero"])
  meta = restore_model_state(run_dir / "gsm" / "checkpoints", model)
  pruned, _ = optax_gsm.magnitude_prune(param_dict(model), num_nonzero=q)
  set_params(model, pruned)
  return model, (
    f"real GSM, unfinished (experiments.run {run_dir}: GSM epoch "
    f"{meta['epoch']} of {results['config']['gsm']['epochs']}, cut to Q={q:,})"
  )


def restore_base(model: nnx.Module, run_dir: Path) -> tuple[nnx.Module, str]:
  """``model`` with the trained base of ``run_dir/train/checkpoints`` if any."""
  from experiments.training import restore_model_state

  ckpt = run_dir / "train" / "checkpoints"
  if not ckpt.is_dir():
    return model, "random init"
  meta = restore_model_state(ckpt, model)
  return model, f"trained base, epoch {meta['epoch']}"


def gsm_like(model: nnx.Module, compression: float, *, seed: int, sigma: float) -> nnx.Module:
  """Synthetic pruned weights with GSM-like dead units (module docstring)."""
  rng = np.random.default_rng(seed)
  model = nnx.clone(model)
  for g in C.groups_for(model):
    factor = rng.lognormal(
      0.0, sigma, C.S.site_widths(model, C.S.Plan((g.site,), (1, 1, 1)))[g.name]
    ).astype(np.float32)
    for path in g.site.producers:
      node = C.S.module_at(model, path)
      if isinstance(node, (nnx.Conv, nnx.Linear)):
        _set(node, "kernel", np.asarray(node.kernel[...]) * factor)
    for path, spatial in g.site.consumers:
      node = C.S.module_at(model, path)
      k = np.asarray(node.kernel[...])
      rows = np.tile(factor, spatial)  # NHWC flatten: s * C + c
      _set(node, "kernel", k * rows[:, None] if k.ndim == 2 else k * factor[:, None])
  for _, node in nnx.iter_graph(model):
    if isinstance(node, (nnx.Conv, nnx.Linear)) and node.bias is not None:
      _set(node, "bias", rng.normal(0, 0.1, node.bias[...].shape))
    elif isinstance(node, nnx.BatchNorm):
      c = node.num_features
      _set(node, "mean", rng.normal(0, 0.5, c))
      _set(node, "var", rng.uniform(0.5, 2, c))
      _set(node, "scale", rng.uniform(0.5, 1.5, c))
      _set(node, "bias", rng.normal(0, 0.5, c))
  # Per-layer cut to the ERK densities, in numpy (ties have probability 0).
  kernels = [node for _, node in nnx.iter_graph(model) if isinstance(node, (nnx.Conv, nnx.Linear))]
  densities = layer_densities([np.asarray(n.kernel[...]) for n in kernels], 1 / compression)
  for node, d in zip(kernels, densities):
    k = np.asarray(node.kernel[...])
    keep = max(1, round(d * k.size))
    threshold = np.partition(np.abs(k).ravel(), k.size - keep)[k.size - keep]
    _set(node, "kernel", np.where(np.abs(k) >= threshold, k, 0))
  if any(isinstance(node, nnx.BatchNorm) for _, node in nnx.iter_graph(model)):
    calibrate_batch_norm(model, rng)
  return model


def calibrate_batch_norm(model: nnx.Module, rng: np.random.Generator, batch: int = 64) -> None:
  """Sets every BatchNorm's mean and variance to those of one random batch.

  With random statistics the activations of a deep synthetic ResNet grow
  block after block until float32 overflows (logits of 4e5 and inf inside),
  and outputs then depend on XLA's fusion, not on the weights. The pruned
  model is run once in training mode with momentum 0 on standard normal
  inputs, so each BatchNorm normalises its input (keeping the random scales
  and offsets); a unit with no incoming weight gets its constant as mean and
  variance 0, so it still outputs a constant.
  """
  norms = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)]
  momenta = [n.momentum for n in norms]
  shape = (batch,) + tuple(_input_shape(model))
  model.train()
  for n in norms:
    n.momentum = 0.0
  model(jnp.asarray(rng.standard_normal(shape), jnp.float32))
  for n, m in zip(norms, momenta):
    n.momentum = m
  model.eval()


def _input_shape(model: nnx.Module) -> tuple[int, ...]:
  return (32, 32, 3) if model.__class__.__name__ == "CifarResNet" else (28, 28, 1)


def mnist_test(normalise: bool) -> tuple[np.ndarray, np.ndarray]:
  x, y = rule_study.load_idx(DATA_ROOT, "mnist", "test")
  if normalise:
    spec = DATASETS["mnist"]
    x = (x - spec.mean[0]) / spec.std[0]
  return x.reshape(-1, 28, 28, 1).astype(np.float32), y


def build_row(name: str, args) -> dict:
  """The dense and pruned models of a row, with where their weights come from."""
  if name == "lenet300_60x":
    d = Path(args.lenet300_dir)
    dense = lenet300_from_mlp(rule_study.load_params(d / "base.npz"))
    pruned = lenet300_from_mlp(rule_study.load_params(d / "gsm_shrink0.01.npz"))
    return {
      "dense": dense,
      "pruned": pruned,
      "input": (28, 28, 1),
      "weights": f"real GSM (rule_study, {d})",
      "test": mnist_test(False),
    }
  if name.startswith("lenet5_"):
    compression = float(name.split("_")[1].rstrip("x"))
    dense = get_model("lenet5", rngs=nnx.Rngs(0))
    run = getattr(args, f"lenet5_{int(compression)}x")
    if run:
      dense, base = restore_base(dense, Path(run))
      pruned, weights = restore_run(get_model("lenet5", rngs=nnx.Rngs(0)), Path(run))
      return {
        "dense": dense,
        "pruned": pruned,
        "input": (28, 28, 1),
        "weights": f"{weights}; dense: {base}",
        "test": mnist_test(True),
      }
    return {
      "dense": dense,
      "input": (28, 28, 1),
      "test": None,
      "pruned": gsm_like(dense, compression, seed=args.seed, sigma=args.sigma),
      "weights": f"synthetic GSM-like (sigma {args.sigma})",
    }
  if name == "resnet56_10x":
    dense = get_model("resnet56", rngs=nnx.Rngs(0))
    return {
      "dense": dense,
      "input": (32, 32, 3),
      "test": None,
      "pruned": gsm_like(dense, 10, seed=args.seed, sigma=args.sigma),
      "weights": f"synthetic GSM-like (sigma {args.sigma})",
    }
  raise ValueError(f"unknown row {name!r}; choose from {ROWS}")


# --------------------------------------------------------------------------
# Measurements.


def forward(model: nnx.Module):
  model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, x):
    return nnx.merge(graphdef, state)(x)

  return lambda x: fn(state, x)


def nonzero_params(model: nnx.Module) -> int:
  return sum(
    int(np.count_nonzero(np.asarray(x))) for x in jax.tree.leaves(nnx.state(model, nnx.Param))
  )


def file_bytes(model: nnx.Module) -> int:
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model.npz")
    optax_gsm.save_sparse(path, nnx.to_pure_dict(nnx.state(model)))
    return os.path.getsize(path)


def accuracy(fn, data, batch: int = 1000) -> float:
  x, y = data
  hits = 0
  for i in range(0, len(x), batch):
    hits += int(
      np.sum(np.argmax(np.asarray(fn(jnp.asarray(x[i : i + batch]))), -1) == y[i : i + batch])
    )
  return 100 * hits / len(x)


def time_rotated(fns: dict, x, *, repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each ``fn(x)``, interleaved, the order rotated.

  As :func:`experiments.compaction.time_interleaved` (two warm-up calls
  each, then rounds calling every variant once), but round ``r`` starts at
  variant ``r mod 4``, so that no variant always runs right after another.
  """
  names = list(fns)
  for fn in fns.values():
    jax.block_until_ready(fn(x))
    jax.block_until_ready(fn(x))
  times: dict[str, list[float]] = {k: [] for k in names}
  for r in range(repeats):
    for k in names[r % len(names) :] + names[: r % len(names)]:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[k](x))
      times[k].append(time.perf_counter() - t0)
  return times


def ratios(times: dict[str, list[float]]) -> dict[str, dict]:
  out = {}
  for k, ts in times.items():
    r = np.asarray(ts) / np.asarray(times["dense"])
    out[k] = {
      "median_ms": 1e3 * statistics.median(ts),
      "ratio_median": float(np.median(r)),
      "ratio_p25": float(np.percentile(r, 25)),
      "ratio_p75": float(np.percentile(r, 75)),
    }
  return out


def bench_row(name: str, args, log) -> dict:
  t0 = time.perf_counter()
  row = build_row(name, args)
  dense, pruned = row["dense"], row["pruned"]
  dense.eval()
  pruned.eval()
  small, report = C.compact(pruned)
  log(f"[{name}] {row['weights']}\n{report}")
  shape1 = (1,) + row["input"]
  models = {"dense": dense, "pruned": pruned, "compacted": small}
  result = {
    "row": name,
    "weights": row["weights"],
    "report": str(report),
    "batches": {},
    "static": {},
  }
  for k, m in models.items():
    result["static"][k] = {
      "params": param_counts(m)["total"],
      "nonzero_params": nonzero_params(m),
      "macs": C.executed_macs(m, shape1),
      "file_bytes": file_bytes(m),
    }
  for batch in args.batch_sizes:
    shape = (batch,) + row["input"]
    sparse, choices = C.sparsify(small, shape, choice="time", repeats=args.layer_repeats)
    variants = dict(models, **{"compacted+sparse": sparse})
    fns = {k: forward(m) for k, m in variants.items()}
    x = jnp.asarray(np.random.default_rng(batch).standard_normal(shape), jnp.float32)
    ref = np.asarray(fns["pruned"](x))
    diffs = {
      k: float(np.max(np.abs(np.asarray(fns[k](x)) - ref)))
      for k in ("compacted", "compacted+sparse")
    }
    jax.block_until_ready(fns["dense"](x))  # compiled before it is timed
    one = time.perf_counter()
    jax.block_until_ready(fns["dense"](x))
    per_call = time.perf_counter() - one
    rounds = int(max(args.min_rounds, min(args.rounds, args.seconds / (4 * max(per_call, 1e-6)))))
    times = time_rotated(fns, x, repeats=rounds)
    entry = {
      "rounds": rounds,
      "latency": ratios(times),
      "max_abs_diff": diffs,
      "max_abs_output": float(np.max(np.abs(ref))),
      "sparse_layers": [c.path for c in choices if c.sparse],
      "layer_choices": [vars(c) for c in choices],
      "sparse_static": {
        "params": param_counts(sparse)["total"],
        "nonzero_params": nonzero_params(sparse),
        "macs": C.executed_macs(sparse, shape1),
        "file_bytes": file_bytes(sparse),
      },
    }
    if row["test"] is not None and batch == max(args.batch_sizes):
      entry["accuracy"] = {k: accuracy(f, row["test"]) for k, f in fns.items()}
    result["batches"][str(batch)] = entry  # str: as in the JSON
    log(
      f"[{name}] batch {batch}: {rounds} rounds, sparse layers "
      f"{entry['sparse_layers']}, max|diff| {diffs} (max|output| "
      f"{entry['max_abs_output']:.3g}), "
      + ", ".join(f"{k} {v['ratio_median']:.3f}" for k, v in entry["latency"].items())
      + (f"; test accuracy {entry['accuracy']}" if "accuracy" in entry else "")
    )
  result["seconds"] = time.perf_counter() - t0
  return result


def table(results: list[dict]) -> str:
  lines = [
    "| row | weights | variant | params (non-zero) | MACs | file bytes "
    "| batch 1: time / dense [p25-p75] | batch 256: time / dense [p25-p75] "
    "| test acc % |",
    "|---|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    big = str(max(int(b) for b in r["batches"]))
    for v in VARIANTS:
      s = r["batches"][big]["sparse_static"] if v == "compacted+sparse" else r["static"][v]
      cells = []
      for b in sorted(r["batches"], key=int):
        lat = r["batches"][b]["latency"][v]
        cells.append(
          f"{lat['ratio_median']:.3f} [{lat['ratio_p25']:.2f}-"
          f"{lat['ratio_p75']:.2f}] ({lat['median_ms']:.3g} ms)"
        )
      acc = r["batches"][big].get("accuracy", {}).get(v)
      lines.append(
        f"| {r['row']} | {r['weights'].split(' (')[0]} | {v} | {s['params']:,} "
        f"({s['nonzero_params']:,}) | {s['macs']:,} | {s['file_bytes']:,} | "
        + " | ".join(cells)
        + f" | {'-' if acc is None else f'{acc:.2f}'} |"
      )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
  p.add_argument("--lenet300-dir", default=str(REPO / "runs" / "compaction" / "lenet300"))
  p.add_argument(
    "--lenet5-125x",
    default=None,
    metavar="DIR",
    help="experiments.run result folder of LeNet-5 at 125x",
  )
  p.add_argument(
    "--lenet5-300x",
    default=None,
    metavar="DIR",
    help="experiments.run result folder of LeNet-5 at 300x",
  )
  p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
  p.add_argument(
    "--rounds", type=int, default=200, help="the most timing rounds per row and batch size"
  )
  p.add_argument("--min-rounds", type=int, default=5)
  p.add_argument(
    "--seconds",
    type=float,
    default=60.0,
    help="timing budget per row and batch size (sets the rounds)",
  )
  p.add_argument(
    "--layer-repeats", type=int, default=20, help="timing rounds per layer for sparsify's choice"
  )
  p.add_argument("--sigma", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=str(REPO / "runs" / "compaction" / "benchmark.json"))
  args = p.parse_args(argv)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  results = []
  for name in args.rows:
    results.append(bench_row(name, args, lambda s: print(s, flush=True)))
    # Written after every row, so that a failure later keeps the rows done.
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(results, indent=1, default=str) + "\n")
  text = table(results)
  print(text)
  partial.unlink()
  try:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next(
      (line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")),
      platform.processor(),
    )
  except OSError:
    cpu = platform.processor()
  out.write_text(
    json.dumps(
      {
        "results": results,
        "table": text,
        "cpu": cpu,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "command": "python benchmarks/compaction.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
      },
      indent=1,
      default=str,
    )
    + "\n"
  )
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
