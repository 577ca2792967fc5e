"""The comparison of pruning methods: method registry, reports, and a quick run on real MNIST."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from experiments import compare
from experiments.methods import PREFERRED_ORDER, collect_methods
from experiments.methods.lottery import imp_levels, random_masks


def test_every_method_module_is_collected_in_table_order():
  methods = collect_methods()
  assert list(methods)[: len(PREFERRED_ORDER)] == list(PREFERRED_ORDER)
  assert all(callable(r) for r in methods.values())
  assert set(PREFERRED_ORDER) <= set(compare.METHOD_NOTES)


def test_imp_levels_hit_every_target_with_bounded_steps():
  levels = imp_levels(266200, [26620, 8873, 4437, 2130], 2.0)
  assert [q for q in levels if q in (26620, 8873, 4437, 2130)] == [26620, 8873, 4437, 2130]
  prev = 266200
  for q in levels:
    assert prev / 2.0 - 1 <= q < prev
    prev = q


def test_random_masks_keep_per_leaf_counts():
  import numpy as np

  masks = {"a": np.eye(5, dtype=bool), "b": np.ones(3, bool)}
  got = random_masks(masks, 0)
  assert int(got["a"].sum()) == 5 and bool(got["b"].all())


def _fake_results() -> dict:
  cells = []
  for i, m in enumerate(("gsm", "magnitude_retrain", "dns")):
    for c in (10.0, 60.0):
      cells.append(
        {
          "method": m,
          "model": "lenet_300_100",
          "dataset": "mnist",
          "compression": c,
          "num_nonzero": int(1000 / c),
          "nonzeros": int(1000 / c),
          "num_eligible": 1000,
          "test_acc": 0.97 - 0.01 * i - c / 1e4,
          "epochs": 10,
          "starts_from": "base",
          "wall_seconds": 3.0,
          "train_seconds": 2.0,
          "actual_compression": c,
          "extra": {"acc_before_retrain": 0.5} if i == 1 else {},
        }
      )
  from experiments.methods.common import Budget

  return {
    "dataset": "mnist",
    "command": "python -m experiments.compare mnist",
    "budget": Budget().to_dict(),
    "methods": ["gsm", "magnitude_retrain", "dns"],
    "method_notes": {},
    "bases": {"lenet_300_100": {"test_acc": 0.98, "num_eligible": 1000}},
    "cells": cells,
    "environment": {},
    "data": {},
  }


def test_markdown_and_plot_from_results(tmp_path: Path):
  results = _fake_results()
  compare.write_markdown(results, tmp_path / "t.md")
  text = (tmp_path / "t.md").read_text()
  assert "| method | 10x | 60x |" in text
  assert "| gsm | 96.90 | 96.40 |" in text
  assert "before retrain 50.00%" in text
  assert compare.plot(results, tmp_path / "t.png") is not None
  assert (tmp_path / "t.png").stat().st_size > 1000
  # Black and white: every method gets its own marker and line style.
  assert len(set(compare.MARKERS)) == len(compare.MARKERS)
  assert len({str(s) for s in compare.LINESTYLES}) == len(compare.LINESTYLES)


def _split(results: dict, methods: tuple[str, ...], command: str) -> dict:
  return {
    **results,
    "command": command,
    "methods": list(methods),
    "cells": [c for c in results["cells"] if c["method"] in methods],
  }


def test_merge_joins_processes_split_by_method(tmp_path: Path):
  """Two processes, split by --methods, merge into the single-process table."""
  whole = _fake_results()
  a = _split(whole, ("dns",), "cmd A")
  b = _split(whole, ("gsm", "magnitude_retrain"), "cmd B")
  a["method_notes"], b["method_notes"] = {"dns": "note A"}, {"gsm": "note B"}
  paths = [tmp_path / "a.json", tmp_path / "b.json"]
  for path, part in zip(paths, (a, b)):
    path.write_text(json.dumps(part))

  assert (
    compare.main(["--merge", *map(str, paths), "--out", str(tmp_path / "m"), "--tag", "both"]) == 0
  )
  merged = json.loads((tmp_path / "m" / "mnist_both.json").read_text())
  assert merged["methods"] == ["gsm", "magnitude_retrain", "dns"]  # table order, not file order
  key = lambda c: (c["method"], c["compression"])  # noqa: E731
  assert sorted(merged["cells"], key=key) == sorted(whole["cells"], key=key)
  assert merged["command"] == ["cmd A", "cmd B"]
  assert merged["method_notes"] == {"gsm": "note B", "magnitude_retrain": "", "dns": "note A"}
  text = (tmp_path / "m" / "mnist_both.md").read_text()
  assert "    cmd A\n    cmd B" in text
  assert "| gsm | 96.90 | 96.40 |" in text and "| dns |" in text
  assert (tmp_path / "m" / "mnist_both.png").exists()


def test_merge_flattens_the_nested_commands_of_an_older_merge(tmp_path: Path):
  """A merged file written before merges were flattened holds a list inside
  its command list; merging it again yields one flat list, and the markdown
  one command per line."""
  whole = _fake_results()
  a = _split(whole, ("dns",), "cmd C")
  a["command"] = [["cmd A1", "cmd A2"], "cmd B"]
  b = _split(whole, ("gsm", "magnitude_retrain"), "cmd C")
  paths = [tmp_path / "a.json", tmp_path / "b.json"]
  for path, part in zip(paths, (a, b)):
    path.write_text(json.dumps(part))
  assert compare.main(["--merge", *map(str, paths), "--out", str(tmp_path / "m")]) == 0
  merged = json.loads((tmp_path / "m" / "mnist.json").read_text())
  assert merged["command"] == ["cmd A1", "cmd A2", "cmd B", "cmd C"]
  text = (tmp_path / "m" / "mnist.md").read_text()
  assert "    cmd A1\n    cmd A2\n    cmd B\n    cmd C\n" in text
  assert "[" not in text.split("## Budget")[0]


def test_merge_replace_takes_a_rerun_of_gsm_with_its_new_settings(tmp_path: Path):
  """A table run before ``gsm_ramp_fraction`` existed (no such budget key:
  no ramp), and a rerun of GSM with the ramp: ``--replace`` swaps in the new
  GSM cells and budget fields; nothing else may differ, and no GSM-derived
  cell of the old settings may survive."""
  old = _fake_results()
  del old["budget"]["gsm_ramp_fraction"]
  new = _split(old, ("gsm",), "cmd rerun")
  new["budget"] = {**old["budget"], "gsm_ramp_fraction": 1 / 3}
  new["cells"] = [{**c, "test_acc": c["test_acc"] + 0.002} for c in new["cells"]]
  paths = [tmp_path / "old.json", tmp_path / "new.json"]

  def merge_files(*extra: str, new_part: dict = new, old_part: dict = old) -> dict:
    for path, part in zip(paths, (old_part, new_part)):
      path.write_text(json.dumps(part))
    out = tmp_path / "m"
    assert compare.main(["--merge", *map(str, paths), "--out", str(out), *extra]) == 0
    return json.loads((out / "mnist.json").read_text())

  with pytest.raises(SystemExit, match="gsm_ramp_fraction 0.0 vs 0.333"):
    merge_files()
  merged = merge_files("--replace")
  got = {(c["method"], c["compression"]): c["test_acc"] for c in merged["cells"]}
  want = {(c["method"], c["compression"]): c["test_acc"] for c in old["cells"]}
  want.update({(c["method"], c["compression"]): c["test_acc"] for c in new["cells"]})
  assert got == want and len(merged["cells"]) == 6
  assert merged["budget"]["gsm_ramp_fraction"] == 1 / 3
  assert merged["command"] == [old["command"], "cmd rerun"]
  assert "| gsm | 97.10 | 96.60 |" in (tmp_path / "m" / "mnist.md").read_text()
  # Only GSM's own fields may differ, even with --replace.
  with pytest.raises(SystemExit, match="epochs 10 vs 3"):
    merge_files("--replace", new_part={**new, "budget": {**new["budget"], "epochs": 3}})
  # A GSM ticket of the old masks would survive: refused.
  ticket = [{**c, "method": "gsm_ticket"} for c in old["cells"] if c["method"] == "gsm"]
  with pytest.raises(SystemExit, match="reruns all of gsm, gsm_ticket, random_ticket"):
    merge_files("--replace", old_part={**old, "cells": old["cells"] + ticket})


def test_merge_refuses_files_of_different_comparisons(tmp_path: Path):
  whole = _fake_results()
  a = _split(whole, ("dns",), "a")
  cases = {
    "budgets of .* differ: epochs 10 vs 3": {
      **_split(whole, ("gsm",), "b"),
      "budget": {**whole["budget"], "epochs": 3},
    },
    "bases differ": {
      **_split(whole, ("gsm",), "b"),
      "bases": {"lenet_300_100": {"test_acc": 0.5, "num_eligible": 1000}},
    },
    "different accuracies": {
      **_split(whole, ("dns",), "b"),
      "cells": [{**c, "test_acc": 0.1} for c in a["cells"]],
    },
  }
  (tmp_path / "a.json").write_text(json.dumps(a))
  for match, other in cases.items():
    (tmp_path / "b.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=match):
      compare.main(
        [
          "--merge",
          str(tmp_path / "a.json"),
          str(tmp_path / "b.json"),
          "--out",
          str(tmp_path / "m"),
        ]
      )
  with pytest.raises(SystemExit, match="at least two"):
    compare.main(["--merge", str(tmp_path / "a.json")])
  with pytest.raises(SystemExit, match="cannot read"):
    compare.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "missing.json")])
  (tmp_path / "binary.json").write_bytes(b"\x89PNG\r\n")
  with pytest.raises(SystemExit, match="cannot read .*binary.json"):
    compare.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "binary.json")])
  (tmp_path / "other.json").write_text(json.dumps({"dataset": "mnist", "cells": []}))
  with pytest.raises(SystemExit, match="other.json is not a comparison.*no budget, bases"):
    compare.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "other.json")])


def test_compare_quick_on_real_mnist(
  tmp_path: Path, mnist_builder, tfds_data_dir: Path, shared_datasets: Path
):
  """Every method end to end at a tiny budget: accuracy well above chance, exact Q."""
  del mnist_builder  # prepared into tfds_data_dir
  args = [
    "mnist",
    "--quick",
    "--models",
    "lenet_300_100",
    "--compressions",
    "10",
    "--out",
    str(tmp_path),
    "--data-dir",
    str(tfds_data_dir),
    "--manual-dir",
    str(shared_datasets / "mnist"),
    # This methods; modules added later have their own tests.
    "--methods",
    *PREFERRED_ORDER,
  ]
  assert compare.main(args) == 0
  results = json.loads((tmp_path / "mnist_quick.json").read_text())
  cells = {c["method"]: c for c in results["cells"]}
  assert set(cells) == set(PREFERRED_ORDER)
  n = results["bases"]["lenet_300_100"]["num_eligible"]
  assert n == 266200
  q = round(n / 10)
  for name, c in cells.items():
    assert c["num_nonzero"] == q
    if name == "dns":  # DNS may end below Q, never above
      assert 0.5 * q <= c["nonzeros"] <= q, c
    else:
      assert c["nonzeros"] == q, (name, c["nonzeros"])
    # Chance is 10%; the random ticket is the control and may stay low.
    floor = 0.2 if name == "random_ticket" else 0.5
    assert c["test_acc"] > floor, (name, c["test_acc"])
  md = (tmp_path / "mnist_quick.md").read_text()
  for name in cells:
    assert f"| {name} |" in md
  assert (tmp_path / "mnist_quick.png").exists()
  assert list((tmp_path / "cache").glob("mnist_lenet_300_100_base_*.npz"))
  # --resume with everything done trains nothing and keeps the cells.
  assert compare.main(args[: -len(PREFERRED_ORDER)] + ["gsm", "--resume"]) == 0
  again = json.loads((tmp_path / "mnist_quick.json").read_text())
  assert len(again["cells"]) == len(results["cells"])
  assert again["methods"] == results["methods"]


def test_cli_errors():
  with pytest.raises(SystemExit):
    compare.main(["mnist", "--compressions", "0.5", "--models", "lenet_300_100"])
  for bad in (
    ["--epochs", "0"],
    ["--train-subset", "-5"],
    ["--gsm-weight-decay", "-0.001"],
    ["--gsm-weight-decay", "nan"],
    ["--lr", "inf"],
    ["--gsm-ramp-fraction", "1.5"],
    ["--gsm-ramp-fraction", "-0.1"],
    ["--gsm-ramp-fraction", "nan"],
  ):
    with pytest.raises(SystemExit, match=bad[0]):
      compare.main(["mnist", "--models", "lenet_300_100", *bad])


def test_budget_flags_override_only_their_field():
  from experiments.methods.common import QUICK_BUDGET, Budget

  args = compare.build_parser().parse_args(
    ["mnist", "--gsm-weight-decay", "0.05", "--epochs", "5", "--train-subset", "12000"]
  )
  expected = dataclasses.replace(Budget(), gsm_weight_decay=0.05, epochs=5, train_subset=12000)
  assert compare.make_budget(args) == expected
  quick = compare.make_budget(compare.build_parser().parse_args(["mnist", "--quick"]))
  assert quick == QUICK_BUDGET


def test_named_budgets():
  from experiments.methods.common import BUDGETS, QUICK_BUDGET, Budget

  parse = compare.build_parser().parse_args
  assert compare.make_budget(parse(["mnist"])) == Budget()
  assert compare.make_budget(parse(["mnist", "--budget", "quick"])) == QUICK_BUDGET
  # The LeNet-5 tables' budget, as their commands used to spell it in flags.
  old = compare.make_budget(
    parse(["mnist", "--base-epochs", "3", "--epochs", "3", "--gsm-weight-decay", "0.0167"])
  )
  assert compare.make_budget(parse(["mnist", "--budget", "lenet5_short"])) == old
  assert BUDGETS["lenet5_short"].ticket_epochs_ == 3
  # A flag still changes one field of the named budget.
  got = compare.make_budget(parse(["mnist", "--budget", "lenet5_short", "--epochs", "4"]))
  assert got == dataclasses.replace(BUDGETS["lenet5_short"], epochs=4)
  with pytest.raises(SystemExit):
    parse(["mnist", "--budget", "nope"])
  with pytest.raises(SystemExit, match="--quick is --budget quick"):
    compare.make_budget(parse(["mnist", "--quick", "--budget", "lenet5_short"]))
  assert compare.budget_name(parse(["mnist", "--budget", "quick"])) == "quick"


def test_every_method_has_its_own_marker_and_line_style() -> None:
  """The plot must read in black and white: no two methods may share a style."""
  from experiments.compare import LINESTYLES, MARKERS
  from experiments.methods import collect_methods

  n = len(collect_methods())
  assert n <= len(MARKERS) and n <= len(LINESTYLES)
  assert len(set(MARKERS[:n])) == n
  assert len({str(s) for s in LINESTYLES[:n]}) == n


def test_unsupported_dataset_or_model_is_refused_while_parsing(capsys, tmp_path: Path):
  """`compare cifar10` offline used to retry the download for minutes."""
  import time

  t0 = time.perf_counter()
  with pytest.raises(SystemExit) as info:
    compare.main(["cifar10", "--out", str(tmp_path / "out")])
  assert info.value.code == 2
  assert capsys.readouterr().err.endswith(
    "error: argument dataset: invalid choice: 'cifar10' (choose from 'mnist', 'fashion_mnist')\n"
  )
  with pytest.raises(SystemExit) as info:
    compare.main(["mnist", "--models", "lenet7", "--out", str(tmp_path / "out")])
  assert info.value.code == 2
  assert "argument --models: unknown model 'lenet7'; choose one of " in capsys.readouterr().err
  assert time.perf_counter() - t0 < 30 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("num_eligible", [266_200, 430_500, 1_000_003])
def test_gsm_target_ramps_to_exactly_q(num_eligible: int):
  """With ``gsm_ramp_fraction`` GSM's Q starts at N and is exactly the cell's
  Q from the end of the ramp on (a float64 C = N / Q); without, it is Q."""
  import types

  import jax
  import jax.numpy as jnp

  from experiments.methods.common import Budget
  from optax_gsm.transform import _target_q
  from experiments.methods.gsm import gsm_target

  q = round(num_eligible / 125)
  ctx = types.SimpleNamespace(
    budget=Budget(epochs=3, gsm_ramp_fraction=1 / 3),
    steps_per_epoch=10,
    num_eligible=num_eligible,
    num_nonzero=q,
  )
  ramp = gsm_target(ctx)["compression"]  # 10 steps
  # Q as the jitted update computes it from a traced step count (float32).
  q_at = jax.jit(lambda t: _target_q(None, ramp, t, num_eligible, 1))
  got = [int(q_at(jnp.int32(t))) for t in (0, 5, 9, 10, 11, 30)]
  assert got[0] == num_eligible and got[3:] == [q, q, q]
  assert got[0] > got[1] > got[2] > q
  ctx.budget = Budget(epochs=3, gsm_ramp_fraction=0.0)
  assert gsm_target(ctx) == {"num_nonzero": q}
