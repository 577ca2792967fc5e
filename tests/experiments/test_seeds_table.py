"""experiments.seeds_table: mean and sample sd over seeds, by hand."""

from __future__ import annotations

import json

import pytest

from experiments import seeds_table


def _run(folder, base, before, after, wall):
  folder.mkdir()
  (folder / "results.json").write_text(
    json.dumps(
      {
        "summary": {
          "base_test_acc": base,
          "gsm_test_acc_before_cut": before,
          "gsm_test_acc_after_cut": after,
          "gsm_wall_seconds": wall,
        }
      }
    )
  )


def test_table_row_by_hand(tmp_path, capsys):
  _run(tmp_path / "r_s0", 0.98, 0.97, 0.96, 100)
  _run(tmp_path / "r_s1", 0.99, 0.98, 0.98, 200)
  (tmp_path / "r_s2").mkdir()  # still running: no results.json
  assert seeds_table.main([f"row={tmp_path}/r_s*"]) == 0
  last = capsys.readouterr().out.splitlines()[-1]
  # after: mean 97.0, sd sqrt(((96-97)^2 + (98-97)^2) / 1) = 1.41
  assert last == ("| row | 2 | 98.50 +- 0.71 | 97.50 +- 0.71 | **97.00 +- 1.41** | +1.00 | 150 s |")


def test_no_finished_run_is_an_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    seeds_table.main([f"row={tmp_path}/none*"])
  assert e.value.code == 2 and "no finished run folder matches" in capsys.readouterr().err
