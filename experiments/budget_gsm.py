"""GSM with a FLOPs budget against count-based GSM at the same FLOPs (issue #8).

Usage::

    python -m experiments.budget_gsm --base-from RUN_DIR [--config lenet5_125x]
        [--compression 125] [--epochs 40] [--overrides key=value ...]
        [--train-subset N] [--eval-subset N] [--out DIR] [--work-dir DIR]
        [--count-from RUN_DIR] [--resume] [--progress]

From the dense base model of another run (``RUN_DIR/train/checkpoints``, as
written by ``python -m experiments.run CONFIG --phase train``), two GSM trainings
run with the same schedule, the same data order and the same hyper-parameters:

(i) **count**: ``optax_gsm.gsm(num_nonzero=Q)`` with ``Q = round(N / C)``, then
    ``optax_gsm.magnitude_prune`` to Q.  Its FLOPs are the multiply-accumulates
    per image of its non-zero kernel entries (``H_out * W_out`` per conv-kernel
    entry, 1 per dense entry; :mod:`experiments.flops`).
(ii) **budget**: ``optax_gsm.gsm(budget=B, costs=FLOPs costs)`` with ``B`` the
    FLOPs of (i)'s pruned model (so it is "a count-based GSM with the same
    FLOPs"), ranking by ``|g w| / cost``, then
    ``optax_gsm.budget_prune(..., rank="magnitude")`` to ``B`` (largest ``|w|``
    first while the budget lasts; the ``|w| / cost`` cut is also reported).

Both are evaluated before and after the cut; the report has test accuracy,
non-zeros, achieved MACs per image (and the dense model's), the size of the
sparse file (``optax_gsm.save_sparse``) and the wall time of each training, as
``budget_gsm.json`` and ``budget_gsm.md`` under ``--out`` (default
``runs/budget``, git-ignored; the committed report stays in
``docs/results/budget``).  Checkpoints and the sparse files go under
``--work-dir`` (default ``runs/budget_gsm_<C>x``); ``--resume`` continues both
trainings from their latest checkpoints.  Both folders are locked while the
command runs (:func:`experiments.fileio.lock_outputs`), and ``--base-from``
(and ``--count-from``) must hold checkpoints before anything is created.

``--count-from RUN_DIR`` takes run (i) from the finished ``gsm`` phase of an
``experiments.run`` folder instead of training it again (its GSM settings must
equal this command's; it must have started from the same base model, e.g.
``--base-from`` and ``--count-from`` the same folder), which halves the cost.

The GSM schedule is the ``gsm`` phase of ``--config`` after
:data:`DEFAULT_OVERRIDES` (the LeNet-5 settings of this project's runs: 40
epochs, 1 warm-up epoch, x0.1 at 25/33/37, ``gsm_unselected_decay=1e-3``) and
then ``--overrides``; ``--compression``, ``--epochs``, ``--train-subset`` and
``--eval-subset`` are shortcuts for ``compression=``, ``gsm.epochs=``,
``data.train_subset=`` and ``data.eval_subset=``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.configs import ExperimentConfig, config_names, get_config
from experiments.fileio import (
  add_data_arguments,
  atomic_write_json,
  atomic_write_text,
  lock_outputs,
  require_run_checkpoints,
  run_command,
)
from experiments.run import _enable_compilation_cache, load_pipelines, new_model

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "runs" / "budget"
DEFAULT_OVERRIDES = (
  "gsm.epochs=40",
  "gsm.warmup_epochs=1",
  "gsm.boundaries=(25, 33, 37)",
  "gsm_unselected_decay=1e-3",
)
RUNS = ("count", "budget")


# ------------------------------------------------------------------ set-up


def build_config(args: argparse.Namespace) -> ExperimentConfig:
  """``--config`` with :data:`DEFAULT_OVERRIDES`, ``--overrides`` and the shortcuts."""
  overrides = list(DEFAULT_OVERRIDES) + list(args.overrides or [])
  if args.compression is not None:
    overrides.append(f"compression={args.compression}")
  if args.epochs is not None:
    overrides.append(f"gsm.epochs={args.epochs}")
  if args.train_subset is not None:
    overrides.append(f"data.train_subset={args.train_subset}")
  if args.eval_subset is not None:
    overrides.append(f"data.eval_subset={args.eval_subset}")
  config = get_config(args.config, overrides=overrides)
  if config.compression is None:
    raise ValueError(
      f"{args.config}: the count-based run needs a compression target; pass --compression"
    )
  return config


def restore_base(config: ExperimentConfig, base_from: Path) -> tuple[Any, dict[str, Any]]:
  """A fresh model loaded with the final base checkpoint of ``base_from``.

  Raises:
    SystemExit: no checkpoint, or the base training did not finish.
  """
  from experiments.training import restore_model_state

  ckpt = base_from / "train" / "checkpoints"
  model = new_model(config)
  try:
    meta = restore_model_state(ckpt, model)
  except FileNotFoundError:
    raise SystemExit(
      f"no base checkpoint in {ckpt}: train one with `python -m experiments.run "
      f"{config.name} --phase train --out {base_from}`"
    ) from None
  want = meta.get("config", {}).get("train", {}).get("epochs")
  if want is not None and meta["epoch"] < want:
    raise SystemExit(f"the base training in {ckpt} stopped at epoch {meta['epoch']} of {want}")
  return model, meta


# ------------------------------------------------------------------ measures


def nonzero_masks(params: Any) -> Any:
  import jax
  import numpy as np

  return jax.tree.map(lambda p: np.asarray(p) != 0, params)


def achieved_macs(costs: Any, params: Any) -> int:
  """MACs per example of the non-zero eligible entries: ``sum(cost[w != 0])``."""
  import optax_gsm

  return optax_gsm.total_cost(costs, nonzero_masks(params))


def layer_rows(costs: Any, params: Any) -> list[dict[str, Any]]:
  """Per eligible leaf: size, MACs per entry, non-zeros and their MACs."""
  import jax
  import numpy as np

  rows = []
  cost_leaves = jax.tree_util.tree_flatten_with_path(costs)[0]
  for (path, c), p in zip(cost_leaves, jax.tree.leaves(params)):
    c = np.asarray(c, np.int64)
    if not c.size or int(c.max()) == 0:
      continue  # not eligible
    nz = np.asarray(p) != 0
    rows.append(
      {
        "leaf": jax.tree_util.keystr(path),
        "size": int(c.size),
        "macs_per_entry": int(c.max()) if int(c.min()) == int(c.max()) else None,
        "dense_macs": int(c.sum()),
        "nonzeros": int(nz.sum()),
        "macs": int(c[nz].sum()),
      }
    )
  return rows


def gsm_phase_config(config: ExperimentConfig) -> dict[str, Any]:
  """What a GSM run's checkpoints depend on: ``experiments.run.phase_config``
  without the base training's settings (the base comes from ``--base-from``)."""
  from experiments.run import phase_config

  d = phase_config(config, "gsm")
  d.pop("train", None)
  return d


def load_count_run(config: ExperimentConfig, count_from: Path) -> tuple[Any, dict[str, Any]]:
  """The final model of the ``gsm`` phase of ``count_from`` and its history.

  Raises:
    SystemExit: no checkpoint, an unfinished phase, or other GSM settings.
  """
  from experiments.training import restore_model_state

  ckpt = count_from / "gsm" / "checkpoints"
  model = new_model(config)
  try:
    meta = restore_model_state(ckpt, model)
  except FileNotFoundError:
    raise SystemExit(f"--count-from: no GSM checkpoint in {ckpt}") from None
  saved, want = dict(meta.get("config", {})), gsm_phase_config(config)
  diffs = [
    k for k in sorted(set(saved) | set(want)) if k != "train" and saved.get(k) != want.get(k)
  ]
  if diffs:
    lines = [f"  {k}: checkpoint {saved.get(k)!r} != now {want.get(k)!r}" for k in diffs]
    raise SystemExit(f"--count-from {count_from}: the GSM settings differ:\n" + "\n".join(lines))
  if meta["epoch"] < config.gsm.epochs:
    raise SystemExit(
      f"--count-from: the gsm phase in {ckpt} stopped at epoch {meta['epoch']} "
      f"of {config.gsm.epochs}"
    )
  print(f"[count] the count-based GSM model of {ckpt} (epoch {meta['epoch']})", flush=True)
  return model, {
    "history": list(meta["history"]),
    "wall_seconds": float(meta.get("wall_seconds", 0.0)),
  }


def last_selection(trainer: Any) -> dict[str, float]:
  """``num_nonzero`` and ``threshold`` of GSM's state after the last step."""
  import jax
  import numpy as np

  import optax_gsm

  if trainer is None:
    return {}
  trainer.sync()
  is_state = lambda x: isinstance(x, optax_gsm.GlobalTopQState)  # noqa: E731
  for node in jax.tree.leaves(trainer.optimizer.opt_state, is_leaf=is_state):
    if is_state(node):
      return {
        "selected": int(np.asarray(node.num_nonzero[...])),
        "threshold": float(np.asarray(node.threshold[...])),
      }
  return {}


# ------------------------------------------------------------------ the runs


def train_gsm(
  name: str,
  config: ExperimentConfig,
  args: argparse.Namespace,
  pipelines: tuple[Any, Any],
  work: Path,
  target: dict[str, Any],
  **gsm_kwargs: Any,
) -> tuple[Any, dict[str, Any], Any]:
  """One GSM training from the base model; returns ``(model, fit result, trainer)``."""
  from experiments.training import Trainer, make_gsm_tx

  train, test = pipelines
  model, meta = restore_base(config, Path(args.base_from).expanduser().absolute())
  schedule = config.gsm.lr_schedule(train.steps_per_epoch)
  rule = config.gsm_rule(train.steps_per_epoch)
  if "budget" in gsm_kwargs:
    # A budget has one exact selection backend; `selection` is for Q.
    rule.pop("selection")
  tx = make_gsm_tx(schedule, **rule, **gsm_kwargs)
  trainer = Trainer(
    model,
    tx,
    lr_schedule=schedule,
    nonzero_threshold=config.nonzero_threshold,
    num_nonzero=gsm_kwargs.get("num_nonzero"),
    name=f"gsm-{name}",
  )
  print(
    f"[{name}] from the base model of {args.base_from} (epoch {meta['epoch']}); target {target}",
    flush=True,
  )
  result = trainer.fit(
    train,
    test,
    epochs=config.gsm.epochs,
    ckpt_dir=work / name / "checkpoints",
    resume=args.resume,
    seed=config.seed,
    config={**gsm_phase_config(config), "target": target},
    keep_checkpoints=config.keep_checkpoints,
    log_every=config.log_every,
    progress=args.progress,
  )
  return trainer.sync(), result, trainer


def finish(
  name: str,
  model: Any,
  pruned: Any,
  costs: Any,
  test: Any,
  work: Path,
  fit: dict[str, Any],
  trainer: Any,
) -> dict[str, Any]:
  """Evaluates before and after the cut; MACs, non-zeros, sparse file size."""
  import optax_gsm

  from experiments.training import evaluate, param_dict, set_params

  before_params = param_dict(model)
  acc_before = evaluate(model, test)
  set_params(model, pruned)
  acc_after = evaluate(model, test)
  report = optax_gsm.sparsity_report(pruned)
  path = work / name / "pruned.npz"
  path.parent.mkdir(parents=True, exist_ok=True)
  info = optax_gsm.save_sparse(path, pruned)
  history = fit["history"]
  record = {
    "test_before_cut": acc_before,
    "test_after_cut": acc_after,
    "nonzeros": report.eligible.nonzeros,
    "num_eligible": report.eligible.size,
    "macs": achieved_macs(costs, pruned),
    "macs_before_cut": achieved_macs(costs, before_params),
    "sparse_file_bytes": info.file_bytes,
    "dense_file_bytes": info.dense_file_bytes,
    "layers": layer_rows(costs, pruned),
    "last_step_selection": last_selection(trainer),
    "gsm_wall_seconds": fit["wall_seconds"],
    "epochs": len(history),
    "epoch_seconds": [h["train_seconds"] for h in history],
    "history": history,
  }
  print(
    f"[{name}] test acc {100 * acc_before['acc']:.2f}% before the cut, "
    f"{100 * acc_after['acc']:.2f}% after; {record['nonzeros']:,} non-zeros, "
    f"{record['macs']:,} MACs/image, sparse file {info.file_bytes:,} bytes",
    flush=True,
  )
  return record


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Both trainings, the cuts and the report, with ``--out`` and ``--work-dir`` locked;
  returns the results dict."""
  config = build_config(args)
  base_from = Path(args.base_from).expanduser().absolute()
  out, work = output_dirs(config, args)
  with lock_outputs(out, work):
    return _run(args, config, base_from, out, work)


def output_dirs(config: ExperimentConfig, args: argparse.Namespace) -> tuple[Path, Path]:
  """``(--out, --work-dir)``, absolute, with their defaults under ``<repo>/runs``."""
  work = (
    Path(args.work_dir).expanduser().absolute()
    if args.work_dir
    else REPO_ROOT / "runs" / f"budget_gsm_{config.compression:g}x"
  )
  return Path(args.out).expanduser().absolute(), work


def check_inputs(config: ExperimentConfig, args: argparse.Namespace) -> None:
  """Checks, before any work, that ``--base-from`` (and ``--count-from``) hold checkpoints.

  Only the folders are looked at (:func:`experiments.fileio.require_run_checkpoints`):
  a missing base is reported at once, and no output folder is created.

  Raises:
    UsageError: the flag, the folder and what is missing in it.
  """
  for flag, value, phase in (
    ("--base-from", args.base_from, "train"),
    ("--count-from", args.count_from, "gsm"),
  ):
    if value is None:
      continue
    folder = Path(value).expanduser().absolute()
    hint = (
      f"train one with `python -m experiments.run {config.name} --phase train --out {folder}`"
      if phase == "train"
      else f"run `python -m experiments.run ... --phase gsm --out {folder}`"
    )
    require_run_checkpoints(flag, value, phase, hint)


def _run(
  args: argparse.Namespace, config: ExperimentConfig, base_from: Path, out: Path, work: Path
) -> dict[str, Any]:
  from flax import nnx

  import optax_gsm

  from experiments import flops
  from experiments.run import environment
  from experiments.training import evaluate, param_dict, set_params

  out.mkdir(parents=True, exist_ok=True)
  work.mkdir(parents=True, exist_ok=True)
  t_start = time.perf_counter()

  pipelines = load_pipelines(config, args)
  train, test = pipelines
  image_shape = tuple(next(test.epoch(0)).image.shape[1:])
  base_model, base_meta = restore_base(config, base_from)
  # Costs as a plain nested dict, like param_dict(model); the transformation
  # also matches it to the nnx.State that nnx.Optimizer hands it.
  costs = nnx.to_pure_dict(flops.flops_cost_tree(base_model, (1, *image_shape)))
  dense = optax_gsm.total_cost(costs)
  n = optax_gsm.count_eligible(param_dict(base_model))
  q = config.num_nonzero(n)
  base_acc = evaluate(base_model, test)
  print(
    f"[budget_gsm] {config.model}: N={n:,} eligible weights, dense {dense:,} MACs/image; "
    f"base test acc {100 * base_acc['acc']:.2f}%",
    flush=True,
  )

  # (i) Count-based GSM at compression C.
  if args.count_from:
    model, fit = load_count_run(config, Path(args.count_from).expanduser().absolute())
    trainer = None
  else:
    model, fit, trainer = train_gsm(
      "count", config, args, pipelines, work, {"num_nonzero": q}, num_nonzero=q
    )
  pruned, _ = optax_gsm.magnitude_prune(param_dict(model), num_nonzero=q)
  count = finish("count", model, pruned, costs, test, work, fit, trainer)
  count["target"] = {"num_nonzero": q, "compression": config.compression}

  # (ii) FLOPs-budget GSM with the FLOPs of (i)'s pruned model.
  budget = count["macs"]
  model, fit, trainer = train_gsm(
    "budget", config, args, pipelines, work, {"budget": budget}, budget=budget, costs=costs
  )
  # The cut in |w| order under the budget: GSM's selection already traded
  # score against cost, and ranking by |w| / cost again would let barely
  # decayed cheap dense weights push out the trained expensive conv weights.
  trained = param_dict(model)
  pruned, _ = optax_gsm.budget_prune(trained, costs, budget, rank="magnitude")
  by_budget = finish("budget", model, pruned, costs, test, work, fit, trainer)
  by_budget["target"] = {"budget_macs": budget}
  # For the record, the |w| / cost cut (the one-shot knapsack rule).
  ratio_pruned, _ = optax_gsm.budget_prune(trained, costs, budget, rank="ratio")
  set_params(model, ratio_pruned)
  by_budget["ratio_cut"] = {
    "test": evaluate(model, test),
    "nonzeros": optax_gsm.sparsity_report(ratio_pruned).eligible.nonzeros,
    "macs": achieved_macs(costs, ratio_pruned),
  }
  if by_budget["macs"] > budget:  # budget_prune guarantees it; a broken invariant is a bug
    raise AssertionError(f"budget run has {by_budget['macs']} MACs > budget {budget}")

  results = {
    "command": "python -m experiments.budget_gsm " + " ".join(args.argv),
    "config_name": config.name,
    # The base training's settings are those of --base-from, not the config's.
    "config": {k: v for k, v in config.to_dict().items() if k != "train"},
    "base_train": base_meta.get("config", {}).get("train"),
    "base_from": str(base_from),
    "count_from": str(Path(args.count_from).expanduser().absolute()) if args.count_from else None,
    "work_dir": str(work),
    "model": config.model,
    "input_shape": list(image_shape),
    "num_eligible": n,
    "dense_macs": dense,
    "base_test": base_acc,
    "data": {
      "train_examples": train.num_examples,
      "test_examples": test.num_examples,
      "steps_per_epoch": train.steps_per_epoch,
    },
    "count": count,
    "budget": by_budget,
    "total_seconds": time.perf_counter() - t_start,
    "environment": environment(),
    "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
  }
  write_results(results, out)
  return results


# ------------------------------------------------------------------ report


def markdown(results: dict[str, Any]) -> str:
  """The report: one row per run, then MACs and non-zeros per layer."""
  dense = results["dense_macs"]
  n = results["num_eligible"]
  cfg = results["config"]
  gsm = cfg["gsm"]
  lines = [
    f"# GSM with a FLOPs budget vs count-based GSM: {results['model']}",
    "",
    "Command:",
    "",
    f"    {results['command']}",
    "",
    f"- Base model: `{results['base_from']}`, dense test accuracy "
    f"{100 * results['base_test']['acc']:.2f}%; N = {n:,} eligible weights; "
    f"{dense:,} MACs per image in the eligible kernels (input {tuple(results['input_shape'])}).",
    f"- Both GSM runs: {gsm['epochs']} epochs from that base, lr {gsm['base_lr']:g} "
    f"(warm-up {gsm['warmup_epochs']} epochs, x{gsm['decay']:g} at {tuple(gsm['boundaries'])}), "
    f"beta {gsm['momentum']:g}, weight decay {gsm['weight_decay']:g}, unselected decay "
    f"{cfg['gsm_unselected_decay']}; {results['data']['train_examples']:,} training / "
    f"{results['data']['test_examples']:,} test images, the same batches in the same order.",
    f"- count: `gsm(num_nonzero=Q)`, Q = round(N / {cfg['compression']:g}) = "
    f"{results['count']['target']['num_nonzero']:,}, then `magnitude_prune` to Q"
    + (f" (the gsm phase of `{results['count_from']}`)." if results.get("count_from") else "."),
    f"- budget: `gsm(budget=B, costs=FLOPs costs)` ranking by |g w| / MACs, B = the count run's "
    f"MACs after its cut = {results['budget']['target']['budget_macs']:,}, then "
    f"`budget_prune(..., rank=\"magnitude\")` to B (the longest prefix of the |w| order within B).",
    "- MACs: multiply-accumulates per image of the non-zero kernel entries (H_out x W_out per "
    "conv-kernel entry, 1 per dense entry; biases not counted).",
    "",
    "| run | non-zeros | MACs / image | dense / MACs | sparse file (bytes) | "
    "test acc before cut | test acc after cut | GSM wall time |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for name in RUNS:
    r = results[name]
    lines.append(
      f"| {name} | {r['nonzeros']:,} | {r['macs']:,} | {dense / max(r['macs'], 1):.1f}x | "
      f"{r['sparse_file_bytes']:,} | {100 * r['test_before_cut']['acc']:.2f}% | "
      f"{100 * r['test_after_cut']['acc']:.2f}% | {r['gsm_wall_seconds']:.0f} s |"
    )
  ratio = results["budget"].get("ratio_cut")
  if ratio:
    lines += [
      "",
      f"The budget run cut in |w| / MACs order instead (`rank=\"ratio\"`, the one-shot knapsack "
      f"rule): {100 * ratio['test']['acc']:.2f}% with {ratio['nonzeros']:,} non-zeros and "
      f"{ratio['macs']:,} MACs; dividing by the cost again lets barely decayed dense weights push "
      "out the trained conv weights.",
    ]
  lines += [
    "",
    "Per layer after the cut (non-zeros / MACs per image):",
    "",
    "| leaf | size | MACs per entry | dense MACs | count non-zeros | count MACs | "
    "budget non-zeros | budget MACs |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for a, b in zip(results["count"]["layers"], results["budget"]["layers"]):
    per = "-" if a["macs_per_entry"] is None else f"{a['macs_per_entry']:,}"
    lines.append(
      f"| `{a['leaf']}` | {a['size']:,} | {per} | {a['dense_macs']:,} | {a['nonzeros']:,} | "
      f"{a['macs']:,} | {b['nonzeros']:,} | {b['macs']:,} |"
    )
  env = results["environment"]
  lines += [
    "",
    f"Machine: {env['backend']} ({env['device']}), {env['cpu_count']} CPUs; "
    f"total {results['total_seconds']:.0f} s.",
    "",
  ]
  return "\n".join(lines)


def write_results(results: dict[str, Any], out: Path) -> None:
  atomic_write_json(out / "budget_gsm.json", results)
  atomic_write_text(out / "budget_gsm.md", markdown(results))
  print(f"[budget_gsm] wrote {out / 'budget_gsm.json'} and {out / 'budget_gsm.md'}", flush=True)


# ------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.budget_gsm",
    description="GSM with a FLOPs budget against count-based GSM at the same FLOPs, from one base model.",
  )
  parser.add_argument(
    "--base-from",
    required=True,
    metavar="DIR",
    help="run folder whose train/checkpoints holds the base model",
  )
  parser.add_argument(
    "--config",
    default="lenet5_125x",
    choices=config_names(),
    metavar="CONFIG",
    help="experiment configuration (default lenet5_125x; one of " + ", ".join(config_names()) + ")",
  )
  parser.add_argument(
    "--compression",
    type=float,
    default=None,
    help="C of the count-based run (default: the config's, 125 for lenet5_125x)",
  )
  parser.add_argument(
    "--epochs", type=int, default=None, help="GSM epochs of each run (default 40)"
  )
  parser.add_argument(
    "--overrides",
    nargs="*",
    default=[],
    metavar="KEY=VALUE",
    help="config overrides after the defaults, e.g. gsm.base_lr=0.02",
  )
  parser.add_argument(
    "--train-subset", type=int, default=None, help="train on the first N images only"
  )
  parser.add_argument(
    "--eval-subset", type=int, default=None, help="evaluate on the first N images only"
  )
  parser.add_argument(
    "--out",
    default=str(DEFAULT_OUT),
    help=f"report folder (default {DEFAULT_OUT.relative_to(REPO_ROOT)})",
  )
  parser.add_argument(
    "--work-dir",
    default=None,
    help="checkpoints and sparse files (default <repo>/runs/budget_gsm_<C>x)",
  )
  parser.add_argument(
    "--count-from",
    default=None,
    metavar="DIR",
    help="take the count-based run from DIR/gsm/checkpoints (an experiments.run "
    "folder with the same GSM settings and base) instead of training it",
  )
  parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoints")
  add_data_arguments(parser)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  args.argv = argv
  try:
    config = build_config(args)
  except ValueError as e:
    parser.error(str(e))
  # Before any work, and before an output folder exists.
  status = run_command(lambda: check_inputs(config, args))
  if status:
    return status
  _enable_compilation_cache()
  from experiments.data import DatasetError
  from experiments.training import CheckpointMismatchError

  return run_command(lambda: run(args), FileExistsError, DatasetError, CheckpointMismatchError)


if __name__ == "__main__":
  sys.exit(main())
