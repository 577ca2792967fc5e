"""Compares GSM with connection-pruning baselines at equal non-zero counts.

Usage::

    python -m experiments.compare mnist [--models lenet_300_100 lenet5]
        [--compressions 10 30 60 125] [--methods gsm lobs ...] [--quick]
        [--base-epochs N] [--epochs N] [--ticket-epochs N] [--lr LR] [--tag TAG]
        [--out DIR] [--resume]
        [--data-dir DIR] [--manual-dir DIR]
    python -m experiments.compare --merge A/mnist.json B/mnist.json [--out DIR] [--tag TAG]
    python -m experiments.compare --list

For every model and compression C (default: 10x, 30x, 60x, 125x, and 300x for
LeNet-5) every method of :mod:`experiments.methods` is run at exactly
``Q = round(N / C)`` eligible weights (DNS and the structured methods ``taylor``,
``taylor_gate`` and ``fisher``, which remove whole channels, may end with fewer; the
table shows the count reached and the actual compression). The dense base of a
model is trained once from its initial weights and cached in ``<out>/cache``; all
methods see the same data in the same order (see
:mod:`experiments.methods.common`). A method that cannot run a cell (a model
without the structure it prunes, a Q below its smallest model) raises
:class:`NotApplicable`; the cell is recorded with the reason and shown as ``n/a``.

Outputs (``<out>`` defaults to ``runs/compare``, git-ignored, so the committed
tables in ``docs/results/compare`` are never overwritten; ``--quick`` adds a
``_quick`` suffix; ``<out>`` is locked while the command runs, see
:func:`experiments.fileio.lock_output`)::

    <dataset>.md     the tables: accuracy per method x compression, and per cell the
                     non-zeros, epochs used and wall time; the budget
    <dataset>.json   every cell, the budget, the bases, the environment
    <dataset>.png    accuracy vs compression, one line per method (black and white)

Results are saved after every cell; ``--resume`` skips the cells already in the
JSON that were run with the same budget. To use several cores or machines, run
one process per group of ``--methods``, each with its own ``--out``, and join
their JSONs with ``--merge`` (:func:`merge`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.fileio import (
  atomic_save_figure,
  atomic_write_json,
  atomic_write_text,
  lock_output,
  manual_dir_arg,
  run_command,
)
from experiments.methods.common import (  # NotApplicable: re-exported
  BUDGETS,
  Budget,
  NotApplicable,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "runs" / "compare"
# The datasets of the LeNets compared here (28x28 grey images).
DATASETS = ("mnist", "fashion_mnist")
DEFAULT_MODELS = ("lenet_300_100", "lenet5")
DEFAULT_COMPRESSIONS = {
  "lenet_300_100": (10.0, 30.0, 60.0, 125.0),
  "lenet5": (10.0, 30.0, 60.0, 125.0, 300.0),
}

# Reported by the papers (LeNets on MNIST), for the table's notes.
PAPER_NUMBERS = (
  ("Han et al. 2015 (prune + retrain)", "LeNet-300-100 12x: 98.41%; LeNet-5 12x: 99.23%"),
  ("DNS (Guo et al. 2016)", "LeNet-300-100 55.6x: 98.01%; LeNet-5 108x: 99.09%"),
  ("L-OBS (Dong et al. 2017)", "LeNet-300-100 14.2x: 98.18%"),
)

METHOD_NOTES = {
  "gsm": "GSM (optax_gsm.gsm, default rule: unselected weights also shrink by unselected_shrink=1e-2 per update) from the base, Q ramped from N to the target over the first gsm_ramp_fraction of the updates (optax_gsm.compression_ramp, cubic; see Budget), then the global magnitude cut to Q; no fine-tuning",
  "magnitude_oneshot": "global magnitude cut of the base to Q, no retraining",
  "magnitude_retrain": "Han et al.: global magnitude cut of the base to Q, retrain with the mask fixed",
  "magnitude_gradual": "polynomial (power 3) sparsity 0 -> 1-Q/N over 2/3 of the epochs, re-pruning globally every half epoch, then fixed mask",
  "dns": "Dynamic Network Surgery: 70% of the epochs surgery + splicing (c calibrated to Q), cut to <= Q at the stop, 30% fixed mask",
  "lobs": "L-OBS: layer Hessians from calibration batches, per-layer counts of the global magnitude cut, weights chosen by OBS sensitivity with exact OBS compensation (bias included); then retrain with the mask fixed",
  "saliency_retrain": "one-shot global |g*w| summed over calibration batches, then retrain with the mask fixed",
  "imp_ticket": "lottery ticket by iterative magnitude pruning with rewinding to W0 (each round <= 2x more pruning); epochs = all rounds",
  "gsm_ticket": "GSM's final mask applied to W0, trained with the mask fixed (dense recipe)",
  "random_ticket": "random mask with GSM's per-layer counts applied to W0, trained with the mask fixed",
  "taylor": "structured (Molchanov et al. 2017): from the base, every k updates (lr constant) remove the feature map / neuron with the lowest per-layer-L2-normalised mean |gate gradient| (per example) until <= Q kernel weights remain (the count is reached from above, so non-zeros may be below Q); no FLOPs term; then the channels are cut out and the slim model fine-tunes (lr cosine); pruning takes <= 70% of the updates unless there are more removals than that, fine-tuning the rest",
  "taylor_gate": "structured (Molchanov et al. 2019): as `taylor` with the gate score, the mean over minibatches of the squared minibatch gate gradient, not normalised",
  "fisher": "structured (Theis et al. 2018): as `taylor` with the Fisher score, the mean over examples of the squared gate gradient / 2, not normalised",
  "rigl": "RigL (Evci et al. 2020): the base cut to Q by magnitude per layer with Erdos-Renyi-Kernel counts, then retraining (lr cosine) while every 100 updates until 75% of them each layer drops the fraction 0.3 (1 + cos(pi t / T_end)) / 2 of its smallest weights and regrows as many where the dense gradient is largest (at zero, momentum reset)",
  "set": "SET (Mocanu et al. 2018): as `rigl`, regrowing at random",
}

MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*", "P", "h", "<", ">", "X", "d", "p", "1")
LINESTYLES = (
  "-",
  (0, (6, 2)),
  (0, (1, 1.5)),
  (0, (6, 2, 1, 2)),
  (0, (12, 3)),
  (0, (3, 3)),
  (0, (6, 2, 1, 2, 1, 2)),
  (0, (1, 4)),
  (0, (10, 2, 2, 2)),
  (0, (2, 1, 2, 4)),
  (0, (4, 1)),
  (0, (8, 4, 1, 4, 1, 4, 1, 4)),
  (0, (1, 2, 5, 2)),
  (0, (14, 2, 2, 2, 2, 2)),
  (0, (3, 1, 1, 1)),
  (0, (9, 3, 3, 3)),
)


def method_note(name: str, available: dict[str, Any]) -> str:
  """The table note of a method: ours, else the first line of its runner's (or module's) docstring."""
  if name in METHOD_NOTES:
    return METHOD_NOTES[name]
  runner = available.get(name)
  doc = (
    getattr(runner, "__doc__", None)
    or getattr(sys.modules.get(getattr(runner, "__module__", "")), "__doc__", None)
    or ""
  )
  return doc.strip().splitlines()[0] if doc.strip() else ""


def _log(msg: str) -> None:
  print(msg, flush=True)


# ------------------------------------------------------------------ base models


def prepare_base(
  model: str, dataset: str, budget: Any, train: Any, test: Any, cache_dir: Path, num_classes: int
) -> dict[str, Any]:
  """The initial weights and the dense base of ``model``, trained once and cached.

  Returns:
    ``{"module", "apply", "init_params", "base_params", "base_acc", "seconds",
    "cached", "path"}``.
  """
  from flax import nnx

  from experiments.methods import common
  from experiments.models import get_model
  from experiments.training import param_dict

  module = get_model(model, rngs=nnx.Rngs(budget.seed), num_classes=num_classes)
  apply = common.make_apply(module)
  init_params = common.to_numpy(param_dict(module))
  key = common.config_hash({"model": model, "dataset": dataset, **budget.base_key()})
  path = cache_dir / f"{dataset}_{model}_base_{key}.npz"
  ctx = common.Context(
    model=model,
    dataset=dataset,
    compression=1.0,
    num_nonzero=0,
    num_eligible=0,
    budget=budget,
    module=module,
    apply=apply,
    init_params=init_params,
    base_params=init_params,
    base_acc=float("nan"),
    train=train,
    test=test,
    cache_dir=cache_dir,
    log=_log,
  )
  if path.exists():
    both, meta = common.load_tree(path, {"init": init_params, "base": init_params})
    import jax
    import numpy as np

    if not all(
      np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(both["init"]), jax.tree.leaves(init_params))
    ):
      raise RuntimeError(f"{path} was trained from other initial weights; delete it")
    base_params, seconds, cached = both["base"], float(meta.get("seconds", 0.0)), True
    _log(f"[base] {model}: loaded {path.name}")
  else:
    _log(f"[base] {model}: training the dense base for {budget.base_epochs} epochs")
    steps = budget.base_epochs * train.steps_per_epoch
    tx = common.sgd(common.cosine(budget.base_lr, steps), budget)
    out = common.train(ctx, init_params, tx, budget.base_epochs, name="base")
    base_params, seconds, cached = common.to_numpy(out.params), out.seconds, False
    common.save_tree(
      path,
      {"init": init_params, "base": base_params},
      {"seconds": seconds, "budget": budget.base_key(), "model": model},
    )
  ctx.base_params = base_params
  acc = common.evaluate(ctx, base_params)
  _log(f"[base] {model}: dense test accuracy {100 * acc:.2f}%")
  return {
    "module": module,
    "apply": apply,
    "init_params": init_params,
    "base_params": base_params,
    "base_acc": acc,
    "seconds": seconds,
    "cached": cached,
    "path": str(path),
  }


# ------------------------------------------------------------------ the comparison


def run(
  dataset: str,
  *,
  models: Sequence[str],
  compressions: dict[str, Sequence[float]],
  methods: Sequence[str] | None,
  budget: Any,
  out_dir: Path,
  suffix: str = "",
  data_dir: str | None = None,
  manual_dir: str | None = None,
  resume: bool = False,
  command: str = "",
) -> dict[str, Any]:
  """Runs the comparison and writes ``<dataset><suffix>.{json,md,png}`` into ``out_dir``.

  Returns:
    The results dict (as written to the JSON).
  """
  import optax_gsm
  from experiments import data
  from experiments.methods import collect_methods, common
  from experiments.run import environment

  available = collect_methods()
  chosen = list(available) if not methods else list(methods)
  unknown = [m for m in chosen if m not in available]
  if unknown:
    raise SystemExit(f"unknown method(s) {unknown}; available: {', '.join(available)}")
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  cache_dir = out_dir / "cache"
  json_path = out_dir / f"{dataset}{suffix}.json"

  results: dict[str, Any] = {
    "dataset": dataset,
    "command": command,
    "budget": budget.to_dict(),
    "methods": chosen,
    "method_notes": {m: method_note(m, available) for m in chosen},
    "bases": {},
    "cells": [],
  }
  if resume and json_path.exists():
    with open(json_path) as f:
      old = json.load(f)
    if old.get("budget") == budget.to_dict():
      results["cells"] = [c for c in old.get("cells", [])]
      results["bases"] = old.get("bases", {})
      # Keep the rows of methods run earlier, in table order.
      both = set(old.get("methods", [])) | set(chosen)
      results["methods"] = [m for m in available if m in both] + [
        m for m in old.get("methods", []) if m not in available
      ]
      results["method_notes"] = {m: method_note(m, available) for m in results["methods"]}
      _log(f"[compare] resuming: {len(results['cells'])} cells already done")
    else:
      _log("[compare] --resume: the saved budget differs; starting over")
  results["environment"] = environment()
  results["started"] = _dt.datetime.now().isoformat(timespec="seconds")

  spec = data.get_spec(dataset)
  builder = data.prepare(dataset, data_dir=data_dir, manual_dir=manual_dir)
  train = data.load(
    dataset,
    "train",
    batch_size=budget.batch_size,
    seed=budget.seed,
    subset=budget.train_subset,
    builder=builder,
  )
  test = data.load(
    dataset,
    "test",
    batch_size=budget.eval_batch_size,
    train=False,
    subset=budget.eval_subset,
    builder=builder,
  )
  results["data"] = {
    "train_examples": train.num_examples,
    "test_examples": test.num_examples,
    "steps_per_epoch": train.steps_per_epoch,
  }

  def save(with_plot: bool = False) -> None:
    results["updated"] = _dt.datetime.now().isoformat(timespec="seconds")
    # ~1 s of matplotlib: the plot once per model, not after every cell
    write_results(results, out_dir / f"{dataset}{suffix}", with_plot=with_plot)

  for model in models:
    base = prepare_base(model, dataset, budget, train, test, cache_dir, spec.num_classes)
    n = optax_gsm.count_eligible(base["base_params"])
    results["bases"][model] = {
      "test_acc": base["base_acc"],
      "num_eligible": n,
      "train_seconds": base["seconds"],
      "cache": base["path"],
      "epochs": budget.base_epochs,
    }
    pairs = sorted((float(c), max(1, min(n, int(round(n / c))))) for c in compressions[model])
    artifacts: dict[str, Any] = {"targets": [q for _, q in pairs]}
    for c, q in pairs:
      for method in chosen:
        if any(
          x["model"] == model and x["method"] == method and x["compression"] == c
          for x in results["cells"]
        ):
          continue
        ctx = common.Context(
          model=model,
          dataset=dataset,
          compression=c,
          num_nonzero=q,
          num_eligible=n,
          budget=budget,
          module=base["module"],
          apply=base["apply"],
          init_params=base["init_params"],
          base_params=base["base_params"],
          base_acc=base["base_acc"],
          train=train,
          test=test,
          cache_dir=cache_dir,
          artifacts=artifacts,
          log=_log,
        )
        _log(f"[compare] {model} {c:g}x (Q={q}): {method}")
        t0 = time.perf_counter()
        try:
          cell = available[method](ctx).to_dict()
        except NotApplicable as err:
          _log(f"[compare] {method} not applicable: {err}")
          cell = {
            "method": method,
            "model": model,
            "dataset": dataset,
            "compression": c,
            "num_nonzero": q,
            "num_eligible": n,
            "not_applicable": str(err),
          }
        cell["wall_seconds"] = time.perf_counter() - t0
        results["cells"].append(cell)
        save()
    save(with_plot=True)
  save(with_plot=True)
  return results


# Budget fields that only GSM reads, and the methods whose cells come from a
# GSM run (its masks): a rerun of exactly those methods may change these
# fields (``merge(..., replace=True)``).
GSM_BUDGET_FIELDS = ("gsm_lr", "gsm_momentum", "gsm_weight_decay", "gsm_ramp_fraction")
GSM_METHODS = ("gsm", "gsm_ticket", "random_ticket")
# Budget fields added after some committed tables were run, with the value
# every run before them had.
_BUDGET_FIELDS_ADDED = {"gsm_ramp_fraction": 0.0}


def _budget_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  a, b = {**_BUDGET_FIELDS_ADDED, **a}, {**_BUDGET_FIELDS_ADDED, **b}
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _as_list(x: Any) -> list[Any]:
  """``x`` as a flat list: a file merged before merges were flattened holds
  its parts' commands as a nested list."""
  if not isinstance(x, list):
    return [x]
  return [item for part in x for item in _as_list(part)]


def merge(
  paths: Sequence[Path], available: Sequence[str], *, replace: bool = False
) -> dict[str, Any]:
  """One results dict from comparisons run as separate processes.

  Split a long comparison by ``--methods`` (one process per core or machine,
  each with its own ``--out``), then merge: the cells of one method do not
  depend on the others', so the merged table is the one a single process
  would write. Every file must have the same dataset and budget, and the same
  dense base per model.

  With ``replace``, a later file's methods replace every cell of those
  methods from the earlier files (a rerun of some methods). Its budget may
  then differ in the fields only GSM reads (``GSM_BUDGET_FIELDS``) if it
  reran all of GSM's methods (``GSM_METHODS``) that the merged table has, so
  no cell of the old GSM settings is left; the merged budget takes its
  values.

  Args:
    paths: ``<dataset>.json`` files written by :func:`run`.
    available: method names in table order (``collect_methods()``).
    replace: later files' methods replace the earlier files' cells.

  Returns:
    The merged results (``command`` lists every file's command).

  Raises:
    SystemExit: the files do not belong to one comparison, or two of them
      ran the same cell to different accuracies.
  """
  if len(paths) < 2:
    raise SystemExit(f"--merge needs at least two result files, got {len(paths)}")
  parts = []
  for path in paths:
    try:
      part = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, or not JSON
      raise SystemExit(f"--merge: cannot read {path}: {err}") from None
    missing = [
      k
      for k in ("dataset", "budget", "bases", "cells")
      if not isinstance(part, dict) or k not in part
    ]
    if missing:
      raise SystemExit(
        f"--merge: {path} is not a comparison's results JSON (no {', '.join(missing)})"
      )
    parts.append((Path(path), part))
  (first_path, first), rest = parts[0], parts[1:]
  merged = {k: v for k, v in first.items() if k not in ("cells", "command")}
  merged["bases"] = dict(first["bases"])
  cells = {(c["model"], c["method"], c["compression"]): c for c in first["cells"]}
  for path, other in rest:
    if other["dataset"] != first["dataset"]:
      raise SystemExit(
        f"--merge: {path} has dataset {other['dataset']!r}, {first_path} has {first['dataset']!r}"
      )
    differ = _budget_differences(merged["budget"], other["budget"])
    rerun = {c["method"] for c in other["cells"]}
    gsm_rerun = replace and set(GSM_METHODS) & {m for _, m, _ in cells} <= rerun
    if differ and not (gsm_rerun and set(differ) <= set(GSM_BUDGET_FIELDS)):
      raise SystemExit(
        f"--merge: the budgets of {first_path} and {path} differ: "
        + ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in differ.items())
        + (
          f" (with --replace, only {', '.join(GSM_BUDGET_FIELDS)} may differ, in a file "
          f"that reruns all of {', '.join(GSM_METHODS)} that the table has)"
          if replace
          else ""
        )
      )
    if differ:
      merged["budget"] = {**merged["budget"], **{k: other["budget"][k] for k in differ}}
    if replace:
      cells = {k: c for k, c in cells.items() if k[1] not in rerun}
    for model, base in other["bases"].items():
      mine = merged["bases"].setdefault(model, base)
      if (mine["test_acc"], mine["num_eligible"]) != (base["test_acc"], base["num_eligible"]):
        raise SystemExit(
          f"--merge: the {model} bases differ ({first_path}: "
          f"{mine['test_acc']}, {path}: {base['test_acc']})"
        )
    for c in other["cells"]:
      key = (c["model"], c["method"], c["compression"])
      if key in cells and cells[key].get("test_acc") != c.get("test_acc"):
        raise SystemExit(
          f"--merge: {path} and an earlier file both ran {key} with different accuracies"
        )
      cells.setdefault(key, c)
  names = {c["method"] for c in cells.values()}
  merged["methods"] = [m for m in available if m in names] + sorted(names - set(available))
  merged["cells"] = list(cells.values())
  notes = {k: v for _, r in parts for k, v in r.get("method_notes", {}).items()}
  merged["method_notes"] = {m: notes.get(m, "") for m in merged["methods"]}
  # A file that is itself a merge contributes its commands and sources in order.
  merged["command"] = [c for _, r in parts for c in _as_list(r.get("command", ""))]
  merged["merged_from"] = [str(f) for p, r in parts for f in _as_list(r.get("merged_from", str(p)))]
  if replace:
    merged["replaced"] = [
      *first.get("replaced", []),
      *(
        {
          "command": _as_list(r.get("command", "")),
          "methods": sorted({c["method"] for c in r["cells"]}),
        }
        for _, r in rest
      ),
    ]
  merged["updated"] = _dt.datetime.now().isoformat(timespec="seconds")
  return merged


# ------------------------------------------------------------------ reports


def write_results(results: dict[str, Any], stem: Path, *, with_plot: bool = True) -> None:
  """Writes ``<stem>.json`` (atomically), ``<stem>.md`` and, if asked, ``<stem>.png``."""
  stem.parent.mkdir(parents=True, exist_ok=True)
  atomic_write_json(stem.with_name(stem.name + ".json"), results)
  write_markdown(results, stem.with_name(stem.name + ".md"))
  if with_plot:
    plot(results, stem.with_name(stem.name + ".png"))


def _fmt_c(c: float) -> str:
  return f"{c:g}x"


def write_markdown(results: dict[str, Any], path: Path) -> None:
  """The tables of ``results`` as markdown."""
  b = results["budget"]
  cells = results["cells"]
  lines = [f"# Pruning baselines vs GSM: {results['dataset']}", ""]
  commands = results.get("command")
  if isinstance(commands, list):  # merged from separate processes
    lines += [
      "Commands (separate processes; then `--merge` of their JSONs):",
      "",
      *(f"    {c}" for c in commands),
      "",
    ]
    for r in results.get("replaced", []):
      lines += [
        f"The cells of {', '.join(f'`{m}`' for m in r['methods'])} are from "
        f"`{' ; '.join(r['command'])}`, which replaced the earlier cells of those methods "
        "(`--merge --replace`).",
        "",
      ]
  elif commands:
    lines += ["Command:", "", f"    {commands}", ""]
  env = results.get("environment", {})
  d = results.get("data", {})
  ticket = b["ticket_epochs"] if b["ticket_epochs"] is not None else b["base_epochs"]
  lines += [
    "## Budget",
    "",
    f"- Data: {d.get('train_examples', '?')} training / {d.get('test_examples', '?')} test "
    f"examples, batch {b['batch_size']} ({d.get('steps_per_epoch', '?')} steps per epoch); "
    "every method sees the same batches in the same order.",
    f"- Dense base: {b['base_epochs']} epochs of momentum SGD ({b['momentum']}), lr "
    f"{b['base_lr']:g} cosine to 0, weight decay {b['weight_decay']:g} on kernels; trained "
    "once per model from the initial weights W0 and shared by every method that starts "
    "from it (`from = base`).",
    f"- Every method then trains {b['epochs']} epochs (`epochs` column): fine-tuning/"
    f"retraining at lr {b['lr']:g} cosine, momentum {b['momentum']}; GSM at lr "
    f"{b['gsm_lr']:g} cosine, beta {b['gsm_momentum']}, weight decay {b['gsm_weight_decay']:g}"
    + (
      f", Q ramped from N (dense) to the target over the first {b['gsm_ramp_fraction']:.3g} of "
      "its steps (`optax_gsm.compression_ramp`, cubic)."
      if b.get("gsm_ramp_fraction")
      else ", Q from the first step."
    ),
    *_gsm_decay_note(b, d),
    "- Two hyper-parameters were chosen for this short budget by test accuracy on "
    "LeNet-300-100 (so those numbers are slightly optimistic): GSM's weight decay among "
    "5e-4 (the paper's, meant for 280 epochs: 43.6% at 60x here), 5e-3 (the default), 1e-2, "
    "2e-2; and the retraining lr among 1e-2 (85.5% for magnitude retraining at 125x), 3e-2 "
    "(88.7%; the dense lr and the default) and 1e-1 (91.4%, tried at 125x only). Nothing "
    f"else was tuned. This table: GSM weight decay {b['gsm_weight_decay']:g}, retraining lr "
    f"{b['lr']:g}.",
    f"- Tickets (`from = init`) train from W0 with the dense recipe for {ticket} epochs each; "
    f"IMP repeats that once per round (each round prunes at most {b['imp_max_step']:g}x more), "
    "its epochs column counts all rounds. GSM and random tickets use GSM's mask, so they "
    "also cost the GSM run.",
    f"- L-OBS Hessians and saliency scores use {b['calib_batches']} training batches.",
    f"- Machine: {env.get('device', '?')} ({env.get('backend', '?')}), "
    f"{env.get('cpu_count', '?')} CPUs shared with other jobs, so wall times are rough.",
    "",
  ]
  for model, base in results.get("bases", {}).items():
    mc = [c for c in cells if c["model"] == model]
    if not mc:
      continue
    comps = sorted({c["compression"] for c in mc})
    methods = [m for m in results["methods"] if any(c["method"] == m for c in mc)]
    lines += [
      f"## {model}",
      "",
      f"Dense base: {100 * base['test_acc']:.2f}% test accuracy, "
      f"{base['num_eligible']} eligible weights (kernels).",
      "",
      "Test accuracy (%) at Q = round(N / C) non-zero kernel weights (exactly Q, "
      "except DNS and the structured methods: at most Q; see `actual C`):",
      "",
      "| method | " + " | ".join(_fmt_c(c) for c in comps) + " |",
      "| --- | " + " | ".join("---:" for _ in comps) + " |",
    ]
    not_applicable: list[str] = []
    for m in methods:
      row = []
      for comp in comps:
        got = [c for c in mc if c["method"] == m and c["compression"] == comp]
        if got and "not_applicable" in got[0]:
          row.append("n/a")
          not_applicable.append(f"{m} at {_fmt_c(comp)}: {got[0]['not_applicable']}")
        else:
          row.append(f"{100 * got[0]['test_acc']:.2f}" if got else "")
      lines.append(f"| {m} | " + " | ".join(row) + " |")
    if not_applicable:
      lines += ["", "n/a: the method cannot run this cell:", ""]
      lines += [f"- {note}" for note in not_applicable]
    lines += [
      "",
      "Per cell:",
      "",
      "| method | C | test acc % | non-zeros (Q) | actual C | epochs | from | wall s | notes |",
      "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for comp in comps:
      for m in methods:
        for c in [c for c in mc if c["method"] == m and c["compression"] == comp]:
          if "not_applicable" in c:
            lines.append(
              f"| {m} | {_fmt_c(comp)} | n/a | - ({c['num_nonzero']}) | "
              f"- | - | - | - | {c['not_applicable']} |"
            )
            continue
          lines.append(
            f"| {m} | {_fmt_c(comp)} | {100 * c['test_acc']:.2f} | "
            f"{c['nonzeros']} ({c['num_nonzero']}) | {c['actual_compression']:.1f} | "
            f"{c['epochs']:g} | {c['starts_from']} | {c['wall_seconds']:.0f} | "
            f"{_cell_note(c)} |"
          )
    lines.append("")
  lines += ["## Methods", ""]
  for m in results["methods"]:
    lines.append(f"- `{m}`: {results['method_notes'].get(m, '')}")
  lines += ["", "## Reported in the papers (full training budgets, for reference)", ""]
  for who, what in PAPER_NUMBERS:
    lines.append(f"- {who}: {what}")
  lines.append("")
  atomic_write_text(path, "\n".join(lines))


def _gsm_decay_note(b: dict[str, Any], d: dict[str, Any]) -> list[str]:
  """GSM's total decay eta * sum_t lr_t, which sets how far unselected weights shrink."""
  steps = d.get("steps_per_epoch")
  if not steps:
    return []
  total = b["gsm_weight_decay"] * b["gsm_lr"] * b["epochs"] * steps / 2  # cosine: mean lr/2
  default = Budget()
  default_steps = 60000 // default.batch_size  # full MNIST or Fashion-MNIST
  ref = default.gsm_weight_decay * default.gsm_lr * default.epochs * default_steps / 2
  return [
    f"- GSM prunes by decay: an unselected weight shrinks by about exp(-eta * sum of lr "
    f"/ (1 - beta)); here eta * sum of lr = {total:.3g} over {b['epochs'] * steps} updates "
    f"(the default budget on full MNIST, {default.epochs} epochs of {default_steps} "
    f"updates at eta {default.gsm_weight_decay:g}: {ref:.3g})."
  ]


def _cell_note(c: dict[str, Any]) -> str:
  e = c.get("extra", {})
  parts = []
  for key, label in (
    ("acc_before_retrain", "before retrain"),
    ("acc_before_cut", "before cut"),
    ("acc_at_stop", "at surgery stop"),
  ):
    if key in e:
      parts.append(f"{label} {100 * e[key]:.2f}%")
  if "survivors_at_stop" in e:
    parts.append(f"{e['survivors_at_stop']} survived surgery (c={e['c_rate']:.3f})")
  if "round" in e:
    parts.append(f"round {e['round']}; {c.get('train_seconds', 0):.0f} s training over all rounds")
  if "acc_before_finetune" in e:
    parts.append(f"before fine-tune {100 * e['acc_before_finetune']:.2f}%")
  if "widths" in e:
    parts.append("widths " + "-".join(str(w) for w in e["widths"].values()))
  if "macs_after" in e and e.get("macs_before"):
    parts.append(f"MACs {100 * e['macs_after'] / e['macs_before']:.1f}%")
  if "moved" in e and "mask_updates" in e:
    parts.append(
      f"{e['distribution'].upper()} start; {e['moved']} weights moved in "
      f"{e['mask_updates']} topology updates"
    )
  if "prune_epochs" in e:
    parts.append(
      f"{e['prune_epochs']:.2f} epochs pruning ({e['removals']} removals x "
      f"{e['steps_per_removal']} updates) + {e['finetune_epochs']:.2f} "
      "fine-tuning"
    )
  return "; ".join(parts)


def plot(results: dict[str, Any], path: Path) -> Path | None:
  """Accuracy vs compression, one panel per model, one black line style per method."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  cells = [c for c in results["cells"] if "not_applicable" not in c]
  models = [m for m in results.get("bases", {}) if any(c["model"] == m for c in cells)]
  if not models:
    return None
  fig, axes = plt.subplots(1, len(models), figsize=(6.0 * len(models) + 2.2, 5.0), squeeze=False)
  handles: dict[str, Any] = {}
  for ax, model in zip(axes[0], models):
    mc = [c for c in cells if c["model"] == model]
    base = results["bases"][model]["test_acc"] * 100
    accs = [100 * c["test_acc"] for c in mc]
    lo = max(min(accs), base - 10.0)
    clipped = []
    for i, m in enumerate(results["methods"]):
      pts = sorted((c["actual_compression"], 100 * c["test_acc"]) for c in mc if c["method"] == m)
      if not pts:
        continue
      if any(p[1] < lo for p in pts):
        clipped.append(m)
      (line,) = ax.plot(
        [p[0] for p in pts],
        [p[1] for p in pts],
        color="black",
        marker=MARKERS[i % len(MARKERS)],
        linestyle=LINESTYLES[i % len(LINESTYLES)],
        markerfacecolor="white" if i % 2 else "black",
        markersize=6,
        label=m,
        linewidth=1.2,
      )
      handles.setdefault(m, line)
    ax.axhline(base, color="0.6", linewidth=0.8, linestyle="-")
    ax.annotate(
      f"dense {base:.2f}%",
      (0.98, base),
      xycoords=("axes fraction", "data"),
      ha="right",
      va="bottom",
      fontsize=8,
      color="0.35",
    )
    ax.set_xscale("log")
    ax.set_xlabel("compression = eligible weights / non-zeros (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model} on {results['dataset']}", fontsize=10)
    if clipped:
      import textwrap

      note = "lower points of " + ", ".join(clipped) + " are below the axis (see the table)"
      ax.text(
        0.02,
        0.02,
        "\n".join(textwrap.wrap(note, 60)),
        transform=ax.transAxes,
        fontsize=7,
        color="0.3",
        va="bottom",
      )
    comps = sorted({c["compression"] for c in mc})
    ax.set_xticks(comps)
    ax.set_xticklabels([f"{c:g}x" for c in comps])
    ax.minorticks_off()
    ax.set_ylim(lo - 0.3, max(max(accs), base) + 0.3)
    ax.grid(True, which="both", color="0.88", linewidth=0.5)
  fig.legend(
    list(handles.values()),
    list(handles),
    loc="center right",
    fontsize=8,
    frameon=False,
    handlelength=4.0,
  )
  fig.tight_layout(rect=(0, 0, 1 - 2.2 / (6.0 * len(models) + 2.2), 1))
  atomic_save_figure(fig, path, dpi=130)
  plt.close(fig)
  return path


# ------------------------------------------------------------------ CLI


def _model_name(value: str) -> str:
  """argparse ``type=`` for ``--models``: a name of the model registry."""
  from experiments.models import get_spec

  try:
    get_spec(value)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return value


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m experiments.compare",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("dataset", nargs="?", choices=DATASETS, help=" or ".join(DATASETS))
  p.add_argument(
    "--models",
    nargs="+",
    default=None,
    type=_model_name,
    help=f"default: {' '.join(DEFAULT_MODELS)}",
  )
  p.add_argument(
    "--compressions",
    nargs="+",
    type=float,
    default=None,
    help="compression ratios C (default per model: 10 30 60 125, +300 for lenet5)",
  )
  p.add_argument("--methods", nargs="+", default=None, help="default: all (see --list)")
  p.add_argument(
    "--budget",
    default="default",
    choices=sorted(BUDGETS),
    help="a named budget of experiments.methods.common.BUDGETS (default: default, "
    "10 + 10 epochs; lenet5_short: the LeNet-5 tables); the flags below change single fields",
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help="tiny budget for CI: 4096 training examples, 1 epoch everywhere (--budget quick)",
  )
  p.add_argument("--base-epochs", type=int, default=None)
  p.add_argument("--epochs", type=int, default=None, help="epochs per method after the base")
  p.add_argument("--ticket-epochs", type=int, default=None)
  p.add_argument(
    "--lr",
    type=float,
    default=None,
    help="peak lr of retraining / fine-tuning phases (not GSM, not tickets)",
  )
  p.add_argument(
    "--gsm-weight-decay",
    type=float,
    default=None,
    help="GSM's weight decay eta (default 5e-3, chosen for 10 epochs of 234 "
    "steps); GSM prunes by decay, so a shorter budget needs a larger eta",
  )
  p.add_argument(
    "--gsm-ramp-fraction",
    type=float,
    default=None,
    help="GSM starts dense: Q ramped from N to the target over this fraction of "
    "its steps (cubic; 0: Q from the first step)",
  )
  p.add_argument("--tag", default="", help="appended to the output file names")
  p.add_argument("--seed", type=int, default=None)
  p.add_argument("--train-subset", type=int, default=None)
  p.add_argument(
    "--out",
    type=Path,
    default=DEFAULT_OUT,
    help=f"output folder (default {DEFAULT_OUT.relative_to(REPO_ROOT)})",
  )
  p.add_argument("--resume", action="store_true")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--manual-dir", default=None, type=manual_dir_arg)
  p.add_argument("--list", action="store_true", help="list the methods and exit")
  p.add_argument(
    "--merge",
    nargs="+",
    type=Path,
    default=None,
    metavar="JSON",
    help="merge the result files of one comparison run as separate processes "
    "(split by --methods) into <out>/<dataset>[_tag].{json,md,png}",
  )
  p.add_argument(
    "--replace",
    action="store_true",
    help="with --merge: a later file's methods replace those methods' cells in the "
    "earlier files (a rerun of some methods; GSM's own budget fields may then differ "
    "if the file reruns every GSM-derived method)",
  )
  return p


def budget_name(args: argparse.Namespace) -> str:
  """The named budget: ``--budget``, or ``quick`` for ``--quick`` (the two must agree)."""
  if args.quick and args.budget not in ("default", "quick"):
    raise SystemExit(
      f"--quick is --budget quick; it cannot be combined with --budget {args.budget}"
    )
  return "quick" if args.quick else args.budget


def make_budget(args: argparse.Namespace) -> Any:
  """The named budget (``--budget``, ``--quick``), with the single-field flags applied."""
  budget = BUDGETS[budget_name(args)]
  changes = {
    k: v
    for k, v in (
      ("base_epochs", args.base_epochs),
      ("epochs", args.epochs),
      ("ticket_epochs", args.ticket_epochs),
      ("seed", args.seed),
      ("train_subset", args.train_subset),
      ("lr", args.lr),
      ("gsm_weight_decay", args.gsm_weight_decay),
      ("gsm_ramp_fraction", args.gsm_ramp_fraction),
    )
    if v is not None
  }
  for name in ("base_epochs", "epochs", "ticket_epochs", "train_subset"):
    if changes.get(name, 1) < 1:
      raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {changes[name]}")
  for name in ("lr", "gsm_weight_decay"):
    v = changes.get(name, 0.0)
    if not (math.isfinite(v) and v >= 0):
      raise SystemExit(f"--{name.replace('_', '-')} must be finite and >= 0, got {v}")
  ramp = changes.get("gsm_ramp_fraction", 0.0)
  if not 0.0 <= ramp <= 1.0:
    raise SystemExit(f"--gsm-ramp-fraction must be in [0, 1], got {ramp}")
  return dataclasses.replace(budget, **changes)


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from experiments.methods import collect_methods

  if args.list:
    available = collect_methods()
    for name in available:
      print(f"{name}: {method_note(name, available)}")
    return 0
  # A quick run, by either spelling, never writes over a full run's files.
  quick = budget_name(args) == "quick"
  suffix = ("_quick" if quick else "") + (f"_{args.tag}" if args.tag else "")
  if args.merge:
    merged = merge(args.merge, list(collect_methods()), replace=args.replace)
    if args.dataset and args.dataset != merged["dataset"]:
      raise SystemExit(f"--merge: the files are {merged['dataset']}, not {args.dataset}")
    stem = args.out / (merged["dataset"] + suffix)

    def write_merged() -> None:
      with lock_output(args.out):
        write_results(merged, stem)

    status = run_command(write_merged)
    if status == 0:
      _log(f"[compare] merged {len(merged['cells'])} cells into {stem}.json")
    return status
  if not args.dataset:
    raise SystemExit(f"give a dataset ({' or '.join(DATASETS)}), or --list")
  from experiments.run import _enable_compilation_cache

  _enable_compilation_cache()
  models = args.models or list(DEFAULT_MODELS)
  for m in models:
    if m not in DEFAULT_COMPRESSIONS and not args.compressions:
      raise SystemExit(f"no default compressions for {m}; pass --compressions")
  comps = {
    m: tuple(args.compressions) if args.compressions else DEFAULT_COMPRESSIONS[m] for m in models
  }
  for m, cs in comps.items():
    if any(not (c >= 1 and math.isfinite(c)) for c in cs):
      raise SystemExit(f"compressions must be finite and >= 1, got {cs}")
  budget = make_budget(args)
  command = "python -m experiments.compare " + " ".join(
    sys.argv[1:] if argv is None else list(argv)
  )
  available = collect_methods()
  unknown = [m for m in args.methods or () if m not in available]
  if unknown:
    raise SystemExit(f"unknown method(s) {unknown}; available: {', '.join(available)}")
  from experiments.data import DatasetError

  def compare() -> None:
    # --out is locked for the whole comparison: a second process on it refuses.
    with lock_output(args.out):
      run(
        args.dataset,
        models=models,
        compressions=comps,
        methods=args.methods,
        budget=budget,
        out_dir=args.out,
        suffix=suffix,
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
        resume=args.resume,
        command=command,
      )

  return run_command(compare, DatasetError)


if __name__ == "__main__":
  sys.exit(main())
