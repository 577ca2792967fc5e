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
    "train.epochs=2", "train.warmup_epochs=1", "train.boundaries=()",
    "gsm.epochs=2", "gsm.warmup_epochs=0", "gsm.boundaries=(1,)",
    "data.train_subset=2048", "data.eval_subset=2000",
]


def run_cli(out: Path, data_dir: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OPTAX_GSM_JAX_CACHE"] = str(cache)  # later processes skip XLA compilation
    cmd = [sys.executable, "-m", "experiments.run", "lenet300_60x", "--quick", "--phase", "all",
           "--out", str(out), "--data-dir", str(data_dir), "--no-download", "--no-progress",
           "--overrides", *OVERRIDES, *extra]
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
    first = run_cli(crashed, tfds_data_dir, jax_cache_dir, seed_override, "--stop-after-epoch", "train:1")
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
    second = run_cli(crashed, tfds_data_dir, jax_cache_dir, seed_override, "--resume",
                     "--stop-after-epoch", "gsm:1")
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
            assert_bitwise_equal(load_item(ckpt_ref, 2, item), load_item(ckpt_new, 2, item), f"{phase}/{item}")
    with ocp.StandardCheckpointer() as ckptr:
        pruned_ref = ckptr.restore((reference / "prune" / "pruned_model").absolute())
        pruned_new = ckptr.restore((crashed / "prune" / "pruned_model").absolute())
    assert_bitwise_equal(pruned_ref, pruned_new, "pruned model")

    ref = json.loads((reference / "results.json").read_text())
    new = json.loads((crashed / "results.json").read_text())
    for phase in ("train", "gsm"):
        assert strip_timing(ref["phases"][phase]["history"]) == strip_timing(new["phases"][phase]["history"])
    assert new["phases"]["gsm"]["resumed_from"] == 1
    for key in ("test_before", "test_after", "kept", "nonzeros_after"):
        assert ref["phases"]["prune"]["gsm"][key] == new["phases"]["prune"]["gsm"][key]
