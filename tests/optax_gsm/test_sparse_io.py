"""save_sparse / load_sparse: exact round trips, sizes, and every failure mode."""

import collections
import json
import os
import tempfile
import zipfile

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_gsm
from optax_gsm import sparse_io
from optax_gsm.sparse_io import SparseFileError


def _bits(a):
  a = np.asarray(a)
  return a.reshape(-1).view(np.dtype(f"u{a.dtype.itemsize}"))


def assert_bitwise_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    w = np.asarray(w)
    assert isinstance(g, np.ndarray)
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(_bits(g), _bits(w))


def _sparse(rng, shape, density, dtype):
  x = np.where(rng.random(shape) < density, rng.standard_normal(shape), 0.0)
  return np.asarray(x).astype(dtype)


def test_round_trip_dtypes_structures_and_special_leaves(tmp_path):
  rng = np.random.default_rng(0)
  special = np.array([0.0, -0.0, np.nan, -np.inf, 1e-40, 3.0], np.float32)
  nan_payload = np.array([0x7FC00001, 0xFFC12345, 0], np.uint32).view(np.float32)
  params = {
    "f32": _sparse(rng, (40, 30), 0.02, np.float32),
    "bf16": jnp.asarray(_sparse(rng, (64, 64), 0.3, np.float32), jnp.bfloat16),
    "f16": _sparse(rng, (17, 5), 0.6, np.float16),
    "f64": _sparse(rng, (9,), 0.5, np.float64),
    "ints": [
      np.array([0, -3, 0, 2**31 - 1], np.int32),
      np.array([[0, 200], [0, 0]], np.uint8),
      np.array([0, -(2**62)], np.int64),
      np.array([True, False]),
    ],
    "special": (special, nan_payload, np.float32(-0.0)),
    "all_zero": np.zeros((300, 7), np.float32),
    "dense": rng.standard_normal((50, 50)).astype(np.float32),
    "empty": (np.zeros((0,), np.float32), np.zeros((3, 0, 2), jnp.bfloat16)),
    "scalar": np.float32(2.5),
    "int_keys": {7: np.ones(3, np.int8), -1: np.zeros(2, np.int8)},
    "none": None,
    "nested": [[], {}, ()],
  }
  path = tmp_path / "m.npz"
  info = sparse_io.save_sparse(path, params)
  back = sparse_io.load_sparse(path)
  assert_bitwise_equal(back, params)
  assert isinstance(back["special"], tuple) and isinstance(back["ints"], list)
  assert back["none"] is None and back["nested"] == [[], {}, ()]
  assert set(back["int_keys"]) == {7, -1}
  assert back["bf16"].dtype == jnp.bfloat16
  enc = {leaf.path: leaf.encoding for leaf in info.leaves}
  assert enc["['dense']"] == "dense"
  assert enc["['f32']"] == "coo"
  assert enc["['bf16']"] == "bitmask"  # 30% dense: the mask is smallest
  assert enc["['all_zero']"] == "coo"
  nz = {leaf.path: leaf.nonzeros for leaf in info.leaves}
  # -0.0 and NaN are stored (any bit set), +0.0 is not.
  assert nz["['special'][0]"] == 5 and nz["['special'][1]"] == 2
  assert nz["['all_zero']"] == 0
  assert info.file_bytes == os.path.getsize(path)
  # Nothing but the file is left in the folder (the temp file was moved).
  assert os.listdir(tmp_path) == ["m.npz"]


def test_payload_sizes_and_report(tmp_path):
  w = np.zeros((1000, 100), np.float32)  # 100,000 entries
  w.reshape(-1)[::50] = 1.0  # 2,000 non-zeros: csr
  u = np.zeros((1000, 100), np.float32)
  u.reshape(-1)[::5000] = 2.0  # 20 non-zeros: int32 coo
  v = np.zeros((100, 100), np.float16)  # 10,000: uint16 COO / bitmask
  v[:, :40] = 1.0  # 4,000 non-zeros (40%)
  info = sparse_io.save_sparse(tmp_path / "s.npz", {"w": w, "u": u, "v": v})
  rows = {r.path: r for r in info.leaves}
  assert rows["['w']"].encoding == "csr"
  assert rows["['w']"].payload_bytes == 4 * (2 + 1) + 2000 * (2 + 4)
  assert rows["['u']"].encoding == "coo"
  assert rows["['u']"].payload_bytes == 20 * (4 + 4)
  assert rows["['v']"].encoding == "bitmask"
  assert rows["['v']"].payload_bytes == 10_000 // 8 + 4000 * 2
  assert rows["['w']"].dense_payload_bytes == 400_000
  assert_bitwise_equal(sparse_io.load_sparse(tmp_path / "s.npz"), {"w": w, "u": u, "v": v})
  dense_path = tmp_path / "dense.npz"
  np.savez(dense_path, u, v, w)
  # The dense reference is the same leaves as a plain .npz (member names
  # differ by a few bytes).
  assert abs(info.dense_file_bytes - os.path.getsize(dense_path)) < 300
  report = sparse_io.sparse_file_report(tmp_path / "s.npz")
  assert report == dataclass_replace_path(info, report.path)
  d = json.loads(json.dumps(report.to_dict()))
  assert d["encodings"] == {"dense": 0, "bitmask": 1, "coo": 1, "csr": 1}
  assert d["ratio"] == pytest.approx(info.dense_file_bytes / info.file_bytes)
  text = str(report)
  assert "bitmask" in text and "x smaller" in text and "['w']" in text


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.int8])
def test_csr_rows_edges_round_trip(tmp_path, dtype):
  n = 3 * 70_001  # 4 rows of 65,536, last partial
  x = np.zeros(n, np.float32)
  at = [0, 1, 65_535, 65_536, 65_537, 3 * 65_536 + 5, n - 1]  # row 2 empty
  x[at] = np.arange(1, len(at) + 1)
  x = x.astype(dtype).reshape(3, 70_001)
  info = sparse_io.save_sparse(tmp_path / "c.npz", {"x": x})
  assert info.leaves[0].encoding in ("csr", "coo")
  back = sparse_io.load_sparse(tmp_path / "c.npz")
  assert_bitwise_equal(back, {"x": x})
  y = np.where(np.arange(n) % 40 == 0, 1, 0).astype(dtype).reshape(3, 70_001)
  info = sparse_io.save_sparse(tmp_path / "d.npz", {"y": y})
  assert info.leaves[0].encoding == "csr"
  assert_bitwise_equal(sparse_io.load_sparse(tmp_path / "d.npz"), {"y": y})


def dataclass_replace_path(info, path):
  import dataclasses

  return dataclasses.replace(info, path=path)


def test_lenet_300_100_at_60x(tmp_path, capsys):
  rng = np.random.default_rng(0)
  params = {}
  for name, (i, o) in {"fc1": (784, 300), "fc2": (300, 100), "fc3": (100, 10)}.items():
    params[name] = {
      "kernel": jnp.asarray(rng.standard_normal((i, o)) / np.sqrt(i), jnp.float32),
      "bias": jnp.asarray(0.1 * rng.standard_normal(o), jnp.float32),
    }
  pruned, _ = optax_gsm.magnitude_prune(params, compression=60)
  path = tmp_path / "lenet300100_60x.npz"
  info = sparse_io.save_sparse(path, pruned)
  assert_bitwise_equal(sparse_io.load_sparse(path), jax.device_get(pruned))
  assert optax_gsm.sparsity_report(pruned).eligible.nonzeros == round(266_200 / 60)
  dense_path = tmp_path / "dense.npz"
  np.savez(dense_path, *[np.asarray(x) for x in jax.tree.leaves(pruned)])
  enc = {r.path: r.encoding for r in info.leaves}
  assert enc["['fc1']['kernel']"] == "csr"  # 235,200 entries
  assert enc["['fc1']['bias']"] == "dense"
  # 4,437 kept kernel weights at about 6 bytes + 410 dense biases.
  assert info.file_bytes < 50_000
  assert info.ratio > 20
  with capsys.disabled():
    print(
      f"\nLeNet-300-100 at 60x: sparse file {info.file_bytes:,} bytes, "
      f"dense .npz {info.dense_file_bytes:,} bytes (np.savez "
      f"{os.path.getsize(dense_path):,}), {info.ratio:.1f}x smaller"
    )
    print(info)


def test_flax_nnx_state_round_trip_with_target(tmp_path):
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  pruned, _ = optax_gsm.magnitude_prune(state, 5)
  path = tmp_path / "nnx.npz"
  sparse_io.save_sparse(path, pruned)
  back = sparse_io.load_sparse(path, target=state)
  assert type(back) is type(state)
  assert_bitwise_equal(back, jax.device_get(pruned))
  nnx.update(model, back)
  np.testing.assert_array_equal(model.kernel[...], pruned["kernel"][...])
  # Without a target, other pytree nodes come back as nested dicts.
  plain = sparse_io.load_sparse(path)
  assert set(plain) == {"bias", "kernel"}
  np.testing.assert_array_equal(plain["kernel"]["value"], pruned["kernel"][...])
  # A ShapeDtypeStruct target works too.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  assert type(sparse_io.load_sparse(path, target=abstract)) is type(state)


def test_namedtuple_saved_through_key_paths(tmp_path):
  Pair = collections.namedtuple("Pair", ["w", "b"])
  params = Pair(w=np.eye(3, dtype=np.float32), b=np.zeros(3, np.float32))
  sparse_io.save_sparse(tmp_path / "p.npz", params)
  plain = sparse_io.load_sparse(tmp_path / "p.npz")
  assert set(plain) == {"w", "b"}
  back = sparse_io.load_sparse(tmp_path / "p.npz", target=params)
  assert isinstance(back, Pair)
  assert_bitwise_equal(back, params)


# ---------------------------------------------------------------------------
# Hypothesis: random sparse pytrees.

_DTYPES = [np.float32, np.float16, jnp.bfloat16, np.int32, np.int8, np.uint16, np.float64, np.bool_]


@st.composite
def sparse_leaf(draw):
  dtype = draw(st.sampled_from(_DTYPES))
  shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
  density = draw(st.sampled_from([0.0, 0.01, 0.1, 0.4, 0.9, 1.0]))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  values = rng.standard_normal(shape) * 100
  # Multiplying by the mask leaves -0.0 where a negative value was masked:
  # those are kept bit for bit (and count as stored entries).
  values = values * (rng.random(shape) < density)
  return np.asarray(values).astype(dtype)


_trees = st.recursive(
  sparse_leaf() | st.none(),
  lambda children: (
    st.lists(children, max_size=3)
    | st.lists(children, max_size=3).map(tuple)
    | st.dictionaries(st.text("abcxyz_", min_size=1, max_size=4), children, max_size=3)
    | st.dictionaries(st.integers(-3, 3), children, max_size=3)
  ),
  max_leaves=6,
)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(_trees)
def test_round_trip_random_pytrees(tree):
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "t.npz")
    info = sparse_io.save_sparse(path, tree)
    back = sparse_io.load_sparse(path)
    assert_bitwise_equal(back, tree)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    # Each leaf's payload is the smallest of the three encodings (up to the
    # per-member overhead, which can only favour dense).
    for leaf in info.leaves:
      width = np.dtype(leaf.dtype).itemsize
      k, n = leaf.nonzeros, leaf.size
      coo = k * (sparse_io.coo_index_dtype(n).itemsize + width)
      bitmask = (n + 7) // 8 + k * width
      assert leaf.payload_bytes <= n * width
      assert leaf.payload_bytes <= min(coo, bitmask) + (sparse_io.MEMBER_OVERHEAD_BYTES)


# ---------------------------------------------------------------------------
# Failure modes: never a silently wrong model.


@pytest.fixture
def saved(tmp_path):
  rng = np.random.default_rng(1)
  params = {
    "w": _sparse(rng, (60, 50), 0.05, np.float32),
    "b": rng.standard_normal(50).astype(np.float32),
  }
  path = tmp_path / "model.npz"
  sparse_io.save_sparse(path, params)
  return path, params


def _members(path):
  with zipfile.ZipFile(path) as zf:
    return {name: zf.read(name) for name in zf.namelist()}


def _rewrite(path, members):
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in members.items():
      zf.writestr(name, data)


def _npy_bytes(arr):
  import io

  buf = io.BytesIO()
  np.lib.format.write_array(buf, arr, allow_pickle=False)
  return buf.getvalue()


def _header(path):
  with np.load(path, allow_pickle=False) as npz:
    return json.loads(npz["header"].tobytes())


def _with_header(path, header):
  members = _members(path)
  members["header.npy"] = _npy_bytes(np.frombuffer(json.dumps(header).encode(), np.uint8))
  _rewrite(path, members)


def test_missing_file_names_the_path(tmp_path):
  path = tmp_path / "nope" / "model.npz"
  with pytest.raises(FileNotFoundError) as e:
    sparse_io.load_sparse(path)
  assert str(path) in str(e.value) and e.value.filename == str(path)
  with pytest.raises(FileNotFoundError):
    sparse_io.sparse_file_report(path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file(saved, keep):
  path, _ = saved
  data = path.read_bytes()
  path.write_bytes(data[: int(len(data) * keep)])
  with pytest.raises(SparseFileError, match="not a readable"):
    sparse_io.load_sparse(path)


def test_flipped_byte_in_payload_is_caught(saved):
  path, params = saved
  data = bytearray(path.read_bytes())
  raw = np.asarray(params["b"]).tobytes()
  at = bytes(data).index(raw[:16])  # inside b's values
  data[at + 5] ^= 0x10
  path.write_bytes(bytes(data))
  with pytest.raises(SparseFileError):  # zip CRC-32 catches it
    sparse_io.load_sparse(path)


def test_changed_payload_with_valid_zip_fails_sha256(saved):
  path, _ = saved
  members = _members(path)
  header = _header(path)
  name = [m for m in header["leaves"] if m["path"] == "['w']"][0]["arrays"]["values"] + ".npy"
  with zipfile.ZipFile(path) as zf:
    values = np.lib.format.read_array(zf.open(name), allow_pickle=False)
  values = values.copy()
  values[3] ^= 1  # one bit of one weight
  members[name] = _npy_bytes(values)
  _rewrite(path, members)  # a valid zip, fresh CRCs
  with pytest.raises(SparseFileError, match="sha256 checksum mismatch"):
    sparse_io.load_sparse(path)


def test_header_missing_or_garbage(saved, tmp_path):
  path, _ = saved
  members = _members(path)
  del members["header.npy"]
  _rewrite(path, members)
  with pytest.raises(SparseFileError, match="no 'header' entry"):
    sparse_io.load_sparse(path)

  members["header.npy"] = _npy_bytes(np.frombuffer(b"{not json", np.uint8))
  _rewrite(path, members)
  with pytest.raises(SparseFileError, match="not valid UTF-8 JSON"):
    sparse_io.load_sparse(path)

  members["header.npy"] = _npy_bytes(np.frombuffer(b"[1, 2]", np.uint8))
  _rewrite(path, members)
  with pytest.raises(SparseFileError, match="JSON object"):
    sparse_io.load_sparse(path)

  members["header.npy"] = _npy_bytes(np.arange(3.0))
  _rewrite(path, members)
  with pytest.raises(SparseFileError, match="uint8"):
    sparse_io.load_sparse(path)

  text = tmp_path / "text.npz"
  text.write_text("hello")
  with pytest.raises(SparseFileError, match="not a readable"):
    sparse_io.load_sparse(text)
  plain = tmp_path / "plain.npz"
  np.savez(plain, np.ones(3))
  with pytest.raises(SparseFileError, match="no 'header' entry"):
    sparse_io.load_sparse(plain)


def test_wrong_format_or_version(saved):
  path, _ = saved
  header = _header(path)
  _with_header(path, {**header, "version": 3})
  with pytest.raises(SparseFileError, match="version 3 is not supported"):
    sparse_io.load_sparse(path)
  with pytest.raises(SparseFileError, match="version 3"):
    sparse_io.sparse_file_report(path)
  _with_header(path, {**header, "version": True})
  with pytest.raises(SparseFileError, match="version True"):
    sparse_io.load_sparse(path)
  _with_header(path, {**header, "format": "other"})
  with pytest.raises(SparseFileError, match="format is 'other'"):
    sparse_io.load_sparse(path)


@pytest.mark.parametrize(
  "edit, match",
  [
    # Edits of checksummed fields are caught by the checksum.
    (lambda m: m.update(shape=[61, 50]), "sha256 checksum mismatch"),
    (lambda m: m.update(shape=[50, 60]), "sha256 checksum mismatch"),
    (lambda m: m.update(dtype="int32"), "sha256 checksum mismatch"),
    (lambda m: m.update(path="['v']"), "sha256 checksum mismatch"),
    (lambda m: m.update(sha256="0" * 64), "sha256 checksum mismatch"),
    (lambda m: m["arrays"].update(values="0.values"), "sha256"),
    # Others by the header checks.
    (lambda m: m.update(dtype="object"), "unsupported dtype"),
    (lambda m: m.update(dtype="float16"), "sha256|values must be"),
    (lambda m: m.update(encoding="rle"), "encoding 'rle'"),
    (lambda m: m.update(encoding="dense"), "needs arrays"),
    (lambda m: m.update(nonzeros="3"), "'nonzeros'"),
    (lambda m: m["arrays"].update(values="9.values"), "no entry '9.values'"),
  ],
)
def test_inconsistent_leaf_metadata(saved, edit, match):
  path, _ = saved
  header = _header(path)
  edit([m for m in header["leaves"] if m["path"] == "['w']"][0])
  _with_header(path, header)
  with pytest.raises(SparseFileError, match=match):
    sparse_io.load_sparse(path)


def test_malformed_tree_in_header(saved):
  path, _ = saved
  header = _header(path)
  _with_header(
    path, {**header, "tree": {"kind": "dict", "keys": ["b"], "children": [{"kind": "leaf"}]}}
  )
  with pytest.raises(SparseFileError, match="fewer leaves"):
    sparse_io.load_sparse(path)
  _with_header(path, {**header, "tree": {"kind": "mystery"}})
  with pytest.raises(SparseFileError, match="malformed"):
    sparse_io.load_sparse(path)
  # Swapping the dict keys would swap the leaves: the key paths disagree.
  _with_header(
    path,
    {
      **header,
      "tree": {
        "kind": "dict",
        "keys": ["w", "b"],
        "children": [{"kind": "leaf"}, {"kind": "leaf"}],
      },
    },
  )
  with pytest.raises(SparseFileError, match="has path"):
    sparse_io.load_sparse(path)


def test_pickled_member_is_refused_not_executed(saved):
  path, _ = saved
  members = _members(path)
  header = _header(path)
  meta = [m for m in header["leaves"] if m["path"] == "['b']"][0]
  import io

  buf = io.BytesIO()
  np.lib.format.write_array(buf, np.array([object()], dtype=object), allow_pickle=True)
  members[meta["arrays"]["values"] + ".npy"] = buf.getvalue()
  _rewrite(path, members)
  with pytest.raises(SparseFileError, match="cannot read entry"):
    sparse_io.load_sparse(path)


def test_target_mismatch(saved):
  path, params = saved
  with pytest.raises(SparseFileError, match="leaves but target has"):
    sparse_io.load_sparse(path, target={"w": params["w"]})
  with pytest.raises(SparseFileError, match="structures differ"):
    sparse_io.load_sparse(path, target={"w": params["w"], "c": params["b"]})
  with pytest.raises(
    SparseFileError,
    match=r"float32\[60, 50\] in the file "
    r"but float32\[50, 60\]",
  ):
    sparse_io.load_sparse(path, target={"w": params["w"].T, "b": params["b"]})
  with pytest.raises(SparseFileError, match="bfloat16"):
    sparse_io.load_sparse(
      path, target={"w": jnp.asarray(params["w"], jnp.bfloat16), "b": params["b"]}
    )
  back = sparse_io.load_sparse(path, target=params)
  assert_bitwise_equal(back, params)


def test_save_errors_leave_no_file(tmp_path):
  path = tmp_path / "bad.npz"
  with pytest.raises(TypeError, match="dtype <U"):
    sparse_io.save_sparse(path, {"w": np.array(["a"])})
  with pytest.raises(TypeError, match="complex128"):
    sparse_io.save_sparse(path, {"w": np.zeros(2, np.complex128)})
  with pytest.raises(TypeError, match="dict keys must be str or int"):
    sparse_io.save_sparse(path, {(1, 2): np.zeros(2)})
  assert os.listdir(tmp_path) == []


def test_overwrite_is_atomic_replace(saved):
  path, params = saved
  sparse_io.save_sparse(path, {"x": np.arange(4, dtype=np.int16)})
  back = sparse_io.load_sparse(path)
  np.testing.assert_array_equal(back["x"], np.arange(4))
  assert sorted(os.listdir(path.parent)) == ["model.npz"]


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16])
def test_negative_zeros_kept_or_dropped(tmp_path, dtype):
  x = np.array([[-0.0, 0.0], [-1.5, -0.0]], np.float32).astype(dtype)
  info = sparse_io.save_sparse(tmp_path / "a.npz", {"x": x})
  assert info.leaves[0].nonzeros == 3
  assert_bitwise_equal(sparse_io.load_sparse(tmp_path / "a.npz"), {"x": x})
  info = sparse_io.save_sparse(tmp_path / "b.npz", {"x": x}, keep_negative_zeros=False)
  assert info.leaves[0].nonzeros == 1
  back = sparse_io.load_sparse(tmp_path / "b.npz")["x"]
  np.testing.assert_array_equal(back.astype(np.float32), x.astype(np.float32))
  assert not np.signbit(back.astype(np.float32)[back.astype(np.float32) == 0]).any()


def _forge(path, leaf_path, role, new_array):
  """Replaces one array of a leaf and re-signs it: only the consistency
  checks behind the checksum can catch the result."""
  members = _members(path)
  header = _header(path)
  meta = [m for m in header["leaves"] if m["path"] == leaf_path][0]
  members[meta["arrays"][role] + ".npy"] = _npy_bytes(new_array)
  arrays = {}
  for r, name in meta["arrays"].items():
    data = members[name + ".npy"]
    import io

    arrays[r] = np.lib.format.read_array(io.BytesIO(data))
  # pylint: disable=protected-access
  roles = sparse_io._ROLES[meta["encoding"]]
  meta["sha256"] = sparse_io._sha256(meta, [arrays[r] for r in roles])
  members["header.npy"] = _npy_bytes(np.frombuffer(json.dumps(header).encode(), np.uint8))
  _rewrite(path, members)


def test_forged_but_inconsistent_payloads(tmp_path):
  path = tmp_path / "f.npz"
  small = np.zeros(100, np.float32)
  small[[3, 50]] = 1.0
  big = np.zeros(200_000, np.float32)
  big[::997] = 1.0
  sparse_io.save_sparse(path, {"s": small, "b": big})
  assert [r.encoding for r in sparse_io.sparse_file_report(path).leaves] == ["csr", "coo"]
  _forge(path, "['s']", "indices", np.array([50, 3], "<u2"))
  with pytest.raises(SparseFileError, match="strictly increasing"):
    sparse_io.load_sparse(path)
  sparse_io.save_sparse(path, {"s": small, "b": big})
  k = int(np.count_nonzero(big))
  _forge(path, "['b']", "indptr", np.array([0, k, 5, k, k], "<i4"))
  with pytest.raises(SparseFileError, match="indptr must rise"):
    sparse_io.load_sparse(path)
  sparse_io.save_sparse(path, {"s": small, "b": big})
  _forge(path, "['s']", "values", np.array([0, 7], "<u4"))
  with pytest.raises(SparseFileError, match="stored non-zero entry is zero"):
    sparse_io.load_sparse(path)


def test_deeply_nested_header_tree(saved):
  path, _ = saved
  header = json.dumps({**_header(path), "tree": None})
  deep = '{"kind":"list","children":[' * 100_000 + '{"kind":"leaf"}' + "]}" * 100_000
  members = _members(path)
  members["header.npy"] = _npy_bytes(
    np.frombuffer(header.replace('"tree": null', '"tree": ' + deep).encode(), np.uint8)
  )
  _rewrite(path, members)
  with pytest.raises(SparseFileError):
    sparse_io.load_sparse(path)


# --- issue 17 E: malformed inputs, exact tree, temporary files ------------------


def test_header_of_pickle_bytes_is_refused(saved):
  path, _ = saved
  import pickle

  members = _members(path)
  members["header.npy"] = pickle.dumps({"format": "optax_gsm.sparse"})
  _rewrite(path, members)
  for fn in (sparse_io.load_sparse, sparse_io.sparse_file_report):
    with pytest.raises(SparseFileError) as e:
      fn(path)
    text = str(e.value)
    assert text.startswith(f"{path}: cannot read the header: the entry is not a .npy array but ")
    assert "expected a .npy array" in text


def test_leaf_member_of_raw_bytes_is_refused(saved):
  path, _ = saved
  members = _members(path)
  name = [m for m in _header(path)["leaves"] if m["path"] == "['b']"][0]["arrays"]["values"]
  members[name + ".npy"] = b"not an npy file at all"
  _rewrite(path, members)
  with pytest.raises(
    SparseFileError,
    match=r"leaf \d \(\['b'\]\): cannot read entry .*"
    r"22 raw bytes starting b'not an n'",
  ):
    sparse_io.load_sparse(path)


@pytest.mark.parametrize("fn", [sparse_io.load_sparse, sparse_io.sparse_file_report])
def test_single_npy_file_is_refused(tmp_path, fn):
  path = tmp_path / "weights.npy"
  np.save(path, np.ones(3, np.float32))
  with pytest.raises(SparseFileError) as e:
    fn(path)
  assert str(e.value) == (
    f"{path} is a single .npy array (ndarray), not a sparse model .npz "
    "file (a zip of .npy arrays with a 'header' entry)."
  )


def test_header_has_a_tree_checksum(saved):
  path, _ = saved
  header = _header(path)
  assert header["version"] == 2
  text = json.dumps(header["tree"], sort_keys=True, separators=(",", ":"))
  import hashlib

  assert header["tree_sha256"] == hashlib.sha256(text.encode()).hexdigest()


def _tuple_file(tmp_path):
  path = tmp_path / "t.npz"
  sparse_io.save_sparse(path, {"a": (np.ones(2, np.float32), np.zeros(3, np.int8)), "n": None})
  return path


def _tuple_to_list(tree):
  tree["children"][0]["kind"] = "list"


def _append_none(tree):
  tree["children"][0]["children"].append({"kind": "none"})


def _none_to_empty_tuple(tree):
  tree["children"][1] = {"kind": "tuple", "children": []}


@pytest.mark.parametrize("edit", [_tuple_to_list, _append_none, _none_to_empty_tuple])
@pytest.mark.parametrize("fn", ["load", "load_target", "report"])
def test_edited_tree_is_refused(tmp_path, edit, fn):
  path = _tuple_file(tmp_path)
  target = sparse_io.load_sparse(path)
  header = _header(path)
  edit(header["tree"])
  _with_header(path, header)
  call = {
    "load": lambda: sparse_io.load_sparse(path),
    "load_target": lambda: sparse_io.load_sparse(path, target=target),
    "report": lambda: sparse_io.sparse_file_report(path),
  }[fn]
  with pytest.raises(SparseFileError, match=r"does not match its checksum .*edited"):
    call()


def test_tree_needs_its_checksum_from_version_2(tmp_path):
  path = _tuple_file(tmp_path)
  header = _header(path)
  del header["tree_sha256"]
  _with_header(path, header)
  with pytest.raises(SparseFileError, match="needs 'tree_sha256'"):
    sparse_io.load_sparse(path)


def test_version_1_file_still_loads_and_its_tree_is_checked(tmp_path):
  path = _tuple_file(tmp_path)
  want = sparse_io.load_sparse(path)
  header = _header(path)
  del header["tree_sha256"]
  header["version"] = 1
  _with_header(path, header)
  got = sparse_io.load_sparse(path)
  assert type(got["a"]) is tuple and got["n"] is None
  assert_bitwise_equal(got, want)
  assert len(sparse_io.sparse_file_report(path).leaves) == 2
  # Without a checksum, fields that save_sparse never writes still fail.
  header["tree"]["children"][0]["extra"] = 1
  _with_header(path, header)
  with pytest.raises(
    SparseFileError,
    match=r"malformed: ValueError: at "
    r"\['a'\]: a 'tuple' node has the fields \['children', "
    r"'kind'\], got \['children', 'extra', 'kind'\]",
  ):
    sparse_io.load_sparse(path)


@pytest.mark.parametrize(
  "tree, match",
  [
    (
      {"kind": "dict", "keys": ["a", "a"], "children": [{"kind": "leaf"}, {"kind": "leaf"}]},
      "repeated dict keys",
    ),
    (
      {"kind": "dict", "keys": [True, "n"], "children": [{"kind": "leaf"}, {"kind": "none"}]},
      "dict keys must be str or int",
    ),
    ({"kind": "dict", "keys": ["a"], "children": {"a": 1}}, "'children' must be a list"),
    (
      {"kind": "node", "type": "x.Y", "keys": [{"slot": 0}], "children": [{"kind": "leaf"}]},
      "a key entry must be",
    ),
    ({"kind": "leaf", "keys": []}, "a 'leaf' node has the fields"),
    ([], "expected a node"),
  ],
)
def test_malformed_tree_fields(tmp_path, tree, match):
  path = _tuple_file(tmp_path)
  header = _header(path)
  header["tree"] = tree
  _with_header(path, header)
  with pytest.raises(SparseFileError, match="malformed: ValueError: .*" + match):
    sparse_io.load_sparse(path)


def _temps(folder):
  return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt])
def test_failed_save_removes_its_temporary_file(tmp_path, monkeypatch, error):
  path = tmp_path / "model.npz"
  sparse_io.save_sparse(path, {"w": np.ones(3, np.float32)})
  before = path.read_bytes()

  def fail(fileobj, members):
    fileobj.write(b"partial")
    raise error

  monkeypatch.setattr(sparse_io, "_write_zip", fail)
  with pytest.raises(type(error) if isinstance(error, BaseException) else error):
    sparse_io.save_sparse(path, {"w": np.zeros(3, np.float32)})
  assert _temps(tmp_path) == []
  assert path.read_bytes() == before  # the old file is intact


def test_failed_replace_removes_its_temporary_file(tmp_path, monkeypatch):
  path = tmp_path / "model.npz"

  def fail(src, dst):
    raise PermissionError("read-only destination")

  monkeypatch.setattr(sparse_io.os, "replace", fail)
  with pytest.raises(PermissionError):
    sparse_io.save_sparse(path, {"w": np.ones(3, np.float32)})
  assert _temps(tmp_path) == [] and not path.exists()


def test_stale_temporary_file_of_a_killed_save_is_removed(tmp_path):
  import signal
  import subprocess
  import sys
  import time

  path = tmp_path / "model.npz"
  # A save killed (SIGKILL: no finally runs) while writing its temporary file.
  code = (
    "import sys, time, numpy as np\n"
    "from optax_gsm import sparse_io\n"
    "write = sparse_io._write_zip\n"
    "def hang(f, members):\n"
    "  if isinstance(f, sparse_io._SizeOnly):\n"
    "    return write(f, members)\n"
    "  f.write(b'partial'); f.flush(); print('writing', flush=True)\n"
    "  time.sleep(60)\n"
    "sparse_io._write_zip = hang\n"
    "sparse_io.save_sparse(sys.argv[1], {'w': np.ones(3, np.float32)})\n"
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", code, str(path)],
    stdout=subprocess.PIPE,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  try:
    assert proc.stdout.readline().strip() == "writing"
    (stale,) = _temps(tmp_path)
    assert stale.startswith(".model.npz")
    # While the writer lives, its temporary file is left alone, however old.
    old = time.time() - 60
    os.utime(tmp_path / stale, (old, old))
    sparse_io.save_sparse(path, {"w": np.zeros(2, np.float32)})
    assert _temps(tmp_path) == [stale]
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert _temps(tmp_path) == [stale]  # the killed writer left it
  os.utime(tmp_path / stale, (old, old))
  # A fresh one is kept: its writer may not have locked it yet.
  young = tmp_path / ".model.npzabcd1234.tmp"
  young.write_bytes(b"x")
  # Another file's temporary file is not touched.
  other = tmp_path / ".model.npz2abcd1234.tmp"
  other.write_bytes(b"x")
  os.utime(other, (old, old))
  info = sparse_io.save_sparse(path, {"w": np.ones(4, np.float32)})
  assert _temps(tmp_path) == sorted([young.name, other.name])
  assert info.path == str(path)
  assert_bitwise_equal(sparse_io.load_sparse(path), {"w": np.ones(4, np.float32)})
