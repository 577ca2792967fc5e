"""experiments.fileio: atomic writes and the commands' exit status."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.fileio import atomic_write_json, run_command


def test_run_command_exit_status(capsys) -> None:
    assert run_command(lambda: None, FileExistsError) == 0

    def fails() -> None:
        raise FileExistsError("runs/x exists; pass --resume")

    assert run_command(fails, KeyError, FileExistsError) == 2
    assert capsys.readouterr().err == "error: runs/x exists; pass --resume\n"
    # An unexpected error is a bug: it keeps its traceback.
    with pytest.raises(FileExistsError):
        run_command(fails, KeyError)


def test_atomic_write_json_leaves_no_temporary(tmp_path) -> None:
    path = tmp_path / "sub" / "r.json"
    atomic_write_json(path, {"a": np.float32(0.5), "b": np.arange(3), "p": tmp_path})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "p": str(tmp_path)}
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]
