"""experiments.budget_gsm end to end on the real MNIST files, at a tiny budget:
a 1-epoch LeNet-5 base on 4,096 images, then 1 epoch of each GSM run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import budget_gsm, run

SUBSET = ["data.train_subset=4096", "data.eval_subset=2000"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory, tfds_data_dir: Path, mnist_builder) -> Path:
  del mnist_builder  # MNIST is prepared in the session data dir
  out = tmp_path_factory.mktemp("lenet5_base")
  argv = [
    "lenet5_125x",
    "--phase",
    "train",
    "--out",
    str(out),
    "--data-dir",
    str(tfds_data_dir),
    "--no-download",
    "--overrides",
    "train.epochs=1",
    "train.warmup_epochs=0",
    "train.boundaries=()",
    *SUBSET,
  ]
  assert run.main(argv) == 0
  return out


def test_budget_run_matches_the_count_runs_flops(
  base_dir: Path, tfds_data_dir: Path, tmp_path: Path
) -> None:
  out, work = tmp_path / "out", tmp_path / "work"
  # 3x rather than 125x: after one epoch the unselected weights have hardly
  # decayed, and this test checks the plumbing.
  argv = [
    "--base-from",
    str(base_dir),
    "--compression",
    "3",
    "--epochs",
    "1",
    "--train-subset",
    "4096",
    "--eval-subset",
    "2000",
    "--overrides",
    "gsm.warmup_epochs=0",
    "--out",
    str(out),
    "--work-dir",
    str(work),
    "--data-dir",
    str(tfds_data_dir),
    "--no-download",
  ]
  assert budget_gsm.main(argv) == 0
  results = json.loads((out / "budget_gsm.json").read_text())
  count, by_budget = results["count"], results["budget"]
  n = results["num_eligible"]
  assert n == 430_500 and results["dense_macs"] == 2_293_000
  assert count["target"]["num_nonzero"] == round(n / 3) == count["nonzeros"]
  budget = by_budget["target"]["budget_macs"]
  assert budget == count["macs"] < results["dense_macs"]
  assert by_budget["macs"] <= budget
  # Score per MAC prefers the cheap dense weights: more of them for the same FLOPs.
  assert by_budget["nonzeros"] > count["nonzeros"]
  for r in (count, by_budget):
    assert sum(layer["macs"] for layer in r["layers"]) == r["macs"]
    assert sum(layer["nonzeros"] for layer in r["layers"]) == r["nonzeros"]
    assert r["test_before_cut"]["acc"] > 0.5
    assert r["test_after_cut"]["acc"] > 0.2  # chance is 0.1
    assert r["test_after_cut"]["count"] == 2000
    assert 0 < r["sparse_file_bytes"] < r["dense_file_bytes"]
    assert r["epochs"] == 1 and r["gsm_wall_seconds"] > 0
  assert by_budget["last_step_selection"]["selected"] > 0
  md = (out / "budget_gsm.md").read_text()
  assert "| count | 143,500 |" in md and "| budget |" in md
  assert (work / "budget" / "pruned.npz").is_file()

  # Checkpoints are not silently overwritten.
  assert budget_gsm.main(argv) == 2


def test_count_from_an_experiments_run_gsm_phase(
  base_dir: Path, tfds_data_dir: Path, tmp_path: Path
) -> None:
  """--count-from takes run (i) from `experiments.run --phase gsm` with the same
  settings; a mismatch is refused."""
  common = ["--data-dir", str(tfds_data_dir), "--no-download"]
  gsm = ["gsm.epochs=1", "gsm.warmup_epochs=0", "compression=3", *SUBSET]
  assert (
    run.main(
      [
        "lenet5_125x",
        "--phase",
        "gsm",
        "--out",
        str(base_dir),
        *common,
        "--overrides",
        *budget_gsm.DEFAULT_OVERRIDES,
        *gsm,
      ]
    )
    == 0
  )
  out = tmp_path / "out"
  argv = [
    "--base-from",
    str(base_dir),
    "--count-from",
    str(base_dir),
    "--compression",
    "3",
    "--epochs",
    "1",
    "--train-subset",
    "4096",
    "--eval-subset",
    "2000",
    "--overrides",
    "gsm.warmup_epochs=0",
    "--out",
    str(out),
    "--work-dir",
    str(tmp_path / "work"),
    *common,
  ]
  assert budget_gsm.main(argv) == 0
  results = json.loads((out / "budget_gsm.json").read_text())
  count = results["count"]
  assert results["count_from"] == str(base_dir)
  assert count["nonzeros"] == 143_500 and count["epochs"] == 1
  assert results["budget"]["macs"] <= results["budget"]["target"]["budget_macs"] == count["macs"]
  assert count["test_after_cut"]["acc"] > 0.2
  assert not (tmp_path / "work" / "count" / "checkpoints").exists()  # not trained again
  with pytest.raises(SystemExit, match=r"GSM settings differ:\n  compression"):
    budget_gsm.main([*argv[:4], "--compression", "4", *argv[6:]])


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
  with pytest.raises(SystemExit):
    budget_gsm.main(["--base-from", str(tmp_path), "--overrides", "gsm.nope=1"])
  assert "unknown config key" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    budget_gsm.main([])  # --base-from is required


def test_a_missing_base_is_refused_before_anything_is_created(
  tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
  import time

  out, work = tmp_path / "out", tmp_path / "work"
  (tmp_path / "empty_run").mkdir()
  t0 = time.perf_counter()
  for base, says in (
    (
      tmp_path / "nope",
      "is not a folder (expected an `experiments.run` output folder with train/checkpoints)",
    ),
    (
      tmp_path / "empty_run",
      f"no train checkpoint in {tmp_path / 'empty_run' / 'train' / 'checkpoints'}; "
      f"train one with `python -m experiments.run lenet5_125x --phase train "
      f"--out {tmp_path / 'empty_run'}`",
    ),
  ):
    assert (
      budget_gsm.main(["--base-from", str(base), "--out", str(out), "--work-dir", str(work)]) == 2
    )
    assert (
      capsys.readouterr().err
      == f"error: --base-from {str(base)!r}: "
      + (f"{base} {says}" if "not a folder" in says else says)
      + "\n"
    )
  assert time.perf_counter() - t0 < 10
  assert not out.exists() and not work.exists()
  with pytest.raises(SystemExit):
    budget_gsm.main(["--base-from", str(tmp_path), "--config", "lenet7_1x"])
  assert "argument --config: invalid choice: 'lenet7_1x'" in capsys.readouterr().err
