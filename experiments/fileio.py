"""Shared plumbing of the experiment commands: atomic files, common flags, exit codes.

Every result file is written to a temporary name, flushed to disk and then
renamed over the target (``os.replace`` is atomic on POSIX), so a crash never
leaves a half-written ``results.json`` or report behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON (numpy values and paths allowed), atomically."""
    atomic_write_text(path, json.dumps(data, indent=1, default=json_default))


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--manual-dir``, ``--data-dir``, ``--no-download`` and ``--progress``."""
    parser.add_argument("--manual-dir", default=None, help="folder with the dataset's original files")
    parser.add_argument("--data-dir", default=None, help="TFDS data directory")
    parser.add_argument("--no-download", action="store_true", help="never let TFDS download")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="tqdm progress bars (default: when stderr is a terminal)")


def run_command(command: Callable[[], Any], *expected: type[BaseException]) -> int:
    """Runs ``command()`` and returns the process exit status.

    The ``expected`` errors are user-fixable conditions (a missing dataset, an
    existing output, a checkpoint of another configuration): they print
    ``error: <message>`` to stderr, with no traceback, and give status 2.
    Anything else propagates.

    Returns:
      0 on success, 2 after an expected error.
    """
    try:
        command()
    except expected as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
