r"""A sparse model file: save pruned parameters so that zeros cost (almost) nothing.

The file is a plain numpy ``.npz`` archive (a zip of ``.npy`` arrays, written
uncompressed) and is always read with ``allow_pickle=False``, so loading an
untrusted file never executes code. It holds:

* ``header``: UTF-8 JSON (as a uint8 array) with the format name and version,
  the tree structure with its sha256 checksum (``tree_sha256``, from version
  2 on) and, per leaf, its key path, shape, dtype, encoding, number of stored
  entries and a sha256 checksum of its payload and of those fields (so
  neither a flipped payload bit, an edited shape or dtype nor an edited tree,
  say a tuple made a list, loads silently);
* per leaf ``i``, the arrays of one encoding:

  - ``dense``: ``i.values``, every entry;
  - ``bitmask``: ``i.mask`` (the non-zero pattern, :func:`numpy.packbits`,
    row-major) and ``i.values`` (the non-zero entries in row-major order);
  - ``coo``: ``i.indices`` (flat row-major indices of the non-zeros, uint16
    when the leaf has at most 65,536 entries, else int32, else int64) and
    ``i.values``;
  - ``csr`` (leaves of more than 65,536 entries): the flat index space cut
    into rows of :data:`CSR_ROW` = 65,536 entries, with ``i.indptr`` (int32
    or int64, ``rows + 1`` offsets into the non-zeros), ``i.indices`` (the
    uint16 position of each non-zero within its row) and ``i.values``: two
    bytes per index instead of four.

Values are stored as their raw bits (an unsigned integer of the same width,
little-endian), so every dtype round-trips bit for bit, bfloat16 and float16
included, and ``-0.0`` and NaN payloads survive: an entry counts as "non-zero"
when any of its bits is set. Per leaf, the encoding with the fewest bytes on
disk is chosen (payload bytes, plus :data:`MEMBER_OVERHEAD_BYTES` for each
extra ``.npy`` member), so a dense leaf costs no more than in a dense file.

With :math:`n` entries of :math:`b` bytes, :math:`k` of them non-zero and
:math:`b_i` bytes per index, the payloads are

.. math::

   \text{dense} = n b, \qquad
   \text{bitmask} = \lceil n / 8 \rceil + k b, \qquad
   \text{coo} = k (b_i + b), \qquad
   \text{csr} = 4 (\lceil n / 2^{16} \rceil + 1) + k (2 + b).

Files are written atomically: to a temporary file in the destination folder,
then moved into place with :func:`os.replace`. The temporary file is removed
on any error; one left by a killed writer (which no ``finally`` survives) is
removed by the next save to the same path, once no process holds its lock.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import re
import time
import io
import json
import math
import os
import tempfile
import zipfile
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

try:
  import fcntl
except ImportError:  # pragma: no cover - not POSIX
  fcntl = None

PyTree = Any

FORMAT_NAME = "optax_gsm.sparse"
FORMAT_VERSION = 2
# Versions this reader reads: version 1 files have no tree checksum, so their
# tree is only checked structurally.
READ_VERSIONS = (1, 2)
ENCODINGS = ("dense", "bitmask", "coo", "csr")
CSR_ROW = 2**16
HEADER_NAME = "header"

# Bytes an extra .npy member adds to the file beyond its payload: the .npy
# header (128 bytes for these small dicts) plus the zip local and central
# directory records and the member name (twice). Only used to choose between
# a one-member (dense) and a two-member encoding.
MEMBER_OVERHEAD_BYTES = 128 + 30 + 46 + 2 * 12


class SparseFileError(ValueError):
  """A sparse model file is corrupt, truncated, of another format or mismatched."""


@dataclasses.dataclass(frozen=True)
class SparseLeafInfo:
  """How one leaf is stored.

  Attributes:
    path: the leaf's key path, as :func:`jax.tree_util.keystr` writes it.
    shape: its shape.
    dtype: its dtype name (``"float32"``, ``"bfloat16"``, ...).
    size: number of entries.
    nonzeros: entries with any bit set (``-0.0`` and NaN count as non-zero).
    encoding: ``"dense"``, ``"bitmask"``, ``"coo"`` or ``"csr"``.
    payload_bytes: bytes of its arrays in the sparse file.
    dense_payload_bytes: bytes of its values stored densely.
  """

  path: str
  shape: tuple[int, ...]
  dtype: str
  size: int
  nonzeros: int
  encoding: str
  payload_bytes: int
  dense_payload_bytes: int

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["shape"] = list(self.shape)
    return d


@dataclasses.dataclass(frozen=True)
class SparseFileInfo:
  """Size of a sparse model file against the same parameters saved densely.

  Attributes:
    path: the file.
    file_bytes: its size on disk.
    dense_file_bytes: the size of the same leaves saved densely as an ``.npz``
      (one uncompressed ``.npy`` member per leaf, no header).
    leaves: one row per leaf, in ``jax.tree.leaves`` order.
  """

  path: str
  file_bytes: int
  dense_file_bytes: int
  leaves: tuple[SparseLeafInfo, ...]

  @property
  def ratio(self) -> float:
    """``dense_file_bytes / file_bytes``: how many times smaller the file is."""
    return self.dense_file_bytes / self.file_bytes if self.file_bytes else 0.0

  @property
  def encodings(self) -> dict[str, int]:
    """How many leaves use each encoding."""
    return {e: sum(leaf.encoding == e for leaf in self.leaves) for e in ENCODINGS}

  def to_dict(self) -> dict:
    """A JSON-ready dict."""
    return {
      "path": self.path,
      "file_bytes": self.file_bytes,
      "dense_file_bytes": self.dense_file_bytes,
      "ratio": self.ratio,
      "encodings": self.encodings,
      "leaves": [leaf.to_dict() for leaf in self.leaves],
    }

  def table(self) -> str:
    """A fixed-width table: one row per leaf, then the file totals."""
    rows = [("leaf", "shape", "dtype", "non-zeros", "encoding", "bytes", "dense bytes")]
    for r in self.leaves:
      shape = "x".join(map(str, r.shape)) if r.shape else "-"
      rows.append(
        (
          r.path,
          shape,
          r.dtype,
          f"{r.nonzeros:,}/{r.size:,}",
          r.encoding,
          f"{r.payload_bytes:,}",
          f"{r.dense_payload_bytes:,}",
        )
      )
    rows.append(
      (
        "file",
        "",
        "",
        "",
        f"{self.ratio:.2f}x smaller",
        f"{self.file_bytes:,}",
        f"{self.dense_file_bytes:,}",
      )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
      cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
      lines.append("  ".join(cells).rstrip())
      if j == 0 or j == len(rows) - 2:
        lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()


def coo_index_dtype(size: int) -> np.dtype:
  """The index dtype of the ``coo`` encoding for a leaf of ``size`` entries.

  Example:
    >>> coo_index_dtype(65536), coo_index_dtype(65537)
    (dtype('uint16'), dtype('int32'))
  """
  if size <= 2**16:
    return np.dtype("<u2")
  if size <= 2**31:
    return np.dtype("<i4")
  return np.dtype("<i8")


def save_sparse(
  path: str | os.PathLike, params: PyTree, *, keep_negative_zeros: bool = True
) -> SparseFileInfo:
  r"""Saves a (pruned) parameter pytree as a sparse ``.npz`` file.

  Each leaf is stored with the smallest of the ``dense``, ``bitmask``,
  ``coo`` and ``csr`` encodings (see the module docstring); the round trip
  through :func:`load_sparse` is bit-exact. Nested dicts (str or int keys),
  lists, tuples and None are stored as such; any other pytree node (a
  namedtuple, ``flax.nnx.State``, ...) is stored through its key paths, and
  comes back as a dict unless :func:`load_sparse` is given a ``target``.

  Args:
    path: the file to write (the name is used as given; ``.npz`` is the
      customary suffix). Its folder must exist. An existing file is replaced
      atomically.
    params: a pytree of arrays: bool, integer, or floating point of 1, 2, 4
      or 8 bytes per entry (bfloat16 and float16 included).
    keep_negative_zeros: store ``-0.0`` entries (which have the sign bit
      set) so that the round trip is bit-exact. A model pruned by
      *multiplying* with a 0/1 mask has ``-0.0`` wherever a negative weight
      was cut; pass False to store those as ``+0.0`` (equal as numbers)
      and not pay for them. Pruning with ``jnp.where`` (as
      :func:`optax_gsm.magnitude_prune` does) writes ``+0.0``.

  Returns:
    A :class:`SparseFileInfo`: bytes on disk against a dense ``.npz`` and
    the encoding of each leaf. ``print(info)`` prints a table.

  Raises:
    TypeError: if a leaf has an unsupported dtype or a dict key is neither a
      str nor an int.

  Example:
    >>> import os, tempfile, numpy as np
    >>> w = np.zeros((100, 100), np.float32); w[3, 4] = 1.5
    >>> path = os.path.join(tempfile.mkdtemp(), 'model.npz')
    >>> info = save_sparse(path, {'w': w, 'b': np.ones(3, np.float32)})
    >>> [(leaf.path, leaf.encoding) for leaf in info.leaves]
    [("['b']", 'dense'), ("['w']", 'coo')]
    >>> info.file_bytes < info.dense_file_bytes
    True
    >>> loaded = load_sparse(path)
    >>> bool(np.array_equal(loaded['w'], w)), float(loaded['w'][3, 4])
    (True, 1.5)
  """
  path = os.fspath(path)
  leaves: list[Any] = []
  skeleton = _skeleton(params, leaves)
  path_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  if len(path_leaves) != len(leaves):  # pragma: no cover - a jax invariant
    raise AssertionError("leaf order mismatch while saving")

  members: list[tuple[str, np.ndarray]] = []
  dense_members: list[tuple[str, np.ndarray]] = []
  metas, infos = [], []
  for i, ((key_path, _), leaf) in enumerate(zip(path_leaves, leaves)):
    keystr = jax.tree_util.keystr(key_path)
    arr = _as_native_array(leaf, keystr)
    if not keep_negative_zeros and arr.dtype.kind in "fcV":
      arr = np.where(arr == 0, np.zeros((), arr.dtype), arr)
    bits = _raw_bits(arr)
    encoding, arrays = _encode(bits)
    names = {role: f"{i}.{role}" for role in arrays}
    payload = sum(a.nbytes for a in arrays.values())
    nonzeros = int(arrays["values"].size) if encoding != "dense" else int(np.count_nonzero(bits))
    meta = {
      "path": keystr,
      "shape": list(arr.shape),
      "dtype": arr.dtype.name,
      "encoding": encoding,
      "nonzeros": nonzeros,
      "arrays": {role: names[role] for role in _ROLES[encoding]},
      "payload_bytes": payload,
    }
    meta["sha256"] = _sha256(meta, [arrays[role] for role in _ROLES[encoding]])
    metas.append(meta)
    infos.append(
      SparseLeafInfo(
        path=keystr,
        shape=tuple(arr.shape),
        dtype=arr.dtype.name,
        size=int(arr.size),
        nonzeros=nonzeros,
        encoding=encoding,
        payload_bytes=payload,
        dense_payload_bytes=int(bits.nbytes),
      )
    )
    members.extend((names[role], arrays[role]) for role in _ROLES[encoding])
    dense_members.append((f"{i}.values", bits))

  counter = _SizeOnly()
  _write_zip(counter, dense_members)
  dense_bytes = counter.size
  header = {
    "format": FORMAT_NAME,
    "version": FORMAT_VERSION,
    "tree": skeleton,
    "tree_sha256": _tree_sha256(skeleton),
    "dense_file_bytes": dense_bytes,
    "leaves": metas,
  }
  header_arr = np.frombuffer(json.dumps(header, separators=(",", ":")).encode("utf-8"), np.uint8)
  members.insert(0, (HEADER_NAME, header_arr))

  folder = os.path.dirname(os.path.abspath(path))
  _remove_stale_temps(folder, os.path.basename(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path), suffix=_TMP_SUFFIX)
  moved = False
  try:
    with os.fdopen(fd, "wb") as f:
      if fcntl is not None:
        # Held until the file is closed: tells a later save that this
        # temporary file still has a live writer.
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
      _write_zip(f, members)
      f.flush()
      os.fsync(f.fileno())
      # mkstemp creates the file readable by its owner only; give it the
      # permissions a plain open() would.
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(tmp, 0o666 & ~umask)
      os.replace(tmp, path)
      moved = True
  finally:
    if not moved and os.path.lexists(tmp):
      os.remove(tmp)
  return SparseFileInfo(
    path=path, file_bytes=os.path.getsize(path), dense_file_bytes=dense_bytes, leaves=tuple(infos)
  )


def load_sparse(path: str | os.PathLike, target: Optional[PyTree] = None) -> PyTree:
  """Loads a file written by :func:`save_sparse`, verifying every leaf.

  Args:
    path: the file.
    target: optional pytree (arrays, or anything with ``shape`` and ``dtype``
      such as :class:`jax.ShapeDtypeStruct`) whose structure the result takes,
      e.g. ``nnx.state(model, nnx.Param)``. Its key paths, shapes and dtypes
      must match the file's. Without it, dicts, lists, tuples and None are
      rebuilt as saved and other nodes become dicts keyed by their key-path
      entries.

  Returns:
    The pytree, with numpy arrays as leaves (bit-identical to what was saved).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    SparseFileError: if the file is not a readable ``.npz``, has no valid
      header, is of another format or version, fails a checksum or a
      consistency check, or does not match ``target``.

  Example:
    >>> import os, tempfile, numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), 'm.npz')
    >>> _ = save_sparse(path, [np.array([0, 7, 0], np.int8), (None, 2.5)])
    >>> load_sparse(path)
    [array([0, 7, 0], dtype=int8), (None, array(2.5))]
  """
  path = os.fspath(path)
  with _open_npz(path) as npz:
    header = _read_header(npz, path)
    metas = header["leaves"]
    leaves = [_decode_leaf(npz, meta, i, path) for i, meta in enumerate(metas)]
  # The tree is checked even with a target: a file with an edited tree is
  # corrupt whatever it is loaded into.
  tree = _checked_tree(header, leaves, path)
  if target is not None:
    return _unflatten_into(target, leaves, metas, path)
  return tree


def sparse_file_report(path: str | os.PathLike) -> SparseFileInfo:
  """Describes a sparse model file from its header (payloads are not read).

  Args:
    path: a file written by :func:`save_sparse`.

  Returns:
    Its :class:`SparseFileInfo`; ``print()`` it for a table.

  Raises:
    FileNotFoundError, SparseFileError: as :func:`load_sparse`.

  Example:
    >>> import os, tempfile, numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), 'm.npz')
    >>> _ = save_sparse(path, {'w': np.tril(np.ones((64, 64), np.float32))})
    >>> info = sparse_file_report(path)
    >>> info.leaves[0].encoding, info.leaves[0].nonzeros
    ('bitmask', 2080)
  """
  path = os.fspath(path)
  with _open_npz(path) as npz:
    header = _read_header(npz, path)
  # The leaves are not read, so their key paths stand in for them.
  _checked_tree(header, [None] * len(header["leaves"]), path)
  infos = []
  for meta in header["leaves"]:
    shape = tuple(meta["shape"])
    dtype = _parse_dtype(meta["dtype"], meta["path"], path)
    size = math.prod(shape)
    infos.append(
      SparseLeafInfo(
        path=meta["path"],
        shape=shape,
        dtype=dtype.name,
        size=size,
        nonzeros=meta["nonzeros"],
        encoding=meta["encoding"],
        payload_bytes=meta["payload_bytes"],
        dense_payload_bytes=size * dtype.itemsize,
      )
    )
  return SparseFileInfo(
    path=path,
    file_bytes=os.path.getsize(path),
    dense_file_bytes=header["dense_file_bytes"],
    leaves=tuple(infos),
  )


# --------------------------------------------------------------------------
# Encoding.

# The arrays of each encoding, in checksum order.
_ROLES = {
  "dense": ("values",),
  "bitmask": ("mask", "values"),
  "coo": ("indices", "values"),
  "csr": ("indptr", "indices", "values"),
}
_BITS_DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def _supported(dtype: np.dtype) -> bool:
  if dtype.itemsize not in _BITS_DTYPES:
    return False
  if dtype.kind in "biufc":
    return True
  # ml_dtypes (bfloat16, float8_*, int4, ...) have kind 'V' in numpy.
  try:
    return bool(jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
  except TypeError:
    return False


def _as_native_array(leaf: Any, keystr: str) -> np.ndarray:
  arr = np.asarray(jax.device_get(leaf))
  if not _supported(arr.dtype):
    raise TypeError(
      f"save_sparse: leaf {keystr} has dtype {arr.dtype}; supported are "
      "bool, integer and floating-point (incl. bfloat16) dtypes of 1, 2, 4 "
      "or 8 bytes per entry."
    )
  if not arr.dtype.isnative:
    arr = arr.astype(arr.dtype.newbyteorder("="))
  return arr


def _raw_bits(arr: np.ndarray) -> np.ndarray:
  """The row-major entries of ``arr`` as little-endian unsigned integers."""
  native = np.dtype(f"u{arr.dtype.itemsize}")
  flat = np.ascontiguousarray(arr).reshape(-1).view(native)
  return flat.astype(_BITS_DTYPES[arr.dtype.itemsize], copy=False)


def _encode(bits: np.ndarray) -> tuple[str, dict[str, np.ndarray]]:
  n, width = bits.size, bits.itemsize
  nonzero = bits != 0
  k = int(np.count_nonzero(nonzero))
  index_dtype = coo_index_dtype(n)
  cost = {
    "dense": n * width,
    "bitmask": (n + 7) // 8 + k * width + MEMBER_OVERHEAD_BYTES,
    "coo": k * (index_dtype.itemsize + width) + MEMBER_OVERHEAD_BYTES,
    "csr": (
      _csr_indptr_dtype(n).itemsize * (_csr_rows(n) + 1)
      + k * (2 + width)
      + 2 * MEMBER_OVERHEAD_BYTES
      if n > CSR_ROW
      else math.inf
    ),
  }
  encoding = min(ENCODINGS, key=lambda e: (cost[e], ENCODINGS.index(e)))
  if encoding == "dense":
    return encoding, {"values": bits}
  values = bits[nonzero]
  if encoding == "bitmask":
    return encoding, {"mask": np.packbits(nonzero), "values": values}
  flat = np.flatnonzero(nonzero)
  if encoding == "coo":
    return encoding, {"indices": flat.astype(index_dtype), "values": values}
  counts = np.bincount(flat // CSR_ROW, minlength=_csr_rows(n))
  indptr = np.concatenate([[0], np.cumsum(counts)])
  return encoding, {
    "indptr": indptr.astype(_csr_indptr_dtype(n)),
    "indices": (flat % CSR_ROW).astype("<u2"),
    "values": values,
  }


def _csr_rows(n: int) -> int:
  return -(-n // CSR_ROW)


def _csr_indptr_dtype(n: int) -> np.dtype:
  return np.dtype("<i4") if n < 2**31 else np.dtype("<i8")


# The metadata fields that the checksum covers along with the payload.
_HASHED_FIELDS = ("path", "shape", "dtype", "encoding", "nonzeros")


def _sha256(meta: dict, arrays: Sequence[np.ndarray]) -> str:
  h = hashlib.sha256()
  fields = {k: meta[k] for k in _HASHED_FIELDS}
  h.update(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
  for a in arrays:
    h.update(np.ascontiguousarray(a).data.cast("B"))
  return h.hexdigest()


# --------------------------------------------------------------------------
# Writing the zip.


class _SizeOnly(io.RawIOBase):
  """A seekable sink that only tracks how many bytes a file would have."""

  def __init__(self):
    super().__init__()
    self.pos = 0
    self.size = 0

  def writable(self):
    return True

  def seekable(self):
    return True

  def write(self, b):
    n = memoryview(b).nbytes
    self.pos += n
    self.size = max(self.size, self.pos)
    return n

  def seek(self, offset, whence=io.SEEK_SET):
    if whence == io.SEEK_SET:
      self.pos = offset
    elif whence == io.SEEK_CUR:
      self.pos += offset
    else:
      self.pos = self.size + offset
    return self.pos

  def tell(self):
    return self.pos


def _write_zip(fileobj, members: Sequence[tuple[str, np.ndarray]]) -> None:
  with zipfile.ZipFile(fileobj, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
    for name, arr in members:
      big = arr.nbytes > (1 << 30)
      with zf.open(name + ".npy", "w", force_zip64=big) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


# --------------------------------------------------------------------------
# Reading and checking.


class _open_npz:
  """``with _open_npz(path) as npz``: the archive, or a SparseFileError."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(errno.ENOENT, "No sparse model file at", path)
    try:
      npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
      raise SparseFileError(
        f"{path} is not a readable .npz (zip) file; it may be truncated or "
        f"not a sparse model file: {e}"
      ) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
      raise SparseFileError(
        f"{path} is a single .npy array ({type(npz).__name__}), not a "
        "sparse model .npz file (a zip of .npy arrays with a 'header' "
        "entry)."
      )
    self.npz = npz

  def __enter__(self):
    return self.npz

  def __exit__(self, *exc):
    self.npz.close()
    return False


def _member(npz, name: str, what: str) -> np.ndarray:
  """Entry ``name`` of the archive as an array, or a SparseFileError."""
  try:
    out = npz[name]
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, TypeError) as e:
    raise SparseFileError(f"{what}: {e}") from None
  if not isinstance(out, np.ndarray):
    # numpy hands back the raw bytes of a member that is not a .npy array
    # (a pickle, a text file): never unpickled, refused.
    raise SparseFileError(
      f"{what}: the entry is not a .npy array but {len(out)} raw bytes "
      f"starting {bytes(out[:8])!r} (a pickle or another file); expected a "
      ".npy array."
    )
  return out


def _read_header(npz, path: str) -> dict:
  if HEADER_NAME not in npz.files:
    raise SparseFileError(
      f"{path} has no '{HEADER_NAME}' entry, so it is not a sparse model "
      f"file written by optax_gsm.save_sparse (entries: "
      f"{sorted(npz.files)[:8]})."
    )
  raw = _member(npz, HEADER_NAME, f"{path}: cannot read the header")
  if raw.dtype != np.uint8 or raw.ndim != 1:
    raise SparseFileError(
      f"{path}: the header must be a 1-D uint8 array of UTF-8 JSON, got "
      f"dtype {raw.dtype} and shape {raw.shape}."
    )
  try:
    header = json.loads(raw.tobytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise SparseFileError(f"{path}: the header is not valid UTF-8 JSON: {e}") from None
  if not isinstance(header, dict):
    raise SparseFileError(f"{path}: the header must be a JSON object, got {type(header).__name__}.")
  if header.get("format") != FORMAT_NAME:
    raise SparseFileError(f"{path}: format is {header.get('format')!r}, expected {FORMAT_NAME!r}.")
  version = header.get("version")
  if isinstance(version, bool) or version not in READ_VERSIONS:
    raise SparseFileError(
      f"{path}: format version {version!r} is not supported; this reader "
      f"reads versions {', '.join(map(str, READ_VERSIONS))}."
    )
  if version >= 2 and not isinstance(header.get("tree_sha256"), str):
    raise SparseFileError(
      f"{path}: a version {version} header needs 'tree_sha256' (a str), "
      f"got {header.get('tree_sha256')!r}."
    )
  leaves = header.get("leaves")
  if (
    not isinstance(leaves, list)
    or "tree" not in header
    or not isinstance(header.get("dense_file_bytes"), int)
  ):
    raise SparseFileError(
      f"{path}: the header lacks 'leaves' (a list), 'tree' or 'dense_file_bytes'."
    )
  for i, meta in enumerate(leaves):
    _check_meta(meta, i, path)
  return header


def _check_meta(meta: Any, i: int, path: str) -> None:
  where = f"{path}: header entry of leaf {i}"
  if not isinstance(meta, dict):
    raise SparseFileError(f"{where} is not a JSON object.")
  want = {
    "path": str,
    "shape": list,
    "dtype": str,
    "encoding": str,
    "nonzeros": int,
    "arrays": dict,
    "payload_bytes": int,
    "sha256": str,
  }
  for key, typ in want.items():
    if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
      raise SparseFileError(f"{where} needs '{key}' of type {typ.__name__}, got {meta.get(key)!r}.")
  if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in meta["shape"]):
    raise SparseFileError(f"{where} has an invalid shape {meta['shape']!r}.")
  if meta["encoding"] not in ENCODINGS:
    raise SparseFileError(
      f"{where} has encoding {meta['encoding']!r}; expected one of {ENCODINGS}."
    )
  roles = _ROLES[meta["encoding"]]
  if sorted(meta["arrays"]) != sorted(roles) or not all(
    isinstance(v, str) for v in meta["arrays"].values()
  ):
    raise SparseFileError(
      f"{where}: encoding {meta['encoding']!r} needs arrays {roles}, got {meta['arrays']!r}."
    )


def _csr_flat(indptr: np.ndarray, idx: np.ndarray, n: int, k: int, where: str) -> np.ndarray:
  """Flat indices from the csr row offsets and in-row positions."""
  rows = _csr_rows(n)
  want = _csr_indptr_dtype(n)
  if n <= CSR_ROW or indptr.dtype != want or indptr.shape != (rows + 1,):
    raise SparseFileError(
      f"{where}: csr needs more than {CSR_ROW} entries and indptr of "
      f"{want} with shape ({rows + 1},); got {n} entries and {indptr.dtype} "
      f"of shape {indptr.shape}."
    )
  counts = np.diff(indptr.astype(np.int64))
  if indptr[0] != 0 or indptr[-1] != k or np.any(counts < 0):
    raise SparseFileError(f"{where}: indptr must rise from 0 to the {k} non-zeros.")
  return np.repeat(np.arange(rows, dtype=np.int64) * CSR_ROW, counts) + idx


def _parse_dtype(name: str, leaf: str, path: str) -> np.dtype:
  try:
    dtype = np.dtype(jnp.dtype(name))
  except (TypeError, ValueError):
    dtype = None
  if dtype is None or dtype.name != name or not _supported(dtype):
    raise SparseFileError(f"{path}: leaf {leaf} has unsupported dtype {name!r}.")
  return dtype


def _decode_leaf(npz, meta: dict, i: int, path: str) -> np.ndarray:
  leaf = meta["path"]
  where = f"{path}: leaf {i} ({leaf})"
  dtype = _parse_dtype(meta["dtype"], leaf, path)
  shape = tuple(meta["shape"])
  n = math.prod(shape)
  k = meta["nonzeros"]
  encoding = meta["encoding"]
  roles = _ROLES[encoding]
  arrays = {}
  for role in roles:
    name = meta["arrays"][role]
    if name not in npz.files:
      raise SparseFileError(f"{where}: the file has no entry {name!r}.")
    arrays[role] = _member(
      npz, name, f"{where}: cannot read entry {name!r} (corrupt or truncated file)"
    )
  digest = _sha256(meta, [arrays[r] for r in roles])
  if digest != meta["sha256"]:
    raise SparseFileError(
      f"{where}: sha256 checksum mismatch (file {digest}, header "
      f"{meta['sha256']}); the file is corrupt."
    )

  bits_dtype = _BITS_DTYPES[dtype.itemsize]
  values = arrays["values"]
  n_values = n if encoding == "dense" else k
  if values.dtype != bits_dtype or values.shape != (n_values,):
    raise SparseFileError(
      f"{where}: values must be {bits_dtype} of shape ({n_values},), got "
      f"{values.dtype} of shape {values.shape}."
    )
  if not 0 <= k <= n:
    raise SparseFileError(f"{where}: {k} non-zeros for {n} entries.")
  if encoding == "dense":
    bits = values
  else:
    bits = np.zeros((n,), bits_dtype)
    if encoding == "bitmask":
      mask = arrays["mask"]
      if mask.dtype != np.uint8 or mask.shape != ((n + 7) // 8,):
        raise SparseFileError(
          f"{where}: the bitmask must be uint8 of shape ({(n + 7) // 8},), "
          f"got {mask.dtype} of shape {mask.shape}."
        )
      nonzero = np.unpackbits(mask, count=n).astype(bool)
      if int(np.count_nonzero(nonzero)) != k or int(np.count_nonzero(np.unpackbits(mask)[n:])):
        raise SparseFileError(f"{where}: the bitmask does not have exactly {k} set bits.")
      bits[nonzero] = values
    else:
      idx = arrays["indices"]
      want = coo_index_dtype(n) if encoding == "coo" else np.dtype("<u2")
      if idx.dtype != want or idx.shape != (k,):
        raise SparseFileError(
          f"{where}: indices must be {want} of shape ({k},), got {idx.dtype} of shape {idx.shape}."
        )
      idx = idx.astype(np.int64)
      if encoding == "csr":
        idx = _csr_flat(arrays["indptr"], idx, n, k, where)
      if k and (idx[0] < 0 or idx[-1] >= n or np.any(np.diff(idx) <= 0)):
        raise SparseFileError(f"{where}: indices must be strictly increasing in [0, {n}).")
      bits[idx] = values
    if np.any(values == 0):
      raise SparseFileError(f"{where}: a stored non-zero entry is zero.")
  native = bits.astype(np.dtype(f"u{dtype.itemsize}"), copy=False)
  return native.view(dtype).reshape(shape)


# --------------------------------------------------------------------------
# Tree structure.


def _key_entry(k) -> dict:
  if isinstance(k, jax.tree_util.DictKey):
    return {"dict": _json_key(k.key)}
  if isinstance(k, jax.tree_util.GetAttrKey):
    return {"attr": k.name}
  if isinstance(k, jax.tree_util.SequenceKey):
    return {"index": k.idx}
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return {"index": k.key}
  raise TypeError(f"save_sparse: unsupported key-path entry {k!r}.")


def _json_key(key):
  if isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool)):
    return key
  raise TypeError(
    f"save_sparse: dict keys must be str or int, got {key!r} of type {type(key).__name__}."
  )


def _skeleton(x: Any, leaves: list) -> dict:
  """A JSON description of the structure of ``x``; appends its leaves."""
  if x is None:
    return {"kind": "none"}
  t = type(x)
  if t is dict:
    keys = sorted(x)  # the order jax flattens dicts in
    return {
      "kind": "dict",
      "keys": [_json_key(k) for k in keys],
      "children": [_skeleton(x[k], leaves) for k in keys],
    }
  if t in (list, tuple):
    return {"kind": t.__name__, "children": [_skeleton(c, leaves) for c in x]}
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(x)):
    leaves.append(x)
    return {"kind": "leaf"}
  # Any other pytree node: one level of its flattening, with its key paths.
  children = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)[0]
  return {
    "kind": "node",
    "type": f"{t.__module__}.{t.__qualname__}",
    "keys": [_key_entry(p[0]) for p, _ in children],
    "children": [_skeleton(c, leaves) for _, c in children],
  }


def _rebuild(node: dict, leaves, paths, prefix: str = "") -> Any:
  """Rebuilds the tree from the skeleton; checks each leaf's key path."""
  kind = node["kind"]
  if kind == "none":
    return None
  if kind == "leaf":
    want = next(paths)
    if want != prefix:
      raise ValueError(
        f"the tree places a leaf at {prefix or '(root)'} but the leaf stored there has path {want}"
      )
    return next(leaves)
  if kind == "dict":
    keys, children = node["keys"], node["children"]
    if len(keys) != len(children):
      raise ValueError("dict keys and children differ in length")
    return {k: _rebuild(c, leaves, paths, f"{prefix}[{k!r}]") for k, c in zip(keys, children)}
  if kind in ("list", "tuple"):
    out = [_rebuild(c, leaves, paths, f"{prefix}[{i}]") for i, c in enumerate(node["children"])]
    return out if kind == "list" else tuple(out)
  if kind == "node":
    entries, children = node["keys"], node["children"]
    if len(entries) != len(children):
      raise ValueError("node keys and children differ in length")
    out = {}
    for e, c in zip(entries, children):
      ((how, k),) = e.items()
      step = {"dict": f"[{k!r}]", "attr": f".{k}", "index": f"[{k}]"}[how]
      out[k] = _rebuild(c, leaves, paths, prefix + step)
    return out
  raise ValueError(f"unknown node kind {kind!r}")


def _tree_sha256(tree: dict) -> str:
  """The checksum of a tree skeleton (its canonical JSON)."""
  text = json.dumps(tree, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


_NODE_FIELDS = {
  "none": {"kind"},
  "leaf": {"kind"},
  "dict": {"kind", "keys", "children"},
  "list": {"kind", "children"},
  "tuple": {"kind", "children"},
  "node": {"kind", "type", "keys", "children"},
}


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check_skeleton(node: Any, at: str) -> None:
  """Checks that ``node`` is exactly what :func:`_skeleton` writes."""
  place = at or "(root)"
  if not isinstance(node, dict) or node.get("kind") not in _NODE_FIELDS:
    kind = node.get("kind") if isinstance(node, dict) else node
    raise ValueError(
      f"at {place}: expected a node {{'kind': one of "
      f"{sorted(_NODE_FIELDS)}, ...}}, got kind {kind!r}"
    )
  kind = node["kind"]
  fields = set(node)
  if fields != _NODE_FIELDS[kind]:
    raise ValueError(
      f"at {place}: a {kind!r} node has the fields "
      f"{sorted(_NODE_FIELDS[kind])}, got {sorted(fields)}"
    )
  if kind in ("none", "leaf"):
    return
  children = node["children"]
  if not isinstance(children, list):
    raise ValueError(f"at {place}: 'children' must be a list")
  if kind in ("list", "tuple"):
    for i, c in enumerate(children):
      _check_skeleton(c, f"{at}[{i}]")
    return
  keys = node["keys"]
  if not isinstance(keys, list) or len(keys) != len(children):
    raise ValueError(f"at {place}: 'keys' must be a list as long as 'children'")
  if kind == "dict":
    if not all(isinstance(k, str) or _is_int(k) for k in keys):
      raise ValueError(f"at {place}: dict keys must be str or int")
    if len({(type(k), k) for k in keys}) != len(keys):
      raise ValueError(f"at {place}: repeated dict keys")
    for k, c in zip(keys, children):
      _check_skeleton(c, f"{at}[{k!r}]")
    return
  if not isinstance(node["type"], str):
    raise ValueError(f"at {place}: 'type' must be a str")
  for e, c in zip(keys, children):
    ok = isinstance(e, dict) and len(e) == 1
    if ok:
      ((how, k),) = e.items()
      ok = (
        (how == "dict" and (isinstance(k, str) or _is_int(k)))
        or (how == "attr" and isinstance(k, str))
        or (how == "index" and _is_int(k))
      )
    if not ok:
      raise ValueError(
        f"at {place}: a key entry must be {{'dict': str or int}}, "
        f"{{'attr': str}} or {{'index': int}}, got {e!r}"
      )
    step = {"dict": f"[{k!r}]", "attr": f".{k}", "index": f"[{k}]"}[how]
    _check_skeleton(c, at + step)


def _checked_tree(header: dict, leaves: list, path: str) -> PyTree:
  """The tree of the header around ``leaves``, checked exactly.

  The skeleton must have exactly the fields :func:`save_sparse` writes, put
  at every leaf the leaf stored with that key path, hold as many leaves as
  are stored, and (from version 2) match ``tree_sha256``.
  """
  tree_node = header["tree"]
  metas = header["leaves"]
  it = iter(leaves)
  try:
    _check_skeleton(tree_node, "")
    tree = _rebuild(tree_node, it, iter(m["path"] for m in metas))
  except (
    KeyError,
    TypeError,
    ValueError,
    IndexError,
    StopIteration,
    AttributeError,
    RecursionError,
  ) as e:
    text = str(e) or "it ends before the stored leaves are placed"
    raise SparseFileError(
      f"{path}: the tree structure in the header is malformed: {type(e).__name__}: {text}"
    ) from None
  if next(it, _END) is not _END:
    raise SparseFileError(
      f"{path}: the header's tree structure has fewer leaves than the {len(leaves)} stored."
    )
  if header["version"] >= 2:
    digest = _tree_sha256(tree_node)
    if digest != header["tree_sha256"]:
      raise SparseFileError(
        f"{path}: the tree structure in the header does not match its "
        f"checksum (tree_sha256 {header['tree_sha256']}, tree {digest}): "
        "the header was edited or is corrupt."
      )
  return tree


_END = object()
_TMP_SUFFIX = ".tmp"
# A temporary file younger than this is never taken for stale: its writer
# may not have locked it yet.
_STALE_AFTER_S = 2.0


def _remove_stale_temps(folder: str, basename: str) -> None:
  """Removes the temporary files that killed saves to ``basename`` left.

  A temporary file is stale when no process holds its lock (a live
  :func:`save_sparse` holds it until the file is moved into place) and it
  is older than :data:`_STALE_AFTER_S`. Without ``fcntl`` nothing is
  removed.
  """
  if fcntl is None:  # pragma: no cover - not POSIX
    return
  pattern = re.compile(
    "^" + re.escape("." + basename) + r"[A-Za-z0-9_]{8}" + re.escape(_TMP_SUFFIX) + "$"
  )
  try:
    names = os.listdir(folder)
  except OSError:
    return
  now = time.time()
  for name in names:
    if not pattern.match(name):
      continue
    tmp = os.path.join(folder, name)
    try:
      if now - os.lstat(tmp).st_mtime < _STALE_AFTER_S:
        continue
      fd = os.open(tmp, os.O_RDONLY)
    except OSError:
      continue
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      continue  # a live writer holds it
    else:
      try:
        os.remove(tmp)
      except OSError:
        pass
    finally:
      os.close(fd)


def _unflatten_into(target: PyTree, leaves: list, metas: list, path: str) -> PyTree:
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  if len(path_leaves) != len(leaves):
    raise SparseFileError(f"{path} holds {len(leaves)} leaves but target has {len(path_leaves)}.")
  for (key_path, t), arr, meta in zip(path_leaves, leaves, metas):
    keystr = jax.tree_util.keystr(key_path)
    if keystr != meta["path"]:
      raise SparseFileError(
        f"{path}: leaf {meta['path']} of the file is at {keystr} in target; the structures differ."
      )
    t_shape = tuple(np.shape(t))
    t_dtype = getattr(t, "dtype", None)
    t_dtype = np.dtype(np.asarray(t).dtype if t_dtype is None else t_dtype)
    if t_shape != arr.shape or t_dtype != arr.dtype:
      raise SparseFileError(
        f"{path}: leaf {keystr} is {arr.dtype}{list(arr.shape)} in the file "
        f"but {t_dtype}{list(t_shape)} in target."
      )
  return jax.tree.unflatten(treedef, leaves)
