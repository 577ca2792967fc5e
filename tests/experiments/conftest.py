"""Shared fixtures of the experiments tests.

TFDS data prepared here lives in one temporary data directory per test session,
so MNIST (and Fashion-MNIST) are built once however many tests use them.  The
real dataset files come from ``<repo>/../shared/datasets``; tests that need them
are skipped where that folder does not exist.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) from elsewhere
  sys.path.insert(0, str(REPO_ROOT))

SHARED_DATASETS = REPO_ROOT / ".." / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
  """``<repo>/../shared/datasets`` with the real MNIST / Fashion-MNIST files."""
  path = SHARED_DATASETS.resolve()
  if not (path / "mnist").is_dir():
    pytest.skip(f"real datasets not available at {path}")
  return path


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
  """One TFDS data directory for the whole session (both MNISTs go in here)."""
  return tmp_path_factory.mktemp("tensorflow_datasets")


@pytest.fixture(scope="session")
def mnist_builder(tfds_data_dir: Path, shared_datasets: Path):
  """MNIST prepared offline from the shared files into the session data dir."""
  from experiments import data

  return data.prepare("mnist", data_dir=tfds_data_dir, manual_dir=shared_datasets / "mnist")


@pytest.fixture(scope="session")
def fashion_mnist_builder(tfds_data_dir: Path, shared_datasets: Path, mnist_builder):
  """Fashion-MNIST prepared into the *same* data dir, after MNIST (the pitfall order)."""
  from experiments import data

  del mnist_builder  # only forces the order: MNIST first
  if not (shared_datasets / "fashion_mnist").is_dir():
    pytest.skip("Fashion-MNIST files not available")
  return data.prepare(
    "fashion_mnist", data_dir=tfds_data_dir, manual_dir=shared_datasets / "fashion_mnist"
  )


@pytest.fixture(scope="session")
def jax_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
  """A persistent XLA compilation cache shared by the subprocesses of a session."""
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="session")
def split_arrays():
  """``split_arrays(builder, split)``: :func:`experiments.data.load_arrays`, cached
  for the session (decoding 60,000 PNGs takes seconds)."""
  from experiments import data

  cache: dict[tuple[str, str, str], tuple] = {}

  def get(builder, split: str):
    key = (str(builder.data_dir), builder.name, split)
    if key not in cache:
      cache[key] = data.load_arrays(builder, split)
    return cache[key]

  return get


@pytest.fixture(scope="session")
def built_model():
  """``built_model(name)``: a freshly initialised registry model, built once per
  session (initialising DenseNet-40 or ResNet-50 takes ~10 s on 2 cores) and
  handed out as a copy with its own buffers."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from experiments.models import get_model

  cache: dict[str, nnx.Module] = {}

  def get(name: str) -> nnx.Module:
    if name not in cache:
      cache[name] = get_model(name, rngs=nnx.Rngs(0))
    # A copy with its own buffers: nnx.clone shares them, and a training
    # step that donates its inputs would delete the cached model's arrays.
    graphdef, state = nnx.split(cache[name])
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, copy=True), state))

  return get


# The overrides of the ``mnist_run`` fixture: one base and one GSM epoch.
# A run that resumes it or starts from its base must use the same ones.
MNIST_RUN_OVERRIDES = (
  "train.epochs=1",
  "train.warmup_epochs=0",
  "train.boundaries=()",
  "gsm.epochs=1",
  "gsm.boundaries=()",
  # 10x instead of 60x: one GSM epoch is far too short for the unselected
  # weights to decay (the paper uses 280), and this test checks the plumbing.
  "compression=10",
)


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory: pytest.TempPathFactory, tfds_data_dir: Path, mnist_builder) -> Path:
  """LeNet-300-100, 1 epoch base + 1 epoch GSM on all 60k images, all phases.

  Session-scoped: the run tests and the lottery-ticket test read the same
  folder (test_run.py re-runs phases on it, which leaves it equivalent)."""
  from experiments import run

  del mnist_builder  # MNIST is prepared in the session data dir
  out = tmp_path_factory.mktemp("lenet300")
  argv = ["lenet300_60x", "--quick", "--out", str(out), "--data-dir", str(tfds_data_dir)]
  assert run.main(argv + ["--no-download", "--overrides", *MNIST_RUN_OVERRIDES]) == 0
  return out


@pytest.fixture
def lock_holder():
  """``with lock_holder(folder) as process:`` another process holds the
  ``experiments.fileio.lock_output`` lock of ``folder`` until the block ends."""
  import contextlib
  import subprocess

  @contextlib.contextmanager
  def hold(folder: Path):
    holder = subprocess.Popen(
      [
        sys.executable,
        "-c",
        "import sys, time\nfrom experiments.fileio import lock_output\n"
        "with lock_output(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n",
        str(folder),
      ],
      cwd=REPO_ROOT,
      stdout=subprocess.PIPE,
      text=True,
    )
    try:
      assert holder.stdout.readline() == "held\n"
      yield holder
    finally:
      holder.kill()
      holder.wait()

  return hold
