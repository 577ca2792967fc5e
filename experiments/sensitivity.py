"""Layer sensitivity of a trained run: does GSM keep more weights where pruning hurts?

Usage::

    python -m experiments.sensitivity RUN_DIR [--ratios 0.5 0.7 0.9]
        [--eval-subset N] [--selection-epochs E | --selection-steps S]
        [--out DIR] [--base-from DIR] [--manual-dir DIR] [--data-dir DIR]

``RUN_DIR`` is an output folder of ``python -m experiments.run``.  The command
measures the three parts of :func:`optax_gsm.layer_sensitivity` for its model:

(a) the ground truth: on the dense base model (``train/checkpoints``), each
    eligible layer alone is magnitude-pruned at each ratio and restored; the
    drop in test accuracy is recorded;
(b1) GSM's final choice: the per-layer non-zero ratio of the GSM-trained model
    (``gsm/checkpoints``) after the magnitude cut to the run's Q.  Skipped, with
    a note, while the ``gsm`` phase is missing or unfinished;
(b2) GSM's early choice, which needs no GSM run: a short GSM run from the base
    (default one epoch, with the run's GSM hyper-parameters and data order)
    that counts how often each weight is in the global top-Q;
(c) Spearman's rho between the mean drop per layer and each signal, and
    between the drop at each ratio and each signal.

Outputs (default ``runs/sensitivity/<config name>/``, git-ignored; the folder is
locked while the command runs):
``sensitivity.json`` (``SensitivityResult.to_dict()`` plus metadata),
``sensitivity.md`` (the table) and ``sensitivity.png`` (the figure of
:func:`experiments.sensitivity_plot.plot_sensitivity`).  Nothing is written into
``RUN_DIR``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from experiments.fileio import (
  add_data_arguments,
  atomic_save_figure,
  atomic_write_json,
  atomic_write_text,
  lock_output,
  run_command,
)
from experiments.run import REPO_ROOT, Run, environment

DEFAULT_RATIOS = (0.5, 0.7, 0.9)


class SensitivityError(RuntimeError):
  """A user-fixable problem with the inputs; the message says what to run."""


# --------------------------------------------------------------- the run folder


def rerun_command(results: dict[str, Any], run_dir: Path, phase: str) -> str:
  """The ``experiments.run`` command line that (re)creates one phase of ``run_dir``.

  Args:
    results: the run's ``results.json`` (config name, ``--quick``, overrides).
    run_dir: the run folder (``--out``).
    phase: ``"train"`` or ``"gsm"``.

  Returns:
    A shell-quoted command line.
  """
  parts = ["python", "-m", "experiments.run", str(results.get("config_name", "CONFIG"))]
  if results.get("quick"):
    parts.append("--quick")
  parts += ["--phase", phase, "--out", str(run_dir)]
  base_from = results.get("base_from")
  if phase == "gsm" and base_from and Path(base_from) != run_dir:
    parts += ["--base-from", str(base_from)]
  if results.get("overrides"):
    parts += ["--overrides", *results["overrides"]]
  return shlex.join(parts)


def load_run_results(run_dir: Path) -> dict[str, Any]:
  """``RUN_DIR/results.json``, with an error naming the command that creates it.

  Args:
    run_dir: an output folder of ``python -m experiments.run``.

  Returns:
    The parsed ``results.json``.

  Raises:
    SensitivityError: ``run_dir`` or its ``results.json`` is missing.
  """
  if not run_dir.is_dir():
    raise SensitivityError(
      f"run folder {run_dir} does not exist: create it with "
      f"`python -m experiments.run CONFIG --out {run_dir}` (at least `--phase train`)"
    )
  path = run_dir / "results.json"
  if not path.is_file():
    raise SensitivityError(
      f"{run_dir} is not an output folder of experiments.run (no results.json): "
      f"create it with `python -m experiments.run CONFIG --out {run_dir}`"
    )
  with open(path) as f:
    results = json.load(f)
  if "config_name" not in results:
    raise SensitivityError(f"{path} names no configuration (no 'config_name')")
  return results


def config_of_run(results: dict[str, Any], extra_overrides: Sequence[str] = ()) -> Any:
  """The run's :class:`ExperimentConfig`, rebuilt as the CLI built it.

  ``results.json`` records the config name, ``--quick`` and ``--overrides``;
  replaying them through :func:`experiments.configs.get_config` gives the
  config object (with its methods, e.g. the learning-rate schedule), which is
  then checked against the recorded config dict so that a config edited since
  the run does not go unnoticed.

  Args:
    results: the run's ``results.json``.
    extra_overrides: further ``key=value`` overrides (e.g. a test subset).

  Returns:
    The ``ExperimentConfig``.

  Raises:
    SensitivityError: the recorded config differs from the rebuilt one.
  """
  from experiments.configs import apply_overrides, get_config

  config = get_config(
    results["config_name"],
    quick=bool(results.get("quick")),
    overrides=list(results.get("overrides", [])),
  )
  saved = results.get("config")
  if saved:
    now = config.to_dict()
    cosmetic = {"description", "log_every", "keep_checkpoints", "paper", "quick"}
    diffs = sorted(k for k in saved if k not in cosmetic and saved[k] != now.get(k))
    if diffs:
      raise SensitivityError(
        "the configuration recorded in results.json differs from "
        f"{results['config_name']!r} with its overrides in the current code, in: "
        + ", ".join(diffs)
      )
  return apply_overrides(config, list(extra_overrides)) if extra_overrides else config


def restore_base(run: Run, model: Any) -> dict[str, Any]:
  """Loads the final dense base checkpoint into ``model``.

  Args:
    run: the run (its base folder and config).
    model: a freshly built model of the run's architecture; updated in place.

  Returns:
    The checkpoint's meta dict (``epoch``, ``history``, ...).

  Raises:
    SensitivityError: no base checkpoint, or the train phase is unfinished.
  """
  from experiments.training import checkpoint_epoch, restore_model_state

  ckpt = run.base_dir / "train" / "checkpoints"
  done = checkpoint_epoch(ckpt)
  want = run.config.train.epochs
  command = rerun_command(run.results, run.base_dir, "train")
  if done is None:
    raise SensitivityError(
      f"no base (train phase) checkpoint in {ckpt}: create it with `{command}`"
    )
  if done < want:
    raise SensitivityError(
      f"the train phase in {ckpt} stopped at epoch {done} of {want}: finish it with "
      f"`{command} --resume`"
    )
  # The final epoch explicitly, not "the latest": nothing newer can appear.
  return restore_model_state(ckpt, model, step=want)


def restore_gsm(run: Run, model: Any) -> tuple[dict[str, Any] | None, str | None]:
  """Loads the final GSM checkpoint into ``model`` when the gsm phase is complete.

  Args:
    run: the run (its folder and config).
    model: a freshly built model of the run's architecture; updated in place.

  Returns:
    ``(meta, None)`` when loaded, else ``(None, note)`` saying why not and which
    command finishes the phase.
  """
  from experiments.training import checkpoint_epoch, restore_model_state

  ckpt = run.out / "gsm" / "checkpoints"
  want = run.config.gsm.epochs
  done = checkpoint_epoch(ckpt)
  command = rerun_command(run.results, run.out, "gsm")
  if done is None:
    return (
      None,
      f"no GSM checkpoint in {ckpt} (run `{command}`); the GSM non-zero ratios are skipped",
    )
  if done < want:
    return None, (
      f"the gsm phase in {ckpt} is at epoch {done} of {want} (finish it with "
      f"`{command} --resume`); the GSM non-zero ratios are skipped"
    )
  return restore_model_state(ckpt, model, step=want), None


# ----------------------------------------------------- (b2) top-Q selection counts


class SelectionCountState(NamedTuple):
  """State of :func:`count_selections`: the wrapped optimizer's and the counts.

  Attributes:
    inner: the state of the wrapped GSM transformation.
    counts: int32 per weight, shaped like the params: in how many updates the
      weight was in the global top-Q (0 on leaves that are not eligible).
  """

  inner: Any
  counts: Any


def count_selections(tx: Any, *, where: Any = None) -> Any:
  """Wraps an ``optax_gsm.gsm`` transformation to count its top-Q selections.

  GSM does not expose its per-step mask, so the wrapper recomputes it from
  the same inputs: the Taylor scores ``|g * w|`` of the eligible leaves (or the
  running average of the scores when ``score_momentum`` is set, read from the
  updated state) and the Q just used (``GlobalTopQState.num_nonzero``),
  selected with :func:`optax_gsm.top_q_keys`.  Every selection backend of
  ``optax_gsm`` selects exactly the same set, ties included, so this is the set
  of weights whose update got the gradient.  The counts stay on the device in
  the optimizer state: no per-step transfer or synchronisation.

  Args:
    tx: ``optax_gsm.gsm(...)`` (a chain whose first state is a
      ``GlobalTopQState``), built with the default ``metric="taylor"``.
    where: the eligibility given to ``tx`` (default: ``optax_gsm.default_where``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with the updates of ``tx`` and
    a :class:`SelectionCountState`.
  """
  import jax
  import jax.numpy as jnp
  import optax

  import optax_gsm
  from optax_gsm import eligibility

  def init_fn(params: Any) -> SelectionCountState:
    counts = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.int32), params)
    return SelectionCountState(inner=tx.init(params), counts=counts)

  def update_fn(updates: Any, state: SelectionCountState, params: Any = None, **extra: Any) -> Any:
    new_updates, inner = tx.update(updates, state.inner, params, **extra)
    top_q = inner[0]
    if not isinstance(top_q, optax_gsm.GlobalTopQState):
      raise TypeError(
        "count_selections wraps optax_gsm.gsm(...): its first state "
        f"must be a GlobalTopQState, got {type(top_q).__name__}"
      )
    param_leaves, treedef = jax.tree.flatten(params)
    grad_leaves = treedef.flatten_up_to(updates)
    flags = eligibility.resolve_where(where, params)
    eligible = [i for i, f in enumerate(flags) if f]
    if jax.tree.leaves(top_q.score_ema):
      ema_leaves = treedef.flatten_up_to(top_q.score_ema)
      scores = [ema_leaves[i] for i in eligible]
    else:
      # optax_gsm's "taylor" metric, widened to float32 as it does.
      scores = [
        jnp.abs(grad_leaves[i].astype(jnp.float32) * param_leaves[i].astype(jnp.float32))
        for i in eligible
      ]
    keys = [optax_gsm.selection.scores_to_keys(s) for s in scores]
    masks, _ = optax_gsm.top_q_keys(keys, top_q.num_nonzero, method="threshold")
    count_leaves = treedef.flatten_up_to(state.counts)
    for i, m in zip(eligible, masks):
      count_leaves[i] = count_leaves[i] + m.astype(jnp.int32)
    counts = jax.tree.unflatten(treedef, count_leaves)
    return new_updates, SelectionCountState(inner=inner, counts=counts)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def selection_run(
  run: Run, model: Any, train: Any, *, epochs: float, steps: int | None, progress: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
  """A short GSM run from ``model`` (the base) that counts top-Q selections.

  The GSM hyper-parameters, learning-rate schedule and data order are those of
  the run's gsm phase, so the counts describe the first steps of the real run.

  Args:
    run: the run (config and Q).
    model: the base model; it is trained in place.
    train: the training pipeline.
    epochs: length in epochs (fractions allowed) when ``steps`` is None.
    steps: length in steps.
    progress: show a tqdm bar.

  Returns:
    ``(counts, info)``: counts as a nested dict shaped like
    :func:`experiments.training.param_dict`, and JSON-ready details.
  """
  import jax
  import numpy as np
  from flax import nnx
  from tqdm.auto import tqdm

  from experiments.training import Trainer, make_gsm_tx, prefetch_to_device

  cfg = run.config
  q = run.num_nonzero()
  per_epoch = train.steps_per_epoch
  total = int(steps) if steps is not None else int(round(epochs * per_epoch))
  schedule = cfg.gsm.lr_schedule(per_epoch)
  tx = make_gsm_tx(
    schedule,
    num_nonzero=cfg.gsm_num_nonzero(run.num_eligible(), per_epoch),
    **cfg.gsm_rule(per_epoch),
  )
  trainer = Trainer(
    model,
    count_selections(tx),
    lr_schedule=schedule,
    nonzero_threshold=cfg.nonzero_threshold,
    num_nonzero=q,
    name="selection",
  )
  bar = tqdm(
    total=total,
    desc="top-Q selection run",
    disable=not progress,
    leave=False,
    mininterval=0.5,
    dynamic_ncols=True,
  )
  metrics = []
  t0 = time.perf_counter()
  done, epoch = 0, 0
  while done < total:
    # Epoch e of the real gsm phase visits train.epoch(e): the same batches here.
    for images, labels in prefetch_to_device(train.epoch(epoch)):
      if done == total:
        break
      metrics.append(trainer.train_step(images, labels))
      done += 1
      bar.update(1)
    epoch += 1
  got = jax.device_get(metrics)
  seconds = time.perf_counter() - t0
  bar.close()
  trainer.sync()
  state = nnx.as_pure(trainer.optimizer.opt_state)
  counts = jax.tree.map(np.asarray, nnx.to_pure_dict(state.counts))
  info = {
    "steps": total,
    "epochs": total / per_epoch,
    "steps_per_epoch": per_epoch,
    "num_nonzero": q,
    "lr_first": float(schedule(0)),
    "lr_last": float(schedule(max(total - 1, 0))),
    "momentum": cfg.gsm.momentum,
    "weight_decay": cfg.gsm.weight_decay,
    "unselected_decay": cfg.gsm_unselected_decay,
    "unselected_decay_schedule": cfg.gsm_unselected_decay_schedule,
    "score_momentum": cfg.gsm_score_momentum,
    "score_momentum_from_epoch": cfg.gsm_score_momentum_from_epoch,
    "unselected_decay_drops": cfg.gsm_unselected_decay_drops,
    "train_loss_mean": float(np.mean([float(m["loss"]) for m in got])) if got else None,
    "train_acc_mean": (
      float(sum(float(m["correct"]) for m in got)) / (len(got) * train.batch_size) if got else None
    ),
    "selections": int(sum(int(np.sum(c)) for c in jax.tree.leaves(counts))),
    "seconds": seconds,
  }
  return counts, info


# ------------------------------------------------------------------ evaluation


def copy_model(model: Any) -> Any:
  """A copy of ``model`` with its own buffers (``nnx.clone`` would share them).

  Args:
    model: an NNX module.

  Returns:
    An equal module whose arrays a donating training step may free.
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, copy=True), state))


def make_eval_fn(
  model: Any, test: Any, *, on_call: Callable[[], None] | None = None
) -> Callable[[Any], float]:
  """``params -> test accuracy`` of ``model`` with ``params`` written into it.

  Uses :func:`experiments.training.evaluate` (jitted once per graph, padded
  batches masked).

  Args:
    model: the model evaluated; its parameters are overwritten at each call.
    test: the evaluation pipeline.
    on_call: runs after every evaluation (to advance a progress bar).

  Returns:
    The evaluation function for :func:`optax_gsm.layer_sensitivity`.
  """
  from experiments.training import evaluate, set_params

  def eval_fn(params: Any) -> float:
    set_params(model, params)
    acc = evaluate(model, test)["acc"]
    if on_call is not None:
      on_call()
    return acc

  return eval_fn


def spearman_by_ratio(result: Any) -> dict[str, dict[str, float | None]]:
  """Spearman's rho of the drop at each single ratio against each GSM signal.

  Args:
    result: an ``optax_gsm.SensitivityResult``.

  Returns:
    ``{signal: {"0.5": rho, ...}}`` for the signals present (``None`` where rho
    is undefined, e.g. a constant column).
  """
  import math

  import optax_gsm
  from optax_gsm.sensitivity import SIGNALS

  out: dict[str, dict[str, float | None]] = {}
  for signal in SIGNALS:
    values = [getattr(layer, signal) for layer in result.layers]
    if not values or any(v is None for v in values):
      continue
    out[signal] = {}
    for j, r in enumerate(result.ratios):
      rho = optax_gsm.sensitivity.spearman([layer.drops[j] for layer in result.layers], values)
      out[signal][f"{r:g}"] = None if math.isnan(rho) else rho
  return out


def final_vs_early(result: Any) -> float | None:
  """Spearman's rho of the final non-zero ratio against the early top-Q density.

  Args:
    result: an ``optax_gsm.SensitivityResult``.

  Returns:
    rho, or ``None`` when either signal is missing or rho is undefined.
  """
  import math

  import optax_gsm

  layers = result.layers
  if not layers or any(l.nonzero_ratio is None or l.selection_density is None for l in layers):
    return None
  rho = optax_gsm.sensitivity.spearman(
    [l.nonzero_ratio for l in layers], [l.selection_density for l in layers]
  )
  return None if math.isnan(rho) else rho


# ------------------------------------------------------------------ outputs


def markdown(doc: dict[str, Any]) -> str:
  """``sensitivity.md``: the per-layer table, the correlations and how they were made.

  Args:
    doc: the dict written to ``sensitivity.json``.

  Returns:
    Markdown text.
  """
  from experiments.sensitivity_plot import _short as short_name

  ratios = doc["ratios"]
  signals = [
    (key, name)
    for key, name in (
      ("nonzero_ratio", "GSM non-zero ratio (after cut)"),
      ("selection_share", "top-Q share"),
      ("selection_density", "top-Q density"),
    )
    if doc["layers"] and all(layer.get(key) is not None for layer in doc["layers"])
  ]
  head = (
    ["layer", "size"]
    + [f"drop @ {100 * r:g}%" for r in ratios]
    + ["mean drop"]
    + [name for _, name in signals]
  )
  lines = [
    f"# Layer sensitivity: {doc['config_name']}",
    "",
    f"{doc['description']}. Run folder `{doc['run_dir']}`; Q = {doc['num_nonzero']:,} of "
    f"N = {doc['num_eligible']:,} eligible weights ({doc['target_label']}). "
    f"Dense base (epoch {doc['base']['epoch']}) test accuracy "
    f"{100 * doc['baseline']:.2f}% on {doc['eval_examples']:,} test images.",
    "",
    "| " + " | ".join(head) + " |",
    "| --- | " + " | ".join("---:" for _ in head[1:]) + " |",
  ]
  for layer in doc["layers"]:
    row = [f"`{short_name(layer['path'])}`", f"{layer['size']:,}"]
    row += [f"{100 * d:+.2f}" for d in layer["drops"]] + [f"{100 * layer['mean_drop']:+.2f}"]
    row += [f"{layer[key]:.4f}" for key, _ in signals]
    lines.append("| " + " | ".join(row) + " |")
  lines += [
    "",
    "Drops are in accuracy points (percent), dense base minus base with that layer alone "
    "magnitude-pruned at the ratio. Non-zero ratio: fraction of the layer kept by "
    "`magnitude_prune` of the GSM-trained model to Q. Top-Q share: the layer's fraction "
    "of all global top-Q selections in the short GSM run; density: that share per weight, "
    "relative to the average over all eligible weights (1 = proportional).",
    "",
    "Spearman's rho (n = {} layers):".format(len(doc["layers"])),
    "",
    "| signal | vs mean drop | " + " | ".join(f"vs drop @ {100 * r:g}%" for r in ratios) + " |",
    "| --- | ---: | " + " | ".join("---:" for _ in ratios) + " |",
  ]

  def fmt(v: float | None) -> str:
    return "undefined" if v is None else f"{v:+.2f}"

  for key, name in signals:
    by_ratio = doc["spearman_by_ratio"].get(key, {})
    lines.append(
      f"| {name} | {fmt(doc['spearman'].get(key))} | "
      + " | ".join(fmt(by_ratio.get(f"{r:g}")) for r in ratios)
      + " |"
    )
  agreement = doc.get("spearman_final_vs_early")
  if agreement is not None:
    lines += [
      "",
      f"Spearman's rho between the two GSM signals (final non-zero ratio vs early "
      f"top-Q density): {fmt(agreement)}.",
    ]
  gsm = doc["gsm_model"]
  lines.append("")
  if gsm.get("skipped"):
    lines.append(f"GSM-trained model: not measured; {gsm['skipped']}.")
  else:
    lines.append(
      f"GSM-trained model: epoch {gsm['epoch']}, test accuracy after the cut to Q "
      f"{100 * gsm['test_acc_after_cut']:.2f}%."
    )
  sel = doc.get("selection_run")
  if sel:
    lines.append(
      f"Short GSM run: {sel['steps']} steps ({sel['epochs']:.3g} epoch"
      f"{'' if sel['epochs'] == 1 else 's'}) from the base with the run's GSM settings "
      f"(lr {sel['lr_first']:.2g} to {sel['lr_last']:.2g}, momentum {sel['momentum']}), "
      f"{sel['selections']:,} selections."
    )
  lines += [
    "",
    f"Command (wall time {doc['wall_seconds']:.0f} s):",
    "",
    "```bash",
    doc["command"],
    "```",
    "",
  ]
  return "\n".join(lines)


# ------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.sensitivity",
    description="Per-layer pruning sensitivity of a run's base model against GSM's per-layer "
    "choice (non-zero ratio after GSM, top-Q share of a short GSM run), with "
    "Spearman's rank correlation.",
  )
  parser.add_argument(
    "run_dir", metavar="RUN_DIR", help="an output folder of `python -m experiments.run`"
  )
  parser.add_argument(
    "--ratios",
    type=float,
    nargs="+",
    default=list(DEFAULT_RATIOS),
    help="fractions of one layer's weights to prune (default 0.5 0.7 0.9)",
  )
  parser.add_argument(
    "--eval-subset",
    type=int,
    default=None,
    metavar="N",
    help="evaluate on the first N test images (default: the run's test set)",
  )
  length = parser.add_mutually_exclusive_group()
  length.add_argument(
    "--selection-epochs",
    type=float,
    default=1.0,
    metavar="E",
    help="length of the short GSM run that counts top-Q selections (default 1; 0 skips it)",
  )
  length.add_argument(
    "--selection-steps", type=int, default=None, metavar="S", help="or its length in steps"
  )
  parser.add_argument(
    "--out", default=None, help="output folder (default runs/sensitivity/<config name>)"
  )
  parser.add_argument(
    "--base-from",
    default=None,
    metavar="DIR",
    help="take the base model from DIR/train/checkpoints (default: the run's own "
    "base, as recorded in its results.json)",
  )
  add_data_arguments(parser)
  return parser


def output_dir(args: argparse.Namespace, config: Any) -> Path:
  """``--out``, or ``<repo>/runs/sensitivity/<config name>`` (git-ignored) by default."""
  if args.out:
    return Path(args.out).expanduser().absolute()
  return REPO_ROOT / "runs" / "sensitivity" / config.name


def sensitivity(args: argparse.Namespace, argv: Sequence[str]) -> Path:
  """Runs the measurement and writes its three files.

  Args:
    args: the parsed command line (see :func:`build_parser`).
    argv: the raw arguments, recorded as the command in the outputs.

  Returns:
    The output folder.

  Raises:
    SensitivityError: a missing or unfinished run folder (the message names the
      command that creates or finishes it).
  """
  t_start = time.perf_counter()
  run_dir = Path(args.run_dir).expanduser().absolute()
  results = load_run_results(run_dir)
  extra = [f"data.eval_subset={args.eval_subset}"] if args.eval_subset else []
  config = config_of_run(results, extra)
  if (args.selection_steps or 0) < 0 or args.selection_epochs < 0:
    raise SensitivityError("--selection-steps / --selection-epochs must be >= 0")
  base_from = args.base_from or results.get("base_from") or str(run_dir)
  run = Run(
    config,
    argparse.Namespace(
      out=str(run_dir),
      base_from=base_from,
      data_dir=args.data_dir,
      manual_dir=args.manual_dir,
      no_download=args.no_download,
    ),
  )
  out = output_dir(args, config)
  show = args.progress if args.progress is not None else sys.stderr.isatty()

  # Checkpoints first: a missing base model should fail before the data loads.
  base_model = run.new_model()
  base_meta = restore_base(run, base_model)
  gsm_model = run.new_model()
  gsm_meta, gsm_note = restore_gsm(run, gsm_model)
  if gsm_note:
    print(f"[sensitivity] note: {gsm_note}", flush=True)
  # The inputs are there: hold the output folder until its files are written.
  with lock_output(out):
    return _measure(
      args,
      argv,
      t_start,
      run_dir,
      results,
      config,
      run,
      out,
      show,
      base_model,
      base_meta,
      gsm_model,
      gsm_meta,
      gsm_note,
    )


def _measure(
  args: argparse.Namespace,
  argv: Sequence[str],
  t_start: float,
  run_dir: Path,
  results: dict[str, Any],
  config: Any,
  run: Run,
  out: Path,
  show: bool,
  base_model: Any,
  base_meta: dict[str, Any],
  gsm_model: Any,
  gsm_meta: dict[str, Any] | None,
  gsm_note: str | None,
) -> Path:
  """The measurement of :func:`sensitivity` once its inputs are checked and ``out`` is locked."""
  import jax
  from tqdm.auto import tqdm

  import optax_gsm

  from experiments.training import param_dict

  q, n = run.num_nonzero(), run.num_eligible()
  train, test = run.pipelines()
  base_params = param_dict(base_model)
  gsm_params = param_dict(gsm_model) if gsm_meta is not None else None
  print(
    f"[sensitivity] {config.name}: N={n:,} eligible weights, Q={q:,} ({config.target_label}); "
    f"base epoch {base_meta['epoch']} from {run.base_dir}",
    flush=True,
  )

  counts, selection_info = None, None
  if args.selection_steps is not None:
    do_selection = args.selection_steps > 0
  else:
    do_selection = args.selection_epochs > 0
  if do_selection:
    # Its own copy: the training step donates (frees) the buffers it is given.
    counts, selection_info = selection_run(
      run,
      copy_model(base_model),
      train,
      epochs=args.selection_epochs,
      steps=args.selection_steps,
      progress=show,
    )
    print(
      f"[sensitivity] short GSM run: {selection_info['steps']} steps, "
      f"{selection_info['selections']:,} top-Q selections in "
      f"{selection_info['seconds']:.1f} s",
      flush=True,
    )

  n_layers = sum(bool(f) for f in jax.tree.leaves(optax_gsm.default_where(base_params)))
  ratios = tuple(args.ratios)
  # base_model serves as the evaluation model: the trial params are written into
  # it, which leaves the (immutable) arrays of base_params untouched.
  bar = tqdm(
    total=1 + n_layers * len(ratios),
    desc="layer sensitivity",
    disable=not show,
    leave=False,
    dynamic_ncols=True,
  )
  eval_fn = make_eval_fn(base_model, test, on_call=lambda: bar.update(1))
  t0 = time.perf_counter()
  result = optax_gsm.layer_sensitivity(
    base_params,
    eval_fn,
    ratios=ratios,
    gsm_params=gsm_params,
    num_nonzero=q if gsm_params is not None else None,
    selection_counts=counts,
  )
  eval_seconds = time.perf_counter() - t0
  bar.close()

  gsm_section: dict[str, Any]
  if gsm_params is not None:
    # A sanity check against results.json's prune phase: the same cut, evaluated
    # in the GSM model (its own BatchNorm statistics, where it has any).
    pruned, _ = optax_gsm.magnitude_prune(gsm_params, num_nonzero=q)
    gsm_section = {
      "epoch": gsm_meta["epoch"],
      "checkpoints": str(run.out / "gsm" / "checkpoints"),
      "test_acc_after_cut": make_eval_fn(gsm_model, test)(pruned),
    }
  else:
    gsm_section = {"skipped": gsm_note}

  doc = result.to_dict()
  doc.update(
    {
      "spearman_by_ratio": spearman_by_ratio(result),
      # Whether the cheap signal (one epoch) ranks the layers as the finished run does.
      "spearman_final_vs_early": final_vs_early(result),
      "command": shlex.join(["python", "-m", "experiments.sensitivity", *argv]),
      "run_dir": str(run_dir),
      "config_name": config.name,
      "description": config.description,
      "model": config.model,
      "run_overrides": list(results.get("overrides", [])),
      "num_eligible": n,
      "num_nonzero": q,
      "target_label": config.target_label,
      "eval_examples": test.num_examples,
      "base": {
        "epoch": base_meta["epoch"],
        "checkpoints": str(run.base_dir / "train" / "checkpoints"),
      },
      "gsm_model": gsm_section,
      "selection_run": selection_info,
      "eval_seconds": eval_seconds,
      "wall_seconds": time.perf_counter() - t_start,
      "environment": environment(),
      "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
  )

  import matplotlib.pyplot as plt

  from experiments.sensitivity_plot import plot_sensitivity

  # Everything rendered before anything is written: a failure leaves the three
  # files of an earlier measurement as they were.
  text = markdown(doc)
  fig = plot_sensitivity(doc, None, title=f"{config.description}: layer sensitivity")
  out.mkdir(parents=True, exist_ok=True)
  atomic_write_json(out / "sensitivity.json", doc)
  atomic_write_text(out / "sensitivity.md", text)
  atomic_save_figure(fig, out / "sensitivity.png", dpi=150)
  plt.close(fig)
  print(result.table(), flush=True)
  for name in ("sensitivity.json", "sensitivity.md", "sensitivity.png"):
    print(f"[sensitivity] wrote {out / name}", flush=True)
  return out


def main(argv: Sequence[str] | None = None) -> int:
  """Command line entry point; returns the exit status (2 for user-fixable errors)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args = parser.parse_args(argv)
  if any(not 0.0 <= r <= 1.0 for r in args.ratios):
    parser.error(f"--ratios must be fractions in [0, 1], got {args.ratios}")
  if args.eval_subset is not None and args.eval_subset < 1:
    parser.error("--eval-subset must be >= 1")
  from experiments.data import DatasetError
  from experiments.run import _enable_compilation_cache

  _enable_compilation_cache()
  return run_command(lambda: sensitivity(args, argv), SensitivityError, DatasetError)


if __name__ == "__main__":
  sys.exit(main())
