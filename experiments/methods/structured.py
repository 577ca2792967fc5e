"""AutoPrune, Taylor, gate-Taylor and Fisher pruning in the comparison at a weight count.

``autoprune``: unstructured AutoPrune (Xiao et al., NeurIPS 2019) with the
Softplus straight-through estimate and AutoPrune's sign-decoupled mask update,
from the dense base, for ``budget.epochs`` epochs: masks (started at
``|w| / mean|w|`` per layer, so a short budget degrades towards magnitude
pruning) and weights train jointly for 70% of the updates, with the
regulariser strength steered towards Q (AutoPrune itself has no count target);
then the Q weights with the largest mask parameter are kept (exactly Q) and
fine-tune with the masks frozen for the last 30%.
See :func:`experiments.structured.autoprune_to_count`.

``taylor`` (Molchanov et al., ICLR 2017), ``taylor_gate`` (Molchanov et al.,
CVPR 2019) and ``fisher`` (Theis et al. 2018): structured pruning, whole
feature maps / neurons, by :func:`experiments.structured.greedy_prune` from
the dense base. They cannot hit an exact weight count (one map carries many
weights), so they stop at the first removal that leaves **at most** Q
eligible kernel weights, and the table reports the slim model's count
(``non-zeros``, at most Q; ``actual C`` from it), as for DNS. The last
removal can overshoot by a whole map: a LeNet-5 ``conv2`` map carries
``25 * conv1 + 16 * fc1`` kernel weights (thousands while ``fc1`` is wide;
a ``--quick`` run ended at 37,830 for Q = 43,050), a LeNet-300-100 ``fc1``
neuron ``784 + fc2``.

* Target.  ``greedy_prune``'s parameter targets are fractions of *all*
  parameters (biases included, as :func:`~experiments.structured.count_structure`
  and ``param_counts(model)["total"]`` count them), while the table's N and Q
  count eligible kernel entries only. The target passed is
  ``(Q + B_min) / P`` with P all dense parameters and B_min the non-kernel
  parameters (biases) left with one channel per prunable layer, their
  minimum: ``params <= Q + B_min`` then implies ``kernels <= Q``. It can
  stop a removal later than an exact kernel target would (the slack is the
  biases of the channels alive beyond one per layer, tens to a few hundred
  parameters here, against one map's hundreds to thousands of kernel
  weights); the slim model's kernel count is checked to be <= Q.
* Criteria as in :mod:`experiments.structured`: Taylor with per-layer L2
  normalisation, gate Taylor and Fisher without; no FLOPs term
  (``cost_weight = 0``): the measured FLOPs-target runs
  (``docs/results/structured``) used lambda 5 / beta 2e-3 / 0.05 to
  trade accuracy for MACs, which a weight-count target does not ask for.
* Budget: ``budget.epochs * steps_per_epoch`` updates in all, on the
  comparison's batches in order from epoch 0. Pruning gets at most 70% (as
  DNS and AutoPrune here): ``steps_per_removal = floor(0.7 * updates / R_max)``,
  at least 1, with ``R_max`` the most removals possible (all maps but one
  per layer), at momentum SGD with the constant fine-tuning lr
  ``budget.lr`` (weight decay on kernels); the slim model then fine-tunes
  for the rest of the updates (at least 30%) with lr ``budget.lr`` cosine to
  0. With the default budget (10 epochs of 234 updates of 256 examples) that
  is 4 updates per removal for LeNet-300-100 (R_max 398) and 2 for LeNet-5
  (R_max 567), against 10 updates of 64 examples in the measured
  FLOPs-target runs. When the budget is too short for one update per
  removal (``--quick``) pruning takes more; the ``epochs`` column always
  counts what was used.
* Models: LeNet-300-100 (neurons of ``fc1``, ``fc2``), LeNet-5 (``conv1``,
  ``conv2``, ``fc1``), and the VGG / CIFAR ResNet of
  :func:`experiments.structured.plan_for`. Other models, or a Q below the
  kernel count with one channel per prunable layer (795 for LeNet-300-100,
  76 for LeNet-5), raise :class:`experiments.methods.common.NotApplicable`, shown as
  ``n/a`` in the table.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import optax_gsm
from experiments import structured
from experiments.methods import common
from experiments.methods.common import Context, MethodResult, NotApplicable
from experiments.models import param_counts
from experiments.training import param_dict, set_params

PRUNE_SHARE = 0.7


def run_autoprune(ctx: Context) -> MethodResult:
  """AutoPrune (Xiao et al. 2019), unstructured: lambda steered to Q, top-Q masks, fine-tune."""
  t0 = time.perf_counter()
  steps = ctx.budget.epochs * ctx.steps_per_epoch
  params, info = structured.autoprune_to_count(
    ctx.apply,
    ctx.base_params,
    ctx.train,
    num_nonzero=ctx.num_nonzero,
    steps=steps,
    lr=ctx.budget.lr,
    momentum=ctx.budget.momentum,
    log=ctx.log,
  )
  seconds = time.perf_counter() - t0
  info.pop("history")
  return ctx.result(
    "autoprune",
    params,
    epochs=ctx.budget.epochs,
    starts_from="base",
    wall_seconds=seconds,
    train_seconds=seconds,
    extra=info,
  )


# --------------------------------------------------------------------------
# Greedy feature-map pruning to at most Q kernel weights.


def base_model(ctx: Context) -> nnx.Module:
  """A copy of ``ctx.module`` holding the dense base weights."""
  model = nnx.clone(ctx.module)
  set_params(model, jax.tree.map(jnp.asarray, ctx.base_params))
  return model


def kernel_count(model: nnx.Module) -> int:
  """Eligible (kernel) entries of ``model``: the table's N / Q quantity."""
  return optax_gsm.count_eligible(param_dict(model))


def smallest_structure(model: nnx.Module, plan: structured.Plan) -> tuple[int, int]:
  """``(kernels, other parameters)`` with one channel left per site."""
  widths = structured.site_widths(model, plan)
  one = {k: np.arange(c) == 0 for k, c in widths.items()}
  tiny = structured.remove_channels(model, one, plan)
  kernels = kernel_count(tiny)
  return kernels, param_counts(tiny)["total"] - kernels


def finetune_slim(
  ctx: Context, slim: nnx.Module, steps: int, first_step: int
) -> tuple[nnx.Module, float]:
  """``steps`` updates of the sliced model: lr ``budget.lr`` cosine to 0.

  Training reads the comparison's batches from overall update ``first_step``
  on, where the pruning stopped.

  Returns:
    ``(the fine-tuned model, seconds)``.
  """
  if steps <= 0:
    return structured.GatedModel(slim).to_model(), 0.0
  t0 = time.perf_counter()
  tuned = structured.train_dense(
    slim,
    ctx.train,
    steps=steps,
    first_step=first_step,
    log=ctx.log,
    tx=common.sgd(common.cosine(ctx.budget.lr, steps), ctx.budget),
  )
  seconds = time.perf_counter() - t0
  ctx.log(f"  [fine-tune slim] {steps} steps, {seconds:.1f} s")
  return tuned, seconds


def run_greedy(ctx: Context, criterion: str) -> MethodResult:
  """Greedy ``criterion`` pruning of the base to <= Q kernels, fine-tuned."""
  t0 = time.perf_counter()
  q = ctx.num_nonzero
  model = base_model(ctx)
  try:
    plan = structured.plan_for(model)
  except TypeError as err:
    raise NotApplicable(f"no prunable channels known for {ctx.model}") from err
  widths = structured.site_widths(model, plan)
  min_kernels, min_other = smallest_structure(model, plan)
  if q < min_kernels:
    raise NotApplicable(
      f"Q={q} is below the {min_kernels} kernel weights of {ctx.model} with "
      "one channel left per prunable layer"
    )
  b = ctx.budget
  spe = ctx.steps_per_epoch
  n_kernels = kernel_count(model)
  dense_params = param_counts(model)["total"]
  target = (q + min_other) / dense_params
  total = b.epochs * spe
  max_removals = sum(widths.values()) - len(widths)
  spr = max(1, int(PRUNE_SHARE * total) // max_removals)
  cfg = structured.GreedyConfig(
    criterion=criterion,
    flops_targets=(),
    param_targets=(target,),
    steps_per_removal=spr,
    cost_weight=0.0,
    lr=b.lr,
    momentum=b.momentum,
    weight_decay=b.weight_decay,
    finetune_steps=0,
  )
  ctx.log(
    f"  [{criterion}] Q={q} of {n_kernels} kernels: parameter target "
    f"{q + min_other} of {dense_params} ({target:.4%}), "
    f"{spr} updates per removal (at most {max_removals} removals)"
  )
  out = structured.greedy_prune(model, ctx.train, ctx.test, cfg, seed=0, log=ctx.log)
  if not out["levels"]:  # cannot happen: Q >= min_kernels is reachable
    raise RuntimeError(f"{criterion} did not reach {q} kernel weights")
  (level,) = out["levels"]
  prune_steps = level["removals"] * spr
  ft_steps = max(total - prune_steps, int(round((1 - PRUNE_SHARE) * total)))
  slim, ft_seconds = finetune_slim(ctx, out["models"][level["target"]], ft_steps, prune_steps)
  slim_gm = structured.GatedModel(slim)
  acc = structured.evaluate(slim_gm, slim_gm.params, slim_gm.rest, ctx.test)["acc"]
  kernels = kernel_count(slim)
  if kernels > q:
    raise RuntimeError(f"{criterion}: {kernels} kernel weights left > Q={q}")
  nonzeros = common.count_nonzero(slim_gm.params)
  measured = structured.count_structure(slim, plan.input_shape)
  epochs = (prune_steps + ft_steps) / spe
  wall = time.perf_counter() - t0
  res = MethodResult(
    method=criterion,
    model=ctx.model,
    dataset=ctx.dataset,
    compression=ctx.compression,
    num_nonzero=q,
    nonzeros=nonzeros,
    num_eligible=ctx.num_eligible,
    test_acc=acc,
    epochs=round(epochs, 3),
    starts_from="base",
    wall_seconds=wall,
    train_seconds=out["prune_seconds"] + ft_seconds,
    extra={
      "slim_kernels": kernels,
      "widths": level["widths"],
      "dense_widths": widths,
      "macs_before": out["dense_macs"],
      "macs_after": measured["macs"],
      "params_after": measured["params"],
      "acc_before_finetune": level["slim_acc"],
      "max_abs_output_diff": level["max_abs_output_diff"],
      "removals": level["removals"],
      "steps_per_removal": spr,
      "prune_updates": prune_steps,
      "finetune_updates": ft_steps,
      "prune_epochs": prune_steps / spe,
      "finetune_epochs": ft_steps / spe,
      "param_target": q + min_other,
      "non_kernel_params_min": min_other,
      "normalize": out["normalize"],
      "cost_weight": 0.0,
      "prune_seconds": out["prune_seconds"],
      "finetune_seconds": ft_seconds,
    },
  )
  ctx.log(
    f"[{criterion}] {ctx.model} {ctx.compression:g}x: test acc "
    f"{100 * acc:.2f}% kernels {kernels} (target <= {q}) widths "
    f"{level['widths']} MACs {measured['macs']} of {out['dense_macs']} "
    f"epochs {epochs:.2f} wall {wall:.1f} s"
  )
  return res


def run_taylor(ctx: Context) -> MethodResult:
  """Taylor feature-map pruning (Molchanov 2017) to <= Q kernel weights."""
  return run_greedy(ctx, "taylor")


def run_taylor_gate(ctx: Context) -> MethodResult:
  """Gate Taylor pruning (Molchanov 2019) to <= Q kernel weights."""
  return run_greedy(ctx, "taylor_gate")


def run_fisher(ctx: Context) -> MethodResult:
  """Fisher pruning (Theis 2018) to <= Q kernel weights."""
  return run_greedy(ctx, "fisher")


METHODS = {
  "autoprune": run_autoprune,
  "taylor": run_taylor,
  "taylor_gate": run_taylor_gate,
  "fisher": run_fisher,
}
