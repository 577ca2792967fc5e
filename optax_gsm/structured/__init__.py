"""Structured (feature-map) pruning and AutoPrune masks.

* Channel gates (:func:`apply_gate`) turn feature-map importance into an
  ordinary gradient: :math:`\\gamma \\, \\partial L / \\partial \\gamma` equals
  the spatial sum of :math:`a \\, \\partial L / \\partial a`.
* Criteria from running sums of per-example gate gradients
  (:class:`GateStats`): Taylor first order (Molchanov et al. 2017), the gate
  Taylor score (Molchanov et al. 2019) and Fisher pruning (Theis et al.
  2018); :func:`l2_normalize`, :func:`cost_adjusted` and the greedy
  :func:`lowest_ranked`.
* AutoPrune (Xiao et al. 2019): :func:`masked_weight` (hard gate, three
  straight-through estimates, sign-decoupled chain rule) and the mask
  optimiser :func:`autoprune_masks`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from optax_gsm import structured
  >>> x = jnp.arange(1.0, 5.0).reshape(1, 2, 2, 1)
  >>> loss = lambda g: jnp.sum(structured.apply_gate(x, g) ** 2) / 2
  >>> jax.grad(loss)(jnp.ones(1)).tolist()   # sum(a * dL/da) = sum(a^2)
  [30.0]
"""

from optax_gsm.structured.autoprune import REGULARIZERS
from optax_gsm.structured.autoprune import AutoPruneRegularizerState
from optax_gsm.structured.autoprune import apply_autoprune_masks
from optax_gsm.structured.autoprune import autoprune_masks
from optax_gsm.structured.autoprune import autoprune_regularizer
from optax_gsm.structured.autoprune import init_masks
from optax_gsm.structured.autoprune import mask_regularizer_grad
from optax_gsm.structured.criteria import GateStats
from optax_gsm.structured.criteria import accumulate_gate_stats
from optax_gsm.structured.criteria import cost_adjusted
from optax_gsm.structured.criteria import fisher
from optax_gsm.structured.criteria import init_gate_stats
from optax_gsm.structured.criteria import l2_normalize
from optax_gsm.structured.criteria import lowest_ranked
from optax_gsm.structured.criteria import per_example_from_activations
from optax_gsm.structured.criteria import taylor_first_order
from optax_gsm.structured.criteria import taylor_gate
from optax_gsm.structured.gates import apply_gate
from optax_gsm.structured.gates import ones_gates
from optax_gsm.structured.ste import STE_KINDS
from optax_gsm.structured.ste import binary_gate
from optax_gsm.structured.ste import binary_step
from optax_gsm.structured.ste import masked_weight
from optax_gsm.structured.ste import ste_derivative

__all__ = (
  "AutoPruneRegularizerState",
  "GateStats",
  "REGULARIZERS",
  "STE_KINDS",
  "accumulate_gate_stats",
  "apply_autoprune_masks",
  "apply_gate",
  "autoprune_masks",
  "autoprune_regularizer",
  "binary_gate",
  "binary_step",
  "cost_adjusted",
  "fisher",
  "init_gate_stats",
  "init_masks",
  "l2_normalize",
  "lowest_ranked",
  "mask_regularizer_grad",
  "masked_weight",
  "ones_gates",
  "per_example_from_activations",
  "ste_derivative",
  "taylor_first_order",
  "taylor_gate",
)
