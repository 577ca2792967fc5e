r"""Structured pruning experiments: Taylor, Fisher and AutoPrune on NNX models.

Three procedures, built on :mod:`optax_gsm.structured`:

* **Taylor feature-map pruning** (Molchanov et al., ICLR 2017;
  ``criterion="taylor"``) and its gate variant (Molchanov et al., CVPR 2019;
  ``criterion="taylor_gate"``), and **Fisher pruning** (Theis et al. 2018;
  ``criterion="fisher"``), all by :func:`greedy_prune`: fine-tune a few
  updates while accumulating per-example gate gradients, remove the globally
  lowest-ranked feature map (its gate goes to 0), repeat until each FLOPs (or
  parameter) target is met; then fine-tune a snapshot at each target and cut
  the removed channels out for real (:func:`remove_channels`).
* **AutoPrune** (Xiao et al., NeurIPS 2019) by :func:`autoprune`:
  unstructured (one mask parameter per weight) or structured (one per
  neuron / filter), with the Softplus, LeakyReLU or linear straight-through
  estimate.
* :func:`gsm_baseline`: GSM (``optax_gsm.gsm``) at a given number of
  non-zero weights, for comparison.

The package, one module per part (every name below is importable from
``experiments.structured`` itself):

* :mod:`~experiments.structured.plans`: which channels can go and which
  tensors hold them (:class:`Site`, :class:`Plan`, :func:`plan_for`,
  :func:`site_widths`).
* :mod:`~experiments.structured.gating`: gated forward passes
  (:func:`gates_on`, :class:`GatedModel`, :func:`per_example_gate_grads`).
  A gate multiplies the output of a layer's last linear or normalisation op
  before its ReLU; it is put in by swapping that sub-module, on one model
  instance and for one call, for a :class:`GatePoint` wrapper. No class is
  patched and no global state changes.
* :mod:`~experiments.structured.counting`: MACs and parameters as a function
  of the alive channels (:class:`StructureCounter`, :func:`count_structure`).
* :mod:`~experiments.structured.surgery`: the physically smaller model
  (:func:`remove_channels`); its outputs equal the gated model's.
* :mod:`~experiments.structured.tuning`: the shared training pieces
  (:func:`make_tx`, :func:`batches`, :func:`evaluate`, :func:`train_dense`);
  every step is :func:`experiments.training.make_train_step`.
* :mod:`~experiments.structured.greedy`: Taylor, gate Taylor and Fisher
  (:class:`GreedyConfig`, :func:`greedy_prune`).
* :mod:`~experiments.structured.masking`: AutoPrune (:class:`AutoPruneConfig`,
  :func:`autoprune`, :func:`autoprune_to_count`).
* :mod:`~experiments.structured.baseline`: :func:`gsm_baseline`.
* :mod:`~experiments.structured.zoo` and
  :mod:`~experiments.structured.checkpoints`: models, data, weights and
  result files; :mod:`~experiments.structured.cli`: the command line.

Command line (results go to ``runs/structured/``, git-ignored, unless ``--out``
names a JSON file; its folder's lock file ``.<name>.lock`` is held while the
command runs, see :func:`experiments.fileio.lock_output`)::

  python -m experiments.structured pretrain --model lenet5
  python -m experiments.structured taylor --model lenet5
  python -m experiments.structured fisher --model lenet5
  python -m experiments.structured autoprune --model lenet5 --ste softplus
  python -m experiments.structured gsm --model lenet5 --num-nonzero 1400
  python -m experiments.structured taylor --model vgg_small --dataset cifar10 --mock 64

Example:
  >>> import numpy as np
  >>> from experiments import structured as S
  >>> model = S.build_model("lenet5")
  >>> plan = S.plan_for(model)
  >>> alive = {k: np.arange(c) < c // 4 for k, c in S.site_widths(model, plan).items()}
  >>> S.count_structure(S.remove_channels(model, alive, plan))
  {'macs': 193250, 'params': 27027}
"""

from experiments.structured.baseline import gsm_baseline
from experiments.structured.checkpoints import load_params, save_params, write_result
from experiments.structured.cli import (
  REPO_ROOT,
  RESULTS_DIR,
  WORK_DIR_ENV,
  build_parser,
  main,
  output_path,
  run,
)
from experiments.structured.counting import StructureCounter, count_structure
from experiments.structured.gating import (
  GatedModel,
  GatePoint,
  PyTree,
  gate_vectors,
  gates_on,
  per_example_gate_grads,
)
from experiments.structured.greedy import CRITERIA, GreedyConfig, greedy_prune
from experiments.structured.masking import (
  AutoPruneConfig,
  autoprune,
  autoprune_to_count,
  site_masked_params,
)
from experiments.structured.plans import ModulePath, Plan, Site, module_at, plan_for, site_widths
from experiments.structured.surgery import alive_widths, remove_channels
from experiments.structured.tuning import (
  batches,
  evaluate,
  logits_fn,
  make_tx,
  max_output_difference,
  model_accuracy,
  probe_inputs,
  train_dense,
)
from experiments.structured.zoo import (
  MODEL_NAMES,
  VGG_SMALL_LAYOUT,
  build_model,
  dataset_of,
  load_pipelines,
)

from experiments.training import cross_entropy_loss as cross_entropy

# Private names that tests and benchmarks/structured_latency.py reach for.
from experiments.structured.masking import _site_leaves as _site_leaves

_gate_vectors = gate_vectors

__all__ = [
  "AutoPruneConfig",
  "CRITERIA",
  "GatePoint",
  "GatedModel",
  "GreedyConfig",
  "MODEL_NAMES",
  "ModulePath",
  "Plan",
  "PyTree",
  "REPO_ROOT",
  "RESULTS_DIR",
  "Site",
  "StructureCounter",
  "VGG_SMALL_LAYOUT",
  "WORK_DIR_ENV",
  "alive_widths",
  "autoprune",
  "autoprune_to_count",
  "batches",
  "build_model",
  "build_parser",
  "count_structure",
  "cross_entropy",
  "dataset_of",
  "evaluate",
  "gate_vectors",
  "gates_on",
  "greedy_prune",
  "gsm_baseline",
  "load_params",
  "load_pipelines",
  "logits_fn",
  "main",
  "make_tx",
  "max_output_difference",
  "model_accuracy",
  "module_at",
  "output_path",
  "per_example_gate_grads",
  "plan_for",
  "probe_inputs",
  "remove_channels",
  "run",
  "save_params",
  "site_masked_params",
  "site_widths",
  "train_dense",
  "write_result",
]
