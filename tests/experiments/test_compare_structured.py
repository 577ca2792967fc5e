"""The structured methods (Taylor, gate Taylor, Fisher) in the comparison table.

Their channel surgery and criteria are tested in test_structured.py; here: the
weight-count target, the budget, the not-applicable path, one quick run end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flax import nnx

from experiments import compare
from experiments import structured as S
from experiments.methods import collect_methods
from experiments.methods import structured as M
from experiments.methods.common import QUICK_BUDGET, Context
from experiments.training import param_dict

GREEDY = ("taylor", "taylor_gate", "fisher")


def test_registered_with_notes():
  methods = collect_methods()
  for name in GREEDY:
    assert methods[name] is getattr(M, f"run_{name}")
    assert name in compare.METHOD_NOTES


@pytest.mark.parametrize(
  "name,kernels,others",
  [
    # 784*1 + 1*1 + 1*10 kernels; biases 1 + 1 + 10.
    ("lenet_300_100", 795, 12),
    # conv1 5*5*1*1, conv2 5*5*1*1, fc1 (4*4*1)*1, fc2 1*10; biases 1 + 1 + 1 + 10.
    ("lenet5", 76, 13),
  ],
)
def test_smallest_structure_splits_kernels_and_biases(name, kernels, others):
  model = S.build_model(name)
  assert M.smallest_structure(model, S.plan_for(model)) == (kernels, others)


def test_unsupported_model_is_not_applicable(tmp_path: Path):
  module = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  params = param_dict(module)
  ctx = Context(
    model="linear",
    dataset="mnist",
    compression=2.0,
    num_nonzero=6,
    num_eligible=12,
    budget=QUICK_BUDGET,
    module=module,
    apply=None,
    init_params=params,
    base_params=params,
    base_acc=0.0,
    train=None,
    test=None,
    cache_dir=tmp_path,
  )
  with pytest.raises(compare.NotApplicable, match="no prunable channels"):
    M.run_taylor(ctx)


def test_structured_methods_quick_on_real_mnist(
  tmp_path: Path, mnist_builder, tfds_data_dir: Path, shared_datasets: Path
):
  """Each method at a tiny budget: <= Q kernels, well above chance; n/a below the
  smallest structure (1000x leaves Q = 266 < 795)."""
  del mnist_builder  # prepared into tfds_data_dir
  args = [
    "mnist",
    "--quick",
    "--models",
    "lenet_300_100",
    "--compressions",
    "10",
    "1000",
    "--out",
    str(tmp_path),
    "--data-dir",
    str(tfds_data_dir),
    "--manual-dir",
    str(shared_datasets / "mnist"),
    "--methods",
    *GREEDY,
  ]
  assert compare.main(args) == 0
  results = json.loads((tmp_path / "mnist_quick.json").read_text())
  spe = results["data"]["steps_per_epoch"]
  n = results["bases"]["lenet_300_100"]["num_eligible"]
  q = round(n / 10)
  cells = {(c["method"], c["compression"]): c for c in results["cells"]}
  assert len(cells) == 6
  for name in GREEDY:
    c = cells[name, 10.0]
    e = c["extra"]
    assert c["num_nonzero"] == q
    # At most Q, and not far below: one fc1 neuron holds 784 + 100 kernel weights.
    assert 0.9 * q <= c["nonzeros"] <= e["slim_kernels"] <= q, (name, c)
    assert c["test_acc"] > 0.5, (name, c["test_acc"])
    assert e["max_abs_output_diff"] < 1e-4  # sliced model == gated model
    assert e["macs_after"] < e["macs_before"]
    assert e["widths"]["fc1"] < 300
    # The quick budget (32 updates) is shorter than the removals: one update
    # per removal, and the fine-tuning keeps 30% of the budget.
    assert e["steps_per_removal"] == 1 and e["prune_updates"] == e["removals"]
    assert e["finetune_updates"] == round(0.3 * QUICK_BUDGET.epochs * spe)
    assert c["epochs"] == pytest.approx(
      (e["prune_updates"] + e["finetune_updates"]) / spe, abs=1e-3
    )
    na = cells[name, 1000.0]
    assert "795 kernel weights" in na["not_applicable"] and "test_acc" not in na
  md = (tmp_path / "mnist_quick.md").read_text()
  rows = [line for line in md.splitlines() if line.startswith("| taylor | ")]
  assert rows[0].endswith(" | n/a |") and "n/a" not in rows[0][:-6], rows  # 10x, 1000x
  assert "n/a: the method cannot run this cell:" in md
  assert "- fisher at 1000x: Q=266 is below the 795 kernel weights" in md
  assert (tmp_path / "mnist_quick.png").exists()
