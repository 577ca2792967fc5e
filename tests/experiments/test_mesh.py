"""``--mesh``: the experiments CLI on 8 emulated CPU devices.

LeNet-5 on the real MNIST files with a tiny budget (1 base epoch, 2 GSM epochs
of 2 steps each), once on one device and once on a ``data=4,model=2`` mesh:
batches split in 4, ``conv2`` and ``fc1`` kernels (and their momentum) split in
2.  The mesh run is killed halfway through its second GSM epoch and resumed
under the mesh, so the final parameters also check that the orbax checkpoints
restore into the mesh's shardings.

Every run is a separate ``python -m experiments.run`` process: the device count
is fixed when JAX starts (``XLA_FLAGS=--xla_force_host_platform_device_count=8``),
and this pytest process may already run JAX on one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.training import STOP_EXIT_CODE

REPO_ROOT = Path(__file__).resolve().parents[2]
MESH = "data=4,model=2"
OVERRIDES = [
  "train.epochs=1",
  "train.warmup_epochs=0",
  "train.boundaries=()",
  "gsm.epochs=2",
  "gsm.warmup_epochs=0",
  "gsm.boundaries=()",
  "data.train_subset=512",
  "data.eval_subset=1000",
]
# Float32 summation order is all that differs between the two runs (see
# test_mesh_run_matches_one_device).  Measured after the 6 steps of this run
# (2 base, 4 GSM; jax 0.10, XLA:CPU): at most 3e-8 absolute with conv2 sharded
# on its output channels, and 6.4e-7 absolute (on a conv1 bias of 2.9e-4) with
# conv2 sharded on its input channels, whose contraction then sums partial
# products across devices.  The bound ATOL + RTOL * |w| is 3x that and more,
# while a real error (a batch shard left out of the mean, a selection that is
# not global, a wrongly restored checkpoint) moves weights by about lr * |g|,
# 1e-5 and more.
ATOL = 2e-6
RTOL = 1e-5
# Weights allowed to differ by more: selection flips at the top-Q edge.
MAX_FLIPS = 50


def run_cli(
  out: Path, data_dir: Path, cache: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
    os.pathsep
  )
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  env["OPTAX_GSM_JAX_CACHE"] = str(cache)  # later processes skip XLA compilation
  cmd = [
    sys.executable,
    "-m",
    "experiments.run",
    "lenet5_125x",
    "--quick",
    "--out",
    str(out),
    "--data-dir",
    str(data_dir),
    "--no-download",
    "--no-progress",
    *extra,
  ]
  return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def load_on_one_device(path: Path) -> dict:
  """An orbax item as host-side numpy arrays, whatever mesh wrote it.

  A checkpoint written on a mesh records that mesh's devices; restoring it in
  a process with other devices needs an explicit target.
  """
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path.absolute())
    meta = getattr(meta, "item_metadata", meta)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    return jax.tree.map(np.asarray, ckptr.restore(path.absolute(), target))


def eligible_kernels(state: dict) -> dict[str, np.ndarray]:
  """The eligible leaves (ndim >= 2: conv and dense kernels) by path."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  # Checkpointed nnx state ends its paths in ["value"]; the pruned model does not.
  return {
    jax.tree_util.keystr(p).removesuffix("['value']"): np.asarray(x)
    for p, x in leaves
    if np.ndim(x) >= 2
  }


@pytest.fixture(scope="module")
def runs(
  tmp_path_factory: pytest.TempPathFactory, tfds_data_dir: Path, mnist_builder, jax_cache_dir: Path
) -> dict[str, Path]:
  """The one-device run and the mesh run (killed once, then resumed)."""
  del mnist_builder  # MNIST is prepared in the session data dir
  root = tmp_path_factory.mktemp("mesh")
  plain, mesh = root / "plain", root / "mesh"
  args = (tfds_data_dir, jax_cache_dir)
  done = run_cli(plain, *args, "--overrides", *OVERRIDES)
  assert done.returncode == 0, done.stderr[-3000:]
  crashed = run_cli(
    mesh, *args, "--mesh", MESH, "--stop-after-epoch", "gsm:1", "--overrides", *OVERRIDES
  )
  assert crashed.returncode == STOP_EXIT_CODE, crashed.stderr[-3000:]
  assert f"[mesh] {MESH}: 8 cpu devices" in crashed.stdout
  resumed = run_cli(mesh, *args, "--mesh", MESH, "--resume", "--overrides", *OVERRIDES)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "[gsm] resumed from" in resumed.stdout and "(epoch 1)" in resumed.stdout
  return {"plain": plain, "mesh": mesh}


def test_mesh_run_matches_one_device(runs: dict[str, Path]) -> None:
  """Same seed, same batches: the final GSM parameters agree to float32
  rounding, except for a handful of weights at the edge of the top-Q set.

  Bitwise equality is not expected.  On the mesh each device sums the loss
  gradient over its quarter of the batch and the partial sums are
  all-reduced, and the FSDP-sharded ``fc1`` / ``conv2`` contractions are
  split over the ``model`` axis: other float32 summation orders than one
  device's, so the gradients differ in the last bits.  GSM's selection is
  exact and global (its masks are bitwise the one-device masks for a given
  gradient, tests/optax_gsm/test_distributed.py), but a weight whose score
  is within rounding of the Q-th score can then be selected in one run and
  not in the other, and that weight moves by about lr * |g| (measured: 0 to
  5 of the 430,500 weights differ by up to 4e-4, all in conv2; every other
  entry agrees within ATOL + RTOL * |w|).  A real error (a batch shard left
  out of the mean, a selection that is not global, a wrongly restored
  checkpoint) moves every weight that gets a gradient, so the test allows
  at most MAX_FLIPS entries outside the rounding bound.
  """
  plain = load_on_one_device(runs["plain"] / "gsm" / "checkpoints" / "2" / "model")
  mesh = load_on_one_device(runs["mesh"] / "gsm" / "checkpoints" / "2" / "model")
  flat_plain = jax.tree_util.tree_flatten_with_path(plain)[0]
  flat_mesh = jax.tree_util.tree_flatten_with_path(mesh)[0]
  assert [p for p, _ in flat_plain] == [p for p, _ in flat_mesh]
  outside = {}
  for (path, want), (_, got) in zip(flat_plain, flat_mesh):
    want, got = np.asarray(want), np.asarray(got)
    assert got.shape == want.shape and got.dtype == want.dtype
    far = np.abs(got - want) > ATOL + RTOL * np.abs(want)
    if far.any():
      outside[jax.tree_util.keystr(path)] = int(far.sum())
  assert sum(outside.values()) <= MAX_FLIPS, outside
  # Test accuracies are counts; a flipped weight may move a few examples.
  hist = {
    name: json.loads((out / "results.json").read_text())["phases"]["gsm"]["history"]
    for name, out in runs.items()
  }
  for h_mesh, h_plain in zip(hist["mesh"], hist["plain"], strict=True):
    assert abs(h_mesh["test_acc"] - h_plain["test_acc"]) <= 3 / 1000


def test_pruned_models_keep_exactly_q(runs: dict[str, Path]) -> None:
  """Both cuts keep exactly Q non-zero eligible weights, the same ones up to
  weights whose magnitude is within rounding of the cut, or within the
  distance a selection flip moved them (see
  test_mesh_run_matches_one_device)."""
  q = round(430_500 / 125)
  kept = {}
  for name, out in runs.items():
    results = json.loads((out / "results.json").read_text())
    assert results["target"]["num_nonzero"] == q
    assert results["phases"]["prune"]["gsm"]["nonzeros_after"] == q
    kernels = eligible_kernels(load_on_one_device(out / "prune" / "pruned_model"))
    assert sum(int(np.count_nonzero(k)) for k in kernels.values()) == q, name
    kept[name] = kernels
  gsm = eligible_kernels(load_on_one_device(runs["plain"] / "gsm" / "checkpoints" / "2" / "model"))
  gsm_mesh = eligible_kernels(
    load_on_one_device(runs["mesh"] / "gsm" / "checkpoints" / "2" / "model")
  )
  magnitudes = np.concatenate([np.abs(k).ravel() for k in gsm.values()])
  cut = np.sort(magnitudes)[-q]
  for path, k in kept["plain"].items():
    differ = (k != 0) != (kept["mesh"][path] != 0)
    # How far the two runs put each weight: rounding, or a flip's step.
    moved = np.abs(gsm_mesh[path] - gsm[path]) + 2 * ATOL
    assert np.all(np.abs(np.abs(gsm[path]) - cut)[differ] <= moved[differ]), path


def test_results_record_the_mesh(runs: dict[str, Path]) -> None:
  results = json.loads((runs["mesh"] / "results.json").read_text())
  mesh = results["environment"]["mesh"]
  assert mesh["spec"] == MESH and mesh["shape"] == {"data": 4, "model": 2}
  assert mesh["devices"] == 8 and mesh["batch_spec"] == ["data"]
  # Leaves of >= 2**14 entries, split on their largest even axis other than
  # the last (conv2: 5x5x20x50 on its 20 input channels).
  assert mesh["sharded_leaves"] == {
    "['conv2']['kernel']": ["None", "None", "model"],
    "['fc1']['kernel']": ["model"],
  }
  for phase in ("train", "gsm"):
    assert results["phases"][phase]["mesh"] == mesh
  assert results["phases"]["gsm"]["resumed_from"] == 1
  plain = json.loads((runs["plain"] / "results.json").read_text())
  assert "mesh" not in plain["environment"] and "mesh" not in plain["phases"]["gsm"]


@pytest.mark.parametrize(
  "spec, extra, message",
  [
    ("data=3,model=2", [], "has 3 x 2 = 6 devices, but there are 8 devices"),
    ("foo=8", [], "unknown axis 'foo'"),
    ("data=x", [], "size 'x' of axis 'data' is not an integer"),
    (
      "data=8",
      ["--overrides", "data.batch_size=100"],
      "data.batch_size 100 is not divisible by the size 8 of mesh axis 'data'",
    ),
  ],
)
def test_bad_mesh_is_a_usage_error(
  tmp_path: Path, jax_cache_dir: Path, spec: str, extra: list[str], message: str
) -> None:
  """A bad ``--mesh`` exits with status 2 and names the flag, the value and
  the problem, before any output folder, data or model exists."""
  out = tmp_path / "out"
  done = run_cli(out, tmp_path / "no_data", jax_cache_dir, "--mesh", spec, *extra)
  assert done.returncode == 2, done.stderr[-3000:]
  assert f"error: --mesh {spec!r}: " in done.stderr
  assert message in done.stderr
  assert "Traceback" not in done.stderr
  assert not out.exists()
