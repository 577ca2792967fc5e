"""The README's quickstart runs as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_code() -> str:
  text = README.read_text()
  section = text[text.index("## Quickstart") :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_as_written():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(quickstart_code(), str(README), "exec"), {"__name__": "__readme__"})
  printed = out.getvalue()
  before, after = map(
    float, re.search(r"accuracy before the cut (\S+), after (\S+)", printed).groups()
  )
  assert abs(before - after) <= 0.01 and after >= 0.95
  # The report's total line: 5% of the 238,200 eligible weights remain.
  assert re.search(r"eligible\s+-\s+238,200\s+11,910\s+5\.00%\s+20\.00x", printed)
