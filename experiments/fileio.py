"""Shared plumbing of the experiment commands: atomic files, output locks, common flags, exit codes.

Every result file is written to a temporary name in its folder, flushed to disk
and then renamed over the target (``os.replace`` is atomic on POSIX), so a crash
never leaves a half-written ``results.json``, report or figure behind.

Every command that writes an output folder holds an exclusive lock on it for
the length of the run (:func:`lock_output`): a second process given the same
folder refuses to start, naming the process that holds it, instead of
silently replacing the first one's checkpoints and results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
import json
import os
import secrets
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The lock file that :func:`lock_output` creates inside an output folder.
LOCK_NAME = ".optax_gsm.lock"


class UsageError(RuntimeError):
  """A user-fixable condition every command reports as ``error: ...`` with status 2."""


class OutputLockError(UsageError):
  """The output folder is locked by another running process."""


def json_default(x: Any) -> Any:
  """``json.dump`` fallback for numpy scalars and arrays and paths."""
  import numpy as np

  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, Path):
    return str(x)
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def atomic_write_text(path: Path, text: str) -> None:
  """Writes ``text`` to ``path`` atomically, creating its folder.

  Args:
    path: the target file.
    text: its new contents.
  """
  atomic_write_bytes(path, text.encode())


def _temporary_name(path: Path) -> Path:
  """A fresh hidden temporary name next to ``path`` (unique per writer)."""
  return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[Any]:
  """A binary file object whose contents replace ``path`` atomically on success.

  The data goes to a temporary file in ``path``'s folder (created if needed),
  is flushed and fsynced, then renamed over ``path``.  On an error the
  temporary file is removed and ``path`` keeps its old contents.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _temporary_name(path)
  try:
    with open(tmp, "xb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically, creating its folder."""
  with atomic_open(path) as f:
    f.write(data)


def atomic_save_figure(fig: Any, path: Path, **kwargs: Any) -> Path:
  """``fig.savefig`` to ``path`` atomically (the format from the suffix, default PNG).

  Returns:
    ``path``.
  """
  path = Path(path)
  kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
  with atomic_open(path) as f:
    fig.savefig(f, **kwargs)
  return path


def atomic_write_json(path: Path, data: Any) -> None:
  """``data`` as indented JSON (numpy values and paths allowed), atomically."""
  atomic_write_text(path, json.dumps(data, indent=1, default=json_default))


# ------------------------------------------------------------------ output locks

# Locks this process holds: resolved folder -> [open lock file, depth].
_HELD: dict[Path, list[Any]] = {}


def _lock_record() -> dict[str, Any]:
  return {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
  }


@contextlib.contextmanager
def lock_output(folder: str | os.PathLike[str], *, name: str = LOCK_NAME) -> Iterator[Path]:
  """Holds an exclusive lock on the output folder ``folder`` while the block runs.

  The lock is a non-blocking ``fcntl.flock`` on ``folder/name`` (the folder is
  created if needed), held by this process and released when the block ends
  or the process dies, however it dies.  The lock file records the holder's
  PID, host, start time and command line; it stays behind (removing a lock
  file that another process may be opening would break the exclusion).
  Re-entering the lock of a folder this process already holds is allowed.

  Args:
    folder: the output folder.
    name: the lock file's name inside ``folder`` (default :data:`LOCK_NAME`).

  Yields:
    The folder (resolved).

  Raises:
    OutputLockError: another process holds the lock; the message names the
      folder and the holder's PID and host.  Nothing in the folder is touched.
  """
  folder = Path(folder).expanduser().absolute()
  key = folder.resolve() / name
  held = _HELD.get(key)
  if held is not None:
    held[1] += 1
    try:
      yield folder
    finally:
      held[1] -= 1
    return
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / name
  # No O_TRUNC: the holder's record must survive a refused attempt.
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  f = os.fdopen(fd, "r+")
  try:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    try:
      holder = json.loads(f.read() or "{}")
    except ValueError:
      holder = {}
    f.close()
    who = f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}" + (
      f" (started {holder['started']}: {holder['command']})"
      if holder.get("started") and holder.get("command")
      else ""
    )
    raise OutputLockError(
      f"output folder {folder} is in use by {who}: its lock {path} is held. Wait for that "
      f"run to finish, or choose another --out"
    ) from None
  f.seek(0)
  f.truncate()
  f.write(json.dumps(_lock_record()) + "\n")
  f.flush()
  _HELD[key] = [f, 1]
  try:
    yield folder
  finally:
    del _HELD[key]
    f.close()  # closing the file releases the flock


@contextlib.contextmanager
def lock_outputs(*folders: str | os.PathLike[str] | None) -> Iterator[None]:
  """:func:`lock_output` of every folder given (``None`` skipped), in order."""
  with contextlib.ExitStack() as stack:
    for folder in folders:
      if folder is not None:
        stack.enter_context(lock_output(folder))
    yield


# ------------------------------------------------------------------ flags


def existing_dir(flag: str) -> Callable[[str], str]:
  """An argparse ``type=`` that accepts only an existing folder for ``flag``.

  A missing path and a path that is a file get distinct messages naming the
  flag and the path; the value is returned unchanged.
  """

  def check(value: str) -> str:
    path = Path(value).expanduser()
    if not path.exists():
      raise argparse.ArgumentTypeError(
        f"{flag} {value!r}: no such folder ({path.absolute()} does not exist)"
      )
    if not path.is_dir():
      raise argparse.ArgumentTypeError(
        f"{flag} {value!r}: {path.absolute()} is a file, not a folder; {flag} must be the "
        f"folder that holds the dataset's original files"
      )
    return value

  check.__name__ = "folder"  # argparse names the type in some messages
  return check


manual_dir_arg = existing_dir("--manual-dir")


def require_run_checkpoints(flag: str, value: str, phase: str, hint: str) -> Path:
  """Checks, before any work, that ``value`` is a run folder with ``phase`` checkpoints.

  Only the folder is looked at (no checkpoint is read, so this is instant);
  the checkpoint itself is verified when it is restored.

  Args:
    flag: the command-line flag that named the folder (``--base-from``).
    value: the folder as the user wrote it.
    phase: the phase whose checkpoints are needed (``train``, ``gsm``).
    hint: how to make them, appended to the error.

  Returns:
    The folder, absolute.

  Raises:
    UsageError: naming the flag, the folder and what is missing in it.
  """
  folder = Path(value).expanduser().absolute()
  if not folder.is_dir():
    raise UsageError(
      f"{flag} {value!r}: {folder} is not a folder (expected an "
      f"`experiments.run` output folder with {phase}/checkpoints)"
    )
  ckpt = folder / phase / "checkpoints"
  if not (ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())):
    raise UsageError(f"{flag} {value!r}: no {phase} checkpoint in {ckpt}; {hint}")
  return folder


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds ``--manual-dir``, ``--data-dir``, ``--no-download`` and ``--progress``.

  ``--manual-dir`` is checked while parsing (:data:`manual_dir_arg`): it must
  be an existing folder, whether or not the data is already prepared.
  """
  parser.add_argument(
    "--manual-dir",
    default=None,
    type=manual_dir_arg,
    help="folder with the dataset's original files",
  )
  parser.add_argument("--data-dir", default=None, help="TFDS data directory")
  parser.add_argument("--no-download", action="store_true", help="never let TFDS download")
  parser.add_argument(
    "--progress",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="tqdm progress bars (default: when stderr is a terminal)",
  )


def run_command(command: Callable[[], Any], *expected: type[BaseException]) -> int:
  """Runs ``command()`` and returns the process exit status.

  The ``expected`` errors are user-fixable conditions (a missing dataset, an
  existing output, a checkpoint of another configuration): they print
  ``error: <message>`` to stderr, with no traceback, and give status 2.
  :class:`UsageError` (e.g. a locked output folder) is always expected.
  Anything else propagates.

  Returns:
    0 on success, 2 after an expected error.
  """
  try:
    command()
  except (UsageError, *expected) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0
