"""The command line: ``python -m experiments.structured <method> [flags]``.

Results go to ``runs/structured/`` (git-ignored) unless ``--out`` names a
JSON file; its folder's lock file ``.<name>.lock`` is held while the command
runs (see :func:`experiments.fileio.lock_output`). The defaults of the method
flags are those of :class:`~experiments.structured.greedy.GreedyConfig`,
:class:`~experiments.structured.masking.AutoPruneConfig` and, for GSM,
:class:`experiments.methods.common.Budget`.

Example:
  >>> args = build_parser().parse_args(["fisher", "--cost-weight", "0.05"])
  >>> args.model, args.steps_per_removal, args.finetune_steps
  ('lenet5', 10, 500)
  >>> output_path(args).relative_to(RESULTS_DIR)
  PosixPath('lenet5_fisher.json')
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from flax import nnx

from optax_gsm import structured as st
from experiments import data
from experiments.data import DATASETS
from experiments.fileio import lock_output, run_command
from experiments.methods.common import Budget
from experiments.structured.baseline import gsm_baseline
from experiments.structured.checkpoints import load_params, save_params, write_result
from experiments.structured.greedy import CRITERIA, GreedyConfig, greedy_prune
from experiments.structured.masking import AutoPruneConfig, autoprune
from experiments.structured.tuning import model_accuracy, train_dense
from experiments.structured.zoo import MODEL_NAMES, build_model, dataset_of, load_pipelines

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "runs" / "structured"
WORK_DIR_ENV = "OPTAX_GSM_STRUCTURED_WORK"


def _work_dir(args: argparse.Namespace) -> Path:
  return Path(
    args.work_dir
    or os.environ.get(WORK_DIR_ENV)
    or Path.home() / ".cache" / "optax_gsm" / "structured"
  )


def _pretrained(args, train, log) -> nnx.Module:
  model = build_model(args.model, seed=args.seed)
  path = _work_dir(args) / f"{args.model}_dense_{args.pretrain_steps}.npz"
  if args.mock is None and path.exists():
    log(f"loading the dense model from {path}")
    return load_params(model, path)
  if args.pretrain_steps <= 0:
    return model
  log(f"pretraining {args.model} for {args.pretrain_steps} steps")
  model = train_dense(model, train, steps=args.pretrain_steps, lr=args.lr, log=log)
  if args.mock is None:
    save_params(model, path)
  return model


def _targets(targets: tuple[float, ...]) -> str:
  """A config's target fractions as the flag's comma-separated text."""
  return ",".join(str(t) for t in targets)


def build_parser() -> argparse.ArgumentParser:
  """The parser; the method flags default to the method configs' values."""
  greedy, auto, budget = GreedyConfig(), AutoPruneConfig(), Budget()
  p = argparse.ArgumentParser(
    prog="python -m experiments.structured",
    description="Taylor / Fisher feature-map pruning and AutoPrune.",
  )
  p.add_argument(
    "method", choices=("pretrain",) + CRITERIA + ("autoprune", "autoprune_structured", "gsm")
  )
  p.add_argument("--model", default="lenet5", choices=MODEL_NAMES)
  p.add_argument("--dataset", default=None, choices=sorted(DATASETS), help="default: by model")
  p.add_argument(
    "--mock",
    type=int,
    default=None,
    metavar="N",
    help="use tfds.testing.mock_data with N examples (CI)",
  )
  p.add_argument("--data-dir", default=None)
  p.add_argument("--subset", type=int, default=None)
  p.add_argument(
    "--work-dir",
    default=None,
    help=f"pretrained weights cache (default ${WORK_DIR_ENV} or ~/.cache/optax_gsm/structured)",
  )
  p.add_argument(
    "--out", default=None, help="result JSON path (default runs/structured/<model>_<method>.json)"
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--pretrain-steps", type=int, default=2000)
  # One learning rate for pre-training and every method (the configs agree).
  p.add_argument("--lr", type=float, default=greedy.lr)
  # greedy
  p.add_argument("--flops-targets", default=_targets(greedy.flops_targets))
  p.add_argument("--param-targets", default=_targets(greedy.param_targets))
  p.add_argument("--steps-per-removal", type=int, default=greedy.steps_per_removal)
  p.add_argument("--cost-weight", type=float, default=greedy.cost_weight)
  p.add_argument("--finetune-steps", type=int, default=greedy.finetune_steps)
  # autoprune
  p.add_argument("--ste", default=auto.ste, choices=st.STE_KINDS)
  p.add_argument("--regularizer", default=auto.regularizer, choices=st.REGULARIZERS)
  p.add_argument("--strength", type=float, default=auto.strength)
  p.add_argument("--mask-lr", type=float, default=auto.mask_lr)
  p.add_argument("--mask-init", type=float, default=auto.mask_init)
  p.add_argument("--no-decouple", action="store_true", default=not auto.decouple)
  # Also the number of GSM updates.
  p.add_argument("--steps", type=int, default=auto.steps)
  p.add_argument("--mask-steps", type=int, default=auto.mask_steps)
  p.add_argument("--eval-every", type=int, default=auto.eval_every)
  # gsm
  p.add_argument("--num-nonzero", type=int, default=None)
  p.add_argument("--gsm-momentum", type=float, default=budget.gsm_momentum)
  p.add_argument(
    "--gsm-weight-decay",
    type=float,
    default=budget.gsm_weight_decay,
    help="10x the paper's, for short budgets (as experiments.methods.common.Budget)",
  )
  return p


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(t) for t in text.split(",") if t.strip())


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
  """Runs one method as the command line describes; returns the result."""
  dataset = args.dataset or dataset_of(args.model)
  with contextlib.ExitStack() as stack:
    builder = None
    if args.mock is not None:
      tfds = data.import_tfds()
      stack.enter_context(tfds.testing.mock_data(num_examples=args.mock))
      builder = tfds.builder(
        data.get_spec(dataset).tfds_name, data_dir=args.data_dir or "/tmp/optax_gsm_mock"
      )
      train, test = load_pipelines(
        dataset, batch_size=args.batch_size, seed=args.seed, builder=builder
      )
    else:
      train, test = load_pipelines(
        dataset,
        batch_size=args.batch_size,
        seed=args.seed,
        data_dir=args.data_dir,
        subset=args.subset,
      )
    model = _pretrained(args, train, log)
    if args.method == "pretrain":
      return {"method": "pretrain", "model": args.model, "acc": model_accuracy(model, test)}
    if args.method in CRITERIA:
      cfg = GreedyConfig(
        criterion=args.method,
        flops_targets=_floats(args.flops_targets),
        param_targets=_floats(args.param_targets),
        steps_per_removal=args.steps_per_removal,
        cost_weight=args.cost_weight,
        lr=args.lr,
        finetune_steps=args.finetune_steps,
      )
      result = greedy_prune(model, train, test, cfg, seed=args.seed + 1, log=log)
      result.pop("models")
    elif args.method.startswith("autoprune"):
      cfg = AutoPruneConfig(
        structured=args.method == "autoprune_structured",
        ste=args.ste,
        regularizer=args.regularizer,
        strength=args.strength,
        mask_lr=args.mask_lr,
        mask_init=args.mask_init,
        decouple=not args.no_decouple,
        lr=args.lr,
        steps=args.steps,
        mask_steps=args.mask_steps,
        eval_every=args.eval_every,
      )
      result = autoprune(model, train, test, cfg, seed=args.seed + 1, log=log)
      result.pop("model")
    else:
      if args.num_nonzero is None:
        raise SystemExit("gsm needs --num-nonzero")
      result = gsm_baseline(
        model,
        train,
        test,
        num_nonzero=args.num_nonzero,
        steps=args.steps,
        lr=args.lr,
        momentum=args.gsm_momentum,
        weight_decay=args.gsm_weight_decay,
        seed=args.seed + 1,
        log=log,
      )
  result.update({"model": args.model, "dataset": dataset, "mock": args.mock})
  return result


def output_path(args: argparse.Namespace) -> Path:
  """``--out``, or ``runs/structured/<model>_<method>[_<ste>][_mock].json``."""
  if args.out:
    return Path(args.out).expanduser().absolute()
  tag = args.method + (f"_{args.ste}" if args.method.startswith("autoprune") else "")
  return RESULTS_DIR / f"{args.model}_{tag}{'_mock' if args.mock else ''}.json"


def main(argv: Sequence[str] | None = None) -> int:
  """The command line's entry point; returns the exit status."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.method == "gsm" and args.num_nonzero is None:
    parser.error("gsm needs --num-nonzero")
  out = output_path(args)
  if out.is_dir():
    parser.error(f"--out {args.out!r}: {out} is a folder; --out is the result JSON file's path")

  def command() -> None:
    # The result file is locked while the method runs: a second process
    # writing the same file refuses instead of overwriting it.
    with lock_output(out.parent, name=f".{out.name}.lock"):
      t0 = time.perf_counter()
      result = run(args)
      result["command"] = "python -m experiments.structured " + " ".join(argv)
      result["wall_seconds"] = time.perf_counter() - t0
      write_result(result, out)
    print(f"wrote {out}")

  return run_command(command, data.DatasetError)
