"""Lottery tickets (Frankle and Carbin, ICLR 2019), GSM tickets and random tickets.

Every ticket is a mask applied to the *initial* weights ``ctx.init_params``
(``optax_gsm.baselines.rewind``) and trained with the mask fixed using the dense
network's recipe (``budget.base_lr``, cosine, ``budget.ticket_epochs`` epochs);
:func:`train_ticket` is that one function, used by all three:

* ``imp_ticket``: iterative magnitude pruning with rewinding. Round 1 prunes the
  dense base (trained from ``init_params``), every later round prunes the
  previous round's trained ticket, each round removing at most half of the
  survivors (``budget.imp_max_step``); the compressions of the invocation are
  rounds of one chain, so the 30x ticket continues from the 10x one. The epochs
  reported are all ticket trainings up to that round.
* ``gsm_ticket``: the mask GSM ends with at the same compression
  (:func:`experiments.methods.gsm.gsm_masks`).
* ``random_ticket``: a uniformly random mask with GSM's per-layer counts (the
  control of Frankle and Carbin).

The experiments' lottery-ticket table uses :func:`train_ticket` and
:func:`imp_chain` directly; :mod:`experiments.lottery` trains GSM, magnitude
and random tickets of a finished ``experiments.run`` with :func:`train_ticket`
and the run's own recipe (the GSM rebuttal's Table 4).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from optax_gsm import baselines
from experiments.methods import common
from experiments.methods import gsm as gsm_method
from experiments.methods.common import Context, MethodResult


def train_ticket(
  ctx: Context,
  masks: common.Params,
  *,
  name: str = "ticket",
  epochs: int | None = None,
  schedule: optax.Schedule | None = None,
  on_epoch: Callable[[int, common.Params], None] | None = None,
  progress: bool = False,
) -> common.TrainOutput:
  """Trains ``masks * W0`` with the mask fixed, using the dense recipe.

  Args:
    ctx: the context; ``ctx.init_params`` is W0.
    masks: True keeps a weight.
    name: for the log.
    epochs: default ``budget.ticket_epochs_``.
    schedule: the dense recipe's learning rate; default cosine from
      ``budget.base_lr`` (the comparison's dense recipe).
      :mod:`experiments.lottery` passes a run's own warm-up and step decay.
    on_epoch, progress: see :func:`experiments.methods.common.train`.
  """
  b = ctx.budget
  epochs = b.ticket_epochs_ if epochs is None else epochs
  start = baselines.rewind(ctx.init_params, masks)
  return common.retrain_fixed_mask(
    ctx,
    start,
    masks,
    epochs,
    lr=b.base_lr,
    schedule=schedule,
    name=name,
    on_epoch=on_epoch,
    progress=progress,
  )


def imp_levels(num_eligible: int, targets: list[int], max_step: float) -> list[int]:
  """Kept counts of the IMP rounds: every target, with geometric steps <= ``max_step``.

  >>> imp_levels(1000, [100, 10], 4.0)
  [316, 100, 32, 10]
  """
  levels: list[int] = []
  prev = num_eligible
  for q in sorted(set(targets), reverse=True):
    k = max(1, math.ceil(math.log(prev / q) / math.log(max_step) - 1e-9))
    for i in range(1, k):
      levels.append(int(round(prev * (q / prev) ** (i / k))))
    levels.append(q)
    prev = q
  return levels


def imp_chain(ctx: Context, num_nonzero: int) -> dict[str, Any]:
  """Runs (or continues) the IMP chain up to the round that keeps ``num_nonzero``.

  The chain's rounds are ``imp_levels`` of every target Q of the invocation
  (``ctx.artifacts["targets"]``, else just this one). Returns the round's
  ``{"q", "round", "masks", "params", "acc", "epochs", "seconds"}``.
  """
  chain = ctx.artifacts.setdefault("imp_chain", {"rounds": []})
  targets = sorted(set(ctx.artifacts.get("targets", [])) | {num_nonzero}, reverse=True)
  levels = imp_levels(ctx.num_eligible, targets, ctx.budget.imp_max_step)
  done = chain["rounds"]
  if done and [r["q"] for r in done] != levels[: len(done)]:
    raise RuntimeError("IMP chain levels changed within one invocation")
  while not done or done[-1]["q"] > num_nonzero:
    i = len(done)
    q = levels[i]
    prev_params = ctx.base_params if i == 0 else done[-1]["params"]
    prev_masks = (
      jax.tree.map(lambda x: np.ones(np.shape(x), bool), ctx.base_params)
      if i == 0
      else done[-1]["masks"]
    )
    masks = common.to_numpy(baselines.imp_masks(prev_params, prev_masks, q))
    out = train_ticket(ctx, masks, name=f"imp round {i + 1} (Q={q})")
    prev_epochs = done[-1]["epochs"] if done else 0
    prev_seconds = done[-1]["seconds"] if done else 0.0
    done.append(
      {
        "q": q,
        "round": i + 1,
        "masks": masks,
        "params": common.to_numpy(out.params),
        "epochs": prev_epochs + out.epochs,
        "seconds": prev_seconds + out.seconds,
      }
    )
  for r in done:
    if r["q"] == num_nonzero:
      return r
  raise RuntimeError(f"IMP chain has no round with Q={num_nonzero}")


def run_imp(ctx: Context) -> MethodResult:
  t0 = time.perf_counter()
  r = imp_chain(ctx, ctx.num_nonzero)
  return ctx.result(
    "imp_ticket",
    r["params"],
    epochs=r["epochs"],
    starts_from="init",
    wall_seconds=time.perf_counter() - t0,
    train_seconds=r["seconds"],
    extra={
      "round": r["round"],
      "imp_max_step": ctx.budget.imp_max_step,
      "note": "train_seconds: all rounds up to this one; "
      "wall_seconds: only the rounds this cell added",
    },
  )


def run_gsm_ticket(ctx: Context) -> MethodResult:
  t0 = time.perf_counter()
  masks = gsm_method.gsm_masks(ctx)
  out = train_ticket(ctx, masks, name="gsm ticket")
  return ctx.result(
    "gsm_ticket",
    out.params,
    epochs=out.epochs,
    starts_from="init",
    wall_seconds=time.perf_counter() - t0,
    train_seconds=out.seconds,
    extra={"mask_from": f"gsm at {ctx.compression:g}x"},
  )


def random_masks(masks: common.Params, seed: int) -> common.Params:
  """Uniformly random masks with the same number of True entries per leaf."""
  rng = np.random.default_rng(seed)
  out = []
  for m in jax.tree.leaves(masks):
    m = np.asarray(m)
    flat = np.zeros(m.size, bool)
    flat[rng.permutation(m.size)[: int(m.sum())]] = True
    out.append(flat.reshape(m.shape))
  return jax.tree.unflatten(jax.tree.structure(masks), out)


def run_random_ticket(ctx: Context) -> MethodResult:
  t0 = time.perf_counter()
  masks = random_masks(gsm_method.gsm_masks(ctx), ctx.budget.seed)
  out = train_ticket(ctx, masks, name="random ticket")
  return ctx.result(
    "random_ticket",
    out.params,
    epochs=out.epochs,
    starts_from="init",
    wall_seconds=time.perf_counter() - t0,
    train_seconds=out.seconds,
    extra={"mask": "random, GSM's per-layer counts"},
  )


METHODS = {
  "imp_ticket": run_imp,
  "gsm_ticket": run_gsm_ticket,
  "random_ticket": run_random_ticket,
}
