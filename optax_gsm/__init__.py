"""optax-gsm: Global Sparse Momentum SGD as composable optax transformations.

GSM (Ding et al., NeurIPS 2019) prunes a network while it trains: at every
step only the Q weights with the largest first-order Taylor score
``|dL/dw * w|`` across the whole model receive the loss gradient, every weight
keeps momentum and weight decay, and the others decay towards zero. After
training, :func:`magnitude_prune` keeps the Q largest magnitudes.
"""

from optax_gsm.budget import budget_prune
from optax_gsm.budget import budget_select
from optax_gsm.budget import bytes_cost_tree
from optax_gsm.budget import cost_tree
from optax_gsm.budget import total_cost
from optax_gsm.eligibility import count_eligible
from optax_gsm.eligibility import default_where
from optax_gsm.pruning import magnitude_prune
from optax_gsm.report import LeafSparsity
from optax_gsm.report import SparsityReport
from optax_gsm.report import sparsity_report
from optax_gsm.sensitivity import SensitivityResult
from optax_gsm.sensitivity import accumulate_selection_counts
from optax_gsm.sensitivity import layer_sensitivity
from optax_gsm.sparse_io import SparseFileError
from optax_gsm.sparse_io import SparseFileInfo
from optax_gsm.sparse_io import load_sparse
from optax_gsm.sparse_io import save_sparse
from optax_gsm.sparse_io import sparse_file_report
from optax_gsm.schedules import compression_ramp
from optax_gsm.selection import top_q_keys
from optax_gsm.transform import DEFAULT_UNSELECTED_SHRINK
from optax_gsm.transform import GlobalTopQState
from optax_gsm.transform import global_top_q
from optax_gsm.transform import gsm

__version__ = "0.1.0"

__all__ = (
  "DEFAULT_UNSELECTED_SHRINK",
  "GlobalTopQState",
  "LeafSparsity",
  "SensitivityResult",
  "SparseFileError",
  "SparseFileInfo",
  "SparsityReport",
  "accumulate_selection_counts",
  "budget_prune",
  "budget_select",
  "bytes_cost_tree",
  "compression_ramp",
  "cost_tree",
  "count_eligible",
  "default_where",
  "global_top_q",
  "gsm",
  "layer_sensitivity",
  "load_sparse",
  "magnitude_prune",
  "save_sparse",
  "sparse_file_report",
  "sparsity_report",
  "top_q_keys",
  "total_cost",
)
