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


def test_atomic_writes_use_unique_temporaries_and_keep_the_old_file_on_error(tmp_path) -> None:
  from experiments.fileio import atomic_open, atomic_write_text

  path = tmp_path / "r.md"
  atomic_write_text(path, "old")
  with pytest.raises(RuntimeError, match="boom"):
    with atomic_open(path) as f:
      f.write(b"half")
      raise RuntimeError("boom")
  assert path.read_text() == "old"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["r.md"]


def test_lock_output_refuses_a_second_holder_and_touches_nothing(tmp_path, lock_holder) -> None:
  import fcntl
  import os
  import socket

  from experiments.fileio import LOCK_NAME, OutputLockError, lock_output

  out = tmp_path / "out"
  with lock_holder(out) as holder:
    (out / "results.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputLockError) as info:
      with lock_output(out):
        pytest.fail("entered a locked folder")
    message = str(info.value)
    assert message.startswith(
      f"output folder {out} is in use by process {holder.pid} on host "
      f"{socket.gethostname()} (started "
    )
    assert message.endswith(
      f"its lock {out / LOCK_NAME} is held. Wait for that run to finish, or choose another --out"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # run_command reports it as a user-fixable error.
    assert run_command(lambda: lock_output(out).__enter__()) == 2
  # Released when the holder dies, however it dies; and re-entrant within a process.
  with lock_output(out) as folder, lock_output(out):
    assert folder == out
    with open(out / LOCK_NAME) as f:
      with pytest.raises(BlockingIOError):
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
      assert json.loads(f.read())["pid"] == os.getpid()


def test_existing_dir_argument(tmp_path) -> None:
  import argparse

  from experiments.fileio import manual_dir_arg

  assert manual_dir_arg(str(tmp_path)) == str(tmp_path)
  with pytest.raises(argparse.ArgumentTypeError) as missing:
    manual_dir_arg(str(tmp_path / "nope"))
  assert (
    str(missing.value)
    == f"--manual-dir {str(tmp_path / 'nope')!r}: no such folder ({tmp_path / 'nope'} does not exist)"
  )
  (tmp_path / "file.gz").write_bytes(b"x")
  with pytest.raises(argparse.ArgumentTypeError) as is_file:
    manual_dir_arg(str(tmp_path / "file.gz"))
  assert str(is_file.value) == (
    f"--manual-dir {str(tmp_path / 'file.gz')!r}: {tmp_path / 'file.gz'} is a file, not a folder; "
    f"--manual-dir must be the folder that holds the dataset's original files"
  )
