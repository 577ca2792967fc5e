"""optax-gsm: Global Sparse Momentum SGD as composable optax transformations.

GSM (Ding et al., NeurIPS 2019) prunes a network while it trains: at every
step only the Q weights with the largest first-order Taylor score
``|dL/dw * w|`` across the whole model receive the loss gradient, every weight
keeps momentum and weight decay, and the others decay towards zero. After
training, :func:`magnitude_prune` keeps the Q largest magnitudes.
"""

from optax_gsm.eligibility import count_eligible
from optax_gsm.eligibility import default_where
from optax_gsm.pruning import magnitude_prune
from optax_gsm.report import LeafSparsity
from optax_gsm.report import SparsityReport
from optax_gsm.report import sparsity_report
from optax_gsm.selection import scores_to_keys
from optax_gsm.selection import top_q_keys
from optax_gsm.transform import GlobalTopQState
from optax_gsm.transform import global_top_q
from optax_gsm.transform import gsm

__version__ = "0.1.0"

__all__ = (
    "GlobalTopQState",
    "LeafSparsity",
    "SparsityReport",
    "count_eligible",
    "default_where",
    "global_top_q",
    "gsm",
    "magnitude_prune",
    "scores_to_keys",
    "sparsity_report",
    "top_q_keys",
)
