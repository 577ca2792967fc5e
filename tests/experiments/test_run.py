"""End to end on the real MNIST files: base training, GSM, pruning, report, with a
tiny budget (one epoch each), through the command line entry point.

The run itself is the session fixture ``mnist_run`` (conftest.py), shared with
the lottery-ticket test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments import run
from tests.experiments.conftest import MNIST_RUN_OVERRIDES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_results_json(mnist_run: Path) -> None:
  results = json.loads((mnist_run / "results.json").read_text())
  n, q = 266_200, 26_620
  assert results["model"]["eligible"] == n
  assert results["target"]["num_nonzero"] == q
  train, gsm, prune = (results["phases"][p] for p in ("train", "gsm", "prune"))
  assert len(train["history"]) == len(gsm["history"]) == 1
  for key in ("train_loss", "train_acc", "test_acc", "lr", "nonzero_ratio", "images_per_s"):
    assert key in gsm["history"][0]
  assert train["history"][0]["test_acc"] > 0.9  # well above chance (0.1)
  assert gsm["history"][0]["test_acc"] > 0.9
  # The final cut keeps exactly Q eligible weights, all of them non-zero.
  assert prune["gsm"]["kept"] == q and prune["gsm"]["nonzeros_after"] == q
  assert prune["base"]["kept"] == q
  report = prune["gsm"]["sparsity_report"]
  assert report["eligible"]["nonzeros"] == q and report["eligible"]["size"] == n
  assert sum(leaf["nonzeros"] for leaf in report["leaves"] if leaf["eligible"]) == q
  assert prune["gsm"]["test_after"]["acc"] > 0.8
  assert prune["base"]["test_after"]["acc"] > 0.5
  assert prune["gsm"]["test_after"]["count"] == 10_000
  # The GSM phase's per-epoch cut at its last epoch is the prune phase's cut.
  assert gsm["history"][-1]["test_acc_after_cut"] == prune["gsm"]["test_after"]["acc"]
  assert train["history"][0]["test_acc_after_cut"] is None
  assert 0 < prune["kept_overlap_with_base"] <= 1
  hist = prune["gsm"]["histogram"]
  assert sum(hist["counts"]) + hist["zeros"] == n
  assert results["summary"]["gsm_test_acc_after_cut"] == prune["gsm"]["test_after"]["acc"]
  env = results["environment"]
  assert {"jax", "optax", "flax", "tensorflow-datasets"} <= set(env["versions"])
  assert env["device"] and train["wall_seconds"] > 0
  assert results["data"]["pipeline"]["images_per_s"] > 0


def test_figures_and_pruned_model(mnist_run: Path) -> None:
  for name in ("curves.png", "layer_nonzero.png", "weight_hist.png"):
    assert (mnist_run / name).read_bytes()[:8] == PNG_MAGIC
  assert (mnist_run / "prune" / "pruned_model").is_dir()
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore((mnist_run / "prune" / "pruned_model").absolute())
  kernels = [np.asarray(state[layer]["kernel"]) for layer in ("fc1", "fc2", "fc3")]
  assert sum(int(np.count_nonzero(k)) for k in kernels) == 26_620


def test_rerun_needs_resume_and_resume_of_finished_run_is_a_no_op(
  mnist_run: Path, tfds_data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
  common = [
    "lenet300_60x",
    "--quick",
    "--out",
    str(mnist_run),
    "--data-dir",
    str(tfds_data_dir),
    "--overrides",
    *MNIST_RUN_OVERRIDES,
  ]
  before = json.loads((mnist_run / "results.json").read_text())
  assert run.main(common + ["--phase", "train"]) == 2
  assert "--resume" in capsys.readouterr().err
  assert run.main(common + ["--phase", "gsm", "--resume"]) == 0
  after = json.loads((mnist_run / "results.json").read_text())
  assert after["phases"]["gsm"]["history"] == before["phases"]["gsm"]["history"]
  assert after["phases"]["gsm"]["resumed_from"] == 1
  # A changed GSM configuration cannot silently continue the GSM checkpoints.
  assert run.main(common[:-1] + ["compression=20", "--phase", "gsm", "--resume"]) == 2
  assert "configuration differs" in capsys.readouterr().err
  # The report phase alone re-renders from results.json.
  (mnist_run / "curves.png").unlink()
  assert run.main(common + ["--phase", "report"]) == 0
  assert (mnist_run / "curves.png").exists()
  assert "GSM model, magnitude cut to Q" in capsys.readouterr().out


def test_base_from_skips_the_train_phase(
  mnist_run: Path, tfds_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
  """With --base-from, all phases train GSM from that run's base: no base is
  trained (or stored) in the new folder, and the cut compares with that base."""
  out = tmp_path / "from_base"
  argv = [
    "lenet300_60x",
    "--quick",
    "--out",
    str(out),
    "--base-from",
    str(mnist_run),
    "--data-dir",
    str(tfds_data_dir),
    "--no-download",
    "--overrides",
    *MNIST_RUN_OVERRIDES,
  ]
  capsys.readouterr()
  assert run.main(argv) == 0
  printed = capsys.readouterr().out
  assert f"[train] skipped: the base model comes from --base-from {mnist_run}" in printed
  assert "[train] epoch" not in printed
  assert not (out / "train").exists()
  got = json.loads((out / "results.json").read_text())
  base = json.loads((mnist_run / "results.json").read_text())
  assert got["base_from"] == str(mnist_run)
  assert "train" not in got["phases"]
  assert got["model_params"] == base["model_params"]
  assert got["summary"]["base_test_acc"] == base["summary"]["base_test_acc"]
  assert got["summary"]["nonzeros_after_cut"] == base["summary"]["nonzeros_after_cut"]


def test_base_from_without_a_base_fails_before_any_work(
  tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
  """A --base-from folder without a train checkpoint is a usage error at
  once: no data loaded, no output folder made."""
  out = tmp_path / "out"
  empty = tmp_path / "empty_run"
  (empty / "train" / "checkpoints").mkdir(parents=True)
  for base, says in (
    (tmp_path / "missing", "is not a folder"),
    (empty, f"no train checkpoint in {empty / 'train' / 'checkpoints'}"),
  ):
    capsys.readouterr()
    assert run.main(["lenet5_300x_ramp", "--out", str(out), "--base-from", str(base)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --base-from {str(base)!r}: ") and says in err, err
    assert not out.exists()


def test_list_configs(capsys: pytest.CaptureFixture[str]) -> None:
  assert run.main(["--list"]) == 0
  out = capsys.readouterr().out
  assert "lenet300_60x" in out and "resnet56_10pct" in out


def test_train_phase_config_leaves_out_every_gsm_setting() -> None:
  """A finished base run must not look changed when only GSM options change."""
  from experiments.configs import get_config

  plain = get_config("lenet5_300x")
  tuned = get_config(
    "lenet5_300x",
    overrides=[
      "gsm.epochs=7",
      "compression=125",
      "gsm_unselected_decay=1e-3",
      "gsm_unselected_decay_schedule=inverse_lr",
      "gsm_unselected_decay_drops=1",
      "gsm_score_momentum=0.99",
      "gsm_score_momentum_from_epoch=3",
      "gsm_selection=top_k",
    ],
  )
  assert run.phase_config(plain, "train") == run.phase_config(tuned, "train")
  assert not [k for k in run.phase_config(tuned, "train") if k.startswith("gsm")]
  gsm = run.phase_config(tuned, "gsm")
  assert gsm["gsm_unselected_decay_drops"] == 1 and gsm["gsm_score_momentum_from_epoch"] == 3
  assert run.phase_config(plain, "gsm") != gsm


# ------------------------------------------------------------------ every program's --out


def hold_lock(folder: Path, name: str = ".optax_gsm.lock"):
  """Holds ``folder/name`` as another process would; returns the open file (close to release)."""
  import fcntl

  folder.mkdir(parents=True, exist_ok=True)
  f = open(folder / name, "a+")
  fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  f.seek(0)
  f.truncate()
  f.write(
    json.dumps(
      {
        "pid": 4242,
        "host": "elsewhere",
        "started": "2024-01-01T00:00:00+00:00",
        "command": "fake holder",
      }
    )
  )
  f.flush()
  return f


def snapshot(folder: Path) -> dict[str, bytes]:
  return {
    str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
  }


PROGRAMS = ("run", "compare", "budget_gsm", "lottery", "sensitivity", "structured")


def program_argv(program: str, out: Path, mnist_run: Path, data_dir: Path, tmp: Path) -> tuple:
  """``(main, argv, locked folder, lock file name)`` of a program writing into ``out``."""
  from experiments import budget_gsm, compare, lottery, sensitivity, structured

  common = ["--data-dir", str(data_dir), "--no-download"]
  if program == "run":
    return run.main, ["lenet300_60x", "--quick", "--out", str(out), *common], out, ".optax_gsm.lock"
  if program == "compare":
    return (
      compare.main,
      ["mnist", "--quick", "--out", str(out), "--data-dir", str(data_dir)],
      out,
      ".optax_gsm.lock",
    )
  if program == "budget_gsm":
    base = tmp / "base"
    (base / "train" / "checkpoints" / "1").mkdir(parents=True)  # only looked at before the lock
    return (
      budget_gsm.main,
      ["--base-from", str(base), "--out", str(out), "--work-dir", str(tmp / "work"), *common],
      out,
      ".optax_gsm.lock",
    )
  if program == "lottery":
    return lottery.main, [str(mnist_run), "--out", str(out), *common], out, ".optax_gsm.lock"
  if program == "sensitivity":
    return sensitivity.main, [str(mnist_run), "--out", str(out), *common], out, ".optax_gsm.lock"
  return (
    structured.main,
    ["pretrain", "--out", str(out / "r.json"), "--data-dir", str(data_dir)],
    out,
    ".r.json.lock",
  )


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_locked_out_folder_is_refused_and_left_untouched(
  program: str,
  mnist_run: Path,
  tfds_data_dir: Path,
  tmp_path: Path,
  capsys: pytest.CaptureFixture[str],
) -> None:
  out = tmp_path / "out"
  main, argv, folder, lock_name = program_argv(program, out, mnist_run, tfds_data_dir, tmp_path)
  held = hold_lock(folder, lock_name)
  try:
    (out / "results.json").write_text('{"precious": true}')
    before, run_before = snapshot(out), snapshot(mnist_run)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
      f"error: output folder {folder} is in use by process 4242 on host elsewhere "
      f"(started 2024-01-01T00:00:00+00:00: fake holder): its lock {folder / lock_name} "
      f"is held. Wait for that run to finish, or choose another --out\n"
    )
    assert snapshot(out) == before and snapshot(mnist_run) == run_before
    assert not (tmp_path / "work").exists()
  finally:
    held.close()


def test_two_runs_on_one_out_folder(
  tmp_path: Path, tfds_data_dir: Path, mnist_builder, lock_holder
) -> None:
  """A real second process: `python -m experiments.run` while another holds --out."""
  import os
  import socket
  import subprocess
  import sys

  del mnist_builder
  repo = Path(run.__file__).resolve().parents[1]
  out = tmp_path / "out"
  with lock_holder(out) as holder:
    before = snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(repo)}
    second = subprocess.run(
      [
        sys.executable,
        "-m",
        "experiments.run",
        "lenet300_60x",
        "--quick",
        "--out",
        str(out),
        "--data-dir",
        str(tfds_data_dir),
        "--no-download",
      ],
      cwd=repo,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert second.returncode == 2, second.stderr[-2000:]
    assert (
      f"error: output folder {out} is in use by process {holder.pid} on host "
      f"{socket.gethostname()} (started "
    ) in second.stderr
    assert snapshot(out) == before


def test_default_output_folders_are_git_ignored_runs_folders(tmp_path: Path) -> None:
  import argparse
  import subprocess

  from experiments import budget_gsm, compare, lottery, sensitivity, structured
  from experiments.configs import get_config

  repo = Path(run.__file__).resolve().parents[1]
  config = get_config("lenet5_125x")
  budget_args = budget_gsm.build_parser().parse_args(["--base-from", str(tmp_path)])
  defaults = {
    "run": run.output_dir(config, run.build_parser().parse_args(["lenet5_125x"])),
    "compare": compare.build_parser().parse_args(["mnist"]).out,
    "budget_gsm out": budget_gsm.output_dirs(budget_gsm.build_config(budget_args), budget_args)[0],
    "budget_gsm work": budget_gsm.output_dirs(budget_gsm.build_config(budget_args), budget_args)[1],
    "lottery": lottery.output_dir(lottery.build_parser().parse_args(["some/lenet300_60x"])),
    "sensitivity": sensitivity.output_dir(argparse.Namespace(out=None), config),
    "structured": structured.output_path(structured.build_parser().parse_args(["taylor"])),
  }
  assert defaults == {
    "run": repo / "runs" / "lenet5_125x",
    "compare": repo / "runs" / "compare",
    "budget_gsm out": repo / "runs" / "budget",
    "budget_gsm work": repo / "runs" / "budget_gsm_125x",
    "lottery": repo / "runs" / "lottery" / "lenet300_60x",
    "sensitivity": repo / "runs" / "sensitivity" / "lenet5_125x",
    "structured": repo / "runs" / "structured" / "lenet5_taylor.json",
  }
  for what, path in defaults.items():
    ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=repo)
    assert ignored.returncode == 0, f"{what}: {path} is not git-ignored"
    tracked = subprocess.run(
      ["git", "ls-files", str(path)], cwd=repo, capture_output=True, text=True
    )
    assert tracked.stdout == "", f"{what}: {path} holds tracked files"
  # The committed results stay where they are.
  assert (repo / "docs" / "results" / "compare" / "mnist.json").is_file()


@pytest.mark.parametrize(
  "program", ("run", "compare", "budget_gsm", "lottery", "sensitivity", "data")
)
def test_manual_dir_is_checked_up_front(
  program: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
  from experiments import budget_gsm, compare, data, lottery, sensitivity

  mains = {
    "run": (run.main, ["lenet300_60x"]),
    "compare": (compare.main, ["mnist"]),
    "budget_gsm": (budget_gsm.main, ["--base-from", str(tmp_path)]),
    "lottery": (lottery.main, [str(tmp_path)]),
    "sensitivity": (sensitivity.main, [str(tmp_path)]),
    "data": (data._main, ["prepare", "mnist"]),
  }
  main, argv = mains[program]
  missing, a_file = tmp_path / "nope", tmp_path / "train-images-idx3-ubyte.gz"
  a_file.write_bytes(b"x")
  for path, says in (
    (missing, f"no such folder ({missing} does not exist)"),
    (
      a_file,
      f"{a_file} is a file, not a folder; --manual-dir must be the folder that "
      f"holds the dataset's original files",
    ),
  ):
    with pytest.raises(SystemExit) as info:
      main([*argv, "--manual-dir", str(path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: argument --manual-dir: --manual-dir {str(path)!r}: {says}\n"), err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["train-images-idx3-ubyte.gz"]
