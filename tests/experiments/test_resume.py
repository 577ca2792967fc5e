"""Crash and resume: a run killed mid-epoch and resumed ends with parameters that
are bitwise equal to those of an uninterrupted run with the same seed.

Every run is a separate ``python -m experiments.run`` process.  The interrupted
run is stopped twice: halfway through base-training epoch 2 (after epoch 1's
checkpoint) and, after resuming, halfway through GSM epoch 2; ``os._exit`` ends
the process on the spot, as a crash or a kill would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.training import STOP_EXIT_CODE

REPO_ROOT = Path(__file__).resolve().parents[2]

OVERRIDES = [
  "train.epochs=2",
  "train.warmup_epochs=1",
  "train.boundaries=()",
  "gsm.epochs=2",
  "gsm.warmup_epochs=0",
  "gsm.boundaries=(1,)",
  "data.train_subset=2048",
  "data.eval_subset=2000",
]


def run_cli(
  out: Path, data_dir: Path, cache: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
    os.pathsep
  )
  env["OPTAX_GSM_JAX_CACHE"] = str(cache)  # later processes skip XLA compilation
  cmd = [
    sys.executable,
    "-m",
    "experiments.run",
    "lenet300_60x",
    "--quick",
    "--phase",
    "all",
    "--out",
    str(out),
    "--data-dir",
    str(data_dir),
    "--no-download",
    "--no-progress",
    "--overrides",
    *OVERRIDES,
    *extra,
  ]
  return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
  return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def load_item(ckpt_dir: Path, step: int, item: str) -> dict:
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore((ckpt_dir / str(step) / item).absolute())


def assert_bitwise_equal(a: dict, b: dict, what: str) -> None:
  import jax

  la, ta = jax.tree.flatten_with_path(a)
  lb, tb = jax.tree.flatten_with_path(b)
  assert ta == tb, what
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, (what, path)
    assert x.tobytes() == y.tobytes(), f"{what}: {jax.tree_util.keystr(path)} differs"


TIMING_KEYS = {"train_seconds", "eval_seconds", "images_per_s"}


def strip_timing(history: list[dict]) -> list[dict]:
  return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


@pytest.mark.parametrize("seed", [0])
def test_killed_and_resumed_run_equals_uninterrupted_run(
  tmp_path: Path, tfds_data_dir: Path, mnist_builder, jax_cache_dir: Path, seed: int
) -> None:
  del mnist_builder  # prepared in the session data dir
  reference, crashed = tmp_path / "reference", tmp_path / "crashed"
  seed_override = f"seed={seed}"

  full = run_cli(reference, tfds_data_dir, jax_cache_dir, seed_override)
  assert full.returncode == 0, full.stderr[-3000:]

  # 1) killed halfway through base epoch 2: only epoch 1's checkpoint exists.
  first = run_cli(
    crashed, tfds_data_dir, jax_cache_dir, seed_override, "--stop-after-epoch", "train:1"
  )
  assert first.returncode == STOP_EXIT_CODE, first.stderr[-3000:]
  assert "[train] epoch 1/2" in first.stdout and "[train] epoch 2/2" not in first.stdout
  assert checkpoint_steps(crashed / "train" / "checkpoints") == [1]
  assert not (crashed / "gsm").exists()
  # What a kill *during* a save leaves behind: orbax's unfinished temporary
  # folder.  It is not a checkpoint and must not confuse the resumed run.
  torn = crashed / "train" / "checkpoints" / "2.orbax-checkpoint-tmp-1234567890"
  (torn / "model").mkdir(parents=True)
  (torn / "model" / "junk").write_bytes(b"half-written")

  # 2) resumed, then killed halfway through GSM epoch 2.
  second = run_cli(
    crashed, tfds_data_dir, jax_cache_dir, seed_override, "--resume", "--stop-after-epoch", "gsm:1"
  )
  assert second.returncode == STOP_EXIT_CODE, second.stderr[-3000:]
  assert "resumed from" in second.stdout and "(epoch 1)" in second.stdout
  assert not torn.exists()
  assert checkpoint_steps(crashed / "train" / "checkpoints") == [1, 2]
  assert checkpoint_steps(crashed / "gsm" / "checkpoints") == [1]

  # 3) resumed to the end.
  third = run_cli(crashed, tfds_data_dir, jax_cache_dir, seed_override, "--resume")
  assert third.returncode == 0, third.stderr[-3000:]

  for phase in ("train", "gsm"):
    ckpt_ref, ckpt_new = reference / phase / "checkpoints", crashed / phase / "checkpoints"
    for item in ("model", "optimizer"):
      assert_bitwise_equal(
        load_item(ckpt_ref, 2, item), load_item(ckpt_new, 2, item), f"{phase}/{item}"
      )
  with ocp.StandardCheckpointer() as ckptr:
    pruned_ref = ckptr.restore((reference / "prune" / "pruned_model").absolute())
    pruned_new = ckptr.restore((crashed / "prune" / "pruned_model").absolute())
  assert_bitwise_equal(pruned_ref, pruned_new, "pruned model")

  ref = json.loads((reference / "results.json").read_text())
  new = json.loads((crashed / "results.json").read_text())
  for phase in ("train", "gsm"):
    assert strip_timing(ref["phases"][phase]["history"]) == strip_timing(
      new["phases"][phase]["history"]
    )
  assert new["phases"]["gsm"]["resumed_from"] == 1
  for key in ("test_before", "test_after", "kept", "nonzeros_after"):
    assert ref["phases"]["prune"]["gsm"][key] == new["phases"]["prune"]["gsm"][key]


# ------------------------------------------------------------------ corrupt checkpoints
#
# In process, on 512 real MNIST images: a LeNet-300-100 with momentum SGD trained
# for 3 epochs (checkpoints 1, 2, 3), then resumed to 4 epochs after a fault was
# injected into the latest checkpoint (3).  The run must report step 3, fall back
# to step 2 and end exactly as a run resumed from step 2 would.

CORRUPT_CONFIG = {"what": "corrupt-checkpoint tests"}


def small_fit(
  ckpt_dir: Path, train, epochs: int, *, resume: bool = False
) -> tuple[dict, list[dict]]:
  import optax
  from flax import nnx

  from experiments.models import get_model
  from experiments.training import Trainer

  model = get_model("lenet_300_100", rngs=nnx.Rngs(0))
  trainer = Trainer(
    model, optax.sgd(0.01, momentum=0.9), lr_schedule=optax.constant_schedule(0.01), name="small"
  )
  result = trainer.fit(
    train,
    None,
    epochs=epochs,
    ckpt_dir=ckpt_dir,
    resume=resume,
    seed=0,
    config=CORRUPT_CONFIG,
    keep_checkpoints=3,
    progress=False,
  )
  import jax

  return jax.device_get(trainer.params()), strip_timing(result["history"])


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory: pytest.TempPathFactory, mnist_builder, split_arrays):
  """(train pipeline, folder with checkpoints 1-3, params and history of resuming
  from the intact step 2 to epoch 4)."""
  import shutil

  from experiments import data

  images, labels = split_arrays(mnist_builder, "train")
  train = data.InMemoryPipeline(
    images[:512], labels[:512], spec=data.DATASETS["mnist"], batch_size=64, train=True, seed=0
  )
  root = tmp_path_factory.mktemp("corrupt")
  pristine = root / "pristine"
  small_fit(pristine, train, 3)
  assert checkpoint_steps(pristine) == [1, 2, 3]
  from_two = root / "from_two"
  shutil.copytree(pristine, from_two)
  shutil.move(str(from_two / "3"), str(root / "step3_removed"))
  params, history = small_fit(from_two, train, 4, resume=True)
  assert [h["epoch"] for h in history] == [1, 2, 3, 4]
  return train, pristine, params, history


def tree_files(folder: Path) -> dict[str, bytes]:
  return {
    str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
  }


def flip_byte(item_dir: Path) -> None:
  """Flips one byte in the middle of the item's largest array data file."""
  data_file = max(
    (p for p in (item_dir / "ocdbt.process_0" / "d").iterdir()), key=lambda p: p.stat().st_size
  )
  raw = bytearray(data_file.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  data_file.write_bytes(bytes(raw))


def delete_item(item_dir: Path) -> None:
  import shutil

  shutil.rmtree(item_dir)


def truncate(path: Path) -> None:
  raw = path.read_bytes()
  path.write_bytes(raw[: len(raw) // 2])


def edit_epoch(meta_file: Path) -> None:
  meta = json.loads(meta_file.read_text())
  assert meta["epoch"] == 3
  meta["epoch"] = 4  # as if epoch 4 were done: would skip an epoch
  meta_file.write_text(json.dumps(meta))


FAULTS = {
  "model byte flipped": (
    lambda s: flip_byte(s / "model"),
    "its 'model' arrays do not match their sha256",
  ),
  "optimizer byte flipped": (
    lambda s: flip_byte(s / "optimizer"),
    "its 'optimizer' arrays do not match their sha256",
  ),
  "optimizer item deleted": (
    lambda s: delete_item(s / "optimizer"),
    "its 'optimizer' item is missing",
  ),
  "integrity item deleted": (
    lambda s: delete_item(s / "integrity"),
    "its 'integrity' item (the checksums) is missing",
  ),
  "meta truncated": (
    lambda s: truncate(s / "meta" / "metadata"),
    "its meta data cannot be read (JSONDecodeError",
  ),
  "model metadata truncated": (
    lambda s: truncate(s / "model" / "_METADATA"),
    "its model/optimizer data cannot be read (",
  ),
  "epoch edited": (
    lambda s: edit_epoch(s / "meta" / "metadata"),
    "its meta records epoch 4, not its step 3",
  ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_corrupt_latest_checkpoint_falls_back_to_the_intact_step(
  three_epochs, tmp_path: Path, fault: str, capsys: pytest.CaptureFixture[str]
) -> None:
  import shutil

  train, pristine, want_params, want_history = three_epochs
  ckpt = tmp_path / "checkpoints"
  shutil.copytree(pristine, ckpt)
  inject, reason = FAULTS[fault]
  inject(ckpt / "3")
  damaged = tree_files(ckpt / "3")
  capsys.readouterr()

  params, history = small_fit(ckpt, train, 4, resume=True)

  out = capsys.readouterr().out
  warning = [line for line in out.splitlines() if "is unusable" in line]
  assert len(warning) == 1, out
  assert warning[0].startswith(f"[small] warning: checkpoint {ckpt / '3'} is unusable: {reason}"), (
    warning
  )
  assert f"[small] resumed from {ckpt / '2'} (epoch 2)" in out
  # Never trained on it: the same end as resuming from the intact step 2.
  assert history == want_history
  assert_bitwise_equal(params, want_params, f"params after '{fault}'")
  # Nothing lost: the corrupt step was moved aside as it was, not deleted.
  assert tree_files(tmp_path / "checkpoints.corrupt" / "3") == damaged
  assert checkpoint_steps(ckpt) == [2, 3, 4]


def test_no_intact_checkpoint_is_a_clear_error_and_changes_nothing(
  three_epochs, tmp_path: Path
) -> None:
  import shutil

  from experiments.training import CheckpointCorruptError

  train, pristine, _, _ = three_epochs
  ckpt = tmp_path / "checkpoints"
  shutil.copytree(pristine, ckpt)
  flip_byte(ckpt / "3" / "model")
  edit_epoch(ckpt / "3" / "meta" / "metadata")
  truncate(ckpt / "2" / "meta" / "metadata")
  delete_item(ckpt / "1" / "optimizer")
  with pytest.raises(json.JSONDecodeError) as decode:
    json.loads((ckpt / "2" / "meta" / "metadata").read_text())
  before = tree_files(ckpt)
  with pytest.raises(CheckpointCorruptError) as info:
    small_fit(ckpt, train, 4, resume=True)
  assert str(info.value) == (
    f"no intact checkpoint in {ckpt}: step 3: its meta records epoch 4, not its step 3; "
    f"step 2: its meta data cannot be read (JSONDecodeError: {decode.value}); "
    f"step 1: its 'optimizer' item is missing. Nothing was changed; move the folder away to start "
    f"this phase over"
  )
  assert tree_files(ckpt) == before
  assert not (tmp_path / "checkpoints.corrupt").exists()


def test_restore_model_state_verifies_and_falls_back(
  three_epochs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
  import shutil

  from flax import nnx

  from experiments.models import get_model
  from experiments.training import (
    CheckpointCorruptError,
    checkpoint_epoch,
    param_dict,
    restore_model_state,
  )

  _, pristine, _, _ = three_epochs
  ckpt = tmp_path / "checkpoints"
  shutil.copytree(pristine, ckpt)
  reference = get_model("lenet_300_100", rngs=nnx.Rngs(1))
  assert restore_model_state(ckpt, reference, step=2)["epoch"] == 2
  flip_byte(ckpt / "3" / "model")
  capsys.readouterr()
  model = get_model("lenet_300_100", rngs=nnx.Rngs(1))
  meta = restore_model_state(ckpt, model)
  assert meta["epoch"] == 2
  assert_bitwise_equal(param_dict(model), param_dict(reference), "fallback model")
  assert f"checkpoint {ckpt / '3'} is unusable: its 'model' arrays do not match their sha256" in (
    capsys.readouterr().out
  )
  with pytest.raises(
    CheckpointCorruptError, match=r"step 3: its 'model' arrays do not match their sha256"
  ):
    restore_model_state(ckpt, model, step=3)
  # The meta of step 3 is intact (only its arrays are not): checkpoint_epoch
  # reads the meta only; an edited epoch it skips.
  assert checkpoint_epoch(ckpt) == 3
  edit_epoch(ckpt / "3" / "meta" / "metadata")
  assert checkpoint_epoch(ckpt) == 2
  assert checkpoint_steps(ckpt) == [1, 2, 3]  # reading never moves anything
