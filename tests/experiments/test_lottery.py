"""Lottery tickets of a finished run (``python -m experiments.lottery``), end to end on
the real MNIST files, on the tiny run of the ``mnist_run`` fixture (1 base epoch,
1 GSM epoch, 10x)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from experiments import lottery

Q = 26_620  # LeNet-300-100 at 10x: round(266_200 / 10)


@pytest.fixture(scope="module")
def lottery_out(
  mnist_run: Path, tfds_data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
  out = tmp_path_factory.mktemp("lottery")
  argv = [
    str(mnist_run),
    "--out",
    str(out),
    "--data-dir",
    str(tfds_data_dir),
    "--no-download",
    "--no-progress",
  ]
  assert lottery.main(argv) == 0
  return out


def test_tickets_keep_exactly_q_and_learn(lottery_out: Path) -> None:
  record = json.loads((lottery_out / "lottery.json").read_text())
  assert record["run"]["num_nonzero"] == Q
  assert record["recipe"]["epochs"] == 1  # default: the run's train.epochs
  assert [t["ticket"] for t in record["tickets"]] == ["gsm", "magnitude", "random"]
  for t in record["tickets"]:
    # Epoch 0 is the masked W0 itself, then one entry per training epoch; the
    # count is taken from the trained weights after every epoch.
    assert [h["epoch"] for h in t["history"]] == [0, 1]
    assert all(h["nonzeros"] == Q for h in t["history"])
    assert t["nonzeros"] == Q and sum(t["per_layer"].values()) == Q
    assert t["test_acc"] > 0.5, t  # chance is 0.1
  masks = record["masks"]
  # The GSM mask is the cut of the run's own prune phase.
  assert masks["gsm_vs_pruned_model_mismatch"] == 0
  assert masks["per_layer"]["random"] == masks["per_layer"]["gsm"]
  assert masks["overlap_gsm_magnitude"] / Q == pytest.approx(masks["run_kept_overlap_with_base"])
  # The rebuilt W0 reproduces the run's first base epoch.
  check = record["init_check"]
  assert check["ok"] and check["train_loss_rel_diff"] < 1e-5
  md = (lottery_out / "lottery.md").read_text()
  assert "| GSM mask |" in md and "magnitude mask" in md


def test_init_check_rejects_other_initial_weights(mnist_run: Path, tfds_data_dir: Path) -> None:
  """W0 of another seed does not pass the check (the check is not vacuous)."""
  from flax import nnx

  from experiments.methods import common
  from experiments.models import get_model
  from experiments.training import param_dict

  ns = argparse.Namespace(
    data_dir=str(tfds_data_dir), manual_dir=None, no_download=True, base_from=None
  )
  run, _ = lottery.load_run(mnist_run, ns)
  _, base_meta = lottery.restore_phase(run, "train", run.base_dir / "train" / "checkpoints")
  train, test = run.pipelines()
  cfg = run.config
  other = get_model(cfg.model, rngs=nnx.Rngs(cfg.seed + 1))
  budget = common.Budget(
    batch_size=cfg.data.batch_size,
    momentum=cfg.train.momentum,
    weight_decay=cfg.train.weight_decay,
    seed=cfg.seed,
  )
  ctx = common.Context(
    model=cfg.model,
    dataset=cfg.data.name,
    compression=10.0,
    num_nonzero=Q,
    num_eligible=266_200,
    budget=budget,
    module=other,
    apply=common.make_apply(other),
    init_params=common.to_numpy(param_dict(other)),
    base_params=None,
    base_acc=0.0,
    train=train,
    test=test,
    cache_dir=Path("."),
  )
  check = lottery.verify_init(ctx, cfg, base_meta)
  assert not check["ok"]
  assert check["train_loss_rel_diff"] > 10 * lottery.INIT_LOSS_RTOL


def test_refuses_a_run_whose_config_does_not_rebuild(mnist_run: Path, tmp_path: Path) -> None:
  fake = tmp_path / "run"
  fake.mkdir()
  results = json.loads((mnist_run / "results.json").read_text())
  results["config"]["seed"] = 1  # as if the run had used another seed
  (fake / "results.json").write_text(json.dumps(results))
  with pytest.raises(SystemExit, match="differs from the stored one"):
    lottery.main([str(fake), "--out", str(tmp_path / "out")])


def test_refuses_a_folder_without_results(tmp_path: Path) -> None:
  with pytest.raises(SystemExit, match="results.json"):
    lottery.main([str(tmp_path), "--out", str(tmp_path / "out")])
