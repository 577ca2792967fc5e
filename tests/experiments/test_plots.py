"""experiments.plots: the after-cut figure and its command line."""

from __future__ import annotations

import json

import pytest

from experiments import plots


def test_after_cut_plot_from_results(tmp_path):
  history = [{"epoch": e, "test_acc_after_cut": 0.9 + e / 100} for e in range(1, 6)]
  results = tmp_path / "results.json"
  results.write_text(json.dumps({"phases": {"gsm": {"history": history}}}))
  out = tmp_path / "after_cut.png"
  assert plots.main(["after-cut", str(out), f"run a={results}", f"run b={results}"]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
  "item, message",
  [
    ("no-label-sign", "expected LABEL=path/to/results.json"),
    ("x={missing}", "not the results.json of a finished GSM phase"),
  ],
)
def test_after_cut_refuses_bad_runs(tmp_path, capsys, item, message):
  with pytest.raises(SystemExit) as e:
    plots.main(
      ["after-cut", str(tmp_path / "o.png"), item.format(missing=tmp_path / "missing.json")]
    )
  assert e.value.code == 2 and message in capsys.readouterr().err
  assert not (tmp_path / "o.png").exists()
