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
    common = ["lenet300_60x", "--quick", "--out", str(mnist_run), "--data-dir", str(tfds_data_dir),
              "--overrides", "train.epochs=1", "train.warmup_epochs=0", "train.boundaries=()",
              "gsm.epochs=1", "gsm.boundaries=()", "compression=10"]
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


def test_list_configs(capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "lenet300_60x" in out and "resnet56_10pct" in out


def test_train_phase_config_leaves_out_every_gsm_setting() -> None:
    """A finished base run must not look changed when only GSM options change."""
    from experiments.configs import get_config

    plain = get_config("lenet5_300x")
    tuned = get_config("lenet5_300x", overrides=[
        "gsm.epochs=7", "compression=125", "gsm_unselected_decay=1e-3",
        "gsm_unselected_decay_schedule=inverse_lr", "gsm_unselected_decay_drops=1",
        "gsm_score_momentum=0.99", "gsm_score_momentum_from_epoch=3", "gsm_selection=top_k"])
    assert run.phase_config(plain, "train") == run.phase_config(tuned, "train")
    assert not [k for k in run.phase_config(tuned, "train") if k.startswith("gsm")]
    gsm = run.phase_config(tuned, "gsm")
    assert gsm["gsm_unselected_decay_drops"] == 1 and gsm["gsm_score_momentum_from_epoch"] == 3
    assert run.phase_config(plain, "gsm") != gsm
