"""Data: offline preparation (and its MNIST / Fashion-MNIST pitfall), manual-dir
checks, deterministic in-memory pipelines, and the CIFAR-10 / ImageNet pipelines
under ``tfds.testing.mock_data``."""

from __future__ import annotations

import collections
import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from experiments import data


def read_idx(path: Path) -> np.ndarray:
  """Parses an IDX file (LeCun's format) with numpy alone."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  ndim = raw[3]
  dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
  assert raw[2] == 0x08, "unsigned byte data"
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def example_multiset(images: np.ndarray, labels: np.ndarray) -> collections.Counter:
  """Order-free fingerprint of a split: counts of (image digest, label)."""
  images = images.reshape(len(images), -1)
  return collections.Counter(
    (hashlib.sha1(img.tobytes()).hexdigest(), int(lab)) for img, lab in zip(images, labels)
  )


# ------------------------------------------------------------------ preparation


def test_mnist_and_fashion_in_one_data_dir_differ(
  mnist_builder, fashion_mnist_builder, tfds_data_dir: Path, shared_datasets: Path, split_arrays
) -> None:
  """Both datasets prepared into ONE data_dir (MNIST first) stay distinct and each
  equals its raw IDX files, parsed here independently of TFDS."""
  mnist_x, mnist_y = split_arrays(mnist_builder, "train")
  fashion_x, fashion_y = split_arrays(fashion_mnist_builder, "train")
  assert mnist_x.shape == fashion_x.shape == (60000, 28, 28, 1)
  assert not np.array_equal(mnist_x, fashion_x)
  assert example_multiset(mnist_x, mnist_y) != example_multiset(fashion_x, fashion_y)
  # Each dataset had its own download/extraction folder.
  assert (tfds_data_dir / "downloads" / "mnist").is_dir()
  assert (tfds_data_dir / "downloads" / "fashion_mnist").is_dir()

  for name, builder in (("mnist", mnist_builder), ("fashion_mnist", fashion_mnist_builder)):
    raw = shared_datasets / name
    for split, prefix in (("train", "train"), ("test", "t10k")):
      raw_x = read_idx(raw / f"{prefix}-images-idx3-ubyte.gz")
      raw_y = read_idx(raw / f"{prefix}-labels-idx1-ubyte.gz")
      x, y = split_arrays(builder, split)
      assert x.shape[0] == raw_x.shape[0]
      # TFDS stores examples in its own (hashed) order: compare as multisets,
      # and look a few examples up exactly.
      assert example_multiset(x, y) == example_multiset(raw_x, raw_y), (name, split)
      index = {hashlib.sha1(img.tobytes()).hexdigest(): i for i, img in enumerate(raw_x)}
      for i in (0, 1, 2, 100, len(x) - 1):
        j = index[hashlib.sha1(x[i, :, :, 0].tobytes()).hexdigest()]
        np.testing.assert_array_equal(x[i, :, :, 0], raw_x[j])
        assert y[i] == raw_y[j]


def test_wrong_manual_folder_is_rejected(shared_datasets: Path, tmp_path: Path) -> None:
  with pytest.raises(data.ManualDirError, match="'mnist/train-images-idx3-ubyte.gz'"):
    data.verify_manual_dir("fashion_mnist", shared_datasets / "mnist")
  with pytest.raises(data.ManualDirError, match="another dataset"):
    data.prepare("fashion_mnist", data_dir=tmp_path, manual_dir=shared_datasets / "mnist")
  assert not (tmp_path / "fashion_mnist").exists()  # nothing was built


def test_manual_folder_checks(shared_datasets: Path, tmp_path: Path) -> None:
  verified = data.verify_manual_dir("mnist", shared_datasets / "mnist")
  assert verified == {f.name: f.sha256 for f in data.DATASETS["mnist"].manual_files}
  with pytest.raises(data.ManualDirError, match="missing"):
    data.verify_manual_dir("mnist", tmp_path)
  (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not mnist")
  for f in data.DATASETS["mnist"].manual_files[1:]:
    (tmp_path / f.name).write_bytes((shared_datasets / "mnist" / f.name).read_bytes())
  with pytest.raises(data.ManualDirError, match="corrupt or not the official"):
    data.verify_manual_dir("mnist", tmp_path)


def test_unavailable_dataset_error_says_how_to_supply_it(tmp_path: Path) -> None:
  with pytest.raises(data.DatasetError) as info:
    data.prepare("cifar10", data_dir=tmp_path, manual_dir=None, download=False)
  message = str(info.value)
  assert "--manual-dir" in message and "--data-dir" in message
  assert "cifar-10-binary.tar.gz" in message


def test_default_data_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  assert data.default_data_dir() == tmp_path
  monkeypatch.delenv(data.DATA_DIR_ENV)
  assert data.default_data_dir() == Path.home() / ".cache" / "optax_gsm" / "tensorflow_datasets"


def test_poisoned_data_dir_is_detected(
  mnist_builder, split_arrays, monkeypatch: pytest.MonkeyPatch
) -> None:
  """A Fashion-MNIST 'prepared' from MNIST files (the TFDS pitfall) fails to load."""
  mnist_arrays = split_arrays(mnist_builder, "train")
  monkeypatch.setattr(data, "load_arrays", lambda builder, split: mnist_arrays)
  with pytest.raises(data.DatasetError, match="does not look like fashion_mnist"):
    data.load("fashion_mnist", "train", batch_size=256, builder=mnist_builder)


# ------------------------------------------------------------------ pipelines


def test_mnist_pipeline(mnist_builder, split_arrays) -> None:
  spec = data.DATASETS["mnist"]
  images, labels = split_arrays(mnist_builder, "train")
  train = data.InMemoryPipeline(images, labels, spec=spec, batch_size=256, train=True, seed=3)
  assert (train.num_examples, train.steps_per_epoch) == (60000, 234)
  batches = list(train.epoch(0))
  assert len(batches) == 234
  b = batches[0]
  assert b.image.shape == (256, 28, 28, 1) and b.image.dtype == np.float32
  assert b.label.shape == (256,) and b.label.dtype == np.int32
  # Normalised with MNIST's mean/std: the whole epoch has mean ~0 and std ~1.
  normalised = np.concatenate([x.image for x in batches])
  assert abs(normalised.mean()) < 0.01 and abs(normalised.std() - 1) < 0.01
  # Each epoch is a permutation (no duplicates), fixed by (seed, epoch).
  first = np.concatenate([x.label for x in batches])
  again = np.concatenate([x.label for x in train.epoch(0)])
  np.testing.assert_array_equal(first, again)
  np.testing.assert_array_equal(next(train.epoch(5)).image, next(train.epoch(5)).image)
  assert not np.array_equal(next(train.epoch(1)).image, b.image)
  other_seed = data.InMemoryPipeline(images, labels, spec=spec, batch_size=256, train=True, seed=4)
  assert not np.array_equal(next(other_seed.epoch(0)).image, b.image)

  # data.load: the whole path, from the prepared TFDS data.
  test = data.load("mnist", "test", batch_size=3000, builder=mnist_builder)
  batches = list(test.epoch(0))
  assert len(batches) == 4  # 10000 = 3 * 3000 + 1000, last batch padded
  assert batches[-1].mask.sum() == 1000 and batches[-1].image.shape[0] == 3000
  assert sum(float(x.mask.sum()) for x in batches) == 10000

  subset = data.load("mnist", "train", batch_size=100, subset=1000, builder=mnist_builder)
  assert subset.num_examples == 1000 and subset.steps_per_epoch == 10

  stats = data.measure_throughput(train, max_batches=50)
  assert stats["images_per_s"] > 1000 and stats["batches"] == 50


def test_cifar_crop_flip_matches_naive_loop() -> None:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
  offsets = rng.integers(0, 9, size=(6, 2))
  flips = np.array([True, False, True, False, True, True])
  pipe = data.InMemoryPipeline(
    images, np.zeros(6), spec=data.DATASETS["cifar10"], batch_size=2, train=True
  )
  fast = pipe._crop_flip(images, offsets, flips)
  for i in range(6):
    padded = np.pad(images[i], ((4, 4), (4, 4), (0, 0)))
    crop = padded[offsets[i, 0] : offsets[i, 0] + 32, offsets[i, 1] : offsets[i, 1] + 32]
    if flips[i]:
      crop = crop[:, ::-1]
    np.testing.assert_array_equal(fast[i], crop)


def test_cifar10_pipeline_under_mock_data(tmp_path: Path) -> None:
  tfds = data.import_tfds()
  spec = data.DATASETS["cifar10"]
  with tfds.testing.mock_data(num_examples=40):
    builder = data.prepare("cifar10", data_dir=tmp_path)
    raw_x, raw_y = data.load_arrays(builder, "test")
    train = data.load("cifar10", "train", batch_size=8, builder=builder)
    test = data.load("cifar10", "test", batch_size=16, builder=builder)
  assert train.augment and not test.augment
  b = next(train.epoch(0))
  assert b.image.shape == (8, 32, 32, 3) and b.image.dtype == np.float32
  assert b.label.dtype == np.int32 and set(b.label) <= set(range(10))
  np.testing.assert_array_equal(b.image, next(train.epoch(0)).image)
  assert not np.array_equal(b.image, next(train.epoch(1)).image)
  # Evaluation batches are exactly (x / 255 - mean) / std, in order, padded at the end.
  batches = list(test.epoch(0))
  assert len(batches) == 3 and batches[-1].mask.sum() == 40 - 32
  expected = (raw_x[:16] / 255.0 - np.array(spec.mean)) / np.array(spec.std)
  np.testing.assert_allclose(batches[0].image, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(batches[0].label, raw_y[:16])
  # Augmented training images are crops of zero-padded originals: every pixel is
  # either a normalised original pixel value or the normalised zero padding.
  padding = -np.array(spec.mean) / np.array(spec.std)
  lo = (0 - np.array(spec.mean)) / np.array(spec.std)
  hi = (1 - np.array(spec.mean)) / np.array(spec.std)
  assert np.all(b.image >= lo - 1e-5) and np.all(b.image <= hi + 1e-5)
  assert np.isclose(b.image, padding, atol=1e-6).all(-1).any()  # some padding shows


def test_imagenet_pipeline_under_mock_data(tmp_path: Path) -> None:
  tfds = data.import_tfds()
  spec = data.DATASETS["imagenet2012"]
  with tfds.testing.mock_data(num_examples=24):
    builder = data.prepare("imagenet2012", data_dir=tmp_path)
    train = data.load("imagenet2012", "train", batch_size=8, image_size=64, builder=builder)
    test = data.load("imagenet2012", "test", batch_size=10, image_size=64, builder=builder)
    first = list(train.epoch(0))
    again = list(train.epoch(0))
    other = list(train.epoch(1))
    evals = list(test.epoch(0))
    stats = data.measure_throughput(train, max_batches=2, warmup=1)
  assert len(first) == 3
  b = first[0]
  assert b.image.shape == (8, 64, 64, 3) and b.image.dtype == np.float32
  assert b.label.shape == (8,) and b.label.dtype == np.int32
  assert np.all((b.label >= 0) & (b.label < 1000))
  lo = (0 - np.array(spec.mean)) / np.array(spec.std)
  hi = (1 - np.array(spec.mean)) / np.array(spec.std)
  assert np.all(b.image >= lo - 1e-3) and np.all(b.image <= hi + 1e-3)
  assert b.image.std() > 0.1  # not constant
  for x, y in zip(first, again):  # deterministic given (seed, epoch)
    np.testing.assert_array_equal(x.image, y.image)
    np.testing.assert_array_equal(x.label, y.label)
  assert not np.array_equal(first[0].image, other[0].image)
  assert [float(x.mask.sum()) for x in evals] == [10.0, 10.0, 4.0]
  assert evals[0].image.shape == (10, 64, 64, 3)
  assert stats["images_per_s"] > 0


# ------------------------------------------------------------------ identity on every split


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("subset", [None, 2048, 5, 1])
def test_identity_is_checked_on_every_split_and_subset(
  mnist_builder, fashion_mnist_builder, split: str, subset: int | None
) -> None:
  """A prepared 'mnist' that really holds Fashion-MNIST (and the reverse) is refused,
  whatever the split and subset size; the real datasets load."""
  for name, builder in (("mnist", mnist_builder), ("fashion_mnist", fashion_mnist_builder)):
    pipe = data.load(name, split, batch_size=1, subset=subset, builder=builder)
    assert pipe.num_examples == (subset or {"train": 60000, "test": 10000}[split])
  k = min(subset or 8, 8)
  for name, builder, other in (
    ("mnist", fashion_mnist_builder, "fashion_mnist"),
    ("fashion_mnist", mnist_builder, "mnist"),
  ):
    with pytest.raises(data.DatasetError) as info:
      data.load(name, split, batch_size=1, subset=subset, builder=builder)
    want = dict(data.DATASETS[name].fingerprints)[split][:k]
    assert str(info.value) == (
      f"the prepared {name!r} in {builder.data_dir} does not look like {name}: the first {k} "
      f"examples of its split {split!r} should have the digests {', '.join(want)}, but they are "
      f"the first examples of {other!r}: it was built from {other}'s files. Delete "
      f"{builder.data_dir} and prepare it again."
    )


def test_a_given_manual_dir_is_checked_even_when_the_data_is_prepared(
  mnist_builder, tfds_data_dir: Path, shared_datasets: Path, tmp_path: Path
) -> None:
  assert mnist_builder.is_prepared()
  with pytest.raises(data.ManualDirError, match="'fashion_mnist/train-images-idx3-ubyte.gz'"):
    data.prepare("mnist", data_dir=tfds_data_dir, manual_dir=shared_datasets / "fashion_mnist")
  with pytest.raises(data.ManualDirError) as missing:
    data.prepare("mnist", data_dir=tfds_data_dir, manual_dir=tmp_path / "nope")
  assert str(missing.value) == f"manual directory {tmp_path / 'nope'} for 'mnist' does not exist"
  (tmp_path / "file").write_bytes(b"x")
  with pytest.raises(data.ManualDirError) as is_file:
    data.prepare("mnist", data_dir=tfds_data_dir, manual_dir=tmp_path / "file")
  assert str(is_file.value).startswith(
    f"manual directory {tmp_path / 'file'} for 'mnist' is a file, not a folder"
  )
  # The right folder (or none) still loads the cached data.
  assert data.prepare(
    "mnist", data_dir=tfds_data_dir, manual_dir=shared_datasets / "mnist"
  ).is_prepared()
