"""``python -m experiments.sensitivity`` on a tiny run on the real MNIST files,
and the top-Q selection counter it uses."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gsm
from experiments import run, sensitivity

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# LeNet-300-100 has N = 266,200 kernel weights; compression 10 gives Q = 26,620.
Q = 26_620
TINY = [
  "train.epochs=1",
  "train.warmup_epochs=0",
  "train.boundaries=()",
  "gsm.epochs=1",
  "gsm.warmup_epochs=0",
  "gsm.boundaries=()",
  "compression=10",
  # 8 training steps per epoch: the run only has to produce checkpoints.
  "data.train_subset=2048",
  "data.eval_subset=500",
]


@pytest.mark.parametrize("score_momentum", [None, 0.9])
def test_count_selections_counts_the_gsm_mask(score_momentum: float | None) -> None:
  """The counts equal, step by step, the weights whose update got the gradient."""
  rng = np.random.default_rng(0)
  params = {
    "a": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
    "bias": jnp.zeros(3, jnp.float32),
  }
  q = 9
  tx = sensitivity.count_selections(
    optax_gsm.gsm(0.1, num_nonzero=q, momentum=0.9, score_momentum=score_momentum)
  )
  # A separate global_top_q with the same rule: its output is B * g, so with
  # non-zero gradients B is exactly where the output is non-zero.
  reference = optax_gsm.global_top_q(q, selection="top_k", score_momentum=score_momentum)
  state, ref_state = tx.init(params), reference.init(params)
  # Jitted: eager selection dispatches hundreds of tiny ops per step.
  update, ref_update = jax.jit(tx.update), jax.jit(reference.update)
  expected = jax.tree.map(lambda p: np.zeros(p.shape, np.int64), params)
  p = params
  for _ in range(4):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
    selected, ref_state = ref_update(grads, ref_state, p)
    expected = {k: expected[k] + (np.asarray(selected[k]) != 0) for k in ("a", "b")} | {
      "bias": expected["bias"]
    }
    updates, state = update(grads, state, p)
    p = optax.apply_updates(p, updates)
  counts = jax.tree.map(np.asarray, state.counts)
  for k in ("a", "b", "bias"):
    np.testing.assert_array_equal(counts[k], expected[k])
  assert int(counts["a"].sum() + counts["b"].sum()) == 4 * q


def _tiny_run(out: Path, tfds_data_dir: Path, *extra: str) -> None:
  argv = [
    "lenet300_60x",
    "--quick",
    "--out",
    str(out),
    "--data-dir",
    str(tfds_data_dir),
    "--no-download",
    *extra,
    "--overrides",
    *TINY,
  ]
  assert run.main(argv) == 0


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, tfds_data_dir: Path, mnist_builder) -> Path:
  """A run folder with only the (1-epoch, 2,048-image) dense base phase."""
  del mnist_builder  # MNIST is prepared in the session data dir
  out = tmp_path_factory.mktemp("sens_base")
  _tiny_run(out, tfds_data_dir, "--phase", "train")
  return out


@pytest.fixture(scope="module")
def gsm_run(tmp_path_factory: pytest.TempPathFactory, tfds_data_dir: Path, base_run: Path) -> Path:
  """Another run folder with a complete gsm phase on ``base_run``'s base model."""
  out = tmp_path_factory.mktemp("sens_gsm")
  _tiny_run(out, tfds_data_dir, "--phase", "gsm", "--base-from", str(base_run))
  return out


def _sensitivity(run_dir: Path, out: Path, tfds_data_dir: Path, *extra: str) -> dict:
  argv = [
    str(run_dir),
    "--out",
    str(out),
    "--data-dir",
    str(tfds_data_dir),
    "--no-download",
    "--eval-subset",
    "300",
    *extra,
  ]
  assert sensitivity.main(argv) == 0
  for name in ("sensitivity.json", "sensitivity.md", "sensitivity.png"):
    assert (out / name).is_file()
  assert (out / "sensitivity.png").read_bytes()[:8] == PNG_MAGIC
  assert not list(out.glob("*.tmp"))  # the atomic writes left nothing behind
  return json.loads((out / "sensitivity.json").read_text())


def _check_common(doc: dict) -> None:
  assert [layer["path"] for layer in doc["layers"]] == [
    "['fc1']['kernel']",
    "['fc2']['kernel']",
    "['fc3']['kernel']",
  ]
  assert [layer["size"] for layer in doc["layers"]] == [784 * 300, 300 * 100, 100 * 10]
  assert doc["ratios"] == [0.5, 0.7, 0.9]
  assert doc["num_nonzero"] == Q and doc["eval_examples"] == 300
  for layer in doc["layers"]:
    assert len(layer["drops"]) == len(layer["accuracies"]) == 3
    for acc, drop in zip(layer["accuracies"], layer["drops"]):
      assert drop == pytest.approx(doc["baseline"] - acc)
  # The short GSM run: 3 steps of Q selections each, shared out to the layers.
  sel = doc["selection_run"]
  assert sel["steps"] == 3 and sel["selections"] == 3 * Q
  assert sum(layer["selection_share"] for layer in doc["layers"]) == pytest.approx(1.0)
  assert set(doc["spearman_by_ratio"]["selection_share"]) == {"0.5", "0.7", "0.9"}
  assert "selection_density" in doc["spearman"]


def test_without_gsm_phase_skips_the_nonzero_ratio(
  base_run: Path, tfds_data_dir: Path, tmp_path: Path
) -> None:
  doc = _sensitivity(base_run, tmp_path, tfds_data_dir, "--selection-steps", "3")
  _check_common(doc)
  assert "--phase gsm" in doc["gsm_model"]["skipped"]
  assert all(layer["nonzero_ratio"] is None for layer in doc["layers"])
  assert "nonzero_ratio" not in doc["spearman"]
  assert doc["spearman_final_vs_early"] is None
  assert "skipped" in (tmp_path / "sensitivity.md").read_text()


def test_with_gsm_phase(gsm_run: Path, base_run: Path, tfds_data_dir: Path, tmp_path: Path) -> None:
  doc = _sensitivity(gsm_run, tmp_path, tfds_data_dir, "--selection-steps", "3")
  _check_common(doc)
  # The base model comes from the folder recorded as the run's --base-from.
  assert doc["base"]["checkpoints"] == str(base_run / "train" / "checkpoints")
  assert doc["gsm_model"]["epoch"] == 1 and 0 < doc["gsm_model"]["test_acc_after_cut"] <= 1
  # The GSM model cut to Q keeps exactly Q weights, spread over the layers.
  kept = sum(layer["nonzero_ratio"] * layer["size"] for layer in doc["layers"])
  assert round(kept) == Q
  assert set(doc["spearman"]) == {"nonzero_ratio", "selection_share", "selection_density"}
  assert doc["spearman_final_vs_early"] is None or -1 <= doc["spearman_final_vs_early"] <= 1
  md = (tmp_path / "sensitivity.md").read_text()
  assert "| `fc3/kernel` | 1,000 |" in md and "Spearman" in md


def test_errors_name_the_command_that_fixes_them(
  tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
  missing = tmp_path / "nope"
  assert sensitivity.main([str(missing)]) == 2
  assert "python -m experiments.run CONFIG --out" in capsys.readouterr().err
  # A run folder whose train phase never wrote a checkpoint.
  (tmp_path / "results.json").write_text(
    json.dumps({"config_name": "lenet300_60x", "quick": True, "overrides": ["compression=10"]})
  )
  assert sensitivity.main([str(tmp_path), "--out", str(tmp_path / "s")]) == 2
  err = capsys.readouterr().err
  assert "no base (train phase) checkpoint" in err
  assert f"--phase train --out {tmp_path}" in err
  assert not (tmp_path / "s").exists()
  with pytest.raises(SystemExit):
    sensitivity.main([str(tmp_path), "--ratios", "1.5"])
