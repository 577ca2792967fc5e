"""Lottery tickets from a finished run: the GSM rebuttal's Table 4.

Usage::

    python -m experiments.lottery RUN_DIR [--epochs N] [--tickets gsm magnitude random]
        [--out DIR] [--base-from DIR] [--data-dir DIR] [--manual-dir DIR] [--no-download]
        [--no-verify-init] [--progress | --no-progress]

``RUN_DIR`` is an output folder of ``python -m experiments.run`` whose ``train``
and ``gsm`` phases are complete.  The command

1. rebuilds the run's configuration from its ``results.json`` (config name,
   ``--quick``, overrides) and refuses to go on unless it equals the stored one
   and the configurations stored in the checkpoints;
2. rebuilds the initial weights W0 with the run's own constructor and seed
   (:meth:`experiments.run.Run.new_model`) and checks that they are the run's:
   the per-epoch checkpoints keep only the last few epochs, so W0 itself is not
   on disk; instead one epoch of dense training from the rebuilt W0 with the
   run's recipe and data order must reproduce the training loss and test
   accuracy the base checkpoint recorded for its first epoch (W0 of another
   seed changes that loss by several percent; see ``--no-verify-init``);
3. takes two masks of exactly Q eligible weights, Q being the run's target:
   GSM's, the Q largest |w| of the GSM-trained weights (``magnitude_prune``, the
   cut of the run's prune phase), and the magnitude mask, the Q largest |w| of
   the dense base that GSM started from; optionally a random mask with GSM's
   per-layer counts (Frankle and Carbin's control);
4. applies each mask to W0 and trains it with the mask fixed
   (:func:`experiments.methods.lottery.train_ticket`) with the dense base's
   recipe: its momentum, weight decay and learning-rate schedule (warm-up and
   step decay, in epochs from the start) for ``--epochs`` epochs (default: the
   base's), every ticket on the same batches in the same order as the base;
5. checks after every epoch that exactly Q eligible weights are non-zero, all
   inside the mask, and records the test accuracy.

Outputs (``--out``, default ``runs/lottery/<RUN_DIR name>/``, git-ignored; the
committed tables stay in ``docs/results/lottery``), written atomically
after every ticket, the folder locked while the command runs::

    lottery.json   masks, W0 check, per-epoch history of every ticket, timings
    lottery.md     the table next to the paper's numbers
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.fileio import (
  add_data_arguments,
  atomic_write_json,
  atomic_write_text,
  lock_output,
  run_command,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "runs" / "lottery"
TICKETS = ("gsm", "magnitude", "random")
TICKET_LABELS = {
  "gsm": "GSM mask",
  "magnitude": "magnitude mask (dense base)",
  "random": "random mask, GSM's per-layer counts",
}

# The GSM authors' rebuttal, Table 4: test accuracy (%) of tickets trained from
# W0 with the GSM mask and with the magnitude mask.
PAPER_TABLE4: dict[tuple[str, int], dict[str, float]] = {
  ("lenet_300_100", 60): {"gsm": 98.22, "magnitude": 97.39},
  ("lenet5", 125): {"gsm": 99.04, "magnitude": 97.60},
  ("lenet5", 300): {"gsm": 98.88, "magnitude": 11.35},
}

# W0 check tolerances.  Measured on lenet300_60x_ud1e-3: the rebuilt W0 reproduces
# the recorded epoch-1 training loss to a relative 1e-8 and the test accuracy
# exactly, while W0 of seed 1 or 2 moves the loss by 3.6% or 7.2% (the accuracy
# only by 0.07 or 0.18 points, so the loss is the discriminating check).
INIT_LOSS_RTOL = 1e-3
INIT_ACC_ATOL = 2e-3


def _log(msg: str) -> None:
  print(msg, flush=True)


# ------------------------------------------------------------------ the run


def config_diffs(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Keys of ``saved`` whose value ``current`` does not reproduce.

  Keys only in ``current`` are not differences: a field added to the
  configurations after the run was made has its default, which a run made
  before could not have stored.
  """
  missing = object()
  return sorted(k for k in saved if current.get(k, missing) != saved[k])


def load_run(run_dir: Path, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
  """The :class:`experiments.run.Run` of ``run_dir``, with its configuration rebuilt.

  Raises:
    SystemExit: no ``results.json``, or the configuration rebuilt from its
      name and overrides differs from the stored one.
  """
  from experiments.configs import get_config
  from experiments.run import Run, build_parser

  path = run_dir / "results.json"
  if not path.exists():
    raise SystemExit(
      f"{path} does not exist: RUN_DIR must be an output folder of `python -m experiments.run`"
    )
  results = json.loads(path.read_text())
  name = results.get("config_name")
  config = get_config(
    name, quick=bool(results.get("quick")), overrides=list(results.get("overrides") or [])
  )
  diffs = config_diffs(results.get("config") or {}, config.to_dict())
  if diffs or not results.get("config"):
    raise SystemExit(
      f"{path}: the configuration rebuilt from {name!r} and overrides "
      f"{results.get('overrides')} differs from the stored one in {diffs}"
    )
  # The base GSM started from: the run's --base-from as results.json recorded
  # it (each invocation of the run rewrites it), unless given here.
  base_from = args.base_from or results.get("base_from") or str(run_dir)
  # The run's own parser, so that every option Run reads has its default.
  argv = [name, "--out", str(run_dir), "--base-from", base_from]
  for flag, value in (("--data-dir", args.data_dir), ("--manual-dir", args.manual_dir)):
    if value:
      argv += [flag, value]
  if args.no_download:
    argv.append("--no-download")
  run_args = build_parser().parse_args(argv)
  return Run(config, run_args), results


def restore_phase(run: Any, phase: str, ckpt_dir: Path) -> tuple[Any, dict[str, Any]]:
  """A model holding the final weights of ``phase``, and the checkpoint's meta.

  Refuses an unfinished phase (``Run._require_complete``) and a checkpoint
  written with another configuration or data seed than the run's.
  """
  from experiments.run import phase_config

  model = run.new_model()
  meta = run._require_complete(ckpt_dir, phase, model)
  diffs = config_diffs(meta.get("config") or {}, phase_config(run.config, phase))
  if diffs:
    raise SystemExit(
      f"{ckpt_dir} was written with another configuration than the run's "
      f"results.json: {diffs} differ"
    )
  seed = meta.get("rng", {}).get("data_seed")
  if seed != run.config.seed:
    raise SystemExit(
      f"{ckpt_dir} was trained with data seed {seed}, the run's config has seed {run.config.seed}"
    )
  return model, meta


def verify_init(ctx: Any, config: Any, base_meta: dict[str, Any]) -> dict[str, Any]:
  """Trains W0 densely for one epoch with the run's recipe and compares with the base.

  The base checkpoint's history starts with the mean training loss and the
  test accuracy after epoch 1 of the run's base training from its W0, on the
  same batches.  Both depend on every initial weight, so matching them (to
  float32 summation order: the run trained through ``nnx.Optimizer``, this
  through a pure jitted step) shows that ``ctx.init_params`` is the run's W0.

  Returns:
    The record stored as ``init_check`` in ``lottery.json``.
  """
  from experiments.methods import common

  first = base_meta["history"][0]
  schedule = config.train.lr_schedule(ctx.steps_per_epoch)
  tx = common.sgd(schedule, ctx.budget)
  out = common.train(ctx, ctx.init_params, tx, 1, name="W0 check, dense epoch 1")
  acc = common.evaluate(ctx, out.params)
  loss_rel = abs(out.losses[0] - first["train_loss"]) / abs(first["train_loss"])
  acc_diff = abs(acc - first["test_acc"])
  return {
    "recorded": {"train_loss": first["train_loss"], "test_acc": first["test_acc"]},
    "rebuilt": {"train_loss": out.losses[0], "test_acc": acc},
    "train_loss_rel_diff": loss_rel,
    "test_acc_abs_diff": acc_diff,
    "tolerances": {"train_loss_rtol": INIT_LOSS_RTOL, "test_acc_atol": INIT_ACC_ATOL},
    "ok": bool(loss_rel <= INIT_LOSS_RTOL and acc_diff <= INIT_ACC_ATOL),
    "seconds": out.seconds,
  }


# ------------------------------------------------------------------ masks


def eligible_items(tree: Any, like: Any) -> list[tuple[str, Any]]:
  """``(path, leaf)`` of ``tree``'s leaves that are eligible in ``like``, in tree order.

  Eligibility (the kernels) is decided on the parameters ``like``: the default
  rule looks at float dtypes, so a bool mask alone would have no eligible leaf.
  """
  import jax

  import optax_gsm

  flags = jax.tree.leaves(optax_gsm.default_where(like))
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if len(leaves) != len(flags):
    raise ValueError(f"tree has {len(leaves)} leaves, the parameters {len(flags)}")
  return [(jax.tree_util.keystr(p), v) for (p, v), f in zip(leaves, flags) if f]


def mask_counts(masks: Any, like: Any) -> dict[str, int]:
  """Kept entries per eligible leaf."""
  import numpy as np

  return {path: int(np.sum(np.asarray(m))) for path, m in eligible_items(masks, like)}


def mask_overlap(a: Any, b: Any, like: Any) -> int:
  """Eligible entries kept by both masks."""
  import numpy as np

  return sum(
    int(np.sum(np.asarray(x) & np.asarray(y)))
    for (_, x), (_, y) in zip(eligible_items(a, like), eligible_items(b, like))
  )


def pruned_model_mismatch(run_dir: Path, masks: Any, like: Any) -> int | None:
  """Entries where the saved pruned GSM model's non-zero pattern differs from ``masks``.

  ``None`` when the run has no ``prune/pruned_model``.  0 shows that the GSM
  mask here is the cut the run's prune phase made.
  """
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  path = (run_dir / "prune" / "pruned_model").absolute()
  if not path.is_dir():
    return None
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(path)
  flat = {
    jax.tree_util.keystr(p): np.asarray(v)
    for p, v in jax.tree_util.tree_flatten_with_path(state)[0]
  }
  out = 0
  for key, m in eligible_items(masks, like):
    out += int(np.sum((flat[key] != 0) != np.asarray(m)))
  return out


# ------------------------------------------------------------------ tickets


def run_ticket(
  ctx: Any, kind: str, masks: Any, *, epochs: int, schedule: Any, progress: bool
) -> dict[str, Any]:
  """Trains one ticket (``masks`` applied to W0, mask fixed) and records it.

  After every epoch the eligible non-zeros are counted: exactly
  ``ctx.num_nonzero``, none outside the mask, or the run stops with an error.
  """
  import numpy as np

  from experiments.methods import common
  from experiments.methods.lottery import train_ticket
  from optax_gsm import baselines

  q = ctx.num_nonzero
  like = ctx.init_params
  outside_masks = [~np.asarray(m) for _, m in eligible_items(masks, like)]
  if sum(int(np.sum(~o)) for o in outside_masks) != q:
    raise ValueError(
      f"the {kind} mask keeps {sum(int(np.sum(~o)) for o in outside_masks)} "
      f"eligible weights, not Q={q}"
    )

  def check(epoch: int, params: Any) -> dict[str, Any]:
    nz = common.count_nonzero(params)
    outside = sum(
      int(np.count_nonzero(np.asarray(p)[o]))
      for (_, p), o in zip(eligible_items(params, like), outside_masks)
    )
    if nz != q or outside:
      raise RuntimeError(
        f"{kind} ticket after epoch {epoch}: {nz} non-zero eligible "
        f"weights ({outside} outside the mask), expected exactly {q}"
      )
    acc = common.evaluate(ctx, params)
    return {"epoch": epoch, "test_acc": acc, "nonzeros": nz}

  t0 = time.perf_counter()
  history = [check(0, baselines.rewind(ctx.init_params, masks))]

  def on_epoch(epoch: int, params: Any) -> None:
    history.append(check(epoch, params))
    _log(
      f"  [{kind} ticket] epoch {epoch}/{epochs}: test acc "
      f"{100 * history[-1]['test_acc']:.2f}%, {history[-1]['nonzeros']} non-zeros"
    )

  out = train_ticket(
    ctx,
    masks,
    name=f"{kind} ticket",
    epochs=epochs,
    schedule=schedule,
    on_epoch=on_epoch,
    progress=progress,
  )
  for h, loss in zip(history[1:], out.losses):
    h["train_loss"] = loss
  final = history[-1]
  return {
    "ticket": kind,
    "label": TICKET_LABELS[kind],
    "test_acc": final["test_acc"],
    "nonzeros": final["nonzeros"],
    "num_nonzero": q,
    "epochs": out.epochs,
    "per_layer": mask_counts(masks, like),
    "history": history,
    "train_seconds": out.seconds,
    "wall_seconds": time.perf_counter() - t0,
  }


# ------------------------------------------------------------------ report


def write_markdown(record: dict[str, Any], path: Path) -> None:
  """``lottery.md``: the tickets next to the paper's Table 4 and the run's own numbers."""
  run = record["run"]
  paper = record.get("paper") or {}
  q, n = run["num_nonzero"], run["num_eligible"]
  lines = [
    f"# Lottery tickets: {run['name']} ({run['model']}, {run['target_label']})",
    "",
    "Command:",
    "",
    f"    {record['command']}",
    "",
  ]
  lines += [
    f"Each ticket is a mask of exactly Q = {q} of N = {n} eligible weights "
    f"({n / q:.1f}x) applied to the run's initial weights W0 and trained with the mask "
    f"fixed for {record['recipe']['epochs']} epochs with the dense base's recipe "
    f"(momentum {record['recipe']['momentum']}, weight decay "
    f"{record['recipe']['weight_decay']:g}, lr {record['recipe']['base_lr']:g} with "
    f"{record['recipe']['warmup_epochs']} warm-up epochs and x{record['recipe']['decay']:g} "
    f"at epochs {list(record['recipe']['boundaries'])}), on the base's batches in the "
    "base's order.",
    "",
    "| ticket (mask on W0) | test acc % | non-zeros | paper (Table 4) % | "
    "train + per-epoch eval s |",
    "| --- | ---: | ---: | ---: | ---: |",
  ]
  for t in record["tickets"]:
    ref = paper.get(t["ticket"])
    lines.append(
      f"| {t['label']} | {100 * t['test_acc']:.2f} | {t['nonzeros']} | "
      f"{'' if ref is None else f'{ref:.2f}'} | {t['train_seconds']:.0f} |"
    )
  ref = record["reference"]

  def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"

  lines += [
    "",
    "The run itself (from its results.json):",
    "",
    f"- dense base: {pct(ref.get('base_test_acc'))}; cut to Q by magnitude without "
    f"retraining: {pct(ref.get('base_test_acc_after_cut'))}",
    f"- GSM: {pct(ref.get('gsm_test_acc_before_cut'))} before the cut, "
    f"{pct(ref.get('gsm_test_acc_after_cut'))} after",
    "",
    "Masks:",
    "",
    f"- GSM and magnitude masks share {record['masks']['overlap_gsm_magnitude']} of the "
    f"{q} kept weights ({100 * record['masks']['overlap_gsm_magnitude'] / q:.1f}%).",
  ]
  mism = record["masks"].get("gsm_vs_pruned_model_mismatch")
  if mism is not None:
    lines.append(f"- the GSM mask differs from the run's saved pruned model in {mism} entries.")
  layers = list(record["masks"]["per_layer"]["gsm"])
  lines += [
    "",
    "| kept per layer | " + " | ".join(layers) + " |",
    "| --- | " + " | ".join("---:" for _ in layers) + " |",
  ]
  for kind, counts in record["masks"]["per_layer"].items():
    lines.append(f"| {kind} | " + " | ".join(str(counts[k]) for k in layers) + " |")
  check = record.get("init_check")
  lines += ["", "W0 check:", ""]
  if check is None:
    lines.append(
      "- skipped (`--no-verify-init`): W0 rebuilt from the run's config and "
      "seed, not compared with the run."
    )
  else:
    lines.append(
      f"- one dense epoch from the rebuilt W0 with the run's recipe: training loss "
      f"{check['rebuilt']['train_loss']:.6f} vs {check['recorded']['train_loss']:.6f} "
      f"recorded by the run (relative difference {check['train_loss_rel_diff']:.1e}), "
      f"test accuracy {pct(check['rebuilt']['test_acc'])} vs "
      f"{pct(check['recorded']['test_acc'])}."
    )
  env = record.get("environment", {})
  lines += [
    "",
    f"Wall time {record.get('wall_seconds', 0):.0f} s on {env.get('device', '?')} "
    f"({env.get('cpu_count', '?')} CPUs, shared with other jobs).",
    "",
  ]
  atomic_write_text(path, "\n".join(lines))


# ------------------------------------------------------------------ main


def lottery(args: argparse.Namespace, command: str) -> dict[str, Any]:
  """Runs the tickets of ``args.run_dir`` and writes the outputs; returns the record."""
  t_start = time.perf_counter()
  run_dir = Path(args.run_dir).expanduser().absolute()
  run, results = load_run(run_dir, args)
  out_dir = output_dir(args)
  show = args.progress if args.progress is not None else sys.stderr.isatty()

  gsm_model, gsm_meta = restore_phase(run, "gsm", run.out / "gsm" / "checkpoints")
  base_model, base_meta = restore_phase(run, "train", run.base_dir / "train" / "checkpoints")
  # The inputs are there: hold the output folder for the rest of the command.
  with lock_output(out_dir):
    return _tickets(
      args,
      command,
      t_start,
      run_dir,
      run,
      results,
      out_dir,
      show,
      gsm_model,
      gsm_meta,
      base_model,
      base_meta,
    )


def output_dir(args: argparse.Namespace) -> Path:
  """``--out``, or ``<repo>/runs/lottery/<RUN_DIR name>`` (git-ignored) by default."""
  run_dir = Path(args.run_dir).expanduser().absolute()
  return Path(args.out).expanduser().absolute() if args.out else DEFAULT_OUT / run_dir.name


def _tickets(
  args: argparse.Namespace,
  command: str,
  t_start: float,
  run_dir: Path,
  run: Any,
  results: dict[str, Any],
  out_dir: Path,
  show: bool,
  gsm_model: Any,
  gsm_meta: dict[str, Any],
  base_model: Any,
  base_meta: dict[str, Any],
) -> dict[str, Any]:
  import optax_gsm

  from experiments.methods import common
  from experiments.methods.lottery import random_masks
  from experiments.run import environment
  from experiments.training import param_dict

  config = run.config
  # W0: the run's constructor with the run's seed (Run.new_model), untrained.
  init_params = common.to_numpy(param_dict(run.new_model()))
  gsm_params = common.to_numpy(param_dict(gsm_model))
  base_params = common.to_numpy(param_dict(base_model))

  n, q = run.num_eligible(), run.num_nonzero()
  epochs = int(args.epochs) if args.epochs is not None else config.train.epochs
  train, test = run.pipelines()
  budget = common.Budget(
    base_epochs=config.train.epochs,
    epochs=epochs,
    ticket_epochs=epochs,
    batch_size=config.data.batch_size,
    eval_batch_size=config.data.eval_batch_size,
    base_lr=config.train.base_lr,
    lr=config.train.base_lr,
    momentum=config.train.momentum,
    weight_decay=config.train.weight_decay,
    train_subset=config.data.train_subset,
    eval_subset=config.data.eval_subset,
    seed=config.seed,
  )
  module = run.new_model()
  ctx = common.Context(
    model=config.model,
    dataset=config.data.name,
    compression=n / q,
    num_nonzero=q,
    num_eligible=n,
    budget=budget,
    module=module,
    apply=common.make_apply(module),
    init_params=init_params,
    base_params=base_params,
    base_acc=float(results.get("summary", {}).get("base_test_acc") or float("nan")),
    train=train,
    test=test,
    cache_dir=out_dir,
    log=_log,
  )

  record: dict[str, Any] = {
    "command": command,
    "run": {
      "dir": str(run_dir),
      "name": run_dir.name,
      "config_name": config.name,
      "overrides": results.get("overrides", []),
      "quick": results.get("quick"),
      "model": config.model,
      "dataset": config.data.name,
      "seed": config.seed,
      "num_eligible": n,
      "num_nonzero": q,
      "compression": n / q,
      "target_label": config.target_label,
      "gsm_checkpoint": {"dir": str(run.out / "gsm" / "checkpoints"), "epoch": gsm_meta["epoch"]},
      "base_checkpoint": {
        "dir": str(run.base_dir / "train" / "checkpoints"),
        "epoch": base_meta["epoch"],
      },
    },
    "recipe": {
      "epochs": epochs,
      "base_epochs": config.train.epochs,
      "base_lr": config.train.base_lr,
      "warmup_epochs": config.train.warmup_epochs,
      "boundaries": list(config.train.boundaries),
      "decay": config.train.decay,
      "momentum": config.train.momentum,
      "weight_decay": config.train.weight_decay,
      "batch_size": config.data.batch_size,
      "steps_per_epoch": ctx.steps_per_epoch,
      "note": "the base's lr schedule, boundaries in epochs from the start; "
      "every ticket sees the base's batches of epochs 1..epochs",
    },
    "reference": {
      k: results.get("summary", {}).get(k)
      for k in (
        "base_test_acc",
        "base_test_acc_after_cut",
        "gsm_test_acc_before_cut",
        "gsm_test_acc_after_cut",
      )
    },
    "paper": (
      PAPER_TABLE4.get((config.model, int(config.compression)))
      if config.compression is not None
      else None
    ),
    "tickets": [],
    "environment": environment(),
    "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
  }

  def save() -> None:
    record["wall_seconds"] = time.perf_counter() - t_start
    record["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(out_dir / "lottery.json", record)
    write_markdown(record, out_dir / "lottery.md")

  _log(
    f"[lottery] {run_dir.name}: {config.model}, N={n:,}, Q={q:,} ({n / q:.1f}x); "
    f"tickets {', '.join(args.tickets)}, {epochs} epochs each; output {out_dir}"
  )
  if args.verify_init:
    check = verify_init(ctx, config, base_meta)
    record["init_check"] = check
    _log(
      f"[lottery] W0 check: epoch-1 training loss {check['rebuilt']['train_loss']:.6f} "
      f"(run: {check['recorded']['train_loss']:.6f}), test acc "
      f"{100 * check['rebuilt']['test_acc']:.2f}% (run: "
      f"{100 * check['recorded']['test_acc']:.2f}%)"
    )
    if not check["ok"]:
      save()
      raise SystemExit(
        "the rebuilt initial weights do not reproduce the run's first "
        "epoch: not the run's W0 (see init_check in lottery.json)"
      )
  else:
    record["init_check"] = None

  # The cut of the run's prune phase: the Q largest |w| of the GSM-trained
  # weights; and the same cut of the dense base GSM started from.
  masks = {
    "gsm": common.to_numpy(optax_gsm.magnitude_prune(gsm_params, q)[1]),
    "magnitude": common.to_numpy(optax_gsm.magnitude_prune(base_params, q)[1]),
  }
  if "random" in args.tickets:
    masks["random"] = random_masks(masks["gsm"], config.seed)
  record["masks"] = {
    "per_layer": {k: mask_counts(m, init_params) for k, m in masks.items()},
    "overlap_gsm_magnitude": mask_overlap(masks["gsm"], masks["magnitude"], init_params),
    "gsm_vs_pruned_model_mismatch": pruned_model_mismatch(run_dir, masks["gsm"], init_params),
    "random_seed": config.seed if "random" in masks else None,
  }
  stored = results.get("phases", {}).get("prune", {}).get("kept_overlap_with_base")
  if stored is not None:
    record["masks"]["run_kept_overlap_with_base"] = stored
  save()

  schedule = config.train.lr_schedule(ctx.steps_per_epoch)
  for kind in args.tickets:
    _log(f"[lottery] {TICKET_LABELS[kind]} on W0: training {epochs} epochs")
    got = run_ticket(ctx, kind, masks[kind], epochs=epochs, schedule=schedule, progress=show)
    record["tickets"].append(got)
    _log(
      f"[lottery] {kind} ticket: test acc {100 * got['test_acc']:.2f}% with "
      f"{got['nonzeros']} non-zeros ({got['wall_seconds']:.0f} s)"
    )
    save()
  save()
  _log(
    f"[lottery] wrote {out_dir / 'lottery.json'} and {out_dir / 'lottery.md'} "
    f"({record['wall_seconds']:.0f} s)"
  )
  return record


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m experiments.lottery",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("run_dir", help="output folder of `python -m experiments.run`")
  p.add_argument(
    "--epochs", type=int, default=None, help="epochs per ticket (default: the run's train.epochs)"
  )
  p.add_argument(
    "--tickets",
    nargs="+",
    choices=TICKETS,
    default=list(TICKETS),
    help="which masks to train from W0 (default: all)",
  )
  p.add_argument("--out", default=None, help="output folder (default runs/lottery/<run name>)")
  p.add_argument(
    "--base-from",
    default=None,
    metavar="DIR",
    help="run folder holding the dense base GSM started from (default: the "
    "run's --base-from as recorded in its results.json)",
  )
  p.add_argument(
    "--verify-init",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="check W0 against the run's first base epoch (one extra epoch)",
  )
  add_data_arguments(p)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.epochs is not None and args.epochs < 1:
    raise SystemExit("--epochs must be >= 1")
  # Keep the order given, without repeats.
  args.tickets = list(dict.fromkeys(args.tickets))
  argv_list = list(sys.argv[1:] if argv is None else argv)
  command = "python -m experiments.lottery " + " ".join(argv_list)
  from experiments.run import _enable_compilation_cache

  _enable_compilation_cache()
  from experiments.data import DatasetError

  return run_command(lambda: lottery(args, command), DatasetError)


if __name__ == "__main__":
  sys.exit(main())
