"""RigL and SET in the comparison table: registration, schedule, a quick run on real MNIST."""

from __future__ import annotations

import json
from pathlib import Path

from experiments import compare
from experiments.methods import collect_methods
from experiments.methods import sparse_training as M

NAMES = ("rigl", "set")


def test_registered_with_notes():
  methods = collect_methods()
  assert methods["rigl"] is M.run_rigl and methods["set"] is M.run_set
  for name in NAMES:
    assert name in compare.METHOD_NOTES


def test_topology_schedule():
  # The default budget on MNIST: 2340 updates, T_end 1755, every 100: 17 updates.
  assert M.topology_schedule(2340) == (1755, 100)
  # LeNet-5's 3 epochs: 702 updates, T_end 526, every 100 (526 // 5 = 105).
  assert M.topology_schedule(702) == (526, 100)
  # The quick budget's 32 updates: T_end 24, every 4.
  assert M.topology_schedule(32) == (24, 4)
  assert M.topology_schedule(1) == (1, 1)


def test_rigl_and_set_quick_on_real_mnist(
  tmp_path: Path, mnist_builder, tfds_data_dir: Path, shared_datasets: Path
):
  """Both at a tiny budget: ERK layer counts summing to Q, kept through the run,
  the topology moved, accuracy well above chance."""
  del mnist_builder  # prepared into tfds_data_dir
  args = [
    "mnist",
    "--quick",
    "--models",
    "lenet_300_100",
    "--compressions",
    "30",
    "--out",
    str(tmp_path),
    "--data-dir",
    str(tfds_data_dir),
    "--manual-dir",
    str(shared_datasets / "mnist"),
    "--methods",
    *NAMES,
  ]
  assert compare.main(args) == 0
  results = json.loads((tmp_path / "mnist_quick.json").read_text())
  n = results["bases"]["lenet_300_100"]["num_eligible"]
  q = round(n / 30)
  cells = {c["method"]: c for c in results["cells"]}
  assert set(cells) == set(NAMES)
  # ERK at 30x (density 8873 / 266200): eps = 8873 / (1084 + 400 + 110) and each
  # layer keeps eps * (sum of its dims); fc3's 0.11 * eps = 0.61 stays below 1.
  eps = q / 1594
  want = {
    "['fc1']['kernel']": eps * 1084,
    "['fc2']['kernel']": eps * 400,
    "['fc3']['kernel']": eps * 110,
  }
  for name, c in cells.items():
    e = c["extra"]
    assert c["num_nonzero"] == q
    assert sum(e["layer_counts"].values()) == q
    for path, count in e["layer_counts"].items():
      assert abs(count - want[path]) < 1, (name, path, count)
    # Exactly Q mask entries; a weight grown at the last topology update may
    # still be exactly 0, so the non-zeros are at most Q.
    assert 0.99 * q <= c["nonzeros"] <= q, (name, c["nonzeros"])
    assert (e["end_step"], e["update_interval"], e["mask_updates"]) == (24, 4, 5)
    assert e["moved"] > 0
    assert c["test_acc"] > 0.5, (name, c["test_acc"])
  md = (tmp_path / "mnist_quick.md").read_text()
  for name in NAMES:
    assert f"| {name} |" in md
  assert "ERK start;" in md and "topology updates" in md
