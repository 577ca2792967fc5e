"""Smoke test of benchmarks/compile_time.py: the smallest size, one process per row."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "compile_time.py"


def _load():
  spec = importlib.util.spec_from_file_location("compile_time_benchmark", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_one_repeat_writes_every_row(tmp_path, capsys):
  bench = _load()
  out = tmp_path / "compile.json"
  bench.main(["--sizes", "lenet300", "--repeats", "1", "--json", str(out)])
  table = capsys.readouterr().out
  report = json.loads(out.read_text())
  rows = {r["row"]: r for r in report["results"]}
  assert set(rows) == {"sgd", "gsm", "gsm, warm persistent cache"}
  for name, row in rows.items():
    (run,) = row["runs"]
    assert run["leaves"] == 6
    # The tree timed is this one (PYTHONPATH wins over an installed copy).
    assert Path(run["optax_gsm"]) == ROOT / "optax_gsm"
    for stage in ("trace", "lower", "compile"):
      assert run[stage] > 0.0
    assert 0 < run["fusions"] < run["instructions"]
    assert row["total_median"] == pytest.approx(sum(run[s] for s in ("trace", "lower", "compile")))
    assert f"| lenet300 | {name} | this |" in table


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--src", "nowhere"], "--src must be NAME=PATH"),
    (["--src", "x=/nonexistent"], "--src must be NAME=PATH"),
    (["--sizes", "resnet51"], "unknown size 'resnet51'"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--src", "a=.", "--src", "a=."], "--src names must differ, got 'a' twice"),
  ],
)
def test_bad_arguments_exit_with_a_usage_error(argv, message, capsys):
  bench = _load()
  with pytest.raises(SystemExit) as exc:
    bench.main(argv)
  assert exc.value.code == 2
  assert message in capsys.readouterr().err


def test_a_tree_that_fails_to_import_reports_its_error(tmp_path):
  """A --src tree whose optax_gsm cannot be imported: the child's traceback, not a bare exit status."""
  bench = _load()
  broken = tmp_path / "broken"
  (broken / "optax_gsm").mkdir(parents=True)
  (broken / "optax_gsm" / "__init__.py").write_text("raise ImportError('this tree is broken')\n")
  with pytest.raises(SystemExit, match="(?s)failed \\(exit 1\\).*this tree is broken"):
    bench.main(["--sizes", "lenet300", "--repeats", "1", "--src", f"b={broken}"])
