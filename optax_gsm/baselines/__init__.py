"""Connection-pruning baselines to compare GSM with, as optax transformations.

* Magnitude pruning with retraining (Han et al., NeurIPS 2015) and gradual
  pruning with TF-MOT's polynomial sparsity schedule (Zhu and Gupta, 2017):
  :func:`layerwise_threshold_prune`, :func:`polynomial_sparsity_schedule`,
  :func:`scheduled_magnitude_prune`; the global cut to Q is
  :func:`optax_gsm.magnitude_prune`.
* Fixed-mask retraining: :func:`masked_updates`, :func:`apply_masks`.
* Dynamic Network Surgery (Guo et al., NeurIPS 2016):
  :func:`dynamic_network_surgery`, :func:`surgery_forward`, :func:`dns_masks`.
* Layer-wise OBS (Dong et al., NeurIPS 2017): :func:`lobs_prune`,
  :func:`lobs_prune_layer`, :func:`layer_hessian`, :func:`conv_patches`.
* Lottery tickets (Frankle and Carbin, ICLR 2019) and GSM tickets:
  :func:`rewind`, :func:`imp_masks`, :func:`ticket_schedule`.
* One-shot global saliency pruning by :math:`|g w|`:
  :func:`init_saliency`, :func:`accumulate_saliency`, :func:`saliency_prune`.
* Dynamic sparse training, RigL (Evci et al., ICML 2020) and SET (Mocanu et
  al., Nature Communications 2018): :func:`rigl`,
  :func:`sparse_evolutionary_training`, :func:`sparse_training_masks`,
  :func:`drop_and_grow`; the uniform and Erdos-Renyi-Kernel layer densities
  :func:`layer_densities` and the per-layer cut :func:`density_prune`.

The library part depends only on jax, optax, chex and numpy.

Example:
  >>> import jax.numpy as jnp, optax, optax_gsm
  >>> from optax_gsm import baselines
  >>> params = {'w': jnp.array([[0.1, -2.0], [3.0, 0.2]])}
  >>> pruned, masks = optax_gsm.magnitude_prune(params, 2)
  >>> tx = optax.chain(optax.sgd(0.1), baselines.masked_updates(masks))
  >>> state = tx.init(pruned)
  >>> updates, state = tx.update({'w': jnp.ones((2, 2))}, state, pruned)
  >>> optax.apply_updates(pruned, updates)['w'].tolist()
  [[0.0, -2.0999999046325684], [2.9000000953674316, 0.0]]
"""

from optax_gsm.baselines.dns import DNSState
from optax_gsm.baselines.dns import dns_masks
from optax_gsm.baselines.dns import dns_thresholds
from optax_gsm.baselines.dns import dns_update_masks
from optax_gsm.baselines.dns import dynamic_network_surgery
from optax_gsm.baselines.dns import surgery_forward
from optax_gsm.baselines.lobs import HessianAccumulator
from optax_gsm.baselines.lobs import conv_patches
from optax_gsm.baselines.lobs import layer_hessian
from optax_gsm.baselines.lobs import lobs_prune
from optax_gsm.baselines.lobs import lobs_prune_layer
from optax_gsm.baselines.lottery import imp_masks
from optax_gsm.baselines.lottery import rewind
from optax_gsm.baselines.lottery import ticket_schedule
from optax_gsm.baselines.magnitude import ScheduledPruneState
from optax_gsm.baselines.magnitude import find_state
from optax_gsm.baselines.magnitude import layerwise_threshold_prune
from optax_gsm.baselines.magnitude import polynomial_sparsity_schedule
from optax_gsm.baselines.magnitude import scheduled_magnitude_prune
from optax_gsm.baselines.magnitude import scheduled_masks
from optax_gsm.baselines.masking import MaskedUpdatesState
from optax_gsm.baselines.masking import apply_masks
from optax_gsm.baselines.masking import count_kept
from optax_gsm.baselines.masking import mask_leaves
from optax_gsm.baselines.masking import masked_updates
from optax_gsm.baselines.masking import top_q_masks
from optax_gsm.baselines.saliency import accumulate_saliency
from optax_gsm.baselines.saliency import init_saliency
from optax_gsm.baselines.saliency import saliency_prune
from optax_gsm.baselines.sparse_training import RigLState
from optax_gsm.baselines.sparse_training import SETState
from optax_gsm.baselines.sparse_training import density_prune
from optax_gsm.baselines.sparse_training import drop_and_grow
from optax_gsm.baselines.sparse_training import layer_densities
from optax_gsm.baselines.sparse_training import rigl
from optax_gsm.baselines.sparse_training import sparse_evolutionary_training
from optax_gsm.baselines.sparse_training import sparse_training_masks

__all__ = (
  "DNSState",
  "HessianAccumulator",
  "MaskedUpdatesState",
  "RigLState",
  "ScheduledPruneState",
  "SETState",
  "accumulate_saliency",
  "apply_masks",
  "conv_patches",
  "count_kept",
  "density_prune",
  "dns_masks",
  "dns_thresholds",
  "dns_update_masks",
  "drop_and_grow",
  "dynamic_network_surgery",
  "find_state",
  "imp_masks",
  "init_saliency",
  "layer_densities",
  "layer_hessian",
  "layerwise_threshold_prune",
  "lobs_prune",
  "lobs_prune_layer",
  "mask_leaves",
  "masked_updates",
  "polynomial_sparsity_schedule",
  "rewind",
  "rigl",
  "saliency_prune",
  "scheduled_magnitude_prune",
  "scheduled_masks",
  "sparse_evolutionary_training",
  "sparse_training_masks",
  "surgery_forward",
  "ticket_schedule",
  "top_q_masks",
)
