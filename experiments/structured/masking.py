r"""AutoPrune (Xiao et al., NeurIPS 2019): weights and pruning masks trained together.

:func:`autoprune` trains the weights and AutoPrune masks jointly, unstructured
(one mask parameter per weight) or structured (one per neuron / filter, the
gated module's output channels), with the Softplus, LeakyReLU or linear
straight-through estimate (``optax_gsm.structured``). :func:`autoprune_to_count`
is the unstructured variant steered to an exact number of weights, for the
comparison tables.

Example:
  >>> cfg = AutoPruneConfig(structured=True, ste="leaky_relu", steps=100,
  ...                       mask_steps=80)
  >>> cfg.regularizer, cfg.finetune_lr_factor
  ('gate_l1', 0.1)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_gsm
from optax_gsm import structured as st
from optax_gsm.selection import scores_to_keys
from experiments import flops as flops_lib
from experiments.structured.counting import StructureCounter, count_structure
from experiments.structured.gating import GatedModel
from experiments.structured.plans import Plan, plan_for
from experiments.structured.surgery import alive_widths, remove_channels
from experiments.structured.tuning import (
  batches,
  evaluate,
  make_tx,
  max_output_difference,
  probe_inputs,
)
from experiments.training import make_train_step

PyTree = Any


@dataclasses.dataclass
class AutoPruneConfig:
  """Settings of :func:`autoprune`.

  Attributes:
    structured: one mask per neuron / filter (the gated module's output
      channels) instead of one per weight.
    ste: ``"softplus"``, ``"leaky_relu"`` or ``"linear"``.
    alpha: LeakyReLU slope.
    regularizer: ``"gate_l1"``, ``"l1"`` or ``"l2"`` on the masks.
    strength: :math:`\\lambda` of the regulariser.
    mask_lr: learning rate of the masks (plain SGD).
    mask_init: initial :math:`m` (> 0: every weight kept at first).
    decouple: AutoPrune's sign(W) chain rule (False: the ordinary W).
    lr, momentum, weight_decay: the weights' optimiser (no decay by default:
      it would shrink pruned weights and hinder their recovery).
    steps: training updates.
    mask_steps: the masks train during the first ``mask_steps`` updates
      (default: all); then they are frozen and the weights fine-tune with
      the learning rate ``lr * finetune_lr_factor``.
    finetune_lr_factor: see ``mask_steps``.
    eval_every: evaluate every this many updates (0: only at the end).
  """

  structured: bool = False
  ste: str = "softplus"
  alpha: float = 0.2
  regularizer: str = "gate_l1"
  strength: float = 1e-3
  mask_lr: float = 1.0
  mask_init: float = 0.05
  decouple: bool = True
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 0.0
  steps: int = 2000
  mask_steps: int | None = None
  finetune_lr_factor: float = 0.1
  eval_every: int = 0

  def __post_init__(self) -> None:
    if self.mask_steps is not None and not 0 <= self.mask_steps <= self.steps:
      raise ValueError(f"`mask_steps` must be in [0, steps={self.steps}], got {self.mask_steps!r}.")
    if self.ste not in st.STE_KINDS:
      raise ValueError(f"`ste` must be one of {st.STE_KINDS}, got {self.ste!r}.")
    if self.regularizer not in st.REGULARIZERS:
      raise ValueError(f"`regularizer` must be one of {st.REGULARIZERS}, got {self.regularizer!r}.")


def _site_leaves(plan: Plan, params: PyTree) -> dict[str, list[tuple]]:
  """Site -> paths (into the pure params dict) of the gated module's params.

  Masking a Conv/Linear's kernel and bias (or a BatchNorm's scale and bias)
  by h(m) per output channel multiplies the module's output by h(m).
  """
  out = {}
  for s in plan.sites:
    node = params
    for k in s.gate_module:
      node = node[k]
    out[s.name] = [s.gate_module + (leaf,) for leaf in ("kernel", "scale", "bias") if leaf in node]
  return out


def _replace(tree: dict, path: tuple, value: Any) -> dict:
  if len(path) == 1:
    new = dict(tree)
    new[path[0]] = value
    return new
  new = dict(tree)
  new[path[0]] = _replace(tree[path[0]], path[1:], value)
  return new


def _get(tree: Any, path: tuple) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def site_masked_params(
  params: PyTree,
  masks: Mapping[str, jax.Array],
  leaves: Mapping[str, list[tuple]],
  *,
  ste: str,
  alpha: float,
  decouple: bool,
) -> PyTree:
  """The params with each site's module gated by ``h(m)`` per channel."""
  out = params
  for name, paths in leaves.items():
    for path in paths:
      out = _replace(
        out,
        path,
        st.masked_weight(_get(params, path), masks[name], ste, alpha=alpha, decouple=decouple),
      )
  return out


def autoprune(
  model: nnx.Module,
  train: Any,
  test: Any | None,
  config: AutoPruneConfig,
  *,
  seed: int = 0,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Trains weights and AutoPrune masks jointly; returns the pruned result.

  Unstructured: one :math:`m` per kernel entry (all Conv / Linear kernels,
  the classifier included); the result is the sparse model
  :math:`W \\odot h(M)`. Structured: one :math:`m` per channel of each plan
  site; the result is also cut into a smaller model.

  Returns:
    A JSON-ready dict (``"model"`` holds the pruned ``nnx.Module``: sparse
    for unstructured, sliced for structured; popped by the CLI).

  References:
    Xiao et al., "AutoPrune: Automatic Network Pruning by Regularizing
    Auxiliary Parameters", NeurIPS 2019.
  """
  t0 = time.perf_counter()
  plan = plan_for(model)
  gm = GatedModel(model, plan)
  counter = StructureCounter(model, plan)
  params, rest = gm.params, gm.rest
  common = dict(ste=config.ste, alpha=config.alpha, decouple=config.decouple)
  if config.structured:
    leaves = _site_leaves(plan, params)
    masks = {
      k: jax.device_put(np.full((c,), config.mask_init, np.float32)) for k, c in gm.widths.items()
    }
    effective = lambda p, m: site_masked_params(p, m, leaves, **common)
  else:
    masks = st.init_masks(params, config.mask_init)
    effective = lambda p, m: st.apply_autoprune_masks(p, m, **common)
  mask_steps = config.steps if config.mask_steps is None else config.mask_steps
  # After mask_steps: masks frozen (learning rate 0), weights fine-tuned.
  lr_w = optax.piecewise_constant_schedule(config.lr, {mask_steps: config.finetune_lr_factor})
  lr_m = optax.piecewise_constant_schedule(config.mask_lr, {mask_steps: 0.0})
  tx_w = make_tx(lr_w, momentum=config.momentum, weight_decay=config.weight_decay)
  tx_m = st.autoprune_masks(
    lr_m,
    strength=config.strength,
    regularizer=config.regularizer,
    ste=config.ste,
    alpha=config.alpha,
  )
  # The weights' update; the masks' gradient comes back beside it.
  update_w = make_train_step(
    lambda p, r, x, m: gm.apply(effective(p, m), r, x), tx_w, stateful=True
  )

  @jax.jit
  def step(params, masks, rest, opt_w, opt_m, x, y):
    params, rest, opt_w, loss, (gmask,) = update_w(params, rest, opt_w, x, y, masks)
    u, opt_m = tx_m.update(gmask, opt_m, masks)
    masks = optax.apply_updates(masks, u)
    return params, masks, rest, opt_w, opt_m, loss

  eff_jit = jax.jit(effective)
  kept_fn = jax.jit(lambda m: sum(jnp.sum(x > 0) for x in jax.tree.leaves(m)))
  n_masks = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(masks))
  opt_w, opt_m = tx_w.init(params), tx_m.init(masks)
  it = batches(train, seed)
  history = []
  dense_acc = evaluate(gm, params, rest, test)["acc"] if test else None
  tag = f"autoprune{'-structured' if config.structured else ''}/{config.ste}"
  log(f"[{tag}] dense acc {dense_acc}, {n_masks} masks")
  for i in range(config.steps):
    b = next(it)
    params, masks, rest, opt_w, opt_m, loss = step(
      params, masks, rest, opt_w, opt_m, b.image, b.label
    )
    last = i + 1 == config.steps
    if (config.eval_every and (i + 1) % config.eval_every == 0) or last:
      kept = int(kept_fn(masks))
      acc = evaluate(gm, eff_jit(params, masks), rest, test)["acc"] if test else None
      history.append({"step": i + 1, "loss": float(loss), "kept": kept, "acc": acc})
      log(
        f"  step {i + 1}: loss {float(loss):.4f}, kept {kept}/{n_masks} "
        f"({n_masks / max(kept, 1):.1f}x), acc {acc}"
      )
  final = eff_jit(params, masks)
  result = {
    "method": tag,
    "config": dataclasses.asdict(config),
    "dense_macs": counter.dense_macs,
    "dense_params": counter.dense_params,
    "dense_acc": dense_acc,
    "history": history,
  }
  if config.structured:
    alive = {k: np.asarray(v) > 0 for k, v in masks.items()}
    for k, v in alive.items():
      if not v.any():  # keep the best channel of an emptied layer
        v[int(np.argmax(np.asarray(masks[k])))] = True
    slim = remove_channels(gm.to_model(final, rest), alive, plan)
    slim_gm = GatedModel(slim, plan_for(slim, plan.input_shape))
    macs, n_params = counter.count(alive)
    result.update(
      {
        "widths": alive_widths(alive),
        "macs": macs,
        "params": n_params,
        "macs_fraction": macs / counter.dense_macs,
        "params_fraction": n_params / counter.dense_params,
        "measured": count_structure(slim, plan.input_shape),
        "acc": evaluate(gm, final, rest, test, alive)["acc"] if test else None,
        "slim_acc": (
          evaluate(slim_gm, slim_gm.params, slim_gm.rest, test)["acc"] if test else None
        ),
        "max_abs_output_diff": max_output_difference(
          gm, final, rest, alive, slim_gm, probe_inputs(test, plan)
        ),
      }
    )
    result["model"] = slim
  else:
    sparse = gm.to_model(final, rest)
    costs = flops_lib.flops_cost_tree(sparse, (1,) + plan.input_shape)
    p = nnx.to_pure_dict(nnx.state(sparse, nnx.Param))
    flags = optax_gsm.default_where(p)
    nnz = sparse_macs = 0
    n_elig = 0
    for leaf, cost, flag in zip(
      jax.tree.leaves(p), jax.tree.leaves(nnx.to_pure_dict(costs)), jax.tree.leaves(flags)
    ):
      if flag:
        nz = np.asarray(leaf) != 0
        nnz += int(nz.sum())
        n_elig += nz.size
        sparse_macs += int(np.sum(np.asarray(cost, np.int64) * nz))
    result.update(
      {
        "nonzero": nnz,
        "eligible": n_elig,
        "compression": n_elig / max(nnz, 1),
        "sparse_macs": sparse_macs,
        "macs_fraction": sparse_macs / counter.dense_macs,
        "acc": evaluate(gm, final, rest, test)["acc"] if test else None,
      }
    )
    result["model"] = sparse
  result["seconds"] = time.perf_counter() - t0
  return result


def autoprune_to_count(
  apply: Callable[[PyTree, jax.Array], jax.Array],
  params: PyTree,
  train: Any,
  *,
  num_nonzero: int,
  steps: int,
  mask_fraction: float = 0.7,
  ste: str = "softplus",
  strength: float = 1e-4,
  mask_lr: float = 0.1,
  mask_init: float = 1.0,
  lr: float = 0.01,
  momentum: float = 0.9,
  adjust_every: int | None = None,
  first_epoch: int = 0,
  scale_by_magnitude: bool = True,
  log: Callable[[str], None] = print,
) -> tuple[PyTree, dict[str, Any]]:
  """Unstructured AutoPrune that ends with exactly ``num_nonzero`` weights.

  For comparison tables at a fixed weight count Q. AutoPrune itself has no
  count target (:math:`\\lambda` sets the trade-off), so here
  :math:`\\lambda` is steered: every ``adjust_every`` updates it is multiplied
  by 1.5 while more than Q masks are open and divided by 1.5 otherwise (an
  addition to the paper, through ``optax.inject_hyperparams``). After
  ``mask_fraction`` of the updates, the Q weights with the largest
  :math:`m` (ties to the lower flat index) are kept, the masks are frozen and
  the kept weights fine-tune.

  Args:
    apply: ``apply(params, images) -> logits`` (pure).
    params: the starting weights (a nested dict).
    train: the training pipeline.
    num_nonzero: Q.
    steps: total updates.
    mask_fraction: share of the updates during which the masks train.
    ste, strength, mask_lr, mask_init: AutoPrune's settings
      (``strength`` is the starting :math:`\\lambda`).
    lr, momentum: the weights' SGD (no weight decay: pruned weights keep
      their values).
    adjust_every: the controller's period (default ``steps // 50``).
    first_epoch: data epoch to start at.
    scale_by_magnitude: start the masks at ``mask_init * |w| / mean|w|``
      per leaf (see :func:`optax_gsm.structured.init_masks`), so that a short
      budget degrades gracefully towards magnitude pruning rather than to an
      arbitrary cut among equal masks.
    log: progress printer.

  Returns:
    ``(pruned params with exactly Q non-zero eligible entries unless some
    kept weights are exactly 0, info dict)``.
  """
  masks = st.init_masks(params, mask_init, scale_by_magnitude=scale_by_magnitude)
  n_masks = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(masks))
  if not 1 <= num_nonzero <= n_masks:
    raise ValueError(f"`num_nonzero` must be in [1, {n_masks}], got {num_nonzero!r}.")
  mask_steps = int(round(steps * mask_fraction))
  adjust_every = adjust_every or max(1, steps // 50)
  tx_w = optax.sgd(lr, momentum=momentum)
  # alpha must stay a Python number: it is a static argument of the STE.
  tx_m = optax.inject_hyperparams(st.autoprune_masks, static_args=("alpha",))(
    learning_rate=mask_lr, strength=strength, ste=ste
  )
  update_w = make_train_step(
    lambda p, x, m: apply(st.apply_autoprune_masks(p, m, ste=ste), x), tx_w
  )

  @jax.jit
  def step(params, masks, opt_w, opt_m, x, y, train_masks):
    params, opt_w, loss, (gm,) = update_w(params, opt_w, x, y, masks)
    u, new_opt_m = tx_m.update(gm, opt_m, masks)
    new_masks = optax.apply_updates(masks, u)
    masks = jax.tree.map(lambda a, b: jnp.where(train_masks, a, b), new_masks, masks)
    return params, masks, opt_w, new_opt_m, loss

  kept_fn = jax.jit(lambda m: sum(jnp.sum(x > 0) for x in jax.tree.leaves(m)))
  opt_w, opt_m = tx_w.init(params), tx_m.init(masks)
  it = batches(train, first_epoch)
  history = []
  for i in range(steps):
    if i == mask_steps:
      # The final cut: exactly Q masks open (by the largest m), then frozen.
      leaves, treedef = jax.tree.flatten(masks)
      keep, _ = optax_gsm.top_q_keys([scores_to_keys(x) for x in leaves], num_nonzero)
      masks = jax.tree.unflatten(treedef, [jnp.where(k, 1.0, -1.0) for k in keep])
    b = next(it)
    params, masks, opt_w, opt_m, loss = step(
      params, masks, opt_w, opt_m, b.image, b.label, i < mask_steps
    )
    if i < mask_steps and (i + 1) % adjust_every == 0:
      kept = int(kept_fn(masks))
      lam = float(opt_m.hyperparams["strength"])
      lam = lam * 1.5 if kept > num_nonzero else lam / 1.5
      opt_m.hyperparams["strength"] = jnp.asarray(lam, jnp.float32)
      history.append({"step": i + 1, "kept": kept, "strength": lam, "loss": float(loss)})
  final = jax.jit(lambda p, m: st.apply_autoprune_masks(p, m, ste=ste))(params, masks)
  info = {
    "kept_before_cut": history[-1]["kept"] if history else n_masks,
    "final_strength": float(opt_m.hyperparams["strength"]),
    "mask_steps": mask_steps,
    "history": history,
  }
  log(
    f"  [autoprune] kept {info['kept_before_cut']} masks before the cut to "
    f"Q={num_nonzero}; final lambda {info['final_strength']:.2e}"
  )
  return final, info
