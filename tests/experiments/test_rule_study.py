"""experiments.rule_study: argument checks and one tiny real-data row."""

from __future__ import annotations

import argparse
import json

import pytest

from experiments import rule_study


def test_parse_shrinks():
  assert rule_study.parse_shrinks("none,1e-2,0") == [None, 0.01, 0.0]
  with pytest.raises(argparse.ArgumentTypeError, match="'x' is neither 'none' nor a number"):
    rule_study.parse_shrinks("none,x")
  with pytest.raises(argparse.ArgumentTypeError, match="1.0 is not in"):
    rule_study.parse_shrinks("1")


def test_missing_data_root_is_refused(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    rule_study.main(["swap", "--data-root", str(tmp_path)])
  assert e.value.code == 2
  assert f"{tmp_path / 'mnist'} does not hold the mnist IDX files" in capsys.readouterr().err


def test_swap_rows_on_real_mnist(shared_datasets, capsys):
  assert (
    rule_study.main(
      [
        "swap",
        "--data-root",
        str(shared_datasets),
        "--epochs",
        "1",
        "--compression",
        "4",
        "--shrinks",
        "none,1e-2",
      ]
    )
    == 0
  )
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["row"] for r in rows] == ["optax.sgd, then the cut", "gsm", "gsm"]
  assert [r.get("shrink", "-") for r in rows] == ["-", None, 0.01]
  for r in rows:
    assert 0 <= r["after"] <= 100 and 80 <= r["before"] <= 100


@pytest.mark.parametrize(
  "flag, value", [("--compression-ramp-epochs", "-1"), ("--shrink-ramp-epochs", "nan")]
)
def test_bad_ramp_is_refused(shared_datasets, capsys, flag, value):
  with pytest.raises(SystemExit) as e:
    rule_study.main(["from-base", "--data-root", str(shared_datasets), flag, value])
  assert e.value.code == 2
  assert f"{flag}: {float(value)!r} is not a finite number >= 0" in capsys.readouterr().err


def test_ramp_schedules_by_hand():
  assert rule_study.compression_schedule(60.0, 0, 4) == 60.0
  ramp = rule_study.compression_schedule(60.0, 1, 4)  # 4 steps
  # Halfway: s = (59/60) (1 - 1/8), C = 1 / (1 - s) = 480 / 67.
  assert float(ramp(0)) == 1.0
  assert float(ramp(2)) == pytest.approx(480 / 67, rel=1e-6)
  assert float(ramp(4)) == pytest.approx(60.0, rel=1e-6)
  assert float(ramp(9)) == pytest.approx(60.0, rel=1e-6)
  assert rule_study.shrink_schedule(None, 5, 4) is None
  shrink = rule_study.shrink_schedule(1e-2, 1, 4)
  assert [float(shrink(t)) for t in (0, 2, 4, 8)] == pytest.approx([0.0, 5e-3, 1e-2, 1e-2])
